"""RPN proposal selection and the RCNN's multi-class NMS with mmdet 2.28.1 / mmcv 1.7.0 semantics (re-implemented).

Sources: mmdet 2.28.1 ``mmdet/models/dense_heads/rpn_head.py`` (``RPNHead._get_bboxes_single``,
``RPNHead._bbox_post_process``), ``mmdet/models/dense_heads/base_dense_head.py`` (``get_bboxes``: outputs
detached and forced to fp32), ``mmdet/core/post_processing/bbox_nms.py`` (``multiclass_nms``) and mmcv 1.7.0
``mmcv/ops/nms.py`` (``batched_nms``, ``nms``; the CPU kernel ``mmcv/ops/csrc/pytorch/cpu/nms.cpp``).

How this differs from torchvision's detection defaults:

- RPN (quirk 11 of the F-ViT spec): torchvision's ``RegionProposalNetwork`` keeps ``pre_nms_top_n`` 1000 per
  level at test (2000 in training) and removes boxes smaller than ``min_size=1e-3``; mmdet keeps the top 2000 per
  level in train *and* test and drops only boxes with ``w <= 0`` or ``h <= 0`` (``min_bbox_size=0``). Both run
  NMS per level (level index as the class).
- RCNN (quirk 12): torchvision's ``postprocess_detections`` puts background at column 0, also drops boxes
  smaller than 1e-2 px and defaults to score 0.05 / NMS 0.5 / 100 dets; mmdet's background column is the LAST
  one, the score test is strict (``score > score_thr``) and nothing is size-filtered. F-ViT uses
  0.01 / 0.4 / 100 (OV-COCO) and 0.0001 / 0.5 / 300 (OV-LVIS).
- Class-wise NMS (:func:`batched_nms`): mmcv 1.7.0 adds a per-class coordinate offset and runs one NMS when
  there are fewer than 10000 boxes, and one NMS per class on the offset boxes otherwise, then sorts the kept
  boxes by score. ``torchvision.ops.batched_nms`` switches between the same two strategies at different sizes
  (more than 1000 boxes on CPU, 25000 on CUDA, in torchvision 0.29), which changes box coordinates at the
  float-ulp level (the offset) and so can flip an IoU that sits exactly at the threshold; the dispatch of mmcv
  is reproduced here on top of ``torchvision.ops.nms``. Equal scores: mmcv ranks with an unstable sort,
  torchvision with a stable one; boxes are pre-ranked here with mmcv's sort call so ties are visited and
  returned in mmcv's order (exactly only with the same torch build: the reference runs used an older torch
  whose unstable sort may order ties differently, which no port can reproduce). Remaining difference: on CUDA,
  mmcv's kernel tests ``inter > thr * union`` where torchvision's divides, ``inter / union > thr`` (only an
  IoU equal to the threshold up to rounding is affected). mmcv passes the IoU threshold to its kernels as a C
  ``float`` and torchvision as a ``double``, so for thresholds such as 0.4 (fp32(0.4) > 0.4) an IoU whose fp32
  value is exactly fp32(0.4) is kept by mmcv and suppressed by torchvision; the threshold is rounded to fp32
  here to match mmcv. The IoU itself uses ``(x2 - x1) * (y2 - y1)`` in both (mmcv ``offset=0``).
"""

from __future__ import annotations

import torch
from torchvision.ops import nms

from .box_coder import DeltaXYWHCoder

__all__ = ["batched_nms", "flatten_level", "multiclass_nms", "rpn_proposals"]

# mmcv 1.7.0 batched_nms default ``split_thr``.
MMCV_SPLIT_THRESHOLD = 10000


def batched_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    idxs: torch.Tensor,
    iou_threshold: float,
    split_threshold: int = MMCV_SPLIT_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NMS within each group of ``idxs``, mmcv 1.7.0 mmcv/ops/nms.py ``batched_nms`` (``class_agnostic=False``).

    Args:
        boxes: N x 4 XYXY. scores: N. idxs: N integer group ids (class or level).
        iou_threshold: a box is suppressed by a higher-scoring one of its group when ``IoU > iou_threshold``.
        split_threshold: mmcv ``split_thr``: below it one NMS runs on offset boxes, else one NMS per group.

    Returns:
        ``(dets, keep)``: dets K x 5 ``[x1, y1, x2, y2, score]`` with the ORIGINAL (un-offset) boxes, sorted by
        descending score; keep K long indices into the inputs.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0, 5), torch.zeros(0, dtype=torch.long, device=boxes.device)
    # mmcv's kernels take the threshold as a C float, torchvision's as a double: an IoU whose fp32 value equals
    # fp32(0.4) = 0.40000000596 is kept by mmcv (not > 0.4f) but suppressed by torchvision (> 0.4). Rounding the
    # threshold to fp32 first makes torchvision's comparison the same as mmcv's.
    iou_threshold = float(torch.tensor(float(iou_threshold), dtype=torch.float32))
    # mmcv offsets even in the per-group branch: the per-group NMS sees offset boxes too.
    max_coordinate = boxes.max()
    offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
    boxes_for_nms = boxes + offsets[:, None]
    if boxes_for_nms.shape[0] < split_threshold:
        keep = _nms_in_mmcv_order(boxes_for_nms, scores, iou_threshold)
        kept_scores = scores[keep]
    else:
        total_mask = torch.zeros_like(scores, dtype=torch.bool)
        for group in torch.unique(idxs):
            members = (idxs == group).nonzero(as_tuple=False).view(-1)
            group_keep = _nms_in_mmcv_order(boxes_for_nms[members], scores[members], iou_threshold)
            total_mask[members[group_keep]] = True
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        kept_scores, order = scores[keep].sort(descending=True)
        keep = keep[order]
    return torch.cat([boxes[keep], kept_scores[:, None]], dim=-1), keep


