"""The command line's side of a run over many images (``segment``, ``attention``): every image checked against
every limit the run will meet before the first is processed, the outputs planned and checked against the inputs
and the files already there, and the images that still fail (what no check can know: memory, a file changed
meanwhile) reported one line each while the others' outputs are written.

Like the rest of the command line, this module imports torch only inside the helpers that need it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OvdenseError, first_line

__all__ = [
    "EXIT_SOME_FAILED",
    "ImageFailures",
    "add_overwrite_flag",
    "check_mask_files",
    "check_network_sizes",
    "check_windows",
    "decode_sizes",
    "run_inputs",
    "window_size",
]

#: Exit status of a run in which some images failed after the run started (their outputs are not written, every
#: other image's are). Bad input found before the run starts stays 2.
EXIT_SOME_FAILED = 1


def add_overwrite_flag(p) -> None:
    """``--overwrite``: replace output files that already exist (default: stop before any work, naming them)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist (default: stop before any model loads, naming the first); "
        "an output is never allowed to replace an input of the run",
    )


def decode_sizes(paths: list[str]) -> tuple[list[Path], list[tuple[int, int]]]:
    """Decode every image before anything is written, so a bad file stops the run with nothing half-done, keeping
    each one's ``(height, width)`` as decoded (EXIF orientation applied) for the checks that follow.

    Raises:
        OvdenseError: a missing or unreadable image, or one over the pixel limit (the first, named).
    """
    from ..images import decode_image

    sizes = []
    for raw in paths:
        h, w = decode_image(raw).shape[:2]
        sizes.append((int(h), int(w)))
    return [Path(p) for p in paths], sizes


