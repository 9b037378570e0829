"""Ctrl-C while the command line starts: one line, ``ovdense: interrupted``, exit 130, never a traceback.

Before :func:`ovdense.cli.main` takes over Ctrl-C (a KeyboardInterrupt its commands handle, keeping files whole),
Python is still importing the package and the command line, or parsing the flags; a KeyboardInterrupt there would
print a traceback. So when ovdense runs as the program (the ``ovdense`` script, ``python -m ovdense``,
``python -m ovdense.cli``), the package's first statement puts :func:`interrupted_quietly` in place of Python's
own SIGINT handler. An application or a test that imports ovdense keeps its own Ctrl-C. This module imports
nothing of ovdense: it runs before the rest of the package.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

__all__ = ["EXIT_INTERRUPTED", "INTERRUPTED", "guard_startup", "interrupted_quietly", "is_guard", "run_as_program"]

EXIT_INTERRUPTED = 130
INTERRUPTED = "ovdense: interrupted"


def interrupted_quietly(signum, frame) -> None:
    """The SIGINT handler of start-up (and of the program's last moments): nothing is written yet, or all is,
    so say one line and leave at once."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        if sys.stderr is not None:
            sys.stderr.write(INTERRUPTED + "\n")
            sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPTED)


interrupted_quietly.ovdense_startup_guard = True  # recognisable from outside (the tests watch for it)


def is_guard(handler) -> bool:
    """Whether ``handler`` is :func:`interrupted_quietly`."""
    return handler is interrupted_quietly


def run_as_program() -> bool:
    """Whether this process is ovdense's command line: the console script, or ``-m ovdense[.cli]``."""
    argv = list(getattr(sys, "orig_argv", ()))
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in ("ovdense", "ovdense.cli"):
        return True
    main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return os.path.splitext(os.path.basename(main_file))[0] in ("ovdense", "ovdense-script")


def guard_startup() -> bool:
    """Put :func:`interrupted_quietly` in place of Python's own SIGINT handler (not of anyone else's, and only in
    the main thread). Returns whether the guard is in place."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGINT)
    if is_guard(current):
        return True
    if current is not signal.default_int_handler:  # someone else's handler (or SIGINT ignored): leave it
        return False
    signal.signal(signal.SIGINT, interrupted_quietly)
    return True
