"""Command line: ``ovdense segment | attention | demo | eval | eval-regions | train | convert | list-...``.

Bad input (missing image, empty class list, unknown model, corrupt checkpoint, CUDA without CUDA, an ``--out``
that cannot be written...) prints one line on stderr and exits 2, before anything is written to ``--out``.
Argument errors (an unknown command, a value outside a closed set, a missing flag, a number that does not
parse) are that same one line, naming the choices and the command's ``--help`` (:class:`OneLineParser`).
Warnings are one line each (``ovdense: warning: ...``). Ctrl-C prints ``ovdense: interrupted`` and exits 130,
also while the command line starts (imports, argument parsing; :mod:`ovdense.startup`). Each command is a module
of this package with ``register(subparsers)`` (its subparser, flags and help) and the function that runs it; the
flag groups and helpers several commands share are in :mod:`ovdense.cli.common`. The command modules import
torch, open_clip and timm only inside the commands that need them, so ``--help``, ``list-methods`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings

from .. import __version__
from ..errors import OvdenseError, RandomWeightsWarning
from ..startup import EXIT_INTERRUPTED, INTERRUPTED, is_guard
from . import attention, bank, convert, demo, detect, eval, eval_det, eval_regions, lists, segment, train

__all__ = ["EXIT_USAGE", "OneLineParser", "build_parser", "main"]

EXIT_USAGE = 2

#: The command modules, in the order ``ovdense --help`` lists their commands.
COMMANDS = (segment, detect, attention, demo, eval, eval_regions, eval_det, convert, bank, train, lists)


#: The namespace attribute naming the command whose arguments were left unrecognised (removed before returning).
_HELP_PROG = "_ovdense_help_prog"


class OneLineParser(argparse.ArgumentParser):
    """argparse with errors as every other error of the command line: one line, exit status 2.

    ``ovdense: error: --method: invalid choice: 'segformer' (choose from 'sclip', 'naclip', ...); see ovdense
    segment --help`` instead of the usage block. Subparsers are of this class too (``add_subparsers`` makes
    its parsers of the parent's class), so every command and sub-command answers so.
    """

    def _check_value(self, action, value):
        # One wording on every Python version (3.12.8 changed argparse's), the choices in it.
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(repr(c) for c in action.choices)
            raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices})")

    def error(self, message: str, prog: str | None = None):
        text = " ".join(str(message).split())
        if text.startswith("argument "):  # "argument --method: ..." -> "--method: ..."
            text = text[len("argument ") :]
        self.exit(EXIT_USAGE, f"ovdense: error: {text}; see {prog or self.prog} --help\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not hasattr(namespace, _HELP_PROG):  # the innermost command that left them
            setattr(namespace, _HELP_PROG, self.prog)
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        prog = getattr(namespace, _HELP_PROG, None)
        if hasattr(namespace, _HELP_PROG):
            delattr(namespace, _HELP_PROG)
        if extras:  # argparse's own check, pointing to the --help of the command they were given to
            self.error(f"unrecognized arguments: {' '.join(extras)}", prog)
        return namespace


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ovdense", description="Dense open-vocabulary perception with CLIP.")
    parser.add_argument("--version", action="version", version=f"ovdense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"ovdense: warning: {text}", file=sys.stderr if file is None else file)


def _silence_stdout() -> None:
    """Point stdout at the null device, so the interpreter's last flush does not fail on the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real stdout (captured, replaced): nothing to redirect
        pass


def main(argv: list[str] | None = None) -> int:
    guard = signal.getsignal(signal.SIGINT)
    guarded = is_guard(guard)  # ovdense runs as the program (ovdense.startup)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            # The command prints its own banner for random test models.
            warnings.simplefilter("ignore", RandomWeightsWarning)
            try:
                if guarded:  # from here on Ctrl-C is a KeyboardInterrupt the commands handle (files kept whole)
                    signal.signal(signal.SIGINT, signal.default_int_handler)
                return args.func(args)
            except OvdenseError as err:
                print(f"ovdense: error: {' '.join(str(err).split())}", file=sys.stderr)
                return EXIT_USAGE
            except KeyboardInterrupt:
                print(INTERRUPTED, file=sys.stderr)
                return EXIT_INTERRUPTED
            except BrokenPipeError:  # `ovdense list-methods | head`: the reader left; nothing more to say
                _silence_stdout()
                return 1
            finally:
                if guarded:  # and quiet again while the program ends
                    signal.signal(signal.SIGINT, guard)
    except KeyboardInterrupt:  # start-up of a caller without the guard (main() called from Python)
        print(INTERRUPTED, file=sys.stderr)
        return EXIT_INTERRUPTED
