"""The images of a bank build: a recursive scan of the image folder, one image per stem (the authors' rules).

The authors walk the folder with ``os.walk`` and keep, for each file stem, the first file they meet
(``stem_to_img.setdefault``), in the file system's order. Here the walk is sorted (folders and files by name) so the
first-seen file, and so the bank, is the same on every machine; a stem met twice is reported (their builder is
silent): the bank's files are named by stem, so only one of the two can be in it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ..errors import OvdenseError

__all__ = ["IMAGE_EXTENSIONS", "ImageScan", "scan_images"]

#: The authors' ``IMG_EXTS`` (matched without case); ``.tif`` and ``.webp`` are not among them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tiff")


class ImageScan(NamedTuple):
    """The scan of an image folder.

    Attributes:
        images: ``{stem: path}``, the first file of each stem in sorted walk order.
        duplicates: ``(path, kept path)`` of every later file with a stem already taken.
    """

    images: dict[str, Path]
    duplicates: list[tuple[Path, Path]]


def scan_images(folder) -> ImageScan:
    """Every image under ``folder`` (recursive) with one of :data:`IMAGE_EXTENSIONS`.

    Raises:
        OvdenseError: ``folder`` is not a folder, or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise OvdenseError(f"--images {folder} is not a folder")
    images: dict[str, Path] = {}
    duplicates: list[tuple[Path, Path]] = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(root) / name
            stem = path.stem
            if stem in images:
                duplicates.append((path, images[stem]))
            else:
                images[stem] = path
    if not images:
        raise OvdenseError(f"no images under {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}, in subfolders too)")
    return ImageScan(images, duplicates)
