"""The command line's edge: the flags `chat`, `generate` and `serve` share, their
argparse types, the flags' settings under `resolve`'s names (`flag_changes`), and
loading what they name (the model, a `--target` to draft for). No REPL and no rich
here: the server builds on this module, never on commands.py.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict

from ..generation.settings import SEED_MAX, defaults, parse_number, parse_seed, parse_temp
from ..models.config import GenerationConfig
from ..models.paths import DEFAULT_MODEL, resolve_model_path

# Speculative defaults, measured on the toy models (BENCHMARKS.md, "Speculative drafting").
DRAFT_TOKENS = 8
DRAFT_STEPS = 1
CHAT_MAX_NEW_TOKENS = 1024


def flag_type(parse: Callable[[str], Any], name: str) -> Callable[[str], Any]:
    """An argparse type from a parser that raises ValueError: argparse then prints
    `argument --flag: <the message>` and exits 2, instead of a traceback later."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name
    return convert


def setting_type(name: str, kind: type):
    """A flag for one GenerationConfig field, held to the same rules as /set and the API."""

    def parse(text: str):
        value = parse_number(name, kind, text)
        GenerationConfig(**{name: value})
        return value

    return flag_type(parse, name)


def positive_int(text: str) -> int:
    value = parse_number("the value", int, text)
    if value < 1:
        raise ValueError(f"must be an integer >= 1 (got {text!r})")
    return value


def _temp(text: str) -> str:
    t_min, t_max = parse_temp(text)
    GenerationConfig(t_min=t_min, t_max=t_max)
    return text


def _seed(text: str) -> int:
    seed = parse_seed(text)
    if seed is None:
        raise ValueError(f"seed must be an integer from 0 to {SEED_MAX} (got {text!r})")
    return seed


def _target_temp(text: str) -> float:
    value = parse_number("the temperature", float, text)
    if not value >= 0:
        raise ValueError(f"must be a temperature >= 0 (got {text!r})")
    return value


def add_model_args(p: argparse.ArgumentParser, mode_help: str) -> None:
    """--model, --backend, --mode and --max-context, as every generating command has them."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="model directory, Hugging Face id or LM Studio / "
                   f"packaged model name (default {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=("mlx", "torch"), default="mlx",
                   help="mlx (default) or the torch reference path")
    p.add_argument("--mode", choices=("reference", "fast"), default=None, help=mode_help)
    p.add_argument("--max-context", type=flag_type(positive_int, "max_context"), default=None,
                   help="context limit in tokens (default: the model's)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The generation flags of `chat` and `generate`."""
    add_model_args(p, "reference (default: the released sampler, token-exact) or fast (fast.py: confident "
                   "positions frozen, no renoising, top-K sampling and self-conditioning; the default with --target)")
    p.add_argument("--max-new-tokens", type=setting_type("max_new_tokens", int), default=None,
                   help="tokens per reply (default: chat 1024, or the checkpoint's for small-context models; "
                   "generate the checkpoint's)")
    p.add_argument("--steps", type=setting_type("max_denoising_steps", int), default=None,
                   help="denoising steps per canvas (default: the checkpoint's, 48)")
    p.add_argument("--temp", type=flag_type(_temp, "temp"), default=None, metavar="A-B",
                   help="temperature range t_min-t_max (e.g. 0.4-0.8) or one value")
    p.add_argument("--entropy-bound", type=setting_type("entropy_bound", float), default=None,
                   help="acceptance entropy bound (default 0.1)")
    p.add_argument("--seed", type=flag_type(_seed, "seed"), default=None, help="random seed")
    p.add_argument("--system", default=None, help="system prompt")
    add_target_args(p)


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, metavar="MODEL",
                   help="an autoregressive Gemma 4 (mlx-lm model directory or Hugging Face id): its "
                   "output, with this model drafting blocks of tokens (speculative decoding)")
    p.add_argument("--draft-tokens", type=flag_type(positive_int, "draft_tokens"), default=DRAFT_TOKENS,
                   help=f"with --target: tokens the drafter proposes per round (default {DRAFT_TOKENS})")
    p.add_argument("--draft-steps", type=flag_type(positive_int, "draft_steps"), default=DRAFT_STEPS,
                   help=f"with --target: denoising steps per proposal (default {DRAFT_STEPS})")
    p.add_argument("--target-temp", type=flag_type(_target_temp, "target_temp"), default=0.0,
                   help="with --target: the target's sampling temperature (default 0: greedy)")
    p.add_argument("--adaptive-k", action="store_true",
                   help="with --target: size each block from the last round (two more drafts after a "
                   "fully kept block, one fewer otherwise, up to --draft-tokens)")


