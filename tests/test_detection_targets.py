"""F-ViT training targets and losses (ovdense.detection.targets) against small cases worked out by hand from the
mmdet 2.28.1 rules and CLIPSelf's CustomCrossEntropyLoss (IoUs, deltas and losses written out in the comments)."""

import math
from importlib import resources

import numpy as np
import pytest
import torch

from ovdense.detection.box_coder import DeltaXYWHCoder
from ovdense.detection.targets import (
    AssignResult,
    RcnnTargets,
    class_weights_ov_coco,
    class_weights_ov_lvis,
    mask_loss,
    mask_targets,
    max_iou_assign,
    random_sample,
    rcnn_loss,
    rcnn_mask_targets,
    rcnn_targets,
    rpn_targets_and_loss,
)
from ovdense.eval.detection import COCO_2017_CATEGORIES, ov_coco_categories

RPN = dict(pos_iou=0.7, neg_iou=0.3, min_pos_iou=0.3)
RCNN_CODER = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
RPN_CODER = DeltaXYWHCoder()


def softplus(x: float) -> float:
    """BCE-with-logits of logit x against target 0 (against target 1 it is softplus(-x))."""
    return math.log1p(math.exp(x))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# --- assigner -------------------------------------------------------------------------------------------------
def test_assign_rpn_bands_and_low_quality():
    gt = t([[0, 0, 10, 10], [100, 100, 120, 120], [200, 200, 220, 220]])
    boxes = t(
        [
            [0, 0, 10, 10],  # IoU 1 with gt0 -> positive
            [0, 0, 10, 5],  # IoU 50/100 = 0.5 in [0.3, 0.7) -> ignored (-1)
            [0, 0, 10, 2],  # IoU 0.2 -> negative
            [50, 50, 60, 60],  # IoU 0 -> negative
            [100, 100, 120, 107],  # IoU 140/400 = 0.35: gt1's best and >= min_pos_iou 0.3 -> gt1
            [200, 200, 220, 205],  # IoU 100/400 = 0.25: gt2's best but < 0.3 -> stays negative
            [100, 113, 120, 120],  # IoU 0.35 too: tied best of gt1 -> gt1 (gt_max_assign_all)
        ]
    )
    res = max_iou_assign(boxes, gt, **RPN, match_low_quality=True)
    assert res.gt_inds.tolist() == [1, -1, 0, 0, 2, 0, 2]
    torch.testing.assert_close(res.max_iou, t([1, 0.5, 0.2, 0, 0.35, 0.25, 0.35]))
    assert res.num_gts == 3 and res.num_pos == 3 and res.num_neg == 3
    # Only the first of the tied boxes without gt_max_assign_all; the second stays in the ignore band.
    res = max_iou_assign(boxes, gt, **RPN, match_low_quality=True, gt_max_assign_all=False)
    assert res.gt_inds.tolist() == [1, -1, 0, 0, 2, 0, -1]
    # Without low-quality matching 0.35 is just in the ignore band.
    res = max_iou_assign(boxes, gt, **RPN, match_low_quality=False)
    assert res.gt_inds.tolist() == [1, -1, 0, 0, -1, 0, -1]


def test_assign_low_quality_overwrites_with_last_gt():
    # Box b has IoU 1 with gt A and 100/250 = 0.4 with gt B, and is B's best box: step 3 gives it A, the
    # low-quality loop (A then B) gives it B last.
    gt = t([[0, 0, 10, 10], [0, 0, 10, 25]])
    boxes = t([[0, 0, 10, 10], [50, 50, 60, 60]])
    assert max_iou_assign(boxes, gt, **RPN, match_low_quality=True).gt_inds.tolist() == [2, 0]
    assert max_iou_assign(boxes, gt, **RPN, match_low_quality=False).gt_inds.tolist() == [1, 0]