def _nms_in_mmcv_order(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """``torchvision.ops.nms`` visiting boxes in the order mmcv 1.7.0's kernels do.

    mmcv's kernels (mmcv/ops/csrc/pytorch/cpu/nms.cpp, .../cuda/nms_cuda.cu) rank with ``scores.sort(0, true)``,
    an unstable sort, while torchvision's rank with a stable one: equal scores (common for saturated sigmoid RPN
    scores and quantised class scores) would be visited, and returned, in another order. Pre-ranking with the
    same unstable sort and handing torchvision already-sorted scores (its stable sort then keeps that order)
    reproduces mmcv's order whenever the same torch build is used.
    """
    order = scores.sort(0, descending=True)[1]
    return order[nms(boxes[order], scores[order], iou_threshold)]


def flatten_level(cls: torch.Tensor, reg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's RPN outputs of one level in anchor order.

    ``cls``: A x H x W logits, ``reg``: 4A x H x W deltas (channel ``a * 4 + k``). Returns ``scores`` (H*W*A,)
    and ``deltas`` (H*W*A, 4), row ``(y * W + x) * A + a``, i.e. the order of
    :meth:`AnchorGenerator.grid_anchors` (mmdet 2.28.1 mmdet/models/dense_heads/rpn_head.py
    ``_get_bboxes_single``: ``permute(1, 2, 0).reshape(-1)`` and ``.reshape(-1, 4)``).
    """
    if cls.dim() != 3 or reg.dim() != 3 or reg.shape[0] != 4 * cls.shape[0] or cls.shape[1:] != reg.shape[1:]:
        raise ValueError(f"flatten_level needs A x H x W and 4A x H x W, got {tuple(cls.shape)}, {tuple(reg.shape)}")
    return cls.permute(1, 2, 0).reshape(-1), reg.permute(1, 2, 0).reshape(-1, 4)


def rpn_proposals(
    scores_per_level: list[torch.Tensor],
    deltas_per_level: list[torch.Tensor],
    anchors_per_level: list[torch.Tensor],
    image_shape: tuple[int, int],
    coder: DeltaXYWHCoder,
    nms_pre: int = 2000,
    max_per_img: int = 1000,
    iou_threshold: float = 0.7,
    min_size: float = 0.0,
) -> torch.Tensor:
    """Proposals of ONE image from its per-level RPN outputs.

    mmdet 2.28.1 mmdet/models/dense_heads/rpn_head.py ``_get_bboxes_single`` + ``_bbox_post_process``
    (``use_sigmoid_cls=True``), with inputs detached and cast to fp32 as ``BaseDenseHead.get_bboxes`` does.

    Args:
        scores_per_level: per level (N_l,) objectness LOGITS, in :func:`flatten_level` order.
        deltas_per_level: per level (N_l, 4) deltas, same order.
        anchors_per_level: per level (N_l, 4) XYXY anchors (:meth:`AnchorGenerator.grid_anchors`).
        image_shape: ``(H, W)`` of the un-padded image in input pixels: decoded boxes are clipped to it.
        coder: the RPN's coder (stds (1, 1, 1, 1) in F-ViT).
        nms_pre: per level, only the ``nms_pre`` best (by descending sorted score) are kept when the level has
            more; a level with at most ``nms_pre`` anchors keeps its original order (mmdet skips the sort).
        max_per_img: number of proposals returned at most (after NMS, highest scores first).
        iou_threshold: NMS IoU, applied within each level only (level index as the class).
        min_size: boxes with ``w <= min_size`` or ``h <= min_size`` are dropped (mmdet ``min_bbox_size``);
            a negative value disables the filter.

    Returns:
        K x 5 fp32 ``[x1, y1, x2, y2, sigmoid score]`` sorted by descending score, K <= max_per_img.
    """
    if not (len(scores_per_level) == len(deltas_per_level) == len(anchors_per_level)):
        raise ValueError("scores, deltas and anchors need one entry per level each")
    level_scores, level_deltas, level_anchors, level_ids = [], [], [], []
    for level, (logits, deltas, anchors) in enumerate(
        zip(scores_per_level, deltas_per_level, anchors_per_level, strict=True)
    ):
        if not (logits.shape[0] == deltas.shape[0] == anchors.shape[0]):
            raise ValueError(
                f"level {level}: {logits.shape[0]} scores, {deltas.shape[0]} deltas, {anchors.shape[0]} anchors"
            )
        scores = logits.detach().float().reshape(-1).sigmoid()
        deltas = deltas.detach().float().reshape(-1, 4)
        anchors = anchors.detach().float()
        if 0 < nms_pre < scores.shape[0]:
            # mmdet sorts rather than topk ("sort is faster than topk").
            ranked, order = scores.sort(descending=True)
            top = order[:nms_pre]
            scores, deltas, anchors = ranked[:nms_pre], deltas[top], anchors[top]
        level_scores.append(scores)
        level_deltas.append(deltas)
        level_anchors.append(anchors)
        level_ids.append(torch.full((scores.shape[0],), level, dtype=torch.long, device=scores.device))

    scores = torch.cat(level_scores)
    proposals = coder.decode(torch.cat(level_anchors), torch.cat(level_deltas), max_shape=image_shape)
    ids = torch.cat(level_ids)
    if min_size >= 0:
        w = proposals[:, 2] - proposals[:, 0]
        h = proposals[:, 3] - proposals[:, 1]
        valid = (w > min_size) & (h > min_size)
        if not bool(valid.all()):
            proposals, scores, ids = proposals[valid], scores[valid], ids[valid]
    if proposals.numel() == 0:
        return proposals.new_zeros(0, 5)
    dets, _ = batched_nms(proposals, scores, ids, iou_threshold)
    return dets[:max_per_img]


def multiclass_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_thr: float,
    iou_threshold: float,
    max_per_img: int,
    return_inds: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class NMS of one image's detections, mmdet 2.28.1 mmdet/core/post_processing/bbox_nms.py
    ``multiclass_nms`` (no ``score_factors``).

    Args:
        boxes: N x 4 class-agnostic XYXY boxes (replicated for every class), or N x 4C class-specific ones.
        scores: N x (C + 1) scores with the background LAST; that column is ignored.
        score_thr: a (box, class) pair is kept only if ``score > score_thr`` (strict).
        iou_threshold: class-wise NMS IoU (suppress when ``IoU > iou_threshold``).
        max_per_img: keep the first ``max_per_img`` after NMS (highest scores); ``<= 0`` keeps all.
        return_inds: also return the flat index ``n * C + c`` of each kept pair (``n = ind // C``).

    Returns:
        ``dets`` K x 5 ``[x1, y1, x2, y2, score]`` sorted by descending score, ``labels`` K long in [0, C)
        (and ``inds`` K long when ``return_inds``).
    """
    num_boxes, num_classes = scores.shape[0], scores.shape[1] - 1
    if boxes.shape[0] != num_boxes:
        raise ValueError(f"{boxes.shape[0]} boxes for {num_boxes} score rows")
    if boxes.shape[1] > 4:
        if boxes.shape[1] != 4 * num_classes:
            raise ValueError(f"class-specific boxes need 4 * {num_classes} columns, got {boxes.shape[1]}")
        flat_boxes = boxes.view(num_boxes, -1, 4)
    else:
        flat_boxes = boxes[:, None].expand(num_boxes, num_classes, 4)
    flat_boxes = flat_boxes.reshape(-1, 4)
    flat_scores = scores[:, :-1].reshape(-1)
    labels = torch.arange(num_classes, dtype=torch.long, device=scores.device).view(1, -1)
    labels = labels.expand(num_boxes, num_classes).reshape(-1)

    inds = (flat_scores > score_thr).nonzero(as_tuple=False).squeeze(1)
    flat_boxes, flat_scores, labels = flat_boxes[inds], flat_scores[inds], labels[inds]
    if flat_boxes.numel() == 0:
        dets = torch.cat([flat_boxes, flat_scores[:, None]], -1)
        return (dets, labels, inds) if return_inds else (dets, labels)

    dets, keep = batched_nms(flat_boxes, flat_scores, labels, iou_threshold)
    if max_per_img > 0:
        dets, keep = dets[:max_per_img], keep[:max_per_img]
    return (dets, labels[keep], inds[keep]) if return_inds else (dets, labels[keep])
