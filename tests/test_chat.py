"""`mlx-diffgemma chat` / `generate`: the REPL in a real terminal, KV-cache reuse across
turns, Ctrl-C, and model resolution (LM Studio folders, offline Hugging Face cache,
packaged models). No network.

The cache-reuse tests hold a turn generated on the session's reused cache to a fresh
cache that encodes the same conversation in one call. The two hold the same tokens but
encode them in different pieces, so their floats differ in the last bits and whole
replies may part at a near-tie (self-conditioning then amplifies it): the comparison is
teacher-forced (tests/teacher_forcing.py). The turn is recorded step by step, replayed on
the fresh cache, and must give the same logits to float tolerance and every decision
that is certain under that difference. The comparison is shown to have teeth: a cache
that kept turn 1's empty thought channel fails it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from teacher_forcing import recording, replay
from terminals import Pexpect as _Pexpect
from terminals import Tmux as _Tmux
from terminals import wait as _wait

import mlx_diffgemma as md
from mlx_diffgemma.chat import backends, repl
from mlx_diffgemma.chat.prompt import split_prompt
from mlx_diffgemma.chat.session import ChatSession, Interrupted, Prefill
from mlx_diffgemma.generation.denoiser import MLXDenoiser
from mlx_diffgemma.generation.events import Commit, Summary
from mlx_diffgemma.models import paths
from mlx_diffgemma.models.config import GenerationConfig

REPO = Path(__file__).resolve().parents[1]
THOUGHT = "<|channel>thought\n<channel|>"  # the Gemma 4 empty thought channel


@functools.lru_cache(maxsize=None)
def _raw_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


@functools.lru_cache(maxsize=None)
def _hf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _char_tokens(path: Path, text: str) -> list:
    """Token ids from the checkpoint's tokenizer.json itself (not through session.py)."""
    return _raw_tokenizer(path).encode(text, add_special_tokens=False).ids


def _render(path: Path, messages, gen_prompt: bool) -> str:
    """The chat template as transformers applies it (not through session.py)."""
    return _hf_tokenizer(path).apply_chat_template(
        messages, add_generation_prompt=gen_prompt, tokenize=False
    )


def _run(session: ChatSession, text: str, stop_after_commits: int | None = None):
    events = []
    commits = 0

    def should_stop():
        return stop_after_commits is not None and commits >= stop_after_commits

    for ev in session.send(text, should_stop=should_stop):
        events.append(ev)
        if isinstance(ev, Commit):
            commits += 1
    return events


class _EncodeSpy:
    """Records the token count of every `model.encode` call (the chat's prefill and the
    drafter's encodes of the thought channel and committed canvases)."""

    def __init__(self, model):
        self.calls = []
        self._orig = model.encode
        model.encode = self

    def __call__(self, ids, cache, *args, **kwargs):
        self.calls.append(int(ids.shape[1]))
        return self._orig(ids, cache, *args, **kwargs)


@pytest.fixture(scope="module")
def mixed_sc01(ckpt_factory):
    return ckpt_factory("mixed", sc_down_scale=0.1)


GEN = dict(max_denoising_steps=12, max_new_tokens=48)  # up to 3 canvases of 16
ATOL = 1e-3  # raw logits (~20): a reused and a fresh cache land near 1e-5


def _fresh_denoiser(model, path, context_ids, seed, **gen):
    """An MLX denoiser on a new cache that holds `context_ids`, encoded in one call."""
    den = MLXDenoiser(model, GenerationConfig.from_model_dir(path, **gen), noise=md.SeededNoise(seed))
    den.encode(context_ids)
    return den


def _stable_ids(tok, session) -> list:
    """The last turn's prompt up to its stable boundary (the suffix is the drafter's)."""
    split = split_prompt(tok, session.conversation()[:-1])
    return split.ids[: split.stable]


