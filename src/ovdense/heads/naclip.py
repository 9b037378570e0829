"""NACLIP (Hajimiri et al. 2025): k-k attention plus a Gaussian neighbourhood bias, reduced block."""

from __future__ import annotations

import torch

from ..methods import register_method
from .base import DenseHead, attend


def gaussian_neighbourhood_bias(
    grid: tuple[int, int], sigma: float = 5.0, num_prefix: int = 1, device=None, dtype=torch.float32
) -> torch.Tensor:
    """NACLIP's ω: L x L with ω[p, p'] = exp(-‖p - p'‖² / (2σ²)) over patch-grid coordinates.

    Un-normalised (1 on the diagonal), for every pair of patches; prefix ([CLS]) rows and columns are 0,
    so the class token still takes part in the softmax without a bias. L = num_prefix + h * w.
    """
    h, w = grid
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float64),
        torch.arange(w, device=device, dtype=torch.float64),
        indexing="ij",
    )
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1)
    dist2 = torch.cdist(coords, coords).square()
    omega = torch.exp(-dist2 / (2 * sigma**2))
    return torch.nn.functional.pad(omega, (num_prefix, 0, num_prefix, 0)).to(dtype)


@register_method(
    "naclip",
    ranges={"sigma": {"low": 0, "low_open": True}},
    order=20,
    summary="softmax(kk + Gaussian neighbourhood) attention, no residual, no FFN, PAMR (NACLIP)",
    defaults={"pamr": True},
    datasets={
        "voc21": {"crop": 0, "prob_thd": 0.1},
        "voc20": {"crop": 0},
        "context60": {"prob_thd": 0.1},
        "coco_object": {"prob_thd": 0.1},
        "cityscapes": {"short_side": 560},
    },
)
class NaclipHead(DenseHead):
    """y = out_proj(softmax(s k kᵀ + ω) v), no residual, no FFN (NACLIP ``arch='reduced'``).

    Args:
        sigma: σ of the Gaussian neighbourhood ω, in patches (5).
    """

    def __init__(self, sigma: float = 5.0):
        self.sigma = sigma
        self._bias_cache: dict = {}

    def bias(self, grid, num_prefix, device, dtype) -> torch.Tensor:
        key = (tuple(grid), num_prefix, str(device), dtype)
        if key not in self._bias_cache:
            self._bias_cache[key] = gaussian_neighbourhood_bias(grid, self.sigma, num_prefix, device, dtype)
        return self._bias_cache[key]

    def last_block(self, tower, x, context):
        _, k, v = tower.qkv(tower.last_norm1(x))
        logits = (k * tower.scale) @ k.transpose(-2, -1)
        logits = logits + self.bias(context.grid, tower.num_prefix_tokens, logits.device, logits.dtype)
        weights = torch.softmax(logits, dim=-1)
        context.record(weights)
        return tower.attn_out(attend(weights, v))

    def __repr__(self) -> str:
        return f"NaclipHead(sigma={self.sigma})"
