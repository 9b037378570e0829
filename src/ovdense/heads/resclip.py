"""ResCLIP (Yang et al., CVPR 2025): residual cross-correlation attention and semantic feedback refinement.

As yvhangyang/ResCLIP computes it (``clip/model.py`` ``forward``, ``custom_attn``, ``create_logit_temp``,
``create_patch_matrix``, ``generate_attention_sfr``; code commit 6b082d9) in its headline setting
(``arch='wo_resi'``, ``attn_strategy='resclip'``, which is NACLIP's k-k attention with the Gaussian ω):

- RCS: A_c = mean of the per-head attention probabilities of blocks 6-9 ([CLS] included).
- The last block's attention from its own k, v (of ln_1 of the tokens entering it), Λ = (k kᵀ)·s:
  ``A = τ_r((1 − λ_r) softmax(τ_s((1 − λ_s) Λ + λ_s S) + ω) + λ_r A_c)``; without an SFR prior S the τ_s term
  is Λ itself. Output out_proj(A v): no residual, no FFN. τ_r = 2 makes the rows sum to 2; nothing
  renormalises them (the out_proj bias is not doubled).
- SFR (pass 1 without S): the window's dense features, cosines with *all names*, bilinear to the window size,
  PAMR (10 iterations, dilations 8 and 16, guided by the window), softmax(logit_scale · ·) over names; the
  argmax name per pixel (name 0 where the top probability is below ``temp_thd``), the mode per patch
  (:func:`patch_labels`), then :func:`sfr_prior`. S is divided by its maximum and cast to fp16, and
  λ_s·S is computed in fp16, as the reference does.

Every statistic (first-pass labels, PAMR, the prior and its maximum) is per window: batching changes no number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import Taps
from ..methods import register_method
from ..pamr import pamr
from .base import DenseHead
from .naclip import gaussian_neighbourhood_bias

__all__ = ["ResclipHead", "patch_labels", "sfr_prior", "valid_paths"]


def patch_labels(probs: torch.Tensor, patch_size: int, grid: tuple[int, int], temp_thd: float) -> torch.Tensor:
    """ResCLIP's ``create_patch_matrix`` for one window: each patch's most frequent pixel label.

    Pixel labels are the argmax over names, 0 where the top probability is below ``temp_thd``; a patch's label
    is ``torch.mode`` over its ``patch_size²`` pixels (the smallest on ties). Pixels beyond the last whole
    patch are ignored.

    Args:
        probs: Q x H x W probabilities over the Q names.
        grid: (h, w) patches.

    Returns:
        h x w int64.
    """
    pred = probs.argmax(0)
    pred[probs.max(0)[0] < temp_thd] = 0
    h, w = grid
    patches = pred.unfold(0, patch_size, patch_size).unfold(1, patch_size, patch_size)
    return torch.mode(patches.reshape(h, w, -1), dim=-1)[0]


def valid_paths(labels: torch.Tensor) -> torch.Tensor:
    """ResCLIP's ``check_path`` for every pair of patches: N x N bool, True where the path is valid.

    For patches i, j at Chebyshev distance d (D the largest over all pairs), the points
    ``round(c_i·(1 − t) + c_j·t)`` for the D + 1 values t of ``linspace(0, 1, D + 1)``, of which only the first
    d + 1 are checked, must all carry the label of i (float32, round half to even, as the reference).

    Args:
        labels: h x w patch labels.
    """
    h, w = labels.shape
    n = h * w
    idx = torch.arange(n, device=labels.device)
    i, j = torch.meshgrid(idx, idx, indexing="ij")
    start = torch.stack((torch.div(i, w, rounding_mode="floor"), i % w), dim=-1).view(-1, 2)
    end = torch.stack((torch.div(j, w, rounding_mode="floor"), j % w), dim=-1).view(-1, 2)
    steps = torch.max(torch.abs(end - start), dim=1)[0]
    max_steps = int(steps.max())
    t = torch.linspace(0, 1, steps=max_steps + 1, device=labels.device).unsqueeze(1).unsqueeze(0)
    current = (start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t).round().long()
    checked = torch.arange(max_steps + 1, device=labels.device).unsqueeze(0) <= steps.unsqueeze(1)
    start_values = labels[start[:, 0], start[:, 1]].unsqueeze(1)
    current_values = labels[current[:, :, 0], current[:, :, 1]]
    return ((current_values == start_values) | ~checked).all(dim=1).view(n, n)


def sfr_prior(labels: torch.Tensor, sigma: float = 5.0, delete_same_entity: bool = True) -> torch.Tensor:
    """ResCLIP's ``generate_attention_sfr``: the semantic prior S over patch pairs, [CLS] row and column 0.

    M[i, j] = 1 where patches i and j share a label (and on the diagonal); with ``delete_same_entity`` a pair
    without a valid path (:func:`valid_paths`) is multiplied by exp(−d / D) (Chebyshev distance d, D its
    maximum). Each row is then blurred by a 1-D Gaussian along the raster-order key index (σ, kernel
    ``min(N, int(6σ + 1))`` made odd, zero padding), passed through ReLU and divided by its sum (+ 1e-8).

    Args:
        labels: h x w patch labels.

    Returns:
        (1 + N) x (1 + N) float32, N = h·w.
    """
    h, w = labels.shape
    n = h * w
    flat = labels.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    same.diagonal().fill_(1)
    if delete_same_entity:
        idx = torch.arange(n, device=labels.device)
        rows, cols = torch.div(idx, w, rounding_mode="floor"), idx % w
        steps = torch.maximum((rows[None, :] - rows[:, None]).abs(), (cols[None, :] - cols[:, None]).abs())
        decay = torch.exp(-steps / int(steps.max()))
        same = torch.where(valid_paths(labels), same, same * decay)
    size = min(n, int(6 * sigma + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=labels.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(same.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
    out = torch.zeros((n + 1, n + 1), device=labels.device)
    out[1:, 1:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return out


@register_method(
    "resclip",
    ranges={
        "temp_thd": {"low": 0, "high": 1},
        "rcs_tau": {"low": 0, "low_open": True},
        "rcs_lambda": {"low": 0, "high": 1},
        "sfr_tau": {"low": 0, "low_open": True},
        "sfr_lambda": {"low": 0, "high": 1},
        "sigma": {"low": 0, "low_open": True},
        "rcs_blocks": {"low": 1},
        "pamr_iterations": {"low": 0},
        "pamr_dilations": {"low": 1},
    },
    order=60,
    summary="ResCLIP on NACLIP: kk + Gaussian attention mixed with blocks 6-9 (RCS) and a first-pass label prior (SFR)",
    datasets={
        "voc21": {
            "crop": 0,
            "prob_thd": 0.1,
            "head_kwargs": {"temp_thd": 0.50, "rcs_lambda": 0.3, "sfr_tau": 2.2, "sfr_lambda": 0.7},
        },
        "context60": {
            "prob_thd": 0.1,
            "head_kwargs": {"temp_thd": 0.30, "rcs_lambda": 0.3, "sfr_tau": 1.8, "sfr_lambda": 0.7},
        },
        "coco_object": {
            "prob_thd": 0.1,
            "head_kwargs": {"temp_thd": 0.11, "rcs_lambda": 0.4, "sfr_tau": 1.8, "sfr_lambda": 0.7},
        },
        "voc20": {"crop": 0, "head_kwargs": {"temp_thd": 0.10, "rcs_lambda": 0.6, "sfr_tau": 2.1, "sfr_lambda": 0.6}},
        "context59": {"head_kwargs": {"temp_thd": 0.25, "rcs_lambda": 0.4, "sfr_tau": 1.8, "sfr_lambda": 0.7}},
        "coco_stuff": {"head_kwargs": {"temp_thd": 0.11, "rcs_lambda": 0.4, "sfr_tau": 1.8, "sfr_lambda": 0.7}},
        "cityscapes": {
            "short_side": 560,
            "head_kwargs": {"temp_thd": 0.10, "rcs_lambda": 0.2, "sfr_tau": 2.1, "sfr_lambda": 0.6},
        },
        "ade20k": {"head_kwargs": {"temp_thd": 0.25, "rcs_lambda": 0.3, "sfr_tau": 2.1, "sfr_lambda": 0.7}},
    },
)
class ResclipHead(DenseHead):
    """ResCLIP's last block (module docstring).

    The reference has no defaults (every config sets them); these are its ADE20K values (ours, for images of no
    benchmark), and the presets set each dataset's.

    Args:
        temp_thd: probability below which a first-pass pixel takes name 0.
        rcs_tau, rcs_lambda: τ_r, λ_r of the RCS mix (2.0 and a per-dataset λ_r).
        sfr_tau, sfr_lambda: τ_s, λ_s of the SFR mix.
        sigma: σ of NACLIP's Gaussian ω and of the SFR blur (5).
        rcs_blocks: the blocks whose attention is averaged (6-9).
        delete_same_entity: the path check of the prior (on in every shipped config).
        pamr_iterations, pamr_dilations: the first pass's PAMR.
    """

    needs_text = True

    def __init__(
        self,
        temp_thd: float = 0.25,
        rcs_tau: float = 2.0,
        rcs_lambda: float = 0.3,
        sfr_tau: float = 2.1,
        sfr_lambda: float = 0.7,
        sigma: float = 5.0,
        rcs_blocks: tuple[int, ...] = (6, 7, 8, 9),
        delete_same_entity: bool = True,
        pamr_iterations: int = 10,
        pamr_dilations: tuple[int, ...] = (8, 16),
    ):
        self.temp_thd, self.sigma, self.delete_same_entity = temp_thd, sigma, delete_same_entity
        self.rcs_tau, self.rcs_lambda, self.sfr_tau, self.sfr_lambda = rcs_tau, rcs_lambda, sfr_tau, sfr_lambda
        self.rcs_blocks = tuple(rcs_blocks)
        self.pamr_iterations, self.pamr_dilations = pamr_iterations, tuple(pamr_dilations)
        self._omega: dict = {}

    def taps(self, tower) -> Taps:
        if max(self.rcs_blocks) >= tower.num_blocks:
            raise ValueError(
                f"ResCLIP averages the attention of blocks {self.rcs_blocks}; this tower has {tower.num_blocks} blocks"
            )
        return Taps(attention=self.rcs_blocks)

    def omega(self, grid, num_prefix: int, device, dtype) -> torch.Tensor:
        key = (tuple(grid), num_prefix, str(device), dtype)
        if key not in self._omega:
            self._omega[key] = gaussian_neighbourhood_bias(grid, self.sigma, num_prefix, device, dtype)
        return self._omega[key]

    def last_block(self, tower, x, context):
        grid, images, text = context.grid, context.images, context.inputs.text
        attention = context.attention
        rcs = torch.stack([attention[b] for b in self.rcs_blocks]).mean(dim=0)  # B x heads x L x L
        _, k, v = tower.qkv(tower.last_norm1(x))
        kk = (k @ k.transpose(-2, -1)) * tower.scale
        omega = self.omega(grid, tower.num_prefix_tokens, kk.device, kk.dtype)

        def attend(prior: torch.Tensor | None) -> torch.Tensor:
            logits = kk
            if prior is not None:
                # S / max(S) in fp16 and λ_s·S in fp16 (promoted when added), the reference's rounding.
                lam_prior = self.sfr_lambda * (prior / prior.amax(dim=(-2, -1), keepdim=True)).to(torch.float16)
                logits = self.sfr_tau * ((1 - self.sfr_lambda) * logits + lam_prior)
            weights = torch.softmax(logits + omega, dim=-1)
            weights = self.rcs_tau * ((1 - self.rcs_lambda) * weights + self.rcs_lambda * rcs)
            context.record(weights)  # the final (SFR) pass's is kept
            return tower.attn_out(weights @ v.to(weights.dtype))

        first = tower.project(attend(None))[:, tower.num_prefix_tokens :]
        first = first / first.norm(dim=-1, keepdim=True)
        h, w = grid
        cos = (first @ text.embeddings.to(first.dtype).T).transpose(1, 2).reshape(len(first), -1, h, w)
        cos = F.interpolate(cos, size=images.shape[-2:], mode="bilinear", align_corners=False)
        probs = []
        for b in range(len(cos)):  # PAMR and everything after it per window, as the reference's batch of 1
            refined = pamr(images[b : b + 1], cos[b : b + 1], self.pamr_iterations, self.pamr_dilations)
            probs.append(torch.softmax(refined[0] * text.logit_scale, dim=0))
        priors = torch.stack(
            [
                sfr_prior(patch_labels(p, tower.patch_size, grid, self.temp_thd), self.sigma, self.delete_same_entity)
                for p in probs
            ]
        ).unsqueeze(1)  # B x 1 x L x L, the same for every head
        return attend(priors.to(kk.dtype))

    def __repr__(self) -> str:
        return (
            f"ResclipHead(temp_thd={self.temp_thd}, rcs=({self.rcs_tau}, {self.rcs_lambda}), "
            f"sfr=({self.sfr_tau}, {self.sfr_lambda}))"
        )
