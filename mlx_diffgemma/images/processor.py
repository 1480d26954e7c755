"""Images into encoder inputs, as transformers' Gemma 4 processor does it (NumPy, and
Pillow through load.py; no MLX).

- `preprocess`: resize keeping the aspect ratio to the largest size whose 16-pixel
  patches, pooled 3 x 3, fit the soft-token budget (bicubic, Pillow), rescale to [0, 1],
  patchify, pad to the budget: `pixel_values` [images, max_patches, 3 * 16 * 16] float32
  and `image_position_ids` [images, max_patches, 2] int64 ((x, y) of each patch, -1 for
  padding), exactly the arrays of `Gemma4ImageProcessorPil`.
- `Processor`: the tokenizer plus the above; expands each image placeholder of a prompt
  into begin-of-image, one image token per soft token, end-of-image (as `Gemma4Processor`
  does), and returns what `model.encode` takes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..models.config import read_json_object
from ..models.tokenizer import encode_text, image_blocks, render
from .load import MAX_IMAGE_PIXELS, ImageError, ImageSource, load_image

# The soft-token budgets the Gemma 4 image processor accepts.
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)

# -- preprocessing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageConfig:
    """The Gemma 4 image processor's settings (processor_config.json's `image_processor`)."""

    patch_size: int = 16
    max_soft_tokens: int = 280
    pooling_kernel_size: int = 3
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: Tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: Tuple[float, ...] = (1.0, 1.0, 1.0)
    resample: int = 3  # PIL bicubic

    def __post_init__(self):
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ImageError(f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS} "
                             f"(got {self.max_soft_tokens})")

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size ** 2

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ImageConfig":
        """From an `image_processor` dict (unknown keys ignored)."""
        kw = {k: d[k] for k in ("patch_size", "max_soft_tokens", "pooling_kernel_size",
                                "rescale_factor", "do_normalize", "resample") if d.get(k) is not None}
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        return cls(**kw)


def target_size(height: int, width: int, config: ImageConfig) -> Tuple[int, int]:
    """The resized (height, width): the largest multiples of patch x pooling kernel
    (48 px) keeping the aspect ratio within the patch budget; a side that would round to
    nothing gets one 48-px unit and the other side its ratio of them (capped)."""
    unit = config.pooling_kernel_size * config.patch_size
    budget_px = config.max_patches * config.patch_size ** 2
    scale = math.sqrt(budget_px / (height * width))
    h = int(math.floor(scale * height / unit)) * unit
    w = int(math.floor(scale * width / unit)) * unit
    if h == 0 and w == 0:
        raise ImageError(f"a {width} x {height} image cannot be resized to the patch budget; "
                         "give a larger image")
    longest = (config.max_patches // config.pooling_kernel_size ** 2) * unit
    if h == 0:
        h, w = unit, min(int(math.floor(width / height)) * unit, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * unit, longest), unit
    if h * w > budget_px:
        raise ImageError(f"a {width} x {height} image resizes to {w} x {h}, over the "
                         f"{config.max_patches}-patch budget; crop it to a less extreme shape")
    return h, w


def _patches(pixels: np.ndarray, patch: int) -> np.ndarray:
    """[H, W, C] -> [patches, patch * patch * C], patches row by row, each patch's pixels
    row by row with the channels innermost (the reference's order)."""
    H, W, C = pixels.shape
    grid = pixels.reshape(H // patch, patch, W // patch, patch, C).transpose(0, 2, 1, 3, 4)
    return grid.reshape((H // patch) * (W // patch), patch * patch * C)


def _one_image(im, config: ImageConfig) -> Tuple[np.ndarray, np.ndarray, int]:
    """One RGB PIL image -> (patches [max_patches, P], positions [max_patches, 2], soft tokens)."""
    width, height = im.size
    h, w = target_size(height, width, config)
    if (h, w) != (height, width):
        im = im.resize((w, h), resample=config.resample)
    pixels = np.asarray(im, dtype=np.uint8).astype(np.float64) * config.rescale_factor
    pixels = pixels.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, dtype=np.float32)
        std = np.asarray(config.image_std, dtype=np.float32)
        pixels = (pixels - mean) / std
    p = config.patch_size
    patches = _patches(pixels, p)
    cols, rows = w // p, h // p
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(-1, 2).astype(np.int64)
    n = patches.shape[0]
    out = np.zeros((config.max_patches, patches.shape[1]), dtype=np.float32)
    out[:n] = patches
    pos = np.full((config.max_patches, 2), -1, dtype=np.int64)
    pos[:n] = positions
    return out, pos, n // config.pooling_kernel_size ** 2


@dataclass
class ImageInputs:
    """Preprocessed images, as transformers' Gemma 4 image processor returns them."""

    pixel_values: np.ndarray  # [images, max_patches, 3 * patch * patch] float32
    image_position_ids: np.ndarray  # [images, max_patches, 2] int64, -1 = padding
    num_soft_tokens: List[int]  # per image
    digests: List[str] = field(default_factory=list)  # per image, of its pixel values

    def __len__(self) -> int:
        return len(self.num_soft_tokens)

    def encoder_kwargs(self) -> Dict[str, Any]:
        """The arrays `Model.encode` takes for these images."""
        return {"pixel_values": self.pixel_values, "image_position_ids": self.image_position_ids}

    def select(self, indices: Sequence[int]) -> "ImageInputs":
        idx = list(indices)
        return ImageInputs(self.pixel_values[idx], self.image_position_ids[idx],
                           [self.num_soft_tokens[i] for i in idx], [self.digests[i] for i in idx])

    @staticmethod
    def concat(parts: Sequence["ImageInputs"], config: ImageConfig) -> "ImageInputs":
        parts = [p for p in parts if len(p)]
        if not parts:
            return preprocess([], config)
        return ImageInputs(np.concatenate([p.pixel_values for p in parts]),
                           np.concatenate([p.image_position_ids for p in parts]),
                           [n for p in parts for n in p.num_soft_tokens],
                           [d for p in parts for d in p.digests])


def preprocess(images: Sequence[ImageSource], config: Optional[ImageConfig] = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> ImageInputs:
    """Loads (`load_image`) and preprocesses `images` as one batch."""
    config = config or ImageConfig()
    P = 3 * config.patch_size ** 2
    values, positions, counts, digests = [], [], [], []
    for source in images:
        v, p, n = _one_image(load_image(source, max_pixels), config)
        values.append(v)
        positions.append(p)
        counts.append(n)
        digests.append(hashlib.sha256(v[: n * config.pooling_kernel_size ** 2].tobytes()).hexdigest())
    if not values:
        return ImageInputs(np.zeros((0, config.max_patches, P), np.float32),
                           np.zeros((0, config.max_patches, 2), np.int64), [], [])
    return ImageInputs(np.stack(values), np.stack(positions), counts, digests)


# -- the processor: tokenizer + images -> encoder inputs ------------------------------------------


@dataclass
class ImageTokens:
    """The image special tokens: placeholder (what a prompt or chat template writes where
    an image goes, and what each soft token becomes), begin- and end-of-image."""

    image: str
    image_id: int
    boi: str
    boi_id: int
    eoi: str
    eoi_id: int


@dataclass
class Prompt:
    """A prompt with its images expanded: what `model.encode` takes."""

    ids: List[int]
    images: ImageInputs
    blocks: List[Tuple[int, int]]  # per image, [start, end) of its image tokens in `ids`

    def arrays(self) -> Dict[str, Any]:
        """`input_ids` [1, T] and the image arrays, as transformers' processor returns them."""
        return {"input_ids": np.asarray([self.ids], dtype=np.int64), **self.images.encoder_kwargs()}


def _token_id(tokenizer, token: str) -> Optional[int]:
    # mlx-lm's TokenizerWrapper hands these calls to the transformers tokenizer inside.
    try:
        i = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # a tokenizer without the call
        return None
    return i if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None) else None


def _read(path: Path) -> Dict[str, Any]:
    return read_json_object(path, "an object", ImageError) if path.exists() else {}


class Processor:
    """Turns a prompt and its images into encoder inputs, as `Gemma4Processor` does.

    `Processor.from_model(model, tokenizer)` reads the image settings from the model
    directory (processor_config.json, else config.json's soft-token budget) and the
    image tokens from config.json and the tokenizer. `processor(text, images)` (text
    with one placeholder `<|image|>` per image, or token ids) -> `Prompt`;
    `processor.apply_chat_template(messages)` renders chat messages whose content parts
    hold images (`{"type": "image", "image": path | data URL | bytes | PIL image}`).
    """

    def __init__(self, tokenizer, tokens: ImageTokens, config: Optional[ImageConfig] = None,
                 max_pixels: int = MAX_IMAGE_PIXELS):
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.config = config or ImageConfig()
        self.max_pixels = max_pixels

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], tokenizer, **kwargs) -> "Processor":
        path = Path(path)
        config = _read(path / "config.json")
        if not isinstance(config.get("vision_config"), dict):
            raise ImageError(f"{path} has no vision tower (config.json has no vision_config); "
                             "use a multimodal DiffusionGemma checkpoint for images")
        pc = _read(path / "processor_config.json")
        ip = pc.get("image_processor", pc if "max_soft_tokens" in pc else {})
        settings = dict(ip)
        if "max_soft_tokens" not in settings and config.get("vision_soft_tokens_per_image"):
            settings["max_soft_tokens"] = config["vision_soft_tokens_per_image"]
        vc = config["vision_config"]
        for key in ("patch_size", "pooling_kernel_size"):
            if key not in settings and isinstance(vc.get(key), int):
                settings[key] = vc[key]
        return cls(tokenizer, image_tokens(tokenizer, config), ImageConfig.from_dict(settings), **kwargs)

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "Processor":
        path = getattr(model, "model_path", None)
        if path is None:
            raise ImageError("the model has no directory to read its image settings from; "
                             "build the processor with Processor.from_pretrained(path, tokenizer)")
        return cls.from_pretrained(path, tokenizer, **kwargs)

    # -- prompts ------------------------------------------------------------------------

    def images(self, images: Union[ImageInputs, Sequence[Any]]) -> ImageInputs:
        """Sources -> one batch; items already preprocessed (`ImageInputs`) are kept as
        they are (a chat keeps each image's arrays and re-sends them every turn)."""
        if isinstance(images, ImageInputs):
            return images
        parts = [s if isinstance(s, ImageInputs) else preprocess([s], self.config, self.max_pixels)
                 for s in images]
        return ImageInputs.concat(parts, self.config)

    def expand(self, ids: Sequence[int], images: ImageInputs) -> Prompt:
        """`ids` with each image placeholder replaced by begin-of-image, the image's soft
        tokens and end-of-image; a run already expanded (right after a begin-of-image)
        is kept when its length is its image's. Placeholders and images must pair up."""
        t, ids = self.tokens, list(ids)
        runs = image_blocks(np.asarray(ids) == t.image_id)
        expanded = [s > 0 and ids[s - 1] == t.boi_id for s, _ in runs]
        count = sum(1 if x else e - s for (s, e), x in zip(runs, expanded))
        if count != len(images):
            raise ImageError(
                f"the prompt has {count} image placeholder(s) ({t.image}) for {len(images)} "
                f"image(s); put one {t.image} where each image goes")
        out: List[int] = []
        blocks: List[Tuple[int, int]] = []
        last, k = 0, 0
        for (s, e), done in zip(runs, expanded):
            out += ids[last:s]
            if done:  # one image, already expanded
                n = images.num_soft_tokens[k]
                if e - s != n:
                    raise ImageError(f"image {k + 1}'s expanded block holds {e - s} image tokens "
                                     f"but the image has {n} soft tokens; expand it again")
                blocks.append((len(out), len(out) + n))
                out += ids[s:e]
                k += 1
            else:  # one placeholder per image
                for _ in range(e - s):
                    n = images.num_soft_tokens[k]
                    out.append(t.boi_id)
                    blocks.append((len(out), len(out) + n))
                    out += [t.image_id] * n + [t.eoi_id]
                    k += 1
            last = e
        out += ids[last:]
        return Prompt(out, images, blocks)

    def __call__(self, text: Union[str, Sequence[int]], images: Sequence[ImageSource] = ()) -> Prompt:
        """`text` (encoded as is, no chat template, no BOS added) or ids, with `images`."""
        if isinstance(text, str):
            ids = encode_text(self.tokenizer, text)
        else:
            ids = [int(i) for i in np.asarray(text).reshape(-1).tolist()]
        return self.expand(ids, self.images(images))

    def apply_chat_template(self, messages: Sequence[Dict[str, Any]],
                            add_generation_prompt: bool = True, **kwargs) -> Prompt:
        """Chat messages (content parts may be images) -> `Prompt`."""
        msgs, sources = split_image_parts(messages)
        _, text = render_with_images(self.tokenizer, msgs, self.tokens.image, len(sources),
                                     add_generation_prompt, **kwargs)
        return self(text, sources)


def image_tokens(tokenizer, config: Dict[str, Any]) -> ImageTokens:
    """The image special tokens: ids from config.json (as the model embeds them), strings
    from the tokenizer, which must spell them as single special tokens."""
    names = {"image": ("image_token", "image_token_id", 258880, "<|image|>"),
             "boi": ("boi_token", "boi_token_id", 255999, "<|image>"),
             "eoi": ("eoi_token", "eoi_token_id", 258882, "<image|>")}
    out: Dict[str, Any] = {}
    for key, (attr, id_key, default_id, default_token) in names.items():
        token = getattr(tokenizer, attr, None) or default_token
        want = config.get(id_key, default_id)
        got = _token_id(tokenizer, token)
        if got is None:  # a text-only tokenizer (toy-sudoku has a tower, but no image tokens)
            raise ImageError(f"this model takes no images: its tokenizer has no {token} token "
                             "to place one in the prompt; leave the images out, or use a "
                             "DiffusionGemma that reads images (the released one does)")
        if got != want:
            raise ImageError(f"the tokenizer has {token} at id {got}, but config.json's {id_key} "
                             f"is {want}: the two do not belong together; use the tokenizer that "
                             "ships with the model")
        out[key], out[f"{key}_id"] = token, int(want)
    return ImageTokens(**out)


def render_with_images(tokenizer, messages: Sequence[Dict[str, Any]], token: str, n_images: int,
                       add_generation_prompt: bool = True, **kwargs) -> Tuple[List[Dict[str, Any]], str]:
    """(the messages as rendered, the text) for messages whose image parts are
    `{"type": "image"}`: as content parts where the chat template places them, else with
    the placeholder `token` written into the text (a template that reads strings only)."""
    text = render(tokenizer, messages, add_generation_prompt, **kwargs)
    if not n_images or text.count(token) == n_images:
        return list(messages), text
    flat = [dict(m, content="".join(token if p.get("type") == "image" else p.get("text", "")
                                    for p in m["content"]))
            if isinstance(m.get("content"), list) else m for m in messages]
    text = render(tokenizer, flat, add_generation_prompt, **kwargs)
    if text.count(token) != n_images:
        raise ImageError(f"the chat template does not place the {n_images} image(s) (found "
                         f"{text.count(token)} {token}); use the model's own chat template")
    return flat, text


def split_image_parts(messages: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[ImageSource]]:
    """Messages whose image content parts are reduced to `{"type": "image"}` (what chat
    templates read) and the images' sources, in order."""
    out, sources = [], []
    for m in messages:
        content = m.get("content")
        if not isinstance(content, list):
            out.append(m)
            continue
        parts = []
        for part in content:
            if _is_image_part(part):
                sources.append(_image_source(part))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        out.append(dict(m, content=parts))
    return out, sources


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def _image_source(part: Dict[str, Any]) -> ImageSource:
    src = next((part[k] for k in ("image", "url", "path") if part.get(k) is not None), None)
    if src is None:
        raise ImageError("an image content part needs an \"image\", \"url\" or "
                         "\"path\" with the image")
    return src


def load_message_images(messages: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The messages with each image content part's image loaded now (`load_image`), so
    that a bad file is refused for what is wrong with it before anything else is asked
    of the model (whether it takes images at all)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [dict(p, image=load_image(_image_source(p))) if _is_image_part(p) else p
                       for p in content]
            m = dict(m, content=content)
        out.append(m)
    return out


# -- what the generation entry points share ------------------------------------------------------


def processor_for(model, tokenizer) -> Processor:
    """The model's processor; `ImageError` naming the fix when the model takes no images
    (no vision tower) or has no tokenizer to expand prompts with."""
    if tokenizer is None:
        raise ImageError("images need the model's tokenizer to expand the prompt; load a "
                         "directory that has one")
    require = getattr(model, "require_vision", None)
    if require is not None:
        try:
            require()
        except ValueError as e:
            raise ImageError(str(e)) from None
    return Processor.from_model(model, tokenizer)


def user_message(text: str, images: Sequence[Any] = (), names: Sequence[Optional[str]] = ()) -> Dict[str, Any]:
    """A user message; with images, content parts: the images (each with its `name` for
    a transcript), then the text."""
    if not images:
        return {"role": "user", "content": text}
    names = list(names) + [None] * (len(images) - len(names))
    parts = [{"type": "image", "image": im, "name": n} for im, n in zip(images, names)]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)
