"""`mlx-diffgemma chat` (the streaming REPL) and `mlx-diffgemma generate` (one prompt):
the terminal side of a `session.ChatSession`. The REPL draws its events with `rich`: a
live view of the canvas being denoised, the committed text joining the conversation, and
a one-line summary per reply; `generate` writes the text to stdout and the same live
canvas to a terminal's stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .config import SEED_MAX, GenerationConfig
from .drafter import Commit, Draft, SpeculativeSummary, Summary, check_context, generation_config
from .images import load_image, prepare_prompt
from .paths import DEFAULT_MODEL, resolve_model_path
from .session import (
    SETTING_ALIASES,
    ChatSession,
    Prefill,
    check_text,
    ensure_chat_template,
    make_backend,
    parse_number,
    parse_seed,
    parse_temp,
)


# -- rendering --------------------------------------------------------------------------


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def summary_line(summary: Summary, prefill: Optional[Prefill], prompt_time: float) -> str:
    steps = summary.steps_per_canvas
    if len(steps) <= 8:
        steps_text = "+".join(str(s) for s in steps)
    else:
        steps_text = f"avg {sum(steps) / len(steps):.1f} (min {min(steps)}, max {max(steps)})"
    parts = [
        _plural(len(summary.tokens), "token"),
        _plural(summary.canvases, "canvas").replace("canvass", "canvases"),
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
        from rich.live import Live

        self.view = CanvasView(tokenizer, steps)
        self.live = Live(console=console, auto_refresh=False, transient=True, **live_options)
        self.lines: Tuple = ()
        self._last = 0.0

    def __enter__(self) -> "LiveCanvas":
        self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        from rich.text import Text

        self.live.update(Text(""), refresh=True)
        self.live.stop()

    def draft(self, ev: Draft, head: Sequence = ()) -> None:
        self.lines = self.view.render(ev)
        now = time.perf_counter()
        if now - self._last > 1 / 20 or ev.step == 1:
            self.show(head)
            self._last = now

    def show(self, head: Sequence = ()) -> None:
        from rich.console import Group

        self.live.update(Group(*head, *self.lines), refresh=True)


# -- the REPL ----------------------------------------------------------------------------

HELP = """\
Commands:
  /help                 this help
  /reset                forget the conversation (keeps the system prompt) and empty the cache
  /system TEXT          set the system prompt (/system alone clears it); the next turn re-encodes
  /image PATH           attach an image to your next message (repeat for more; /image alone
                        drops them); it stays in the conversation, encoded once
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

    with LiveCanvas(console, session.tokenizer, getattr(session.backend, "draft_steps", session.gen.max_denoising_steps),
                    vertical_overflow="visible") as live:
        if hasattr(flag, "on_set"):
            flag.on_set = lambda: live.live.console.print(Text("stopping…", style="yellow"))
        images = attached.send_kwargs() if attached else {}
        for ev in session.send(text, should_stop=flag.is_set, **images):
            if isinstance(ev, Prefill):
                prefill = ev
                if ev.note:
                    live.live.console.print(Text(f"({ev.note})", style="yellow"))
                live.lines = (Text(f"encoded {ev.encoded} new prompt tokens ({ev.reused} cached) in {ev.time:.3f} s", style="dim"),)
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