def test_assign_empty():
    boxes = t([[0, 0, 10, 10], [5, 5, 8, 8]])
    res = max_iou_assign(boxes, torch.zeros(0, 4), **RPN, match_low_quality=True)
    assert res.gt_inds.tolist() == [0, 0] and res.max_iou.tolist() == [0, 0] and res.num_gts == 0
    res = max_iou_assign(torch.zeros(0, 4), t([[0, 0, 1, 1]]), **RPN, match_low_quality=True)
    assert res.gt_inds.shape == (0,) and res.max_iou.shape == (0,)
    # A 5th (score) column of proposals is ignored.
    res = max_iou_assign(t([[0, 0, 10, 10, 0.9]]), t([[0, 0, 10, 10]]), 0.5, 0.5, 0.5, False)
    assert res.gt_inds.tolist() == [1]


def test_assign_degenerate_box_is_zero_iou():
    # mmdet divides by max(union, 1e-6): a zero-area box against a zero-area gt has IoU 0, not NaN.
    res = max_iou_assign(t([[5, 5, 5, 5]]), t([[5, 5, 5, 5]]), **RPN, match_low_quality=True)
    assert res.max_iou.tolist() == [0.0] and res.gt_inds.tolist() == [0]


# --- sampler --------------------------------------------------------------------------------------------------
def _assign(gt_inds) -> AssignResult:
    gt_inds = torch.tensor(gt_inds, dtype=torch.long)
    return AssignResult(gt_inds, torch.zeros(len(gt_inds)), int(gt_inds.max().clamp(min=0)))


def test_sampler_counts_and_candidates():
    inds = [1] * 10 + [0] * 100 + [-1] * 5
    pos, neg = random_sample(_assign(inds), 16, 0.5, gen(0))
    assert pos.numel() == 8 and neg.numel() == 8
    assert bool((pos < 10).all()) and bool(((neg >= 10) & (neg < 110)).all())  # never an ignored box
    assert pos.tolist() == sorted(set(pos.tolist())) and neg.tolist() == sorted(set(neg.tolist()))
    # Few positives: all taken without a draw, negatives fill up to num.
    pos, neg = random_sample(_assign([1, 0, 2, 0, 0, 3] + [0] * 30), 16, 0.5, gen(0))
    assert pos.tolist() == [0, 2, 5] and neg.numel() == 13
    # Everything fits: no randomness at all.
    pos, neg = random_sample(_assign([1, 0, -1, 0]), 16, 0.5, gen(0))
    assert pos.tolist() == [0] and neg.tolist() == [1, 3]


def test_sampler_reproducible_from_generator():
    inds = [1] * 50 + [0] * 500
    a = random_sample(_assign(inds), 64, 0.25, gen(7))
    b = random_sample(_assign(inds), 64, 0.25, gen(7))
    c = random_sample(_assign(inds), 64, 0.25, gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])
    # Resumable: a generator restored from a saved state repeats the draws.
    g = gen(3)
    state = g.get_state()
    first = random_sample(_assign(inds), 64, 0.25, g)
    g.set_state(state)
    assert torch.equal(random_sample(_assign(inds), 64, 0.25, g)[1], first[1])


def test_sampler_matches_mmdet_draw_on_default_generator():
    # mmdet's random_choice: gallery[torch.randperm(n)[:k]] on the global CPU generator, then .unique().
    inds = [1] * 40 + [0] * 300
    torch.manual_seed(11)
    pos_ref = torch.arange(40)[torch.randperm(40)[:16]].unique()
    neg_ref = (torch.arange(300) + 40)[torch.randperm(300)[:16]].unique()
    torch.manual_seed(11)
    pos, neg = random_sample(_assign(inds), 32, 0.5, torch.default_generator)
    assert torch.equal(pos, pos_ref) and torch.equal(neg, neg_ref)


def test_sampler_add_gt_first():
    pos, neg = random_sample(_assign([0] * 20), 16, 0.25, gen(0), add_gt_first=2)
    assert pos.tolist() == [0, 1]  # the prepended gts are positives assigned to themselves
    assert neg.numel() == 14 and bool((neg >= 2).all())


