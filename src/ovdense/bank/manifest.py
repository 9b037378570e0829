"""The bank's region-id registry (the authors' manifest): which image and mask region each id is.

``manifests/{bank}.images.tsv`` holds ``{stem}\\t{start_id}\\t{num_regions}`` per image, in arrival order, with each
image's ids contiguous; ``manifests/{bank}.manifest.txt`` holds one line per id, ``{stem}#{idx}``, idx following the
ascending non-zero values of the image's mask (:func:`region_values`). Ids never change: new images are appended.

The images.tsv is the commit record. :func:`append_images` replaces the manifest first and the tsv second, each
atomically, so after a kill -9 the pair reads as before or after the append: a manifest longer than the tsv (killed
between the two renames) is read with its extra lines ignored, with a warning, and the next append drops them.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import InvalidArgumentError, OvdenseError
from ..fileio import write_atomic_durable
from .layout import BankLayout

__all__ = ["ImageEntry", "append_images", "read_manifest", "region_count", "region_values", "total_regions"]


class ImageEntry(NamedTuple):
    """One registered image: its file stem, its first region id and its number of regions (ids start..start+count-1)."""

    stem: str
    start: int
    count: int


def total_regions(images: list[ImageEntry]) -> int:
    """The number of region ids the images take (= the next free id)."""
    return images[-1].start + images[-1].count if images else 0


def _expected_lines(entry: ImageEntry) -> str:
    return "".join(f"{entry.stem}#{i}\n" for i in range(entry.count))


def _parse_tsv(path: Path) -> list[ImageEntry]:
    entries: list[ImageEntry] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line:
            continue  # the authors' reader skips blank lines too
        parts = line.split("\t")
        try:
            stem, start, count = parts[0], int(parts[1]), int(parts[2])
            if len(parts) != 3 or not stem:
                raise ValueError
        except (ValueError, IndexError):
            raise OvdenseError(f"{path}:{lineno}: expected 'stem<TAB>start_id<TAB>num_regions', got {line!r}") from None
        expected = total_regions(entries)
        if start != expected:
            raise OvdenseError(
                f"{path}:{lineno}: image {stem!r} starts at id {start}, expected {expected} (ids must be contiguous)"
            )
        if count <= 0:
            raise OvdenseError(f"{path}:{lineno}: image {stem!r} has {count} regions (a registered image has 1+)")
        if stem in seen:
            raise OvdenseError(f"{path}:{lineno}: image {stem!r} is registered twice")
        seen.add(stem)
        entries.append(ImageEntry(stem, start, count))
    return entries


def _scan(layout: BankLayout) -> tuple[list[ImageEntry], int]:
    """The registered images, checked against the manifest, and the number of manifest lines past the last one."""
    tsv, manifest = layout.images_tsv, layout.manifest
    entries = _parse_tsv(tsv) if tsv.exists() else []
    if not manifest.exists():
        if entries:
            raise OvdenseError(f"{manifest} is missing but {tsv} registers {len(entries)} images")
        return [], 0
    if not tsv.exists() and manifest.stat().st_size:
        raise OvdenseError(f"{tsv} is missing but {manifest} lists regions")
    total = total_regions(entries)
    with open(manifest, encoding="utf-8") as f:
        for entry in entries:
            expected = _expected_lines(entry)
            got = f.read(len(expected))
            if got == expected:
                continue
            got_lines, want = got.splitlines(), expected.splitlines()
            for i, (a, b) in enumerate(zip(got_lines, want, strict=False)):
                if a != b:
                    raise OvdenseError(
                        f"{manifest} line {entry.start + i + 1} is {a!r} but {tsv.name} says {b!r} (region id "
                        f"{entry.start + i}): the manifest and images.tsv disagree"
                    )
            lines = entry.start + len(got_lines)
            raise OvdenseError(f"{manifest} has {lines} lines but {tsv.name} registers {total} regions")
        extra = len(f.read().splitlines())
    if extra:
        warnings.warn(
            f"{manifest} has {extra} lines past the {total} regions of {tsv.name} (an interrupted append); they "
            "are ignored and dropped by the next append",
            stacklevel=3,
        )
    return entries, extra


def read_manifest(layout: BankLayout) -> list[ImageEntry]:
    """The bank's registered images in id order, after checking that images.tsv and manifest.txt agree line by line.

    Returns ``[]`` when neither file exists yet.

    Raises:
        OvdenseError: one line naming the file and line: a malformed or non-contiguous tsv line, a stem registered
            twice, a manifest line that is not ``{stem}#{idx}`` of the tsv, a manifest shorter than the tsv's regions,
            or one of the two files missing.
    """
    return _scan(layout)[0]


def append_images(layout: BankLayout, entries: list[tuple[str, int]]) -> list[ImageEntry]:
    """Register new images at the end of the bank, ``(stem, num_regions)`` each, in the order given.

    The authors' builder passes the new stems sorted; images with 0 regions are not registered (as theirs: an
    all-background mask yields no region). Crash-safe (see the module doc); one writer at a time.

    Returns:
        The newly registered images with their ids (images with 0 regions left out).

    Raises:
        InvalidArgumentError: a stem is empty or holds a tab or line break, a count is negative, or a stem is
            already registered or given twice.
        OvdenseError: the existing manifest is inconsistent (:func:`read_manifest`).
    """
    old, extra = _scan(layout)
    known = {e.stem for e in old}
    next_id = total_regions(old)
    new: list[ImageEntry] = []
    for stem, count in entries:
        if not isinstance(stem, str) or not stem or any(c in stem for c in "\t\n\r"):
            raise InvalidArgumentError(f"append_images: stem {stem!r} is empty or holds a tab or line break")
        count = int(count)
        if count < 0:
            raise InvalidArgumentError(f"append_images: image {stem!r} has a negative region count {count}")
        if stem in known:
            raise InvalidArgumentError(f"append_images: image {stem!r} is already registered in bank {layout.name!r}")
        known.add(stem)
        if count:
            new.append(ImageEntry(stem, next_id, count))
            next_id += count
    if not new:
        return []
    layout.manifest.parent.mkdir(parents=True, exist_ok=True)

    def write_manifest(f) -> None:
        if layout.manifest.exists() and not extra:
            with open(layout.manifest, "rb") as src:  # the old lines as they are: no 50 MB regenerated
                shutil.copyfileobj(src, f, 1 << 22)
        else:  # none yet, or an interrupted append's lines to drop
            for entry in old:
                f.write(_expected_lines(entry).encode("utf-8"))
        for entry in new:
            f.write(_expected_lines(entry).encode("utf-8"))

    def write_tsv(f) -> None:
        f.write("".join(f"{e.stem}\t{e.start}\t{e.count}\n" for e in (*old, *new)).encode("utf-8"))

    write_atomic_durable(layout.manifest, write_manifest)  # first: a longer manifest alone reads as "before"
    write_atomic_durable(layout.images_tsv, write_tsv)  # the commit
    return new


def region_values(mask: np.ndarray) -> np.ndarray:
    """The mask values that are regions, in region-idx order.

    Args:
        mask: int [H, W] (0 = no region; every other value is one region, -1 included, as the authors' builder) or
            a bool [R, H, W] stack (one region per channel).

    Returns:
        [H, W] input: the non-zero unique values, ascending; [R, H, W] input: ``arange(R)`` (channel indices).
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        return np.arange(mask.shape[0])
    if mask.ndim != 2:
        raise InvalidArgumentError(f"mask: expected [H, W] int or [R, H, W] bool, got shape {tuple(mask.shape)}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        raise InvalidArgumentError(f"mask: expected integer values, got dtype {mask.dtype}")
    values = np.unique(mask)
    return values[values != 0]


def region_count(mask: np.ndarray) -> int:
    """The number of regions of a mask, the authors' rule: non-zero unique values of [H, W], dim 0 of [R, H, W]."""
    return int(len(region_values(mask)))
