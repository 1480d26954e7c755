"""The Python API's prompts and reply lengths: chat messages and `chat=True` get the chat
template (what an instruction-tuned model needs, and what the README's first example
does), a string alone is encoded as is; a reply holds at most `max_new_tokens` tokens in
the library, the chat session, `generate` and the server alike, and the tokens before
that limit are the ones whole canvases give."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffgemma as md
from mlx_diffgemma.chat.prompt import split_prompt
from mlx_diffgemma.chat.session import ChatSession
from mlx_diffgemma.generation.events import Commit, Summary
from mlx_diffgemma.generation.loop import run_to_summary

REPO = Path(__file__).resolve().parents[1]
PUZZLE, SOLUTION = "1.3.34..2.4.4.1.", "1234342121434312"


@pytest.fixture(scope="module")
def toy():
    return md.load("toy-sudoku")


def _summary(model, tok, prompt, **kw) -> Summary:
    return run_to_summary(md.stream_generate(model, tok, prompt, **kw))


def test_messages_and_chat_true_get_the_template_a_string_does_not(toy):
    model, tok = toy
    templated = split_prompt(tok, [{"role": "user", "content": PUZZLE}]).ids
    as_messages = _summary(model, tok, [{"role": "user", "content": PUZZLE}], seed=0)
    as_chat = _summary(model, tok, PUZZLE, chat=True, seed=0)
    raw = _summary(model, tok, PUZZLE, seed=0)
    assert as_messages.prompt_tokens == as_chat.prompt_tokens == len(templated) == 42
    assert as_messages.tokens == as_chat.tokens and as_chat.text == SOLUTION
    assert raw.prompt_tokens == 16  # the cells alone, no template: the trained model is lost
    assert md.generate(model, tok, PUZZLE, chat=True, seed=0) == SOLUTION
    with pytest.raises(ValueError, match="chat=True takes the prompt as text"):
        md.generate(model, tok, templated, chat=True)


def _first_python_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Python API"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return block[: block.index("\n", block.index("md.generate("))]  # up to the first generate


def test_the_readmes_first_python_example_uses_the_chat_template(toy, monkeypatch):
    """Run with toy-sudoku standing in for the released model: the prompt that reaches
    the model is the chat-templated question."""
    model, tok = toy
    example = _first_python_example()
    assert "md.generate(" in example
    encoded = []
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, cache, *a, **k: encoded.append(ids.tolist()[0])
                        or real(ids, cache, *a, **k))
    monkeypatch.setattr(md, "load", lambda name: toy)
    # the toy's context holds one 24-token canvas after the prompt
    monkeypatch.setattr(md, "generate", lambda *a, **k: _summary(*a, **dict(k, max_new_tokens=24)).text)
    exec(compile(example, "README.md", "exec"), {"__name__": "readme"})
    question = re.search(r"\"content\": \"([^\"]+)\"", example).group(1)
    assert encoded[0] == split_prompt(tok, [{"role": "user", "content": question}]).ids


# -- max_new_tokens, everywhere -----------------------------------------------------------------


def test_replies_stop_at_max_new_tokens_everywhere(ckpt_factory, capsys):
    """20 tokens asked of a model whose canvases hold 16: 20 come back (not 32) from the
    library, the torch path, a chat turn and `generate`, and they are the first 20 of
    what two whole canvases give under the same noise."""
    path = ckpt_factory("tiny")
    model, tok = md.load(path)
    kw = dict(max_denoising_steps=4, eos_token_id=None)
    whole = _summary(model, tok, [5, 6, 7], noise=md.SeededNoise(1), max_new_tokens=32, **kw)
    cut = _summary(model, tok, [5, 6, 7], noise=md.SeededNoise(1), max_new_tokens=20, **kw)
    assert len(whole.tokens) == 32 and cut.tokens == whole.tokens[:20]
    assert cut.finish_reason == "length" and cut.canvases == 2

    from mlx_diffgemma import torch_backend as tb

    tmodel, ttok = tb.load(path)
    got = run_to_summary(tb.stream_generate(tmodel, ttok, [5, 6, 7], noise=md.SeededNoise(1),
                                            max_new_tokens=20, **kw))
    assert len(got.tokens) == 20

    session = ChatSession(model, tok, seed=0, max_new_tokens=20, max_denoising_steps=4, eos_token_id=None)
    events = list(session.send("hi"))
    commits = [e for e in events if isinstance(e, Commit)]
    assert sum(len(c.tokens) for c in commits) == len(events[-1].tokens) == 20
    assert session.turns[-1].tokens + session.turns[-1].pad_tokens == 20

    # The command: the text of those 20 tokens (the library's, same seed; no EOS in them).
    expected = _summary(model, tok, "hi", seed=1, max_denoising_steps=4, max_new_tokens=20)
    assert len(expected.tokens) == 20 and expected.finish_reason == "length"
    r = subprocess.run([sys.executable, "-m", "mlx_diffgemma.cli", "generate", "--model", str(path), "--raw",
                        "-p", "hi", "--steps", "4", "--max-new-tokens", "20", "--seed", "1", "--verbose"],
                       capture_output=True, text=True, timeout=180,
                       env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected.text + "\n"
    counted = re.search(r"^(\d+) tokens · 2 canvases.*?(?:· (\d+) pad tokens? not counted)?$", r.stderr.strip(), re.M)
    assert int(counted.group(1)) + int(counted.group(2) or 0) == 20


def test_on_metal_a_generation_wires_the_working_set_and_runs_on_its_own_stream(toy, monkeypatch):
    """Metal stood in for on the CPU: the recommended working set is wired for the run and
    the previous limit restored after it, the model's work goes to the generation stream,
    and the reply is the one the default stream gives."""
    import mlx.core as mx

    model, tok = toy
    plain = _summary(model, tok, PUZZLE, chat=True, seed=0)
    limits, streams = [], []
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda: {"max_recommended_working_set_size": 1 << 40})
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: limits.append(n) or 123)
    encode = model.encode
    monkeypatch.setattr(model, "encode", lambda *a, **k: streams.append(mx.default_stream(mx.default_device()))
                        or encode(*a, **k))
    wired = _summary(model, tok, PUZZLE, chat=True, seed=0)
    assert limits == [1 << 40, 123]
    default = mx.default_stream(mx.default_device())
    assert streams and all(s == streams[0] != default for s in streams), (streams, default)
    assert wired.tokens == plain.tokens and wired.text == SOLUTION
