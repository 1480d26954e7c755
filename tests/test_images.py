"""Image inputs (mlx_diffgemma.images.processor) against transformers' Gemma 4 processor: the same
pixel values, patch positions and expanded prompt ids on the same images, and every bad
image refused in one line."""

from __future__ import annotations

import base64
import io
import json
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_checkpoints import media_token_ids, reference_processor, vision_token_config, write_tokenizer

from mlx_diffgemma.images.load import PIL_MISSING, ImageError, load_image
from mlx_diffgemma.images.processor import ImageConfig, Processor, preprocess

VOCAB = 384


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tokenizer with the Gemma 4 media specials and a config naming the image ids."""
    d = tmp_path_factory.mktemp("vision-tok")
    write_tokenizer(d, VOCAB, vision=True)
    config = dict(vision_config={"model_type": "gemma4_vision", "patch_size": 16},
                  vision_soft_tokens_per_image=280, **vision_token_config())
    (d / "config.json").write_text(json.dumps(config))
    return d


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def ours(model_dir, tokenizer, budget: int, patch_size: int = 16) -> Processor:
    p = Processor.from_pretrained(model_dir, tokenizer)
    p.config = ImageConfig(max_soft_tokens=budget, patch_size=patch_size)
    return p


def noise_image(h: int, w: int, mode: str = "RGB", seed: int = 0):
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}[mode]
    a = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def assert_same(ref, got) -> None:
    for key in ("input_ids", "pixel_values", "image_position_ids"):
        assert got[key].shape == ref[key].shape, key
        assert got[key].dtype == ref[key].dtype, key
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


# (height, width): landscape, portrait, square, tiny, and extreme strips that take the
# one-unit side rule.
SIZES = [(100, 200), (480, 640), (640, 360), (768, 768), (1, 1), (37, 1500), (2000, 30)]


@pytest.mark.parametrize("budget", [70, 280])
def test_matches_reference_processor(model_dir, hf_tokenizer, budget):
    ref_p = reference_processor(hf_tokenizer, budget)
    our_p = ours(model_dir, hf_tokenizer, budget)
    text = "<|turn>user\nwhat is <|image|> next to <|image|>?<turn|>\n<|image|><|image|>"
    for k, (h, w) in enumerate(SIZES):
        images = [noise_image(h, w, seed=k), noise_image(w // 3 + 1, h + 7, "RGBA", seed=k + 50),
                  noise_image(w, h, seed=k + 100), noise_image(h, h, seed=k + 150)]
        ref = ref_p(text=[text], images=[images], return_tensors="np")
        prompt = our_p(text, images)
        assert_same(ref, prompt.arrays())
        # the blocks are where the reference marks image tokens
        marked = np.flatnonzero(ref["mm_token_type_ids"][0] == 1)
        assert [i for s, e in prompt.blocks for i in range(s, e)] == marked.tolist()
        assert [e - s for s, e in prompt.blocks] == prompt.images.num_soft_tokens


def test_matches_reference_large_budget_and_small_patches(model_dir, hf_tokenizer):
    """The largest budget, and a 4-pixel patch (tiny towers) with the 70 budget."""
    for budget, patch, (h, w) in [(1120, 16, (900, 1600)), (70, 4, (100, 90))]:
        ref = reference_processor(hf_tokenizer, budget, patch)(
            text=["<|image|>"], images=[[noise_image(h, w)]], return_tensors="np")
        assert_same(ref, ours(model_dir, hf_tokenizer, budget, patch)("<|image|>", [noise_image(h, w)]).arrays())


@pytest.mark.parametrize("mode", ["L", "LA", "CMYK", "P", "I;16"])
def test_modes_convert_as_the_reference(model_dir, hf_tokenizer, mode):
    """Odd modes become RGB as the reference's processor makes them (alpha over white)."""
    if mode == "P":
        im = noise_image(60, 90).convert("P")
        im.info["transparency"] = 3
    elif mode == "I;16":
        im = Image.fromarray(np.random.default_rng(1).integers(0, 65535, (50, 70), dtype=np.uint16))
    else:
        im = noise_image(60, 90, mode)
    ref = reference_processor(hf_tokenizer, 70)(text=["<|image|>"], images=[[im]], return_tensors="np")
    assert_same(ref, ours(model_dir, hf_tokenizer, 70)("<|image|>", [im]).arrays())


def test_alpha_is_composited_onto_white():
    im = Image.new("RGBA", (48, 48), (10, 20, 30, 0))  # fully transparent
    assert load_image(im).getpixel((0, 0)) == (255, 255, 255)