def _tight_cache(monkeypatch):
    """Sliding layers without slack: trimming back is impossible, so the session must
    take and restore snapshots instead."""

    def new_cache(self, max_new_tokens):
        self.slack = 0
        return self.model.make_cache(slack=0)

    monkeypatch.setattr(backends.MLXBackend, "new_cache", new_cache)


# -- cache reuse ------------------------------------------------------------------------


@pytest.mark.parametrize("rollback", ["trim", "snapshot"])
def test_second_turn_encodes_only_new_tokens_and_matches_fresh(mixed_sc01, rollback, monkeypatch):
    if rollback == "snapshot":
        _tight_cache(monkeypatch)
    path = mixed_sc01
    model, tok = md.load(path)
    spy = _EncodeSpy(model)
    session = ChatSession(model, tok, **GEN, noise=md.SeededNoise(11))
    C = model.canvas_length

    user1, user2 = "hello there, how are you today?", "tell me more about that please"
    ev1 = _run(session, user1)
    s1 = ev1[-1]
    assert isinstance(s1, Summary)
    # Turn 1: the conversation part of the prompt (up to and including "<|turn>model\n"),
    # then the drafter encodes the thought channel and every committed canvas but the last.
    full1 = _render(path, [{"role": "user", "content": user1}], True)
    assert full1.endswith("<|turn>model\n" + THOUGHT)
    stable1 = _char_tokens(path, full1[: -len(THOUGHT)])
    suffix = len(_char_tokens(path, THOUGHT))
    assert spy.calls == [len(stable1), suffix] + [C] * (s1.canvases - 1)
    assert session.cached_tokens == len(stable1)

    spy.calls.clear()
    with recording(monkeypatch, MLXDenoiser) as turn2:
        ev2 = _run(session, user2)
    pre2, s2 = ev2[0], ev2[-1]
    assert isinstance(pre2, Prefill) and isinstance(s2, Summary)
    # Turn 2 re-renders turn 1 as history: "<|turn>model\n{reply}<turn|>\n" (no thought
    # channel). The encoder sees exactly the tokens after turn 1's stable boundary.
    convo = [
        {"role": "user", "content": user1},
        {"role": "assistant", "content": s1.text},
        {"role": "user", "content": user2},
    ]
    full2 = _render(path, convo, True)
    assert THOUGHT not in full2[: -len(THOUGHT)]
    stable2 = _char_tokens(path, full2[: -len(THOUGHT)])
    assert stable2[: len(stable1)] == stable1
    new_tokens = len(stable2) - len(stable1)
    assert (pre2.reused, pre2.encoded, pre2.suffix) == (len(stable1), new_tokens, suffix)
    assert spy.calls == [new_tokens, suffix] + [C] * (s2.canvases - 1)
    assert turn2[0].ids == _char_tokens(path, THOUGHT)  # the drafter's first encode

    # The same conversation on a fresh cache (encoded in one call) computes the same
    # turn: teacher-forced, same logits and decisions.
    fresh = _fresh_denoiser(model, path, stable2, 11, **GEN)
    replay(fresh, turn2, md.SeededNoise(11), from_numpy=mx.array).check(ATOL)

    # Teeth: had turn 1's thought channel stayed in the cache (cut at the wrong place),
    # the same turn would not be what that cache computes.
    wrong = _fresh_denoiser(model, path, _char_tokens(path, full1), 11, **GEN)
    wrong.encode(stable2[len(stable1) :])
    assert replay(wrong, turn2, md.SeededNoise(11), from_numpy=mx.array).max_logit_diff > 100 * ATOL


