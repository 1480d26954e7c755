"""What `generate --verbose` and the chat REPL leave on a real screen (tmux's pane, or a
pty played on tests/terminals.py's Screen where tmux is missing): the answer is not
erased by the live view, keys typed during a reply do not duplicate it, and what
--no-history chats save and count. The packaged toy-sudoku model answers each puzzle
checkably (heldout.json)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from terminals import REPO, Pexpect, Tmux, wait

pytestmark = pytest.mark.slow  # drives the command line in real terminals

TOY = REPO / "mlx_diffgemma" / "assets" / "toy-sudoku" / "mlx"
TARGET = REPO / "benchmarks" / "toy-sudoku-target"
PUZZLE, SOLUTION = "1.3.34..2.4.4.1.", "1234342121434312"
HELDOUT = json.loads((TOY / "heldout.json").read_text())["puzzles"]
SUMMARY = re.compile(r"^\s*(\d+) tokens? · .* tok/s · prompt \d+ (new \+ \d+ cached )?tokens", re.M)
TERMINALS = ["tmux", "pexpect"]


def _env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", TERM="xterm-256color", PYTHONUNBUFFERED="1")
    return env


def _terminal(kind: str, tmp_path: Path, args: list, size=(100, 40)):
    if kind == "tmux" and not shutil.which("tmux"):
        pytest.skip("tmux is not installed (the pexpect variant plays the same output on a Screen)")
    cls = Tmux if kind == "tmux" else Pexpect
    return cls(tmp_path, [sys.executable, *args], _env(), size=size)


def _finished(term, what: str, timeout: float = 120) -> str:
    """The screen once the command has exited."""
    wait(term, lambda s: term.dead(), what, timeout=timeout)
    return term.view()


# -- generate --verbose ----------------------------------------------------------------------


@pytest.mark.parametrize("terminal", TERMINALS)
@pytest.mark.parametrize("target", [False, True], ids=["diffusion", "target"])
def test_generate_verbose_keeps_the_answer_on_screen(tmp_path, terminal, target):
    import subprocess

    args = ["-m", "mlx_diffgemma.cli", "generate", "--model", "toy-sudoku", "--prompt", PUZZLE,
            "--seed", "1"] + (["--target", str(TARGET)] if target else [])
    # The answer, as a script gets it (stdout to a pipe: no live view).
    piped = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), timeout=120)
    answer = piped.stdout.strip()
    assert piped.returncode == 0 and re.fullmatch(r"[1-4]{16}", answer), piped.stderr
    assert target or answer == SOLUTION
    term = _terminal(terminal, tmp_path, args + ["--verbose"])
    try:
        lines = _finished(term, "generate to finish").splitlines()
    finally:
        term.close()
    assert answer in lines, lines
    summary = [i for i, line in enumerate(lines) if SUMMARY.match(line)]
    assert summary and lines.index(answer) < summary[0]
    assert not any(" · step " in line for line in lines)  # the live view is gone


# A reply of three canvases whose text breaks lines in the middle of a canvas: the live
# view must take itself off the screen before each line it lets out on stdout.
FAKE_REPLY = textwrap.dedent("""
    import sys
    from mlx_diffgemma import cli
    from mlx_diffgemma.chat import commands
    from mlx_diffgemma.generation.events import Commit, Draft, Summary

    TEXTS = ["first line\\nsecond ", "half\\nthird", " line, no newline"]

    class Fake:
        def __init__(self, backend):
            self.max_context, self.canvas_length = backend.max_context, backend.canvas_length
            self.name = backend.name

        def stream_generate(self, tokenizer, ids, cache, settings, noise=None, images=None):
            for i, text in enumerate(TEXTS):
                for step in (3, 2, 1):
                    yield Draft(i, step, [7 + step] * 12, [step == 1] * 12)
                yield Commit(i, [8] * 3, text, 3, False)
            yield Summary([8] * 9, "".join(TEXTS), len(ids), 3, [3, 3, 3], 1.0, 0.01, 1.0, 0.1, 90.0,
                          0.0, "length")

    real = commands.make_backend
    commands.make_backend = lambda model: Fake(real(model))
    sys.exit(cli.main(["generate", "--model", "toy-sudoku", "--prompt", "hi", "--verbose"]))
    """)


@pytest.mark.parametrize("terminal", TERMINALS)
def test_generate_verbose_lines_written_between_canvases_stay(tmp_path, terminal):
    term = _terminal(terminal, tmp_path, ["-c", FAKE_REPLY])
    try:
        lines = _finished(term, "generate to finish").splitlines()
    finally:
        term.close()
    assert lines[:3] == ["first line", "second half", "third line, no newline"], lines
    assert SUMMARY.match(lines[3]) and lines[3].startswith("9 tokens · 3 canvases")


def test_piped_prompt_is_the_prompt_without_its_newline():
    """`echo PUZZLE | generate` asks what `--prompt PUZZLE` asks: same prompt tokens,
    same (right) answer; a CRLF line end too."""
    import subprocess

    base = [sys.executable, "-m", "mlx_diffgemma.cli", "generate", "--model", "toy-sudoku",
            "--seed", "1", "--verbose"]
    runs = [subprocess.run(base + ["--prompt", PUZZLE], capture_output=True, text=True, env=_env(), timeout=120)]
    for stdin in (PUZZLE + "\n", PUZZLE + "\r\n"):
        runs.append(subprocess.run(base, input=stdin, capture_output=True, text=True, env=_env(), timeout=120))
    for r in runs:
        assert r.returncode == 0, r.stderr
        assert r.stdout == SOLUTION + "\n"
        assert "prompt 42 tokens encoded" in r.stderr  # <bos>, the template, 16 cells
    # Only one newline goes: a prompt that ends with a blank line keeps it.
    piped, given = (subprocess.run(base + ["--raw", *flags], input=stdin, capture_output=True, text=True,
                                   env=_env(), timeout=120) for flags, stdin in (((), "ab\n\n"), (("-p", "ab\n"), "")))
    prompt = re.compile(r"prompt (\d+) tokens encoded")
    assert prompt.search(piped.stderr).group(1) == prompt.search(given.stderr).group(1) == "3"


def test_a_huge_piped_prompt_is_refused_before_it_is_tokenized():
    """15 MiB on stdin: refused from its length alone ("at least N tokens"), not after
    tokenizing it whole; the chat REPL's messages take the same check."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "mlx_diffgemma.cli", "generate", "--model", "toy-sudoku"],
                       input="1" * (15 << 20), capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert re.fullmatch(r"mlx-diffgemma generate: error: prompt too long: at least \d+ context tokens \+ up to "
                        r"24 generated exceed the 512-token context; shorten the prompt or lower "
                        r"--max-new-tokens\n", r.stderr), r.stderr
    import mlx_diffgemma as md
    from mlx_diffgemma.chat.session import ChatSession

    session = ChatSession(*md.load("toy-sudoku"))
    with pytest.raises(ValueError, match=r"^prompt too long: at least \d+ context tokens"):
        list(session.send("1" * (1 << 20)))
    assert session.messages == [] and session.cached_tokens == 0


