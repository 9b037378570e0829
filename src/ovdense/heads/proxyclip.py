"""ProxyCLIP (Lan et al., ECCV 2024): a vision foundation model's patch similarities as CLIP's last attention.

As mc-lan/ProxyCLIP computes it (``proxyclip_segmentor.py`` ``forward_feature``, ``open_clip/transformer.py``
``custom_attn``; commit e7b767f), per window:

1. The VFM sees the same window: the CLIP-normalised pixels un-normalised with CLIP's statistics and
   normalised with the VFM's (ImageNet), no resize (:func:`.vfm_proxies.vfm_input`). F = its last block's patch
   tokens after the final norm, on the VFM grid (42 x 42 for DINO B/8 at 336 px).
2. f̂ = F / ‖F‖ per token, S = f̂ f̂ᵀ; A = γ (S − β·mean(S)) with the mean over every entry of the window's S;
   entries with A < 0 are −∞; P = softmax over each row; one P for every head (no q or k of CLIP's).
3. CLIP's last-block values (of ln_1 of the tokens entering it), [CLS] dropped, bilinear (align_corners=False)
   from the CLIP grid to the VFM grid; out_proj(P v): no residual, no FFN, no [CLS] row. The dense features
   live on the VFM grid.

The reference takes the VFM grid's height for both sides and swaps the CLIP grid's sides, right only on square
windows (every shipped config); here both follow the window, equal on square ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods import register_method
from .base import DenseHead
from .vfm_proxies import values_on_grid, vfm_input

__all__ = ["ProxyclipHead", "proxy_attention"]


def proxy_attention(features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """ProxyCLIP's attention from VFM features.

    Args:
        features: B x C x I x J.

    Returns:
        B x N x N row-stochastic (N = I·J); rows whose entries are all masked are NaN, as in the reference.
    """
    f = F.normalize(features.flatten(2), dim=1)
    similarity = torch.einsum("bcm,bcn->bmn", f, f)
    logits = (similarity - similarity.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    return torch.softmax(logits.masked_fill(logits < 0.0, float("-inf")), dim=-1)


@register_method(
    "proxyclip",
    ranges={"gamma": {"low": 0, "low_open": True}},
    order=70,
    summary="ProxyCLIP: one attention for all heads from a VFM's patch similarities (DINO B/8) on CLIP's values",
    defaults={
        "short_side": 336,
        "crop": 336,
        "stride": 112,
        "pad_multiple": 56,
        "class_style": "proxyclip",
    },
    datasets={
        "voc21": {"prob_thd": 0.2},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"prob_thd": 0.25},
        "cityscapes": {"short_side": 448, "crop": 224, "stride": 112},
        "ade20k": {"short_side": 448},
    },
    vfm="dino-b8",
)
class ProxyclipHead(DenseHead):
    """ProxyCLIP's last block (module docstring).

    Args:
        beta: β of the similarity shift (1.2).
        gamma: γ, the temperature (3.0).
    """

    output_has_prefix = False
    uses_vfm = True

    def __init__(self, beta: float = 1.2, gamma: float = 3.0):
        self.beta, self.gamma = beta, gamma

    def last_block(self, tower, x, context):
        vfm, pre = context.inputs.vfm, tower.preprocess
        features = vfm.features(vfm_input(context.images.float(), pre.mean, pre.std, vfm.mean, vfm.std))
        grid = tuple(features.shape[-2:])
        weights = proxy_attention(features, self.beta, self.gamma).unsqueeze(1)  # B x 1 x N x N: every head
        v = values_on_grid(tower, x, context.grid, grid)
        context.out_grid = grid
        context.record(weights)
        return tower.attn_out(weights.to(v.dtype) @ v)

    def __repr__(self) -> str:
        return f"ProxyclipHead(beta={self.beta}, gamma={self.gamma})"
