"""The `chat` and `generate` commands: their flags (options.py holds those `serve`
shares), and the bodies. The REPL itself is repl.py; `generate` writes the text to
stdout and the same live canvas to a terminal's stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Optional

from ..generation.events import Commit, Draft, Summary
from ..generation.prompt import prepare_prompt
from ..generation.settings import check_reserve, context_limit, defaults, resolve
from ..images.load import load_image
from ..images.processor import user_message
from ..models.tokenizer import check_text, ensure_chat_template, min_tokens
from .backends import make_backend
from .options import add_generation_args, chat_max_new_tokens, flag_changes, flag_type, load_for, target_backend
from .repl import LiveCanvas, run_repl, summary_line
from .session import ChatSession


def add_chat_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_generation_args(p)
    p.add_argument(
        "--no-history",
        dest="history",
        action="store_false",
        help="send every message as a fresh conversation (for single-turn models such as toy-sudoku)",
    )
    return p


def add_generate_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_generation_args(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt (default: read stdin)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=True,
                      help="apply the chat template (default)")
    mode.add_argument("--raw", dest="chat", action="store_false", help="encode the prompt as is")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image to go with the prompt (repeatable; before the text with the chat "
                   "template; with --raw the prompt marks where each goes with <|image|>)")
    p.add_argument("--suffix", default=None, metavar="TEXT",
                   help="write the middle before TEXT (infill): the reply ends with TEXT (with --raw: the "
                   "prompt is the text before the middle); stdout gets the middle")
    p.add_argument("--reply-prefix", default=None, metavar="TEXT",
                   help="with --suffix and the chat template: the reply starts with TEXT")
    p.add_argument("--infill-lengths", type=flag_type(_lengths_arg, "infill_lengths"), default=None,
                   metavar="N|A-B|A,B,...", help="with --suffix: the middle's candidate lengths in tokens "
                   "(default: 4, 8, 16, ... up to what fits, then around the best)")
    p.add_argument("--truncate-suffix", action="store_true",
                   help="with --suffix: keep the head of a suffix too long for the canvas")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="live drafts and a summary on stderr (drafts only on a terminal)")
    return p


def _lengths_arg(text: str):
    """--infill-lengths: N, A-B or A,B,..."""
    try:
        if "-" in text:
            a, b = (int(x) for x in text.split("-", 1))
            values = list(range(a, b + 1))
        else:
            values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"must be N, A-B or A,B,... token counts (got {text!r})") from None
    if not values or min(values) < 1:
        raise ValueError(f"must be token counts >= 1 (got {text!r})")
    return values


def main_chat(args) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    changes = flag_changes(args)
    with console.status(f"loading {args.model} ({args.backend}) …"):
        model, tokenizer, path = load_for(args.model, args.backend, changes["mode"])
    backend = None
    if args.target:
        with console.status(f"loading the target {args.target} …"):
            backend = target_backend(args, model, tokenizer)
    backend = backend or make_backend(model)
    changes.setdefault("max_new_tokens", chat_max_new_tokens(model, backend))
    session = ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_context=args.max_context,
        model_name=str(args.model if args.model == str(path) else f"{args.model} → {path}"),
        keep_history=args.history,
        backend=backend,
        **changes,
    )
    return run_repl(session, console)


def _read_stdin() -> str:
    """The prompt from stdin, which must be UTF-8 text. One trailing newline is dropped
    (as the shell's `$(...)` drops it): `echo TEXT | generate` asks what `--prompt TEXT`
    asks, not TEXT and a newline."""
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        text = check_text(data, "stdin")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"stdin is not UTF-8 text ({e.reason} at byte {e.start}); pass UTF-8 text"
            ) from None
    for end in ("\r\n", "\n"):
        if text.endswith(end):
            return text[: -len(end)]
    return text


def main_generate(args) -> int:
    from rich.console import Console
    from rich.text import Text

    prompt = check_text(args.prompt, "--prompt") if args.prompt is not None else _read_stdin()
    if args.system:
        check_text(args.system, "--system")
    if args.image and args.target:
        raise ValueError("--image with --target is not supported: the target verifies text "
                         "only; drop --target to ask about an image")
    _check_infill_args(args)
    for image in args.image:  # a bad file is refused before the model loads
        load_image(image)
    changes = flag_changes(args)
    model, tokenizer, path = load_for(args.model, args.backend, changes["mode"])
    backend = target_backend(args, model, tokenizer) if args.target else make_backend(model)
    settings = resolve(defaults(model), backend=backend.name, **changes)
    err = Console(stderr=True, highlight=False)
    limit, note = context_limit(args.max_context, backend.max_context)
    if note:
        err.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    # A prompt far over the context is refused before it is tokenized (tokenizing a huge
    # text takes long and much memory); the template's own tokens only add to it.
    fix = "shorten the prompt or lower --max-new-tokens"
    reserve = (settings.gen.max_new_tokens + args.draft_tokens if args.target
               else settings.reserve(backend.canvas_length))
    check_reserve(min_tokens(tokenizer, prompt.strip()), reserve, limit, fix, at_least=True)
    if args.chat:
        ensure_chat_template(tokenizer, path)
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append(user_message(prompt, args.image, args.image))
        ids, images = prepare_prompt(model, tokenizer, msgs)
    else:
        ids, images = prepare_prompt(model, tokenizer, [int(t) for t in tokenizer.encode(prompt)], args.image)
    if args.suffix is not None:
        events = backend.stream_infill(tokenizer, ids, args.suffix, None, settings,
                                       reply_prefix=(args.reply_prefix or "") if args.chat else None,
                                       lengths=args.infill_lengths, truncate_suffix=args.truncate_suffix)
    else:
        check_reserve(len(ids), reserve, limit, fix)
        events = backend.stream_generate(tokenizer, ids, None, settings, images=images)
    # Drafts only on a terminal, and no stdout redirection: the text goes to stdout.
    live = LiveCanvas(err, tokenizer, settings.gen.max_denoising_steps, redirect_stdout=False,
                      redirect_stderr=False) if args.verbose and sys.stderr.isatty() else None
    summary = _write_reply(events, live)
    if args.verbose and summary is not None:
        err.print(Text(summary_line(summary, None, summary.prompt_time), style="dim"), soft_wrap=True)
    return 0


def _check_infill_args(args) -> None:
    if args.suffix is None:
        if args.reply_prefix is not None or args.infill_lengths is not None or args.truncate_suffix:
            raise ValueError("--reply-prefix, --infill-lengths and --truncate-suffix go with --suffix")
        return
    check_text(args.suffix, "--suffix")
    if not args.suffix:
        raise ValueError("--suffix needs some text; without one, drop --suffix")
    if args.target or args.image:
        raise ValueError("--suffix works without --target and --image: the middle is written in one "
                         "canvas of this model, from text")
    if args.reply_prefix is not None and not args.chat:
        raise ValueError("--reply-prefix goes with the chat template; with --raw the prompt is the prefix")


def _write_reply(events, live: Optional[LiveCanvas]) -> Optional[Summary]:
    """The reply to stdout as each canvas commits, then a newline; the Summary. With the
    live view on, only whole lines go out while it shows, each with the view taken off
    the screen first (on a terminal stdout and stderr share the screen, and the view's
    redraws would erase text written under it); the line in progress shows above the
    canvas and goes out at the end."""
    from rich.text import Text

    summary, pending = None, ""
    with live or contextlib.nullcontext():
        for ev in events:
            if isinstance(ev, Draft) and live is not None:
                live.draft(ev, live.head)
            elif isinstance(ev, Commit) and live is None:
                _out(ev.text)
            elif isinstance(ev, Commit):
                pending += ev.text
                if "\n" in pending:
                    done, pending = pending.rsplit("\n", 1)
                    with live.paused():
                        _out(done + "\n")
                live.lines = ()
                live.show((Text(pending),) if pending else ())
            elif isinstance(ev, Summary):
                summary = ev
    _out(pending + "\n")
    return summary


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
