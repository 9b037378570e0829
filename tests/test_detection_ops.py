"""F-ViT detection ops (anchors, box coding, RPN / RCNN post-processing, RoI pooling) against values written
out by hand from the mmdet 2.28.1 / mmcv 1.7.0 rules (not by calling the code under test)."""

import math

import pytest
import torch
from torchvision.ops import roi_align

from ovdense.detection.anchors import AnchorGenerator
from ovdense.detection.box_coder import DeltaXYWHCoder
from ovdense.detection.postprocess import batched_nms, flatten_level, multiclass_nms, rpn_proposals
from ovdense.detection.roi import map_roi_levels, multilevel_roi_align, roi_align_single

R2 = math.sqrt(2.0)


def close(actual, expected, atol=1e-4):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- anchors ---------------------------------------------------------------------------------------
def test_base_anchors_stride_3p5():
    gen = AnchorGenerator([3.5, 7, 14, 28, 56])
    assert gen.num_anchors == 3
    # base 3.5 * 8 = 28; ratio = h / w, h_r = sqrt(r): r=0.5 -> w = 28 * sqrt(2) = 39.598, h = 28 / sqrt(2) = 19.799
    half_long, half_short = 14 * R2, 7 * R2
    close(
        gen.base_anchors(0),
        [
            [-half_long, -half_short, half_long, half_short],  # ratio 0.5 (wide)
            [-14.0, -14.0, 14.0, 14.0],  # ratio 1
            [-half_short, -half_long, half_short, half_long],  # ratio 2 (tall)
        ],
    )
    # level 4: stride 56 -> 448 px square anchor, no rounding.
    close(gen.base_anchors(4)[1], [-224.0, -224.0, 224.0, 224.0])


def test_grid_anchors_stride_3p5_order():
    gen = AnchorGenerator([3.5])
    (anchors,) = gen.grid_anchors([(2, 3)])  # H=2, W=3
    assert anchors.shape == (2 * 3 * 3, 4) and anchors.dtype == torch.float32
    half_long, half_short = 14 * R2, 7 * R2
    # row (y * W + x) * A + a; shift = (x * 3.5, y * 3.5), no centre offset
    close(anchors[0], [-half_long, -half_short, half_long, half_short])  # (y0, x0), ratio 0.5
    close(anchors[4], [3.5 - 14, -14, 3.5 + 14, 14])  # (y0, x1), ratio 1
    sx, sy = 2 * 3.5, 1 * 3.5  # (y1, x2) -> rows 15, 16, 17
    close(anchors[15], [sx - half_long, sy - half_short, sx + half_long, sy + half_short])
    close(anchors[17], [sx - half_short, sy - half_long, sx + half_short, sy + half_long])
    close(anchors[9 + 2], [-half_short, 3.5 - half_long, half_short, 3.5 + half_long])  # (y1, x0), ratio 2


def test_grid_anchors_stride_16_and_levels():
    gen = AnchorGenerator([4, 8, 16, 32, 64])
    sizes = [(5, 6), (3, 3), (3, 4), (2, 2), (1, 1)]
    levels = gen.grid_anchors(sizes)
    assert [t.shape[0] for t in levels] == [h * w * 3 for h, w in sizes]
    a16 = levels[2]
    # base 128: ratio 0.5 -> w = 128 sqrt2 = 181.02, h = 64 sqrt2 = 90.51
    close(a16[0], [-64 * R2, -32 * R2, 64 * R2, 32 * R2])
    # (y=2, x=1) of a 3 x 4 grid, ratio 1: row (2 * 4 + 1) * 3 + 1 = 28, shift (16, 32)
    close(a16[28], [16 - 64, 32 - 64, 16 + 64, 32 + 64])
    close(levels[4][1], [-256.0, -256.0, 256.0, 256.0])
    assert levels[1].device.type == "cpu"
    assert gen.grid_anchors(sizes, dtype=torch.float64)[0].dtype == torch.float64


def test_anchor_order_ratios_outer_scales_inner():
    gen = AnchorGenerator([10], scales=(1.0, 2.0), ratios=(1.0, 4.0))
    assert gen.num_anchors == 4
    # order: (r1, s1), (r1, s2), (r4, s1), (r4, s2); r=4 -> w = 10 s / 2, h = 10 s * 2
    close(gen.base_anchors(0), [[-5, -5, 5, 5], [-10, -10, 10, 10], [-2.5, -10, 2.5, 10], [-5, -20, 5, 20]])
    with pytest.raises(ValueError):
        gen.grid_anchors([(1, 1), (1, 1)])