def _stats_text(session: ChatSession) -> str:
    lines = [
        f"model: {session.model_name} ({session.backend.name})",
        "settings: " + " ".join(f"{k}={v}" for k, v in session.settings().items()),
        f"conversation: {len(session.messages) // 2} turns, system prompt "
        + ("set" if session.system else "none"),
        f"cache: {session.cached_tokens} tokens held "
        f"({session.backend.cache_bytes(session.cache) / 1e6:.1f} MB), context limit {session.max_context}",
        f"interrupted replies: {session.interrupted}, cache resets: {session.resets}",
    ]
    if session.turns:
        t = session.turns[-1]
        lines.append(
            f"last reply: {t.tokens} tokens, {t.canvases} canvases, steps {t.steps_per_canvas}, "
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

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, session: ChatSession, arg: str) -> str:
        # Terminals paste dragged files quoted or with escaped spaces.
        path = arg.strip().strip("'\"").replace("\\ ", " ")
        inputs = session.load_images([path])[0]
        self.items.append((path, inputs))
        return (f"attached {path} ({inputs.num_soft_tokens[0]} image tokens); with your next "
                f"message: {self.line()}")

    def line(self) -> str:
        return _plural(len(self.items), "image")

    def send_kwargs(self) -> Dict[str, Any]:
        return {"images": [i for _, i in self.items], "names": [n for n, _ in self.items]}

    def clear(self) -> None:
        self.items = []


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
            console.print(Text(" ".join(f"{k}={v}" for k, v in session.settings().items())))
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
        console.print(Text(" ".join(f"{k}={v}" for k, v in session.settings().items()), style="green"))
    elif cmd == "image" and attached is not None:
        if not rest:
            n = len(attached.items)
            attached.clear()
            console.print(Text(f"{_plural(n, 'attached image')} dropped", style="green"))
            return True
        console.print(Text(attached.add(session, rest), style="green"))
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
        with _interrupt_flag() as flag:
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


# -- command line --------------------------------------------------------------------------


def _flag_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError: argparse then prints
    `argument --flag: <the message>` and exits 2, instead of a traceback later."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def _setting_type(name: str, kind: type):
    """A flag for one GenerationConfig field, held to the same rules as /set and the API."""

    def parse(text: str):
        value = parse_number(name, kind, text)
        GenerationConfig(**{name: value})
        return value

    return _flag_type(parse, name)


def _temp_arg(text: str) -> str:
    t_min, t_max = parse_temp(text)
    GenerationConfig(t_min=t_min, t_max=t_max)
    return text


def _positive_int(text: str) -> int:
    value = parse_number("the value", int, text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1 (got {text!r})")
    return value


def _seed_arg(text: str) -> int:
    seed = parse_seed(text)
    if seed is None:
        raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} (got {text!r})")
    return seed


def _add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model directory, Hugging Face id or LM Studio / packaged model name (default {DEFAULT_MODEL})",
    )
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx", help="mlx (default) or the torch reference path")
    p.add_argument("--max-new-tokens", type=_setting_type("max_new_tokens", int), default=None, help="tokens per reply (default: chat 1024, or the checkpoint's for small-context models; generate the checkpoint's)")
    p.add_argument("--steps", type=_setting_type("max_denoising_steps", int), default=None, help="denoising steps per canvas (default: the checkpoint's, 48)")
    p.add_argument("--temp", type=_flag_type(_temp_arg, "temp"), default=None, metavar="A-B", help="temperature range t_min-t_max (e.g. 0.4-0.8) or one value")
    p.add_argument("--entropy-bound", type=_setting_type("entropy_bound", float), default=None, help="acceptance entropy bound (default 0.1)")
    p.add_argument("--seed", type=_flag_type(_seed_arg, "seed"), default=None, help="random seed")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-context", type=_flag_type(_positive_int, "max_context"), default=None, help="context limit in tokens (default: the model's, 262,144)")
    p.add_argument("--mode", choices=("reference", "fast"), default=None,
                   help="reference (default: the released sampler, token-exact) or fast (fast.py: "
                   "frozen positions, an active set, top-K sampling and self-conditioning; the "
                   "default with --target)")


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, metavar="MODEL",
                   help="an autoregressive Gemma 4 (mlx-lm model directory or Hugging Face id): its "
                   "output, with this model drafting blocks of tokens (speculative decoding)")
    p.add_argument("--draft-tokens", type=_flag_type(_positive_int, "draft_tokens"), default=DRAFT_TOKENS,
                   help=f"with --target: tokens the drafter proposes per round (default {DRAFT_TOKENS})")
    p.add_argument("--draft-steps", type=_flag_type(_positive_int, "draft_steps"), default=DRAFT_STEPS,
                   help=f"with --target: denoising steps per proposal (default {DRAFT_STEPS})")
    p.add_argument("--target-temp", type=_flag_type(_target_temp, "target_temp"), default=0.0,
                   help="with --target: the target's sampling temperature (default 0: greedy)")
    p.add_argument("--adaptive-k", action="store_true",
                   help="with --target: size each block from the last round (two more drafts after a "
                   "fully kept block, one fewer otherwise, up to --draft-tokens)")


