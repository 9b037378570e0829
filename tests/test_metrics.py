"""IoUAccumulator against a hand-computed confusion matrix and mmseg's formulas."""

import math

import numpy as np
import torch

from ovdense.eval.metrics import IoUAccumulator


def confusion(preds, labels, c, ignore=255):
    m = np.zeros((c, c), np.int64)  # rows: label, cols: pred
    for p, l in zip(preds, labels, strict=True):
        keep = l != ignore
        for a, b in zip(l[keep].ravel(), p[keep].ravel(), strict=True):
            if a < c and b < c:
                m[a, b] += 1
            # out-of-range values count nowhere in mmseg's histc
    return m


def test_matches_confusion_matrix_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    c = 5  # class 4 never appears in labels nor predictions -> NaN, excluded from the means
    labels = [rng.integers(0, 4, (7, 9)) for _ in range(4)]
    preds = [rng.integers(0, 4, (7, 9)) for _ in range(4)]
    for l in labels:
        l[0, :3] = 255  # ignore
    preds[1][2, 2] = 3
    labels[2][1, 1] = 3
    acc = IoUAccumulator(c)
    for p, l in zip(preds, labels, strict=True):
        acc.update(p, l)
    m = confusion(preds, labels, c)
    inter = np.diag(m).astype(float)
    union = m.sum(0) + m.sum(1) - np.diag(m)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union * 100
        per_acc = inter / m.sum(1) * 100
    r = acc.compute()
    assert math.isnan(r.iou[4]) and math.isnan(r.acc[4])
    np.testing.assert_allclose(r.iou[:4], iou[:4])
    assert math.isclose(r.miou, np.nanmean(iou))
    assert math.isclose(r.macc, np.nanmean(per_acc))
    assert math.isclose(r.aacc, inter.sum() / m.sum() * 100)
    d = r.to_dict()
    assert d["per_class"][4]["IoU"] is None and d["num_images"] == 4


def test_class_predicted_but_absent_from_labels_has_iou_zero():
    acc = IoUAccumulator(3)
    acc.update(np.array([[0, 2]]), np.array([[0, 0]]))
    r = acc.compute()
    assert r.iou[2] == 0.0 and math.isnan(r.acc[2])  # union 1, label 0
    assert r.iou[0] == 50.0


def test_streamed_equals_all_at_once_and_merge():
    rng = np.random.default_rng(1)
    labels = [rng.integers(0, 6, (5, 8)) for _ in range(6)]
    preds = [rng.integers(0, 6, (5, 8)) for _ in range(6)]
    streamed, a, b, whole = IoUAccumulator(6), IoUAccumulator(6), IoUAccumulator(6), IoUAccumulator(6)
    for i, (p, l) in enumerate(zip(preds, labels, strict=True)):
        streamed.update(torch.from_numpy(p), l)
        (a if i % 2 else b).update(p, l)
    whole.update(np.concatenate(preds), np.concatenate(labels))
    a.merge(b)
    assert torch.equal(streamed.counts, whole.counts) and torch.equal(a.counts, whole.counts)
    assert a.num_images == 6
