"""The streaming REPL of `mlx-diffgemma chat`: the terminal side of a
`session.ChatSession`. It draws its events with `rich`: a live view of the canvas being
denoised, the committed text joining the conversation, and a one-line summary per reply
(`LiveCanvas` also serves `generate`'s live view; the commands are in commands.py).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..generation.events import Commit, Draft, SpeculativeSummary, Summary
from ..models.tokenizer import check_text
from .session import ChatSession, Prefill, split_template

# -- rendering --------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _canvases(n: int) -> str:
    return f"{n} canvas" + ("" if n == 1 else "es")


def summary_line(summary: Summary, prefill: Optional[Prefill], prompt_time: float) -> str:
    steps = summary.steps_per_canvas
    if len(steps) <= 8:
        steps_text = "+".join(str(s) for s in steps)
    else:
        steps_text = f"avg {sum(steps) / len(steps):.1f} (min {min(steps)}, max {max(steps)})"
    parts = [
        _plural(summary.valid_tokens, "token"),
        _canvases(summary.canvases),
        f"steps {steps_text}",
        f"{summary.tokens_per_forward:.2f} tok/forward",
        f"{summary.generation_tps:.1f} tok/s",
    ]
    if isinstance(summary, SpeculativeSummary):
        parts[1:4] = [
            _plural(summary.canvases, "round"),
            f"acceptance {summary.acceptance_length:.2f} tok/round (k={summary.block_size})",
            f"{summary.target_forwards} target + {summary.drafter_forwards} drafter forwards",
        ]
    if prefill is not None:
        parts.append(
            f"prompt {prefill.encoded + prefill.suffix} new + {prefill.reused} cached tokens "
            f"encoded in {prompt_time:.3f} s"
        )
    else:
        parts.append(f"prompt {summary.prompt_tokens} tokens encoded in {prompt_time:.3f} s")
    if summary.pad_tokens:  # pads are no reply: the tokens, tok/forward and tok/s leave them out
        parts.append(f"{_plural(summary.pad_tokens, 'pad token')} not counted")
    return " · ".join(parts)


class CanvasView:
    """The live picture of one canvas: settled tokens (same argmax as the previous step,
    or accepted this step) bright, still-noisy ones dim; a "canvas k · step n/N" header."""

    def __init__(self, tokenizer, steps: int, max_chars: int = 2000):
        self.tokenizer = tokenizer
        self.steps = steps
        self.max_chars = max_chars
        self._text: Dict[int, str] = {}
        self._prev: Optional[List[int]] = None
        self._canvas = -1

    def token_text(self, t: int) -> str:
        """How token `t` is drawn: special tokens (`<pad>`...) not at all, as in the reply."""
        s = self._text.get(t)
        if s is None:
            try:
                s = self.tokenizer.decode([t], skip_special_tokens=True)
                special = not s and self.tokenizer.decode([t])
            except Exception:
                s, special = f"<{t}>", False
            s = s.replace("\n", "↵").replace("\r", "↵").replace("\t", "⇥")
            s = s or ("" if special else "∅")
            self._text[t] = s
        return s

    def render(self, draft: Draft):
        from rich.text import Text

        if draft.canvas_index != self._canvas:
            self._canvas, self._prev = draft.canvas_index, None
        prev = self._prev
        settled = [
            bool(a) or (prev is not None and i < len(prev) and prev[i] == t)
            for i, (t, a) in enumerate(zip(draft.tokens, draft.accepted))
        ]
        self._prev = list(draft.tokens)
        n = self.steps - draft.step + 1
        header = Text(f"canvas {draft.canvas_index + 1} · step {n}/{self.steps}", style="bold cyan")
        header.append(f"  {sum(settled)}/{len(settled)} settled", style="dim")
        body = Text()
        used = 0
        for t, ok in zip(draft.tokens, settled):
            s = self.token_text(t)
            used += len(s)
            if used > self.max_chars:
                body.append("…", style="dim")
                break
            body.append(s, style="bold" if ok else "dim italic")
        return header, body


class LiveCanvas:
    """The live view of the canvas being denoised, for the REPL and `generate`: a
    transient rich Live region, redrawn at most 20 times a second (and at each canvas's
    last step), holding `head` lines above the canvas."""

    def __init__(self, console, tokenizer, steps: int, **live_options):
        self.view = CanvasView(tokenizer, steps)
        self._options = dict(console=console, auto_refresh=False, transient=True, **live_options)
        self.live = self._new_live()
        self.lines: Tuple = ()
        self.head: Sequence = ()
        self._last = 0.0

    def _new_live(self):
        from rich.live import Live

        return Live(**self._options)

    def __enter__(self) -> "LiveCanvas":
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        self._erase()

    def _erase(self) -> None:
        from rich.text import Text

        self.live.update(Text(""), refresh=True)
        self.live.stop()

    @contextmanager
    def paused(self):
        """The view taken off the screen while the caller writes to the same terminal
        another way (generate's reply goes to stdout, the view to stderr: text written
        under the view would be erased with it), then drawn again below that text. A
        new Live each time: a stopped one would erase its old height again."""
        self._erase()
        try:
            yield
        finally:
            self.live = self._new_live()
            self.live.start()
            self.show(self.head)

    def draft(self, ev: Draft, head: Sequence = ()) -> None:
        self.lines = self.view.render(ev)
        now = time.perf_counter()
        if now - self._last > 1 / 20 or ev.step == 1:
            self.show(head)
            self._last = now

    def show(self, head: Sequence = ()) -> None:
        from rich.console import Group

        self.head = head
        self.live.update(Group(*head, *self.lines), refresh=True)


# -- the REPL ----------------------------------------------------------------------------

HELP = """\
Commands:
  /help                 this help
  /reset                forget the conversation (keeps the system prompt) and empty the cache
  /system TEXT          set the system prompt (/system alone clears it); the next turn re-encodes
  /image PATH           attach an image to your next message (repeat for more; /image alone
                        drops them); it stays in the conversation, encoded once
  /infill TEMPLATE      the next reply fills TEMPLATE's one {{}} (\\n for a newline), e.g.
                        /infill Dear Bob,\\n{{}}\\nBest, Alice   (/infill alone drops it)
  /set key=value ...    steps=N temp=a-b max_new_tokens=N seed=N|none entropy_bound=X
                        stability=N confidence=X t_min=X t_max=X eos=none|ID,ID,...
                        mode=reference|fast
  /stats                settings, cache and the last reply's numbers
  /save FILE            write the transcript as JSON
  /exit                 quit (Ctrl-D too)
