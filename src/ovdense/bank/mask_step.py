"""Step 1 of a bank build: one instance-mask file per image (the authors' ``generate_mask.py``).

Every image without ``masks/{bank}/{mask_name}/{stem}.npz`` gets one, from an online generator
(:func:`ovdense.mask_generators.mask_generator` with the authors' **build** settings, :data:`BUILD_SETTINGS`),
saved as the authors save it (``np.savez_compressed``, key ``instance_mask``, at the EXIF-corrected original size),
or from a folder of pre-generated files (``--masks-dir``: ``{stem}.npz`` with ``instance_mask``, EntitySeg's
published masks for instance), read once to check them and copied byte for byte. Every write is atomic: a killed
build never leaves half a mask file. The authors shuffle the images (seed 42) and give each GPU one
``np.array_split`` chunk; so does each torchrun process here.

Failures (an unreadable image, a generator error, no file in ``--masks-dir``) are counted and named, not hidden as
in the authors' log file; the build goes on and exits non-zero at the end (the images are simply not registered).
"""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np

from ..errors import OvdenseError, first_line
from ..fileio import write_atomic
from ..masks import MASK_KEY, load_mask_array

__all__ = [
    "BUILD_SETTINGS",
    "MaskSource",
    "copy_bank_mask",
    "make_masks",
    "missing_masks",
    "read_bank_mask",
    "save_bank_mask",
]

#: Failures named one by one (the rest are counted).
_NAMED_FAILURES = 10

#: The authors' build-time generator settings (``generate_mask.py`` ``BUILD_KWARGS``, l.49-55), in the arguments of
#: :func:`ovdense.mask_generators.mask_generator`: SAM ViT-H with segment-anything's automatic defaults (32 x 32
#: points, three masks per point) and both thresholds 0.7; SAM2 Hiera-L with 32 x 32 points, 0.7 / 0.7, three masks
#: per point (deployment uses 8 points, 0.4 / 0.4, one mask); EoMT with the authors' ids (-1 = unsegmented, segments
#: 0..n-1), so the bank keeps their regions (the unsegmented rest is one, segment 0 is dropped: spec quirk 10).
#: ``sam3`` has no authors' generator: SAM2's build settings (ours). EXIF is applied to every image here.
_SAM_BUILD = {"points_per_side": 32, "pred_iou_thresh": 0.7, "stability_score_thresh": 0.7, "multimask_output": True}
BUILD_SETTINGS: dict[str, dict] = {
    "sam": {"model": "facebook/sam-vit-huge", **_SAM_BUILD},
    "sam2": {"model": "facebook/sam2-hiera-large", **_SAM_BUILD},
    "sam3": dict(_SAM_BUILD),
    "eomt": {"authors_ids": True},
}


def read_bank_mask(path) -> np.ndarray:
    """A bank mask file: int [H, W] (0 = no region) or bool [R, H, W], as the authors read it.

    Raises:
        OvdenseError: missing or unreadable file, no ``instance_mask``, or another shape or dtype; names the file.
    """
    path = Path(path)
    mask = load_mask_array(path)
    integer = np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_
    if not ((mask.ndim == 2 and integer) or (mask.ndim == 3 and mask.dtype == np.bool_)) or 0 in mask.shape:
        raise OvdenseError(f"mask file {path}: expected int [H, W] or bool [R, H, W], got {mask.dtype} {mask.shape}")
    return mask


def save_bank_mask(path, mask: np.ndarray) -> None:
    """``np.savez_compressed(path, instance_mask=mask)``, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: np.savez_compressed(f, **{MASK_KEY: mask}))


def copy_bank_mask(src, path) -> None:
    """A pre-generated mask file copied as it is (its bytes: no second compression), atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as f:
        write_atomic(path, lambda out: shutil.copyfileobj(f, out, 1 << 20))