# --- RPN ------------------------------------------------------------------------------------------------------
def test_rpn_loss_by_hand():
    anchors = t(
        [
            [0, 0, 10, 10],  # IoU 90/110 = 0.818 with gt -> positive, target dx = (6 - 5) / 10 = 0.1
            [1, 0, 11, 10],  # = gt -> positive, target 0
            [0, 0, 10, 5],  # inter 9*5 = 45, union 105: 0.43 -> ignored
            [30, 30, 40, 40],  # negative
            [50, 50, 60, 60],  # negative
            [0, 20, 10, 30],  # negative
        ]
    )
    gt = [t([[1, 0, 11, 10]]), torch.zeros(0, 4)]  # image 1 has no gt: all 6 anchors negative
    x0 = [2.0, 1.0, 5.0, -1.0, 0.5, -2.0]
    x1 = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    d0 = t([[0.3, 0, 0, 0], [0, -0.5, 0.25, 0], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]])
    d1 = torch.full((6, 4), 7.0)
    out = rpn_targets_and_loss(anchors, [t(x0), t(x1)], [d0, d1], gt, RPN_CODER, gen(0))
    # avg factor: image 0 has 2 pos + 3 neg, image 1 max(0, 1) = 1 "pos" + 6 neg -> 12 (not 11).
    cls = softplus(-2.0) + softplus(-1.0) + softplus(-1.0) + softplus(0.5) + softplus(-2.0) + sum(map(softplus, x1))
    assert out["loss_rpn_cls"].item() == pytest.approx(cls / 12, rel=1e-6)
    # L1: |0.3 - 0.1| + |-0.5| + |0.25| = 0.95 over the positives only.
    assert out["loss_rpn_bbox"].item() == pytest.approx(0.95 / 12, rel=1e-6)


def test_rpn_loss_no_gt_anywhere_keeps_graph():
    anchors = t([[0, 0, 10, 10], [20, 20, 30, 30]])
    x = t([0.0, 1.0]).requires_grad_()
    d = torch.zeros(2, 4, requires_grad=True)
    out = rpn_targets_and_loss(anchors, [x], [d], [torch.zeros(0, 4)], RPN_CODER, gen(0))
    # 1 (empty positives count 1) + 2 negatives.
    assert out["loss_rpn_cls"].item() == pytest.approx((softplus(0.0) + softplus(1.0)) / 3, rel=1e-6)
    assert out["loss_rpn_bbox"].item() == 0.0
    (out["loss_rpn_cls"] + out["loss_rpn_bbox"]).backward()
    assert d.grad is not None and float(d.grad.abs().sum()) == 0.0


def test_rpn_sampling_caps_at_256():
    # 300 anchors equal to the gt (positives) and 1000 far away: 128 positives, 128 negatives per image.
    anchors = torch.cat([t([[0, 0, 10, 10]]).repeat(300, 1), t([[50, 50, 60, 60]]).repeat(1000, 1)])
    x = torch.zeros(1300)
    out = rpn_targets_and_loss(anchors, [x], [torch.zeros(1300, 4)], [t([[0, 0, 10, 10]])], RPN_CODER, gen(0))
    assert out["loss_rpn_cls"].item() == pytest.approx(256 * math.log(2) / 256, rel=1e-6)


