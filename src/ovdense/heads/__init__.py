"""Training-free dense heads, selectable by name."""

from __future__ import annotations

from .base import DenseHead, TextQuery
from .clearclip import ClearClipHead
from .clip import ClipHead
from .corrclip import CorrclipHead
from .declip import DeclipHead
from .maskclip import MaskClipHead
from .naclip import NaclipHead
from .proxyclip import ProxyclipHead
from .resclip import ResclipHead
from .scclip import ScclipHead
from .sclip import SclipHead

HEADS: dict[str, type[DenseHead]] = {
    cls.name: cls
    for cls in (
        ClipHead,
        MaskClipHead,
        SclipHead,
        ClearClipHead,
        NaclipHead,
        DeclipHead,
        ScclipHead,
        ResclipHead,
        ProxyclipHead,
        CorrclipHead,
    )  # fmt: skip
}


def create_head(name: str, **kwargs) -> DenseHead:
    """Build a head by name (a key of :data:`HEADS`)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(HEADS)}")
    return HEADS[name](**kwargs)


__all__ = ["HEADS", "DenseHead", "TextQuery", "create_head"]
