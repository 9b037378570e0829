"""Region classification on COCO panoptic: top-1/top-5 mean per-class accuracy, things and stuff apart.

The benchmark of CLIPSelf, DeCLIP and SCD (``zero_shot.py``): every kept segment of every image is
classified among the 133 categories from its ground-truth box (RoIAlign on the dense map), its mask
(mask pooling) and, with ``crops``, its crop through the vanilla tower. A region counts as a top-k hit
when its category is among the k best-scoring classes. Accuracy is averaged over the categories that have
regions (not over regions), separately for thing and stuff categories, in percent.

The references round each per-class accuracy to fp16 before averaging (``.half()`` in ``macc``); ovdense
averages the exact values, which can differ from theirs by at most about 0.01 points.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..distributed import dist_info, identity_collate, shard_indices, sum_over_processes, unwrap_worker_errors
from ..fileio import write_atomic, write_json_atomic
from ..predictor import Segmenter
from ..text import DETECTION_TEMPLATES
from .panoptic import CocoPanoptic

__all__ = [
    "GROUPS",
    "KINDS",
    "RegionAccuracy",
    "RegionMetrics",
    "evaluate_regions",
    "regions_table",
    "write_region_results",
]

#: How a region's feature is made: RoIAlign on its box, pooling in its mask, or its crop.
KINDS = ("box", "mask", "crop")
GROUPS = ("things", "stuff")
TOP_K = 5
#: Crop enlargement of the benchmark: things 1.5x about the box centre, stuff the tight box.
THING_CROP_ENLARGE, STUFF_CROP_ENLARGE = 1.5, 1.0


def mean_class_accuracy(hits: torch.Tensor, counts: torch.Tensor, select: torch.Tensor) -> float:
    """Mean over the selected classes that have regions of hits / regions, in percent (NaN if none)."""
    keep = select & (counts > 0)
    if not bool(keep.any()):
        return math.nan
    return float((hits[keep].double() / counts[keep].double()).mean() * 100.0)


class RegionAccuracy:
    """Per-class counts of regions and top-1/top-5 hits for each kind, int64, all-reducible.

    Args:
        num_classes: C.
        kinds: which of :data:`KINDS` are scored.
    """

    def __init__(self, num_classes: int, kinds: tuple[str, ...] = ("box", "mask")):
        self.num_classes = num_classes
        self.kinds = tuple(kinds)
        # Per kind: C x 3 = (regions, top-1 hits, top-5 hits).
        self.counts = {k: torch.zeros(num_classes, 3, dtype=torch.int64) for k in self.kinds}

    def update(self, kind: str, labels: torch.Tensor, topk: torch.Tensor) -> None:
        """Add K regions: ``labels`` (K,) true classes, ``topk`` K x k predicted classes, best first."""
        labels = labels.long().cpu()
        topk = topk.long().cpu()
        top1 = (topk[:, 0] == labels).long()
        top5 = (topk[:, :TOP_K] == labels[:, None]).any(1).long()
        c = self.counts[kind]
        c[:, 0].index_add_(0, labels, torch.ones_like(labels))
        c[:, 1].index_add_(0, labels, top1)
        c[:, 2].index_add_(0, labels, top5)

    def all_reduce(self) -> None:
        """Sum the counts over the processes of a torchrun group (no-op otherwise)."""
        for kind in self.kinds:
            self.counts[kind] = sum_over_processes(self.counts[kind])

    def compute(self, is_thing: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
        """``{kind: {"things"|"stuff": {"top1", "top5"}}}`` in percent, per :func:`mean_class_accuracy`."""
        is_thing = is_thing.bool().cpu()
        out = {}
        for kind in self.kinds:
            c = self.counts[kind]
            out[kind] = {
                group: {
                    "top1": mean_class_accuracy(c[:, 1], c[:, 0], select),
                    "top5": mean_class_accuracy(c[:, 2], c[:, 0], select),
                }
                for group, select in (("things", is_thing), ("stuff", ~is_thing))
            }
        return out


@dataclass
class RegionMetrics:
    """Results of :func:`evaluate_regions` (accuracies in percent, NaN where a group has no regions).

    Attributes:
        results: ``{kind: {"things"|"stuff": {"top1": ..., "top5": ...}}}`` for the scored kinds.
        per_class: one dict per category: ``class``, ``category_id``, ``isthing``, ``regions`` and
            ``<kind>_top1`` / ``<kind>_top5`` accuracies (None without regions).
        num_images: images evaluated.
        num_regions: regions per group.
    """

    results: dict
    per_class: list[dict] = field(default_factory=list)
    num_images: int = 0
    num_regions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The ``metrics.json`` content: ``results`` with NaN written as null, rounded to 4 decimals."""

        def clean(v):
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, 4)

        return {kind: {g: {k: clean(v) for k, v in acc.items()} for g, acc in groups.items()}
                for kind, groups in self.results.items()}  # fmt: skip


