"""Box <-> delta coding with mmdet 2.28.1 ``DeltaXYWHBBoxCoder`` semantics (re-implemented).

Semantics from mmdet 2.28.1 ``mmdet/core/bbox/coder/delta_xywh_bbox_coder.py`` (``bbox2delta``, ``delta2bbox``
with ``clip_border=True``, ``add_ctr_clamp=False``): centres ``(x1 + x2) / 2`` and sizes ``x2 - x1`` with no +1,
``deltas = (raw - means) / stds``; decoding denormalises, clamps ``dw, dh`` to
``[-|log(wh_ratio_clip)|, +|log(wh_ratio_clip)|]`` (about +-4.135 for 16/1000) and clips x to ``[0, W]``, y to
``[0, H]`` of ``max_shape = (H, W)``.

How this differs from torchvision's ``BoxCoder`` (quirk 10 of the F-ViT spec): torchvision clamps ``dw, dh`` only
from above (``max=log(1000/16)``) and expresses stds as inverse weights (``weights = 1 / stds``: (1, 1, 1, 1) for
the RPN, (10, 10, 5, 5) for the RCNN head); mmdet clamps both sides. F-ViT uses stds (1, 1, 1, 1) for the RPN
and (0.1, 0.1, 0.2, 0.2) for the RoI head, means 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["DeltaXYWHCoder"]


class DeltaXYWHCoder:
    """(dx, dy, dw, dh) deltas of XYXY boxes, normalised by ``means`` / ``stds``.

    Args:
        means, stds: per-coordinate target normalisation (mmdet ``target_means`` / ``target_stds``).
        wh_ratio_clip: ``dw, dh`` are clamped to +-``|log(wh_ratio_clip)|`` when decoding.
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = 16 / 1000,
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError("means and stds need 4 values each")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.wh_ratio_clip = float(wh_ratio_clip)
        # mmdet: np.abs(np.log(wh_ratio_clip)), a float64 scalar used as the clamp bound on both sides.
        self.max_ratio = abs(math.log(self.wh_ratio_clip))

    def encode(self, proposals: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        """Deltas taking ``proposals`` (N x 4 XYXY) to ``gt`` (N x 4 XYXY); returns N x 4 fp32.

        mmdet 2.28.1 mmdet/core/bbox/coder/delta_xywh_bbox_coder.py ``bbox2delta`` (inputs cast to fp32 first).
        """
        if proposals.shape != gt.shape or proposals.shape[-1] != 4:
            raise ValueError(f"encode needs two N x 4 tensors, got {tuple(proposals.shape)} and {tuple(gt.shape)}")
        proposals = proposals.float()
        gt = gt.float()
        px = (proposals[..., 0] + proposals[..., 2]) * 0.5
        py = (proposals[..., 1] + proposals[..., 3]) * 0.5
        pw = proposals[..., 2] - proposals[..., 0]
        ph = proposals[..., 3] - proposals[..., 1]
        gx = (gt[..., 0] + gt[..., 2]) * 0.5
        gy = (gt[..., 1] + gt[..., 3]) * 0.5
        gw = gt[..., 2] - gt[..., 0]
        gh = gt[..., 3] - gt[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        means = deltas.new_tensor(self.means).unsqueeze(0)
        stds = deltas.new_tensor(self.stds).unsqueeze(0)
        return (deltas - means) / stds

    def decode(
        self,
        boxes: torch.Tensor,
        deltas: torch.Tensor,
        max_shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Apply ``deltas`` (N x 4) to ``boxes`` (N x 4 XYXY); returns N x 4 XYXY in ``deltas``' dtype.

        mmdet 2.28.1 mmdet/core/bbox/coder/delta_xywh_bbox_coder.py ``delta2bbox`` for single-image (N x 4)
        deltas. ``max_shape = (H, W)`` (extra trailing entries such as a channel count are ignored): x is
        clipped to ``[0, W]`` and y to ``[0, H]``; ``None`` leaves the boxes unclipped.
        """
        if deltas.dim() != 2 or deltas.shape[1] != 4 or boxes.shape != deltas.shape:
            raise ValueError(f"decode needs N x 4 boxes and deltas, got {tuple(boxes.shape)}, {tuple(deltas.shape)}")
        if deltas.shape[0] == 0:
            # mmdet returns the (empty) deltas themselves.
            return deltas
        means = deltas.new_tensor(self.means).view(1, -1)
        stds = deltas.new_tensor(self.stds).view(1, -1)
        denorm = deltas * stds + means
        dxy = denorm[:, :2]
        # Both sides clamped (torchvision clamps only the upper side).
        dwh = denorm[:, 2:].clamp(min=-self.max_ratio, max=self.max_ratio)
        pxy = (boxes[:, :2] + boxes[:, 2:]) * 0.5
        pwh = boxes[:, 2:] - boxes[:, :2]
        gxy = pxy + pwh * dxy
        gwh = pwh * dwh.exp()
        out = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            out[:, 0::2] = out[:, 0::2].clamp(min=0, max=max_shape[1])
            out[:, 1::2] = out[:, 1::2].clamp(min=0, max=max_shape[0])
        return out
