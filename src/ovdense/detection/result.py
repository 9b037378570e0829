"""What a detector returns for one image (boxes, scores, labels, optional masks), as JSON and as a picture.

Colours: detection ``label`` ``i`` is drawn in :func:`detection_colours` ``[i]``, the PASCAL VOC colours of
:func:`ovdense.viz.label_palette` from colour 1 on. VOC colour 0 is black (the segmentation background), which
would make class 0 (COCO's ``person``) invisible on dark images; past 255 classes (LVIS) the colours repeat.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..viz import (
    MAX_PALETTE,
    VizInputError,
    display_name,
    label_palette,
    legend_panel,
    load_font,
    with_panel,
)

__all__ = ["DetectionResult", "detection_colours", "mask_to_rle"]

_DARK_TEXT = (0, 0, 0)
_LIGHT_TEXT = (255, 255, 255)


def detection_colours(num_classes: int) -> np.ndarray:
    """``num_classes`` x 3 uint8 RGB: row ``i`` is the colour of class ``i`` in :meth:`DetectionResult.overlay`.

    VOC colours 1, 2, ..., 255 (:func:`ovdense.viz.label_palette`), then again from 1: never black.
    """
    num_classes = int(num_classes)
    if num_classes < 0:
        raise VizInputError(f"num_classes must be >= 0, got {num_classes}")
    palette = label_palette(MAX_PALETTE)
    return palette[1 + np.arange(num_classes) % (MAX_PALETTE - 1)]


# -- drawing helpers (those the segmentation pictures do not share) ------------------------------------------------


def _tag_font_size(height: int, width: int) -> int:
    """Box tags: 1/40 of the image's short side, 11..96 px (legible on thumbnails, modest on photos)."""
    return int(np.clip(round(min(height, width) / 40), 11, 96))


