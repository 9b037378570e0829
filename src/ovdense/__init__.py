"""ovdense: dense open-vocabulary perception with CLIP.

>>> from ovdense import Segmenter
>>> seg = Segmenter.from_pretrained("ViT-B-16", pretrained="openai", method="sclip")  # doctest: +SKIP
>>> seg.set_image("photo.jpg")  # doctest: +SKIP
>>> seg.predict("sky; person, person in shirt; tree").overlay().save("overlay.png")  # doctest: +SKIP

``import ovdense`` is light: torch, open_clip and timm load on first use of a name that needs them.
"""

from __future__ import annotations

# First: a Ctrl-C while the command line starts is one line, not a traceback (only when ovdense is the program).
from .startup import guard_startup, run_as_program

if run_as_program():
    guard_startup()

import importlib  # noqa: E402

from .errors import OvdenseError  # noqa: E402
from .methods import list_methods  # noqa: E402

__version__ = "0.1.0"

# Public names that need torch/open_clip, resolved on first access (PEP 562).
_LAZY = {
    "SegmentationResult": "predictor",
    "Segmenter": "predictor",
    "list_models": "weights",
}

__all__ = ["OvdenseError", "SegmentationResult", "Segmenter", "list_methods", "list_models"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
