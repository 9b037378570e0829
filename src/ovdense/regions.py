"""Name boxes and masks with any words: region features pooled from a dense map, or from crops.

The protocol of CLIPSelf's and DeCLIP's region-classification benchmark (``zero_shot.py``,
``COCOPanopticDataset``):

- **Detection input**: the image's longest side resized (Pillow bicubic) to ``size``, zero pixels padded
  right/bottom to ``size x size``, then ``ToTensor`` and the model's exact mean/std.
- **Box features** (:func:`roi_features`): boxes in image pixels are scaled to the resized image, divided
  by the padded size and multiplied by the grid size (grid units), then ``roi_align(map, boxes, (1, 1),
  spatial_scale=1, sampling_ratio=-1, aligned=True)`` on the projected dense map: un-normalised tokens for
  EVA02 towers, L2-normalised tokens for open_clip ViTs (each reference's ``encode_dense`` differs so).
- **Mask features** (:func:`mask_features`): each mask resized longest side to the grid (bicubic on the
  0/1 float mask, no antialiasing), zero-padded right/bottom, ``> 0``; the mean of the dense tokens inside
  (``sum / (count + 1e-12)``).
- **Crop baseline** (:func:`crop_inputs`): each box enlarged about its centre (1.5x for things), clipped
  to the image, cut from the original image, longest side resized to the tower's input size, centred zero
  padding, through the vanilla tower (``encode_image``).

Every region feature is L2-normalised before the cosine with the text embeddings.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

__all__ = [
    "POOLINGS",
    "RegionResult",
    "RegionWarning",
    "boxes_on_grid",
    "classify_features",
    "crop_boxes",
    "crop_inputs",
    "detection_input",
    "mask_features",
    "masks_on_grid",
    "roi_features",
]

#: ``dense``: RoIAlign (boxes) or mask pooling (masks) on the head's dense map; ``crop``: crops through
#: the vanilla tower (boxes only).
POOLINGS = ("dense", "crop")
#: How far (pixels) a box may reach past the image border: annotation corners can round just past it.
BOX_TOLERANCE = 1.0


class RegionWarning(UserWarning):
    """A region that gets no features of its own (a mask smaller than a cell of the feature grid)."""


def _normalised_tensor(image: Image.Image, mean, std) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(image), mean=list(mean), std=list(std))


def detection_input(image: np.ndarray, size: int, mean, std) -> tuple[torch.Tensor, float]:
    """The detection-size input: longest side resized to ``size``, padded right/bottom with black.

    Args:
        image: H x W x 3 uint8 RGB.
        size: the padded side S.
        mean, std: per-channel statistics in [0, 1] units.

    Returns:
        ``(x, scale)``: x is 1 x 3 x S x S float32, scale = S / max(H, W) (resized = original * scale).
    """
    h, w = image.shape[:2]
    scale = size / float(max(h, w))
    pil = Image.fromarray(image)
    resized = TF.resize(pil, [round(h * scale), round(w * scale)], InterpolationMode.BICUBIC)
    padded = TF.pad(resized, [0, 0, size - resized.width, size - resized.height], fill=0)
    return _normalised_tensor(padded, mean, std)[None], scale


def boxes_on_grid(
    boxes: torch.Tensor, scale: float, input_size: tuple[int, int], grid: tuple[int, int]
) -> torch.Tensor:
    """Image-pixel XYXY boxes -> grid units of the dense map (the references' float32 op order).

    Args:
        boxes: K x 4 float32 XYXY in original image pixels.
        scale: resized / original (from :func:`detection_input`).
        input_size: (H, W) of the padded input.
        grid: (h, w) of the dense map.

    Returns:
        K x 4 float32 boxes in grid units.
    """
    b = boxes.float() * scale
    b[:, [0, 2]] /= input_size[1]
    b[:, [1, 3]] /= input_size[0]
    b[:, [0, 2]] *= grid[1]
    b[:, [1, 3]] *= grid[0]
    return b


def roi_features(dense_map: torch.Tensor, grid_boxes: torch.Tensor) -> torch.Tensor:
    """1x1 aligned RoIAlign of each box on one image's dense map.

    Args:
        dense_map: 1 x D x h x w (tokens normalised or not, as the tower's reference pools them).
        grid_boxes: K x 4 XYXY in grid units.

    Returns:
        K x D float32 pooled features (not normalised).
    """
    pooled = roi_align(dense_map.float(), [grid_boxes.to(dense_map.device, torch.float32)], (1, 1), 1.0, -1, True)
    return pooled[:, :, 0, 0]


def masks_on_grid(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Bring image-size masks to the ``grid x grid`` map as the reference ``ResizeLongest`` does.

    Args:
        masks: K x H x W bool.
        grid: the map's side (detection size // patch size).

    Returns:
        K x grid x grid bool: longest side resized to ``grid`` (bicubic, no antialiasing), zero
        padded right/bottom, then ``> 0``.
    """
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, grid, grid, dtype=torch.bool, device=masks.device)
    scale = grid / float(max(h, w))
    size = [round(h * scale), round(w * scale)]
    resized = TF.resize(masks.float(), size, InterpolationMode.BICUBIC, antialias=False)
    padded = F.pad(resized, (0, grid - size[1], 0, grid - size[0]))
    on_grid = padded > 0.0
    lost = torch.nonzero(~on_grid.flatten(1).any(dim=1) & masks.flatten(1).any(dim=1)).flatten().tolist()
    if lost:
        # The references pool such a mask to a zero vector: every class then scores the same. Kept so (the
        # benchmark's numbers stay the references'), and said once per call.
        which = f"mask {lost[0]} falls" if len(lost) == 1 else f"masks {_listed(lost)} fall"
        warnings.warn(
            f"masks: {which} between the cells of the {grid} x {grid} feature grid (smaller than a patch at this "
            "image_size): no features, so every class gets the same probability; raise image_size or use a box",
            RegionWarning,
            stacklevel=2,
        )
    return on_grid


def mask_features(dense_map: torch.Tensor, grid_masks: torch.Tensor) -> torch.Tensor:
    """Mean of the dense tokens inside each mask.

    Args:
        dense_map: 1 x D x h x w (tokens normalised or not, as the tower's reference pools them).
        grid_masks: K x h x w bool.

    Returns:
        K x D float32 (a mask empty on the grid gives a zero vector, as in the references).
    """
    tokens = dense_map[0].float().flatten(1).T  # (h*w) x D
    m = grid_masks.to(tokens.device, torch.float32).flatten(1)  # K x (h*w)
    return (m @ tokens) / (m.sum(1, keepdim=True) + 1e-12)


def crop_boxes(boxes: np.ndarray, enlarge: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Boxes enlarged about their centre and clipped to the image (the crop baseline's boxes).

    Args:
        boxes: K x 4 float64 XYXY pixels.
        enlarge: (K,) factors (1.5 for things, 1.0 for stuff in the benchmark).
        image_size: (H, W).

    Returns:
        K x 4 float64: ``cx ± w·e/2``, ``cy ± h·e/2`` clipped to ``[0, W] x [0, H]``.
    """
    x, y = boxes[:, 0], boxes[:, 1]
    w, h = boxes[:, 2] - x, boxes[:, 3] - y
    cx, cy = x + w * 0.5, y + h * 0.5
    half = enlarge * 0.5
    return np.stack(
        [
            np.maximum(cx - w * half, 0),
            np.maximum(cy - h * half, 0),
            np.minimum(cx + w * half, image_size[1]),
            np.minimum(cy + h * half, image_size[0]),
        ],
        axis=1,
    )


def crop_inputs(image: np.ndarray, boxes: np.ndarray, size: tuple[int, int], mean, std) -> torch.Tensor:
    """Cut each box from the image and fit it into the tower's input, centred (``ResizeMaxSize``).

    Args:
        image: H x W x 3 uint8 RGB.
        boxes: K x 4 float XYXY pixels (Pillow rounds the corners when cropping).
        size: the tower's (H, W) input size.
        mean, std: per-channel statistics in [0, 1] units.

    Returns:
        K x 3 x H x W float32.
    """
    pil = Image.fromarray(image)
    out = []
    for box in boxes:
        crop = pil.crop(tuple(float(v) for v in box))
        scale = min(size[0] / crop.height, size[1] / crop.width)
        new = [round(crop.height * scale), round(crop.width * scale)]
        crop = TF.resize(crop, new, InterpolationMode.BICUBIC)
        ph, pw = size[0] - new[0], size[1] - new[1]
        crop = TF.pad(crop, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        out.append(_normalised_tensor(crop, mean, std))
    if not out:
        return torch.zeros(0, 3, *size)
    return torch.stack(out)


def classify_features(
    features: torch.Tensor, text_embeddings: torch.Tensor, name_to_class: torch.Tensor, num_classes: int,
    logit_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Cosine of each region with every name, reduced to classes.

    Args:
        features: K x D L2-normalised region features.
        text_embeddings: N x D L2-normalised name embeddings.
        name_to_class: (N,) class index of each name.
        num_classes: C.
        logit_scale: multiplies the cosines before the softmax over names.

    Returns:
        ``(scores, probs)``, both K x C float32: the best cosine among a class's names, and
        ``softmax(logit_scale * cos)`` over all names, max over a class's names.
    """
    cos = features.float() @ text_embeddings.to(features.device, torch.float32).T
    index = name_to_class.to(cos.device).expand_as(cos)
    fill = torch.full((cos.shape[0], num_classes), float("-inf"), device=cos.device)
    scores = fill.scatter_reduce(1, index, cos, "amax")
    name_probs = torch.softmax(cos * logit_scale, dim=1)
    probs = torch.zeros_like(fill).scatter_reduce(1, index, name_probs, "amax")
    return scores, probs


@dataclass
class RegionResult:
    """Open-vocabulary labels of K regions of one image.

    Attributes:
        scores: K x C, per class the best cosine between the region feature and the class's names.
        probs: K x C, ``softmax(logit_scale · cos)`` over all names, max over each class's names.
        topk_indices: K x k class indices, best first (ranked by ``scores``).
        topk_scores: K x k, the ``probs`` of those classes.
        features: K x D L2-normalised region features.
        class_names: the C classes, each a list of names.
        source: ``"box"``, ``"mask"`` or ``"crop"``.
    """

    scores: torch.Tensor
    probs: torch.Tensor
    topk_indices: torch.Tensor
    topk_scores: torch.Tensor
    features: torch.Tensor
    class_names: list[list[str]]
    source: str

    def __len__(self) -> int:
        return self.scores.shape[0]

    @property
    def labels(self) -> torch.Tensor:
        """(K,) the best class of each region."""
        return self.topk_indices[:, 0]

    @property
    def top_names(self) -> list[list[str]]:
        """Per region, the first name of each of its top-k classes."""
        return [[self.class_names[int(c)][0] for c in row] for row in self.topk_indices]

    def to_records(self) -> list[dict]:
        """One dict per region: ``label``, ``name``, ``score`` and the ``top`` list of (name, prob)."""
        records = []
        for row, probs in zip(self.topk_indices.tolist(), self.topk_scores.tolist(), strict=True):
            top = [
                {"class": c, "name": self.class_names[c][0], "prob": round(p, 6)}
                for c, p in zip(row, probs, strict=True)
            ]
            records.append({"label": row[0], "name": top[0]["name"], "prob": top[0]["prob"], "top": top})
        return records


def rank(scores: torch.Tensor, probs: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k classes by score and their probabilities: K x k int64 and K x k float32."""
    k = min(top_k, scores.shape[1])
    idx = scores.topk(k, dim=1).indices if scores.shape[0] else torch.zeros(0, k, dtype=torch.long)
    return idx.cpu(), probs.gather(1, idx.to(probs.device)).cpu()


def as_enlarge(value: float | Sequence[float], k: int) -> np.ndarray:
    """A crop enlargement factor per region from one number or K numbers."""
    arr = np.asarray(value, dtype=np.float64)
    return np.full(k, float(arr)) if arr.ndim == 0 else arr


def check_boxes(boxes, image_size: tuple[int, int]) -> np.ndarray:
    """``boxes`` as K x 4 float64 XYXY pixels inside the image, or :class:`InvalidArgumentError`."""
    from .errors import InvalidArgumentError

    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().double().numpy()
    try:
        arr = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError("boxes: expected a K x 4 array of XYXY pixel coordinates") from None
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InvalidArgumentError(f"boxes: expected shape K x 4 (XYXY pixels), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise InvalidArgumentError("boxes: coordinates must be finite")
    h, w = image_size
    tol = BOX_TOLERANCE
    bad = np.flatnonzero((arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1]))
    if bad.size:
        raise InvalidArgumentError(f"boxes: box {bad[0]} {arr[bad[0]].tolist()} has x2 <= x1 or y2 <= y1")
    outside = np.flatnonzero((arr[:, 0] < -tol) | (arr[:, 1] < -tol) | (arr[:, 2] > w + tol) | (arr[:, 3] > h + tol))
    if outside.size:
        raise InvalidArgumentError(
            f"boxes: box {outside[0]} {arr[outside[0]].tolist()} lies outside the {w} x {h} image"
        )
    return arr


def check_masks(masks, image_size: tuple[int, int]) -> torch.Tensor:
    """``masks`` as a K x H x W bool tensor of the image's size, or :class:`InvalidArgumentError`."""
    from .errors import InvalidArgumentError

    t = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
    if t.ndim == 2:
        raise InvalidArgumentError(f"masks: expected K x H x W, got one mask {tuple(t.shape)}; add a leading axis")
    if t.ndim != 3 or tuple(t.shape[1:]) != tuple(image_size):
        raise InvalidArgumentError(
            f"masks: expected K x {image_size[0]} x {image_size[1]} (the image size), got {tuple(t.shape)}"
        )
    if t.dtype != torch.bool:
        if t.is_floating_point() or not bool(((t == 0) | (t == 1)).all()):
            raise InvalidArgumentError(f"masks: expected bool (or 0/1 integer) masks, got {t.dtype}")
        t = t.bool()
    empty = torch.nonzero(~t.flatten(1).any(dim=1)).flatten().tolist() if t.shape[0] else []
    if empty:
        which = f"mask {empty[0]} is empty" if len(empty) == 1 else f"masks {_listed(empty)} are empty"
        raise InvalidArgumentError(f"masks: {which} (no pixel set); a region needs at least one pixel")
    return t.cpu()


def _listed(indices: Sequence[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