Ctrl-C while a reply is being generated stops it: the partial reply and your message
are dropped (the conversation is as before it) and you can type again."""


class StopFlag:
    """Set by Ctrl-C while a reply runs. `on_set` gives feedback at once: the flag is
    only read between prefill chunks and denoising steps, up to a second or two later."""

    def __init__(self):
        self._event = threading.Event()
        self.on_set: Optional[Callable[[], None]] = None

    def set(self) -> None:
        first = not self._event.is_set()
        self._event.set()
        if first and self.on_set is not None:
            self.on_set()

    def is_set(self) -> bool:
        return self._event.is_set()


@contextmanager
def _interrupt_flag():
    """While generating, Ctrl-C sets a flag (checked between denoising steps and prefill
    chunks) instead of raising in the middle of an encoder call."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, old)


@contextmanager
def _no_echo():
    """While a reply streams, keys typed are not echoed: the terminal would write them
    into the live view, which then takes more lines than it drew, and its redraws would
    leave a copy of the reply line behind. What was typed stays in the input and comes
    up at the next prompt (as a shell's type-ahead)."""
    try:
        import termios

        fd = sys.stdin.fileno()
        old = termios.tcgetattr(fd) if os.isatty(fd) else None
    except Exception:  # no termios (Windows), or stdin is no terminal (a pipe, a test's)
        old = None
    if old is None:
        yield
        return
    quiet = list(old)
    quiet[3] &= ~termios.ECHO  # lflag; canonical input and Ctrl-C (ISIG) stay
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, old)


