"""F-ViT training targets and losses with mmdet 2.28.1 semantics (re-implemented as pure functions, no mmdet/mmcv).

What F-ViT trains with (CLIPSelf ``F-ViT/configs/ov_coco/*original.py``, ``ov_lvis/*original.py``; spec sections
2.8, 2.9, quirks 13 and 14):

- RPN: ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)``, ``RandomSampler(256, 0.5)`` without
  gt boxes as proposals, ``allowed_border=-1`` (every anchor takes part), sigmoid BCE + L1 on (stds 1) deltas, both
  divided by ``sum_i max(P_i, 1) + sum_i max(N_i, 1)`` (:func:`rpn_targets_and_loss`).
- RCNN: ``MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False`` on OV-COCO, ``True`` on OV-LVIS), gt boxes
  prepended to the proposals, ``RandomSampler(512, 0.25)`` (:func:`rcnn_targets`); the authors'
  ``CustomCrossEntropyLoss`` (zero-weight classes masked to -inf, per-sample CE times ``class_weight[target]``)
  averaged over the sampled RoIs and L1 on the positives' class-agnostic (stds 0.1, 0.1, 0.2, 0.2) deltas divided
  by the number of sampled RoIs (:func:`rcnn_loss`).
- Mask (OV-LVIS): 28 x 28 targets cut from the gt masks by RoIAlign (aligned, adaptive sampling) on the positive
  proposals, binarised at >= 0.5 (:func:`mask_targets`), class-agnostic BCE averaged over all pixels
  (:func:`mask_loss`).

How this differs from torchvision's Faster/Mask R-CNN (quirks 13, 14): torchvision's ``Matcher`` has no
``min_pos_iou`` (its low-quality matches need only IoU > 0), its RoI sampler takes the positives and negatives
from the same proposal set with gt boxes *appended*, background is label 0, the box loss is smooth-L1
(beta 1/9) divided by the number of sampled RoIs, and the class loss is an unweighted softmax CE.

Randomness: mmdet's ``RandomSampler.random_choice`` draws ``torch.randperm(n)[:k]`` from the global CPU generator.
Here every draw comes from the ``generator`` argument (``torch.randperm(n, generator=g)[:k]``, the same call), so a
run is reproducible and resumable from the generator's state. With ``generator=torch.default_generator`` in the
same state the draws equal mmdet's call by call; a whole mmdet training run cannot be matched, because dropout,
data augmentation and everything else that uses the global generator interleaves with the sampler's draws there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, roi_align

from .box_coder import DeltaXYWHCoder

__all__ = [
    "AssignResult",
    "RcnnTargets",
    "class_weights_ov_coco",
    "class_weights_ov_lvis",
    "mask_loss",
    "mask_targets",
    "max_iou_assign",
    "random_sample",
    "rcnn_loss",
    "rcnn_mask_targets",
    "rcnn_targets",
    "rpn_targets_and_loss",
]

#: mmdet 2.28.1 mmdet/models/losses/utils.py ``weight_reduce_loss``: ``loss.sum() / (avg_factor + eps)``.
_AVG_EPS = torch.finfo(torch.float32).eps
#: CLIPSelf F-ViT/models/custom_losses.py ``cross_entropy``: classes whose weight is below this are masked out.
_MASK_WEIGHT = 1e-5


# ---- assignment ------------------------------------------------------------------------------------------------
@dataclass
class AssignResult:
    """Per-box assignment, mmdet 2.28.1 mmdet/core/bbox/assigners/assign_result.py conventions.

    Attributes:
        gt_inds: (N,) long: ``0`` negative (background), ``-1`` ignored (neither positive nor negative),
            ``k + 1`` assigned to gt ``k`` (positive).
        max_iou: (N,) the box's best IoU over the gts (0 when there are no gts or no boxes).
        num_gts: M.
    """

    gt_inds: torch.Tensor
    max_iou: torch.Tensor
    num_gts: int

    @property
    def num_pos(self) -> int:
        return int((self.gt_inds > 0).sum())

    @property
    def num_neg(self) -> int:
        return int((self.gt_inds == 0).sum())


def max_iou_assign(
    boxes: torch.Tensor,
    gt: torch.Tensor,
    pos_iou: float,
    neg_iou: float,
    min_pos_iou: float,
    match_low_quality: bool,
    gt_max_assign_all: bool = True,
) -> AssignResult:
    """mmdet 2.28.1 mmdet/core/bbox/assigners/max_iou_assigner.py ``MaxIoUAssigner.assign`` /
    ``assign_wrt_overlaps`` (``ignore_iof_thr=-1``: no ignore boxes, as F-ViT configures it).

    Args:
        boxes: N x 4 (or N x 5, the score column is ignored) XYXY anchors or proposals.
        gt: M x 4 XYXY gt boxes.
        pos_iou, neg_iou, min_pos_iou, match_low_quality, gt_max_assign_all: the assigner's settings.

    Rules, in order (the order matters):

    1. every box starts ignored (-1);
    2. boxes whose best IoU is in ``[0, neg_iou)`` become negative (0), so those in ``[neg_iou, pos_iou)`` stay
       ignored (the RPN's 0.3-0.7 band);
    3. boxes whose best IoU is ``>= pos_iou`` go to their best gt (the first one on ties, ``torch.max``);
    4. with ``match_low_quality``, for each gt in index order whose best IoU is ``>= min_pos_iou``, every box with
       exactly that IoU to it (``gt_max_assign_all``; else only the first such box) is assigned to it, overwriting
       step 3, so a box that is the best match of several gts ends with the LAST of them.

    No gts: every box negative. No boxes: empty result. IoU is ``torchvision.ops.box_iou`` (areas without +1,
    like mmdet's ``bbox_overlaps``); mmdet divides by ``max(union, 1e-6)`` where torchvision divides by the
    union, so they differ only when a union is below 1e-6 px^2 (0/0 gives NaN here and is set to 0 as mmdet).

    Returns:
        :class:`AssignResult`.
    """
    boxes = boxes[:, :4].float()
    gt = gt[:, :4].float().to(boxes.device)
    num_gts, num_boxes = gt.shape[0], boxes.shape[0]
    gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=boxes.device)
    if num_gts == 0 or num_boxes == 0:
        if num_gts == 0:
            gt_inds[:] = 0
        return AssignResult(gt_inds, boxes.new_zeros(num_boxes), num_gts)

    iou = box_iou(gt, boxes)  # M x N, as mmdet's overlaps
    iou = torch.nan_to_num(iou, nan=0.0)  # 0/0 (degenerate boxes): mmdet's eps makes it 0
    max_iou, argmax = iou.max(dim=0)
    gt_max, gt_argmax = iou.max(dim=1)

    gt_inds[(max_iou >= 0) & (max_iou < neg_iou)] = 0
    pos = max_iou >= pos_iou
    gt_inds[pos] = argmax[pos] + 1

    if match_low_quality:
        ok = gt_max >= min_pos_iou  # (M,)
        if gt_max_assign_all:
            hit = (iou == gt_max[:, None]) & ok[:, None]
        else:
            hit = torch.zeros_like(iou, dtype=torch.bool)
            rows = torch.arange(num_gts, device=iou.device)
            hit[rows[ok], gt_argmax[ok]] = True
        # mmdet loops over the gts in order and overwrites, so the largest gt index that hits a box wins: the
        # max over (k + 1) * hit gives it in one pass (0 where no gt hits).
        dtype = torch.int16 if num_gts < torch.iinfo(torch.int16).max else torch.int32
        order = torch.arange(1, num_gts + 1, dtype=dtype, device=iou.device)[:, None]
        winner = (hit.to(dtype) * order).amax(dim=0).long()
        gt_inds = torch.where(winner > 0, winner, gt_inds)
    return AssignResult(gt_inds, max_iou, num_gts)


# ---- sampling --------------------------------------------------------------------------------------------------
def per_image_generators(generator, num_images: int) -> list[torch.Generator]:
    """One generator for every image: a sequence is taken as it is (one per image, ours: it makes an image's draws
    independent of the batch it is in, so any number of processes samples alike), a single one is shared in order."""
    if isinstance(generator, torch.Generator):
        return [generator] * num_images
    generators = list(generator)
    if len(generators) != num_images:
        raise ValueError(f"{len(generators)} generators for {num_images} images")
    return generators


def _random_choice(candidates: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    # mmdet 2.28.1 mmdet/core/bbox/samplers/random_sampler.py random_choice: randperm(n)[:num], drawn on the
    # generator's device and moved to the candidates'.
    perm = torch.randperm(candidates.numel(), generator=generator, device=generator.device)[:num]
    return candidates[perm.to(candidates.device)]


def _sample(candidates: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    # RandomSampler._sample_pos/_sample_neg take every candidate when there are at most num of them (no draw),
    # BaseSampler.sample then applies .unique(), which also SORTS the drawn indices.
    if candidates.numel() <= num:
        return candidates
    return _random_choice(candidates, num, generator).unique()


def random_sample(
    assign: AssignResult,
    num: int,
    pos_fraction: float,
    generator: torch.Generator,
    add_gt_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mmdet 2.28.1 ``RandomSampler`` (mmdet/core/bbox/samplers/random_sampler.py, base_sampler.py ``sample``)
    with ``neg_pos_ub=-1``.

    Args:
        assign: the boxes' :class:`AssignResult`.
        num: samples per image (256 RPN, 512 RCNN).
        pos_fraction: at most ``int(num * pos_fraction)`` positives (``gt_inds > 0``).
        generator: source of every random draw (see the module docstring).
        add_gt_first: ``M`` when the M gt boxes are prepended to the boxes (``add_gt_as_proposals``, mmdet's
            ``AssignResult.add_gt_``): they count as positives assigned to themselves and the returned indices
            refer to ``[gt_0 .. gt_{M-1}, box_0, ...]``.

    Returns:
        ``(pos_index, neg_index)``, both sorted ascending (mmdet's ``.unique()``). Positives: all of them when
        there are at most ``int(num * pos_fraction)``, else a uniform draw without replacement; negatives
        (``gt_inds == 0``; ignored boxes are never sampled) fill up to ``num - len(pos_index)`` the same way.
        Positives are drawn before negatives, as mmdet does.
    """
    gt_inds = assign.gt_inds
    if add_gt_first > 0:
        own = torch.arange(1, add_gt_first + 1, dtype=torch.long, device=gt_inds.device)
        gt_inds = torch.cat([own, gt_inds])
    pos = _sample(torch.nonzero(gt_inds > 0, as_tuple=False).view(-1), int(num * pos_fraction), generator)
    neg = _sample(torch.nonzero(gt_inds == 0, as_tuple=False).view(-1), num - pos.numel(), generator)
    return pos, neg


# ---- RPN -------------------------------------------------------------------------------------------------------
def rpn_targets_and_loss(
    anchors: torch.Tensor,
    objectness: Sequence[torch.Tensor],
    deltas: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    coder: DeltaXYWHCoder,
    generator: torch.Generator,
    num: int = 256,
    pos_fraction: float = 0.5,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    min_pos_iou: float = 0.3,
) -> dict[str, torch.Tensor]:
    """The RPN losses of a batch, mmdet 2.28.1 mmdet/models/dense_heads/anchor_head.py (``_get_targets_single``,
    ``get_targets``, ``loss_single``, ``loss``) and rpn_head.py ``loss``, as F-ViT configures them.

    Args:
        anchors: A x 4 anchors of all levels concatenated (each level in :meth:`AnchorGenerator.grid_anchors`
            order); the same for every image (F-ViT pads every training image to S x S).
        objectness: per image (A,) logits in anchor order (:func:`~.postprocess.flatten_level` per level, then
            concatenated).
        deltas: per image A x 4 predicted deltas in the same order.
        gt_boxes: per image M_i x 4 XYXY gt boxes in input pixels.
        coder: the RPN's coder (stds 1, 1, 1, 1).
        generator: the sampler's random source, or one per image (:func:`per_image_generators`).
        num, pos_fraction, pos_iou, neg_iou, min_pos_iou: F-ViT's settings (``match_low_quality=True``).

    Every anchor is assigned (``allowed_border=-1``); a sampled positive has target 1 and its deltas regress to
    ``coder.encode(anchor, gt)``, a sampled negative has target 0, the rest have weight 0.

    Returns:
        ``loss_rpn_cls``: sigmoid BCE summed over the sampled anchors of all images; ``loss_rpn_bbox``: L1 summed
        over the positives' 4 deltas; both divided by ``num_total_samples + eps`` where
        ``num_total_samples = sum_i max(P_i, 1) + sum_i max(N_i, 1)`` (``get_targets``: an image without
        positives still counts 1; float32 eps, ``weight_reduce_loss``). mmdet computes these per level with the
        same divisor and its log sums the levels, which is one sum over all anchors (up to fp32 summation order).
        Inputs are cast to fp32 (``force_fp32``). ``rpn_samples``: that divisor (a 0-d tensor), for a caller that
        normalises over several processes.
    """
    if not len(objectness) == len(deltas) == len(gt_boxes):
        raise ValueError(f"{len(objectness)} objectness, {len(deltas)} deltas and {len(gt_boxes)} gt lists")
    anchors = anchors[:, :4].float()
    cls_sum, reg_sum = [], []
    num_total = 0
    generators = per_image_generators(generator, len(gt_boxes))
    for logits, pred, gt, gen in zip(objectness, deltas, gt_boxes, generators, strict=True):
        if logits.shape[0] != anchors.shape[0] or pred.shape != (anchors.shape[0], 4):
            raise ValueError(
                f"{anchors.shape[0]} anchors but objectness {tuple(logits.shape)} and deltas {tuple(pred.shape)}"
            )
        gt = gt[:, :4].float().to(anchors.device)
        assign = max_iou_assign(anchors, gt, pos_iou, neg_iou, min_pos_iou, match_low_quality=True)
        pos, neg = random_sample(assign, num, pos_fraction, gen)
        num_total += max(pos.numel(), 1) + max(neg.numel(), 1)
        logits = logits.reshape(-1).float()
        sampled = torch.cat([logits[pos], logits[neg]])
        target = torch.cat([sampled.new_ones(pos.numel()), sampled.new_zeros(neg.numel())])
        cls_sum.append(F.binary_cross_entropy_with_logits(sampled, target, reduction="sum"))
        # Positives only (bbox_weights 1 on them, 0 elsewhere); an empty selection still joins the graph.
        reg_target = coder.encode(anchors[pos], gt[assign.gt_inds[pos] - 1])
        reg_sum.append((pred.float()[pos] - reg_target).abs().sum())
    avg = num_total + _AVG_EPS
    return {
        "loss_rpn_cls": torch.stack(cls_sum).sum() / avg,
        "loss_rpn_bbox": torch.stack(reg_sum).sum() / avg,
        "rpn_samples": torch.tensor(float(num_total)),
    }


# ---- RCNN ------------------------------------------------------------------------------------------------------
@dataclass
class RcnnTargets:
    """Sampled RoIs of a batch and their targets, in mmdet's order: per image its positives then its negatives
    (each sorted by index into ``[gt boxes, proposals]``), images in order.

    Attributes:
        rois: R x 5 ``[image index, x1, y1, x2, y2]`` (mmdet ``bbox2roi`` of ``SamplingResult.bboxes``).
        labels: (R,) long, the gt class (0..C-1) for positives, C (background) for negatives.
        bbox_targets: R x 4 encoded deltas (zeros for negatives).
        pos: (R,) bool, the positives.
        num_samples: per image, its number of sampled RoIs.
        num_pos: per image, its number of positives (the first ``num_pos[i]`` of its RoIs).
        pos_gt_index: (P,) long, 0-based index (into that image's gts) of each positive's gt, in ``rois[pos]``
            order (mmdet ``pos_assigned_gt_inds``; what the mask targets are cut from).
        pos_is_gt: (P,) bool, whether the positive is a prepended gt box.
        num_classes: C.
    """

    rois: torch.Tensor
    labels: torch.Tensor
    bbox_targets: torch.Tensor
    pos: torch.Tensor
    num_samples: list[int]
    num_pos: list[int]
    pos_gt_index: torch.Tensor
    pos_is_gt: torch.Tensor
    num_classes: int

    @property
    def pos_rois(self) -> torch.Tensor:
        """P x 5 RoIs of the positives (the mask head's RoIs, mmdet ``bbox2roi([res.pos_bboxes])``)."""
        return self.rois[self.pos]


def rcnn_targets(
    proposals: Sequence[torch.Tensor],
    gt_boxes: Sequence[torch.Tensor],
    gt_labels: Sequence[torch.Tensor],
    num_classes: int,
    coder: DeltaXYWHCoder,
    generator: torch.Generator,
    match_low_quality: bool,
    num: int = 512,
    pos_fraction: float = 0.25,
    iou: float = 0.5,
) -> RcnnTargets:
    """Assign and sample the RCNN's RoIs, mmdet 2.28.1 mmdet/models/roi_heads/standard_roi_head.py
    ``forward_train`` / ``_bbox_forward_train`` and bbox_heads/bbox_head.py ``get_targets``/``_get_target_single``.

    Args:
        proposals: per image K_i x 4 (or K_i x 5 with scores) RPN proposals, detached.
        gt_boxes: per image M_i x 4 XYXY; gt_labels: per image (M_i,) long in 0..C-1.
        num_classes: C (background is label C).
        coder: the RCNN coder (stds 0.1, 0.1, 0.2, 0.2).
        generator: the sampler's random source, or one per image (:func:`per_image_generators`).
        match_low_quality: ``False`` for OV-COCO, ``True`` for OV-LVIS. With ``min_pos_iou = pos_iou = 0.5`` it
            adds no positives; it only moves a box that is some gt's best match (IoU >= 0.5) to that gt.
        num, pos_fraction, iou: ``RandomSampler(512, 0.25)`` and ``MaxIoUAssigner(0.5, 0.5, 0.5)``.

    Per image: the proposals are assigned (no ignore band: IoU >= 0.5 positive, else negative); then the gts are
    prepended as proposals assigned to themselves (``add_gt_as_proposals``, base_sampler.py ``sample``), so every
    gt is a positive candidate; then at most 128 positives and ``512 - P`` negatives are sampled. Positives get
    their gt's label and ``coder.encode(box, gt)`` targets (mmdet ``pos_weight=-1``: all label weights 1).

    Returns:
        :class:`RcnnTargets`.
    """
    if not len(proposals) == len(gt_boxes) == len(gt_labels):
        raise ValueError(f"{len(proposals)} proposal, {len(gt_boxes)} gt box and {len(gt_labels)} gt label lists")
    rois, labels, targets, pos_masks, pos_gt, pos_is_gt = [], [], [], [], [], []
    num_samples, num_pos = [], []
    generators = per_image_generators(generator, len(gt_boxes))
    for image, (props, gt, gt_label) in enumerate(zip(proposals, gt_boxes, gt_labels, strict=True)):
        props = props[:, :4].detach().float()
        gt = gt[:, :4].float().to(props.device)
        gt_label = gt_label.long().to(props.device)
        if gt_label.shape[0] != gt.shape[0]:
            raise ValueError(f"image {image}: {gt.shape[0]} gt boxes but {gt_label.shape[0]} labels")
        assign = max_iou_assign(props, gt, iou, iou, iou, match_low_quality)
        m = gt.shape[0]
        # base_sampler.py: gts are prepended only when there are some.
        boxes = torch.cat([gt, props]) if m > 0 else props
        gt_inds = torch.cat([torch.arange(1, m + 1, device=props.device), assign.gt_inds]) if m > 0 else assign.gt_inds
        pos, neg = random_sample(assign, num, pos_fraction, generators[image], add_gt_first=m)
        assigned = gt_inds[pos] - 1
        n_pos, n_neg = pos.numel(), neg.numel()
        sampled = torch.cat([boxes[pos], boxes[neg]])
        rois.append(torch.cat([sampled.new_full((sampled.shape[0], 1), float(image)), sampled], dim=1))
        label = torch.full((n_pos + n_neg,), num_classes, dtype=torch.long, device=props.device)
        label[:n_pos] = gt_label[assigned]
        labels.append(label)
        target = sampled.new_zeros(n_pos + n_neg, 4)
        if n_pos > 0:
            target[:n_pos] = coder.encode(boxes[pos], gt[assigned])
        targets.append(target)
        mask = torch.zeros(n_pos + n_neg, dtype=torch.bool, device=props.device)
        mask[:n_pos] = True
        pos_masks.append(mask)
        pos_gt.append(assigned)
        pos_is_gt.append(pos < m)
        num_samples.append(n_pos + n_neg)
        num_pos.append(n_pos)
    return RcnnTargets(
        rois=torch.cat(rois),
        labels=torch.cat(labels),
        bbox_targets=torch.cat(targets),
        pos=torch.cat(pos_masks),
        num_samples=num_samples,
        num_pos=num_pos,
        pos_gt_index=torch.cat(pos_gt),
        pos_is_gt=torch.cat(pos_is_gt),
        num_classes=num_classes,
    )


def rcnn_loss(
    cls_logits: torch.Tensor,
    deltas: torch.Tensor,
    targets: RcnnTargets,
    class_weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The RCNN box head's losses, mmdet 2.28.1 mmdet/models/roi_heads/bbox_heads/bbox_head.py ``loss`` with
    CLIPSelf's ``CustomCrossEntropyLoss`` (F-ViT/models/custom_losses.py ``cross_entropy``) and mmdet's
    ``L1Loss`` (mmdet/models/losses/smooth_l1_loss.py ``l1_loss``).

    Args:
        cls_logits: R x (C+1) logits (``T_det cos(x, t)``, background last), rows in ``targets.rois`` order.
        deltas: R x 4 class-agnostic deltas.
        targets: :class:`RcnnTargets`.
        class_weight: (C+1,) per-class weights (:func:`class_weights_ov_coco`, :func:`class_weights_ov_lvis`).

    Returns:
        - ``loss_cls``: columns with ``class_weight < 1e-5`` are set to -inf (out of the softmax), per-RoI
          ``-log softmax[label] * class_weight[label]`` (``F.cross_entropy(weight=class_weight,
          reduction='none')``), summed and divided by ``max(R, 1) + eps`` (``avg_factor`` = RoIs with label
          weight > 0 = all sampled RoIs);
        - ``loss_bbox``: ``|deltas - targets|`` summed over the positives' 4 coordinates and divided by
          ``R + eps`` (``avg_factor=bbox_targets.size(0)``, all sampled RoIs, not the positives); without
          positives ``deltas[pos].sum()`` (0, in the graph);
        - ``acc``: top-1 accuracy in percent over all RoIs, computed on the MASKED logits (the authors' loss masks
          ``cls_score`` in place before mmdet's ``accuracy`` reads it), not a loss (no gradient).

        Inputs are cast to fp32 (``force_fp32``); unlike the authors' code the logits are not modified in place.
        Without RoIs mmdet skips ``loss_cls`` and ``acc``; here they are 0 (``loss_cls`` in the graph).

    Raises:
        ValueError: a RoI's label has a masked (weight < 1e-5) class: the authors' loss would be NaN (0 * inf).
    """
    labels = targets.labels
    num_rois = labels.shape[0]
    if cls_logits.shape[0] != num_rois or deltas.shape != (num_rois, 4):
        raise ValueError(f"{num_rois} RoIs but logits {tuple(cls_logits.shape)} and deltas {tuple(deltas.shape)}")
    logits = cls_logits.float()
    class_weight = class_weight.to(device=logits.device, dtype=logits.dtype)
    if class_weight.shape != (logits.shape[1],):
        raise ValueError(f"class_weight has {tuple(class_weight.shape)} entries for {logits.shape[1]} logit columns")
    masked = class_weight < _MASK_WEIGHT
    logits = logits.masked_fill(masked, float("-inf"))
    if num_rois == 0:
        zero = cls_logits.float().sum()
        return {"loss_cls": zero, "loss_bbox": deltas.float().sum(), "acc": logits.new_zeros(())}
    if bool(masked[labels].any()):
        bad = sorted({int(c) for c in labels[masked[labels]].tolist()})
        raise ValueError(f"RoI labels {bad} have class weight < 1e-5 (masked out of the softmax): the loss is NaN")
    ce = F.cross_entropy(logits, labels, weight=class_weight, reduction="none")
    loss_cls = ce.sum() / (max(num_rois, 1) + _AVG_EPS)
    with torch.no_grad():
        top1 = logits.topk(1, dim=1).indices[:, 0]
        acc = (top1 == labels).float().sum() * (100.0 / num_rois)
    pos = targets.pos
    deltas = deltas.float()
    if bool(pos.any()):
        loss_bbox = (deltas[pos] - targets.bbox_targets[pos].to(deltas)).abs().sum() / (num_rois + _AVG_EPS)
    else:
        loss_bbox = deltas[pos].sum()
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": acc}


def class_weights_ov_coco(
    names_65: Sequence[str], base: set[str] | frozenset[str], background: float = 0.6
) -> torch.Tensor:
    """(C+1,) fp32 class weights of OV-COCO (CLIPSelf configs/ov_coco/*original.py ``class_weight``): 1 on the
    base classes, 0 on the novel ones (masked out of the training softmax), ``background`` (0.6) last.

    ``names_65`` in the model's label order (``mscoco_65_classes.json``), ``base`` the 48 seen names.
    """
    unknown = sorted(set(base) - set(names_65))
    if unknown:
        raise ValueError(f"base classes {unknown} are not among the class names")
    return torch.tensor([1.0 if n in base else 0.0 for n in names_65] + [background], dtype=torch.float32)


def class_weights_ov_lvis(image_counts: Sequence[int], background: float = 0.9) -> torch.Tensor:
    """(C+1,) fp32 class weights of OV-LVIS (CLIPSelf custom_losses.py ``load_class_freq`` with
    ``lvis_v1_train_cat_norare_info.json``, configs/ov_lvis/*original.py ``bg_weight=0.9``): 1 where the
    category's training ``image_count`` is > 0, else 0 (the 337 rare classes), then ``background``.

    ``image_counts`` in category-id order (the authors sort the info file by id), i.e. the model's label order.
    """
    counts = torch.tensor([max(int(c), 0) for c in image_counts], dtype=torch.float32)
    return torch.cat([(counts > 0).float(), torch.tensor([background], dtype=torch.float32)])


# ---- masks -----------------------------------------------------------------------------------------------------
def _as_mask_tensor(masks, device) -> torch.Tensor:
    if isinstance(masks, torch.Tensor):
        return masks.to(device)
    if len(masks) == 0:
        return torch.zeros(0, 0, 0, device=device)
    return torch.from_numpy(np.stack([np.asarray(m) for m in masks])).to(device)


def mask_targets(
    proposals: torch.Tensor,
    masks,
    size: int = 28,
    gt_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask targets of one image's positive proposals, mmdet 2.28.1 mmdet/core/mask/mask_target.py
    ``mask_target_single`` with ``BitmapMasks.crop_and_resize`` (mmdet/core/mask/structures.py).

    Args:
        proposals: K x 4 XYXY positive proposals (input pixels).
        masks: the gt masks, H x W each (the padded image size in F-ViT's pipeline): a tensor or a list of
            arrays. Without ``gt_index`` there is one per proposal (K x H x W, the proposal's assigned gt mask);
            with it, all M gt masks of the image (M x H x W).
        size: output side (``mask_size=28``).
        gt_index: (K,) long index of each proposal's gt in ``masks`` (``RcnnTargets.pos_gt_index``). Pooling the
            M masks with the gt index as the RoI's batch index equals mmdet's ``index_select`` of K masks.

    The proposals are clipped to ``[0, W] x [0, H]`` of the masks, each mask is cut with mmcv ``roi_align``
    (output size x size, spatial scale 1, ``sampling_ratio=0``, ``avg``, ``aligned=True``: here torchvision's
    ``roi_align`` with the same flags, as :mod:`.roi`) on the fp32 0/1 mask, and binarised ``>= 0.5``.

    Returns:
        K x size x size fp32 0/1 targets.
    """
    proposals = proposals[:, :4].float()
    k = proposals.shape[0]
    if k == 0:
        return proposals.new_zeros(0, size, size)
    m = _as_mask_tensor(masks, proposals.device).float()
    if m.dim() != 3:
        raise ValueError(f"masks must be N x H x W, got {tuple(m.shape)}")
    height, width = m.shape[-2:]
    boxes = proposals.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    if gt_index is None:
        if m.shape[0] != k:
            raise ValueError(f"{k} proposals but {m.shape[0]} masks (give gt_index to select among all gt masks)")
        index = torch.arange(k, device=proposals.device, dtype=torch.float32)
    else:
        if gt_index.shape != (k,):
            raise ValueError(f"{k} proposals but gt_index of shape {tuple(gt_index.shape)}")
        index = gt_index.to(device=proposals.device, dtype=torch.float32)
    rois = torch.cat([index[:, None], boxes], dim=1)
    out = roi_align(m[:, None], rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (out[:, 0] >= 0.5).float()


def rcnn_mask_targets(targets: RcnnTargets, gt_masks: Sequence, size: int = 28) -> torch.Tensor:
    """Mask targets of every positive RoI of a batch (P x size x size, ``targets.pos_rois`` order), mmdet 2.28.1
    mmdet/models/roi_heads/mask_heads/fcn_mask_head.py ``get_targets``.

    ``gt_masks``: per image its M_i x H x W masks (tensor or list of arrays), in the order of its gt boxes.
    """
    pos_rois = targets.pos_rois
    out, start = [], 0
    for image, count in enumerate(targets.num_pos):
        boxes = pos_rois[start : start + count, 1:]
        index = targets.pos_gt_index[start : start + count]
        out.append(mask_targets(boxes, gt_masks[image], size, gt_index=index))
        start += count
    if not out:
        return pos_rois.new_zeros(0, size, size)
    return torch.cat(out)


def mask_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Class-agnostic mask loss, mmdet 2.28.1 fcn_mask_head.py ``loss`` with ``CrossEntropyLoss(use_mask=True)``
    (mmdet/models/losses/cross_entropy_loss.py ``mask_cross_entropy``).

    Args:
        logits: K x 1 x s x s mask logits (the single class-agnostic channel is mmdet's ``pred[inds, 0]``).
        targets: K x s x s 0/1 targets (:func:`mask_targets`).

    Returns:
        BCE-with-logits averaged over all K * s * s pixels (scalar; mmdet returns shape (1,)), or
        ``logits.sum()`` (0, in the graph) when K == 0. fp32 (``force_fp32``).
    """
    if logits.shape[0] == 0:
        return logits.float().sum()
    if logits.dim() == 4:
        logits = logits[:, 0]
    if logits.shape != targets.shape:
        raise ValueError(f"mask logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ")
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float().to(logits.device), reduction="mean")
