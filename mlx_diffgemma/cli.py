"""`mlx-diffgemma` command line: chat, generate, serve, convert, quantize, verify, bench.

Each subcommand's arguments and body live in the module that does the work; this file
only dispatches, importing lazily so `mlx-diffgemma --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# What MLX's launchers (mlx.launch, mpirun) set in every process they start.
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# The commands that run a model split over the ranks of such a launch (mirror.py).
SPLIT_COMMANDS = ("chat", "generate", "serve")

# subcommand -> (module, help)
_COMMANDS = {
    "chat": ("mlx_diffgemma.commands", "chat with the model, watching each canvas settle"),
    "generate": ("mlx_diffgemma.commands", "generate a reply to one prompt (for scripts)"),
    "convert": ("mlx_diffgemma.convert", "convert Hugging Face weights to an MLX directory"),
    "quantize": ("mlx_diffgemma.quantize", "re-quantize an existing MLX directory"),
    "verify": ("mlx_diffgemma.verify", "check an MLX directory's files (and logits)"),
    "bench": ("mlx_diffgemma.bench", "measure prefill, denoising step and generation speed"),
    "serve": ("mlx_diffgemma.server", "serve the model over an OpenAI-compatible HTTP API"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="mlx-diffgemma", description="DiffusionGemma on MLX (Apple Silicon)."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = argv[0] if argv and argv[0] in _COMMANDS else None
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:  # only the chosen command's module is imported
            getattr(importlib.import_module(module), f"add_{name}_args")(p)
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:  # a usage error, as argparse's own: the help, on stderr, exit 2
        parser.print_help(sys.stderr)
        print("\nmlx-diffgemma: error: name a command (mlx-diffgemma COMMAND --help says more)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(_COMMANDS[args.command][0])
    body = getattr(module, f"main_{args.command}")
    try:
        if args.command in SPLIT_COMMANDS and any(k in os.environ for k in LAUNCH_ENV):
            # Under mlx.launch: rank 0 runs the command, the others follow it (mirror.py).
            from .mirror import run_split

            return run_split(args, lambda: body(args))
        return body(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as e:
        # Bad input (arguments, files, model directories): one clear line, no traceback.
        message = " ".join(str(e).splitlines())
        print(f"mlx-diffgemma {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
