"""Declared ranges of numeric settings: one declaration, checked the same way in Python and on the command line.

Every numeric setting (a :class:`~ovdense.presets.Preset` field, a head's option, a ``Segmenter`` argument, a
training field, a command-line number) declares a :class:`Range` beside its definition. :func:`check` refuses
a value outside it with one line that names the setting; the command line checks its flags with the same
declaration while it parses (:func:`flag_type`), so nonsense (NaN, infinities, negative sizes, probabilities
above 1) stops before anything loads.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from .errors import InvalidArgumentError

__all__ = [
    "CELL_HEIGHT",
    "COUNT",
    "FRACTION",
    "NON_NEGATIVE",
    "POSITIVE",
    "POSITIVE_INT",
    "Range",
    "check",
    "flag_type",
]


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: finite numbers between ``low`` and ``high`` (None: unbounded).

    Attributes:
        low, high: the bounds.
        low_open, high_open: ``low`` (``high``) itself is refused (a strict ``>``, ``<``).
        integer: only integers (bools are refused).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def contains(self, value) -> bool:
        """Whether ``value`` is accepted."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        """In words: ``an integer >= 1``, ``a finite number in [0, 1]``, ``a finite number > 0``."""
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"{kind} in {left}{_num(self.low)}, {_num(self.high)}{right}"
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        return " ".join([kind, " and ".join(parts)]) if parts else kind


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


#: Common declarations.
POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
POSITIVE_INT = Range(1, integer=True)
COUNT = Range(0, integer=True)
#: The height of a cell of an attention grid (:func:`ovdense.viz.attention_grid`), in pixels: room for its title.
CELL_HEIGHT = Range(16, integer=True)


def check(name: str, value, rng: Range, optional: bool = False):
    """``value`` when ``rng`` accepts it (None too with ``optional``); ints stay ints.

    Raises:
        InvalidArgumentError: ``"<name> must be <range>, got <value>"``.
    """
    if value is None and optional:
        return None
    if not rng.contains(value):
        raise InvalidArgumentError(f"{name} must be {rng.describe()}, got {value!r}")
    return int(value) if rng.integer else value


def flag_type(name: str, rng: Range):
    """An argparse ``type=`` that reads a flag's text as a number and checks it with ``rng``: the flag's error is
    :func:`check`'s message (``short_side must be an integer >= 1, got 0``)."""

    def parse(text: str):
        try:
            value = int(text) if rng.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {rng.describe()}, got {text!r}") from None
        try:
            return check(name, value, rng)
        except InvalidArgumentError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name  # argparse names the type in some messages
    parse.range = rng  # the declaration, for the tests and the range table
    return parse
