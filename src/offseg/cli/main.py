"""`offseg` command line. Each sub-command lives in its own module of this package and exposes
`register(subparsers)`, which adds its parser with `set_defaults(run=callable)`; modules are
found automatically, so adding a command is adding a file. Modules named `_*` hold what several
commands share."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path


def command_modules() -> list[str]:
    """Names of the sub-command modules of this package, alphabetically."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(Path(__file__).parent)])
        if m.name != "main" and not m.name.startswith("_")
    )


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="offseg", description="Offset Learning for efficient semantic segmentation.")
    parser.add_argument("--version", action="version", version=f"offseg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f".{name}", __package__).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    import torch

    # Every command: subnormal floats slow trained models' CPU arithmetic several-fold (see
    # benchmarks/bench_denormals.py); flushing them to zero only changes values below 1.2e-38.
    torch.set_flush_denormal(True)
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, ValueError, KeyError) as err:
        # Bad input is reported in one line naming what is wrong, not as a traceback.
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"offseg {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
