"""Instance masks at test with mmdet 2.28.1's arithmetic (F-ViT OV-LVIS, spec 3.4 and quirk 16).

mmdet's flow (``mmdet/models/roi_heads/test_mixins.py`` ``MaskTestMixin.simple_test_mask`` and
``mask_heads/fcn_mask_head.py`` ``get_seg_masks`` / ``_do_paste_mask``), re-implemented here:

1. the final detections, in original-image pixels (the box head divided them by ``scale_factor``), are multiplied
   by ``scale_factor`` back to network-input pixels: these are the RoIs (:func:`to_input`);
2. 14 x 14 RoIAlign on P2-P5, the FCN mask head, sigmoid: K x 28 x 28 probabilities, one class-agnostic channel
   (:meth:`ovdense.detection.fvit.FViT.mask_probs`);
3. ``get_seg_masks(rescale=True)`` divides those input boxes by ``scale_factor`` again (:func:`to_original`; a float32
   round trip, so the paste boxes can differ from the detections in the last bit) and pastes every probability
   map into the original image: ``grid_sample`` (bilinear, zero padding, ``align_corners=False``) at pixel centres
   ``i + 0.5`` mapped to ``(c - box_start) / box_size * 2 - 1``, infinities (zero-size boxes) replaced by 0, then
   ``>= mask_thr_binary`` (0.5) (:func:`paste_masks`).

Pasting region: mmdet's CPU path pastes one mask at a time into its box's integer extent ``[floor(x1) - 1,
ceil(x2) + 1)`` x ``[floor(y1) - 1, ceil(y2) + 1)`` clipped to the image (``skip_empty=True``); everything outside
stays False. Its GPU path samples the whole image for chunks of masks instead; the two agree after thresholding
(every pixel centre outside the extent lies outside the box, where the mask's edge cell weighs < 0.5 in the bilinear
sum, so the value is < 0.5) except for zero-width or zero-height boxes, where the inf -> 0 replacement spreads the
mask's middle row or column over the whole image width or height on GPU but only over the extent on CPU. Here
every mask gets its own extent (the CPU semantics) on any device; masks are sampled in chunks whose padded extents
hold at most ``max_chunk_pixels`` pixels (or one mask), so memory stays bounded (about 13 bytes per pixel of a chunk)
however many masks and however large the image.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["paste_masks", "scale_factor_tensor", "to_input", "to_original"]

#: mmdet's ``mask_thr_binary`` in every F-ViT OV-LVIS config.
MASK_THRESHOLD = 0.5


def scale_factor_tensor(scale: Sequence[float], device=None) -> torch.Tensor:
    """mmdet's ``scale_factor`` ``[w'/w, h'/h, w'/w, h'/h]`` as float32 from ``(w'/w, h'/h)``."""
    sx, sy = (float(v) for v in scale)
    return torch.tensor([sx, sy, sx, sy], dtype=torch.float32, device=device)


def to_input(boxes: torch.Tensor, scale_factor: torch.Tensor) -> torch.Tensor:
    """K x 4 original-image boxes -> network-input pixels (``det_bboxes[:, :4] * scale_factor``, float32)."""
    return boxes[:, :4].float() * scale_factor.to(boxes.device)


def to_original(boxes: torch.Tensor, scale_factor: torch.Tensor) -> torch.Tensor:
    """K x 4 network-input boxes -> original-image pixels (``bboxes / scale_factor``, float32)."""
    return boxes[:, :4].float() / scale_factor.to(boxes.device)


