"""Region means of a dense feature map upsampled to a mask's size, without holding the D x H x W map.

Both of a bank's per-region vectors are means over the pixels of a region at the image's original size of a map
bilinearly upsampled there (``F.interpolate``, ``align_corners=False``, no antialias): the CLIP values (the
assembled window features, not normalised per pixel; the authors' ``generate_clip_embeddings.py`` l.271-295) and
the VFM keys (normalised per pixel; ``generate_vfm_embeddings.py`` l.99-134). At 2048 x 1536 with 1024 channels the
upsampled map alone would be 12 GiB in float32, so channels are upsampled a chunk at a time and each region summed
as it goes; every sum is a plain reduction over the region's pixels (no atomics), so the result is the same on
every run on one device.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["as_region_masks", "region_means", "resize_mask"]

#: Upsampled values held at once (channels x pixels): 2^26 float32 = 256 MiB.
MAX_ELEMENTS = 1 << 26


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A mask nearest-resized to ``size`` as the authors do (``F.interpolate(mask.float(), mode="nearest")``).

    Args:
        mask: int [H, W] or bool [R, H, W].

    Returns:
        the same kind at ``size`` (the mask itself when it already has it).
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    t = torch.from_numpy(np.ascontiguousarray(mask))
    if mask.ndim == 2:
        t = t[None, None].float()
        return F.interpolate(t, size=tuple(size), mode="nearest")[0, 0].to(torch.int64).numpy()
    t = t[None].float()
    return F.interpolate(t, size=tuple(size), mode="nearest")[0].bool().numpy()


def as_region_masks(mask: np.ndarray) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """The regions of a mask in the authors' idx order.

    Args:
        mask: int [H, W] (regions = the non-zero values, ascending; -1 included, as an EoMT mask's unsegmented
            rest) or bool [R, H, W] (one region per channel, overlaps allowed).

    Returns:
        ``(order, lengths)`` for an int mask: the flat pixel indices sorted by region (``order``) and the pixel count
        of each region in turn; for a bool stack ``(None, [flat indices of region r] ...)``.
    """
    from .manifest import region_values

    if mask.ndim == 3:
        return None, [np.flatnonzero(m) for m in mask.reshape(len(mask), -1)]
    flat = mask.reshape(-1)
    values = region_values(mask)
    inside = np.isin(flat, values)
    labels = np.searchsorted(values, flat[inside])
    pixels = np.flatnonzero(inside)
    order = pixels[np.argsort(labels, kind="stable")]
    return order, list(np.bincount(labels, minlength=len(values)))


@torch.no_grad()
def region_means(
    features: torch.Tensor,
    mask: np.ndarray,
    normalize_pixels: bool,
    max_elements: int = MAX_ELEMENTS,
) -> torch.Tensor:
    """Mean feature of every region of ``mask``, the map bilinearly upsampled to the mask's size first.

    Args:
        features: 1 x C x h x w (any float dtype; computed in float32 on its device).
        mask: int [H, W] or bool [R, H, W] at the size to upsample to (see :func:`as_region_masks`).
        normalize_pixels: L2-normalise each upsampled pixel over all C channels before averaging (``F.normalize``,
            eps 1e-12), as the VFM keys; the CLIP values average the raw features.
        max_elements: bound on the upsampled values held at once.

    Returns:
        R x C float32 on ``features``' device, R = regions in idx order; a region with no pixel gives NaN (the
        authors' mean of nothing; a 3-D stack with an empty channel).
    """
    if features.ndim != 4 or features.shape[0] != 1:
        raise ValueError(f"features: expected 1 x C x h x w, got {tuple(features.shape)}")
    size = tuple(mask.shape[-2:])
    channels = features.shape[1]
    pixels = size[0] * size[1]
    chunk = max(1, min(channels, max_elements // max(1, pixels)))
    device = features.device
    order, regions = as_region_masks(mask)
    counts = [len(r) for r in regions] if order is None else [int(c) for c in regions]
    if order is None:
        index = [torch.from_numpy(r).to(device) for r in regions]
    else:
        index = [torch.from_numpy(order).to(device)]
    feats = features.float()

    def upsampled(start: int) -> torch.Tensor:
        part = feats[:, start : start + chunk]
        return F.interpolate(part, size=size, mode="bilinear", align_corners=False)[0].reshape(part.shape[1], -1)

    if chunk >= channels:  # the common case: one upsampling, normalised as F.normalize does
        up = upsampled(0)
        if normalize_pixels:
            up = up / up.norm(dim=0, keepdim=True).clamp_min(1e-12)
        parts = [(0, up)]
    else:
        parts = None
        norms = None
        if normalize_pixels:
            square = torch.zeros(pixels, device=device)
            for start in range(0, channels, chunk):
                square += upsampled(start).square().sum(0)
            norms = square.sqrt().clamp_min(1e-12)
    sums = torch.zeros(len(counts), channels, device=device)
    for start, up in parts or ((s, None) for s in range(0, channels, chunk)):
        if up is None:
            up = upsampled(start)
            if norms is not None:
                up = up / norms
        stop = start + up.shape[0]
        if order is None:
            for r, idx in enumerate(index):
                sums[r, start:stop] = up[:, idx].sum(1)
        else:
            grouped = up[:, index[0]]
            offset = 0
            for r, count in enumerate(counts):
                sums[r, start:stop] = grouped[:, offset : offset + count].sum(1)
                offset += count
    denominator = torch.tensor(counts, dtype=torch.float32, device=device)[:, None]
    return sums / denominator