# --- box coder ------------------------------------------------------------------------------------
def test_decode_clamps_dw_dh_both_sides_and_clips():
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    # raw (1, 0, 50, -50) -> denormalised (0.1, 0, +10, -10) -> dw, dh clamped to +-|log(16/1000)|:
    # gw = 10 * 1000/16 = 625, gh = 20 * 16/1000 = 0.32, gx = 5 + 10 * 0.1 = 6
    deltas = torch.tensor([[1.0, 0.0, 50.0, -50.0]])
    close(coder.decode(box, deltas), [[6 - 312.5, 10 - 0.16, 6 + 312.5, 10 + 0.16]], atol=1e-3)
    # clip to max_shape = (H, W) = (100, 200): x to [0, 200], y to [0, 100]
    close(coder.decode(box, deltas, max_shape=(100, 200)), [[0.0, 10 - 0.16, 200.0, 10 + 0.16]], atol=1e-3)
    # raw +-10 -> +-2, inside the clamp: gw = 10 e^2, gh = 20 e^-2
    gw, gh = 10 * math.exp(2), 20 * math.exp(-2)
    close(
        coder.decode(box, torch.tensor([[0.0, 0.0, 10.0, -10.0]])), [[5 - gw / 2, 10 - gh / 2, 5 + gw / 2, 10 + gh / 2]]
    )
    # y clipping at both ends; (H, W, C) shapes accepted like mmdet's img_shape
    tall = torch.tensor([[10.0, -30.0, 20.0, 130.0]])
    close(coder.decode(tall, torch.zeros(1, 4), max_shape=(100, 200, 3)), [[10.0, 0.0, 20.0, 100.0]])


def test_encode_by_hand_and_round_trip():
    coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
    p = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    g = torch.tensor([[1.0, 2.0, 21.0, 42.0]])  # centre (11, 22), w 20, h 40: no +1 anywhere
    close(coder.encode(p, g), [[6 / 10 / 0.1, 12 / 20 / 0.1, math.log(2) / 0.2, math.log(2) / 0.2]])
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=gen) * 300
    props = torch.cat([xy, xy + 5 + torch.rand(64, 2, generator=gen) * 200], 1)
    xy = torch.rand(64, 2, generator=gen) * 300
    gts = torch.cat([xy, xy + 5 + torch.rand(64, 2, generator=gen) * 200], 1)
    for c in (coder, DeltaXYWHCoder(means=(0.1, -0.2, 0.0, 0.05), stds=(1, 1, 1, 1))):
        close(c.decode(props, c.encode(props, gts)), gts, atol=2e-3)
    assert coder.decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


# --- RoI level mapping and pooling -----------------------------------------------------------------
@pytest.mark.parametrize(
    "size,level",
    [
        (1.0, 0),
        (55.9, 0),
        (56.0, 0),
        (111.99, 0),
        (112 - 3e-5, 1),  # s/56 = 2 - 5.4e-7, + 1e-6 inside the log -> level 1 (mmdet's eps placement)
        (112.0, 1),
        (223.99, 1),
        (224.0, 2),
        (447.9, 2),
        (448.0, 3),
        (1000.0, 3),
    ],
)
def test_map_roi_levels_boundaries(size, level):
    rois = torch.tensor([[0.0, 3.0, 5.0, 3.0 + size, 5.0 + size]])
    assert map_roi_levels(rois, 4).tolist() == [level]


def test_map_roi_levels_rectangles_and_clamp():
    # sqrt(112 * 448) = 224 -> 2; zero area -> log2(1e-6) -> clamped to 0; clamp to num_levels - 1
    rois = torch.tensor([[0, 0, 0, 112, 448], [0, 10, 10, 10, 50], [0, 0, 0, 900, 900.0]])
    assert map_roi_levels(rois, 4).tolist() == [2, 0, 3]
    assert map_roi_levels(rois, 2).tolist() == [1, 0, 1]


def ramp_pyramid(strides, image=224, batch=2, channels=2):
    """Per level B x C x H x W with value x (column index) for batch 0 and 2x for batch 1, + 100 c."""
    feats = []
    for s in strides:
        n = int(image / s)
        x = torch.arange(n, dtype=torch.float32).view(1, 1, 1, n).expand(batch, channels, n, n).clone()
        x[1] *= 2
        x += 100 * torch.arange(channels, dtype=torch.float32).view(1, -1, 1, 1)
        feats.append(x)
    return feats


