"""Images loaded as the reference loads them (Pillow; no MLX, no NumPy).

`load_image`: a path, a data URL, raw bytes or a PIL image -> a fully decoded RGB
image, or one clear line saying what is wrong (missing file, not an image, truncated,
too many pixels). EXIF orientation is applied (as transformers' `load_image` does);
transparency is composited onto white and any other mode converted to RGB (as the
Gemma 4 image processor's `convert_to_rgb` does); of an animated or multi-frame file
the first frame is used (what the reference sees of it).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Any

# Decoding a larger image is refused before its pixels are read: 64 megapixels is about
# 8000 x 8000 (192 MB as RGB), far above what the tower sees (at most 1120 soft tokens,
# about 2.6 megapixels after the resize).
MAX_IMAGE_PIXELS = 64_000_000

PIL_MISSING = "images need Pillow: pip install 'mlx-diffgemma[images]' (or pip install pillow)"

ImageSource = Any  # str | Path | bytes | PIL.Image.Image


class ImageError(ValueError):
    """A bad image or image option, in one line naming the problem and the fix."""


def _pil():
    try:
        from PIL import Image, ImageFile, ImageOps
    except ImportError:
        raise ImageError(PIL_MISSING) from None
    return Image, ImageFile, ImageOps


def describe(source: Any) -> str:
    """How messages and transcripts name an image source."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"the image data ({len(source)} bytes)"
    if isinstance(source, str) and source.startswith("data:"):
        return "the image data URL"
    if isinstance(source, (str, Path)):
        return str(source)
    size = getattr(source, "size", None)
    return f"a {size[0]} x {size[1]} image" if isinstance(size, tuple) and len(size) == 2 else "an image"


def _data_url_bytes(url: str) -> bytes:
    """The bytes of a `data:[<media type>][;base64],<data>` URL (base64 only)."""
    head, sep, data = url.partition(",")
    if not sep:
        raise ImageError("the image data URL has no ',' before its data; "
                         "send data:image/png;base64,<base64 bytes>")
    if not head.endswith(";base64"):
        raise ImageError("the image data URL is not base64-encoded; "
                         "send data:image/png;base64,<base64 bytes>")
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL's base64 data is invalid; encode the file "
                         "with base64 again") from None


def _open(source: ImageSource):
    """A PIL image (not yet decoded) from any accepted source."""
    Image, _, _ = _pil()
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, str) and source.startswith("data:"):
        return Image.open(io.BytesIO(_data_url_bytes(source)))
    if not isinstance(source, (str, Path)):
        raise ImageError(f"an image must be a path, a data URL, bytes or a PIL image "
                         f"(got {type(source).__name__})")
    path = Path(source).expanduser()
    if not path.exists():
        raise ImageError(f"image file not found: {path}; check the path")
    if not path.is_file():
        raise ImageError(f"{path} is not a file; give the path of an image file")
    return Image.open(path)


def _check_pixels(im, what: str, max_pixels: int) -> None:
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageError(f"{what} is empty ({w} x {h} pixels); give a non-empty image")
    if w * h > max_pixels:
        raise ImageError(f"{what} is {w} x {h} = {w * h:,} pixels, over the limit of "
                         f"{max_pixels:,}; downscale it first")


def _to_rgb(im):
    """RGB, as the reference's `convert_to_rgb`: transparency composited onto white."""
    Image, _, _ = _pil()
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def load_image(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS):
    """`source` (path, data URL, bytes or PIL image) as a fully decoded RGB PIL image;
    `ImageError` with one line saying what is wrong otherwise."""
    Image, ImageFile, ImageOps = _pil()
    what = describe(source)
    truncated_ok = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        with warnings.catch_warnings():
            # Pillow's own decompression-bomb guard warns, then raises; either is ours.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A truncated file must fail here, not decode as a half-grey image.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im = _open(source)
            _check_pixels(im, what, max_pixels)
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # the first frame: what the reference processor sees
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{what} has too many pixels to decode safely; downscale it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{what} is not an image Pillow can read; give a PNG, JPEG, WebP, "
                         "GIF or BMP file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # Pillow's decode errors
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ImageError(f"{what} is truncated or damaged ({detail}); re-save or "
                         "re-download the image") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_ok