def test_sources_path_data_url_bytes_agree(tmp_path, model_dir, hf_tokenizer):
    im = noise_image(120, 90)
    path = tmp_path / "x.png"
    im.save(path)
    raw = path.read_bytes()
    url = "data:image/png;base64," + base64.b64encode(raw).decode()
    p = ours(model_dir, hf_tokenizer, 70)
    want = p.images([im])
    for source in (str(path), path, raw, url, "data:;base64," + base64.b64encode(raw).decode()):
        got = p.images([source])
        np.testing.assert_array_equal(got.pixel_values, want.pixel_values)
        assert got.digests == want.digests


def test_exif_orientation_applied_as_reference(tmp_path, model_dir, hf_tokenizer):
    from transformers.image_utils import load_image as hf_load_image

    im = noise_image(40, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.png"
    im.save(path, exif=exif)
    assert load_image(path).size == (40, 100)
    ref = reference_processor(hf_tokenizer, 70)(
        text=["<|image|>"], images=[[hf_load_image(str(path))]], return_tensors="np")
    assert_same(ref, ours(model_dir, hf_tokenizer, 70)("<|image|>", [path]).arrays())


def test_animated_image_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(path).n_frames == 2
    assert load_image(path).getpixel((5, 5)) == (255, 0, 0)


def test_expand_token_ids_and_already_expanded(model_dir, hf_tokenizer):
    p = ours(model_dir, hf_tokenizer, 70)
    ids = media_token_ids(VOCAB)
    boi, img, eoi = ids["<|image>"], ids["<|image|>"], ids["<image|>"]
    inputs = p.images([noise_image(100, 100)])
    n = inputs.num_soft_tokens[0]
    expanded = p([7, img, 8], inputs)
    assert expanded.ids == [7, boi] + [img] * n + [eoi, 8]
    assert expanded.blocks == [(2, 2 + n)]
    assert p(expanded.ids, inputs).ids == expanded.ids  # already expanded: kept


def test_chat_messages_with_image_parts(model_dir, hf_tokenizer):
    p = ours(model_dir, hf_tokenizer, 70)
    im = noise_image(64, 64)
    msgs = [{"role": "user", "content": [{"type": "image", "image": im},
                                         {"type": "text", "text": "what?"}]}]
    prompt = p.apply_chat_template(msgs)
    text = "<bos><|turn>user\n<|image|>what?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert prompt.ids == p(text, [im]).ids


# -- refusals: one line naming the problem and the fix -------------------------------------


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match=r"^image file not found: .*nope.png; check the path$"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match=r"is not a file; give the path of an image file$"):
        load_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not pixels")
    with pytest.raises(ImageError, match=r"notes.txt is not an image Pillow can read; give a PNG"):
        load_image(text)
    with pytest.raises(ImageError, match=r"^an image must be a path, a data URL, bytes or a PIL image \(got int\)$"):
        load_image(3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_refused(tmp_path, fmt):
    from PIL import ImageFile

    buf = io.BytesIO()
    noise_image(200, 200).save(buf, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    msg = r"cut\.\w+ is truncated or damaged \(.*\); re-save or re-download the image$"
    with pytest.raises(ImageError, match=msg):
        load_image(path)
    # even when another library switched truncated loading on, and it stays as it was
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageError, match=msg):
            load_image(path)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_huge_image_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (400, 300)).save(path)
    with pytest.raises(ImageError, match=r"big.png is 400 x 300 = 120,000 pixels, over the limit "
                                         r"of 100,000; downscale it first$"):
        load_image(path, max_pixels=100_000)
    # Pillow's own decompression-bomb guard, turned into ours
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageError, match=r"big.png has too many pixels to decode safely; downscale it first$"):
        load_image(path)


def test_bad_data_urls():
    with pytest.raises(ImageError, match=r"not base64-encoded; send data:image/png;base64,"):
        load_image("data:image/png,abc")
    with pytest.raises(ImageError, match=r"base64 data is invalid; encode the file with base64 again$"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match=r"has no ',' before its data"):
        load_image("data:image/png;base64")
    with pytest.raises(ImageError, match=r"the image data URL is not an image Pillow can read"):
        load_image("data:image/png;base64," + base64.b64encode(b"plain text").decode())