def test_multilevel_roi_align_stride_3p5_by_hand():
    strides = [3.5, 7, 14, 28]
    feats = ramp_pyramid(strides)
    # roi 0: 35 px -> level 0 (1/3.5); centre 24.5 / 3.5 - 0.5 (aligned) = 6.5 on the ramp
    # roi 1: 140 px -> level 1 (1/7), batch 1 (ramp x 2); centre 84 / 7 - 0.5 = 11.5 -> 23
    rois = torch.tensor([[0, 7, 7, 42, 42], [1, 14, 14, 154, 154.0]])
    out = multilevel_roi_align(feats, strides, rois, output_size=1)
    assert out.shape == (2, 2, 1, 1) and out.dtype == torch.float32
    close(out[:, :, 0, 0], [[6.5, 106.5], [23.0, 123.0]])
    # the torchvision defaults would give other numbers: aligned=False -> 7, inferred 1/4 -> 24.5/4 - 0.5
    assert roi_align(feats[0], rois[:1], 1, 1 / 3.5, 0, aligned=False)[0, 0, 0, 0].item() == pytest.approx(7.0)
    assert roi_align(feats[0], rois[:1], 1, 1 / 4, 0, aligned=True)[0, 0, 0, 0].item() == pytest.approx(5.625)


def test_multilevel_roi_align_matches_direct_torchvision_call():
    strides = [3.5, 7, 14, 28]
    gen = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, int(224 / s), int(224 / s), generator=gen) for s in strides]
    rois = torch.tensor(
        [
            [0, 10.3, 20.1, 60.7, 70.2],  # sqrt(50.4 * 50.1) = 50.2 -> level 0
            [1, 5, 5, 200, 150.0],  # sqrt(195 * 145) = 168.2 -> 1
            [1, 0.5, 1.5, 30.2, 20.9],  # 24 -> 0
            [0, 0, 0, 223, 223.0],  # 223 < 224 -> 1
            [0, 0, 0, 224, 224.0],  # 224 -> 2
            [1, -100, -100, 400, 400.0],  # 500 -> 3 (partly outside the map)
        ]
    )
    levels = [0, 1, 0, 1, 2, 3]
    out = multilevel_roi_align([f.half() for f in feats], strides, rois.double(), output_size=7)
    assert out.dtype == torch.float32
    for k, lvl in enumerate(levels):
        ref = roi_align(
            feats[lvl].half().float(),
            rois[k : k + 1],
            (7, 7),
            spatial_scale=1 / strides[lvl],
            sampling_ratio=0,
            aligned=True,
        )
        torch.testing.assert_close(out[k : k + 1], ref, atol=1e-5, rtol=0)
    assert multilevel_roi_align(feats, strides, rois[:0], 7).shape == (0, 4, 7, 7)


def test_roi_align_single_is_aligned_adaptive():
    feats = ramp_pyramid([14])
    rois = torch.tensor([[1, 28, 0, 84, 56.0]])  # centre x 56 / 14 - 0.5 = 3.5 on batch 1 -> 7
    out = roi_align_single(feats[0], rois, 14, 1)
    close(out[:, :, 0, 0], [[7.0, 107.0]])


# --- multiclass NMS -------------------------------------------------------------------------------
BOX_A = [0.0, 0.0, 10.0, 10.0]
BOX_B = [0.0, 0.0, 10.0, 4.5]  # inside A: IoU = 45 / 100 = 0.45


def test_multiclass_nms_same_class_suppressed_background_ignored():
    boxes = torch.tensor([BOX_A, BOX_B])
    scores = torch.tensor([[0.9, 0.0, 0.95], [0.8, 0.0, 0.99]])  # background (last) would win: ignored
    dets, labels = multiclass_nms(boxes, scores, score_thr=0.01, iou_threshold=0.4, max_per_img=100)
    close(dets, [BOX_A + [0.9]])
    assert labels.tolist() == [0]
    # OV-LVIS NMS 0.5: IoU 0.45 is not above it -> both kept, sorted by score
    dets, labels = multiclass_nms(boxes, scores, score_thr=0.01, iou_threshold=0.5, max_per_img=100)
    close(dets, [BOX_A + [0.9], BOX_B + [0.8]])
    assert labels.tolist() == [0, 0]