def _extents(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """K x 4 integer paste extents ``x0, y0, x1, y1`` (exclusive ends), ``_do_paste_mask(skip_empty=True)`` for one
    box: starts ``floor - 1`` clamped at 0, ends ``ceil + 1`` clamped at the image size (mmdet clamps nothing else;
    an extent past the image is empty)."""
    x0 = (boxes[:, 0].floor() - 1).clamp(min=0)
    y0 = (boxes[:, 1].floor() - 1).clamp(min=0)
    x1 = (boxes[:, 2].ceil() + 1).clamp(max=width)
    y1 = (boxes[:, 3].ceil() + 1).clamp(max=height)
    return torch.stack([x0, y0, x1, y1], dim=1).to(torch.int64)


def _normalised(pixels: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """``(pixel centre - start) / (end - start) * 2 - 1`` with infinities set to 0, as ``_do_paste_mask``."""
    grid = (pixels - start[:, None]) / (end - start)[:, None] * 2 - 1
    return torch.where(torch.isinf(grid), torch.zeros_like(grid), grid)


def _chunks(sizes: list[tuple[int, int]], order: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of ``order`` whose padded extent (n x max h x max w) stays within ``budget`` pixels."""
    groups: list[list[int]] = []
    current: list[int] = []
    hmax = wmax = 0
    for i in order:
        h, w = sizes[i]
        nh, nw = max(hmax, h), max(wmax, w)
        if current and (len(current) + 1) * nh * nw > budget:
            groups.append(current)
            current, nh, nw = [], h, w
        current.append(i)
        hmax, wmax = nh, nw
    if current:
        groups.append(current)
    return groups


def paste_masks(
    mask_probs: torch.Tensor,
    boxes: torch.Tensor,
    image_size: tuple[int, int],
    threshold: float | None = MASK_THRESHOLD,
    *,
    max_chunk_pixels: int = 1 << 23,
    out_device: torch.device | str | None = None,
) -> torch.Tensor:
    """Paste K mask probability maps into an image at their boxes, mmdet 2.28.1 ``_do_paste_mask`` (see the module
    docstring) followed by ``>= threshold``.

    Args:
        mask_probs: K x h x w probabilities (after the sigmoid; 28 x 28 for F-ViT), or K x 1 x h x w.
        boxes: K x 4 ``x1, y1, x2, y2`` in the pixels of the image pasted into (the original image).
        image_size: ``(H, W)`` of that image.
        threshold: ``mask_thr_binary``; a pixel is in the mask when its sampled probability is ``>= threshold``.
            None returns the sampled probabilities themselves (float32, 0 outside the extents).
        max_chunk_pixels: memory bound: masks are sampled together while their padded extents hold at most this
            many pixels (a larger single extent is sampled alone).
        out_device: where the K x H x W result lives (default: ``mask_probs``' device); sampling happens on
            ``mask_probs``' device, so a GPU detector can keep the full-size masks in host memory.

    Returns:
        K x H x W bool (float32 with ``threshold=None``); False (0) outside each box's paste extent.
    """
    if mask_probs.dim() == 4:
        if mask_probs.shape[1] != 1:
            raise ValueError(f"mask_probs must have one channel (class-agnostic), got shape {tuple(mask_probs.shape)}")
        mask_probs = mask_probs[:, 0]
    if mask_probs.dim() != 3:
        raise ValueError(f"mask_probs must be K x h x w, got shape {tuple(mask_probs.shape)}")
    k = mask_probs.shape[0]
    if boxes.shape != (k, 4):
        raise ValueError(f"boxes must be {k} x 4, got shape {tuple(boxes.shape)}")
    height, width = (int(v) for v in image_size)
    device = mask_probs.device
    dtype = torch.float32 if threshold is None else torch.bool
    out = torch.zeros(k, height, width, dtype=dtype, device=out_device if out_device is not None else device)
    if k == 0:
        return out
    probs = mask_probs.float()[:, None]
    boxes = boxes.to(device=device, dtype=torch.float32)
    extents = _extents(boxes, height, width)
    ext = extents.tolist()
    sizes = [(max(0, y1 - y0), max(0, x1 - x0)) for x0, y0, x1, y1 in ext]
    order = sorted((i for i in range(k) if sizes[i][0] and sizes[i][1]), key=lambda i: sizes[i][0] * sizes[i][1])
    for group in _chunks(sizes, order, max_chunk_pixels):
        idx = torch.tensor(group, device=device)
        hmax = max(sizes[i][0] for i in group)
        wmax = max(sizes[i][1] for i in group)
        b = boxes[idx]
        # Pixel centres of each mask's own extent (padded to the chunk's largest; the padding is discarded).
        ys = (extents[idx, 1:2] + torch.arange(hmax, device=device)).to(torch.float32) + 0.5
        xs = (extents[idx, 0:1] + torch.arange(wmax, device=device)).to(torch.float32) + 0.5
        gy = _normalised(ys, b[:, 1], b[:, 3])
        gx = _normalised(xs, b[:, 0], b[:, 2])
        n = len(group)
        grid = torch.stack([gx[:, None, :].expand(n, hmax, wmax), gy[:, :, None].expand(n, hmax, wmax)], dim=3)
        sampled = F.grid_sample(probs[idx], grid, align_corners=False)[:, 0]
        if threshold is not None:
            sampled = sampled >= threshold
        sampled = sampled.to(out.device)
        for j, i in enumerate(group):
            x0, y0, x1, y1 = ext[i]
            out[i, y0:y1, x0:x1] = sampled[j, : y1 - y0, : x1 - x0]
    return out
