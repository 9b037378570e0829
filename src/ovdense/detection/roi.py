"""RoI feature pooling with mmdet 2.28.1 ``SingleRoIExtractor`` / mmcv 1.7.0 ``RoIAlign`` semantics.

Sources: mmdet 2.28.1 ``mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py`` (``map_roi_levels``,
``forward``, decorated ``force_fp32``), ``mmdet/models/roi_heads/roi_extractors/base_roi_extractor.py``
(``spatial_scale = 1 / stride`` per level) and mmcv 1.7.0 ``mmcv/ops/roi_align.py`` (defaults ``aligned=True``,
``sampling_ratio=0``, ``pool_mode='avg'``; the mmcv kernel and ``torchvision.ops.roi_align(aligned=True)`` sample
the same points: start ``x1 * scale - 0.5``, ``ceil(roi_size / bins)`` samples per bin when the ratio is 0,
division by ``max(count, 1)``).

How this differs from torchvision's ``MultiScaleRoIAlign`` (quirks 3, 4 and 19 of the F-ViT spec):

- torchvision infers each level's scale as a power of two from the feature/image size ratio (``1/4`` where a
  ViT-L/14 pyramid needs ``1/3.5``); here every ``spatial_scale`` is ``1 / stride`` from the given strides;
- torchvision calls ``roi_align`` with ``aligned=False`` (no half-pixel shift); mmcv's default is ``aligned=True``;
- level rule: mmdet ``floor(log2(sqrt(w h) / 56 + 1e-6))`` clamped to ``[0, L-1]``; torchvision 0.29's
  ``LevelMapper`` computes ``floor(4 + log2(sqrt(w h) / 224) + 1e-6) - 2`` (eps outside the log): the two agree
  except for sizes within a relative ~1e-6 of the boundaries 112, 224, 448 (e.g. a size of 112 * (1 - 1e-6)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.ops import roi_align

__all__ = ["map_roi_levels", "multilevel_roi_align", "roi_align_single"]


def map_roi_levels(rois: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """Pyramid level of each RoI, mmdet 2.28.1
    mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py ``map_roi_levels``.

    ``rois``: K x 5 ``[batch index, x1, y1, x2, y2]`` in input pixels. Returns K long
    ``clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, num_levels - 1)``: with 56, sizes below 112 go to
    level 0, [112, 224) to 1, [224, 448) to 2, the rest to 3.
    """
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    features: Sequence[torch.Tensor],
    strides: Sequence[float],
    rois: torch.Tensor,
    output_size: int,
    sampling_ratio: int = 0,
    finest_scale: float = 56.0,
) -> torch.Tensor:
    """RoIAlign of each RoI on its pyramid level, mmdet 2.28.1
    mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py ``SingleRoIExtractor.forward``.

    Args:
        features: per level B x C x H_l x W_l maps (P2-P5 for F-ViT; the RPN-only P6 is not passed).
        strides: per level stride in input pixels (4, 8, 16, 32 or 3.5, 7, 14, 28): ``spatial_scale = 1 / stride``.
        rois: K x 5 ``[batch index, x1, y1, x2, y2]`` in input pixels.
        output_size: ``s`` of the s x s output (7 for boxes, 14 for masks).
        sampling_ratio: samples per bin side; 0 = adaptive ``ceil(roi_size / s)`` (mmcv default).

    Returns:
        K x C x s x s fp32. mmdet forces the features to fp32 (``force_fp32``); it would cast the output back
        to fp16 under its fp16 mode, here the caller decides. With a single level every RoI goes to it
        (mmdet skips the level mapping then).
    """
    if len(features) != len(strides) or len(features) == 0:
        raise ValueError(f"{len(features)} feature levels for {len(strides)} strides")
    feats = [f.float() for f in features]
    rois = rois.float()
    if len(feats) == 1:
        return roi_align_single(feats[0], rois, strides[0], output_size, sampling_ratio)
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    levels = map_roi_levels(rois, len(feats), finest_scale)
    for level, (feat, stride) in enumerate(zip(feats, strides, strict=True)):
        inds = (levels == level).nonzero(as_tuple=False).squeeze(1)
        # Every level is pooled, also with no RoI (an empty result): every level joins the autograd graph (mmdet
        # adds ``feats[i].sum() * 0`` for DDP's sake), and the graph has the same shape whatever the RoIs, so
        # processes synchronising BatchNorm in the backward pass meet their collectives in the same order.
        out[inds] = roi_align_single(feat, rois[inds], stride, output_size, sampling_ratio)
    return out


def roi_align_single(
    feature: torch.Tensor,
    rois: torch.Tensor,
    stride: float,
    output_size: int,
    sampling_ratio: int = 0,
) -> torch.Tensor:
    """``torchvision.ops.roi_align`` with mmcv 1.7.0 mmcv/ops/roi_align.py ``RoIAlign`` defaults.

    ``feature``: B x C x H x W; ``rois``: K x 5 ``[batch index, x1, y1, x2, y2]`` in input pixels; ``stride``:
    input pixels per feature cell (``spatial_scale = 1 / stride``, never inferred). Returns K x C x s x s in the
    common dtype of ``feature`` and ``rois`` (``aligned=True``, adaptive sampling by default). Used as-is for
    F-ViT's 1 x 1 VLM pooling of proposals on the CLIP map (mmcv ``RoIAlign(use_torchvision=True)``,
    C:F-ViT/models/fvit_head.py).
    """
    if rois.dtype != feature.dtype:
        rois = rois.to(feature.dtype)
    return roi_align(
        feature,
        rois,
        output_size=(output_size, output_size),
        spatial_scale=1.0 / float(stride),
        sampling_ratio=sampling_ratio,
        aligned=True,
    )
