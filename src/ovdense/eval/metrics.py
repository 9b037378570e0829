"""mmseg's ``IoUMetric`` without mmseg: dataset-level sums of intersection and union, streamed.

Per image, pixels whose label is the ignore index are dropped, then per class c:
intersect_c = #(pred == label == c), pred_c = #(pred == c), label_c = #(label == c), union_c =
pred_c + label_c - intersect_c; values outside 0..C-1 are not counted (as ``torch.histc`` in mmseg).
Over the dataset the four are summed; IoU_c = I_c / U_c, Acc_c = I_c / label_c (NaN where the
denominator is 0), mIoU = nanmean(IoU) * 100, mAcc = nanmean(Acc) * 100, aAcc = ΣI / Σlabel * 100.
Sums are int64 (mmseg sums float32 histograms, which can round beyond 2^24 pixels per class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed import sum_over_processes


@dataclass
class SegMetrics:
    """Results in percent. ``iou``/``acc`` are per class (NaN: class absent from labels and predictions)."""

    miou: float
    macc: float
    aacc: float
    iou: list[float]
    acc: list[float]
    class_names: list[str]
    num_images: int

    def to_dict(self) -> dict:
        def clean(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

        return {
            "mIoU": clean(self.miou),
            "mAcc": clean(self.macc),
            "aAcc": clean(self.aacc),
            "num_images": self.num_images,
            "per_class": [
                {"class": n, "IoU": clean(i), "Acc": clean(a)}
                for n, i, a in zip(self.class_names, self.iou, self.acc, strict=True)
            ],
        }


class IoUAccumulator:
    """Streams per-class pixel counts: memory is O(num_classes), never the predictions.

    Args:
        num_classes: C.
        ignore_index: label value left out (255 in every benchmark here).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        # rows: intersect, pred, label
        self.counts = torch.zeros(3, num_classes, dtype=torch.int64)
        self.num_images = 0

    def update(self, pred, label) -> None:
        """Add one image: ``pred`` and ``label`` H x W integer arrays/tensors of the same size."""
        pred, label = (torch.as_tensor(np.asarray(t)) if not torch.is_tensor(t) else t for t in (pred, label))
        pred, label = pred.long().flatten().cpu(), label.long().flatten().cpu()
        if pred.shape != label.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, label {label.numel()}")
        keep = label != self.ignore_index
        pred, label = pred[keep], label[keep]
        c = self.num_classes
        both = pred[pred == label]
        for row, values in enumerate((both, pred, label)):
            values = values[(values >= 0) & (values < c)]
            self.counts[row] += torch.bincount(values, minlength=c)
        self.num_images += 1

    def merge(self, other: IoUAccumulator) -> None:
        """Add another accumulator's sums (e.g. from another shard)."""
        if other.num_classes != self.num_classes:
            raise ValueError("cannot merge accumulators of different class counts")
        self.counts += other.counts
        self.num_images += other.num_images

    def all_reduce(self) -> None:
        """Sum the counts over the ``torch.distributed`` group (in place; no-op when not initialised)."""
        packed = sum_over_processes(torch.cat([self.counts.flatten(), torch.tensor([self.num_images])]))
        self.counts = packed[:-1].view(3, self.num_classes).clone()
        self.num_images = int(packed[-1])

    def compute(self, class_names: list[str] | None = None) -> SegMetrics:
        intersect, pred, label = (self.counts[i].double() for i in range(3))
        union = pred + label - intersect
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = (intersect / union).numpy() * 100  # 0/0 -> NaN
            acc = (intersect / label).numpy() * 100
        total = float(label.sum())
        aacc = float(intersect.sum()) / total * 100 if total else float("nan")
        names = class_names or [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        nanmean = lambda v: float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan")  # noqa: E731
        return SegMetrics(
            miou=nanmean(iou),
            macc=nanmean(acc),
            aacc=aacc,
            iou=[float(v) for v in iou],
            acc=[float(v) for v in acc],
            class_names=list(names),
            num_images=self.num_images,
        )
