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

OV-LVIS (``configs/ov_lvis/*_original.py``) adds ``LoadAnnotations(with_mask=True)``: the instance masks
(:func:`decode_mask`) follow the image through steps 2-6 (:func:`resize_mask`, :func:`resize_and_crop_masks` with
the boxes recomputed from the cropped masks by :func:`mask_boxes`, the same :func:`filter_boxes` selection,
:func:`flip_masks`, :func:`pad_masks`); no extra random draw.

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

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidArgumentError, OvdenseError
from ..eval.detection import (
    OVCategories,
    is_json_int,
    is_json_number,
    ov_coco_categories,
    read_annotation_json,
    short_repr,
)
from ..images import ImageDecodeError, decode_image
from .fvit import PIXEL_MEAN, PIXEL_STD

__all__ = [
    "MIN_BOX_SIZE",
    "MIN_IMAGE_SIZE",
    "TRAIN_BENCHMARKS",
    "DetectionTrainSet",
    "boxes_kept",
    "collate",
    "crop_boxes",
    "decode_mask",
    "filter_boxes",
    "flip",
    "flip_masks",
    "mask_boxes",
    "normalise_and_pad",
    "pad_masks",
    "random_crop",
    "resize_and_crop_masks",
    "resize_mask",
    "random_scale",
    "rescale_size",
    "resize_with_boxes",
]

#: Benchmarks :class:`DetectionTrainSet` knows (OV-COCO: boxes; OV-LVIS: boxes and instance masks).
TRAIN_BENCHMARKS = ("ov-coco", "ov-lvis")
#: mmdet ``CocoDataset._filter_imgs(min_size=32)``: images with a side (per the json) under 32 px are left out.
MIN_IMAGE_SIZE = 32
#: CLIPSelf's ``FilterAnnotations(min_gt_bbox_wh=(0.01, 0.01))``: boxes must be wider and taller than this.
MIN_BOX_SIZE = (0.01, 0.01)
# mmdet re-draws forever; a data set on which nearly every draw fails is a bug worth one clear error instead.
_MAX_ATTEMPTS = 1000


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
    out, valid = crop_boxes(boxes, (y, x), (crop_h, crop_w))
    return image[y : y + crop_h, x : x + crop_w], out[valid], np.asarray(labels)[valid], (y, x)


def crop_boxes(boxes: np.ndarray, corner: tuple[int, int], crop: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The box part of :func:`random_crop`: ``(boxes shifted by the corner (y, x) and clipped to the crop (h, w),
    float32 K x 4; (K,) bool, which are kept)``; every box is returned, ``valid`` says which survive."""
    y, x = corner
    crop_h, crop_w = crop
    out = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) - np.array([x, y, x, y], dtype=np.float32)
    out[:, 0::2] = np.clip(out[:, 0::2], 0, crop_w)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, crop_h)
    return out, (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])


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
    keep = boxes_kept(boxes, min_wh)
    if not keep.any():
        return None
    return boxes[keep], labels[keep]


def boxes_kept(boxes: np.ndarray, min_wh: tuple[float, float] = MIN_BOX_SIZE) -> np.ndarray:
    """(K,) bool: the boxes :func:`filter_boxes` keeps (mmdet ``FilterAnnotations`` applies the same index to
    ``gt_labels`` and ``gt_masks``)."""
    return ((boxes[:, 2] - boxes[:, 0]) > min_wh[0]) & ((boxes[:, 3] - boxes[:, 1]) > min_wh[1])


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


# -- masks (OV-LVIS) ----------------------------------------------------------------------------------------------


def decode_mask(segmentation, height: int, width: int) -> np.ndarray:
    """mmdet ``LoadAnnotations(with_mask=True, poly2mask=True)._poly2mask``: one instance's H x W uint8 0/1 mask.

    Polygons (a list of ``[x1, y1, x2, y2, ...]`` parts) are rasterised by pycocotools (``frPyObjects`` on the
    list, the parts merged); an uncompressed RLE (``counts`` a list) is converted with ``frPyObjects``, a compressed
    one decoded as it is.
    """
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """mmdet ``BitmapMasks.rescale`` (``Resize._resize_masks`` with ``keep_ratio=True``): one h x w uint8 mask to
    ``size = (w', h')`` (:func:`rescale_size` of the same scale, so the image's size) by OpenCV's nearest neighbour
    (``INTER_NEAREST``, mmcv ``imrescale(..., interpolation='nearest')``)."""
    import cv2

    return cv2.resize(np.ascontiguousarray(mask), tuple(int(v) for v in size), interpolation=cv2.INTER_NEAREST)


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """mmdet ``BitmapMasks.get_bboxes`` (``RandomCrop(recompute_bbox=True)``): per K x h x w mask the float32 box
    ``[x_min, y_min, x_max + 1, y_max + 1]`` of its set pixels; ``[0, 0, 0, 0]`` for an empty mask (which
    :func:`filter_boxes` then removes)."""
    out = np.zeros((len(masks), 4), dtype=np.float32)
    if len(masks) == 0:
        return out
    x_any, y_any = masks.any(axis=1), masks.any(axis=2)
    for k in range(len(masks)):
        xs, ys = np.flatnonzero(x_any[k]), np.flatnonzero(y_any[k])
        if len(xs) and len(ys):
            out[k] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return out


def flip_masks(masks: np.ndarray) -> np.ndarray:
    """mmdet ``BitmapMasks.flip('horizontal')``: K x h x w mirrored left-right (a view)."""
    return masks[:, :, ::-1]


def pad_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """mmdet ``Pad._pad_masks`` (``pad_val`` 0 for masks): K x h x w to K x S x S uint8, zeros at the bottom and
    right."""
    k, h, w = masks.shape
    if h > size or w > size:
        raise InvalidArgumentError(f"pad_masks: {h} x {w} masks do not fit {size} x {size}")
    out = np.zeros((k, size, size), dtype=np.uint8)
    out[:, :h, :w] = masks
    return out


def resize_and_crop_masks(
    masks: Sequence[np.ndarray], size: tuple[int, int], corner: tuple[int, int], crop: tuple[int, int]
) -> np.ndarray:
    """:func:`resize_mask` to ``size = (w', h')`` then mmdet ``BitmapMasks.crop`` at ``corner = (y, x)`` to
    ``crop = (h, w)`` (inside the resized mask, as :func:`random_crop`'s crop always is), one mask at a time, so
    that only the K crops are held: K x h x w uint8. ``masks`` may be any sequence (a lazy decoder)."""
    y, x = corner
    crop_h, crop_w = crop
    out = np.zeros((len(masks), crop_h, crop_w), dtype=np.uint8)
    for k in range(len(masks)):
        out[k] = resize_mask(masks[k], size)[y : y + crop_h, x : x + crop_w]
    return out


# -- the annotation file ------------------------------------------------------------------------------------------


def _bad(path, what: str) -> OvdenseError:
    return OvdenseError(f"the annotation file {path}: {what}")


def _not_a_target(ann: dict, bbox, image_size: tuple[int, int]) -> str | None:
    """Why mmdet 2.28.1's ``CocoDataset._parse_ann_info`` does not make an annotation a box target (its rules in its
    order: ``ignore``, ``no_overlap`` with the image, ``degenerate`` (area <= 0, w < 1 or h < 1), ``crowd``), or
    None. Crowd boxes go to ``gt_bboxes_ignore``, which the config's ``Collect`` drops and F-ViT's assigners would not
    read anyway (``ignore_iof_thr=-1``): they are simply not targets."""
    if ann.get("ignore", False):
        return "ignore"
    img_h, img_w = image_size
    x1, y1, w, h = bbox
    inter_w = max(0, min(x1 + w, img_w) - max(x1, 0))
    inter_h = max(0, min(y1 + h, img_h) - max(y1, 0))
    if inter_w * inter_h == 0:
        return "no_overlap"
    if ann["area"] <= 0 or w < 1 or h < 1:
        return "degenerate"
    if ann.get("iscrowd", False):
        return "crowd"
    return None


def _read_json(path: Path) -> dict:
    dataset = read_annotation_json(path)
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
        # 2. mmdet 2.28.1 CocoDataset._parse_ann_info (= CLIPSelf coco_ov.py's; LVISV1Dataset inherits it).
        reason = _not_a_target(ann, bbox, images[image_id][1:])
        if reason is not None:
            stats[reason] += 1
            continue
        x1, y1, w, h = bbox
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


#: LVIS v1's number of categories; OV-LVIS's split files (``ovdense/eval/classes``) list them: 866 base, 337 novel.
LVIS_V1_NUM_CLASSES = 1203
_COCO_IMAGES_URL = "http://images.cocodataset.org/"


def _ov_lvis_categories(path: Path, cats: list[dict]) -> tuple[OVCategories, tuple[int, ...]]:
    """LVIS v1's 1203 categories in id order (labels 0..1202), novel = OV-LVIS's 337 rare classes, and each class's
    training ``image_count`` with the rare ones set to 0 (CLIPSelf's ``lvis_v1_train_cat_norare_info.json``)."""
    from ..eval.detection import read_split

    base, novel = read_split("ov_lvis_base.txt"), set(read_split("ov_lvis_novel.txt"))
    known = set(base) | novel
    cats = sorted(cats, key=lambda c: c["id"])
    if len({c["id"] for c in cats}) != len(cats):
        raise _bad(path, "a category id appears twice")
    if len(cats) != LVIS_V1_NUM_CLASSES:
        raise _bad(path, f"has {len(cats)} categories; LVIS v1 has {LVIS_V1_NUM_CLASSES} (give lvis_v1_train.json)")
    counts = []
    for cat in cats:
        name, freq = cat["name"], cat.get("frequency")
        if name not in known:
            raise _bad(path, f"category {cat['id']} is named {name!r}, which is not an LVIS v1 class")
        if freq is not None and (freq == "r") != (name in novel):
            split = "novel (rare)" if name in novel else "base (common or frequent)"
            raise _bad(path, f"category {cat['id']} ({name!r}) has frequency {freq!r}, but OV-LVIS lists it as {split}")
        count = cat.get("image_count", 1)
        if not is_json_int(count) or count < 0:
            raise _bad(path, f"category {cat['id']} ({name!r}) has image_count {short_repr(count)}")
        counts.append(0 if name in novel else int(count))
    if len({c["name"] for c in cats}) != len(cats):
        raise _bad(path, "a category name appears twice")
    categories = OVCategories(
        ids=tuple(c["id"] for c in cats),
        names=tuple(c["name"] for c in cats),
        novel=tuple(c["name"] in novel for c in cats),
    )
    return categories, tuple(counts)


def _lvis_image_path(img: dict) -> str | None:
    """mmdet ``LVISV1Dataset.load_annotations``: ``coco_url`` without ``http://images.cocodataset.org/``, i.e.
    ``train2017/<file>`` or ``val2017/<file>`` (LVIS v1 train draws on both COCO splits); here the URL's last two
    parts, whatever its host; ``file_name`` when there is no ``coco_url``."""
    url = img.get("coco_url")
    if isinstance(url, str) and url:
        parts = [part for part in url.split("/") if part]
        rel = "/".join(parts[-2:])
    else:
        rel = img.get("file_name")
    if not isinstance(rel, str) or not rel or rel.startswith("/") or ".." in rel.split("/"):
        return None
    return rel


def _valid_segmentation(seg) -> bool:
    if isinstance(seg, list):
        return bool(seg) and all(isinstance(p, list) and p and all(map(is_json_number, p)) for p in seg)
    if isinstance(seg, dict):
        size = seg.get("size")
        return isinstance(seg.get("counts"), (str, list)) and isinstance(size, list) and len(size) == 2
    return False


def _parse_ov_lvis(path: Path, dataset: dict, categories: OVCategories):
    """The images, boxes and masks mmdet's ``LVISV1Dataset`` (CLIPSelf's ``LVISV1DatasetOV``) trains on, from an
    LVIS v1 train file with its rare annotations removed first.

    Returns:
        ``(images, boxes, labels, segmentations, stats)`` as :func:`_parse_ov_coco`, ``images`` holding the path
        relative to the data root (:func:`_lvis_image_path`) as the file name, and ``segmentations[k]`` the kept
        annotations' segmentations of image k, in the order of its boxes.
    """
    images: dict[int, tuple[str, int, int]] = {}
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or not is_json_int(img.get("id")):
            raise _bad(path, f"image #{i} has no integer 'id'")
        if img["id"] in images:
            raise _bad(path, f"image id {img['id']} appears twice")
        name, h, w = _lvis_image_path(img), img.get("height"), img.get("width")
        if name is None or not is_json_int(h) or not is_json_int(w) or h <= 0 or w <= 0:
            raise _bad(
                path,
                f"image {img['id']} needs a 'coco_url' (or 'file_name') and positive integer 'width' and 'height' "
                f"(has {short_repr(img.get('coco_url', img.get('file_name')))}, {short_repr(w)} x {short_repr(h)})",
            )
        images[img["id"]] = (name, h, w)
    label_of = {cid: k for k, cid in enumerate(categories.ids)}
    novel = set(categories.novel_ids)
    boxes: dict[int, list[list[float]]] = {}
    labels: dict[int, list[int]] = {}
    segmentations: dict[int, list] = {}
    with_ann: set[int] = set()
    stats = dict.fromkeys(("novel", "other", "ignore", "no_overlap", "degenerate", "crowd", "boxes"), 0)
    seen_ids: set = set()
    for i, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or not is_json_int(ann.get("id")):
            raise _bad(path, f"annotation #{i} has no integer 'id'")
        label = f"annotation {ann['id']}"
        if ann["id"] in seen_ids:
            raise _bad(path, f"{label} appears twice")
        seen_ids.add(ann["id"])
        for key in ("image_id", "category_id", "bbox", "area"):
            if key not in ann:
                raise _bad(path, f"{label} has no {key!r}")
        if ann["image_id"] not in images:
            raise _bad(path, f"{label} has image_id {short_repr(ann['image_id'])}, which is not in 'images'")
        if ann["category_id"] not in label_of:
            raise _bad(path, f"{label} has category_id {short_repr(ann['category_id'])}, which is not in 'categories'")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(is_json_number, bbox)):
            raise _bad(path, f"{label} has bbox {short_repr(bbox)}, not 4 numbers [x, y, width, height]")
        if not is_json_number(ann["area"]):
            raise _bad(path, f"{label} has area {short_repr(ann['area'])}, not a number")
        # 1. Rare (novel) annotations go first: CLIPSelf's lvis_v1_train_seen_1203_cat.json does not hold them, so
        #    they make no image eligible either.
        if ann["category_id"] in novel:
            stats["novel"] += 1
            continue
        image_id = ann["image_id"]
        with_ann.add(image_id)  # mmdet _filter_imgs: any annotation of the (remaining) classes
        # 2. mmdet 2.28.1 CocoDataset._parse_ann_info (= CLIPSelf coco_ov.py's; LVISV1Dataset inherits it).
        reason = _not_a_target(ann, bbox, images[image_id][1:])
        if reason is not None:
            stats[reason] += 1
            continue
        x1, y1, w, h = bbox
        seg = ann.get("segmentation")
        if not _valid_segmentation(seg):
            raise _bad(path, f"{label} has segmentation {short_repr(seg)}: give polygons (lists of x, y) or an RLE")
        boxes.setdefault(image_id, []).append([x1, y1, x1 + w, y1 + h])
        labels.setdefault(image_id, []).append(label_of[ann["category_id"]])
        segmentations.setdefault(image_id, []).append(seg)
    kept = []
    small = 0
    for image_id, (name, h, w) in images.items():
        if image_id not in with_ann:
            continue
        if min(w, h) < MIN_IMAGE_SIZE:
            small += 1
            continue
        kept.append((image_id, name, h, w))
    stats.update(images_in_file=len(images), images_without_base=len(images) - len(with_ann), images_small=small)
    box_arrays = [np.asarray(boxes.get(k[0], []), dtype=np.float32).reshape(-1, 4) for k in kept]
    label_arrays = [np.asarray(labels.get(k[0], []), dtype=np.int64) for k in kept]
    seg_lists = [segmentations.get(k[0], []) for k in kept]
    stats["images"] = len(kept)
    stats["images_without_boxes"] = sum(1 for b in box_arrays if len(b) == 0)
    stats["boxes"] = int(sum(len(b) for b in box_arrays))
    return kept, box_arrays, label_arrays, seg_lists, stats


class _PackedSegmentations:
    """Every kept annotation's segmentation in flat numpy arrays (no per-annotation Python objects for the
    DataLoader workers to copy): polygon coordinates as float64 (the json's numbers exactly), offsets per polygon
    and per annotation; RLEs (none in LVIS v1) in a small dict."""

    def __init__(self, segmentations: list):
        coords, poly_ends, ann_ends, self.rles = [], [], [], {}
        n = 0
        for k, seg in enumerate(segmentations):
            if isinstance(seg, dict):
                self.rles[k] = seg
            else:
                for polygon in seg:
                    coords.append(np.asarray(polygon, dtype=np.float64))
                    n += len(polygon)
                    poly_ends.append(n)
            ann_ends.append(len(poly_ends))
        self.coords = np.concatenate(coords) if coords else np.zeros(0, dtype=np.float64)
        self.poly_offsets = np.asarray([0, *poly_ends], dtype=np.int64)
        self.ann_offsets = np.asarray([0, *ann_ends], dtype=np.int64)

    def __getitem__(self, k: int):
        if k in self.rles:
            return self.rles[k]
        a, b = self.ann_offsets[k], self.ann_offsets[k + 1]
        return [self.coords[self.poly_offsets[p] : self.poly_offsets[p + 1]].tolist() for p in range(a, b)]


class _LazyMasks(Sequence):
    """The masks of one image's annotations, decoded (:func:`decode_mask` at the json's size) only when read; when
    the decoded image's size differs from the json's, resized to it by nearest neighbour (ours: mmdet would carry
    masks and image at different sizes)."""

    def __init__(self, segmentations: Sequence, json_hw: tuple[int, int], image_hw: tuple[int, int]):
        self._segmentations = segmentations
        self._json_hw = json_hw
        self._image_hw = image_hw

    def __len__(self) -> int:
        return len(self._segmentations)

    def __getitem__(self, k):
        mask = decode_mask(self._segmentations[k], *self._json_hw)
        if mask.shape != tuple(self._image_hw):
            mask = resize_mask(mask, (self._image_hw[1], self._image_hw[0]))
        return mask


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
        annotation_file: a COCO instances json listing (at least) the 65 OV-COCO categories by COCO 2017 name; for
            OV-LVIS an LVIS v1 train json (1203 categories).
        image_dir: the folder the images' ``file_name`` are relative to (``train2017/``); for OV-LVIS the folder
            holding ``train2017/`` and ``val2017/`` (the ``coco_url`` paths).
        benchmark: ``"ov-coco"`` or ``"ov-lvis"``.
        image_size: S (640 for ViT-B/16, 896 for ViT-L/14 on OV-COCO; 1024 / 896 on OV-LVIS).
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
    - ``masks`` (OV-LVIS only): K x S x S uint8 0/1, one per box, zero-padded like the image.

    OV-LVIS (``benchmark="ov-lvis"``), from LVIS v1's ``lvis_v1_train.json`` or CLIPSelf's
    ``lvis_v1_train_seen_1203_cat.json`` (mmdet ``LVISV1Dataset``; CLIPSelf's ``LVISV1DatasetOV`` only adds class
    lists that training does not read):

    - Labels are positions in LVIS v1's 1203 categories sorted by id (checked against OV-LVIS's split files:
      names, and frequency ``r`` exactly for the 337 novel ones), 0..1202; only the 866 base classes occur.
    - Every annotation of a rare (novel) class is removed first (the ``*_seen_1203_cat.json`` holds none), then
      the OV-COCO rules above (ignore, no overlap, degenerate, crowd; images without an annotation left or with a
      side under 32 px). Kept annotations need a ``segmentation`` (polygons or RLE).
    - Image files: ``image_dir`` is the LVIS root; an image is ``image_dir / <train2017|val2017>/<file>``, the
      last two parts of its ``coco_url`` (LVIS v1 train uses COCO images of both splits).
    - Masks are decoded at the json's size by pycocotools when a sample is drawn (only those of boxes the crop
      keeps), carried through resize (nearest), crop, flip and pad; ``RandomCrop(recompute_bbox=True)`` replaces
      the boxes by the cropped masks' (:func:`mask_boxes`), so an instance whose mask left the crop goes.

    Attributes:
        categories: the 65 (1203) classes (:class:`~ovdense.eval.detection.OVCategories`); ``labels`` index them.
        image_counts: OV-LVIS only: per class (label order) the json's ``image_count`` with the rare classes' set
            to 0 (CLIPSelf's ``lvis_v1_train_cat_norare_info.json``; a missing count reads 1): the class weights'
            source (:func:`ovdense.detection.targets.class_weights_ov_lvis`).
        with_masks: whether samples carry ``masks`` (OV-LVIS).
        stats: what the annotation filter did (counts of annotations removed by each rule, images kept ...;
            ``novel`` counts the removed rare annotations on OV-LVIS).

    Raises:
        OvdenseError: an unreadable or malformed annotation file (one line), missing OV-COCO categories (not LVIS
            v1's 1203), no image left.
        InvalidArgumentError: a bad argument.
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
        #: Whether samples carry instance masks (OV-LVIS).
        self.with_masks = benchmark == "ov-lvis"
        self._segmentations = None
        if self.with_masks:
            self.categories, self.image_counts = _ov_lvis_categories(path, dataset["categories"])
            kept, boxes, labels, segmentations, self.stats = _parse_ov_lvis(path, dataset, self.categories)
            self._segmentations = _PackedSegmentations([seg for per_image in segmentations for seg in per_image])
            del segmentations
        else:
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

    def segmentations(self, j: int) -> list:
        """The segmentations (polygons or RLE, as in the json) of image ``j``'s boxes, in their order (OV-LVIS)."""
        if self._segmentations is None:
            raise InvalidArgumentError(f"the {self.benchmark} training set has no masks")
        return [self._segmentations[k] for k in range(self._offsets[j], self._offsets[j + 1])]

    def masks(self, j: int) -> np.ndarray:
        """Image ``j``'s instance masks at the json's size: n x H x W uint8 0/1 (:func:`decode_mask`; OV-LVIS)."""
        h, w = (int(v) for v in self._json_hw[j])
        segs = self.segmentations(j)
        return np.stack([decode_mask(seg, h, w) for seg in segs]) if segs else np.zeros((0, h, w), dtype=np.uint8)

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
        self,
        image: np.ndarray,
        boxes: np.ndarray,
        labels: np.ndarray,
        rng: np.random.Generator,
        masks: Sequence[np.ndarray] | None = None,
    ) -> dict | None:
        """The train pipeline on one decoded image (H x W x 3 uint8 RGB) and its boxes, with the draws of ``rng``.

        ``masks`` (OV-LVIS): one H x W uint8 mask per box (any sequence; only the masks of boxes the crop keeps are
        read); they follow the image (:func:`resize_mask`, crop, the boxes recomputed from the cropped masks by
        :func:`mask_boxes`, :func:`filter_boxes`' selection, :func:`flip_masks`, :func:`pad_masks`) and the sample
        gains ``masks``. The draws are the same with or without masks.

        Returns:
            ``image`` / ``boxes`` / ``labels`` / ``image_shape`` (and ``masks``) as in the class docstring, or None
            when mmdet's pipeline returns None (:func:`filter_boxes` removed every box; also a crop without boxes
            when ``resample_empty``).
        """
        if masks is not None:
            return self._transform_with_masks(image, boxes, labels, rng, masks)
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

    def _transform_with_masks(self, image, boxes, labels, rng, masks) -> dict | None:
        """:meth:`transform` with masks: mmdet's ``Resize`` / ``RandomCrop(recompute_bbox=True)`` /
        ``FilterAnnotations`` / ``RandomFlip`` / ``Pad`` on ``gt_masks`` too."""
        if len(masks) != len(boxes):
            raise InvalidArgumentError(f"transform: {len(boxes)} boxes but {len(masks)} masks")
        if isinstance(masks, np.ndarray) and masks.shape[1:] != image.shape[:2]:
            raise InvalidArgumentError(f"transform: masks of {masks.shape[1:]} for a {image.shape[:2]} image")
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        image, boxes = resize_with_boxes(image, boxes, random_scale(self.image_size, ratio))
        resized_h, resized_w = image.shape[:2]
        image, _, labels, corner = random_crop(image, boxes, labels, self.image_size, rng)
        crop = image.shape[:2]
        _, valid = crop_boxes(boxes, corner, crop)
        kept_masks = [masks[int(k)] for k in np.flatnonzero(valid)]  # mmdet: results[mask_key][valid_inds]
        cropped = resize_and_crop_masks(kept_masks, (resized_w, resized_h), corner, crop)
        boxes = mask_boxes(cropped)  # recompute_bbox=True
        if self.resample_empty and len(boxes) == 0:
            return None
        if len(boxes):
            keep = boxes_kept(boxes)
            if not keep.any():
                return None
            boxes, labels, cropped = boxes[keep], labels[keep], cropped[keep]
        if rng.random() < self.flip:
            image, boxes = flip(image, boxes)
            cropped = flip_masks(cropped)
        h, w = image.shape[:2]
        return {
            "image": normalise_and_pad(image, self.image_size),
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
            "masks": torch.from_numpy(pad_masks(cropped, self.image_size)),
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
            masks = None
            if self.with_masks:
                json_hw = (int(self._json_hw[used][0]), int(self._json_hw[used][1]))
                masks = _LazyMasks(self.segmentations(used), json_hw, image.shape[:2])
            out = self.transform(image, boxes, labels, rng, masks)
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
        ``image_index``, ``image_id``, ``skipped``, ``resampled`` (B,) int64; with masks (OV-LVIS) also ``masks``,
        B uint8 tensors K_b x S x S.
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
    if "masks" in samples[0]:
        out["masks"] = [s["masks"] for s in samples]
    return out


#: The trainer's DataLoader takes the dataset's own ``collate``.
DetectionTrainSet.collate = staticmethod(collate)
