"""The `chat` and `generate` commands: their flags (shared with `serve` where they
mean the same), loading the model (and a `--target` to draft for), and the bodies. The
REPL itself is repl.py; `generate` writes the text to stdout and the same live canvas to
a terminal's stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any, Callable, Dict, Optional

from .backends import make_backend
from .config import SEED_MAX, GenerationConfig
from .drafter import (Commit, Draft, Summary, check_context, check_reserve, context_limit, generation_config,
                      reserved_tokens)
from .images import load_image, prepare_prompt
from .paths import DEFAULT_MODEL, resolve_model_path
from .repl import LiveCanvas, run_repl, summary_line
from .session import (
    SETTING_ALIASES,
    ChatSession,
    check_text,
    ensure_chat_template,
    parse_number,
    parse_seed,
    parse_temp,
)
from .templates import min_tokens


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
                   "confident positions frozen, no renoising, top-K sampling and self-conditioning; "
                   "the default with --target)")


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
        from .distributed import launched_group
        from .loader import load

        model, tokenizer = load(path, group=launched_group())
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
    for image in args.image:  # a bad file is refused before the model loads
        load_image(image)
    mode = resolve_mode(args)
    model, tokenizer, path = load_for(args.model, args.backend, mode)
    target = load_target(args.target, tokenizer, args.backend) if args.target else None
    overrides = _to_generation_overrides(_gen_kwargs(args))
    gen = generation_config(model, **overrides)
    err = Console(stderr=True, highlight=False)
    backend = make_backend(model)
    limit, note = context_limit(args.max_context, backend.max_context)
    if note:
        err.print(Text(f"note: {note}", style="yellow"), soft_wrap=True)
    # A prompt far over the context is refused before it is tokenized (tokenizing a huge
    # text takes long and much memory); the template's own tokens only add to it.
    fix = "shorten the prompt or lower --max-new-tokens"
    reserve = gen.max_new_tokens + args.draft_tokens if target else reserved_tokens(gen, backend.canvas_length)
    check_reserve(min_tokens(tokenizer, prompt.strip()), reserve, limit, fix, at_least=True)
    images = None
    if args.chat:
        ensure_chat_template(tokenizer, path)
        msgs = ([{"role": "system", "content": args.system}] if args.system else [])
        msgs.append(ChatSession.user_message(prompt, args.image, args.image))
        ids, images = prepare_prompt(model, tokenizer, msgs)
    else:
        ids, images = prepare_prompt(model, tokenizer, [int(t) for t in tokenizer.encode(prompt)], args.image)
    if target is None:
        check_context(len(ids), gen, backend.canvas_length, limit, fix)
        run_mode = {} if mode == "reference" else {"mode": mode}
        events = backend.stream_generate(tokenizer, ids, None, None, args.seed, dict(overrides, **run_mode),
                                         images=images)
    else:
        events = _speculative_events(args, model, tokenizer, target, ids, overrides, mode)

    # Drafts only on a terminal, and no stdout redirection: the text goes to stdout.
    steps = args.draft_steps if target is not None else gen.max_denoising_steps
    live = LiveCanvas(err, tokenizer, steps, redirect_stdout=False,
                      redirect_stderr=False) if args.verbose and sys.stderr.isatty() else None
    summary = _write_reply(events, live)
    if args.verbose and summary is not None:
        err.print(Text(summary_line(summary, None, summary.prompt_time), style="dim"), soft_wrap=True)
    return 0


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