# -- the REPL ------------------------------------------------------------------------------------


def _chat(kind: str, tmp_path: Path, *extra: str, size=(100, 40)):
    term = _terminal(kind, tmp_path, ["-m", "mlx_diffgemma.cli", "chat", "--model", "toy-sudoku",
                                      "--seed", "1", *extra], size=size)
    wait(term, lambda s: "you ›" in s, "the first prompt", timeout=90)
    return term


def _prompts(screen: str) -> int:
    return sum(1 for line in screen.splitlines() if line.startswith("you ›"))


@pytest.mark.parametrize("terminal", TERMINALS)
def test_typing_during_a_reply_does_not_duplicate_it(tmp_path, terminal):
    """Keys typed while a long reply streams (wider than the live view's line) are not
    echoed into the view: the reply shows once, and what was typed waits for the next
    prompt."""
    term = _chat(terminal, tmp_path, "--no-history", size=(60, 40))
    typed = "typed while it answered"
    try:
        term.type("/set eos=none max_new_tokens=240 confidence=1e-9")
        wait(term, lambda s: "max_new_tokens=240" in s and _prompts(s) == 2, "/set")
        term.type(PUZZLE)
        wait(term, lambda s: re.search(r"canvas [2-9] · step", s), "the live view", timeout=60)
        term.keys(" ".join([typed] * 3))  # the view's last line plus this runs past 60 columns
        wait(term, lambda s: _prompts(term.view()) == 3, "the reply", timeout=120)
        view = term.view()
    finally:
        term.close()
    lines = [line for line in view.splitlines() if line.strip()]
    assert sum(line.startswith("model ›") for line in lines) == 1, view
    assert SUMMARY.search(view) and lines[-1].startswith("you › " + typed), view  # type-ahead
    assert sum(typed in line for line in lines) == 1, view


