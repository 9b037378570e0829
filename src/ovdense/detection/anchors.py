"""RPN anchors with mmdet 2.28.1 ``AnchorGenerator`` semantics (re-implemented, no mmdet/mmcv import).

Semantics from mmdet 2.28.1 ``mmdet/core/anchor/anchor_generator.py`` (``gen_single_level_base_anchors``,
``_meshgrid``, ``single_level_grid_priors``) as configured by F-ViT (``scales=[8]``, ``ratios=[0.5, 1, 2]``,
``base_sizes = strides``, ``center_offset=0``, ``scale_major=True``):

- the base anchor of a level is centred at (0, 0); with ``h_r = sqrt(ratio)`` (ratio = h / w) its width is
  ``stride * scale / h_r`` and its height ``stride * scale * h_r``; corners are ``centre -/+ size / 2``;
- ratios are the outer loop, scales the inner one (``scale_major``): anchor ``a = i_ratio * len(scales) + i_scale``;
- the grid shift of location (y, x) is ``(x * stride, y * stride)``; anchors are location-major (row-major over
  y then x) and anchor-minor: row ``(y * W + x) * A + a``.

How this differs from torchvision's ``AnchorGenerator`` (quirk 3 of the F-ViT spec): torchvision derives integer
strides as ``image_size // grid_size`` and ``round()``s its cell anchors; ViT-L/14 pyramids have FLOAT strides
(3.5, 7, 14, 28, 56), so here strides are given explicitly as floats and nothing is rounded anywhere. The
arithmetic (fp32 base anchors, ``shift = arange(W).to(dtype) * stride``) follows mmdet's op order so the values
are bit-identical to mmdet's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["AnchorGenerator"]


class AnchorGenerator:
    """Multi-level anchor grids, one square-stride level per entry of ``strides``.

    Args:
        strides: stride (input pixels per feature cell) of each level; may be non-integer (e.g. 3.5). Also the
            base size of that level's anchors (mmdet ``base_sizes=None`` -> ``min(stride)``).
        scales: anchor scales (multiples of the base size), mmdet ``scales``.
        ratios: height / width ratios, mmdet ``ratios``.
    """

    def __init__(
        self,
        strides: Sequence[float],
        scales: Sequence[float] = (8.0,),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
    ) -> None:
        if len(strides) == 0:
            raise ValueError("AnchorGenerator needs at least one stride")
        if any(float(s) <= 0 for s in strides):
            raise ValueError(f"strides must be positive, got {list(strides)}")
        self.strides = [float(s) for s in strides]
        self.scales = [float(s) for s in scales]
        self.ratios = [float(r) for r in ratios]
        # mmdet builds these with torch.Tensor(...) (fp32) and keeps them fp32 until grid time.
        self._base = [self._single_level_base(s) for s in self.strides]

    def _single_level_base(self, base_size: float) -> torch.Tensor:
        # mmdet 2.28.1 anchor_generator.py gen_single_level_base_anchors, center_offset=0 -> centre (0, 0).
        scales = torch.tensor(self.scales, dtype=torch.float32)
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        # scale_major=True: ratios outer, scales inner.
        ws = (base_size * w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * scales[None, :]).reshape(-1)
        # mmdet computes x_center - 0.5 * ws with x_center = 0.0; 0.0 - v == -v exactly.
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)

    @property
    def num_anchors(self) -> int:
        """Anchors per feature location, ``len(scales) * len(ratios)`` (mmdet ``num_base_priors``)."""
        return len(self.scales) * len(self.ratios)

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    def base_anchors(self, level: int) -> torch.Tensor:
        """A x 4 fp32 XYXY base anchors of ``level``, centred at (0, 0), order ``ratio * len(scales) + scale``."""
        return self._base[level].clone()

    def grid_anchors(
        self,
        feature_sizes: Sequence[tuple[int, int]],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """Anchors of every level on its feature grid (mmdet 2.28.1 ``AnchorGenerator.grid_priors``).

        Args:
            feature_sizes: ``(H_l, W_l)`` of each level's feature map, one per stride.
            device, dtype: of the returned tensors (mmdet casts the fp32 base anchors to ``dtype`` first).

        Returns:
            list of ``(H_l * W_l * A) x 4`` XYXY tensors in input pixels; row ``(y * W_l + x) * A + a``.
        """
        if len(feature_sizes) != self.num_levels:
            raise ValueError(f"got {len(feature_sizes)} feature sizes for {self.num_levels} anchor levels")
        out = []
        for level, (feat_h, feat_w) in enumerate(feature_sizes):
            stride = self.strides[level]
            base = self._base[level].to(device=device).to(dtype)
            # mmdet: arange in the default integer dtype, cast to dtype, then times the (float) stride.
            shift_x = torch.arange(0, int(feat_w), device=device).to(dtype) * stride
            shift_y = torch.arange(0, int(feat_h), device=device).to(dtype) * stride
            # mmdet _meshgrid(row_major=True): x varies fastest.
            shift_xx = shift_x.repeat(shift_y.shape[0])
            shift_yy = shift_y.view(-1, 1).repeat(1, shift_x.shape[0]).view(-1)
            shifts = torch.stack([shift_xx, shift_yy, shift_xx, shift_yy], dim=-1)
            out.append((base[None, :, :] + shifts[:, None, :]).view(-1, 4))
        return out