def test_interrupted_turn_leaves_session_as_before(mixed_sc01, monkeypatch):
    model, tok = md.load(mixed_sc01)
    kw = dict(GEN, max_denoising_steps=6, eos_token_id=None)  # never ends early: the stop must
    s = ChatSession(model, tok, **kw, noise=md.SeededNoise(5))
    _run(s, "first question")
    held, msgs = s.cached_tokens, list(s.messages)
    ev = _run(s, "this reply gets interrupted", stop_after_commits=2)
    assert isinstance(ev[-1], Interrupted) and ev[-1].canvases_done == 2
    assert not any(isinstance(e, Summary) for e in ev)
    assert s.messages == msgs and s.interrupted == 1
    # The cache still holds the dropped message's turn up to its stable boundary; the
    # next turn cuts it back to what it shares with the new render and goes on from there.
    with recording(monkeypatch, MLXDenoiser) as turn:
        ev = _run(s, "second question")
    pre = ev[0]
    assert pre.reused > held and pre.rolled_back > 0 and pre.note is None
    assert isinstance(ev[-1], Summary)

    # The same conversation without the interrupted turn, on a fresh cache.
    fresh = _fresh_denoiser(model, mixed_sc01, _stable_ids(tok, s), 5, **kw)
    replay(fresh, turn, md.SeededNoise(5), from_numpy=mx.array).check(ATOL)


def test_changed_start_cuts_or_clears_cache_and_long_prompt_is_refused(mixed_sc01, monkeypatch):
    model, tok = md.load(mixed_sc01)
    kw = dict(max_denoising_steps=2, max_new_tokens=16)
    s = ChatSession(model, tok, **kw)
    _run(s, "hi")
    held = s.cached_tokens
    s.set_system("be brief")  # the conversation now starts differently
    pre = _run(s, "again")[0]
    # Only "<bos><|turn>" is shared: the cache is trimmed back to it, silently.
    assert (pre.reused, pre.rolled_back, pre.note) == (2, held - 2, None)

    held = s.cached_tokens
    with pytest.raises(ValueError, match="prompt too long"):
        list(s.send("x" * 3000))  # the mixed shape has a 2048-token context
    assert s.cached_tokens == held and len(s.messages) == 4

    _tight_cache(monkeypatch)  # no slack: the cut is impossible, the cache is cleared
    s = ChatSession(model, tok, **kw)
    _run(s, "hi")
    s.set_system("be brief")
    pre = _run(s, "again")[0]
    assert pre.reused == 0 and "cleared" in pre.note and s.resets == 1


def test_slash_commands(mixed_sc01, tmp_path):
    import io

    from rich.console import Console

    model, tok = md.load(mixed_sc01)
    s = ChatSession(model, tok, max_denoising_steps=2, max_new_tokens=16, seed=3)
    out = io.StringIO()
    con = Console(file=out, width=200, highlight=False)

    def run(line):
        out.truncate(0), out.seek(0)
        keep_going = repl._command(s, con, line)
        return keep_going, out.getvalue()

    assert "Ctrl-C" in run("/help")[1] and "dropped" in run("/help")[1]
    assert "max_new_tokens=32 steps=6 temp=0.5-0.7" in run("/set steps=6 temp=0.5-0.7 max_new_tokens=32")[1]
    assert s.settings.gen.max_denoising_steps == 6 and (s.settings.gen.t_min, s.settings.gen.t_max) == (0.5, 0.7)
    assert "error" in run("/set temp=0.9-0.1")[1] and s.settings.gen.t_min == 0.5  # rejected, unchanged
    assert "unknown setting" in run("/set bogus=1")[1]
    assert "eos=none" in run("/set eos=none seed=none")[1] and s.settings.gen.eos_token_id is None
    _run(s, "hi")
    assert "conversation: 1 turns" in run("/stats")[1]
    target = tmp_path / "t.json"
    assert "saved" in run(f"/save {target}")[1]
    saved = json.loads(target.read_text())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["turns"][0]["canvases"] == 2 and saved["settings"]["steps"] == 6
    run("/system be brief")
    assert s.conversation()[0] == {"role": "system", "content": "be brief"}
    run("/reset")
    assert s.messages == [] and s.cached_tokens == 0 and s.system == "be brief"
    assert "unknown command" in run("/nope")[1]
    assert run("/exit")[0] is False


