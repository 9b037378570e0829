"""CorrCLIPv2 (Zhang et al.): CorrCLIP's head on a native-resolution VFM, plus support retrieved from a memory bank.

As zdk258/CorrCLIP computes it (``CorrCLIPv2/corrclip_segmentor.py`` and its vendored ``open_clip/transformer.py``,
commit 103bc18; spec ``corrclipv2.md``), the per-window pass is CorrCLIP v1's (:mod:`ovdense.heads.corrclip`) with
two changes:

1. The correlation features come from the image's VFM (C-RADIOv3-L by default) run **once per image** at its own
   resolution (:mod:`ovdense.vfm_native`): the VFM grid resized bilinearly to the resized image and normalised per
   pixel, cropped like the window (padding repeats the edge), resized bilinearly to **twice the CLIP grid** of the
   padded window (42 x 42 for B/16 at 336 px, 48 x 48 for L/14) and normalised per cell
   (:class:`ovdense.vfm_map.VfmImageMap`).
2. No region merging: the nearest-resized masks enter the scope attention and the semantic tokens as they are.

Retrieval and fusion happen outside the pass, once per image (the :class:`~ovdense.Segmenter` with a memory bank,
:mod:`ovdense.bank.retrieval`): every region of the resized mask (the unsegmented one too) queries the bank's index
with its mean normalised VFM feature, its K = ``num_support`` neighbours' values of the main CLIP (and of the
auxiliary CLIP, DMCE) are averaged, normalised and classified, and the support cosines L are blended with the
image's own cosines O as ``(1 − w)·O + w·L`` (w = ``support_weight``, 0.5 hard-coded by the authors) before the
softmax. Without a bank the method is the authors' "CorrCLIP" row (their v2 code, no bank).

Differences to the authors' code that change only rounding: we compute in float32 where they accumulate the
windows' logits and the fusion in fp16 on the GPU.
"""

from __future__ import annotations

from ..methods import register_method
from .corrclip import CorrclipHead

__all__ = ["Corrclipv2Head"]


@register_method(
    "corrclipv2",
    ranges={"tau": {"low": 0, "low_open": True}, "num_support": {"low": 1}, "support_weight": {"low": 0, "high": 1}},
    order=81,
    summary="CorrCLIPv2: CorrCLIP on a native-resolution VFM (C-RADIOv3), plus regions retrieved from a memory bank",
    defaults={
        "short_side": 336,
        "crop": 336,
        "stride": 112,
        "pad_multiple": 56,
        "class_style": "corrclip",
    },
    datasets={
        "voc21": {"prob_thd": 0.2},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"prob_thd": 0.25},
        "cityscapes": {"short_side": 784, "crop": 224, "stride": 112, "class_style": "corrclipv2"},
        "ade20k": {"short_side": 448},
        "ade847": {"short_side": 448},
    },
    model="ViT-L-14-quickgelu",
    pretrained="metaclip_fullcc",
    vfm="radiov3",
)
class Corrclipv2Head(CorrclipHead):
    """CorrCLIPv2's last block (module docstring); the bank's part is the Segmenter's.

    Args:
        tau: τ of the scope attention (4).
        alpha, beta: weights of the spatial and semantic branches (1.0, 0.5).
        num_support: K, the neighbours each region retrieves from the bank (20).
        support_weight: the bank's share of the fused cosines (0.5, the authors' hard-coded 1 − α).
    """

    output_has_prefix = False
    uses_vfm = True
    uses_masks = True
    native_vfm = True
    merges_regions = False

    def __init__(
        self,
        tau: float = 4.0,
        alpha: float = 1.0,
        beta: float = 0.5,
        num_support: int = 20,
        support_weight: float = 0.5,
    ):
        super().__init__(tau=tau, alpha=alpha, beta=beta)
        self.num_support, self.support_weight = num_support, support_weight

    def correlation_features(self, tower, x, context):
        """The VFM map's crop of each window at twice the CLIP grid: B x N_f x C unit vectors and (h_f, w_f)."""
        grid_f = (2 * context.grid[0], 2 * context.grid[1])
        inputs = context.inputs
        return inputs.vfm_map.window_features(inputs.pixel_coords, grid_f), grid_f

    def __repr__(self) -> str:
        return (
            f"Corrclipv2Head(tau={self.tau}, alpha={self.alpha}, beta={self.beta}, num_support={self.num_support}, "
            f"support_weight={self.support_weight})"
        )
