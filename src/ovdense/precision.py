"""One mixed-precision policy for inference and training: ``auto`` (fp16 on CUDA, fp32 elsewhere), ``fp32``,
``fp16`` (CUDA only), ``bf16``."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from .errors import OvdenseError

if TYPE_CHECKING:  # the CLI reads PRECISIONS without loading torch
    import torch

__all__ = ["PRECISIONS", "amp_dtype", "autocast", "check_precision"]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """A one-line :class:`OvdenseError` for an unknown precision or fp16 without CUDA."""
    if precision not in PRECISIONS:
        raise OvdenseError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        raise OvdenseError("fp16 autocast needs a GPU; on the CPU use --precision bf16 or fp32")


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None for full fp32.

    ``auto`` on CUDA is fp16, the precision every reference runs the image tower in (and DeCLIP trains with).
    """
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(precision: str, device: torch.device):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    import torch

    dtype = amp_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
