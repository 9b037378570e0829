"""COCO panoptic reader for region classification, as DeCLIP / CLIPSelf evaluate it.

Follows ``COCOPanopticDataset`` in DeCLIP's and CLIPSelf's ``src/training/data.py`` (with ``COCOPanoptic``
from their ``coco_api.py``):

- Categories are sorted by id; a category's label is its index in that order. Names are the json's, verbatim
  (``wall-other-merged``...).
- Images come in the json ``images`` order. An image's panoptic PNG is its annotation's ``file_name``, else
  the image's file name with ``jpg`` replaced by ``png``; an image without an annotation entry has no segments.
- Segment ids are decoded from the PNG as ``R + 256 G + 256^2 B`` (panopticapi ``rgb2id``).
- Only the first ``max_segments`` entries of ``segments_info`` are considered (the reference stops at entry
  100 before any filtering). A thing's box is its json ``bbox`` ``(x, y, w, h)`` as ``(x, y, x + w, y + h)``
  with area ``w * h``; a stuff segment's box is the reference ``mask2box`` of its mask: the min and **max**
  pixel indices, ``(x0, y0, x1, y1)``, area ``(x1 - x0) * (y1 - y0)``. A segment is kept when
  ``min_size**2 <= area <= max_size**2``.
- Images are decoded as stored, **without** applying the EXIF orientation (the reference opens them with plain
  ``Image.open``, and the annotations use the stored pixel layout), by :func:`ovdense.images.decode_image`:
  8-bit images exactly as the reference's ``convert("RGB")`` (COCO's are 8-bit RGB or greyscale JPEGs).

``data_root`` is the COCO folder: ``<split>/*.jpg``, ``annotations/panoptic_<split>.json`` and
``annotations/panoptic_<split>/*.png`` (``split`` is ``val2017`` by default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OvdenseError
from ..images import decode_image
from .labels import read_label_png

__all__ = ["CocoPanoptic", "PanopticSegment", "read_panoptic_ids"]

_HINT = (
    "get {split}.zip and panoptic_annotations_trainval2017.zip from cocodataset.org, extract {split}.zip into "
    "DATA_ROOT and the annotations into DATA_ROOT/annotations, then unzip annotations/panoptic_{split}.zip there"
)


@dataclass(frozen=True)
class PanopticSegment:
    """One kept segment of an image.

    Attributes:
        segment_id: the segment's id in the panoptic PNG (``R + 256 G + 256^2 B``).
        category_id: the json category id.
        label: index of the category in the id-sorted category list.
        isthing: the category is a thing (its box is the json ``bbox``), else stuff (tight box of the mask).
        box: ``(x0, y0, x1, y1)`` in original image pixels.
        area: ``w * h`` of the box as the reference computes it (the size filter's measure, not a pixel count).
    """

    segment_id: int
    category_id: int
    label: int
    isthing: bool
    box: tuple[float, float, float, float]
    area: float


def read_panoptic_ids(path: str | Path) -> np.ndarray:
    """Decode a COCO panoptic PNG into segment ids, as panopticapi's ``rgb2id``: ``R + 256 G + 256^2 B``.

    Returns:
        HxW uint32 array of segment ids (0 = unlabelled).

    Raises:
        OvdenseError: the file cannot be read or is not an RGB(A) PNG.
    """
    rgb = read_label_png(path, rgb=True, what="panoptic PNG").astype(np.uint32)
    return rgb[:, :, 0] + 256 * rgb[:, :, 1] + 65536 * rgb[:, :, 2]


def _read_image_as_stored(path: Path) -> np.ndarray:
    # exif=False: the reference opens with plain Image.open and the annotations use the stored layout
    return decode_image(path, exif=False)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    # the reference mask2box: np.where, then min and max indices (max, not max + 1)
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


class CocoPanoptic(torch.utils.data.Dataset):
    """COCO panoptic images with their segments (masks, boxes, category labels) for region classification.

    The folders and the json are checked and the json is read once when the dataset is built; pixels are
    decoded lazily in ``__getitem__`` (so DataLoader workers do the decoding; the dataset pickles).

    Attributes:
        data_root: the COCO folder.
        split: ``val2017`` or ``train2017``.
        img_dir, ann_file, png_dir: ``<split>/``, ``annotations/panoptic_<split>.json``,
            ``annotations/panoptic_<split>/``.
        categories: ``{"id", "name", "isthing"}`` dicts sorted by id; list index = label.
        max_segments, min_size, max_size: the segment filter (see the module docstring).
    """

    def __init__(
        self,
        data_root: str | Path,
        split: str = "val2017",
        max_segments: int = 100,
        min_size: float = 8,
        max_size: float = 1024,
    ):
        self.data_root = root = Path(data_root)
        self.split = split
        self.max_segments = int(max_segments)
        self.min_size = min_size
        self.max_size = max_size
        hint = _HINT.format(split=split)
        if not root.is_dir():
            raise OvdenseError(f"COCO panoptic: data root {root} is not a folder; {hint}")
        self.img_dir = root / split
        self.ann_file = root / "annotations" / f"panoptic_{split}.json"
        self.png_dir = root / "annotations" / f"panoptic_{split}"
        if not self.ann_file.is_file():
            raise OvdenseError(f"COCO panoptic: annotation file not found: {self.ann_file}; {hint}")
        if not self.png_dir.is_dir():
            raise OvdenseError(f"COCO panoptic: panoptic PNG folder not found: {self.png_dir}; {hint}")
        if not self.img_dir.is_dir():
            raise OvdenseError(f"COCO panoptic: image folder not found: {self.img_dir}; {hint}")
        self._load_json()

    def _bad(self, what: str) -> OvdenseError:
        return OvdenseError(f"COCO panoptic: {self.ann_file} {what}")

    def _load_json(self) -> None:
        try:
            with open(self.ann_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            msg = " ".join(str(err).split())
            raise self._bad(f"cannot be read as JSON: {msg}") from None
        except RecursionError:  # hostile input: arrays nested deeper than the parser's stack
            raise self._bad("cannot be read as JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise self._bad("is not a COCO panoptic annotation file (expected a JSON object)")
        for key in ("images", "categories"):
            if not isinstance(data.get(key), list):
                raise self._bad(f"has no {key!r} list; is it a COCO panoptic annotation file?")
        try:
            cats = sorted(
                (
                    {"id": int(c["id"]), "name": str(c["name"]), "isthing": int(c["isthing"]) > 0}
                    for c in data["categories"]
                ),
                key=lambda c: c["id"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise self._bad(f"has a category without a valid id, name and isthing ({err!r})") from None
        ids = [c["id"] for c in cats]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise self._bad(f"lists category id {dup} twice")
        self.categories: list[dict] = cats
        self._label = {c["id"]: label for label, c in enumerate(cats)}

        anns = data.get("annotations") or []
        if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
            raise self._bad("has an 'annotations' entry that is not a list of objects")
        try:
            by_image = {int(a["image_id"]): a for a in anns}
        except (KeyError, TypeError, ValueError) as err:
            raise self._bad(f"has an annotation without a valid image_id ({err!r})") from None
        # (image_id, image file, png file, considered segments as (id, category_id, (x, y, w, h)))
        self._records: list[tuple[int, str, str, tuple[tuple[int, int, tuple[float, ...]], ...]]] = []
        for img in data["images"]:
            try:
                image_id, file_name = int(img["id"]), str(img["file_name"])
            except (KeyError, TypeError, ValueError) as err:
                raise self._bad(f"has an image without a valid id and file_name ({err!r})") from None
            ann = by_image.get(image_id)
            png_name = file_name.replace("jpg", "png")
            segs = []
            if ann is not None:
                png_name = str(ann.get("file_name") or png_name)
                try:
                    for s in (ann.get("segments_info") or [])[: self.max_segments]:
                        x, y, w, h = (float(v) for v in s["bbox"])
                        segs.append((int(s["id"]), int(s["category_id"]), (x, y, w, h)))
                except (KeyError, TypeError, ValueError, AttributeError) as err:
                    raise self._bad(
                        f"has a segment of {file_name} without a valid id, category_id and bbox ({err!r})"
                    ) from None
            self._records.append((image_id, file_name, png_name, tuple(segs)))

    @property
    def class_names(self) -> list[list[str]]:
        """One ``[name]`` per label, in label order (the json names, verbatim)."""
        return [[c["name"]] for c in self.categories]

    @property
    def is_thing(self) -> torch.Tensor:
        """(C,) bool: label is a thing category."""
        return torch.tensor([c["isthing"] for c in self.categories], dtype=torch.bool)

    def label_of(self, category_id: int) -> int:
        """The label (index in the id-sorted categories) of json category ``category_id``."""
        try:
            return self._label[int(category_id)]
        except KeyError:
            raise OvdenseError(f"COCO panoptic: category id {category_id} is not in {self.ann_file}") from None

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> dict:
        """Image ``i`` (json order) with its kept segments.

        Returns:
            ``image``: HxWx3 uint8 RGB as stored (no EXIF transpose); ``image_id``: int; ``file_name``: the
            image file name; ``image_path``: str; ``segments``: list of :class:`PanopticSegment` in
            ``segments_info`` order; ``masks``: KxHxW bool, mask k = ``ids == segments[k].segment_id``
            (shape (0, H, W) when no segment is kept).

        Raises:
            OvdenseError: the image or PNG is missing or unreadable, their sizes differ, a considered segment's
            id is absent from the PNG, or its category is not in the json's categories.
        """
        image_id, file_name, png_name, segs = self._records[i]
        img_path, png_path = self.img_dir / file_name, self.png_dir / png_name
        if not img_path.is_file():
            raise OvdenseError(f"COCO panoptic: image not found: {img_path} (listed in {self.ann_file})")
        if not png_path.is_file():
            raise OvdenseError(f"COCO panoptic: panoptic PNG not found: {png_path} (for image {file_name})")
        image = _read_image_as_stored(img_path)
        ids = read_panoptic_ids(png_path)
        if image.shape[:2] != ids.shape:
            (h, w), (ph, pw) = image.shape[:2], ids.shape
            raise OvdenseError(
                f"COCO panoptic: panoptic PNG {png_path} is {pw}x{ph} but image {img_path} is {w}x{h} (WxH)"
            )
        present = set(np.unique(ids).tolist()) if segs else set()
        lo, hi = self.min_size**2, self.max_size**2
        segments, masks = [], []
        for seg_id, cat_id, (x, y, w, h) in segs:
            if seg_id not in present:
                raise OvdenseError(
                    f"COCO panoptic: segment id {seg_id} of image {file_name} is not in its panoptic PNG {png_path}"
                )
            label = self._label.get(cat_id)
            if label is None:
                raise OvdenseError(
                    f"COCO panoptic: segment id {seg_id} of image {file_name} has category id {cat_id}, "
                    f"which is not in the categories of {self.ann_file}"
                )
            isthing = self.categories[label]["isthing"]
            mask = None
            if isthing:
                box = (x, y, x + w, y + h)
            else:
                mask = ids == seg_id
                x0, y0, x1, y1 = _mask_box(mask)
                w, h = x1 - x0, y1 - y0
                box = (float(x0), float(y0), float(x1), float(y1))
            area = float(w * h)
            if area < lo or area > hi:
                continue
            segments.append(PanopticSegment(seg_id, cat_id, label, isthing, box, area))
            masks.append(ids == seg_id if mask is None else mask)
        h, w = ids.shape
        return {
            "image": image,
            "image_id": image_id,
            "file_name": file_name,
            "image_path": str(img_path),
            "segments": segments,
            "masks": np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool),
        }

    def __repr__(self) -> str:
        return (
            f"CocoPanoptic({str(self.data_root)!r}, split={self.split!r}, {len(self)} images, "
            f"{len(self.categories)} categories)"
        )