def window_size(height: int, width: int, crop: int, pad_multiple: int = 0) -> tuple[int, int]:
    """The ``(height, width)`` of every sliding window over a network input of ``height x width`` as the image
    tower sees it: ``min(crop, side)`` (the whole side for ``crop = 0``), then zero-padded up to a multiple of
    ``pad_multiple`` when it is > 0 (:func:`ovdense.inference.sliding_windows`, :func:`~ovdense.inference.
    patch_padding`)."""

    def side(n: int) -> int:
        n = n if crop <= 0 else min(crop, n)
        return -(-n // pad_multiple) * pad_multiple if pad_multiple > 0 and n > 0 else n

    return side(height), side(width)


def _wh(size: tuple[int, int]) -> str:
    return f"{size[1]} x {size[0]}"


def _first_and_count(bad: list[tuple[Path, str]], total: int) -> str:
    path, why = bad[0]
    more = f" ({len(bad)} of the {total} images fail this check)" if len(bad) > 1 else ""
    return f"{path}: {why}{more}"


def check_network_sizes(images: list[Path], sizes: list[tuple[int, int]], preset) -> None:
    """Every image resizes (mmseg rule, the preset's ``long_side``/``short_side``) to a non-empty network input.

    Raises:
        OvdenseError: one line naming the first image that would not, and how many do not.
    """
    from ..inference import mmseg_resize_size  # the resize's own rule (loads torch: the run needs it next)

    bad = []
    for path, (h, w) in zip(images, sizes, strict=True):
        nh, nw = mmseg_resize_size(h, w, preset.long_side, preset.short_side)
        if nh < 1 or nw < 1:
            bad.append((path, (
                f"{_wh((h, w))} pixels (width x height) is too elongated for {preset.method}: its resize (long side "
                f"<= {preset.long_side}, short side <= {preset.short_side}, mmseg rule) would make it "
                f"{_wh((nh, nw))}; crop it or pad it to a less elongated shape"
            )))  # fmt: skip
    if bad:
        raise OvdenseError(_first_and_count(bad, len(images)))


def check_windows(images: list[Path], sizes: list[tuple[int, int]], seg) -> None:
    """Every image's sliding windows hold at least one patch of each tower the windows go through (CLIP's, and the
    VFM's for a head that uses one): a narrower window is refused by the patch embedding.

    ``seg`` is the :class:`ovdense.Segmenter` of the run (its preset, tower and VFM), so this runs after the
    model loads but before the first image is processed.

    Raises:
        OvdenseError: one line naming the first image whose windows would be too small, and how many are.
    """
    from ..inference import mmseg_resize_size

    p = seg.preset
    tower = seg.loaded.tower
    pad = p.pad_multiple or (tower.patch_size if p.pad_to_patch else 0)
    need, what = tower.patch_size, f"the {tower.patch_size}-pixel patches of {seg.loaded.model_name}"
    if seg.head.uses_vfm and seg.vfm is not None and seg.vfm.patch_size > need:
        need, what = seg.vfm.patch_size, f"the {seg.vfm.patch_size}-pixel patches of the VFM {seg.vfm.name}"
    bad = []
    for path, (h, w) in zip(images, sizes, strict=True):
        nh, nw = mmseg_resize_size(h, w, p.long_side, p.short_side)
        wh, ww = window_size(nh, nw, p.crop, pad)
        if wh < need or ww < need:
            windows = f"its {p.crop}-pixel windows" if p.crop > 0 else "its whole-image window"
            bad.append((path, (
                f"{_wh((h, w))} pixels (width x height) becomes {_wh((nh, nw))} for {p.method}'s network input, and "
                f"{windows} {_wh((wh, ww))}, smaller than {what}; crop it or pad it to a less elongated shape"
            )))  # fmt: skip
    if bad:
        raise OvdenseError(_first_and_count(bad, len(images)))


def check_mask_files(args, images: list[Path], sizes: list[tuple[int, int]]) -> None:
    """For a method that uses region masks from ``--masks-dir``: every image's mask file reads and has the image's
    size (what :meth:`ovdense.Segmenter.set_image` will require).

    Raises:
        OvdenseError: the first mask file that is missing, unreadable or of another size, named.
    """
    from ..masks import read_region_map, region_map_for
    from ..methods import get_method

    masks_dir = getattr(args, "masks_dir", None)
    if masks_dir is None or not get_method(args.method).uses_masks:
        return
    for path, size in zip(images, sizes, strict=True):
        read_region_map(region_map_for(masks_dir, path), size)


def run_inputs(args, images: list[Path]) -> list[Path]:
    """Every file the run reads: the images, and the class file, checkpoints and mask files the flags name (no
    output may replace one of them)."""
    inputs = list(images)
    for flag in ("classes_file", "checkpoint", "vfm_checkpoint"):
        value = getattr(args, flag, None)
        if value:
            inputs.append(Path(value))
    return inputs


class ImageFailures:
    """The images of a run that failed while it ran: one line each on stderr (``ovdense: error: IMAGE: ...``) as
    they fail, and the run's exit status and closing line at the end.

    Example::

        failures = ImageFailures(len(images))
        for path in images:
            with failures.image(path):
                ...  # process and write this image
        return failures.finish(out)
    """

    def __init__(self, total: int):
        self.total = total
        self.failed: list[Path] = []

    def report(self, path: Path, err: BaseException) -> None:
        text = str(err) if isinstance(err, OvdenseError) else f"{type(err).__name__}: {first_line(err)}"
        print(f"ovdense: error: {path}: {' '.join(text.split())}", file=sys.stderr)
        self.failed.append(path)
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():  # after an out-of-memory, room for the next image
            torch.cuda.empty_cache()

    def image(self, path: Path):
        """A context manager: an ``Exception`` inside it fails ``path`` (reported, the run goes on); Ctrl-C and
        exits pass through."""
        return _OneImage(self, path)

    @property
    def done(self) -> int:
        return self.total - len(self.failed)

    def finish(self, out: Path) -> int:
        """The closing line when some images failed; the exit status (0, or :data:`EXIT_SOME_FAILED`)."""
        if not self.failed:
            return 0
        written = f"the other {self.done} were written to {out}" if self.done else "nothing was written"
        failed = f"{len(self.failed)} of {self.total} images failed (see above)"
        print(f"ovdense: error: {failed}; {written}", file=sys.stderr)
        return EXIT_SOME_FAILED


class _OneImage:
    def __init__(self, failures: ImageFailures, path: Path):
        self.failures, self.path = failures, path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None or not isinstance(err, Exception):
            return False
        self.failures.report(self.path, err)
        return True
