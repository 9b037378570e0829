"""Run a :class:`~ovdense.detection.detector.Detector` over a COCO-format benchmark (OV-COCO, COCO) or OV-LVIS and
score it.

Images are decoded by DataLoader workers while the model runs. Under torchrun each process detects every
world_size-th image and the detections (for OV-LVIS with their mask RLEs) are gathered before one ``COCOeval`` /
``LVISEval``, so the numbers equal one process's.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from ..distributed import dist_info, identity_collate, shard_indices, unwrap_worker_errors
from ..errors import OvdenseError
from .detection import DetectionMetrics, OVCategories, detections_to_coco, evaluate_ov_coco

__all__ = ["evaluate_detector", "image_path"]


def image_path(image_dir: Path, entry: dict) -> Path:
    """Where an annotation file's image lies: ``image_dir / file_name``; for LVIS files, which give only
    ``coco_url`` (``http://images.cocodataset.org/<train2017|val2017>/<file>``: LVIS v1 val holds images of both
    COCO folders), that folder beside ``image_dir``, as mmdet's ``LVISV1Dataset`` resolves it."""
    if entry.get("file_name"):
        return image_dir / entry["file_name"]
    parts = [p for p in str(entry.get("coco_url", "")).split("/") if p]
    if not parts:
        raise OvdenseError(f"image {entry.get('id')} of the annotation file has no file_name or coco_url")
    if len(parts) >= 2 and parts[-2] in ("train2017", "val2017"):
        return image_dir.parent / parts[-2] / parts[-1]
    return image_dir / parts[-1]


class _Images(Dataset):
    def __init__(self, entries: list[dict], image_dir: Path):
        self.entries, self.image_dir = entries, image_dir

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        from ..images import decode_image

        entry = self.entries[i]
        path = image_path(self.image_dir, entry)
        return {"id": entry["id"], "path": path, "image": decode_image(path)}


def evaluate_detector(
    detector,
    coco_gt,
    categories: OVCategories,
    image_dir: str | Path,
    limit: int | None = None,
    num_workers: int = 2,
    progress: bool = True,
    box_ap: bool = True,
) -> tuple[DetectionMetrics, list[dict]]:
    """Detect the benchmark's classes (``categories.names``, one name each) in every ground-truth image and score.

    OV-LVIS (``categories`` an :class:`~ovdense.eval.lvis.LVISCategories`, ``coco_gt`` from
    :func:`~ovdense.eval.lvis.load_lvis_annotations`): the detector also predicts masks, the names are LVIS's raw
    names (``aerosol_can``: an F-ViT class-embedding file is keyed by them; the text tower's prompts replace ``_``),
    and the score is mask AP with LVISEval, plus its box AP (``metrics.box``) unless ``box_ap`` is False.

    Returns:
        ``(metrics, detections)``: :class:`DetectionMetrics` (OV-LVIS: :class:`~ovdense.eval.lvis.LVISMetrics`),
        identical on every rank, and the COCO / LVIS results dicts of every image (original pixels, ``[x, y, w, h]``;
        OV-LVIS with ``segmentation`` RLEs), gathered from all ranks in image order.
    """
    from .lvis import LVISCategories

    lvis = isinstance(categories, LVISCategories)
    import torch.distributed as dist
    from tqdm import tqdm

    info = dist_info()
    image_dir = Path(image_dir)
    entries = list(coco_gt.dataset["images"])
    total = len(entries) if limit is None else min(limit, len(entries))
    indices = shard_indices(len(entries), limit, info)
    paths = [image_path(image_dir, entries[i]) for i in range(total)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise OvdenseError(f"{len(missing)} of {total} images not found, first {missing[0]}")
    names = list(categories.names)
    detector.class_embeddings(names)  # once, before the image loop
    loader = DataLoader(
        _Images([entries[i] for i in indices], image_dir),
        batch_size=1,
        num_workers=num_workers,
        collate_fn=identity_collate,
        persistent_workers=False,
    )
    hidden = (not progress or not info.is_main) or None
    bar = tqdm(loader, total=len(indices), desc="detect", unit="img", disable=hidden)
    per_image: dict[int, list[dict]] = {}
    for sample in unwrap_worker_errors(bar):
        if lvis:
            from .lvis import detections_to_lvis

            result = detector.detect(names, image=sample["image"], masks=True)  # mask AP
            per_image[sample["id"]] = detections_to_lvis(sample["id"], result, categories)
            continue
        result = detector.detect(names, image=sample["image"], masks=False)  # box AP: masks are not scored
        per_image[sample["id"]] = detections_to_coco(
            sample["id"], result.boxes, result.scores, result.labels, categories
        )
    if info.world_size > 1:
        gathered: list[dict] = [{} for _ in range(info.world_size)]
        dist.all_gather_object(gathered, per_image)
        per_image = {k: v for part in gathered for k, v in part.items()}
    order = [entries[i]["id"] for i in range(total)]
    detections = [d for image_id in order for d in per_image.get(image_id, [])]
    if lvis:
        from .lvis import evaluate_ov_lvis

        metrics = evaluate_ov_lvis(coco_gt, categories, detections, "segm", image_ids=order)
        if box_ap:
            metrics.box = evaluate_ov_lvis(coco_gt, categories, detections, "bbox", image_ids=order)
        return metrics, detections
    metrics = evaluate_ov_coco(coco_gt, categories, detections, image_ids=order)
    return metrics, detections
