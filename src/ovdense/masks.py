"""Class-agnostic region masks: CorrCLIP's files, painted generator output, and the vote per region.

A *region map* is an H x W integer array at the image's resolution: every value is one region, and the smallest
value is the unsegmented rest (CorrCLIP's convention; ids are otherwise arbitrary).

- :func:`read_region_map`: CorrCLIP's pre-generated masks as published, ``<stem>.npz`` with ``instance_mask``.
- :func:`region_map_for`: the file of an image in a masks folder (``data/region_masks/voc/<stem>.npz``).
- :func:`paint_regions`: K binary masks (a generator's, SAM's) painted as CorrCLIP paints them: in ascending
  area, ids 1..K, larger masks over smaller ones, 0 where no mask falls.
- :func:`vote`: CorrCLIP's map correction: every region but the smallest id takes its most frequent label.

Only numpy here (no torch at import): the command line checks masks folders before any model loads. The online
generator from transformers' SAM is :mod:`ovdense.mask_generators` (extra ``[masks]``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import InvalidArgumentError, OvdenseError

__all__ = [
    "MASK_KEY",
    "MASK_SUBDIRS",
    "as_region_map",
    "load_mask_array",
    "paint_regions",
    "read_region_map",
    "region_map_for",
    "vote",
]

#: The array name inside CorrCLIP's ``.npz`` files.
MASK_KEY = "instance_mask"
#: CorrCLIP's folder per benchmark under ``data/region_masks`` (VOC21/20 share one, and so on).
MASK_SUBDIRS = {
    "voc21": "voc",
    "voc20": "voc",
    "context60": "context",
    "context59": "context",
    "coco_object": "coco",
    "coco_stuff": "coco",
    "cityscapes": "city",
    "ade20k": "ade",
    "ade847": "ade847",  # CorrCLIPv2's instance_mask/ade847
    "context459": "context",  # PC-459 reuses the PASCAL-Context masks (same images)
}


def as_region_map(regions, size: tuple[int, int] | None = None, what: str = "masks") -> np.ndarray:
    """Check a region map: 2-D, integer (or bool), optionally of the image's ``size`` (H, W).

    Returns:
        H x W int64.

    Raises:
        InvalidArgumentError: wrong shape, dtype or size (the message names ``what``).
    """
    arr = np.asarray(regions)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if arr.ndim != 2 or arr.size == 0:
        raise InvalidArgumentError(f"{what}: expected an H x W array of region ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentError(f"{what}: expected integer region ids, got {arr.dtype}")
    if size is not None and tuple(arr.shape) != tuple(size):
        raise InvalidArgumentError(
            f"{what}: region map is {arr.shape[0]} x {arr.shape[1]}, the image {size[0]} x {size[1]}"
        )
    return arr.astype(np.int64)


def load_mask_array(path: str | os.PathLike) -> np.ndarray:
    """The ``instance_mask`` array of a CorrCLIP-style ``.npz`` file, as stored (no shape or dtype check).

    Raises:
        OvdenseError: missing or unreadable file, or no ``instance_mask``; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"mask file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if MASK_KEY not in data.files:
                raise OvdenseError(f"mask file {path} holds no {MASK_KEY!r} array (it has {', '.join(data.files)})")
            return data[MASK_KEY]
    except OvdenseError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise OvdenseError(f"cannot read mask file {path}: {str(err).splitlines()[0] if str(err) else err!r}") from None


def read_region_map(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """A CorrCLIP mask file: ``np.load(path)["instance_mask"]``, H x W int64.

    Args:
        path: the ``.npz`` file.
        size: the image's (H, W): the map must have it (the message names the file).

    Raises:
        OvdenseError: missing or unreadable file, no ``instance_mask``, not an H x W integer array, or not of
            ``size``; every message names the file.
    """
    path = Path(path)
    arr = load_mask_array(path)
    try:
        return as_region_map(arr, size, what=f"mask file {path}")
    except InvalidArgumentError as err:
        raise OvdenseError(str(err)) from None


def region_map_for(masks_dir: str | os.PathLike, image_path: str | os.PathLike, dataset: str | None = None) -> Path:
    """The mask file of an image: ``masks_dir/<sub>/<stem>.npz`` (CorrCLIP's per-benchmark folder, when
    ``dataset`` is given and the folder exists) or ``masks_dir/<stem>.npz``.

    Raises:
        OvdenseError: no such file.
    """
    root = Path(masks_dir)
    stem = Path(image_path).stem
    folders = []
    if dataset is not None and (root / MASK_SUBDIRS.get(dataset, "")).is_dir():
        folders.append(root / MASK_SUBDIRS[dataset])
    folders.append(root)
    for folder in folders:
        if (folder / f"{stem}.npz").is_file():
            return folder / f"{stem}.npz"
    raise OvdenseError(f"no masks for {Path(image_path).name}: {folders[0] / (stem + '.npz')} not found")


def paint_regions(masks, areas=None) -> np.ndarray:
    """Paint K binary masks into one region map as CorrCLIP does: ascending area, ids 1..K, larger on top.

    Args:
        masks: K x H x W bool (a generator's masks, in any order).
        areas: K areas to sort by (default: the masks' pixel counts; SAM reports its own ``area``).

    Returns:
        H x W int64; 0 where no mask falls (the unsegmented rest).
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InvalidArgumentError(f"masks: expected K x H x W, got shape {masks.shape}")
    areas = masks.reshape(len(masks), -1).sum(1) if areas is None else np.asarray(areas)
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for new_id, k in enumerate(np.argsort(areas, kind="stable"), start=1):
        out[masks[k]] = new_id
    return out


def vote(labels: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """CorrCLIP's map correction: in every region except the one with the smallest id, all pixels take the
    region's most frequent label (the smallest label on ties, as ``torch.mode``).

    Args:
        labels: H x W int labels.
        regions: H x W region ids at the same size.

    Returns:
        H x W int64, a new array.
    """
    labels = np.asarray(labels)
    regions = as_region_map(regions, labels.shape, "regions")
    out = labels.astype(np.int64, copy=True)
    values, inverse = np.unique(regions, return_inverse=True)
    inverse = inverse.reshape(regions.shape)
    for index in range(1, len(values)):
        inside = inverse == index
        counts = np.bincount(labels[inside].ravel())
        out[inside] = int(counts.argmax())  # argmax takes the first maximum: the smallest label
    return out