def resolve_mode(args) -> str:
    """--mode as given, else fast with --target (drafting wants few steps) and reference
    without."""
    if args.mode is not None:
        return args.mode
    return "fast" if getattr(args, "target", None) else "reference"


def flag_changes(args) -> Dict[str, Any]:
    """The flags' settings under `resolve`'s names: the mode, --max-new-tokens, --steps,
    --temp A-B, --entropy-bound, --seed, and with --target its temperature and our
    model's steps per proposal (--draft-steps)."""
    out: Dict[str, Any] = {"mode": resolve_mode(args)}
    for flag, name in (("max_new_tokens", "max_new_tokens"), ("steps", "max_denoising_steps"),
                       ("entropy_bound", "entropy_bound"), ("seed", "seed")):
        if getattr(args, flag, None) is not None:
            out[name] = getattr(args, flag)
    if getattr(args, "temp", None) is not None:
        out["t_min"], out["t_max"] = parse_temp(args.temp)
    if getattr(args, "target", None):
        out["max_denoising_steps"] = args.draft_steps
        out["target_temperature"] = args.target_temp
    return out


def chat_max_new_tokens(model, backend) -> int:
    """Replies of up to 1024 tokens (the release's 256 is a single canvas), unless the
    model's context is small (the toy models): then the checkpoint's own default."""
    if backend.max_context >= 16 * CHAT_MAX_NEW_TOKENS:
        return CHAT_MAX_NEW_TOKENS
    return defaults(model).gen.max_new_tokens


# -- loading ----------------------------------------------------------------------------------


def load_for(model_arg: str, backend: str, mode: str = "reference"):
    """(model, tokenizer, resolved path) for a --model value and backend."""
    if backend == "torch" and mode != "reference":
        raise ValueError("--mode fast runs on the MLX backend only; drop --backend torch")
    path = resolve_model_path(model_arg, prefer="hf" if backend == "torch" else "mlx")
    if backend == "torch":
        try:
            from ..torch_backend import load as torch_load
        except ImportError as e:
            raise ValueError(
                f"--backend torch needs PyTorch and transformers ({e}): pip install torch "
                "transformers, or use --backend mlx"
            ) from None

        model, tokenizer = torch_load(path)
    else:
        from ..models.distributed import launched_group
        from ..models.loader import load

        model, tokenizer = load(path, group=launched_group())
    if tokenizer is None:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return model, tokenizer, path


def target_backend(args, model, tokenizer):
    """The chat backend that drafts for `--target` (loaded and checked here), from the
    command line's speculative flags (chat and serve)."""
    from .backends import SpeculativeBackend

    target, target_tokenizer = load_target(args.target, tokenizer, args.backend)
    return SpeculativeBackend(model, target, target_tokenizer, k=args.draft_tokens, adaptive_k=args.adaptive_k)


def load_target(target_arg: str, tokenizer, backend: str = "mlx"):
    """(target model, its tokenizer) from mlx-lm, checked against our model's tokenizer."""
    if backend != "mlx":
        raise ValueError("--target runs on the MLX backend only; drop --backend torch")
    from mlx_lm import load as mlx_lm_load

    from ..generation.speculative import check_tokenizers
    from ..models.checkpoint import first_line

    try:
        target, target_tokenizer = mlx_lm_load(target_arg)
    except Exception as e:  # mlx-lm's errors vary by what is missing
        raise ValueError(f"cannot load the target {target_arg!r} with mlx-lm ({first_line(e)}); pass an "
                         "mlx-lm model directory or Hugging Face id of an autoregressive Gemma 4") from None
    check_tokenizers(target_tokenizer, tokenizer)
    return target, target_tokenizer
