"""Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020), with the semantics NACLIP evaluates with.

Masks are repeatedly replaced by an affinity-weighted average of their 8-neighbourhoods at a few dilations.
Affinities come from the guide image: ``-|centre - neighbour|`` scaled by the local standard deviation,
averaged over image channels and soft-maxed over all neighbour positions of all dilations.

Details that change results, as in NACLIP's ``pamr.py``:
* the standard deviation is unbiased and taken, per image channel, over the 3 x 3 neighbourhoods of *all*
  dilations at once (9 values per dilation, the centre counted once per dilation), not per dilation;
* borders replicate (a neighbour outside the image is the nearest border pixel);
* the update uses neighbours only, never the centre;
* masks are first resized to the guide with bilinear ``align_corners=True``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pamr"]

# The 8 neighbours in row-major order of a 3 x 3 kernel, centre skipped.
_NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., y, x] = x[..., clamp(y + dy), clamp(x + dx)]``: replicate padding without padding."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) + dy).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device) + dx).clamp_(0, w - 1)
    return x.index_select(-2, rows).index_select(-1, cols)


def _offsets(dilations: Sequence[int]) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy, dx in _NEIGHBOURS]


def _affinity(image: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """1 x 3 x H x W guide -> 1 x 1 x P x H x W affinities (P = 8 x len(dilations)), summing to 1 over P."""
    # Same value order as the reference's 3 x 3 shift kernels (centre included, row-major per dilation);
    # the order only matters for floating-point rounding of the std.
    window = [_shift(image, dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    std = torch.stack(window, dim=2).std(dim=2, keepdim=True)
    del window
    diffs = torch.stack([(image - _shift(image, dy, dx)).abs() for dy, dx in _offsets(dilations)], dim=2)
    aff = -diffs / (1e-8 + 0.1 * std)
    return F.softmax(aff.mean(dim=1, keepdim=True), dim=2)


@torch.no_grad()
def pamr(
    image: torch.Tensor, masks: torch.Tensor, iterations: int = 10, dilations: Sequence[int] = (8, 16)
) -> torch.Tensor:
    """Refine masks (e.g. cosine maps) so they follow the edges of the guide image.

    Args:
        image: 1 x 3 x H x W guide; NACLIP uses the normalised network input resized bilinearly
            (``align_corners=False``) to the original image size.
        masks: 1 x K x h x w maps, resized to H x W (bilinear, ``align_corners=True``) first.
        iterations: number of propagation steps; 0 returns the resized masks.
        dilations: neighbourhood dilations in pixels.

    Returns:
        1 x K x H x W float32 refined masks.
    """
    if image.ndim != 4 or masks.ndim != 4 or image.shape[0] != masks.shape[0]:
        shapes = f"{tuple(image.shape)}, {tuple(masks.shape)}"
        raise ValueError(f"expected B x C x H x W image and B x K x h x w masks, got {shapes}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0 (got {iterations})")
    if not dilations or any(int(d) <= 0 for d in dilations):
        raise ValueError(f"dilations must be positive (got {dilations!r})")
    dilations = [int(d) for d in dilations]
    # The reference writes its shifted maps into float32 buffers whatever the input dtype.
    image = image.float()
    masks = F.interpolate(masks.float(), size=image.shape[-2:], mode="bilinear", align_corners=True)
    if iterations == 0:
        return masks

    aff = _affinity(image, dilations)  # B x 1 x P x H x W; aff[:, :, p] broadcasts over the K masks
    offsets = _offsets(dilations)
    reach = max(dilations)
    h, w = masks.shape[-2:]
    for _ in range(iterations):
        # Accumulate over neighbours instead of stacking K x P shifted masks (the reference's memory
        # blow-up on large images); same sum, up to rounding order. One replicate padding per step serves
        # every shift as a slice (the same values as clamped indexing, without a gather per shift).
        padded = F.pad(masks, (reach, reach, reach, reach), mode="replicate")
        out = torch.zeros_like(masks)
        for p, (dy, dx) in enumerate(offsets):
            out += aff[:, :, p] * padded[..., reach + dy : reach + dy + h, reach + dx : reach + dx + w]
        masks = out
    return masks
