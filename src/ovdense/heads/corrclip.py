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

Every step runs for all windows of a batch at once: the per-window regions as one-hot matrices padded to the most
regions of a window (:func:`region_index`), the semantic tokens of every window as one padded batch.

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

__all__ = ["CorrclipHead", "connected_components", "merge_regions", "region_index", "scope_attention"]


def region_index(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ids of each window, ascending, and each cell's place among them, for all windows at once.

    Args:
        ids: B x ... integer region ids of B windows.

    Returns:
        ``(local, values, counts)``: B x M (M = the cells of a window) each cell's index into its window's
        distinct ids (0 = the smallest); B x R values, those ids, padded past ``counts`` with the window's largest;
        B the number of distinct ids of each window (R = the largest count).
    """
    b = ids.shape[0]
    flat = ids.reshape(b, -1)
    low = flat.min()
    span = int(flat.max() - low) + 1
    # One unique over all windows: a window's ids are offset past the previous window's, so the sorted result
    # holds each window's distinct ids in ascending order, window after window.
    keyed = (flat - low) + torch.arange(b, device=ids.device)[:, None] * span
    unique, inverse = torch.unique(keyed, return_inverse=True)
    window = torch.div(unique, span, rounding_mode="floor")
    counts = torch.bincount(window, minlength=b)
    starts = torch.cumsum(counts, 0) - counts
    local = inverse - starts[:, None]
    rank = torch.arange(len(unique), device=ids.device) - starts[window]
    values = flat.max(dim=1).values[:, None].repeat(1, int(counts.max()))
    values[window, rank] = unique - window * span + low
    return local, values, counts


def connected_components(adjacency: torch.Tensor) -> torch.Tensor:
    """Component ids of symmetric boolean adjacencies (... x R x R), numbered 0, 1, ... per matrix in order of
    each component's first member: DBSCAN's labels with ``min_samples=1`` (every point is a core point).

    Returns:
        ... x R int64.
    """
    n = adjacency.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=adjacency.device)
    reach = adjacency | eye
    # The transitive closure by repeated squaring: 0/1 products summed in float32 are exact counts (n < 2^24).
    while True:
        wider = (reach.float() @ reach.float()) > 0
        if torch.equal(wider, reach):
            break
        reach = wider
    first = reach.to(torch.uint8).argmax(dim=-1)  # each node's component, by its first member (argmax: first max)
    starts = first == torch.arange(n, device=adjacency.device)
    return (torch.cumsum(starts, dim=-1) - 1).gather(-1, first)


def merge_regions(ids: torch.Tensor, features: torch.Tensor, eps: float = 0.2) -> torch.Tensor:
    """CorrCLIP's mask merging of each window.

    Args:
        ids: B x I x J region ids on the VFM grid (or I x J: one window).
        features: B x (I·J) x C normalised VFM features (or (I·J) x C).
        eps: DBSCAN's radius on max(G) − G.

    Returns:
        ids' shape: a window's ids unchanged where it has at most 2 distinct values; else the smallest id kept and
        every other region relabelled ``10000 + its component``.
    """
    if ids.ndim == 2:
        return merge_regions(ids[None], features[None], eps)[0]
    local, values, counts = region_index(ids)
    merging = counts > 2
    if not merging.any():
        return ids
    num = values.shape[1]
    onehot = (local[:, None, :] == torch.arange(num, device=ids.device)[:, None]).to(features.dtype)  # B x R x N
    # Each region's mean feature (zero for the padding), normalised; the smallest id is never merged.
    means = onehot @ features / onehot.sum(dim=-1, keepdim=True).clamp(min=1)
    means = F.normalize(means, dim=-1)[:, 1:]
    similarity = means @ means.transpose(1, 2)  # B x x
    real = torch.arange(num - 1, device=ids.device) < (counts - 1)[:, None]
    pairs = real[:, :, None] & real[:, None, :]
    top = similarity.masked_fill(~pairs, float("-inf")).amax(dim=(1, 2), keepdim=True)
    # The reference hands max(G) - G to scikit-learn as float32 and compares it with eps as a double.
    components = connected_components(((top - similarity).double() <= eps) & pairs)
    relabelled = torch.cat([values[:, :1], components + MERGED_REGION_ID], dim=1)
    merged = relabelled.gather(1, local)
    flat = ids.reshape(len(ids), -1)
    return torch.where(merging[:, None], merged, flat).view_as(ids)


def scope_attention(similarity: torch.Tensor, ids: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """CorrCLIP's attention of each window: softmax(τ S) over the allowed pairs, −∞ elsewhere.

    Allowed: pairs inside one region other than the window's smallest-id one, and pairs with a member in the
    smallest-id region whose S is above the window's mean of S.

    Args:
        similarity: B x N x N (or N x N: one window).
        ids: B x N region ids (after merging), or N.

    Returns:
        similarity's shape, row-stochastic.
    """
    if similarity.ndim == 2:
        return scope_attention(similarity[None], ids[None], tau)[0]
    unsegmented = ids == ids.min(dim=1, keepdim=True).values  # B x N
    touches = unsegmented[:, :, None] | unsegmented[:, None, :]
    # A pair touching the unsegmented region is allowed by S alone; any other pair by sharing a region.
    above = similarity > similarity.mean(dim=(1, 2), keepdim=True)
    allowed = torch.where(touches, above, ids[:, :, None] == ids[:, None, :])
    return torch.where(allowed, similarity * tau, float("-inf")).softmax(dim=-1)


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
    """CorrCLIP v1's last block (module docstring), for all windows of a batch at once.

    A subclass (CorrCLIPv2) changes where the correlation features come from (:meth:`correlation_features`) and
    whether regions are merged (:attr:`merges_regions`); the scope attention, the three branches and their mix are
    shared.

    Args:
        tau: τ of the scope attention (4).
        eps: the merging radius (0.2).
        alpha, beta: weights of the spatial and semantic branches (1.0, 0.5).
    """

    output_has_prefix = False
    uses_vfm = True
    uses_masks = True
    #: Whether the regions are merged (:func:`merge_regions`) before the scope attention and the semantic tokens;
    #: CorrCLIPv2 uses the nearest-resized ids as they are.
    merges_regions: bool = True

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

    def correlation_features(self, tower, x, context) -> tuple[torch.Tensor, tuple[int, int]]:
        """Where the correlations come from: the VFM's normalised last-block q + k of each window.

        Args:
            tower: the CLIP tower; x: the B x L x C tokens entering its last block; context: the pass's
                :class:`~ovdense.heads.base.PassContext`.

        Returns:
            B x N_f x C L2-normalised features, N_f = h_f·w_f row-major, and the grid (h_f, w_f) the head's
            output lives on.
        """
        vfm, pre = context.inputs.vfm, tower.preprocess
        qk = vfm.last_qk(vfm_input(context.images.float(), pre.mean, pre.std, vfm.mean, vfm.std))
        return F.normalize(qk.flatten(2).transpose(1, 2), dim=-1), tuple(qk.shape[-2:])

    def last_block(self, tower, x, context):
        feats, grid_f = self.correlation_features(tower, x, context)
        similarity = torch.einsum("bmc,bnc->bmn", feats, feats)
        ids_f = resize_region_ids(context.inputs.masks, grid_f)  # B x h_f x w_f
        if self.merges_regions:
            ids_f = merge_regions(ids_f, feats, self.eps)
        weights = scope_attention(similarity, ids_f.flatten(1), self.tau)[:, None]  # one P for every head
        states = context.states
        spatial = torch.stack([states[b] for b in self.spatial_blocks(tower.num_blocks)]).mean(0)
        # The main and spatial branches in one product: one P for every head and both branches, so their values
        # go side by side (B x N_f x 2C) rather than P being broadcast (copied) to every head.
        values = [tower.merge_heads(values_on_grid(tower, t, context.grid, grid_f)) for t in (x, spatial)]
        attended = weights[:, 0] @ torch.cat(values, dim=-1).to(weights.dtype)
        main, spatial_out = (tower.attn_out(tower.split_heads(t, tower.num_heads)) for t in attended.chunk(2, dim=-1))
        ids_c = resize_region_ids(ids_f, context.grid)
        semantic = self._semantic(tower, states, x, ids_c, grid_f)
        context.out_grid = grid_f
        context.record(weights)
        return Branches((main, spatial_out, semantic), (1.0, self.alpha, self.beta))

    def _semantic(self, tower, states, x, ids_c: torch.Tensor, grid_f) -> torch.Tensor:
        """The semantic branch of every window: B x N_f x C, each VFM-grid cell its region's token.

        The windows' region tokens run as one padded batch (B x R tokens, R: the most regions of a window); a
        padding token attends to the prefix only and is never read.

        Args:
            ids_c: B x h x w region ids on the tower's grid.
        """
        npt = tower.num_prefix_tokens
        local, _, counts = region_index(ids_c)  # B x (h·w) each patch's region, B regions per window
        regions = local[:, None, :] == torch.arange(int(counts.max()), device=local.device)[:, None]  # B x R x (h·w)
        # Keys: the prefix tokens (CLIP: [CLS]) and the region's own patches; never the mask tokens.
        allowed = torch.cat([regions.new_ones(*regions.shape[:2], npt), regions], dim=2)[:, None]  # B x 1 x R x L
        tokens = states[0][:, :1].expand(-1, regions.shape[1], -1)  # [CLS] after ln_pre
        for block in range(tower.num_blocks):
            sequence = states[block] if block < tower.num_blocks - 1 else x
            q, _, _ = tower.qkv(tower.norm1(tokens, block), block)
            _, k, v = tower.qkv(tower.norm1(sequence, block), block)
            logits = (q * tower.scale) @ k.transpose(-2, -1)
            weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
            tokens = tokens + tower.attn_out(weights @ v, block)
            tokens = tokens + tower.ffn(tokens, block)
        # Each VFM-grid cell takes the token of its nearest patch's region.
        cells = resize_region_ids(local.view_as(ids_c), grid_f).flatten(1)  # B x N_f
        return tokens.gather(1, cells[:, :, None].expand(-1, -1, tokens.shape[-1]))

    def __repr__(self) -> str:
        return f"CorrclipHead(tau={self.tau}, eps={self.eps}, alpha={self.alpha}, beta={self.beta})"