# Speculative defaults, measured on the toy models (BENCHMARKS.md, "Speculative drafting").
DRAFT_TOKENS = 8
DRAFT_STEPS = 1


def _target_temp(text: str) -> float:
    value = parse_number("the temperature", float, text)
    if not value >= 0:
        raise ValueError(f"must be a temperature >= 0 (got {text!r})")
    return value


def resolve_mode(args) -> str:
    """--mode as given, else fast with --target (drafting wants few steps) and reference
    without."""
    if args.mode is not None:
        return args.mode
    return "fast" if getattr(args, "target", None) else "reference"


def target_backend(args, model, tokenizer):
    """The chat backend that drafts for `--target` (loaded and checked here), from the
    command line's speculative flags (chat and serve)."""
    from .speculative import SpeculativeBackend

    target, target_tokenizer = load_target(args.target, tokenizer, args.backend)
    return SpeculativeBackend(model, target, target_tokenizer, k=args.draft_tokens, draft_steps=args.draft_steps,
                              temperature=args.target_temp, adaptive_k=args.adaptive_k)


def load_target(target_arg: str, tokenizer, backend: str = "mlx"):
    """(target model, its tokenizer) from mlx-lm, checked against the drafter's tokenizer."""
    if backend != "mlx":
        raise ValueError("--target runs on the MLX backend only; drop --backend torch")
    from mlx_lm import load as mlx_lm_load

    from .checkpoint import first_line
    from .speculative import check_tokenizers

    try:
        target, target_tokenizer = mlx_lm_load(target_arg)
    except Exception as e:  # mlx-lm's errors vary by what is missing
        raise ValueError(f"cannot load the target {target_arg!r} with mlx-lm ({first_line(e)}); pass an "
                         "mlx-lm model directory or Hugging Face id of an autoregressive Gemma 4") from None
    check_tokenizers(target_tokenizer, tokenizer)
    return target, target_tokenizer


def add_chat_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(p)
    add_target_args(p)
    p.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="send every message as a fresh conversation (for single-turn models such as toy-sudoku)",
    )
    return p


def add_generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _add_common_args(p)
    add_target_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True, help="apply the chat template (default)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="encode the prompt as is")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to go with the prompt (repeatable; before the text with the chat "
                   "template; with --raw the prompt marks where each goes with <|image|>)")
    p.add_argument("--verbose", "-v", action="store_true", help="live drafts and a summary on stderr (drafts only on a terminal)")
    return p


def _gen_kwargs(args, default_max_new: Optional[int] = None) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    max_new = args.max_new_tokens if args.max_new_tokens is not None else default_max_new
    if max_new is not None:
        out["max_new_tokens"] = max_new
    if args.steps is not None:
        out["steps"] = args.steps
    if args.temp is not None:
        out["temp"] = args.temp
    if args.entropy_bound is not None:
        out["entropy_bound"] = args.entropy_bound
    return out


def load_for(model_arg: str, backend: str, mode: str = "reference"):
    """(model, tokenizer, resolved path) for a --model value and backend."""
    if backend == "torch" and mode != "reference":
        raise ValueError("--mode fast runs on the MLX backend only; drop --backend torch")
    path = resolve_model_path(model_arg, prefer="hf" if backend == "torch" else "mlx")
    if backend == "torch":
        try:
            from .torch_backend import load as torch_load
        except ImportError as e:
            raise ValueError(
                f"--backend torch needs PyTorch and transformers ({e}): pip install torch "
                "transformers, or use --backend mlx"
            ) from None

        model, tokenizer = torch_load(path)
    else:
        from .loader import load

        model, tokenizer = load(path)
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return model, tokenizer, path


