"""Command line: ``ovdense segment | attention | demo | eval | eval-regions | train | convert | list-...``.

Bad input (missing image, empty class list, unknown model, corrupt checkpoint, CUDA without CUDA, an ``--out``
that cannot be written...) prints one line on stderr and exits 2, before anything is written to ``--out``.
Warnings are one line each (``ovdense: warning: ...``). Each command is a module of this package with
``register(subparsers)`` (its subparser, flags and help) and the function that runs it; the flag groups and
helpers several commands share are in :mod:`ovdense.cli.common`. The command modules import torch, open_clip
and timm only inside the commands that need them, so ``--help``, ``list-methods`` and argument errors answer at
once.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..errors import OvdenseError, RandomWeightsWarning
from . import attention, convert, demo, eval, eval_regions, lists, segment, train

__all__ = ["EXIT_USAGE", "build_parser", "main"]

EXIT_USAGE = 2

#: The command modules, in the order ``ovdense --help`` lists their commands.
COMMANDS = (segment, attention, demo, eval, eval_regions, convert, train, lists)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovdense", description="Dense open-vocabulary perception with CLIP.")
    parser.add_argument("--version", action="version", version=f"ovdense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"ovdense: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        # The command prints its own banner for random test models.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:
            return args.func(args)
        except OvdenseError as err:
            print(f"ovdense: error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("ovdense: interrupted", file=sys.stderr)
            return 130
