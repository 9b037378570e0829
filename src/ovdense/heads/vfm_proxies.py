"""What the heads that borrow a vision foundation model's correlations share (ProxyCLIP, CorrCLIP).

- :func:`vfm_input`: the VFM's view of CLIP-normalised windows.
- :func:`values_on_grid`: CLIP's last-block values moved to the VFM's grid, where those heads attend.
- :func:`resize_region_ids` and :data:`MERGED_REGION_ID`: region ids brought to another grid as CorrCLIP brings
  them, and the first id of its merged regions, which it also pads its windows' region ids with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MERGED_REGION_ID", "resize_region_ids", "values_on_grid", "vfm_input"]

#: The first id CorrCLIP gives merged regions (10000 + component); it pads its windows' region ids with it too.
MERGED_REGION_ID = 10000


def vfm_input(images: torch.Tensor, clip_mean, clip_std, vfm_mean, vfm_std) -> torch.Tensor:
    """The VFM's view of CLIP-normalised windows: ``((x · σ_clip + μ_clip) − μ_vfm) / σ_vfm`` per channel.

    Args:
        images: B x 3 x H x W normalised with CLIP's statistics (the references' rounded x255 values); the
            un-normalisation uses ``clip_mean``/``clip_std`` ([0, 1] units, OpenAI's exact values), as the
            references' ``UnNormalize`` does.

    Returns:
        B x 3 x H x W.
    """
    c = torch.tensor(clip_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    m = torch.tensor(clip_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    vm = torch.tensor(vfm_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    vs = torch.tensor(vfm_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * c + m - vm) / vs


def values_on_grid(tower, tokens: torch.Tensor, grid: tuple[int, int], out_grid: tuple[int, int]) -> torch.Tensor:
    """The last block's values of ``ln_1(tokens)``, prefix tokens dropped, bilinear (align_corners=False) from the
    tower's grid to ``out_grid``.

    Args:
        tower: the :class:`~ovdense.backbones.base.DenseTower`.
        tokens: B x L x C tokens (prefix first) on the h x w ``grid``.

    Returns:
        B x heads x (I·J) x head_dim for ``out_grid`` = (I, J).
    """
    _, _, v = tower.qkv(tower.last_norm1(tokens))
    b, heads, _, dim = v.shape
    h, w = grid
    v = v[:, :, tower.num_prefix_tokens :].reshape(b * heads, h, w, dim).permute(0, 3, 1, 2)
    v = F.interpolate(v, size=tuple(out_grid), mode="bilinear", align_corners=False)
    return v.permute(0, 2, 3, 1).reshape(b, heads, -1, dim)


def resize_region_ids(ids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Integer maps resized as CorrCLIP does: ``F.interpolate(mode="nearest")`` on float (legacy floor).

    Args:
        ids: B x H x W integers (exact in float32 below 2^24).

    Returns:
        B x h x w int64.
    """
    return F.interpolate(ids[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
