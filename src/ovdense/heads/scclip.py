"""SC-CLIP (Bai et al., IEEE TIP 2025): anomaly repair, similarity aggregation and multi-level passes.

As SuleBai/SC-CLIP computes it (``clip/model.py`` ``VisionTransformer.forward``, commit 0417ba9), on the
residual streams X_l after block l (X_{L-1} enters the last block):

1. Anomalous patch tokens: the code's own local outlier factor on the raw patch tokens of X_{L-1}
   (:func:`local_outlier_factor`), those above the 95% quantile.
2. Repair: each anomalous token of X_{L-1} and X_9 becomes the mean of its valid 3x3 neighbours
   (:func:`repair_anomalies`); [CLS] leaves the stream (kept as c = [CLS] of X_{L-1}).
3. S9 = cos(repaired X_9), S4 = cos(X_4); Agg_S(Y) = (S^β / (rowsum(S^β) + 1e-6)) Y with S^β = S where S ≥ β
   else 0.
4. The last block's attention A(k) = (softmax(Z) + softmax(s k kᵀ)) / 2, Z = 3 (S9 − mean S9) with negative
   entries −inf, the same Z for every head; output out_proj(A v), no residual, no FFN, no q.
5. Pass 1: Y1 = Agg_S4(O(A(k₁) v₁) + 0.3 c), k₁, v₁ from ln_1(Agg_S9(repaired X_{L-1})).
   Pass 2: R = X_4 + ... + X_10 (raw, [CLS] included); Y2 = Agg_S4(O(A(k₂) v₂) + 0.3 c(R)), k₂, v₂ from
   ln_1(patches of R).
6. ln_post(Y1 + Y2) @ proj: patch tokens only, no [CLS] row.

Every statistic (the LOF and its quantile, mean S9, the aggregation matrices) is per image (window): batching
changes no number. One deliberate difference: the reference maps an anomaly's index to (row, column) with the
row count for both ``//`` and ``%``, right only on square grids (every shipped config is square; on others it
repairs the wrong token or raises). Here the mapping is row-major for any grid, equal on square ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import Taps
from ..methods import register_method
from .base import DenseHead

__all__ = ["ScclipHead", "local_outlier_factor", "repair_anomalies", "similarity_aggregation"]


def local_outlier_factor(tokens: torch.Tensor, neighbours: int = 30) -> torch.Tensor:
    """SC-CLIP's ``lof_pytorch`` scores of N points (not sklearn's LOF).

    Squared Euclidean distances; kNN = the ``neighbours`` nearest after dropping the first (the point itself);
    the reach distance uses the point's *own* k-distance, so LRD(p) = k / mean(max(d(p, o), kd(p))) and
    LOF(p) = mean over o in kNN(p) of LRD(o) / LRD(p).

    Args:
        tokens: N x C points (one image's patch tokens).
        neighbours: k.

    Returns:
        N LOF scores.
    """
    distances = torch.norm(tokens[:, None] - tokens[None, :], dim=2, p=2) ** 2
    knn_distances, knn_indices = torch.topk(distances, k=neighbours + 1, largest=False)
    knn_distances, knn_indices = knn_distances[:, 1:], knn_indices[:, 1:]
    k_distances = knn_distances[:, -1].unsqueeze(1).expand_as(knn_distances)
    reach = torch.max(knn_distances, k_distances)
    lrd = neighbours / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    return (lrd[knn_indices] / lrd.unsqueeze(1)).mean(dim=1)


def anomalies(tokens: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """N bool: the tokens whose :func:`local_outlier_factor` is above its ``1 - contamination`` quantile."""
    scores = local_outlier_factor(tokens, neighbours)
    return scores > torch.quantile(scores.to(torch.float32), 1 - contamination)


def repair_anomalies(tokens: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace each masked token by the mean of its 3x3 neighbours that are inside the grid and not masked.

    Zero padding does not count as a neighbour; a masked token with no valid neighbour is kept.

    Args:
        tokens: B x N x C patch tokens, row-major over ``grid`` (h, w).
        mask: B x N bool, the tokens to repair.
        grid: (h, w), h * w = N.

    Returns:
        B x N x C.
    """
    b, n, c = tokens.shape
    h, w = grid
    fmap = tokens.transpose(1, 2).reshape(b, c, h, w)
    keep = (~mask).to(tokens.dtype).view(b, 1, h, w)
    # The reference's depthwise 3x3 sum of the neighbours (centre weight 0), the same convolution here.
    kernel = torch.ones(c, 1, 3, 3, dtype=tokens.dtype, device=tokens.device)
    kernel[:, 0, 1, 1] = 0
    sums = F.conv2d(F.pad(fmap * keep, (1, 1, 1, 1)), kernel, groups=c)
    counts = F.conv2d(F.pad(keep, (1, 1, 1, 1)), kernel[:1])
    update = mask.view(b, 1, h, w).to(tokens.dtype) * (counts > 0).to(tokens.dtype)
    means = sums / torch.where(counts == 0, torch.ones_like(counts), counts)
    fmap = fmap * (1 - update) + means * update
    return fmap.reshape(b, c, n).transpose(1, 2)


def cosine_matrix(tokens: torch.Tensor) -> torch.Tensor:
    """B x N x C -> B x N x N cosine similarities of the rows."""
    t = tokens / tokens.norm(dim=2, keepdim=True)
    return t @ t.transpose(1, 2)


def similarity_aggregation(similarity: torch.Tensor, beta: float) -> torch.Tensor:
    """SC-CLIP's aggregation matrix: S with entries below ``beta`` zeroed, rows divided by (sum + 1e-6).

    Args:
        similarity: B x N x N.

    Returns:
        B x N x N; ``matrix @ tokens`` is Agg_S(tokens).
    """
    s = similarity.masked_fill(similarity < beta, 0.0)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-6)


