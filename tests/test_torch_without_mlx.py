"""The torch reference path runs where MLX is not installed (a CUDA machine): in an
interpreter whose site-packages lack every `mlx*` package, `mlx_diffgemma.torch_backend`
loads a checkpoint, generates and chats, and the tokens are those of the same run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import importlib.util, json, sys

assert importlib.util.find_spec("mlx") is None and importlib.util.find_spec("mlx_lm") is None

import mlx_diffgemma as md
from mlx_diffgemma import torch_backend as tb
from mlx_diffgemma.chat.session import ChatSession

model, tok = tb.load(sys.argv[1], device="cpu")
kw = dict(max_new_tokens=32, max_denoising_steps=3)
events = list(tb.stream_generate(model, tok, [5, 6, 7, 8], noise=md.SeededNoise(4), **kw))
session = ChatSession(model, tok, **kw, noise=md.SeededNoise(4))
reply = [e for e in session.send("hello") if e.kind == "summary"][0]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "mlx_lm"))
print(json.dumps({"tokens": events[-1].tokens, "chat": reply.tokens, "loaded": loaded}))
"""


def _site_without_mlx(tmp: Path) -> Path:
    """A view of this interpreter's site-packages (symlinks) without any mlx* entry."""
    import numpy

    site = Path(numpy.__file__).resolve().parents[1]
    view = tmp / "site-packages"
    view.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(("mlx", "__editable__")):
            (view / entry.name).symlink_to(entry)
    return view


def test_torch_path_runs_without_mlx(ckpt_factory, tmp_path):
    path = ckpt_factory("tiny")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(_site_without_mlx(tmp_path))]))
    # -S: no site.py, so only PYTHONPATH (the repository and the view) is importable.
    r = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    # The same torch computation in this process (MLX importable): the same tokens.
    model, tok = tb.load(path, device="cpu")
    kw = dict(max_new_tokens=32, max_denoising_steps=3)
    here = list(tb.stream_generate(model, tok, [5, 6, 7, 8], noise=md.SeededNoise(4), **kw))[-1]
    assert out["tokens"] == here.tokens and len(here.tokens) == 32
    assert len(out["chat"]) > 0