# --- RCNN targets ---------------------------------------------------------------------------------------------
def test_rcnn_targets_by_hand():
    gt = [t([[0, 0, 10, 10], [20, 20, 40, 40]]), torch.zeros(0, 4)]
    labels = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.long)]
    props = [
        t(
            [
                [0, 0, 10, 5, 0.9],  # IoU exactly 0.5 with gt0 -> positive (>= 0.5)
                [1, 0, 11, 10, 0.8],  # IoU 0.818 -> positive gt0
                [0, 0, 10, 4.9, 0.7],  # IoU 0.49 -> negative
                [100, 100, 110, 110, 0.6],  # negative
            ]
        ),
        t([[0, 0, 5, 5], [5, 5, 9, 9], [1, 1, 2, 2]]),
    ]
    tg = rcnn_targets(props, gt, labels, 3, RCNN_CODER, gen(0), match_low_quality=False)
    # Image 0: [gt0, gt1, p0, p1 | p2, p3] (gt1 has no proposal but is prepended, so it is a positive).
    expected_rois = [
        [0, 0, 0, 10, 10],
        [0, 20, 20, 40, 40],
        [0, 0, 0, 10, 5],
        [0, 1, 0, 11, 10],
        [0, 0, 0, 10, 4.9],
        [0, 100, 100, 110, 110],
        [1, 0, 0, 5, 5],
        [1, 5, 5, 9, 9],
        [1, 1, 1, 2, 2],
    ]
    torch.testing.assert_close(tg.rois, t(expected_rois))
    assert tg.labels.tolist() == [2, 0, 2, 2, 3, 3, 3, 3, 3]
    assert tg.pos.tolist() == [True] * 4 + [False] * 5
    assert tg.num_samples == [6, 3] and tg.num_pos == [4, 0]
    assert tg.pos_gt_index.tolist() == [0, 1, 0, 0] and tg.pos_is_gt.tolist() == [True, True, False, False]
    # p0 -> gt0: centres (5, 2.5) -> (5, 5), sizes (10, 5) -> (10, 10): dy = 2.5/5 = 0.5 -> /0.1 = 5,
    # dh = log 2 -> /0.2; p1 -> gt0: dx = (5 - 6)/10 = -0.1 -> /0.1 = -1.
    expected_targets = torch.zeros(9, 4)
    expected_targets[2] = t([0, 5, 0, math.log(2) / 0.2])
    expected_targets[3] = t([-1, 0, 0, 0])
    torch.testing.assert_close(tg.bbox_targets, expected_targets)
    torch.testing.assert_close(tg.pos_rois, tg.rois[:4])


def test_rcnn_low_quality_reassigns_best_box():
    # b = gtA (IoU 1 with A) and is gtB's best box (IoU 100/160 = 0.625); c has IoU 0.5 with B, 0.125 with A.
    gt = [t([[0, 0, 10, 10], [0, 0, 10, 16]])]
    labels = [torch.tensor([0, 1])]
    props = [t([[0, 0, 10, 10], [0, 8, 10, 16]])]
    off = rcnn_targets(props, gt, labels, 2, RCNN_CODER, gen(0), match_low_quality=False)
    on = rcnn_targets(props, gt, labels, 2, RCNN_CODER, gen(0), match_low_quality=True)
    assert off.labels.tolist() == [0, 1, 0, 1]  # [gtA, gtB, b, c]
    assert on.labels.tolist() == [0, 1, 1, 1]  # b moves to B, its best-match gt (last in the loop)


def test_rcnn_sampling_caps():
    gt = [t([[0, 0, 10, 10]])]
    props = [torch.cat([t([[0, 0, 10, 10]]).repeat(200, 1), t([[50, 50, 60, 60]]).repeat(1000, 1)])]
    tg = rcnn_targets(props, gt, [torch.tensor([0])], 1, RCNN_CODER, gen(0), match_low_quality=False)
    assert tg.num_pos == [128] and tg.num_samples == [512]
    tg2 = rcnn_targets(props, gt, [torch.tensor([0])], 1, RCNN_CODER, gen(0), match_low_quality=False)
    torch.testing.assert_close(tg.rois, tg2.rois)


