"""Images through every surface, on a tiny checkpoint with a vision tower: the API
(`stream_generate(images=...)`, chat messages with image parts), the chat session (an
image encoded once across turns, never reused for another image, never cut by a chunk),
the REPL's /image, `generate --image`, the server's image_url parts, the torch path, and
the errors that leave each of them running."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading

import mlx.core as mx
import numpy as np
import pytest
import requests
from PIL import Image
from tiny_checkpoints import VISION_TOKENS, reference_processor

import mlx_diffgemma as md
from mlx_diffgemma.chat import session as session_mod
from mlx_diffgemma.chat import turn_cache
from mlx_diffgemma.chat.session import ChatSession, Prefill
from mlx_diffgemma.generation.events import Summary
from mlx_diffgemma.generation.loop import run_to_summary
from mlx_diffgemma.images.load import ImageError

GEN = dict(max_new_tokens=16, max_denoising_steps=3)
IMG = VISION_TOKENS["<|image|>"]


def picture(h: int, w: int, seed: int):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def vdir(ckpt_factory, tmp_path_factory):
    """The tiny vision checkpoint (4-px patches) with the processor's smallest budget."""
    path = tmp_path_factory.mktemp("vision-surfaces") / "model"
    shutil.copytree(ckpt_factory("vision"), path)
    (path / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"max_soft_tokens": 70, "patch_size": 4}, "image_seq_length": 70}))
    return path


@pytest.fixture(scope="module")
def loaded(vdir):
    return md.load(vdir)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "cat.png"
    picture(90, 120, 0).save(path)
    return path


@pytest.fixture
def tower_runs(loaded, monkeypatch):
    """How many times the vision tower ran (model.image_features is its one entry)."""
    model = loaded[0]
    calls = []
    real = model.image_features

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(model, "image_features", counted, raising=False)
    return calls


def _tokens(events) -> list:
    return run_to_summary(events).tokens


def test_api_images_are_the_reference_processors_inputs(loaded, image_file):
    """stream_generate(images=) generates exactly what model.encode gives with
    transformers' processor's arrays and ids (same floats by construction), for text
    with placeholders and for chat messages with image parts."""
    from transformers import AutoTokenizer

    model, tok = loaded
    ref = reference_processor(AutoTokenizer.from_pretrained(model.model_path), 70, 4)
    im = Image.open(image_file)
    text = "<|turn>user\n<|image|>what is it?<turn|>\n<|turn>model\n"
    inputs = ref(text=[text], images=[[im]], return_tensors="np")
    cache = model.make_cache()
    model.encode(mx.array(inputs["input_ids"]), cache, pixel_values=inputs["pixel_values"],
                 image_position_ids=inputs["image_position_ids"])
    low = _tokens(md.stream_generate(model, tok, [], cache=cache, noise=md.SeededNoise(5), **GEN))
    ours = _tokens(md.stream_generate(model, tok, text, images=[image_file], noise=md.SeededNoise(5), **GEN))
    assert ours == low
    without = _tokens(md.stream_generate(model, tok, text.replace("<|image|>", ""), noise=md.SeededNoise(5), **GEN))
    assert without != ours  # the image is in the context

    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image_file)},
                                         {"type": "text", "text": "what is it?"}]}]
    rendered = "<bos><|turn>user\n<|image|>what is it?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    a = _tokens(md.stream_generate(model, tok, msgs, noise=md.SeededNoise(6), **GEN))
    b = _tokens(md.stream_generate(model, tok, rendered, images=[im], noise=md.SeededNoise(6), **GEN))
    assert a == b


def _turn(session, text, **kw):
    events = list(session.send(text, **kw))
    assert isinstance(events[-1], Summary)
    return next(e for e in events if isinstance(e, Prefill))


def test_chat_encodes_an_image_once_across_turns(loaded, image_file, tower_runs):
    model, tok = loaded
    s = ChatSession(model, tok, **GEN, seed=1)
    first = _turn(s, "what is it?", images=[image_file])
    assert len(tower_runs) == 1 and first.reused == 0
    held = s.cached_tokens
    second = _turn(s, "and the colours?")
    assert len(tower_runs) == 1  # turn 2 reuses the image from the cache
    assert second.reused == held and second.encoded > 0
    # The cache after turn 2 is the conversation encoded from scratch, image included.
    split = session_mod.split_prompt(tok, s.conversation("next"), processor=s.processor)
    fresh = model.make_cache()
    model.encode(mx.array([split.ids[: split.stable]]), fresh, pixel_values=split.images.pixel_values,
                 image_position_ids=split.images.image_position_ids)
    assert s.cached_tokens < split.stable
    s.backend.encode(s.cache, split.ids[s.cached_tokens: split.stable])
    canvas = mx.array(np.random.default_rng(0).integers(3, 384, (1, model.canvas_length)))
    np.testing.assert_allclose(np.array(model.decode(canvas, s.cache)),
                               np.array(model.decode(canvas, fresh)), atol=1e-3)
    saved = s.transcript()["messages"][0]["content"]
    assert saved == [{"type": "image", "image": str(image_file)}, {"type": "text", "text": "what is it?"}]