def _to_generation_overrides(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if k == "temp":
            out["t_min"], out["t_max"] = parse_temp(str(v))
        else:
            out[SETTING_ALIASES.get(k, k)] = v
    return out


CHAT_MAX_NEW_TOKENS = 1024


def _chat_max_new_tokens(model) -> int:
    """Replies of up to 1024 tokens (the release's 256 is a single canvas), unless the
    model's context is small (the toy models): then the checkpoint's own default."""
    if make_backend(model).max_context >= 16 * CHAT_MAX_NEW_TOKENS:
        return CHAT_MAX_NEW_TOKENS
    return generation_config(model).max_new_tokens


def main_chat(args) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    mode = resolve_mode(args)
    with console.status(f"loading {args.model} ({args.backend}) …"):
        model, tokenizer, path = load_for(args.model, args.backend, mode)
    backend = None
    if args.target:
        with console.status(f"loading the target {args.target} …"):
            backend = target_backend(args, model, tokenizer)
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        gen_kwargs=_gen_kwargs(args, default_max_new=_chat_max_new_tokens(model)),
        seed=args.seed,
        max_context=args.max_context,
        model_name=str(args.model if args.model == str(path) else f"{args.model} → {path}"),
        keep_history=args.history,
        mode=mode,
        backend=backend,
    )
    return run_repl(session, console)


def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 text."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return check_text(data, "stdin")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"stdin is not UTF-8 text ({e.reason} at byte {e.start}); pass UTF-8 text"
        ) from None


def main_generate(args) -> int:
    from rich.console import Console
    from rich.text import Text

    prompt = check_text(args.prompt, "--prompt") if args.prompt is not None else _read_stdin()
    if args.system:
        check_text(args.system, "--system")
    if args.image and args.target:
        raise ValueError("--image with --target is not supported: the target verifies text "
                         "only; drop --target to ask about an image")
    for image in args.image:  # a bad file is refused before the model loads
        load_image(image)
    mode = resolve_mode(args)
    model, tokenizer, path = load_for(args.model, args.backend, mode)
    target = load_target(args.target, tokenizer, args.backend) if args.target else None
    overrides = _to_generation_overrides(_gen_kwargs(args))
    gen = generation_config(model, **overrides)
    images = None
    if args.chat:
        ensure_chat_template(tokenizer, path)
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append(ChatSession.user_message(prompt, args.image, args.image))
        ids, images = prepare_prompt(model, tokenizer, msgs)
    else:
        ids, images = prepare_prompt(model, tokenizer, [int(t) for t in tokenizer.encode(prompt)], args.image)
    backend = make_backend(model)
    if target is None:
        limit = min(args.max_context or backend.max_context, backend.max_context)
        check_context(len(ids), gen, backend.canvas_length, limit,
                      "shorten the prompt or lower --max-new-tokens")
        run_mode = {} if mode == "reference" else {"mode": mode}
        events = backend.stream_generate(tokenizer, ids, None, None, args.seed, dict(overrides, **run_mode),
                                         images=images)
    else:
        events = _speculative_events(args, model, tokenizer, target, ids, overrides, mode)

    err = Console(stderr=True, highlight=False)
    summary = None
    # Drafts only on a terminal, and no stdout redirection: the text goes to stdout.
    steps = args.draft_steps if target is not None else gen.max_denoising_steps
    live = LiveCanvas(err, tokenizer, steps, redirect_stdout=False,
                      redirect_stderr=False) if args.verbose and sys.stderr.isatty() else None
    with live or contextlib.nullcontext():
        for ev in events:
            if isinstance(ev, Draft) and live is not None:
                live.draft(ev)
            elif isinstance(ev, Commit):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, Summary):
                summary = ev
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and summary is not None:
        err.print(Text(summary_line(summary, None, summary.prompt_time), style="dim"), soft_wrap=True)
    return 0


def _speculative_events(args, model, tokenizer, target, ids, overrides, mode):
    """The target's output with `model` drafting (speculative.py), from the CLI flags."""
    from .speculative import speculative_stream_generate

    kw = dict(overrides)
    kw.pop("max_denoising_steps", None)  # --draft-steps sets the drafter's steps
    max_new = kw.pop("max_new_tokens", generation_config(model).max_new_tokens)
    return speculative_stream_generate(
        target[0], target[1], model, tokenizer, ids, k=args.draft_tokens, draft_steps=args.draft_steps,
        adaptive_k=args.adaptive_k, temperature=args.target_temp, max_new_tokens=max_new, seed=args.seed, mode=mode,
        max_context=args.max_context, **kw)