def _stream_reply(session: ChatSession, console, text: str, flag,
                  attached: Optional["Attached"] = None) -> None:
    """One turn on screen: live canvas while it denoises, committed text above it. The
    attached images go with the message; they stay attached unless the turn finishes."""
    from rich.text import Text

    label = Text("model › ", style="bold magenta")
    pending = ""  # committed text not yet printed (no newline yet)
    label_done = False
    prefill = None
    summary = None

    def tail():
        t = Text()
        if not label_done:
            t.append_text(label)
        t.append(pending)
        return t

    with LiveCanvas(console, session.tokenizer, session.settings.gen.max_denoising_steps,
                    vertical_overflow="visible") as live:
        if hasattr(flag, "on_set"):
            flag.on_set = lambda: live.live.console.print(Text("stopping…", style="yellow"))
        images = attached.send_kwargs() if attached else {}
        for ev in session.send(text, should_stop=flag.is_set, **images):
            if isinstance(ev, Prefill):
                prefill = ev
                if ev.note:
                    live.live.console.print(Text(f"({ev.note})", style="yellow"))
                text = f"encoded {ev.encoded} new prompt tokens ({ev.reused} cached) in {ev.time:.3f} s"
                live.lines = (Text(text, style="dim"),)
                live.show((tail(),))
            elif isinstance(ev, Draft):
                live.draft(ev, (tail(),))
            elif isinstance(ev, Commit):
                pending += ev.text
                if "\n" in pending:
                    done, pending = pending.rsplit("\n", 1)
                    line = Text()
                    if not label_done:
                        line.append_text(label)
                        label_done = True
                    line.append(done)
                    live.live.console.print(line)
                live.lines = ()
                live.show((tail(),))
            elif isinstance(ev, Summary):
                summary = ev
    if summary is None:
        if pending or label_done:
            console.print(tail())
        if attached:
            console.print(Text(f"({attached.line()} still attached)", style="yellow"))
        console.print(
            Text(
                "⏹ interrupted: reply dropped (your message too); the conversation is as "
                "before it",
                style="yellow",
            )
        )
        return
    console.print(tail())
    if attached is not None:
        attached.clear()
    turn = session.turns[-1]
    console.print(Text("  " + summary_line(summary, prefill, turn.prompt_time), style="dim"), soft_wrap=True)
    if turn.note and (prefill is None or turn.note != prefill.note):
        console.print(Text(f"  ({turn.note})", style="yellow"))


def format_memory(gb: float) -> str:
    """A peak-memory reading; 0 means the backend does not measure it (torch on CPU)."""
    if gb <= 0:
        return "unavailable"
    return f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1e3:.1f} MB"


def _settings_line(session: ChatSession) -> str:
    return " ".join(f"{k}={v}" for k, v in session.settings.describe().items())


def _stats_text(session: ChatSession) -> str:
    exchanges = len(session.messages) // 2
    if session.keep_history:
        conversation = f"conversation: {exchanges} turns"
    else:
        replies = "1 reply" if exchanges == 1 else f"{exchanges} replies"
        conversation = f"conversation: none kept (--no-history: each message is sent alone), {replies} so far"
    lines = [
        f"model: {session.model_name} ({session.backend.name})",
        "settings: " + _settings_line(session),
        conversation + ", system prompt " + ("set" if session.system else "none"),
        f"cache: {session.cached_tokens} tokens held "
        f"({session.backend.cache_bytes(session.cache) / 1e6:.1f} MB), context limit {session.max_context}",
        f"interrupted replies: {session.interrupted}, cache resets: {session.resets}",
    ]
    if session.turns:
        t = session.turns[-1]
        lines.append(
            f"last reply: {_plural(t.tokens, 'token')}"
            + (f" ({_plural(t.pad_tokens, 'pad token')} not counted)" if t.pad_tokens else "")
            + f", {_canvases(t.canvases)}, steps {t.steps_per_canvas}, "
            f"{t.tokens_per_forward:.2f} tok/forward, {t.generation_tps:.1f} tok/s, "
            f"prompt {t.encoded + t.suffix} new + {t.reused} cached tokens in {t.prompt_time:.3f} s, "
            f"peak memory {format_memory(t.peak_memory_gb)}, finish {t.finish_reason}"
        )
        lines.append(
            "prompt encode per turn: "
            + ", ".join(f"{x.prompt_time:.3f} s ({x.encoded + x.suffix} new)" for x in session.turns)
        )
    return "\n".join(lines)


class Attached:
    """Images attached with /image, waiting for the next message: (name, the image's
    preprocessed arrays), loaded when attached so a bad file is refused at once."""

    def __init__(self):
        self.items: List[Tuple[str, Any]] = []
        self.template: Optional[str] = None  # /infill's, for the next reply

    def __bool__(self) -> bool:
        return bool(self.items) or self.template is not None

    def add(self, session: ChatSession, arg: str) -> str:
        # Terminals paste dragged files quoted or with escaped spaces.
        path = arg.strip().strip("'\"").replace("\\ ", " ")
        inputs = session.load_images([path])[0]
        self.items.append((path, inputs))
        return (f"attached {path} ({inputs.num_soft_tokens[0]} image tokens); with your next "
                f"message: {self.line()}")

    def line(self) -> str:
        what = [_plural(len(self.items), "image")] if self.items else []
        return ", ".join(what + (["the /infill template"] if self.template is not None else []))

    def send_kwargs(self) -> Dict[str, Any]:
        if self.template is not None:
            if self.items:
                raise ValueError("/infill and /image do not go together: drop one (/image or /infill alone)")
            return {"template": self.template}
        return {"images": [i for _, i in self.items], "names": [n for n, _ in self.items]}

    def clear(self) -> None:
        self.items = []
        self.template = None