def test_cache_tells_images_apart(loaded, tower_runs):
    """Same text, same image size, other pixels: the image is encoded again (its token
    ids alone are the same: the cache keeps at most what precedes the image, here
    nothing, since the sliding window cannot be trimmed that far back); the same pixels
    again reuse the whole prompt."""
    model, tok = loaded
    s = ChatSession(model, tok, **GEN, seed=1, keep_history=False)
    a, b = picture(80, 80, 1), picture(80, 80, 2)
    _turn(s, "what?", images=[a])
    block_start = s.cached_ids.index(next(k for k in s.cached_ids if k < 0))
    other = _turn(s, "what?", images=[b])
    assert len(tower_runs) == 2 and other.reused <= block_start
    same = _turn(s, "what?", images=[b])
    assert len(tower_runs) == 2 and same.encoded == 0


def test_prefill_chunks_never_cut_an_image(loaded, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(turn_cache, "PREFILL_CHUNK", 8)
    s = ChatSession(model, tok, **GEN, seed=1)
    calls = []
    real = s.backend.encode
    s.backend.encode = lambda cache, ids, images=None: (calls.append((list(ids), images)), real(cache, ids, images))[1]
    _turn(s, "two pictures, and a longer message to fill several chunks",
          images=[picture(70, 90, 3), picture(100, 40, 4)])
    with_images = [(ids, im) for ids, im in calls if IMG in ids]
    assert len(with_images) == 2 and len(calls) > 4
    for ids, im in with_images:  # each call holds one whole image and its pixels
        assert im is not None and len(im) == 1 and ids.count(IMG) == im.num_soft_tokens[0]
    assert all(im is None for ids, im in calls if IMG not in ids)


def test_bad_images_leave_the_session_going(loaded, tmp_path, vdir):
    model, tok = loaded
    s = ChatSession(model, tok, **GEN, seed=1)
    (tmp_path / "notes.txt").write_text("not pixels")
    for bad, msg in [(tmp_path / "nope.png", "image file not found"),
                     (tmp_path / "notes.txt", "is not an image Pillow can read")]:
        with pytest.raises(ImageError, match=msg):
            list(s.send("look", images=[bad]))
    assert s.messages == []
    _turn(s, "hello")  # goes on
    assert len(s.messages) == 2


@pytest.fixture(scope="module")
def text_only(vdir, tmp_path_factory):
    """The vision checkpoint with the tower's weights left out: loads text-only."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path_factory.mktemp("text-only") / "model"
    shutil.copytree(vdir, path)
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".vision_tower." not in k and ".embed_vision." not in k},
              str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_model_without_a_tower_refuses_images(text_only, image_file):
    model, tok = md.load(text_only)
    msg = "has no vision tower .* that includes the tower"
    with pytest.raises(ImageError, match=msg):
        list(md.stream_generate(model, tok, "<|image|>", images=[image_file], **GEN))
    s = ChatSession(model, tok, **GEN)
    with pytest.raises(ImageError, match=msg):
        list(s.send("look", images=[image_file]))
    _turn(s, "text works")


def test_repl_image_command(loaded, image_file, tmp_path, tower_runs):
    from rich.console import Console

    from mlx_diffgemma.chat import repl

    model, tok = loaded
    s = ChatSession(model, tok, **GEN, seed=1)
    lines = iter([f"/image '{image_file}'", "/image /no/such.png", "what is it?", "/image",
                  f"/image {image_file}", "/image", "and now?", "/exit"])
    out = io.StringIO()
    assert repl.run_repl(s, Console(file=out, width=200, highlight=False), read=lambda: next(lines)) == 0
    text = out.getvalue()
    assert f"attached {image_file} (" in text and "with your next message: 1 image" in text
    assert "error: image file not found: /no/such.png; check the path" in text
    assert "0 attached images dropped" in text and "1 attached image dropped" in text
    assert len(s.turns) == 2 and len(tower_runs) == 1
    first, second = s.messages[0]["content"], s.messages[2]["content"]
    assert first[0]["name"] == str(image_file) and second == "and now?"


def test_generate_command_with_images(vdir, image_file, capsys):
    from mlx_diffgemma.cli import main

    args = ["generate", "--model", str(vdir), "--prompt", "what is it?", "--image", str(image_file),
            "--max-new-tokens", "16", "--steps", "3", "--seed", "4"]
    assert main(args) == 0
    text = capsys.readouterr().out
    model, tok = md.load(vdir)
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(image_file)},
                                         {"type": "text", "text": "what is it?"}]}]
    want = md.generate(model, tok, msgs, seed=4, **GEN)
    assert text == want + "\n"
    assert main(args[:-6] + ["--image", "/no/such.png"]) == 2
    err = capsys.readouterr().err
    assert "mlx-diffgemma generate: error: image file not found: /no/such.png; check the path" in err
    raw = ["generate", "--model", str(vdir), "--raw", "--prompt", "no placeholder", "--image", str(image_file)]
    assert main(raw) == 2
    assert "the prompt has 0 image placeholder(s)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def image_server(vdir, image_file):
    from mlx_diffgemma.serve.engine import Engine
    from mlx_diffgemma.serve.http import Server

    engine = Engine(lambda: md.load(vdir), "tiny-vision", image_dirs=[image_file.parent])
    srv = Server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv, engine
    finally:
        srv.shutdown()
        srv.server_close()
        engine.close()


def _chat(url, content, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 16,
            "max_denoising_steps": 3, "seed": 2, **extra}
    return requests.post(url + "/v1/chat/completions", json=body, timeout=120)


def _image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


def test_server_image_url_parts(image_server, image_file, tmp_path):
    srv, engine = image_server
    data = "data:image/png;base64," + base64.b64encode(image_file.read_bytes()).decode()
    text = {"type": "text", "text": "what is it?"}
    r = _chat(srv.url, [_image_part(data), text])
    assert r.status_code == 200, r.text
    split = session_mod.split_prompt(
        engine.tokenizer, [{"role": "user", "content": [{"type": "image", "image": str(image_file)}, text]}],
        processor=engine.session.processor)
    assert r.json()["usage"]["prompt_tokens"] == len(split.ids)
    # the same image as a local file under --image-dir: the same reply, its prompt
    # found in the prompt cache (the tower does not run again)
    model = engine.session.model
    runs, real = [], model.image_features
    model.image_features = lambda *a, **k: (runs.append(1), real(*a, **k))[1]
    r2 = _chat(srv.url, [_image_part(f"file://{image_file}"), text])
    assert r2.status_code == 200 and r2.json()["choices"] == r.json()["choices"]
    assert r2.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == split.stable and runs == []
    # another question after the same image: the image is in the shared prefix
    r3 = _chat(srv.url, [_image_part(f"file://{image_file}"), {"type": "text", "text": "other question"}])
    assert r3.status_code == 200 and runs == [] and r3.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    # text before the image: the prefixes part before it, so it is encoded again
    r4 = _chat(srv.url, [{"type": "text", "text": "first this: "}, _image_part(f"file://{image_file}")])
    assert r4.status_code == 200 and runs == [1]
    outside = tmp_path / "elsewhere.png"
    shutil.copy(image_file, outside)
    cases = [
        (_image_part(str(outside)), r"elsewhere.png is not an absolute path inside the image directories"),
        (_image_part("https://example.com/cat.png"), "remote image URLs are not fetched by this server"),
        (_image_part("data:image/png;base64,AAAA"), "the image data URL is not an image Pillow can read"),
        (_image_part(str(image_file.parent / "missing.png")), "image file not found"),
        ({"type": "input_audio"}, "content parts must be text or image_url"),
    ]
    for part, msg in cases:
        bad = _chat(srv.url, [part, text])
        assert bad.status_code == 400, bad.text
        err = bad.json()["error"]
        assert err["param"] == "messages" and err["type"] == "invalid_request_error"
        assert __import__("re").search(msg, err["message"]), err["message"]
    assert _chat(srv.url, "still here").status_code == 200


def test_server_local_files_off_by_default():
    from mlx_diffgemma.serve.openai import APIError, chat_messages

    body = {"messages": [{"role": "user", "content": [_image_part("/tmp/x.png")]}]}
    with pytest.raises(APIError, match="local image files are off on this server; send a data URL, "
                                       "or start the server with --image-dir DIR"):
        chat_messages(body)


def test_torch_path_takes_images(vdir, image_file):
    """The torch reference path: images through transformers' tower, once across turns."""
    from mlx_diffgemma.torch_backend import load

    model, tok = load(vdir)
    runs = []
    model.model.encoder.vision_tower.register_forward_hook(lambda *a: runs.append(1))
    s = ChatSession(model, tok, **GEN, seed=1)
    first = _turn(s, "what is it?", images=[image_file])
    second = _turn(s, "more?")
    assert len(runs) == 1 and second.reused == first.reused + first.encoded
    text = md.torch_backend.generate(model, tok, "<|image|> what", images=[image_file], seed=0, **GEN)
    assert isinstance(text, str) and len(runs) == 2