def test_nms_threshold_compared_in_fp32_like_mmcv():
    # IoU = 40 / 100 computes to fp32(0.4) = 0.40000000596 > 0.4: mmcv's C-float threshold keeps the pair
    # (0.4f is not > 0.4f); torchvision's double threshold alone would suppress it.
    boxes = torch.tensor([BOX_A, [0.0, 0.0, 10.0, 4.0]])
    dets, _ = multiclass_nms(boxes, torch.tensor([[0.9, 0.0], [0.8, 0.0]]), 0.01, 0.4, 100)
    close(dets[:, 4], [0.9, 0.8])
    dets, _ = multiclass_nms(boxes, torch.tensor([[0.9, 0.0], [0.8, 0.0]]), 0.01, 0.3999, 100)
    close(dets[:, 4], [0.9])


def test_multiclass_nms_class_wise():
    boxes = torch.tensor([BOX_A, BOX_B])
    scores = torch.tensor([[0.7, 0.0, 0.5], [0.0, 0.8, 0.5]])
    dets, labels = multiclass_nms(boxes, scores, 0.01, 0.4, 100)
    close(dets, [BOX_B + [0.8], BOX_A + [0.7]])
    assert labels.tolist() == [1, 0]
    # one box, two classes: replicated, both kept
    dets, labels, inds = multiclass_nms(boxes[:1], torch.tensor([[0.9, 0.6, 0.1]]), 0.01, 0.4, 100, return_inds=True)
    close(dets, [BOX_A + [0.9], BOX_A + [0.6]])
    assert labels.tolist() == [0, 1] and inds.tolist() == [0, 1]


def test_multiclass_nms_strict_threshold_and_topk():
    boxes = torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(6)])  # disjoint
    scores = torch.tensor(
        [[0.25, 0.0, 0.0], [0.2500001, 0.0, 0.0], [0.0, 0.9, 0.0], [0.6, 0.0, 0.0], [0.0, 0.7, 0.0], [0.5, 0.3, 0.0]]
    )
    dets, labels = multiclass_nms(boxes, scores, score_thr=0.25, iou_threshold=0.4, max_per_img=100)
    # 0.25 == thr dropped, 0.2500001 kept; 0.3 kept
    close(dets[:, 4], [0.9, 0.7, 0.6, 0.5, 0.3, 0.2500001], atol=1e-7)
    assert labels.tolist() == [1, 1, 0, 0, 1, 0]
    close(dets[:, 0], [40.0, 80.0, 60.0, 100.0, 100.0, 20.0])
    dets, labels = multiclass_nms(boxes, scores, 0.25, 0.4, max_per_img=3)
    close(dets[:, 4], [0.9, 0.7, 0.6])
    assert labels.tolist() == [1, 1, 0]
    dets, labels = multiclass_nms(boxes, scores, score_thr=0.95, iou_threshold=0.4, max_per_img=100)
    assert dets.shape == (0, 5) and labels.shape == (0,)


def test_multiclass_nms_class_specific_boxes():
    boxes = torch.tensor([BOX_A + BOX_B])  # 1 x 4C, C = 2
    dets, labels = multiclass_nms(boxes, torch.tensor([[0.3, 0.4, 0.0]]), 0.01, 0.4, 100)
    close(dets, [BOX_B + [0.4], BOX_A + [0.3]])
    assert labels.tolist() == [1, 0]


def test_batched_nms_split_path_agrees():
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(300, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(300, 2, generator=gen) * 40], 1)
    scores = torch.rand(300, generator=gen)
    idxs = torch.randint(0, 4, (300,), generator=gen)
    dets_a, keep_a = batched_nms(boxes, scores, idxs, 0.5)
    dets_b, keep_b = batched_nms(boxes, scores, idxs, 0.5, split_threshold=10)
    assert keep_a.tolist() == keep_b.tolist()
    assert torch.all(dets_a[:-1, 4] >= dets_a[1:, 4])
    close(dets_a[:, :4], boxes[keep_a], atol=0)