@register_method(
    "scclip",
    ranges={
        "beta": {"low": -1, "high": 1},
        "pre_adjust": {"low": 1},
        "post_adjust": {"low": 1},
        "multi_start": {"low": 1},
        "multi_end": {"low": 1},
        "neighbours": {"low": 1},
        "contamination": {"low": 0, "high": 1, "low_open": True, "high_open": True},
    },
    order=50,
    summary="SC-CLIP: LOF anomaly repair, similarity aggregation, multi-level pass, no residual/FFN",
    datasets={
        "voc21": {"logit_scale": 50.0, "prob_thd": 0.15, "area_thd": 0.1},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"logit_scale": 55.0, "prob_thd": 0.35},
        "cityscapes": {"short_side": 560},
    },
)
class ScclipHead(DenseHead):
    """SC-CLIP's last block (module docstring); the tapped blocks are 1-indexed as the paper's X_l.

    Args:
        beta: similarity threshold of the aggregation (0.4).
        pre_adjust: the block whose repaired tokens give S9 (9; the code's ``pre_adjust_idx=8``).
        post_adjust: the block whose tokens give S4 (4; ``post_adjust_idx=3``).
        multi_start, multi_end: the blocks summed for the multi-level pass (4..10; ``multi_start_idx=3``,
            ``multi_end_idx=10``, a Python range over 0-based indices).
        res_cls: weight of the [CLS] term added to every token (0.3).
        neighbours, contamination: the LOF's k (30) and anomaly share (0.05).
    """

    output_has_prefix = False

    def __init__(
        self,
        beta: float = 0.4,
        pre_adjust: int = 9,
        post_adjust: int = 4,
        multi_start: int = 4,
        multi_end: int = 10,
        res_cls: float = 0.3,
        neighbours: int = 30,
        contamination: float = 0.05,
    ):
        if not 1 <= multi_start <= multi_end:
            raise ValueError(f"multi_start..multi_end must be a block range, got {multi_start}..{multi_end}")
        self.beta, self.res_cls = beta, res_cls
        self.pre_adjust, self.post_adjust = pre_adjust, post_adjust
        self.multi_start, self.multi_end = multi_start, multi_end
        self.neighbours, self.contamination = neighbours, contamination

    def taps(self, tower) -> Taps:
        blocks = {self.pre_adjust, self.post_adjust, *range(self.multi_start, self.multi_end + 1)}
        last = tower.num_blocks - 1
        if max(blocks) > last:
            raise ValueError(f"SC-CLIP reads blocks up to {max(blocks)}; this tower has {tower.num_blocks} blocks")
        return Taps(states=tuple(sorted(blocks - {last})))

    def last_block(self, tower, x, context):
        states = {**context.states, tower.num_blocks - 1: x}
        grid = context.grid
        npt = tower.num_prefix_tokens
        patches = x[:, npt:]
        # Per image: the LOF, its quantile and so the anomaly set never mix windows of a batch.
        mask = torch.stack([anomalies(p, self.neighbours, self.contamination) for p in patches])
        repaired = repair_anomalies(patches, mask, grid)
        s_pre = cosine_matrix(repair_anomalies(states[self.pre_adjust][:, npt:], mask, grid))
        agg_pre = similarity_aggregation(s_pre, self.beta)
        agg_post = similarity_aggregation(cosine_matrix(states[self.post_adjust][:, npt:]), self.beta)
        prior = (s_pre - s_pre.mean(dim=(1, 2), keepdim=True)) * 3.0
        prior = torch.softmax(prior.masked_fill(prior < 0.0, float("-inf")), dim=-1).unsqueeze(1)  # B x 1 x N x N

        def final_pass(tokens: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
            _, k, v = tower.qkv(tower.last_norm1(tokens))
            weights = (prior + torch.softmax((k @ k.transpose(-2, -1)) * tower.scale, dim=-1)) / 2
            context.record(weights)  # the second (multi-level) pass's is kept
            out = tower.attn_out(weights @ v.to(weights.dtype)) + self.res_cls * cls
            return agg_post @ out

        first = final_pass(agg_pre @ repaired, x[:, :1])
        multi = torch.zeros_like(x)
        for block in range(self.multi_start, self.multi_end + 1):  # summed in the reference's order
            multi += states[block]
        return first + final_pass(multi[:, npt:], multi[:, :1])

    def __repr__(self) -> str:
        return f"ScclipHead(beta={self.beta}, pre_adjust={self.pre_adjust}, post_adjust={self.post_adjust})"
