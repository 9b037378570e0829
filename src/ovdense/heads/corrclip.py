"""CorrCLIP v1 (Zhang et al., ICCV 2025): VFM correlations restricted to class-agnostic regions, three branches.

As zdk258/CorrCLIP computes it (``CorrCLIPv1/corrclip_segmentor.py``, ``open_clip/transformer.py``
``VisionTransformer.forward``; commit 103bc18), per window, with the window's region ids M (the image's mask
resized like the image and cropped like the window):

1. d̂ = normalised q + k of the VFM's last block (DINO B/8: a 42 x 42 grid at 336 px), S = d̂ d̂ᵀ.
2. M on the VFM grid (nearest); with more than 2 distinct values, the regions but the one with the smallest id
   are merged by the connected components of "cos(mean d̂ of two regions) ≥ max − ε" (DBSCAN with
   ``min_samples=1`` on max(G) − G, ε = 0.2), relabelled 10000 + component (:func:`merge_regions`).
3. Scope (:func:`scope_attention`): pairs inside one region, and pairs touching the smallest-id region whose S
   is above the window's mean S; P = softmax(τ S) over those (τ = 4), −∞ elsewhere; one P for every head.
4. Main and spatial branches: the last block's values of ln_1(x) and of ln_1(mean of blocks 6-10's outputs)
   ([CLS] dropped, bilinear from the CLIP grid to the VFM grid), out_proj(P v), no residual or FFN.
5. Semantic branch: one token per region of M on the CLIP grid, starting as [CLS] after ln_pre, through every
   block in full, attending only to [CLS] and its region's patches; each VFM-grid cell takes its region's token.
6. ln_post of each branch, mixed 1 + α·spatial + β·semantic (α = 1, β = 0.5), then the projection.

The per-mask vote on the original masks (every region but the smallest id takes its most frequent label) is
:func:`ovdense.masks.vote`; the Segmenter applies it after the labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import Taps
from ..methods import register_method
from .base import Branches, DenseHead
from .vfm_proxies import MERGED_REGION_ID, resize_region_ids, values_on_grid, vfm_input

__all__ = ["CorrclipHead", "connected_components", "merge_regions", "scope_attention"]


def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """Component ids of a symmetric boolean adjacency (R x R), numbered 0, 1, ... in order of each component's
    first member: DBSCAN's labels with ``min_samples=1`` (every point is a core point)."""
    n = adjacency.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long)
    adjacency = adjacency.cpu()
    current = 0
    for start in range(n):
        if labels[start] >= 0:
            continue
        frontier = [start]
        labels[start] = current
        while frontier:
            node = frontier.pop()
            for other in torch.nonzero(adjacency[node] & (labels < 0)).flatten().tolist():
                labels[other] = current
                frontier.append(other)
        current += 1
    return labels


