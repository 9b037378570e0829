"""Label PNGs read as stored: the one reader behind the benchmark labels, the converters and COCO panoptic.

Labels are data, not pictures: unlike :func:`ovdense.images.decode_image`, nothing is converted (no palette
lookup, no 16-bit scaling, no EXIF rotation), as mmseg's ``LoadAnnotations`` (Pillow backend, flag
``unchanged``) and panopticapi read them. What a caller does with the values (``reduce_zero_label``, the
RGB-to-id code of COCO panoptic, a converter's lookup table) stays with the caller.

This module imports only numpy and Pillow (:mod:`ovdense.eval.convert` uses it, and the command line imports
that at start-up).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OvdenseError

__all__ = ["read_label_png"]


def read_label_png(path: str | Path, *, rgb: bool = False, what: str = "label") -> np.ndarray:
    """The values a label PNG stores, or a one-line :class:`~ovdense.errors.OvdenseError`.

    Args:
        path: the PNG.
        rgb: ``False``: one channel of class indices (palette indices for ``P`` PNGs, grey values for ``L``
            PNGs, 16-bit grey accepted while its values fit 0..255). ``True``: ids encoded in the colour channels
            (COCO panoptic: ``R + 256 G + 256^2 B``), an 8-bit RGB or RGBA PNG whose alpha is dropped.
        what: how messages name the file (``"label"``, ``"panoptic PNG"``...).

    Returns:
        HxW uint8 (``rgb=False``) or HxWx3 uint8 (``rgb=True``).

    Raises:
        OvdenseError: the file cannot be read, has the wrong channels, or holds values outside 0..255.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, ValueError) as err:
        raise OvdenseError(f"cannot read {what} {path}: {err}") from None
    if rgb:
        if arr.ndim != 3 or arr.shape[2] < 3 or arr.dtype != np.uint8:
            raise OvdenseError(
                f"{what} {path} has shape {arr.shape} and type {arr.dtype}: expected an 8-bit RGB PNG encoding "
                "ids as R + 256*G + 256^2*B"
            )
        return arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise OvdenseError(
            f"{what} {path} has shape {arr.shape}: expected one channel of class indices (palette or grey PNG), "
            "not a colour-coded image"
        )
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise OvdenseError(f"{what} {path} holds values outside 0..255 ({arr.min()}..{arr.max()})")
        arr = arr.astype(np.uint8)
    return arr
