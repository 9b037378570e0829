"""Steps 3 and 4's common loop: stream the images whose rows are missing, extract, write their rows into a slot store.

As the authors' ``process_images_on_gpu`` (``generate_clip_embeddings.py`` l.315-407, ``generate_vfm_embeddings.py``
l.145-237): the work is every registered image with an undone row, in manifest order, shuffled with seed 42
(``random.seed(42); random.shuffle``), and process i of G takes ``work[i::G]``; each writes its rows at their ids,
lock-free (the rows are disjoint). Images are decoded (EXIF applied) in a DataLoader, one at a time: never all in
memory. Rows are committed (:meth:`ovdense.bank.slots.SlotStore.flush`) every ``flush_every`` images and at least
every minute, so a kill loses at most that much work.

A failing image (unreadable file, a mask not of the image's size, a region with no pixel) is counted, named and
skipped: its rows stay undone, the store is not finalized and the build exits non-zero; a rerun retries it. A mask
whose region count no longer matches the manifest (masks changed after registration) stops the build with one
line: the manifest's ids would no longer mean those regions.
"""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import OvdenseError, first_line

__all__ = ["WorkItem", "fill_store", "work_list"]

#: Failures named one by one (the rest are counted).
_NAMED_FAILURES = 10


class WorkItem(NamedTuple):
    """One image to extract: its stem, file, first region id and region count."""

    stem: str
    path: Path
    start: int
    count: int


def work_list(entries, done: np.ndarray, images: dict[str, Path]) -> tuple[list[WorkItem], list[str]]:
    """The images with an undone row, shuffled as the authors shuffle them.

    Args:
        entries: the manifest's :class:`~ovdense.bank.manifest.ImageEntry` rows, in id order.
        done: bool [N], the store's done rows.
        images: ``{stem: path}`` of the image folder.

    Returns:
        ``(work, missing)``: the shuffled work, and the stems with undone rows that are not in the folder.
    """
    work, missing = [], []
    for entry in entries:
        if done[entry.start : entry.start + entry.count].all():
            continue
        if entry.stem not in images:
            missing.append(entry.stem)
            continue
        work.append(WorkItem(entry.stem, images[entry.stem], entry.start, entry.count))
    random.Random(42).shuffle(work)  # = random.seed(42); random.shuffle(work): the same permutation
    return work, missing


class _Images(torch.utils.data.Dataset):
    """The images and masks of a shard; a failure is returned (as its one-line reason), not raised."""

    def __init__(self, items: list[WorkItem], masks_dir: Path):
        self.items, self.masks_dir = items, masks_dir

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from ..images import decode_image
        from .mask_step import read_bank_mask

        item = self.items[i]
        try:
            image = decode_image(item.path)
            mask = read_bank_mask(self.masks_dir / f"{item.stem}.npz")
        except Exception as err:  # noqa: BLE001 - counted and named by the loop
            return item, None, None, first_line(err)
        return item, image, mask, None


def fill_store(store, extract, work: list[WorkItem], masks_dir: Path, *, rank: int = 0, world: int = 1,
               workers: int = 0, flush_every: int = 64, flush_seconds: float = 60.0, progress: bool = True,
               desc: str = "regions") -> dict:  # fmt: skip
    """Extract this process's share of ``work`` and write its rows into ``store``.

    Args:
        store: a :class:`~ovdense.bank.slots.SlotStore` already prepared.
        extract: ``extract(image, mask) -> R x D`` rows (a value or key extractor).
        work: from :func:`work_list` (the same list in every process).
        masks_dir: the bank's mask folder.
        rank, world: this process and the number of processes.
        workers: DataLoader workers decoding images (0: in this process).
        flush_every, flush_seconds: commit the rows every this many images or seconds.
        progress: a tqdm bar (images/s, ETA) on rank 0.
        desc: the bar's label.

    Returns:
        ``{"images": images done by this process, "rows": rows written, "failed": [(stem, reason)]}``.

    Raises:
        OvdenseError: an image's mask no longer has the manifest's region count.
    """
    from tqdm import tqdm

    from ..distributed import identity_collate

    shard = work[rank::world]
    report = {"images": 0, "rows": 0, "failed": []}
    if not shard:
        return report
    loader = torch.utils.data.DataLoader(
        _Images(shard, masks_dir), batch_size=1, shuffle=False, num_workers=workers, collate_fn=identity_collate
    )
    label = desc if world == 1 else f"{desc} (process 1 of {world})"
    bar = tqdm(total=len(shard), desc=label, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True)
    store.open_for_write()
    since, last = 0, time.monotonic()

    def fail(item: WorkItem, reason: str) -> None:
        report["failed"].append((item.stem, reason))
        if len(report["failed"]) <= _NAMED_FAILURES:
            warnings.warn(f"{desc}: skipped {item.path}: {reason}", stacklevel=3)

    try:
        for item, image, mask, error in loader:
            bar.update(1)
            if error is not None:
                fail(item, error)
                continue
            try:
                rows = extract(image, mask)
            except OvdenseError as err:
                fail(item, str(err))
                continue
            except torch.cuda.OutOfMemoryError:
                fail(item, f"out of GPU memory ({image.shape[0]} x {image.shape[1]} pixels)")
                torch.cuda.empty_cache()
                continue
            if len(rows) != item.count:
                raise OvdenseError(
                    f"{masks_dir / (item.stem + '.npz')} has {len(rows)} regions but the manifest registers "
                    f"{item.count} for {item.stem} (masks changed after registration?); restore the mask, or build "
                    "the images into a new bank"
                )
            if not bool(torch.isfinite(rows).all()):
                fail(item, "a region has no pixel at the feature size (a NaN row)")
                continue
            store.write(item.start, rows)
            report["images"] += 1
            report["rows"] += len(rows)
            since += 1
            if since >= flush_every or time.monotonic() - last >= flush_seconds:
                store.flush()
                since, last = 0, time.monotonic()
    finally:
        store.close()  # commits what was written, on errors and Ctrl-C too
        bar.close()
    return report
