"""``python -m ovdense``: the command line (:mod:`ovdense.cli`); the package's start-up guard is in place."""

import sys

from .cli import main

sys.exit(main())
