"""``python -m ovdense.cli``, as ``ovdense`` and ``python -m ovdense``."""

import sys

from . import main

sys.exit(main())