def test_torch_backend_reuses_cache_too(mixed_sc01, monkeypatch):
    import torch

    from mlx_diffgemma import torch_backend as tb

    model, tok = tb.load(mixed_sc01, device="cpu")
    s = ChatSession(model, tok, **GEN, noise=md.SeededNoise(2))
    first = _run(s, "hello")
    with recording(monkeypatch, tb.TorchDenoiser) as turn:
        pre = _run(s, "and now?")
    assert pre[0].reused == first[0].encoded > 0
    assert isinstance(pre[-1], Summary)
    gen = GenerationConfig.from_model_dir(mixed_sc01, **GEN)
    fresh = tb.TorchDenoiser(model, gen, noise=md.SeededNoise(2))
    fresh.encode(_stable_ids(tok, s))

    def from_numpy(a):
        t = torch.as_tensor(a)
        return t.long() if not t.is_floating_point() else t

    replay(fresh, turn, md.SeededNoise(2), from_numpy=from_numpy).check(ATOL)


def test_generate_command_plain_stdout(ckpt_factory, capsys):
    from mlx_diffgemma import cli

    path = ckpt_factory("tiny")
    argv = ["generate", "--model", str(path), "--prompt", "hi", "--steps", "4",
            "--max-new-tokens", "16", "--seed", "0", "--verbose"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "canvas" not in out and "tok/s" not in out
    assert "tok/s" in err and not re.search(r"step \d+/4", err)  # no drafts: stderr is no terminal
    # The same text as the library's single-shot generation of the templated prompt.
    model, tok = md.load(path)
    ids = _char_tokens(path, _render(path, [{"role": "user", "content": "hi"}], True))
    text = md.generate(model, tok, ids, seed=0, max_denoising_steps=4, max_new_tokens=16)
    assert out == text + "\n"

    assert cli.main(["generate", "--model", str(path), "--prompt", "x" * 1200]) == 2
    assert "prompt too long" in capsys.readouterr().err


# -- the REPL in a terminal ------------------------------------------------------------------


SUMMARY = re.compile(r"(\d+) tokens? · \d+ canvas(?:es)? · steps [\d+]+ · [\d.]+ tok/forward · "
                     r"[\d.]+ tok/s · prompt (\d+) new \+ (\d+) cached tokens encoded in ([\d.]+) s")
PROMPT = "you ›"


def _prompts(screen: str) -> int:
    return sum(1 for line in screen.splitlines() if line.startswith(PROMPT))


def drive_two_turn_session(tmp_path: Path, ckpt: Path, backend_cls=None, extra_args=()):
    """Runs the REPL under a terminal; returns (screens, terminal) for the caller."""
    lms = tmp_path / "lmstudio"
    (lms / "testpub").mkdir(parents=True)
    os.symlink(ckpt, lms / "testpub" / "tiny-chat")
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               LMSTUDIO_MODELS_DIR=str(lms), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TERM="xterm-256color", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "mlx_diffgemma.cli", "chat", "--model", "tiny-chat",
           "--steps", "8", "--max-new-tokens", "32", "--seed", "0", *extra_args]
    if backend_cls is None:
        backend_cls = _Tmux if shutil.which("tmux") else _Pexpect
    return backend_cls(tmp_path, cmd, env), env