class MaskSource:
    """Where the masks of images without one come from: a generator or a folder (exactly one).

    Args:
        generator: a generator name (``sam``, ``sam2``, any of :data:`ovdense.mask_generators.MASK_GENERATORS`) or a
            callable ``image (H x W x 3 uint8) -> int [H, W]``.
        masks_dir: a folder of ``{stem}.npz`` files.
        mask_model: the hub id or folder of a named generator (default its build checkpoint).
        device: where a named generator runs.

    Raises:
        OvdenseError: both or neither, an unknown generator name, or ``masks_dir`` not a folder.
    """

    def __init__(self, generator=None, masks_dir=None, mask_model: str | None = None, device=None):
        if (generator is None) == (masks_dir is None):
            raise OvdenseError("give one mask source: --mask-generator NAME or --masks-dir DIR")
        if isinstance(generator, str):
            from ..mask_generators import MASK_GENERATORS

            if generator not in MASK_GENERATORS:
                raise OvdenseError(f"unknown mask generator {generator!r}; available: {', '.join(MASK_GENERATORS)}")
        if masks_dir is not None and not Path(masks_dir).is_dir():
            raise OvdenseError(f"--masks-dir {masks_dir} is not a folder")
        self.generator = generator
        self.masks_dir = None if masks_dir is None else Path(masks_dir)
        self.mask_model = mask_model
        self.device = device
        self._callable = None if isinstance(generator, str) else generator

    @property
    def default_name(self) -> str:
        """The mask folder name: the generator's name (``custom`` for a callable that does not say), else the
        authors' default ``entityseg`` (their published pre-generated masks)."""
        if isinstance(self.generator, str):
            return self.generator
        if self.generator is not None:  # a callable: its kind when it says (SamMaskGenerator.settings), else custom
            kind = (getattr(self.generator, "settings", None) or {}).get("generator")
            return kind if isinstance(kind, str) and kind.isidentifier() else "custom"
        return "entityseg"

    def load(self):
        """Load a named generator (once)."""
        if self._callable is None and self.generator is not None:
            from ..mask_generators import mask_generator

            settings = dict(BUILD_SETTINGS.get(self.generator, {}))
            if self.mask_model:
                settings["model"] = self.mask_model
            self._callable = mask_generator(self.generator, device=self.device, **settings)
        return self._callable

    def make(self, stem: str, path: Path, out: Path) -> np.ndarray:
        """Write the mask of one image to ``out``: generated from its pixels (EXIF applied) and saved, or copied from
        ``masks_dir`` after reading it (a file that does not read as a mask is refused). Returns the mask."""
        if self.masks_dir is not None:
            src = self.masks_dir / f"{stem}.npz"
            if not src.is_file():
                raise OvdenseError(f"no {src.name} in --masks-dir {self.masks_dir}")
            mask = read_bank_mask(src)
            copy_bank_mask(src, out)
            return mask
        from ..images import decode_image
        from ..masks import as_region_map

        image = decode_image(path)
        mask = as_region_map(self.load()(image), image.shape[:2], "mask generator output")
        save_bank_mask(out, mask)
        return mask


def missing_masks(images: dict[str, Path], folder: Path) -> list[str]:
    """The stems of ``images`` without ``folder/{stem}.npz``, in scan order."""
    return [stem for stem in images if not (folder / f"{stem}.npz").is_file()]


def make_masks(images: dict[str, Path], folder: Path, missing: list[str], source: MaskSource | None, rank: int = 0,
               world: int = 1, progress: bool = True) -> dict:  # fmt: skip
    """Give the images without a mask theirs (this process's share of them).

    Args:
        images: ``{stem: path}`` (:func:`ovdense.bank.scan.scan_images`).
        folder: ``masks/{bank}/{mask_name}``.
        missing: :func:`missing_masks`, read by every process before any writes (the shares must agree).
        source: where new masks come from; None when every image must already have one.
        rank, world: this process and the number of processes (torchrun).
        progress: a tqdm bar on rank 0.

    Returns:
        ``{"existing": images that had a mask, "made": masks written by this process, "failed": [(stem, reason)]
        of this process, "counts": {stem: region count} of the masks it wrote}``.

    Raises:
        OvdenseError: images lack masks and ``source`` is None.
    """
    from .manifest import region_count

    missing = list(missing)
    report = {"existing": len(images) - len(missing), "made": 0, "failed": [], "counts": {}}
    if not missing:
        return report
    if source is None:
        raise OvdenseError(
            f"{len(missing)} images have no mask in {folder} (e.g. {missing[0]}): give --mask-generator or --masks-dir"
        )
    random.Random(42).shuffle(missing)  # the authors' order: shuffled with seed 42, then one chunk per process
    share = [str(s) for s in np.array_split(np.array(missing, dtype=object), world)[rank]]
    if share:
        source.load()  # a generator that cannot load is one error now, not a failure per image
    from tqdm import tqdm

    what = "importing masks" if source.masks_dir is not None else f"masks ({source.default_name})"
    bar = tqdm(share, desc=what, unit="img", disable=not (progress and rank == 0), dynamic_ncols=True)
    for stem in bar:
        try:
            mask = source.make(stem, images[stem], folder / f"{stem}.npz")
        except Exception as err:  # noqa: BLE001 - the authors log and go on; here every failure is counted and named
            report["failed"].append((stem, first_line(err)))
            if len(report["failed"]) <= _NAMED_FAILURES:
                warnings.warn(f"masks: skipped {images[stem]}: {first_line(err)}", stacklevel=2)
            continue
        report["made"] += 1
        report["counts"][stem] = region_count(mask)
    bar.close()
    return report