def _command(session: ChatSession, console, line: str, attached: Optional[Attached] = None) -> bool:
    """Runs a slash command; False means exit."""
    from rich.text import Text

    cmd, _, rest = line[1:].partition(" ")
    cmd, rest = cmd.lower(), rest.strip()
    if cmd in ("exit", "quit", "q"):
        return False
    if cmd in ("help", "h", "?"):
        console.print(Text(HELP))
    elif cmd == "reset":
        session.reset()
        console.print(Text("conversation and cache cleared", style="green"))
    elif cmd == "system":
        session.set_system(rest)
        console.print(Text(f"system prompt {'set' if rest else 'cleared'}", style="green"))
    elif cmd == "set":
        if not rest:
            console.print(Text(_settings_line(session)))
            return True
        try:
            pairs = {}
            for item in rest.split():
                if "=" not in item:
                    raise ValueError(f"expected key=value, got {item!r}")
                k, v = item.split("=", 1)
                pairs[k.strip().lower()] = v.strip()
            session.update_settings(**pairs)
        except ValueError as e:
            console.print(Text(f"error: {e}", style="red"))
            return True
        console.print(Text(_settings_line(session), style="green"))
    elif cmd == "image" and attached is not None:
        if not rest:
            n = len(attached.items)
            attached.items = []
            console.print(Text(f"{_plural(n, 'attached image')} dropped", style="green"))
            return True
        console.print(Text(attached.add(session, rest), style="green"))
    elif cmd == "infill" and attached is not None:
        if not rest:
            attached.template = None
            console.print(Text("infill template dropped", style="green"))
            return True
        template = rest.replace("\\n", "\n")
        split_template(template)
        attached.template = template
        console.print(Text("the next reply fills the template's {{}}", style="green"))
    elif cmd == "stats":
        console.print(Text(_stats_text(session)))
    elif cmd == "save":
        if not rest:
            console.print(Text("usage: /save FILE", style="red"))
            return True
        try:
            path = session.save(rest)
        except OSError as e:
            console.print(Text(f"error: cannot write {rest}: {e}", style="red"))
            return True
        console.print(Text(f"transcript saved to {path}", style="green"))
    else:
        console.print(Text(f"unknown command /{cmd}; /help lists them", style="red"))
    return True


def run_repl(session: ChatSession, console=None, read: Optional[Callable[[], str]] = None) -> int:
    from rich.console import Console
    from rich.text import Text

    console = console or Console(highlight=False)
    if read is None:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

        def read():
            return console.input("[bold green]you ›[/] ")

    ctx = session.max_context
    console.print(
        Text(
            f"mlx-diffgemma chat · {session.model_name} ({session.backend.name}) · "
            f"context {ctx:,} tokens · /help for commands, Ctrl-D to quit",
            style="bold",
        )
    )
    if session.context_note:
        console.print(Text(f"note: {session.context_note}", style="yellow"))
    attached = Attached()
    while True:
        try:
            line = check_text(read(), "the line").strip()
        except EOFError:
            console.print()
            console.print(Text("bye", style="dim"))
            return 0
        except KeyboardInterrupt:
            console.print()
            console.print(Text("(Ctrl-D or /exit to quit)", style="dim"))
            continue
        except ValueError as e:  # UnicodeDecodeError included: undecodable input bytes
            if isinstance(e, UnicodeDecodeError):
                e = ValueError("the line is not valid UTF-8 text; type or paste it again")
            _print_error(console, e)
            continue
        if not line:
            continue
        # Whatever goes wrong in one command or turn is reported and the chat goes on:
        # the session keeps its conversation (a failed turn leaves it as before).
        if line.startswith("/"):
            try:
                if not _command(session, console, line, attached):
                    console.print(Text("bye", style="dim"))
                    return 0
            except Exception as e:
                _print_error(console, e)
            continue
        with _interrupt_flag() as flag, _no_echo():
            try:
                _stream_reply(session, console, line, flag, attached)
            except Exception as e:
                _print_error(console, e)


def _print_error(console, e: Exception) -> None:
    """One red line: the message of an expected error (bad input), the type too otherwise."""
    from rich.text import Text

    text = " ".join(str(e).split()) or "(no message)"
    if not isinstance(e, (ValueError, OSError)):
        text = f"{type(e).__name__}: {text}"
    console.print(Text(f"error: {text}", style="red"), soft_wrap=True)