def _text_colour(colour) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in colour)
    return _DARK_TEXT if 0.299 * r + 0.587 * g + 0.114 * b > 140 else _LIGHT_TEXT


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise VizInputError(f"image must be an H x W x 3 RGB array or a PIL image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise VizInputError(f"image must be uint8, got dtype {arr.dtype}")
    return arr


def _float_json(value) -> float:
    # The shortest decimal that reads back as the same float32 (0.87, not 0.8700000047683716).
    return float(str(np.float32(value)))


def mask_to_rle(mask: np.ndarray) -> dict:
    """H x W bool -> COCO compressed RLE ``{"size": [H, W], "counts": str}`` (pycocotools)."""
    from pycocotools import mask as mask_utils

    encoded = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


# -- the result --------------------------------------------------------------------------------------------------


@dataclass
class DetectionResult:
    """Detections in one image.

    Attributes:
        boxes: K x 4 float32 ``x1, y1, x2, y2`` in the original image's pixels (x2 >= x1, y2 >= y1).
        scores: K float32.
        labels: K int64 indices into ``class_names``.
        class_names: the detector's class names (without ``background``).
        image_size: ``(H, W)`` of the original image.
        masks: K x H x W bool instance masks, or None.

    Arrays are checked and converted to these dtypes on construction; bad shapes or values raise
    :class:`ovdense.viz.VizInputError` with one line.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    image_size: tuple[int, int]
    masks: np.ndarray | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_names, str) or not isinstance(self.class_names, Sequence):
            raise VizInputError(f"class_names must be a list of names, got {type(self.class_names).__name__}")
        self.class_names = [str(n) for n in self.class_names]
        if not self.class_names:
            raise VizInputError("class_names is empty")
        size = tuple(self.image_size) if isinstance(self.image_size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
            raise VizInputError(f"image_size must be (height, width) integers, got {self.image_size!r}")
        if min(size) < 1:
            raise VizInputError(f"image_size must be positive, got {size}")
        self.image_size = (int(size[0]), int(size[1]))

        boxes = np.asarray(self.boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise VizInputError(f"boxes must be K x 4 (x1, y1, x2, y2), got shape {boxes.shape}")
        if boxes.dtype.kind not in "fiu":
            raise VizInputError(f"boxes must hold numbers, got dtype {boxes.dtype}")
        boxes = boxes.astype(np.float32)
        k = boxes.shape[0]
        if not np.isfinite(boxes).all():
            raise VizInputError("boxes hold non-finite values")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            i = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
            raise VizInputError(f"box {i} is not x1, y1, x2, y2 with x2 >= x1 and y2 >= y1: {boxes[i].tolist()}")

        scores = np.asarray(self.scores)
        if scores.shape != (k,) or scores.dtype.kind not in "fiu":
            raise VizInputError(f"scores must be {k} numbers (one per box), got shape {scores.shape} {scores.dtype}")
        scores = scores.astype(np.float32)
        if not np.isfinite(scores).all():
            raise VizInputError("scores hold non-finite values")

        labels = np.asarray(self.labels)
        if labels.shape != (k,) or labels.dtype.kind not in "iu":
            raise VizInputError(f"labels must be {k} integers (one per box), got shape {labels.shape} {labels.dtype}")
        labels = labels.astype(np.int64)
        n = len(self.class_names)
        if k and (labels.min() < 0 or labels.max() >= n):
            raise VizInputError(
                f"labels must be in 0..{n - 1} ({n} class names), got values in {labels.min()}..{labels.max()}"
            )

        masks = self.masks
        if masks is not None:
            masks = np.asarray(masks)
            h, w = self.image_size
            if masks.shape != (k, h, w):
                raise VizInputError(f"masks must be K x H x W = {(k, h, w)}, got shape {masks.shape}")
            if masks.dtype.kind not in "biu":
                raise VizInputError(f"masks must be bool, got dtype {masks.dtype}")
            masks = masks.astype(bool) if masks.dtype.kind == "b" else masks != 0
        self.boxes, self.scores, self.labels, self.masks = boxes, scores, labels, masks

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    def to_json(self, rle: bool = False) -> dict:
        """Plain JSON types: ``{"image_size": {"height", "width"}, "class_names", "detections": [{"label",
        "class_name", "score", "box_xyxy"}]}``, detections in the result's order.

        Masks are left out unless ``rle`` is True and the result has masks: then each detection also holds
        ``"mask_rle": {"size": [H, W], "counts": str}``, COCO's compressed RLE (``pycocotools.mask.encode``,
        column-major; ``pycocotools.mask.decode`` reads it back once ``counts`` is encoded to bytes).
        """
        h, w = self.image_size
        detections = [
            {
                "label": int(label),
                "class_name": self.class_names[int(label)],
                "score": _float_json(score),
                "box_xyxy": [_float_json(v) for v in box],
            }
            for box, score, label in zip(self.boxes, self.scores, self.labels, strict=True)
        ]
        if rle and self.masks is not None:
            for entry, mask in zip(detections, self.masks, strict=True):
                entry["mask_rle"] = mask_to_rle(mask)
        return {
            "image_size": {"height": h, "width": w},
            "class_names": list(self.class_names),
            "detections": detections,
        }

    def shown(self, min_score: float = 0.0, max_boxes: int | None = None) -> np.ndarray:
        """Indices of the detections :meth:`overlay` draws: score >= ``min_score``, the ``max_boxes`` best, best
        first (ties in the result's order)."""
        if isinstance(min_score, bool) or not isinstance(min_score, (int, float, np.number)):
            raise VizInputError(f"min_score must be a number, got {min_score!r}")
        if not math.isfinite(float(min_score)):
            raise VizInputError(f"min_score must be finite, got {min_score!r}")
        if max_boxes is not None and (
            isinstance(max_boxes, bool) or not isinstance(max_boxes, (int, np.integer)) or max_boxes < 0
        ):
            raise VizInputError(f"max_boxes must be an integer >= 0 or None, got {max_boxes!r}")
        order = np.argsort(-self.scores, kind="stable")
        order = order[self.scores[order] >= np.float32(min_score)]
        return order if max_boxes is None else order[: int(max_boxes)]

    def legend_rows(self, min_score: float = 0.0, max_boxes: int | None = None) -> list[dict]:
        """The legend of :meth:`overlay`: ``[{"label", "name", "colour": (r, g, b), "count"}]`` for each class among
        the drawn detections, in class order."""
        keep = self.shown(min_score, max_boxes)
        counts = np.bincount(self.labels[keep], minlength=len(self.class_names))
        colours = detection_colours(len(self.class_names))
        return [
            {"label": i, "name": self.class_names[i], "colour": tuple(int(v) for v in colours[i]), "count": int(c)}
            for i, c in enumerate(counts)
            if c
        ]

    def overlay(
        self,
        image,
        min_score: float = 0.0,
        max_boxes: int | None = None,
        *,
        legend: bool = True,
        mask_alpha: float = 0.5,
    ) -> Image.Image:
        """The image with each detection's box, tag (``"name 0.87"``) and mask in its class colour, and a legend.

        Args:
            image: the original image: a PIL image or an H x W x 3 uint8 RGB array, of size ``image_size``.
            min_score: draw detections scoring at least this.
            max_boxes: draw at most this many (the best scoring); None draws all.
            legend: add a white panel on the right listing each drawn class with its colour and count.
            mask_alpha: mask colour opacity in 0..1 (masks, when present, are blended in first).

        Line width (1/300 of the short side) and text size scale with the image, legible from thumbnails to large
        photos. Higher scores are drawn last, so on top. Tags sit above their box, or just inside it when the box
        touches the top, and are kept inside the image.

        Returns:
            RGB PIL image: the W x H annotated image, then with ``legend`` the panel: width ``W + panel width``,
            height ``max(H, panel height)`` (the rest white).
        """
        rgb = _as_rgb(image)
        if rgb.shape[:2] != self.image_size:
            raise VizInputError(
                f"image is {rgb.shape[0]} x {rgb.shape[1]} (H x W); the detections are for {self.image_size[0]} x "
                f"{self.image_size[1]}"
            )
        if isinstance(mask_alpha, bool) or not isinstance(mask_alpha, (int, float)) or not 0 <= mask_alpha <= 1:
            raise VizInputError(f"mask_alpha must be a number in [0, 1], got {mask_alpha!r}")
        keep = self.shown(min_score, max_boxes)[::-1]  # worst first: the best are drawn on top
        colours = detection_colours(len(self.class_names))
        h, w = self.image_size
        out = rgb.copy()
        if self.masks is not None and len(keep):
            owner = np.full((h, w), -1, dtype=np.int64)
            for i in keep:
                owner[self.masks[i]] = self.labels[i]
            painted = owner >= 0
            colour = colours[owner[painted]].astype(np.float32)
            blended = out[painted].astype(np.float32) * np.float32(1 - mask_alpha) + colour * np.float32(mask_alpha)
            out[painted] = np.rint(blended).astype(np.uint8)
        picture = Image.fromarray(out)
        draw = ImageDraw.Draw(picture)
        size = _tag_font_size(h, w)
        font = load_font(size)
        line = max(1, round(min(h, w) / 300))  # 1 px up to ~450 px, 3 px at 900 px
        pad = max(1, round(size * 0.2))
        ref = draw.textbbox((0, 0), "Ag", font=font)
        tag_h = ref[3] - ref[1] + 2 * pad
        for i in keep:
            colour = tuple(int(v) for v in colours[self.labels[i]])
            x1, y1, x2, y2 = (float(v) for v in self.boxes[i])
            left = int(np.clip(math.floor(x1), 0, w - 1))
            top = int(np.clip(math.floor(y1), 0, h - 1))
            right = int(np.clip(math.ceil(x2) - 1, left, w - 1))
            bottom = int(np.clip(math.ceil(y2) - 1, top, h - 1))
            draw.rectangle((left, top, right, bottom), outline=colour, width=line)
            text = f"{display_name(self.class_names[self.labels[i]])} {self.scores[i]:.2f}"
            tl, _, tr, _ = draw.textbbox((0, 0), text, font=font)
            tag_w = tr - tl + 2 * pad
            tx = max(0, min(left, w - tag_w))
            ty = top - tag_h if top - tag_h >= 0 else top
            ty = max(0, min(ty, h - tag_h))
            draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=colour)
            draw.text((tx + pad - tl, ty + pad - ref[1]), text, fill=_text_colour(colour), font=font)
        if not legend:
            return picture
        rows = self.legend_rows(min_score, max_boxes)
        entries = [(row["colour"], f"{display_name(row['name'])}  {row['count']}") for row in rows]
        return with_panel(picture, legend_panel(entries or [(None, "no detections")], h))
