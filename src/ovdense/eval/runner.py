"""Evaluate a :class:`~ovdense.Segmenter` on a benchmark: streamed mIoU, sharded under torchrun."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, Subset

from ..classes import display_names
from ..distributed import dist_info, identity_collate, shard_indices, unwrap_worker_errors
from ..errors import OvdenseError
from ..fileio import write_atomic, write_json_atomic
from ..predictor import Segmenter
from .datasets import SegDataset
from .metrics import IoUAccumulator, SegMetrics


def evaluate(
    segmenter: Segmenter,
    dataset: SegDataset,
    limit: int | None = None,
    num_workers: int = 2,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> SegMetrics:
    """mIoU of ``segmenter`` on ``dataset`` with the class names of the segmenter's method.

    Images are decoded by ``num_workers`` DataLoader workers while the model runs. Under torchrun each
    process takes every world_size-th image and the per-class sums are all-reduced, so the result equals
    a single process's. With ``save_dir``, each image's label PNG (dataset class indices, i.e. after
    ``reduce_zero_label``), its ground truth's (the dataset's values exactly, ignore value included) and the
    overlay are written there: palette PNGs for up to 256 classes, 16-bit greyscale PNGs (pixel = class index)
    for more (ADE-847, PC-459), one format for both files of every image.

    Returns:
        :class:`SegMetrics` over the whole (limited) dataset, identical on every rank.
    """
    from tqdm import tqdm

    from ..viz import prediction_and_truth, save_image_atomic, save_label_png

    info = dist_info()
    spec = dataset.spec
    classes = dataset.class_names(segmenter.preset.class_style)
    if len(classes) != spec.num_classes:
        raise OvdenseError(f"{spec.name}: class file has {len(classes)} classes, dataset has {spec.num_classes}")
    segmenter.text_classifier(classes)  # once, before the image loop
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
    indices = shard_indices(len(dataset), limit, info)
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=1,
        num_workers=num_workers,
        collate_fn=identity_collate,
        persistent_workers=False,
    )
    acc = IoUAccumulator(spec.num_classes, ignore_index=dataset.ignore_index)  # 255, or ADE-847/PC-459's choice
    bar = tqdm(
        loader, total=len(indices), desc=f"{spec.title} {segmenter.preset.method}", unit="img",
        disable=(not progress or not info.is_main) or None,
    )  # fmt: skip
    from ..masks import as_region_map, read_region_map, region_map_for

    for sample in unwrap_worker_errors(bar):
        masks = None
        if segmenter.head.uses_masks and segmenter.masks_dir is not None:  # CorrCLIP's per-benchmark folders
            path = region_map_for(segmenter.masks_dir, sample["image_path"], spec.name)
            masks = as_region_map(read_region_map(path), sample["image"].shape[:2], f"mask file {path}")
        segmenter.set_image(sample["image"], masks=masks)
        result = segmenter.predict(classes)
        label = sample["label"]
        if result.labels.shape != label.shape:
            raise OvdenseError(f"{sample['image_path']}: label size {label.shape} differs from the image")
        acc.update(result.labels, label)
        if save_dir is not None:
            background = spec.background_class
            # num_classes picks the format from the benchmark, not from the values one image happens to hold.
            save_label_png(result.labels, save_dir / f"{sample['name']}.png", num_classes=spec.num_classes)
            save_label_png(label, save_dir / f"{sample['name']}_gt.png", num_classes=spec.num_classes)
            # Drawn as not labelled: the value no class has (65535 in ADE-847 / PC-459, where 255 is a class).
            unlabelled = 255 if spec.unlabelled is None else spec.unlabelled
            picture = prediction_and_truth(
                result.image, result.labels, label, display_names(classes, background),
                background=background, ignore_index=unlabelled,
            )  # fmt: skip
            save_image_atomic(picture, save_dir / f"{sample['name']}_overlay.png")
    acc.all_reduce()
    return acc.compute(display_names(classes, spec.background_class))


def metrics_table(metrics: SegMetrics) -> str:
    """Per-class markdown table (IoU and Acc in percent), then the summary row."""

    def fmt(v: float) -> str:
        return "nan" if v != v else f"{v:.2f}"

    lines = ["| class | IoU | Acc |", "|---|---|---|"]
    for name, iou, acc in zip(metrics.class_names, metrics.iou, metrics.acc, strict=True):
        lines.append(f"| {name} | {fmt(iou)} | {fmt(acc)} |")
    lines.append(f"| **mean** | **{fmt(metrics.miou)}** | **{fmt(metrics.macc)}** |")
    lines.append(f"\naAcc {fmt(metrics.aacc)}, mIoU {fmt(metrics.miou)}, mAcc {fmt(metrics.macc)}")
    return "\n".join(lines)


def write_results(metrics: SegMetrics, out_dir: str | Path, stem: str, settings: dict) -> list[Path]:
    """Write ``stem.md``, ``stem.csv`` and ``stem.json`` (``mIoU`` in percent, resolved settings)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, csv, js = out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    table = metrics_table(metrics)
    write_atomic(md, lambda f: f.write((table + "\n").encode()))
    rows = ["class,IoU,Acc"] + [
        f'"{n}",{i:.4f},{a:.4f}' for n, i, a in zip(metrics.class_names, metrics.iou, metrics.acc, strict=True)
    ]
    write_atomic(csv, lambda f: f.write(("\n".join(rows) + "\n").encode()))
    write_json_atomic({**metrics.to_dict(), "settings": settings}, js)
    return [md, csv, js]