def test_batched_nms_equal_scores_follow_mmcv_unstable_sort():
    # mmcv's kernel ranks with scores.sort(0, descending=True) (unstable); disjoint boxes with equal scores
    # come back in that order, not in torchvision's stable order
    scores = torch.tensor([0.5, 0.7, 0.5, 0.5, 0.7, 0.5] * 20)
    boxes = torch.tensor([[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(120)])
    _, keep = batched_nms(boxes, scores, torch.zeros(120, dtype=torch.long), 0.5)
    assert keep.tolist() == scores.sort(0, descending=True)[1].tolist()


# --- RPN proposals --------------------------------------------------------------------------------
def sig(v):
    return 1 / (1 + math.exp(-v))


def rpn(scores, anchors, image_shape=(100, 200), **kw):
    coder = DeltaXYWHCoder()
    deltas = [torch.zeros(len(s), 4) for s in scores]
    return rpn_proposals(
        [torch.tensor(s) for s in scores], deltas, [torch.tensor(a) for a in anchors], image_shape, coder, **kw
    )


def test_rpn_nms_is_per_level():
    box = [10.0, 10.0, 50.0, 50.0]
    # same box on two levels: both survive; twice on one level: one survives
    out = rpn([[2.0], [1.0]], [[box], [box]])
    close(out, [box + [sig(2.0)], box + [sig(1.0)]])
    out = rpn([[2.0, 1.0]], [[box, box]])
    close(out, [box + [sig(2.0)]])


def test_rpn_nms_pre_is_per_level_and_max_per_img():
    lvl0 = [[20.0 * i, 0, 20.0 * i + 10, 10] for i in range(5)]
    lvl1 = [[20.0 * i, 50, 20.0 * i + 10, 60] for i in range(2)]
    out = rpn([[0.0, 3.0, 1.0, 4.0, 2.0], [-1.0, -2.0]], [lvl0, lvl1], nms_pre=3)
    close(out[:, 4], [sig(4), sig(3), sig(2), sig(-1), sig(-2)])
    close(out[:, 0], [60.0, 20.0, 80.0, 0.0, 20.0])
    out = rpn([[0.0, 3.0, 1.0, 4.0, 2.0], [-1.0, -2.0]], [lvl0, lvl1], nms_pre=3, max_per_img=2)
    close(out[:, 4], [sig(4), sig(3)])


def test_rpn_clips_and_drops_empty_boxes():
    anchors = [
        [-10.0, -10.0, 30.0, 30.0],  # clipped to (0, 0, 30, 30)
        [300.0, 10.0, 340.0, 50.0],  # right of W=200: clipped to zero width -> dropped
        [60.0, 20.0, 90.0, 20.0],  # zero height -> dropped
        [100.0, 0.0, 105.0, 20.0],  # w = 5
        [120.0, 0.0, 125.5, 20.0],  # w = 5.5
    ]
    out = rpn([[5.0, 4.0, 3.0, 2.0, 1.0]], [anchors])
    close(out[:, :4], [[0.0, 0.0, 30.0, 30.0], anchors[3], anchors[4]])
    close(rpn([[5.0, 4.0, 3.0, 2.0, 1.0]], [anchors], min_size=5.0)[:, :4], [[0.0, 0.0, 30.0, 30.0], anchors[4]])
    assert rpn([[1.0]], [[[300.0, 10.0, 340.0, 50.0]]]).shape == (0, 5)


def test_flatten_level_matches_anchor_order():
    A, H, W = 3, 2, 4
    cls = torch.arange(A * H * W, dtype=torch.float32).view(A, H, W)  # value a * 8 + y * 4 + x
    reg = torch.arange(4 * A * H * W, dtype=torch.float32).view(4 * A, H, W)  # channel a * 4 + k
    scores, deltas = flatten_level(cls, reg)
    y, x, a = 1, 2, 2
    row = (y * W + x) * A + a
    assert scores[row].item() == a * 8 + y * 4 + x
    assert deltas[row].tolist() == [((a * 4 + k) * H + y) * W + x for k in range(4)]
    # the highest logit's proposal is the anchor at that (y, x, a)
    gen = AnchorGenerator([16])
    (anchors,) = gen.grid_anchors([(H, W)])
    logits = torch.full((A, H, W), -5.0)
    logits[a, y, x] = 5.0
    s, d = flatten_level(logits, torch.zeros(4 * A, H, W))
    out = rpn_proposals([s], [d], [anchors], (1000, 1000), DeltaXYWHCoder(), iou_threshold=0.99)
    # (y=1, x=2), ratio 2 at stride 16: centre (32, 16), w = 64 sqrt2, h = 128 sqrt2
    close(out[0], [0.0, 0.0, 32 + 32 * R2, 16 + 64 * R2, sig(5.0)])  # x1 = 32 - 45.25 clipped to 0
