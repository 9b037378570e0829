"""Readers for the 10 open-vocabulary segmentation benchmarks, in the folder layouts mmseg users already have.

Everything here follows mmseg 1.x, which SCLIP, NACLIP, ClearCLIP and DeCLIP evaluate with:

- Sample order (``BaseSegDataset.load_data_list``): the split file's order where the benchmark has one
  (VOC, Context), else every ``*<img_suffix>`` under the image folder, recursively, sorted by path.
- Images (``LoadImageFromFile``, cv2 ``IMREAD_COLOR``): RGB uint8 with the EXIF orientation applied. Decoded
  here with Pillow + ``ImageOps.exif_transpose``, which gives the same pixels for the benchmark JPEGs/PNGs.
- Labels (``LoadAnnotations``, Pillow backend, flag ``unchanged``): the PNG's stored values, without any
  conversion (palette PNGs give palette indices, ``L`` PNGs give grey values), then ``reduce_zero_label``
  (ADE20K, Context59, VOC20 only): ``0 -> 255, c -> c - 1, 255 -> 255``. 255 is ignored by the metric.
  Ground truth is never resized.
- 16-bit labels (ADE-847, PC-459; CorrCLIPv2's ``MyLoadAnnotations``): the TIFF's stored values as uint16, class
  indices 0..C-1 and 65535 for unlabelled pixels, never narrowed to 8 bits (:func:`read_label_16`). Which value
  the metric leaves out is :attr:`SegDataset.ignore_index` (:func:`ovdense.eval.specs.ignore_index`).

The benchmarks themselves (classes, label rule, folder layouts, ``data_root``) are data in
:mod:`ovdense.eval.specs`.

Class names: ``classes/<dataset>.txt`` holds the names SCLIP and NACLIP use (identical files; background
words as class 0 of VOC21 and COCO-Object, synonyms for person / tv monitor); ``<dataset>.<style>.txt``
holds another method's names where they differ (see :data:`~ovdense.eval.specs.CLASS_STYLES`). ADE-847 and
PC-459 have only ``<dataset>.txt``: the authors' (CAT-Seg's) names, each line one prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..classes import split_names
from ..errors import OvdenseError
from ..images import decode_image
from .labels import read_label_png
from .specs import CLASS_STYLES, DATASETS, IGNORE_POLICIES, STYLE_FALLBACK, DatasetSpec, ignore_index

__all__ = [
    "SegDataset",
    "get_dataset",
    "read_class_names",
    "read_image",
    "read_label",
    "read_label_16",
]

IGNORE_INDEX = 255
CLASSES_DIR = Path(__file__).parent / "classes"


def _unknown(name: str) -> OvdenseError:
    return OvdenseError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def read_label(path: str | Path, reduce_zero_label: bool) -> np.ndarray:
    """Read a label PNG the way mmseg's ``LoadAnnotations`` does.

    The stored values are used as they are (palette indices for ``P`` PNGs, grey values for ``L`` PNGs);
    with ``reduce_zero_label`` 0 becomes 255 and every other value c becomes c - 1 (255 stays 255).

    Returns:
        HxW uint8 array of class indices; 255 = ignore.

    Raises:
        OvdenseError: the file cannot be read, has colour channels, or holds values outside 0..255.
    """
    arr = read_label_png(path)
    if reduce_zero_label:
        arr = arr.copy()
        arr[arr == 0] = 255
        arr = arr - 1
        arr[arr == 254] = 255
    return arr


def read_label_16(path: str | Path) -> np.ndarray:
    """Read a 16-bit label file (CAT-Seg's ADE-847 / PC-459 TIFFs) as CorrCLIPv2's ``MyLoadAnnotations`` does:
    the stored values, as uint16, never through 8 bits.

    Pillow opens the TIFFs as mode ``I;16`` (or ``I;16B``); 32-bit integer files are accepted while their values
    fit 0..65535.

    Returns:
        HxW uint16 array of class indices (65535 = unlabelled).

    Raises:
        OvdenseError: the file cannot be read, has colour channels, is 8-bit (847 or 459 classes do not fit:
            such a file went through an 8-bit conversion that lost classes), is floating point, or holds values
            outside 0..65535.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im)
    except (OSError, ValueError) as err:
        raise OvdenseError(f"cannot read label {path}: {err}") from None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim != 2:
        raise OvdenseError(f"label {path} has shape {arr.shape}: expected one channel of 16-bit class indices")
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize < 2:
        raise OvdenseError(
            f"label {path} is mode {mode} ({arr.dtype}): expected a 16-bit label file (mode I;16), as CAT-Seg's "
            "preparation writes; an 8-bit file cannot hold these classes"
        )
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise OvdenseError(f"label {path} holds values outside 0..65535 ({arr.min()}..{arr.max()})")
    return arr.astype(np.uint16)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as mmseg's ``LoadImageFromFile`` sees it: RGB, EXIF orientation applied.

    :func:`ovdense.images.decode_image` rules: 8-bit images exactly as Pillow's ``convert("RGB")``, 16-bit
    ones scaled to 8 bits, transparency composited over white, the pixel limit checked before decoding.

    Returns:
        HxWx3 uint8 RGB array.

    Raises:
        OvdenseError: the file is missing, unreadable, not a supported image or over the pixel limit.
    """
    return decode_image(path, exif=True)


def class_file(name: str, style: str = "sclip") -> Path:
    """The class-name file of dataset ``name`` for ``style``: ``<name>.<style>.txt`` if shipped, else that of the
    style it falls back to (:data:`~ovdense.eval.specs.STYLE_FALLBACK`), else ``<name>.txt``."""
    if name not in DATASETS:
        raise _unknown(name)
    if style not in CLASS_STYLES:
        raise OvdenseError(f"unknown class-name style {style!r}; choose one of: {', '.join(CLASS_STYLES)}")
    while style != "sclip":
        styled = CLASSES_DIR / f"{name}.{style}.txt"
        if styled.is_file():
            return styled
        style = STYLE_FALLBACK.get(style, "sclip")
    return CLASSES_DIR / f"{name}.txt"


def read_class_names(name: str, style: str = "sclip") -> list[list[str]]:
    """Class names of dataset ``name`` as the method family ``style`` used them.

    Line i of the file is class i; a class's names (synonyms) are separated by ``", "``, and ``\\,`` is a comma
    inside one name (ADE-847's ``building\\, edifice`` is one prompt, ``building, edifice``). A name may appear
    in two classes (SCLIP's COCO-Object has ``bed`` among the background words and as the bed class):
    the list is returned as written.

    Returns:
        ``num_classes`` lists of names.
    """
    path = class_file(name, style)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [[n.strip() for n in split_names(line)] for line in lines if line.strip()]


def _resolve_root(spec: DatasetSpec, data_root: Path) -> Path:
    if not data_root.is_dir():
        raise OvdenseError(f"{spec.title}: data root {data_root} is not a folder; {spec.prepare_hint}")
    for rel in spec.roots:
        base = data_root / rel
        if (base / spec.img_dir).is_dir():
            return base
    tried = ", ".join(str(Path(data_root, rel, spec.img_dir)) for rel in spec.roots)
    raise OvdenseError(f"{spec.title}: image folder not found (tried {tried}); {spec.prepare_hint}")


class SegDataset(torch.utils.data.Dataset):
    """A benchmark's validation split: images with their ground-truth label maps.

    Paths are checked when the dataset is built (folders, split file, every label file present); pixels
    are decoded lazily in ``__getitem__``, so DataLoader workers do the decoding.

    Args:
        name: a key of :data:`~ovdense.eval.specs.DATASETS`.
        data_root: see :mod:`ovdense.eval.specs`.
        ignore: which label value the metric leaves out where there is a choice (ADE-847, PC-459), one of
            :data:`~ovdense.eval.specs.IGNORE_POLICIES`: ``"authors"`` (255, CorrCLIPv2's harness) or
            ``"unlabelled"`` (65535, CAT-Seg's). The classic 8 ignore 255 under either.

    Attributes:
        spec: the benchmark's :class:`DatasetSpec`.
        root: the benchmark folder that was found under ``data_root``.
        samples: (image path, label path) pairs in mmseg's order.
        ignore_policy: ``ignore`` as given; ``ignore_index``: the label value the metric leaves out.
    """

    def __init__(self, name: str, data_root: str | Path, ignore: str = "authors"):
        if name not in DATASETS:
            raise _unknown(name)
        if ignore not in IGNORE_POLICIES:
            raise OvdenseError(f"unknown ignore policy {ignore!r}; choose one of: {', '.join(IGNORE_POLICIES)}")
        self.spec = spec = DATASETS[name]
        self.ignore_policy = ignore
        self.ignore_index = ignore_index(spec, ignore)
        self.data_root = Path(data_root)
        self.root = _resolve_root(spec, self.data_root)
        img_dir, ann_dir = self.root / spec.img_dir, self.root / spec.ann_dir
        if not ann_dir.is_dir():
            raise OvdenseError(f"{spec.title}: label folder not found: {ann_dir}; {spec.prepare_hint}")
        if spec.split_file is not None:
            ids = self._read_split(self.root / spec.split_file)
        else:
            ids = self._scan(img_dir)
        self.samples: list[tuple[Path, Path]] = [
            (img_dir / f"{i}{spec.img_suffix}", ann_dir / f"{i}{spec.seg_map_suffix}") for i in ids
        ]
        self._check_files()

    def _read_split(self, split: Path) -> list[str]:
        spec = self.spec
        if not split.is_file():
            raise OvdenseError(f"{spec.title}: split file not found: {split}; {spec.prepare_hint}")
        ids = [line.strip() for line in split.read_text(encoding="utf-8").splitlines()]
        ids = [i for i in ids if i]
        if not ids:
            raise OvdenseError(f"{spec.title}: the split file {split} lists no images")
        return ids

    def _scan(self, img_dir: Path) -> list[str]:
        # mmengine list_dir_or_file(recursive=True, suffix=...): files not starting with '.', then sorted by path
        suffix = self.spec.img_suffix
        rels = sorted(
            p.relative_to(img_dir).as_posix()
            for p in img_dir.rglob(f"*{suffix}")
            if p.is_file() and not p.name.startswith(".")
        )
        if not rels:
            raise OvdenseError(f"{self.spec.title}: no *{suffix} images in {img_dir}; {self.spec.prepare_hint}")
        return [r[: -len(suffix)] for r in rels]

    def _check_files(self) -> None:
        spec = self.spec
        missing_img = [img for img, _ in self.samples if not img.is_file()]
        if missing_img:
            more = f" (and {len(missing_img) - 1} more)" if len(missing_img) > 1 else ""
            raise OvdenseError(f"{spec.title}: image listed in the split is missing: {missing_img[0]}{more}")
        missing = [(img, lab) for img, lab in self.samples if not lab.is_file()]
        if missing:
            img, lab = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            hint = f"; {spec.prepare_hint}" if len(missing) == len(self.samples) else ""
            raise OvdenseError(f"{spec.title}: no label {lab} for image {img}{more}{hint}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        """Sample ``i``.

        Returns:
            ``image``: HxWx3 uint8 RGB; ``label``: HxW class indices, uint8 after ``reduce_zero_label`` (255 =
            ignore) for the classic 8, uint16 for ADE-847 and PC-459 (65535 = unlabelled; :attr:`ignore_index`
            is what the metric leaves out); ``name``: the sample id without folders or suffix (e.g.
            ``2007_000033``); ``image_path``: str.

        Raises:
            OvdenseError: the label's size differs from the image's.
        """
        img_path, lab_path = self.samples[i]
        image = read_image(img_path)
        if self.spec.label_mode == "I;16":
            label = read_label_16(lab_path)
        else:
            label = read_label(lab_path, self.spec.reduce_zero_label)
        if image.shape[:2] != label.shape:
            (h, w), (lh, lw) = image.shape[:2], label.shape
            raise OvdenseError(
                f"{self.spec.title}: label {lab_path} is {lw}x{lh} but image {img_path} is {w}x{h} (WxH)"
            )
        name = img_path.name[: -len(self.spec.img_suffix)]
        return {"image": image, "label": label, "name": name, "image_path": str(img_path)}

    def class_names(self, style: str = "sclip") -> list[list[str]]:
        """Class names for the method family ``style`` (``sclip``, ``clearclip``, ``declip``); see
        :func:`read_class_names`."""
        return read_class_names(self.spec.name, style)

    def __repr__(self) -> str:
        return f"SegDataset({self.spec.name!r}, root={str(self.root)!r}, {len(self)} images)"


def get_dataset(name: str, data_root: str | Path, ignore: str = "authors") -> SegDataset:
    """The validation split of benchmark ``name`` (a key of :data:`DATASETS`) under ``data_root``; ``ignore``
    as :class:`SegDataset`'s."""
    return SegDataset(name, data_root, ignore)
