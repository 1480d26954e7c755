"""The Python API's reply lengths: a reply holds at most `max_new_tokens` tokens in the
library, the chat session, `generate` and the server alike, and the tokens before that
limit are the ones whole canvases give."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffgemma as md
from mlx_diffgemma.drafter import Commit, Summary, run_to_summary
from mlx_diffgemma.session import ChatSession

REPO = Path(__file__).resolve().parents[1]


def _summary(model, tok, prompt, **kw) -> Summary:
    return run_to_summary(md.stream_generate(model, tok, prompt, **kw))


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

    session = ChatSession(model, tok, gen_kwargs=dict(max_new_tokens=20, steps=4, eos="none"), seed=0)
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