@pytest.mark.parametrize("terminal", ["tmux", "pexpect"])
def test_repl_two_turns_slash_command_ctrl_c_exit(ckpt_factory, tmp_path, terminal):
    if terminal == "tmux" and not shutil.which("tmux"):
        pytest.skip("tmux is not installed (the pexpect variant covers the REPL)")
    path = ckpt_factory("tiny")
    term, _ = drive_two_turn_session(tmp_path, path, _Tmux if terminal == "tmux" else _Pexpect)
    try:
        screen = _wait(term, lambda s: PROMPT in s, "the first prompt", timeout=60)
        assert "mlx-diffgemma chat" in screen and "testpub/tiny-chat" in screen

        # Turn 1: everything is new.
        term.type("hello there")
        screen = _wait(term, lambda s: len(SUMMARY.findall(s)) == 1 and _prompts(s) == 2, "reply 1")
        assert "model ›" in screen
        n_tokens, new1, cached1, _ = SUMMARY.findall(screen)[0]
        full1 = _render(path, [{"role": "user", "content": "hello there"}], True)
        stable1 = len(_char_tokens(path, full1[: -len(THOUGHT)]))
        assert int(cached1) == 0 and int(new1) == len(_char_tokens(path, full1))

        # A slash command.
        term.type("/stats")
        screen = _wait(term, lambda s: "interrupted replies" in s and _prompts(s) == 3, "/stats")
        assert f"cache: {stable1} tokens held" in screen
        assert "conversation: 1 turns" in screen

        # Turn 2: turn 1's stable part comes from the cache.
        term.type("and a second question")
        screen = _wait(term, lambda s: len(SUMMARY.findall(s)) == 2 and _prompts(s) == 4, "reply 2")
        _, new2, cached2, _ = SUMMARY.findall(screen)[1]
        assert int(cached2) == stable1 and int(new2) > 0

        # A long reply (no EOS, 40 canvases of 48 steps), stopped with Ctrl-C mid-way.
        term.type("/set max_new_tokens=640 steps=48 eos=none")
        _wait(term, lambda s: "max_new_tokens=640" in s and _prompts(s) == 5, "/set")
        term.type("tell me a long story")
        live = re.compile(r"canvas ([3-9]|\d\d) · step \d+/48")
        screen = _wait(term, lambda s: live.search(s), "the live canvas view")
        assert "settled" in screen
        term.key("C-c")
        screen = _wait(term, lambda s: "interrupted: reply dropped" in s and _prompts(s) == 6,
                       "the interrupted reply")
        assert len(SUMMARY.findall(screen)) == 2  # no summary for the dropped reply

        # The session goes on: the dropped turn left no trace.
        term.type("/stats")
        screen = _wait(term, lambda s: s.count("interrupted replies") == 2 and _prompts(s) == 7, "/stats 2")
        last = screen[screen.rfind("model: ") :]
        assert "conversation: 2 turns" in last and "interrupted replies: 1" in last

        term.key("C-d")
        screen = _wait(term, lambda s: term.dead(), "exit on Ctrl-D", timeout=15)
        assert "bye" in term.screen()
    finally:
        term.close()


def test_repl_in_a_terminal_survives_bad_input(ckpt_factory, tmp_path):
    """Bad settings, undecodable bytes and a directory as /save target, typed into a real
    terminal: each is one red error line, and the conversation goes on with its turns."""
    term, _ = drive_two_turn_session(tmp_path, ckpt_factory("tiny"), _Pexpect)
    try:
        _wait(term, lambda s: PROMPT in s, "the first prompt", timeout=60)
        term.type("hello there")
        _wait(term, lambda s: len(SUMMARY.findall(s)) == 1 and _prompts(s) == 2, "reply 1")
        bad = ["/set seed=-5", None, "/set temp=nan", "/set steps=0", "/set bogus=1",
               f"/save {tmp_path}"]
        for i, line in enumerate(bad):
            if line is None:
                os.write(term.p.child_fd, b"\xff\xfe\n")  # pasted non-UTF-8 bytes
            else:
                term.type(line)
            _wait(term, lambda s: s.count("error: ") == i + 1 and _prompts(s) == i + 3, f"error {i}")
        term.type("and a second question")
        _wait(term, lambda s: len(SUMMARY.findall(s)) == 2, "reply 2")
        term.type("/stats")
        screen = _wait(term, lambda s: "interrupted replies" in s, "/stats")
        assert "Traceback" not in screen and not term.dead()
        assert "conversation: 2 turns" in screen and "peak memory 0.00 GB" not in screen
        errors = [line for line in screen.splitlines() if "error: " in line]
        assert "seed must be an integer from 0 to" in errors[0]
        assert "not valid UTF-8" in errors[1] and "t_min" in errors[2]
        assert "max_denoising_steps" in errors[3] and "unknown setting" in errors[4]
        assert "cannot write" in errors[5]
    finally:
        term.close()