# --- RCNN loss ------------------------------------------------------------------------------------------------
def _targets(labels, pos, bbox_targets) -> RcnnTargets:
    n = len(labels)
    return RcnnTargets(
        rois=torch.zeros(n, 5),
        labels=torch.tensor(labels),
        bbox_targets=t(bbox_targets),
        pos=torch.tensor(pos),
        num_samples=[n],
        num_pos=[sum(pos)],
        pos_gt_index=torch.zeros(sum(pos), dtype=torch.long),
        pos_is_gt=torch.zeros(sum(pos), dtype=torch.bool),
        num_classes=3,
    )


def test_rcnn_loss_by_hand():
    weight = t([1.0, 0.0, 1.0, 0.6])  # class 1 novel (masked), background 0.6
    logits = t(
        [
            [2.0, 5.0, 1.0, 0.0],  # label 0; the masked column has the largest raw logit
            [0.5, 0.0, 0.2, 1.0],  # label 2; masked argmax = 3 -> wrong
            [0.0, 3.0, -1.0, 0.5],  # background; masked argmax = 3 -> right
        ]
    ).requires_grad_()
    deltas = t([[0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], [5, 5, 5, 5]])
    tg = _targets([0, 2, 3], [True, True, False], [[0, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0]])
    before = logits.detach().clone()
    out = rcnn_loss(logits, deltas, tg, weight)

    def ce(row, label, cols=(0, 2, 3)):  # CE over the non-masked columns only
        return -(row[label] - math.log(sum(math.exp(row[c]) for c in cols)))

    rows = before.tolist()
    expected = (ce(rows[0], 0) * 1.0 + ce(rows[1], 2) * 1.0 + ce(rows[2], 3) * 0.6) / 3
    assert out["loss_cls"].item() == pytest.approx(expected, rel=1e-6)
    # L1 over the positives' 4 deltas: 1.0 + 2.0, divided by all 3 sampled RoIs.
    assert out["loss_bbox"].item() == pytest.approx(3.0 / 3, rel=1e-6)
    assert out["acc"].item() == pytest.approx(200 / 3, rel=1e-6)  # rows 0 and 2, argmax over unmasked columns
    assert torch.equal(logits.detach(), before)  # not masked in place
    out["loss_cls"].backward()
    assert float(logits.grad[:, 1].abs().sum()) == 0.0  # a masked column gets no gradient


def test_rcnn_loss_without_positives_and_masked_target():
    weight = t([1.0, 0.0, 1.0, 0.6])
    deltas = torch.ones(2, 4, requires_grad=True)
    tg = _targets([3, 3], [False, False], [[0] * 4, [0] * 4])
    out = rcnn_loss(torch.zeros(2, 4), deltas, tg, weight)
    # uniform over 3 unmasked columns: CE log 3, times the background weight 0.6, mean over 2.
    assert out["loss_cls"].item() == pytest.approx(0.6 * math.log(3), rel=1e-6)
    assert out["loss_bbox"].item() == 0.0 and out["loss_bbox"].requires_grad
    with pytest.raises(ValueError, match="class weight"):
        rcnn_loss(torch.zeros(1, 4), torch.zeros(1, 4), _targets([1], [True], [[0] * 4]), weight)


# --- class weights --------------------------------------------------------------------------------------------
# CLIPSelf F-ViT/configs/ov_coco/fvit_vitb16_upsample_fpn_bs64_3e_ovcoco_eva_original.py, ``class_weight``.
CONFIG_COCO_WEIGHTS = [
    1.0, 1.0, 1.0, 1.0, 0, 0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 0, 1.0, 1.0, 0, 0,
    1.0, 1.0, 1.0, 1.0, 0, 1.0, 0, 1.0, 1.0, 1.0, 0, 1.0, 0, 1.0, 1.0, 0, 1.0,
    0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0, 1.0, 0, 1.0, 1.0,
    1.0, 1.0, 1.0, 1.0, 0, 1.0, 1.0, 1.0, 0, 1.0, 1.0, 1.0, 1.0, 0, 1.0, 0.6
]  # fmt: skip