def test_placeholder_count_must_match(model_dir, hf_tokenizer):
    p = ours(model_dir, hf_tokenizer, 70)
    with pytest.raises(ImageError, match=r"^the prompt has 0 image placeholder\(s\) \(<\|image\|>\) for 1 "
                                         r"image\(s\); put one <\|image\|> where each image goes$"):
        p("no placeholder", [noise_image(50, 50)])
    with pytest.raises(ImageError, match=r"has 1 image placeholder\(s\) .* for 0 image\(s\)"):
        p("<|image|>", [])


def test_model_without_vision_or_image_tokens(tmp_path, model_dir, hf_tokenizer):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma"}))
    with pytest.raises(ImageError, match=r"has no vision tower \(config.json has no vision_config\); "
                                         r"use a multimodal DiffusionGemma checkpoint for images$"):
        Processor.from_pretrained(tmp_path, hf_tokenizer)
    from transformers import AutoTokenizer

    text_only = tmp_path / "tok"
    write_tokenizer(text_only, VOCAB)
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    # A text-only tokenizer: the model takes no images (whatever its config describes).
    with pytest.raises(ImageError, match=r"^this model takes no images: its tokenizer has no "
                                         r"<\|image\|> token to place one in the prompt; leave"):
        Processor.from_pretrained(tmp_path, AutoTokenizer.from_pretrained(text_only))
    # The token is there, at another id than config.json's: the pair does not belong together.
    config = json.loads((model_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, image_token_id=config["image_token_id"] + 1)))
    with pytest.raises(ImageError, match=r"^the tokenizer has <\|image\|> at id \d+, but config.json's "
                                         r"image_token_id is \d+: the two do not belong together"):
        Processor.from_pretrained(tmp_path, hf_tokenizer)


def test_unsupported_budget():
    with pytest.raises(ImageError, match=r"max_soft_tokens must be one of \(70, 140, 280, 560, 1120\) \(got 100\)"):
        ImageConfig(max_soft_tokens=100)


def test_processor_settings_from_model_dir(tmp_path, model_dir, hf_tokenizer):
    """config.json's budget and patch size, unless processor_config.json says otherwise."""
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"]["patch_size"] = 4
    config["vision_soft_tokens_per_image"] = 70
    (tmp_path / "config.json").write_text(json.dumps(config))
    p = Processor.from_pretrained(tmp_path, hf_tokenizer)
    assert (p.config.patch_size, p.config.max_soft_tokens, p.config.pooling_kernel_size) == (4, 70, 3)
    (tmp_path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"max_soft_tokens": 140, "patch_size": 16}, "image_seq_length": 140}))
    p = Processor.from_pretrained(tmp_path, hf_tokenizer)
    assert (p.config.patch_size, p.config.max_soft_tokens) == (16, 140)


def test_pillow_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImageError, match=r"^images need Pillow: pip install 'mlx-diffgemma\[images\]'"):
        preprocess(["x.png"])
    assert PIL_MISSING.startswith("images need Pillow")


@pytest.mark.slow
def test_text_generation_needs_no_pillow():
    """Pillow is the [images] extra: `generate` on text runs in an interpreter where
    importing PIL fails, and never imports it."""
    import subprocess
    from pathlib import Path

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'PIL': raise ImportError('no Pillow here')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from mlx_diffgemma.cli import main\n"
        "rc = main(['generate', '--model', 'toy-sudoku', '--prompt', '1.3.34..2.4.4.1.'])\n"
        "assert 'PIL' not in sys.modules\n"
        "sys.exit(rc)\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) == 16 and r.stdout.strip().isdigit()


def test_string_only_template_gets_placeholders_in_the_text(model_dir):
    """A chat template that reads string contents only: the placeholders go into the
    text; one that drops them is refused."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}\n"
                         "{{ m['content'] }}<turn|>\n{% endfor %}<|turn>model\n")
    p = ours(model_dir, tok, 70)
    im = noise_image(64, 64)
    msgs = [{"role": "user", "content": [{"type": "image", "image": im}, {"type": "text", "text": "what?"}]}]
    flat = tok.apply_chat_template([{"role": "user", "content": "<|image|>what?"}], tokenize=False)
    assert flat.startswith("<bos><|turn>user\n<|image|>what?")
    assert p.apply_chat_template(msgs).ids == p(flat, [im]).ids
    tok.chat_template = "{{ bos_token }}{% for m in messages %}<|turn>{{ m['role'] }}<turn|>{% endfor %}"
    with pytest.raises(ImageError, match=r"the chat template does not place the 1 image\(s\) \(found 0 "
                                         r"<\|image\|>\); use the model's own chat template$"):
        p.apply_chat_template(msgs)