# -- model resolution -------------------------------------------------------------------------


def _fake_model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "diffusion_gemma"}))
    return d


def test_resolve_lmstudio_names(tmp_path, monkeypatch):
    root = tmp_path / "lms"
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    a = _fake_model(root / "mlx-community" / "dg-4bit")
    _fake_model(root / "someone" / "dg-4bit")
    only = _fake_model(root / "someone" / "dg-8bit")
    (root / "someone" / "empty").mkdir()  # not a model: no config.json
    assert paths.resolve_model_path("dg-4bit") == a  # mlx-community wins a tie
    assert paths.resolve_model_path("dg-8bit") == only
    assert paths.resolve_model_path("DG-8BIT") == only
    assert paths.resolve_model_path("someone/dg-4bit") == root / "someone" / "dg-4bit"
    _fake_model(root / "other" / "dg-8bit")
    with pytest.raises(ValueError, match="ambiguous"):
        paths.resolve_model_path("dg-8bit")
    with pytest.raises(FileNotFoundError, match="LMSTUDIO_MODELS_DIR"):
        paths.resolve_model_path("empty")
    # Several roots, os.pathsep-separated.
    second = tmp_path / "lms2"
    b = _fake_model(second / "pub" / "dg-2bit")
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", f"{root}{os.pathsep}{second}")
    assert paths.resolve_model_path("dg-2bit") == b


def test_resolve_default_lmstudio_locations(tmp_path, monkeypatch):
    monkeypatch.delenv("LMSTUDIO_MODELS_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    d = _fake_model(tmp_path / ".cache" / "lm-studio" / "models" / "pub" / "cached-one")
    e = _fake_model(tmp_path / ".lmstudio" / "models" / "mlx-community" / "diffusiongemma-26B-A4B-it-4bit")
    assert paths.resolve_model_path("cached-one") == d
    # The default hub id is taken from LM Studio's folder without touching the hub.
    assert paths.resolve_model_path(paths.DEFAULT_MODEL) == e


def test_resolve_packaged_toy_sudoku(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ASSETS_DIR", tmp_path / "assets")
    toy = tmp_path / "assets" / "toy-sudoku"
    toy.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no weights yet"):
        paths.resolve_model_path("toy-sudoku")
    hf = _fake_model(toy / "hf")
    assert paths.resolve_model_path("toy-sudoku") == hf
    mlx = _fake_model(toy / "mlx")
    assert paths.resolve_model_path("toy-sudoku") == mlx
    assert paths.resolve_model_path("toy-sudoku", prefer="hf") == hf


OFFLINE_SCRIPT = r"""
import json, sys
from mlx_diffgemma.models import paths
print(json.dumps(str(paths.resolve_model_path("org/tiny-dg"))))
try:
    paths.resolve_model_path(paths.DEFAULT_MODEL)
except FileNotFoundError as e:
    print(json.dumps(str(e)))
"""


def test_resolve_offline_hf_cache(tmp_path):
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny-dg"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _fake_model(repo / "snapshots" / commit)
    (snap / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "empty-lms").mkdir()
    env = dict(os.environ)
    for k in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        env.pop(k, None)
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1",
               LMSTUDIO_MODELS_DIR=str(tmp_path / "empty-lms"),
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found, missing = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert Path(found) == snap
    assert "default model" in missing and "--model" in missing
    assert "mlx-diffgemma convert --hf-path google/diffusiongemma-26B-A4B-it" in missing
