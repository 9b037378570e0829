"""F-ViT training data: CLIPSelf's OV-COCO train set and mmdet 2.28.1's train pipeline, without mmdet.

What one sample goes through (CLIPSelf ``F-ViT/configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_original.py``
``train_pipeline``; mmdet ``datasets/pipelines/transforms.py`` and ``loading.py``):

1. decode (``LoadImageFromFile``: OpenCV ``IMREAD_COLOR``, which applies the EXIF orientation; here
   :func:`ovdense.images.decode_image` with ``exif=True``, as the evaluation reads images);
2. :func:`resize_with_boxes` (``Resize(img_scale=(S, S), ratio_range=(0.1, 2.0), keep_ratio=True)``);
3. :func:`random_crop` (``RandomCrop(crop_size=(S, S), crop_type='absolute_range', allow_negative_crop=True,
   recompute_bbox=True)``; without masks ``recompute_bbox`` does nothing);
4. :func:`filter_boxes` (``FilterAnnotations(min_gt_bbox_wh=(0.01, 0.01))``);
5. :func:`flip` (``RandomFlip(flip_ratio=0.5)``, horizontal);
6. :func:`normalise_and_pad` (``Normalize`` with ImageNet's constants on 0-255 RGB, ``Pad(size=(S, S))``): the same
   arithmetic as the test pipeline's :func:`ovdense.detection.detector.prepare_image`.

When step 4 removes every box of an image that had some, mmdet's pipeline returns None and ``CustomDataset``
draws another image of the same aspect group (``datasets/custom.py`` ``__getitem__`` / ``_rand_another``); so does
:class:`DetectionTrainSet`, from the sample's own generator. A crop that keeps no box at all is **not** re-drawn
in mmdet (``allow_negative_crop=True``, and ``FilterAnnotations`` returns an image with no boxes unchanged): it
trains as an all-background image. That is the default here too (``resample_empty=True`` re-draws it as well).

Randomness (ours): mmdet draws from the global ``np.random`` of each DataLoader worker, so its samples depend on
the worker layout and cannot be replayed. Here attempt ``a`` of sample ``i`` in epoch ``e`` draws from
``np.random.default_rng([seed, e, i, a])``, in this order: the scale ratio, the crop's y then x offset, the flip,
and (when the attempt fails) the index of the next attempt's image. A sample is a pure function of
``(seed, epoch, index)`` and the files, for any number of workers, ranks or resumes (on one NumPy version: NumPy
does not promise the same ``Generator`` streams across versions).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..eval.detection import OVCategories, is_json_int, is_json_number, ov_coco_categories, short_repr
from ..images import ImageDecodeError, decode_image
from .fvit import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "MIN_BOX_SIZE",
    "MIN_IMAGE_SIZE",
    "TRAIN_BENCHMARKS",
    "DetectionTrainSet",
    "NotAvailableError",
    "collate",
    "filter_boxes",
    "flip",
    "normalise_and_pad",
    "random_crop",
    "random_scale",
    "rescale_size",
    "resize_with_boxes",
]

#: Benchmarks :class:`DetectionTrainSet` knows; ``ov-lvis`` is declared but not implemented yet.
TRAIN_BENCHMARKS = ("ov-coco", "ov-lvis")
#: mmdet ``CocoDataset._filter_imgs(min_size=32)``: images with a side (per the json) under 32 px are left out.
MIN_IMAGE_SIZE = 32
#: CLIPSelf's ``FilterAnnotations(min_gt_bbox_wh=(0.01, 0.01))``: boxes must be wider and taller than this.
MIN_BOX_SIZE = (0.01, 0.01)
# mmdet re-draws forever; a data set on which nearly every draw fails is a bug worth one clear error instead.
_MAX_ATTEMPTS = 1000


class NotAvailableError(OvdenseError, NotImplementedError):
    """A training setting that this port does not implement yet."""


# -- pipeline steps -----------------------------------------------------------------------------------------------


def random_scale(image_size: int, ratio: float) -> tuple[int, int]:
    """mmdet ``Resize.random_sample_ratio``: the target ``(int(S * ratio), int(S * ratio))`` (truncated, not
    rounded; ``transforms.py`` ``random_sample_ratio``)."""
    side = int(image_size * ratio)
    return side, side


def rescale_size(width: int, height: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv 1.7 ``rescale_size`` / ``_scale_size`` (``mmcv/image/geometric.py``): the ``(w', h')`` of a keep-ratio
    resize as large as fits ``scale`` (long edge to ``max(scale)``, short edge within ``min(scale)``), each side
    ``int(side * factor + 0.5)``.

    A side that would round to 0 (an aspect ratio beyond ~1:2S) is kept at 1 px; mmdet would fail in OpenCV there.
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def resize_with_boxes(image: np.ndarray, boxes: np.ndarray, scale: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """mmdet ``Resize(keep_ratio=True)`` on an image and its boxes (``transforms.py`` ``_resize_img``,
    ``_resize_bboxes``).

    The image is resized by OpenCV's bilinear (``INTER_LINEAR``) on its uint8 pixels to :func:`rescale_size`.
    The boxes are multiplied by the *actual* per-axis factors ``w'/w`` and ``h'/h`` (float32, as mmdet's
    ``scale_factor``; they differ slightly from the factor used for the size because of the rounding), then
    clipped to ``[0, w']`` x ``[0, h']`` (``bbox_clip_border=True``: to the size, not size - 1).

    Args:
        image: H x W x 3 uint8.
        boxes: K x 4 float32 XYXY in the image's pixels.
        scale: the target ``(long edge, short edge)`` bound, e.g. :func:`random_scale`.

    Returns:
        ``(image, boxes)``: h' x w' x 3 uint8 and K x 4 float32.
    """
    import cv2

    h, w = image.shape[:2]
    new_w, new_h = rescale_size(w, h, scale)
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    factors = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * factors
    out[:, 0::2] = np.clip(out[:, 0::2], 0, new_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, new_h)
    return resized, out


def random_crop(
    image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """mmdet ``RandomCrop(crop_size=(S, S), crop_type='absolute_range', allow_negative_crop=True)``
    (``transforms.py`` ``_get_crop_size``, ``_crop_data``).

    ``absolute_range`` with ``crop_size=(S, S)`` draws the crop side from ``[min(h, S), min(h, S)]``: the crop is
    always ``min(h, S)`` x ``min(w, S)``. Its top-left corner is ``rng.integers(0, margin + 1)`` on each axis (y
    first, as mmdet), ``margin = h - crop_h`` (``w - crop_w``). Boxes are shifted by the corner, clipped to the
    crop (to its size, not size - 1) and kept where ``x2 > x1`` and ``y2 > y1``. No box left is allowed (the
    image then trains as background).

    Args:
        image: h x w x 3.
        boxes: K x 4 float32 XYXY in the image's pixels.
        labels: (K,) int64.
        size: S.
        rng: draws the offsets (``integers``).

    Returns:
        ``(image, boxes, labels, (y, x))``: the crop (a view), its K' x 4 float32 boxes and (K',) labels, and the
        crop's top-left corner in the input.
    """
    h, w = image.shape[:2]
    crop_h, crop_w = min(h, size), min(w, size)
    y = int(rng.integers(0, h - crop_h + 1))
    x = int(rng.integers(0, w - crop_w + 1))
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) - np.array([x, y, x, y], dtype=np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, crop_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, crop_h)
    valid = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return image[y : y + crop_h, x : x + crop_w], out[valid], np.asarray(labels)[valid], (y, x)


def filter_boxes(
    boxes: np.ndarray, labels: np.ndarray, min_wh: tuple[float, float] = MIN_BOX_SIZE
) -> tuple[np.ndarray, np.ndarray] | None:
    """mmdet ``FilterAnnotations(min_gt_bbox_wh=min_wh)`` (``loading.py``): keep boxes with ``x2 - x1 > min_w`` and
    ``y2 - y1 > min_h`` (float32 arithmetic).

    Returns:
        ``(boxes, labels)`` kept; the input unchanged when it holds no box (mmdet returns early); None when there
        were boxes and none is kept (``keep_empty=True``: mmdet's pipeline drops the image and draws another).
    """
    if len(boxes) == 0:
        return boxes, labels
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_wh[0]) & ((boxes[:, 3] - boxes[:, 1]) > min_wh[1])
    if not keep.any():
        return None
    return boxes[keep], labels[keep]


def flip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of an image and its boxes: mmdet 2.x ``RandomFlip.bbox_flip`` uses the width itself,
    ``x1' = w - x2``, ``x2' = w - x1`` (no ``- 1``), ``w`` the image's (the crop's) width.

    Returns:
        ``(image, boxes)``: the mirrored h x w x 3 (a view) and K x 4 float32.
    """
    w = image.shape[1]
    out = np.asarray(boxes, dtype=np.float32).copy()
    out[:, 0] = w - boxes[:, 2]
    out[:, 2] = w - boxes[:, 0]
    return image[:, ::-1], out


def normalise_and_pad(image: np.ndarray, size: int) -> torch.Tensor:
    """mmdet ``Normalize(mean, std, to_rgb=True)`` then ``Pad(size=(S, S))`` on an h x w x 3 uint8 RGB image.

    ``(x - mean) * (1 / std)`` in float32 with F-ViT's ImageNet constants (:data:`ovdense.detection.fvit.PIXEL_MEAN`
    / ``PIXEL_STD``, 0-255 scale), bitwise what mmcv's ``imnormalize`` (OpenCV ``subtract`` / ``multiply`` in
    float32) and the test pipeline's :func:`~ovdense.detection.detector.prepare_image` compute; zeros (in
    normalised units) at the bottom and right.

    Returns:
        3 x S x S float32.

    Raises:
        InvalidArgumentError: the image is larger than S (the crop never is).
    """
    h, w = image.shape[:2]
    if h > size or w > size:
        raise InvalidArgumentError(f"normalise_and_pad: a {h} x {w} image does not fit {size} x {size}")
    mean = np.asarray(PIXEL_MEAN, dtype=np.float64).astype(np.float32)
    std_inv = (1.0 / np.asarray(PIXEL_STD, dtype=np.float64)).astype(np.float32)
    padded = np.zeros((size, size, 3), dtype=np.float32)
    padded[:h, :w] = (image.astype(np.float32) - mean) * std_inv
    return torch.from_numpy(padded).permute(2, 0, 1).contiguous()


# -- the annotation file ------------------------------------------------------------------------------------------


def _bad(path, what: str) -> OvdenseError:
    return OvdenseError(f"the annotation file {path}: {what}")


def _read_json(path: Path) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise OvdenseError(f"cannot read the annotation file {path}: {err.strerror or first_line(err)}") from None
    try:
        dataset = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OvdenseError(f"the annotation file {path} is not JSON: {first_line(err)}") from None
    if not isinstance(dataset, dict):
        raise _bad(path, "not a COCO instances file (a JSON object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            has = "has no" if key not in dataset else "has a non-list"
            raise _bad(path, f"{has} {key!r} list; not a COCO instances file")
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or not is_json_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise _bad(path, f"category #{i} needs an integer 'id' and a 'name'")
    return dataset


def _parse_ov_coco(path: Path, dataset: dict, categories: OVCategories):
    """The images and boxes CLIPSelf's ``CocoDatasetOV`` trains on, from a COCO instances file.

    Returns:
        ``(images, boxes, labels, stats)``: ``images`` a list of ``(id, file_name, height, width)`` kept, in file
        order; ``boxes[k]`` the n_k x 4 float32 XYXY boxes of image k, ``labels[k]`` its (n_k,) int64 labels.
    """
    images: dict[int, tuple[str, int, int]] = {}
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or not is_json_int(img.get("id")):
            raise _bad(path, f"image #{i} has no integer 'id'")
        if img["id"] in images:
            raise _bad(path, f"image id {img['id']} appears twice")
        name, h, w = img.get("file_name"), img.get("height"), img.get("width")
        if not isinstance(name, str) or not name or not is_json_int(h) or not is_json_int(w) or h <= 0 or w <= 0:
            raise _bad(
                path,
                f"image {img['id']} needs a 'file_name' and positive integer 'width' and 'height' "
                f"(has {short_repr(name)}, {short_repr(w)} x {short_repr(h)})",
            )
        images[img["id"]] = (name, h, w)
    category_ids = {cat["id"] for cat in dataset["categories"]}
    label_of = {cid: k for k, cid in enumerate(categories.ids)}
    base = set(categories.base_ids)
    boxes: dict[int, list[list[float]]] = {}
    labels: dict[int, list[int]] = {}
    with_base: set[int] = set()
    stats = dict.fromkeys(("novel", "other", "ignore", "no_overlap", "degenerate", "crowd", "boxes"), 0)
    seen_ids: set = set()
    for i, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or not is_json_int(ann.get("id")):
            raise _bad(path, f"annotation #{i} has no integer 'id'")
        label = f"annotation {ann['id']}"
        if ann["id"] in seen_ids:  # mmdet asserts unique annotation ids (coco.py load_annotations)
            raise _bad(path, f"{label} appears twice")
        seen_ids.add(ann["id"])
        for key in ("image_id", "category_id", "bbox", "area"):
            if key not in ann:
                raise _bad(path, f"{label} has no {key!r}")
        if ann["image_id"] not in images:
            raise _bad(path, f"{label} has image_id {short_repr(ann['image_id'])}, which is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise _bad(path, f"{label} has category_id {short_repr(ann['category_id'])}, which is not in 'categories'")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(is_json_number, bbox)):
            raise _bad(path, f"{label} has bbox {short_repr(bbox)}, not 4 numbers [x, y, width, height]")
        if not is_json_number(ann["area"]):
            raise _bad(path, f"{label} has area {short_repr(ann['area'])}, not a number")
        # 1. Novel (and non-OV-COCO) annotations go before anything else: no rule below can let one through, and
        #    they do not make an image eligible (CLIPSelf's *_seen_2_65_cat.json does not hold them at all).
        if ann["category_id"] not in base:
            stats["novel" if ann["category_id"] in label_of else "other"] += 1
            continue
        image_id = ann["image_id"]
        # mmdet _filter_imgs: an image is eligible when it has any annotation of the classes, whatever
        # _parse_ann_info later keeps (crowd-only or degenerate-only images train as background).
        with_base.add(image_id)
        # 2. mmdet 2.28.1 CocoDataset._parse_ann_info = CLIPSelf coco_ov.py _parse_ann_info, in its order.
        if ann.get("ignore", False):
            stats["ignore"] += 1
            continue
        _, img_h, img_w = images[image_id]
        x1, y1, w, h = bbox
        inter_w = max(0, min(x1 + w, img_w) - max(x1, 0))
        inter_h = max(0, min(y1 + h, img_h) - max(y1, 0))
        if inter_w * inter_h == 0:
            stats["no_overlap"] += 1
            continue
        if ann["area"] <= 0 or w < 1 or h < 1:
            stats["degenerate"] += 1
            continue
        if ann.get("iscrowd", False):
            # mmdet moves crowd boxes to gt_bboxes_ignore, which the config's Collect drops and F-ViT's
            # assigners would not read anyway (ignore_iof_thr=-1): they are simply not targets.
            stats["crowd"] += 1
            continue
        boxes.setdefault(image_id, []).append([x1, y1, x1 + w, y1 + h])
        labels.setdefault(image_id, []).append(label_of[ann["category_id"]])
    kept = []
    small = 0
    for image_id, (name, h, w) in images.items():
        if image_id not in with_base:
            continue
        if min(w, h) < MIN_IMAGE_SIZE:
            small += 1
            continue
        kept.append((image_id, name, h, w))
    stats.update(images_in_file=len(images), images_without_base=len(images) - len(with_base), images_small=small)
    # mmdet builds the box array from Python floats in one np.array(..., dtype=float32): x1 + w is rounded once.
    box_arrays = [np.asarray(boxes.get(k[0], []), dtype=np.float32).reshape(-1, 4) for k in kept]
    label_arrays = [np.asarray(labels.get(k[0], []), dtype=np.int64) for k in kept]
    stats["images"] = len(kept)
    stats["images_without_boxes"] = sum(1 for b in box_arrays if len(b) == 0)
    stats["boxes"] = int(sum(len(b) for b in box_arrays))
    return kept, box_arrays, label_arrays, stats


# -- the data set -------------------------------------------------------------------------------------------------


class DetectionTrainSet(torch.utils.data.Dataset):
    """F-ViT's training set (CLIPSelf ``CocoDatasetOV`` + mmdet 2.28.1's train pipeline), map-style.

    OV-COCO (``benchmark="ov-coco"``), from the standard ``instances_train2017.json`` or CLIPSelf's
    ``instances_train2017_seen_2_65_cat.json``:

    - Labels are positions in the 65 OV-COCO classes (COCO-id order, :func:`ovdense.eval.detection.ov_coco_categories`;
      CLIPSelf's ``mscoco_65_classes.json``), 0..64; only the 48 base classes ever occur.
    - Every annotation of a novel class (and of the 15 COCO classes outside the 65) is removed first. What is left
      is what OVR-CNN's ``ipynb/003.ipynb`` writes to ``instances_train2017_seen_2.json`` (base annotations,
      crowd ones included; images with at least one), which ``*_seen_2_65_cat.json`` is with the 65 categories
      listed (the file itself, from the authors' Drive, is unverified); on that file the removal changes nothing.
    - mmdet ``CocoDataset._parse_ann_info`` (= CLIPSelf ``coco_ov.py``): annotations with ``ignore`` set, boxes
      with no overlap with the image (per the json's ``width``/``height``), ``area <= 0``, ``w < 1`` or ``h < 1``
      are skipped; crowd boxes are dropped (mmdet makes them ``gt_bboxes_ignore``, which the config does not
      collect). COCO's two ``h = 0`` boxes (annotations 918 and 2206849) are skipped here rather than refused.
    - mmdet ``CocoDataset._filter_imgs``: images without any base annotation, or with a side under 32 px per the
      json (no image is decoded to build the set), are left out. An image whose base annotations are all crowd or
      degenerate stays (mmdet checks annotations, not the boxes it keeps) and trains as background.

    Args:
        annotation_file: a COCO instances json listing (at least) the 65 OV-COCO categories by COCO 2017 name.
        image_dir: the folder the images' ``file_name`` are relative to (``train2017/``).
        benchmark: ``"ov-coco"``; ``"ov-lvis"`` raises :class:`NotAvailableError`.
        image_size: S (640 for ViT-B/16, 896 for ViT-L/14 on OV-COCO).
        seed: base seed (>= 0) of every sample's generator.
        ratio_range: ``Resize``'s ``ratio_range``; the target side is ``int(S * U(lo, hi))``.
        flip: the horizontal flip probability.
        resample_empty: also re-draw a sample whose crop keeps no box (mmdet trains on it as background: False).

    ``dataset[i]`` is a dict:

    - ``image``: 3 x S x S float32, ImageNet-normalised RGB, zero-padded at the bottom and right.
    - ``boxes``: K x 4 float32 XYXY in the padded input's pixels (inside ``image_shape``); K may be 0.
    - ``labels``: (K,) int64 in 0..64.
    - ``image_shape``: ``(h, w)`` of the valid (unpadded) region.
    - ``index``: i; ``image_index``: the index of the image in the sample (differs from i after a re-draw or an
      unreadable file); ``image_id``: its COCO id.
    - ``skipped``: unreadable images passed over to reach it (:class:`~ovdense.train.data.DistillDataset`'s rule:
      warned once per file and process, replaced by the next readable image ``(j + 1) % len``, ...).
    - ``resampled``: attempts thrown away because :func:`filter_boxes` left no box (mmdet ``_rand_another``: a
      uniform draw among the images of the same aspect group, ``width / height > 1`` or not, itself included).

    Attributes:
        categories: the 65 classes (:class:`~ovdense.eval.detection.OVCategories`); ``labels`` index them.
        stats: what the annotation filter did (counts of annotations removed by each rule, images kept ...).

    Raises:
        OvdenseError: an unreadable or malformed annotation file (one line), missing OV-COCO categories, no
            image left.
        InvalidArgumentError: a bad argument; NotAvailableError: ``benchmark="ov-lvis"``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        benchmark: str,
        image_size: int,
        seed: int = 0,
        ratio_range: Sequence[float] = (0.1, 2.0),
        flip: float = 0.5,
        resample_empty: bool = False,
    ):
        if benchmark == "ov-lvis":
            raise NotAvailableError("OV-LVIS training is not available yet")
        if benchmark not in TRAIN_BENCHMARKS:
            raise InvalidArgumentError(
                f"unknown detection training benchmark {benchmark!r}; choose one of: {', '.join(TRAIN_BENCHMARKS)}"
            )
        if isinstance(image_size, bool) or int(image_size) != image_size or image_size < 1:
            raise InvalidArgumentError(f"image_size: expected a positive integer, got {image_size!r}")
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise InvalidArgumentError(f"seed: expected an integer >= 0, got {seed!r}")
        lo, hi = (float(v) for v in ratio_range)
        if not 0 < lo <= hi:
            raise InvalidArgumentError(f"ratio_range: expected 0 < low <= high, got {tuple(ratio_range)}")
        if not 0.0 <= float(flip) <= 1.0:
            raise InvalidArgumentError(f"flip: expected a probability in [0, 1], got {flip!r}")
        self.benchmark = benchmark
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.ratio_range = (lo, hi)
        self.flip = float(flip)
        self.resample_empty = bool(resample_empty)
        self.image_dir = Path(image_dir)
        self.epoch = 0

        path = Path(annotation_file)
        dataset = _read_json(path)
        self.categories = ov_coco_categories(dataset["categories"], f"the annotation file {path}")
        kept, boxes, labels, self.stats = _parse_ov_coco(path, dataset, self.categories)
        del dataset
        if not kept:
            raise OvdenseError(
                f"the annotation file {path} leaves no training image (an image needs a base-class annotation and "
                f"both sides >= {MIN_IMAGE_SIZE} px)"
            )
        # Flat numpy arrays rather than lists of dicts: DataLoader workers touching Python objects copy the pages
        # of a forked list (refcounts), growing memory with every worker on COCO's 100k images.
        self._image_ids = np.array([k[0] for k in kept], dtype=np.int64)
        self._files = np.array([k[1] for k in kept])
        self._json_hw = np.array([(k[2], k[3]) for k in kept], dtype=np.int64)
        counts = np.array([len(b) for b in boxes], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._boxes = np.concatenate(boxes) if counts.sum() else np.zeros((0, 4), dtype=np.float32)
        self._labels = np.concatenate(labels) if counts.sum() else np.zeros(0, dtype=np.int64)
        # mmdet CustomDataset._set_group_flag, from the json's sizes: the pool _rand_another draws from.
        self._group = (self._json_hw[:, 1] / self._json_hw[:, 0] > 1).astype(np.uint8)
        self._pools = [np.flatnonzero(self._group == g) for g in (0, 1)]
        # Per process (each worker has its copy): files already reported, so each warns once and is not read again.
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return (
            f"DetectionTrainSet({self.benchmark!r}, {len(self)} images, {self.stats['boxes']} boxes, "
            f"S={self.image_size}, epoch={self.epoch})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's augmentations (call before building the epoch's DataLoader)."""
        if int(epoch) < 0:
            raise InvalidArgumentError(f"epoch: expected >= 0, got {epoch}")
        self.epoch = int(epoch)

    def rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        """The generator of attempt ``attempt`` of sample ``index`` at the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, int(index), int(attempt)])

    def annotations(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``(n x 4 float32 XYXY boxes, (n,) int64 labels)`` of image ``j`` in its original pixels (copies)."""
        a, b = self._offsets[j], self._offsets[j + 1]
        return self._boxes[a:b].copy(), self._labels[a:b].copy()

    def image_path(self, j: int) -> Path:
        return self.image_dir / str(self._files[j])

    def _load(self, j: int) -> tuple[np.ndarray, int, int]:
        """``(image, used index, skipped)``: the first readable image at or after ``j``."""
        n = len(self)
        for skipped in range(n):
            k = (j + skipped) % n
            if k in self._bad:
                continue
            try:
                return decode_image(self.image_path(k), exif=True), k, skipped
            except ImageDecodeError as err:
                self._bad.add(k)
                warnings.warn(
                    f"skipping unreadable image {self.image_path(k)}: {err.reason}; using the next image", stacklevel=3
                )
        raise OvdenseError(f"none of the {n} training images under {self.image_dir} could be read")

    def check_readable(self) -> None:
        """Raise :class:`~ovdense.errors.OvdenseError` (one line) unless some image decodes."""
        self._load(0)

    def transform(
        self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> dict | None:
        """The train pipeline on one decoded image (H x W x 3 uint8 RGB) and its boxes, with the draws of ``rng``.

        Returns:
            ``image`` / ``boxes`` / ``labels`` / ``image_shape`` as in the class docstring, or None when mmdet's
            pipeline returns None (:func:`filter_boxes` removed every box; also a crop without boxes when
            ``resample_empty``).
        """
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo  # mmdet: np.random.random_sample() * (max - min) + min
        image, boxes = resize_with_boxes(image, boxes, random_scale(self.image_size, ratio))
        image, boxes, labels, _ = random_crop(image, boxes, labels, self.image_size, rng)
        if self.resample_empty and len(boxes) == 0:
            return None
        kept = filter_boxes(boxes, labels)
        if kept is None:
            return None
        boxes, labels = kept
        if rng.random() < self.flip:
            image, boxes = flip(image, boxes)
        h, w = image.shape[:2]
        return {
            "image": normalise_and_pad(image, self.image_size),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "image_shape": (int(h), int(w)),
        }

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        j, skipped = index, 0
        for attempt in range(_MAX_ATTEMPTS):
            rng = self.rng(index, attempt)
            image, used, s = self._load(j)
            skipped += s
            boxes, labels = self.annotations(used)
            out = self.transform(image, boxes, labels, rng)
            if out is not None:
                out.update(
                    index=index,
                    image_index=used,
                    image_id=int(self._image_ids[used]),
                    skipped=skipped,
                    resampled=attempt,
                )
                return out
            pool = self._pools[self._group[used]]
            j = int(pool[rng.integers(len(pool))])
        raise OvdenseError(
            f"sample {index}: {_MAX_ATTEMPTS} draws in a row left no box after FilterAnnotations; the boxes of "
            f"this data set are too small for S={self.image_size} and ratio_range={self.ratio_range}"
        )


def collate(samples: Sequence[dict]) -> dict:
    """Batch :class:`DetectionTrainSet` samples.

    Returns:
        ``images`` B x 3 x S x S float32; ``boxes`` B tensors K_b x 4; ``labels`` B tensors (K_b,);
        ``image_shapes`` B ``(h, w)`` tuples (what :meth:`FViT.image_features` takes); ``index``,
        ``image_index``, ``image_id``, ``skipped``, ``resampled`` (B,) int64.
    """
    if not samples:
        raise InvalidArgumentError("collate: no samples")
    out = {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "image_shapes": [tuple(s["image_shape"]) for s in samples],
    }
    for key in ("index", "image_index", "image_id", "skipped", "resampled"):
        out[key] = torch.tensor([int(s[key]) for s in samples], dtype=torch.int64)
    return out


#: The trainer's DataLoader takes the dataset's own ``collate``.
DetectionTrainSet.collate = staticmethod(collate)
