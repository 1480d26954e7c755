"""Bad input never ends in a traceback: malformed model files, out-of-range settings and
flags, undecodable text. Each is one line naming the file or field and the fix, from the
library (a ValueError subclass) and from the command line (non-zero exit)."""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_diffgemma as md
from mlx_diffgemma.chat import repl, turn_cache
from mlx_diffgemma.chat import session as session_mod
from mlx_diffgemma.chat.session import ChatSession
from mlx_diffgemma.generation.settings import parse_temp
from mlx_diffgemma.models.config import ConfigError
from mlx_diffgemma.models.tokenizer import render

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def _cli(*args, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_diffgemma.cli", *args], input=stdin,
                          env=_env(), capture_output=True, timeout=180, cwd=REPO)


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- malformed model directories ------------------------------------------------------


def _set_text(key, value):
    def edit(cfg):
        cfg["text_config"][key] = value
    return edit


def _set_top(key, value):
    def edit(cfg):
        cfg[key] = value
    return edit


# (case id, file, how to corrupt it: a JSON edit or raw bytes, what the error names)
BAD_FILES = [
    ("config-not-json", "config.json", b"{\"model_type\": ", "config.json is not valid JSON"),
    ("config-a-list", "config.json", b"[1, 2]", "config.json holds a JSON list"),
    ("config-nested", "config.json", b"[" * 100_000, "config.json nests too deeply"),
    ("config-not-utf8", "config.json", b"{\"a\": \"\xff\xfe\"}", "config.json is not UTF-8"),
    ("layers-two", "config.json", _set_text("num_hidden_layers", "two"), "num_hidden_layers must be a positive integer"),
    ("layers-negative", "config.json", _set_text("num_hidden_layers", -1), "num_hidden_layers must be a positive integer"),
    ("rope-5", "config.json", _set_text("rope_parameters", 5), "rope_parameters must map each layer type"),
    ("rope-theta", "config.json", _set_text("rope_parameters", {"sliding_attention": {"rope_theta": "x"}, "full_attention": {}}), "sliding_attention.rope_theta"),
    ("canvas-0", "config.json", _set_top("canvas_length", 0), "canvas_length must be a positive integer"),
    ("text-config-5", "config.json", _set_top("text_config", 5), "text_config is missing or not an object"),
    ("layer-types", "config.json", _set_text("layer_types", ["sliding_attention", "dense"]), "layer_types must be a list"),
    ("per-layer", "config.json", _set_text("per_layer_config", {"seven": {}}), "per_layer_config key 'seven'"),
    ("eos-string", "config.json", _set_text("eos_token_id", "one"), "eos_token_id must be"),
    ("vocab-float", "config.json", _set_text("vocab_size", 128.5), "vocab_size must be a positive integer"),
    ("gen-not-json", "generation_config.json", b"{,}", "generation_config.json is not valid JSON"),
    ("gen-steps-string", "generation_config.json", _set_top("max_denoising_steps", "many"), "max_denoising_steps must be an integer"),
    ("gen-t-min-nan", "generation_config.json", b"{\"t_min\": NaN}", "t_min must be a temperature"),
    ("gen-entropy-negative", "generation_config.json", _set_top("sampler_config", {"entropy_bound": -1}), "entropy_bound must be > 0"),
    ("gen-eos-dict", "generation_config.json", _set_top("eos_token_id", {"a": 1}), "eos_token_id must be"),
    ("tokenizer-config-not-json", "tokenizer_config.json", b"{\"bos_token\": ", "tokenizer_config.json is not valid JSON"),
    ("tokenizer-json-not-json", "tokenizer.json", b"nope", "tokenizer.json is not valid JSON"),
    ("template-in-config", "tokenizer_config.json", _set_top("chat_template", "{% for m in %}"), "tokenizer_config.json: chat_template is not a valid Jinja template"),
    ("template-file", "chat_template.jinja", b"{{ messages[0] }{% endfor %}", "chat_template.jinja is not a valid Jinja template"),
    ("template-number", "tokenizer_config.json", _set_top("chat_template", 5), "chat_template must be a string"),
]


@pytest.fixture(scope="module")
def corrupted(ckpt_factory, tmp_path_factory):
    base = ckpt_factory("tiny")

    def make(case):
        _, name, change, _ = case
        path = tmp_path_factory.mktemp(case[0])
        shutil.rmtree(path)
        shutil.copytree(base, path)
        f = path / name
        if callable(change):
            data = json.loads(f.read_text())
            change(data)
            f.write_text(json.dumps(data))
        else:
            f.write_bytes(change)
        return path

    return make


