"""The `dsas` command: fit a steering, generate with it, evaluate, sweep the strength.

    dsas fit --model MODEL --prompt-set assets/prompts/banana --out no-banana
    dsas generate --steering no-banana --prompt "a banana on the beach" --compare --out gen
    dsas eval gen --prompt-set assets/prompts/banana
    dsas sweep --steering no-banana --prompt-set assets/prompts/banana --alphas 0.5,1,2 --out sweep

`python -m dsas_diffusion ...` is the same command; `accelerate launch -m dsas_diffusion ...`
splits the prompts of fit / generate / eval / sweep between processes.
Each subcommand lives in its own module and imports its heavy dependencies only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import evaluate, fit, generate, sweep
from .common import CLIError

ERRORS = (CLIError, ValueError, OSError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="dsas", description="Dynamically Scaled Activation Steering for Stable Diffusion: fit, generate, eval, "
                                 "sweep. Run `dsas COMMAND --help` for the options of a command.")
    parser.add_argument("--version", action="version", version=f"dsas-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (fit, generate, evaluate, sweep):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 a user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print(f"dsas {args.command}: interrupted; what was finished is kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    except ERRORS as e:
        if os.environ.get("DSAS_DEBUG"):
            raise
        hint = "" if isinstance(e, CLIError) else " (set DSAS_DEBUG=1 for the traceback)"
        print(f"dsas {args.command}: error: {e}{hint}", file=sys.stderr)
        return 2


__all__ = ["main", "build_parser", "CLIError"]