def merge_regions(ids: torch.Tensor, features: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """CorrCLIP's mask merging of one window.

    Args:
        ids: I x J region ids on the VFM grid.
        features: (I·J) x C normalised VFM features.
        eps: DBSCAN's radius on max(G) − G.

    Returns:
        I x J ids: unchanged with at most 2 distinct values; else the smallest id kept and every other region
        relabelled ``10000 + its component``.
    """
    values = torch.unique(ids)
    if len(values) <= 2:
        return ids
    flat = ids.reshape(-1)
    regions = [flat == v for v in values]
    means = F.normalize(torch.stack([features[m].mean(dim=0) for m in regions]), dim=1)[1:]
    similarity = means @ means.T
    # The reference hands max(G) - G to scikit-learn as float32 and compares it with eps as a double.
    components = connected_components((similarity.max() - similarity).double() <= eps)
    merged = flat.clone()
    for region, component in zip(regions[1:], components.tolist(), strict=True):
        merged[region] = component + MERGED_REGION_ID
    return merged.view_as(ids)


def scope_attention(similarity: torch.Tensor, ids: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """CorrCLIP's attention of one window: softmax(τ S) over the allowed pairs, −∞ elsewhere.

    Allowed: pairs inside one region other than the smallest-id one, and pairs with a member in the smallest-id
    region whose S is above the mean of S.

    Args:
        similarity: N x N.
        ids: N region ids (after merging).

    Returns:
        N x N row-stochastic.
    """
    values = torch.unique(ids)
    allowed = torch.zeros_like(similarity, dtype=torch.bool)
    for v in values[1:]:
        m = ids == v
        allowed |= m[:, None] & m[None, :]
    unsegmented = ids == values[0]
    allowed |= (unsegmented[None, :] | unsegmented[:, None]) & (similarity > similarity.mean())
    return (similarity.masked_fill(~allowed, float("-inf")) * tau).softmax(dim=-1)


@register_method(
    "corrclip",
    ranges={"tau": {"low": 0, "low_open": True}, "eps": {"low": 0}},
    order=80,
    summary="CorrCLIP: VFM correlations within class-agnostic masks, spatial and semantic branches, a vote per mask",
    defaults={
        "short_side": 336,
        "crop": 336,
        "stride": 112,
        "pad_multiple": 56,
        "class_style": "corrclip",
    },
    datasets_of="proxyclip",  # the same values in both repositories' configs
    model="ViT-B-16-quickgelu",
    pretrained="metaclip_fullcc",
    vfm="dino-b8",
)
class CorrclipHead(DenseHead):
    """CorrCLIP v1's last block (module docstring).

    Args:
        tau: τ of the scope attention (4).
        eps: the merging radius (0.2).
        alpha, beta: weights of the spatial and semantic branches (1.0, 0.5).
    """

    output_has_prefix = False
    uses_vfm = True
    uses_masks = True

    def __init__(self, tau: float = 4.0, eps: float = 0.2, alpha: float = 1.0, beta: float = 0.5):
        self.tau, self.eps, self.alpha, self.beta = tau, eps, alpha, beta

    @staticmethod
    def spatial_blocks(num_blocks: int) -> range:
        """The blocks whose outputs the spatial branch averages: 6-10 of 12 (the reference's rule by depth)."""
        count = {12: 5, 24: 12, 32: 28}.get(num_blocks, num_blocks - 4)
        return range(num_blocks - 1 - count, num_blocks - 1)

    def taps(self, tower) -> Taps:
        if not len(self.spatial_blocks(tower.num_blocks)):
            raise ValueError(f"CorrCLIP averages middle blocks; this tower has {tower.num_blocks} blocks (needs >= 5)")
        # Every block's input: the semantic tokens attend to them; blocks 6-10's outputs are among them.
        return Taps(states=tuple(range(tower.num_blocks - 1)))

    def last_block(self, tower, x, context):
        vfm, pre = context.inputs.vfm, tower.preprocess
        qk = vfm.last_qk(vfm_input(context.images.float(), pre.mean, pre.std, vfm.mean, vfm.std))
        grid_f = tuple(qk.shape[-2:])
        feats = F.normalize(qk.flatten(2).transpose(1, 2), dim=-1)  # B x N_f x C
        similarity = torch.einsum("bmc,bnc->bmn", feats, feats)
        ids_f = resize_region_ids(context.inputs.masks, grid_f)
        states = context.states
        spatial = torch.stack([states[b] for b in self.spatial_blocks(tower.num_blocks)]).mean(0)
        v_main = values_on_grid(tower, x, context.grid, grid_f)
        v_spatial = values_on_grid(tower, spatial, context.grid, grid_f)
        main, spatial_out, semantic, applied = [], [], [], []
        for i in range(len(x)):  # the regions, and so the attention and the semantic tokens, differ per window
            merged = merge_regions(ids_f[i], feats[i], self.eps)
            weights = scope_attention(similarity[i], merged.reshape(-1), self.tau)[None, None]
            applied.append(weights)
            main.append(tower.attn_out(weights @ v_main[i : i + 1])[0])
            spatial_out.append(tower.attn_out(weights @ v_spatial[i : i + 1])[0])
            ids_c = resize_region_ids(merged[None], context.grid)[0]
            semantic.append(self._semantic(tower, states, x, i, ids_c, grid_f))
        context.out_grid = grid_f
        if context.record_attention:
            context.record(torch.cat(applied))
        branches = (torch.stack(main), torch.stack(spatial_out), torch.stack(semantic))
        return Branches(branches, (1.0, self.alpha, self.beta))

    def _semantic(self, tower, states, x, i, ids_c: torch.Tensor, grid_f) -> torch.Tensor:
        """The semantic branch of window ``i``: N_f x C, each VFM-grid cell its region's token."""
        npt = tower.num_prefix_tokens
        values = torch.unique(ids_c)
        regions = torch.stack([(ids_c == v).reshape(-1) for v in values])  # R x (h·w)
        # Keys: the prefix tokens (CLIP: [CLS]) and the region's own patches; never the mask tokens.
        allowed = torch.cat([regions.new_ones(len(values), npt), regions], dim=1)  # R x L
        tokens = states[0][i, :1].expand(len(values), -1)  # [CLS] after ln_pre
        for block in range(tower.num_blocks):
            sequence = (states[block][i] if block < tower.num_blocks - 1 else x[i])[None]
            q, _, _ = tower.qkv(tower.norm1(tokens[None], block), block)
            _, k, v = tower.qkv(tower.norm1(sequence, block), block)
            logits = (q * tower.scale) @ k.transpose(-2, -1)
            weights = torch.softmax(logits.masked_fill(~allowed[None, None], float("-inf")), dim=-1)
            tokens = tokens + tower.attn_out(weights @ v, block)[0]
            tokens = tokens + tower.ffn(tokens[None], block)[0]
        cells = F.interpolate(regions.view(-1, 1, *ids_c.shape).float(), size=grid_f, mode="nearest").flatten(1)
        return cells.T @ tokens

    def __repr__(self) -> str:
        return f"CorrclipHead(tau={self.tau}, eps={self.eps}, alpha={self.alpha}, beta={self.beta})"
