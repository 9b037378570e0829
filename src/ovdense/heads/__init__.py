"""Training-free dense heads, one file per method, each registered by name (:mod:`ovdense.methods`).

Build one with :func:`ovdense.methods.create_head`; the contract every head meets is :mod:`ovdense.heads.base`.
"""

from __future__ import annotations

from .base import Branches, DenseHead, HeadOutput, PassContext, PassInputs, TextQuery

__all__ = ["Branches", "DenseHead", "HeadOutput", "PassContext", "PassInputs", "TextQuery"]