def test_class_weights_ov_coco_match_config():
    names = ov_coco_categories([{"id": i, "name": n} for i, n in COCO_2017_CATEGORIES]).names
    base_file = resources.files("ovdense.eval").joinpath("classes", "ov_coco_base.txt")
    base = {line.strip() for line in base_file.read_text(encoding="utf-8").splitlines() if line.strip()}
    w = class_weights_ov_coco(names, base)
    assert w.shape == (66,) and w.dtype == torch.float32
    assert w.tolist() == pytest.approx(CONFIG_COCO_WEIGHTS)  # index by index
    assert int(w[:65].sum()) == 48


def test_class_weights_ov_lvis():
    w = class_weights_ov_lvis([0, 3, 1, 0])
    assert w.tolist() == pytest.approx([0, 1, 1, 0, 0.9])


# --- masks ----------------------------------------------------------------------------------------------------
def _col_mask(ones: int) -> np.ndarray:
    m = np.zeros((8, 8), dtype=bool)
    m[:, :ones] = True
    return m


def test_mask_targets_by_hand():
    # 8 x 8 mask, columns 0-4 set. Box [0, 0, 8, 8] -> 4 x 4: aligned RoIAlign starts at -0.5, bins of 2 px,
    # 2 samples per bin at x = 2b + 0, 2b + 1 (pixel centres): bin 2 averages pixels 4 (1) and 5 (0) = 0.5,
    # which binarises to 1 (>= 0.5); bin 3 = 0.
    masks = [_col_mask(5)]
    out = mask_targets(t([[0, 0, 8, 8]]), masks, size=4)
    torch.testing.assert_close(out, t([[1, 1, 1, 0]] * 4)[None])
    # Boxes are clipped to the mask first: [-8, 0, 8, 8] -> [0, 0, 8, 8].
    torch.testing.assert_close(mask_targets(t([[-8, 0, 8, 8]]), masks, size=4), out)
    # Selecting among all gt masks by index equals giving each proposal its own mask.
    all_masks = torch.from_numpy(np.stack([np.zeros((8, 8), bool), _col_mask(5)]))
    boxes = t([[0, 0, 8, 8], [0, 0, 8, 8], [0, 0, 4, 8]])
    by_index = mask_targets(boxes, all_masks, size=4, gt_index=torch.tensor([1, 0, 1]))
    own = mask_targets(boxes, all_masks[[1, 0, 1]], size=4)
    torch.testing.assert_close(by_index, own)
    torch.testing.assert_close(by_index[1], torch.zeros(4, 4))
    assert mask_targets(torch.zeros(0, 4), all_masks, size=28).shape == (0, 28, 28)


def test_rcnn_mask_targets_follow_positive_order():
    gt = [t([[0, 0, 8, 8], [0, 0, 4, 8]])]
    props = [t([[0, 0, 8, 8], [40, 40, 50, 50]])]
    tg = rcnn_targets(props, gt, [torch.tensor([0, 1])], 2, RCNN_CODER, gen(0), match_low_quality=False)
    masks = [np.stack([_col_mask(5), _col_mask(2)])]
    out = rcnn_mask_targets(tg, masks, size=4)
    # positives: [gt0, gt1, proposal 0 (-> gt0)]
    assert tg.pos_gt_index.tolist() == [0, 1, 0]
    expected = torch.stack(
        [mask_targets(tg.pos_rois[i : i + 1, 1:], masks[0][[g]], size=4)[0] for i, g in enumerate([0, 1, 0])]
    )
    torch.testing.assert_close(out, expected)


def test_mask_loss_by_hand():
    logits = t([[[[0.0, 1.0], [-1.0, 2.0]]]])
    targets = t([[[1, 0], [0, 1]]])
    expected = (softplus(-0.0) + softplus(1.0) + softplus(-1.0) + softplus(-2.0)) / 4
    assert mask_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(0, 1, 28, 28, requires_grad=True)
    loss = mask_loss(empty, torch.zeros(0, 28, 28))
    assert loss.item() == 0.0 and loss.requires_grad