def _region_record(sample: dict, k: int, seg, tops: dict[str, list[int]], label_to_cat: list[int]) -> dict:
    record = {
        "image_id": sample["image_id"],
        "segment_id": seg.segment_id,
        "category_id": seg.category_id,
        "isthing": bool(seg.isthing),
    }
    for kind, rows in tops.items():
        record[f"{kind}_top5"] = [label_to_cat[c] for c in rows[k]]
    return record


def _gather_records(records: list[tuple[int, int, dict]]) -> list[dict]:
    """All processes' records on every rank, in dataset order (image index, then segment order)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, records)
        records = [r for part in parts for r in part]
    return [r for _, _, r in sorted(records, key=lambda t: (t[0], t[1]))]


def evaluate_regions(
    segmenter: Segmenter,
    dataset: CocoPanoptic,
    image_size: int | None = None,
    crops: bool = False,
    limit: int | None = None,
    num_workers: int = 2,
    save_predictions: bool = False,
    progress: bool = True,
) -> tuple[RegionMetrics, list[dict] | None]:
    """Classify every kept segment of ``dataset`` by box, mask (and crop) with ``segmenter``'s method.

    Text: the dataset's category names with the 63 ViLD templates. Under torchrun each process takes every
    world_size-th image; per-class counts are all-reduced, so every rank returns the single-process result.

    Args:
        segmenter: the model and method (its head makes the dense map).
        dataset: a :class:`~ovdense.eval.panoptic.CocoPanoptic`.
        image_size: detection input side; default ``segmenter.default_region_size``.
        crops: also score the crop baseline (slower: one tower pass per region).
        limit: only the first ``limit`` images.
        num_workers: image-decoding DataLoader workers.
        save_predictions: also return one record per region (top-5 category ids per kind).

    Returns:
        ``(metrics, records)``; ``records`` is None unless ``save_predictions``.
    """
    from tqdm import tqdm

    info = dist_info()
    classes = dataset.class_names
    label_to_cat = [c["id"] for c in dataset.categories]
    kinds = ("box", "mask", "crop") if crops else ("box", "mask")
    segmenter.text_classifier(classes, DETECTION_TEMPLATES)  # once, before the image loop
    indices = shard_indices(len(dataset), limit, info)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=num_workers, collate_fn=identity_collate)
    acc = RegionAccuracy(len(classes), kinds)
    records: list[tuple[int, int, dict]] = []
    regions_seen = torch.zeros(2, dtype=torch.int64)  # things, stuff
    bar = tqdm(
        loader, total=len(indices), desc=f"regions {segmenter.preset.method}", unit="img",
        disable=(not progress or not info.is_main) or None,
    )  # fmt: skip
    for position, sample in zip(indices, unwrap_worker_errors(bar), strict=True):
        segments = sample["segments"]
        if not segments:
            continue
        segmenter.set_image(sample["image"])
        labels = torch.tensor([s.label for s in segments])
        boxes = np.array([s.box for s in segments], dtype=np.float64)
        results = {
            "box": segmenter.classify_regions(classes, boxes=boxes, image_size=image_size, top_k=TOP_K,
                                              templates=DETECTION_TEMPLATES),
            "mask": segmenter.classify_regions(classes, masks=sample["masks"], image_size=image_size,
                                               top_k=TOP_K, templates=DETECTION_TEMPLATES),
        }  # fmt: skip
        if crops:
            enlarge = [THING_CROP_ENLARGE if s.isthing else STUFF_CROP_ENLARGE for s in segments]
            results["crop"] = segmenter.classify_regions(
                classes, boxes=boxes, pooling="crop", crop_enlarge=enlarge, top_k=TOP_K, templates=DETECTION_TEMPLATES
            )
        for kind, result in results.items():
            acc.update(kind, labels, result.topk_indices)
        things = sum(1 for s in segments if s.isthing)
        regions_seen += torch.tensor([things, len(segments) - things])
        if save_predictions:
            tops = {kind: result.topk_indices.tolist() for kind, result in results.items()}
            for k, seg in enumerate(segments):
                records.append((position, k, _region_record(sample, k, seg, tops, label_to_cat)))
    acc.all_reduce()
    regions_seen = sum_over_processes(regions_seen)
    num_images = int(sum_over_processes(torch.tensor([len(indices)]))[0])
    is_thing = dataset.is_thing
    per_class = []
    for label, cat in enumerate(dataset.categories):
        row = {"class": cat["name"], "category_id": cat["id"], "isthing": bool(cat["isthing"])}
        row["regions"] = int(acc.counts[kinds[0]][label, 0])
        for kind in kinds:
            n, top1, top5 = acc.counts[kind][label].tolist()
            row[f"{kind}_top1"] = round(100.0 * top1 / n, 4) if n else None
            row[f"{kind}_top5"] = round(100.0 * top5 / n, 4) if n else None
        per_class.append(row)
    metrics = RegionMetrics(
        results=acc.compute(is_thing),
        per_class=per_class,
        num_images=num_images,
        num_regions={"things": int(regions_seen[0]), "stuff": int(regions_seen[1])},
    )
    return metrics, (_gather_records(records) if save_predictions else None)


def regions_table(metrics: RegionMetrics) -> str:
    """Markdown: one row per kind, top-1/top-5 for things and stuff."""

    def fmt(v: float) -> str:
        return "nan" if v != v else f"{v:.1f}"

    lines = [
        "| pooling | things top-1 | things top-5 | stuff top-1 | stuff top-5 |",
        "|---|---|---|---|---|",
    ]
    for kind, groups in metrics.results.items():
        t, s = groups["things"], groups["stuff"]
        lines.append(f"| {kind} | {fmt(t['top1'])} | {fmt(t['top5'])} | {fmt(s['top1'])} | {fmt(s['top5'])} |")
    n = metrics.num_regions
    lines.append(
        f"\n{metrics.num_images} images, {n.get('things', 0)} thing and {n.get('stuff', 0)} stuff regions; "
        "mean per-class accuracy in percent"
    )
    return "\n".join(lines)


def write_region_results(
    metrics: RegionMetrics, out_dir: str | Path, settings: dict, records: list[dict] | None = None
) -> list[Path]:
    """Write ``metrics.json`` (``{kind: {group: {top1, top5}}}``), ``regions.md``, ``per_class.csv``,
    ``settings.json`` and, with ``records``, ``regions.jsonl`` (one region per line) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / n for n in ("metrics.json", "regions.md", "per_class.csv", "settings.json")]
    write_json_atomic(metrics.to_dict(), paths[0])
    write_atomic(paths[1], lambda f: f.write((regions_table(metrics) + "\n").encode()))
    kinds = list(metrics.results)
    header = ["class", "category_id", "isthing", "regions"] + [f"{k}_{t}" for k in kinds for t in ("top1", "top5")]
    rows = [",".join(header)]
    for row in metrics.per_class:
        values = [json.dumps(row["class"]), str(row["category_id"]), str(int(row["isthing"])), str(row["regions"])]
        values += ["" if row[h] is None else f"{row[h]:.4f}" for h in header[4:]]
        rows.append(",".join(values))
    write_atomic(paths[2], lambda f: f.write(("\n".join(rows) + "\n").encode()))
    write_json_atomic({**settings, "num_images": metrics.num_images, "num_regions": metrics.num_regions}, paths[3])
    if records is not None:
        path = out_dir / "regions.jsonl"
        text = "".join(json.dumps(r) + "\n" for r in records)
        write_atomic(path, lambda f: f.write(text.encode()))
        paths.append(path)
    return paths
