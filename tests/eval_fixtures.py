"""Tiny synthetic benchmarks in the exact folder layouts of ``ovdense.eval.datasets`` (for tests).

``make_dataset("voc21", tmp_path)`` writes a few random images and label PNGs where the real benchmark
keeps them (``tmp_path/VOCdevkit/VOC2012/...``), with a split file where the benchmark has one, and returns
what a correct reader must give back. Labels hold class 0, the highest class and ignore (255) pixels, and
are stored like the released ones: palette PNGs for VOC, grey PNGs for the others. The 16-bit benchmarks
(ADE-847, PC-459) get 16-bit TIFFs holding class 0, the highest class, class 255 (a real class there) and
unlabelled (65535) pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ovdense.eval.specs import DATASETS

__all__ = ["FixtureDataset", "make_dataset", "voc_palette"]


@dataclass
class FixtureDataset:
    """What :func:`make_dataset` wrote.

    Attributes:
        name: dataset name.
        data_root: pass this as ``data_root`` to :func:`ovdense.eval.datasets.get_dataset`.
        root: the benchmark folder inside ``data_root`` (e.g. ``.../VOCdevkit/VOC2012``).
        names: sample ids in the order the reader must return them (split-file order, else sorted paths).
        images: HxWx3 uint8 RGB, the written images as decoded from disk (JPEG is lossy).
        raw_labels: HxW uint8 (uint16 for the 16-bit benchmarks), the values stored in the label files.
        labels: HxW, the labels the reader must return (after ``reduce_zero_label``; 255 = ignore; uint16 and
            65535 = unlabelled for the 16-bit benchmarks).
        unlisted: ids of images with labels on disk that the split file leaves out (must not be read).
    """

    name: str
    data_root: Path
    root: Path
    names: list[str]
    images: list[np.ndarray]
    raw_labels: list[np.ndarray]
    labels: list[np.ndarray]
    unlisted: list[str]


def voc_palette(n: int = 256) -> list[int]:
    """The PASCAL VOC colour map (bit-interleaved), flattened RGB for ``Image.putpalette``."""
    pal = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    out = raw.astype(np.int64) - 1
    out[(raw == 0) | (raw == 255)] = 255
    return out.astype(np.uint8)


def _random_label(rng: np.random.Generator, size: tuple[int, int], max_raw: int) -> np.ndarray:
    h, w = size
    cells = rng.integers(0, max_raw + 1, size=((h + 3) // 4, (w + 3) // 4))
    lab = np.kron(cells, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint8)
    lab[0, 0] = 0  # class 0 (background where reduce_zero_label makes it ignore)
    lab[0, 1] = max_raw  # the highest class
    lab[-1, -1] = 255  # ignore
    lab[-1, 0] = 255
    return lab


def _random_label_16(rng: np.random.Generator, size: tuple[int, int], max_raw: int, unlabelled: int) -> np.ndarray:
    h, w = size
    cells = rng.integers(0, max_raw + 1, size=((h + 3) // 4, (w + 3) // 4))
    lab = np.kron(cells, np.ones((4, 4), dtype=np.int64))[:h, :w].astype(np.uint16)
    lab[0, 0] = 0
    lab[0, 1] = max_raw  # the highest class, above 255
    lab[0, 2] = 255  # a real class in these benchmarks
    lab[-1, -1] = unlabelled
    lab[-1, 0] = unlabelled
    return lab


def _random_image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) * 127 // max(h + w, 1)], -1)
    return np.clip(base + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)


def _ids(name: str, n: int) -> list[str]:
    if name.startswith(("voc", "context")):
        return [f"2009_{i:06d}" for i in range(n)]
    if name.startswith("coco"):
        return [f"{i + 1:012d}" for i in range(n)]
    if name == "cityscapes":
        cities = ("bochum", "aachen")  # scanned recursively and sorted: aachen first
        return [f"{cities[i % 2]}/{cities[i % 2]}_{i:06d}_000019" for i in range(n)]
    return [f"ADE_val_{i + 1:08d}" for i in range(n)]


def make_dataset(
    name: str, root: str | Path, n: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0
) -> FixtureDataset:
    """Write a tiny synthetic benchmark ``name`` under ``root`` in its canonical layout.

    Args:
        name: a key of ``ovdense.eval.datasets.DATASETS``.
        root: the data root (the folder that holds ``VOCdevkit/``, ``coco_stuff164k/``...).
        n: images the reader must return; benchmarks with a split file get one more, unlisted image.
        size: (H, W) of every image and label.
        seed: random seed; voc21/voc20, context60/59 and coco_object/coco_stuff share image files, so give
            them the same seed (or separate roots) when making both.

    Returns:
        :class:`FixtureDataset` with the expected decoded samples in reader order. Unlike the real
        COCO-Object (which has none), the synthetic COCO-Object labels also hold ignore (255) pixels.
    """
    spec = DATASETS[name]
    data_root = Path(root)
    base = data_root / spec.roots[0]
    rng = np.random.default_rng(seed)
    max_raw = spec.num_classes if spec.reduce_zero_label else spec.num_classes - 1
    has_split = spec.split_file is not None
    ids = _ids(name, n + (1 if has_split else 0))
    written = {}
    for sid in ids:
        img = _random_image(rng, size)
        wide = spec.label_mode == "I;16"
        raw = _random_label_16(rng, size, max_raw, spec.unlabelled) if wide else _random_label(rng, size, max_raw)
        img_path = base / spec.img_dir / f"{sid}{spec.img_suffix}"
        lab_path = base / spec.ann_dir / f"{sid}{spec.seg_map_suffix}"
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        if spec.img_suffix.endswith(".jpg"):
            Image.fromarray(img).save(img_path, format="JPEG", quality=95)
        else:
            Image.fromarray(img).save(img_path, format="PNG")
        if wide:
            lab = Image.fromarray(raw)  # mode I;16, as CAT-Seg writes them
        elif spec.label_mode == "P":
            lab = Image.frombytes("P", (raw.shape[1], raw.shape[0]), raw.tobytes())
            lab.putpalette(voc_palette())
        else:
            lab = Image.fromarray(raw)
        lab.save(lab_path, format="TIFF" if wide else "PNG")
        with Image.open(img_path) as im:
            decoded = np.asarray(im.convert("RGB")).copy()
        written[sid] = (decoded, raw)
    if has_split:
        listed = list(reversed(ids[:n]))  # split order is not sorted order: the reader must keep it
        unlisted = ids[n:]
        split = base / spec.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{i}\n" for i in listed))
    else:
        listed, unlisted = sorted(ids), []
    raws = [written[i][1] for i in listed]
    return FixtureDataset(
        name=name,
        data_root=data_root,
        root=base,
        names=[i.split("/")[-1] for i in listed],
        images=[written[i][0] for i in listed],
        raw_labels=raws,
        labels=[_reduce_zero_label(r) if spec.reduce_zero_label else r.copy() for r in raws],
        unlisted=[i.split("/")[-1] for i in unlisted],
    )