@pytest.mark.parametrize("case", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_malformed_model_files_are_one_line_errors(case, corrupted, capsys):
    path = corrupted(case)
    _, name, _, expected = case
    with pytest.raises(ConfigError) as info:
        md.load(path)
    message = str(info.value)
    assert expected in message and str(path / name) in message and "\n" not in message

    # The command line, in this process (one subprocess per case would cost a minute of
    # imports; test_chat_command_reports_a_malformed_config runs a real process).
    from mlx_diffgemma import cli

    assert cli.main(["generate", "--model", str(path), "-p", "hi"]) != 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mlx-diffgemma generate: error: ") and expected in lines[0]


def test_chat_command_reports_a_malformed_config(corrupted):
    path = corrupted(BAD_FILES[4])
    line = _one_line_error(_cli("chat", "--model", str(path)))
    assert "num_hidden_layers must be a positive integer (got 'two')" in line


def test_torch_backend_refuses_pickled_weights(ckpt_factory, tmp_path):
    from mlx_diffgemma import torch_backend as tb
    from mlx_diffgemma.models.checkpoint import WeightsError

    path = shutil.copytree(ckpt_factory("tiny"), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="only pytorch_model.bin: pickled weights are not loaded"):
        tb.load(path, device="cpu")


# -- flags, settings, input text --------------------------------------------------------


BAD_FLAGS = [
    (["--seed", "-5"], "argument --seed: seed must be an integer from 0 to"),
    (["--seed", str(2**64)], "argument --seed: seed must be an integer from 0 to"),
    (["--temp", "nan"], "argument --temp: invalid generation parameter: t_min"),
    (["--temp", "inf"], "argument --temp: invalid generation parameter: t_min"),
    (["--temp", "0.9-0.1"], "t_min must not exceed t_max"),
    (["--max-context", "0"], "argument --max-context: must be an integer >= 1"),
    (["--max-context", "-3"], "argument --max-context: must be an integer >= 1"),
    (["--steps", "0"], "argument --steps: invalid generation parameter: max_denoising_steps"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: invalid generation parameter"),
    (["--entropy-bound", "nan"], "argument --entropy-bound: invalid generation parameter"),
    (["--entropy-bound", "-0.5"], "argument --entropy-bound: invalid generation parameter"),
]


@pytest.mark.parametrize("flags, expected", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_refused_by_the_parser(flags, expected, capsys):
    from mlx_diffgemma import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", "unused", "-p", "hi", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


BAD_SERVE_FLAGS = [
    (["--port", "70000"], "argument --port: must be a port number from 0 to 65535 (got '70000')"),
    (["--port", "-5"], "argument --port: must be a port number from 0 to 65535 (got '-5')"),
    (["--port", "http"], "argument --port: the port must be an integer (got 'http')"),
    (["--image-dir", "/no/such/dir"], "argument --image-dir: no such directory: /no/such/dir"),
    (["--image-dir", __file__], f"argument --image-dir: not a directory: {__file__}"),
]


@pytest.mark.parametrize("flags, expected", BAD_SERVE_FLAGS, ids=[" ".join(f) for f, _ in BAD_SERVE_FLAGS])
def test_bad_serve_flags_are_refused_before_the_model_loads(flags, expected, capsys):
    from mlx_diffgemma import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--model", "unused", *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_command_line_help_and_usage(capsys):
    """A bare `mlx-diffgemma` is a usage error (exit 2, the help on stderr); every flag
    says what it does, and --mode says what fast mode does by default."""
    from mlx_diffgemma import cli

    assert cli.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "COMMAND" in err and "name a command" in err
    with pytest.raises(SystemExit):
        cli.main(["verify", "--help"])
    assert "--seed SEED seed of the random prompt and canvases compared with --against" in \
        " ".join(capsys.readouterr().out.split())
    for command, (module, _) in cli._COMMANDS.items():
        parser = argparse.ArgumentParser()
        getattr(importlib.import_module(module), f"add_{command}_args")(parser)
        bare = [a.option_strings or a.dest for a in parser._actions if not a.help]
        assert not bare, f"{command}: flags without help: {bare}"
        mode = next((a.help for a in parser._actions if "--mode" in a.option_strings), "")
        assert "active set" not in mode, (command, mode)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    assert "confident positions frozen, no renoising" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_a_context_over_the_models_is_said_not_clamped_in_silence():
    r = _cli("generate", "--model", "toy-sudoku", "-p", "1.3.34..2.4.4.1.", "--seed", "1", "--max-context", "100000")
    assert r.returncode == 0 and r.stdout.decode() == "1234342121434312\n"
    assert "a 100,000-token context was asked for, but the model's is 512 tokens: using 512" in r.stderr.decode()
    r = _cli("generate", "--model", "toy-sudoku", "-p", "1.3.34..2.4.4.1.", "--seed", "1", "--max-context", "300")
    assert r.returncode == 0 and r.stderr.decode() == ""


@pytest.mark.parametrize("text, expected", [
    ("0.5", (0.5, 0.5)), ("1e-3", (1e-3, 1e-3)), ("1e-3-0.5", (1e-3, 0.5)),
    ("0.4-0.8", (0.4, 0.8)), ("2E-1-3e0", (0.2, 3.0)), (" 0.4 - 0.8 ", (0.4, 0.8)),
])
def test_parse_temp_reads_exponents(text, expected):
    assert parse_temp(text) == expected


def test_valid_flags_generate(ckpt_factory):
    path = ckpt_factory("tiny")
    r = _cli("generate", "--model", str(path), "-p", "hi", "--temp", "1e-3-0.5", "--steps", "2",
             "--max-new-tokens", "16", "--seed", str(2**64 - 1), "--max-context", "200")
    assert r.returncode == 0, r.stderr.decode()


def test_non_utf8_prompt_and_missing_torch(ckpt_factory):
    path = str(ckpt_factory("tiny"))
    line = _one_line_error(_cli("generate", "--model", path, stdin=b"\xff\xfe hi"))
    assert "stdin is not UTF-8 text" in line
    line = _one_line_error(_cli("generate", "--model", path, "-p", os.fsdecode(b"\xff\xfe")))
    assert "--prompt is not valid UTF-8 text" in line

    block_torch = ("import sys; sys.modules['torch'] = None; from mlx_diffgemma import cli; "
                   f"sys.exit(cli.main(['generate', '--model', {path!r}, '--backend', 'torch', '-p', 'hi']))")
    r = subprocess.run([sys.executable, "-c", block_torch], env=_env(), capture_output=True, timeout=180)
    line = _one_line_error(r)
    assert "--backend torch needs PyTorch" in line and "pip install torch" in line


def test_api_rejects_bad_seeds_and_temperatures(ckpt_factory):
    model, tok = md.load(ckpt_factory("tiny"))
    for seed in (-5, 2**64, 1.5):
        with pytest.raises(ValueError, match="seed must be an integer from 0 to"):
            md.generate(model, tok, [5, 6], seed=seed, max_new_tokens=16)
    for value in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="t_max must be a temperature >= 0 and finite"):
            md.generate(model, tok, [5, 6], t_max=value, max_new_tokens=16)
    # The largest seed works (and a session's per-turn seed wraps instead of overflowing).
    md.generate(model, tok, [5, 6], seed=2**64 - 1, max_new_tokens=16, max_denoising_steps=2)
    with pytest.raises(ValueError, match="seed must be"):
        ChatSession(model, tok, seed=-1)
    with pytest.raises(ValueError, match="max_context must be a positive"):
        ChatSession(model, tok, max_context=0)


# -- the session and the REPL keep the conversation ---------------------------------------


def test_session_settings_are_checked_when_set(ckpt_factory):
    model, tok = md.load(ckpt_factory("tiny"))
    s = ChatSession(model, tok, max_denoising_steps=2, max_new_tokens=16, seed=1)
    before = s.settings.describe()
    for key, value, message in [
        ("seed", "-5", "seed must be an integer from 0 to"),
        ("seed", str(2**64), "seed must be an integer from 0 to"),
        ("seed", "abc", "seed must be none or an integer"),
        ("temp", "nan", "t_min must be a temperature"),
        ("temp", "inf-inf", "t_min must be a temperature"),
        ("steps", "0", "max_denoising_steps must be an integer >= 1"),
        ("steps", "1.5", "steps must be an integer"),
        ("entropy", "nan", "entropy_bound must be > 0 and finite"),
        ("max_new_tokens", str(10**30), "the whole 1024-token context"),
        ("confidence", "-1", "confidence_threshold must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            s.update_settings(**{key: value})
        assert s.settings.describe() == before
    s.update_settings(seed="18446744073709551615", temp="1e-3-0.5")
    assert s.settings.describe()["temp"] == "0.001-0.5"


def _repl(session, lines):
    from rich.console import Console

    out = io.StringIO()
    feed = iter(lines)

    def read():
        item = next(feed)  # StopIteration never comes: the list ends with EOFError
        if isinstance(item, BaseException):
            raise item
        return item

    rc = repl.run_repl(session, Console(file=out, width=300, highlight=False), read=read)
    return rc, out.getvalue()


def test_repl_survives_bad_input_and_keeps_the_conversation(ckpt_factory, tmp_path, monkeypatch):
    model, tok = md.load(ckpt_factory("tiny"))
    s = ChatSession(model, tok, max_denoising_steps=2, max_new_tokens=16, seed=0)
    undecodable = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    calls = {"n": 0}
    real = session_mod.split_prompt

    def flaky_split(*args, **kwargs):  # one turn fails with an unexpected error
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(session_mod, "split_prompt", flaky_split)
    rc, out = _repl(s, [
        "first question",
        "this turn breaks",
        "/set seed=-5",
        undecodable,
        os.fsdecode(b"caf\xe9 au lait"),  # surrogateescape'd bytes
        "/set temp=nan",
        "/set steps=0",
        "/set bogus=1",
        f"/set max_new_tokens={10**40}",
        f"/save {tmp_path}",
        "x" * 3000,  # over the 1024-token context
        "second question",
        "/stats",
        EOFError(),
    ])
    assert rc == 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: RuntimeError: boom",
        f"error: seed must be an integer from 0 to 2**64-1 = {2**64 - 1} (got -5)",
        "error: the line is not valid UTF-8 text; type or paste it again",
        "error: the line is not valid UTF-8 text; type or paste it again",
        errors[4],
        errors[5],
        errors[6],
        errors[7],
        errors[8],
        errors[9],
    ]
    assert "t_min must be a temperature" in errors[4] and "max_denoising_steps" in errors[5]
    assert "unknown setting 'bogus'" in errors[6] and "whole 1024-token context" in errors[7]
    assert "cannot write" in errors[8] and "prompt too long" in errors[9]
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["first question", "second question"]
    assert "conversation: 2 turns" in out and "bye" in out
    assert "peak memory 0.00 GB" not in out and "peak memory " in out


def test_special_tokens_are_ids_not_text(ckpt_factory):
    from mlx_diffgemma.generation.events import Commit, Summary

    path = ckpt_factory("tiny")
    model, tok = md.load(path)
    # The tokenizer's own special set: its named specials and added tokens marked special.
    specials = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if t.special
    }
    assert {0, 1, 2, 105, 106} <= specials
    # No EOS: the canvases are committed whole, whatever specials the argmax holds.
    events = list(md.stream_generate(model, tok, [5, 6, 7], seed=3, max_denoising_steps=2,
                                     max_new_tokens=64, eos_token_id=None))
    summary = events[-1]
    assert isinstance(summary, Summary)
    assert any(t in specials for t in summary.tokens), "fixture should produce special tokens"
    marker = [tok.convert_ids_to_tokens(t) for t in specials]
    for text in [summary.text] + [e.text for e in events if isinstance(e, Commit)]:
        assert not any(m in text for m in marker)
    assert summary.text == tok.decode([t for t in summary.tokens if t not in specials])
    # The canvas view draws them as nothing; the chat template still renders its markers.
    view = repl.CanvasView(tok, 2)
    assert view.token_text(0) == "" and view.token_text(summary.tokens[0]) is not None
    rendered = render(tok, [{"role": "user", "content": "hi"}], True)
    assert "<|turn>user" in rendered


def test_stop_during_prefill_keeps_what_was_encoded(ckpt_factory, monkeypatch):
    """Ctrl-C while a prefill chunk is encoded: feedback at once, the next chunk is not
    started, and the cache holds exactly the chunks already encoded."""
    model, tok = md.load(ckpt_factory("tiny"))
    monkeypatch.setattr(turn_cache, "PREFILL_CHUNK", 8)
    s = ChatSession(model, tok, max_denoising_steps=2, max_new_tokens=16)
    flag, told, encoded = repl.StopFlag(), [], []
    flag.on_set = lambda: told.append("stopping…")
    real = s.backend.encode

    def encode(cache, ids):
        encoded.append(len(ids))
        real(cache, ids)
        if len(encoded) >= 2:  # the user presses Ctrl-C (twice) during the second chunk
            flag.set()
            flag.set()

    monkeypatch.setattr(s.backend, "encode", encode)
    events = list(s.send("a message long enough for several prefill chunks", should_stop=flag.is_set))
    assert [type(e).__name__ for e in events] == ["Interrupted"]
    assert encoded == [8, 8] and told == ["stopping…"]
    assert s.cached_tokens == 16 and s.cache.offset == 16 and s.messages == []
    monkeypatch.setattr(s.backend, "encode", real)
    assert type(list(s.send("hi"))[-1]).__name__ == "Summary" and len(s.messages) == 2