def test_no_history_chat_saves_and_counts_each_exchange(tmp_path):
    """--no-history sends each message alone, but the transcript has every exchange
    and /stats says what it counts; a reply with pads (EOS off) counts the same tokens
    in its summary, its tokens per forward and /stats."""
    term = _chat("pexpect", tmp_path, "--no-history")
    puzzles = [p for p in HELDOUT if p["blanks"] <= 6][:2]
    try:
        for i, p in enumerate(puzzles):
            term.type(p["puzzle"])
            wait(term, lambda s: len(SUMMARY.findall(s)) == i + 1 and _prompts(s) == i + 2, f"reply {i}")
        term.type("/set eos=none")
        wait(term, lambda s: _prompts(s) == 4, "/set")
        term.type(puzzles[0]["puzzle"])
        screen = wait(term, lambda s: len(SUMMARY.findall(s)) == 3 and _prompts(s) == 5, "reply 3")
        term.type("/stats")
        screen = wait(term, lambda s: "last reply" in s and _prompts(s) == 6, "/stats")
        term.type(f"/save {tmp_path / 'chat.json'}")
        wait(term, lambda s: "transcript saved" in s, "/save")
    finally:
        term.close()
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["history"] is False
    texts = [(m["role"], m["content"]) for m in saved["messages"]]
    assert [t for t in texts if t[0] == "user"] == [("user", p["puzzle"]) for p in (*puzzles, puzzles[0])]
    replies = [text for role, text in texts if role == "assistant"]
    assert len(texts) == 6 and len(saved["turns"]) == 3
    assert all(re.fullmatch(r"[1-4]{16}", r) and f"model › {r}" in screen for r in replies)
    stats = screen[screen.rfind("model: "):]
    assert "conversation: none kept (--no-history: each message is sent alone), 3 replies so far" in stats
    assert re.search(r"last reply: \d+ tokens \(\d+ pad tokens? not counted\), 1 canvas,", stats)
    # The pads' reply: "N tokens" over the steps is the tokens per forward it shows.
    line = [x for x in screen.splitlines() if SUMMARY.match(x.strip())][-1].strip()
    n, steps, per_forward = re.search(r"^(\d+) tokens · 1 canvas · steps (\d+) · ([\d.]+) tok/forward", line).groups()
    assert "pad tokens not counted" in line or "pad token not counted" in line
    assert abs(int(n) / int(steps) - float(per_forward)) < 0.006
    assert f"last reply: {n} tokens" in stats


def test_speculative_chat_without_history_is_quiet_about_its_cache(tmp_path):
    """With a target and --no-history each message is a new conversation: the cache
    that cannot be cut back is cleared without a note each time, and the answers come."""
    term = _chat("pexpect", tmp_path, "--no-history", "--target", str(TARGET), "--max-context", "100000")
    puzzles = [p for p in HELDOUT if p["blanks"] <= 6][:3]
    try:
        for i, p in enumerate(puzzles):
            term.type(p["puzzle"])
            screen = wait(term, lambda s: s.count("rounds · acceptance") == i + 1 and _prompts(s) == i + 2,
                          f"reply {i}", timeout=90)
    finally:
        term.close()
    assert "no longer matches" not in screen and "cleared" not in screen
    assert all(p["solution"] in screen for p in puzzles)
    # --max-context over the model's is said once, at the start
    assert screen.count("a 100,000-token context was asked for, but the model's is 512 tokens: using 512") == 1
