"""OV-LVIS evaluation: mask AP_r (and AP, AP_c, AP_f, box AP) with the official ``lvis`` package (``LVISEval``), as
CLIPSelf's F-ViT evaluates its OV-LVIS detectors.

The protocol (CLIPSelf ``F-ViT/datasets/lvls_ov.py``, ``LVISV1DatasetOV.evaluate(metric='segm', classwise=True)``
on mmdet 2.28.1's ``LVISV1Dataset``, config ``evaluation = dict(metric=['segm'])``):

- Detections become LVIS results as mmdet's ``CocoDataset._segm2json`` writes them (:func:`detections_to_lvis`):
  ``bbox = [x1, y1, x2 - x1, y2 - y1]``, ``score``, ``category_id``, and ``segmentation``, the mask's compressed RLE
  (``pycocotools.mask.encode`` of the H x W uint8 mask, ``counts`` as str); the mask score is the box score.
- ``LVISResults(lvis_gt, results)`` keeps the 300 best-scoring results per image (``max_dets=300``). Because every
  result has a ``bbox``, its ``area`` is the box's ``w * h`` (also for mask AP: that is the area LVISEval's area
  ranges and its ignore rule for unmatched detections see; the ground truth keeps the file's mask areas).
- ``LVISEval(lvis_gt, lvis_dt, 'segm')``: IoU 0.50:0.05:0.95, 101 recall points, federated matching (a detection of a
  class that is neither in the image's ground truth nor in its ``neg_category_ids`` is not scored; an unmatched one
  of a ``not_exhaustive_category_ids`` class is ignored). ``AP`` ... ``APl``, and ``APr`` / ``APc`` / ``APf``: the
  mean over the rare / common / frequent classes (the categories' ``frequency``), all in ``get_results()``.
  mmdet sets ``params.imgIds``, an attribute LVISEval never reads, so every ground-truth image is evaluated; we do
  the same unless ``image_ids`` is given (``eval-det --limit``).
- CLIPSelf adds a per-class mask AP50 (``precision[IoU 0.5, :, k, area all]`` over the valid recall points) and its
  ``np.nanmean`` over the seen (866 common + frequent), unseen (337 rare) and all classes: ``base_mask_ap50``,
  ``novel_mask_ap50``, ``all_mask_ap50``; here ``base_ap50`` / ``novel_ap50`` / ``all_ap50`` of any IoU type.

Every AP here is in percent (0-100); LVISEval's -1 (undefined) becomes NaN.

The ``lvis`` package (0.5.3, the latest release) is imported on first use. It has three side effects this module
contains: ``lvis/__init__.py`` calls ``logging.basicConfig`` (the root logger's handlers and level are restored right
after the import); ``LVISEval.accumulate`` uses ``np.float``, an alias of ``float`` removed in NumPy 1.24
(:func:`numpy_float_alias` provides it only while LVIS code runs); and it logs through the ``lvis`` loggers (with the
deprecated ``Logger.warn``) and prints its summary (``print_results``): both go into :attr:`LVISMetrics.log`, never to
stdout, stderr or the root logger.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..fileio import write_atomic, write_json_atomic
from .detection import (
    OVCategories,
    annotation_error,
    check_detection,
    check_instances,
    detections_to_coco,
    is_json_int,
    is_json_number,
    nanmean,
    read_annotation_json,
    read_split,
    short_repr,
)

__all__ = [
    "LVISCategories",
    "LVISClassAP",
    "LVISMetrics",
    "LVIS_V1_NUM_CLASSES",
    "detections_to_lvis",
    "evaluate_ov_lvis",
    "load_lvis_annotations",
    "lvis_table",
    "numpy_float_alias",
    "write_lvis_report",
]

BASE_FILE = "ov_lvis_base.txt"
NOVEL_FILE = "ov_lvis_novel.txt"
LVIS_V1_NUM_CLASSES = 1203
#: LVISResults' (and so mmdet's) detections per image.
MAX_DETS = 300
FREQUENCIES = ("r", "c", "f")
#: LVISEval's summary keys (``get_results()``), in its order; ``AR*`` carry ``@max_dets``.
_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
_HINT = "give LVIS v1's lvis_v1_val.json"


# -- the lvis package --------------------------------------------------------------------------------------------


def _import_lvis():
    """``(LVIS, LVISResults, LVISEval)``, importing ``lvis`` without keeping its ``logging.basicConfig``."""
    if "lvis" not in sys.modules:
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            import lvis  # noqa: F401  (lvis/__init__.py adds a stderr handler to the root logger: undone below)
        except ImportError as err:
            raise OvdenseError(
                f"OV-LVIS evaluation needs the lvis package ({first_line(err)}): pip install 'ovdense[lvis]'"
            ) from None
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
    from lvis import LVIS, LVISEval, LVISResults

    return LVIS, LVISResults, LVISEval


@contextlib.contextmanager
def numpy_float_alias():
    """Provide ``numpy.float`` (= ``float``) while the block runs, and remove it after.

    lvis 0.5.3 (the latest release, 2020) calls ``np.cumsum(...).astype(dtype=np.float)`` in
    ``LVISEval.accumulate``; NumPy 1.24 removed that alias, so the call raises AttributeError on current NumPy. The
    alias is set only when NumPy lacks it and is deleted on exit, so nothing else sees it (not thread-safe: do not
    run other code that probes ``numpy.float`` concurrently).
    """
    added = "float" not in vars(np)
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            vars(np).pop("float", None)


@contextlib.contextmanager
def _lvis_output(log: io.StringIO):
    """Route the lvis loggers and prints into ``log``; silence ``Logger.warn``'s DeprecationWarning."""
    logger = logging.getLogger("lvis")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers[:] = saved[2]


def _lvis_from_dataset(dataset: dict, log: io.StringIO | None = None):
    """An ``lvis.LVIS`` over an in-memory dataset (``LVIS(path)`` would read and parse the file again)."""
    LVIS, _, _ = _import_lvis()
    with _lvis_output(log if log is not None else io.StringIO()):
        gt = LVIS.__new__(LVIS)
        gt.logger = logging.getLogger("lvis.lvis")
        gt.dataset = dataset
        gt._create_index()
    return gt


# -- ground truth ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LVISCategories(OVCategories):
    """OV-LVIS's 1203 categories in category-id order (= LVIS v1's ``LVISV1Dataset.CLASSES`` order, the model's
    label order); ``names`` are LVIS's raw names (``aerosol_can``), ``novel`` = frequency ``r``.

    Attributes:
        frequency: ``"r"``, ``"c"`` or ``"f"`` per class (LVIS's training-image-count bins: rare, common, frequent).
    """

    frequency: tuple[str, ...] = ()

    def __post_init__(self):
        super().__post_init__()
        if len(self.frequency) != len(self.ids):
            raise InvalidArgumentError(f"LVISCategories: {len(self.ids)} ids, {len(self.frequency)} frequencies")


def _validate_lvis(dataset, path) -> None:
    """What ``lvis.LVIS`` / ``LVISEval`` read, checked so that a wrong file is one line instead of a traceback."""
    bad = annotation_error(path)
    cats = dataset.get("categories") if isinstance(dataset, dict) else None
    for cat in cats if isinstance(cats, list) else []:  # first: a COCO file given for LVIS is named as such
        if isinstance(cat, dict) and cat.get("frequency") not in FREQUENCIES:
            raise bad(f"category {cat.get('id')} ({cat.get('name')!r}) has frequency "
                      f"{short_repr(cat.get('frequency'))}, not 'r', 'c' or 'f'")  # fmt: skip
    images, _, annotations = check_instances(dataset, path, "an LVIS annotation file", ("area", "segmentation"))
    for img in images.values():
        name = f"image {img['id']}"
        if not any(isinstance(img.get(k), str) and img[k] for k in ("coco_url", "file_name")):
            raise bad(f"{name} has no 'coco_url' (or 'file_name') naming its COCO 2017 image")
        if not all(is_json_int(img.get(k)) and img[k] > 0 for k in ("height", "width")):
            raise bad(f"{name} needs positive integer 'height' and 'width'")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):  # LVISEval's federated matching reads both
            if not isinstance(img.get(key), list):
                raise bad(f"{name} has no {key!r} list (LVIS's federated annotation); not an LVIS file")
    for ann in annotations:
        name = f"annotation {ann['id']}"
        if min(ann["bbox"][2:]) < 0:
            raise bad(f"{name} has bbox {short_repr(ann['bbox'])}, not 4 numbers [x, y, width >= 0, height >= 0]")
        if not is_json_number(ann["area"]):
            raise bad(f"{name} has area {short_repr(ann['area'])}, not a number")
        seg = ann["segmentation"]
        polygons = isinstance(seg, list) and seg and all(isinstance(p, list) and p for p in seg)
        img = images[ann["image_id"]]
        rle = isinstance(seg, dict) and isinstance(seg.get("counts"), (str, list)) and seg.get("size") == [
            img["height"], img["width"]
        ]  # fmt: skip
        if not (polygons or rle):
            raise bad(f"{name} has segmentation {short_repr(seg)}: give polygons (lists of x, y coordinates) or an "
                      "RLE {'size': [height, width] of its image, 'counts'}")  # fmt: skip


def _lvis_categories(cats: list[dict], path) -> LVISCategories:
    """The file's categories checked against OV-LVIS's split files: LVIS v1's 1203 names, ``r`` exactly for the 337
    novel ones, and each split in the files' (LVIS v1 category-id) order."""
    bad = annotation_error(path)
    base, novel = read_split(BASE_FILE), read_split(NOVEL_FILE)
    where = {n: BASE_FILE for n in base}
    where.update({n: NOVEL_FILE for n in novel})
    if len(where) != LVIS_V1_NUM_CLASSES:  # a packaging error, not the user's
        raise AssertionError(f"{BASE_FILE} + {NOVEL_FILE}: {len(where)} distinct names, not {LVIS_V1_NUM_CLASSES}")
    cats = sorted(cats, key=lambda c: c["id"])
    if len(cats) != LVIS_V1_NUM_CLASSES:
        raise bad(f"has {len(cats)} categories; LVIS v1 has {LVIS_V1_NUM_CLASSES} (LVIS v0.5 has 1230): {_HINT}")
    seen: dict[str, int] = {}
    for cat in cats:
        cid, name, freq = cat["id"], cat["name"], cat["frequency"]
        if name not in where:
            raise bad(f"category {cid} is named {name!r}, which is not an LVIS v1 class ({BASE_FILE} / "
                      f"{NOVEL_FILE}): {_HINT}")  # fmt: skip
        if name in seen:
            raise bad(f"categories {seen[name]} and {cid} are both named {name!r}")
        seen[name] = cid
        if (freq == "r") != (where[name] == NOVEL_FILE):
            split = "novel, rare" if where[name] == NOVEL_FILE else "base, common or frequent"
            raise bad(f"category {cid} ({name!r}) has frequency {freq!r}, but OV-LVIS lists it in {where[name]} "
                      f"({split}): {_HINT}")  # fmt: skip
    for split, names in ((BASE_FILE, base), (NOVEL_FILE, novel)):
        in_file = [c["name"] for c in cats if where[c["name"]] == split]
        for k, (got, want) in enumerate(zip(in_file, names, strict=True)):
            if got != want:
                raise bad(f"the categories are not in LVIS v1's id order: the {k + 1}th of {split} by id is {got!r}, "
                          f"expected {want!r}: {_HINT}")  # fmt: skip
    return LVISCategories(
        ids=tuple(c["id"] for c in cats),
        names=tuple(c["name"] for c in cats),
        novel=tuple(c["frequency"] == "r" for c in cats),
        frequency=tuple(c["frequency"] for c in cats),
    )


def load_lvis_annotations(path):
    """Read an LVIS v1 annotation file (``lvis_v1_val.json``) for OV-LVIS.

    Every image and annotation is kept (mmdet's ``LVISV1Dataset`` in test mode: all 19,809 val images), and the
    1203 categories are checked against OV-LVIS's class split (``classes/ov_lvis_base.txt``, 866 = LVIS's common and
    frequent classes, CLIPSelf's ``lvis_v1_seen_classes.json``; ``ov_lvis_novel.txt``, 337 = the rare ones).

    Returns:
        ``(lvis_gt, categories)``: an ``lvis.LVIS`` built in memory and the :class:`LVISCategories` in category-id
        order (the detector's label order).

    Raises:
        OvdenseError: one line naming the file: unreadable, not JSON, not the LVIS schema (the first image without an
            id, a coco_url / file_name, height / width or the federated ``neg_category_ids`` /
            ``not_exhaustive_category_ids`` lists; a category without id, name or an r/c/f frequency; an annotation
            without id, image_id, category_id, bbox, area or segmentation, or with unknown ids), not LVIS v1's 1203
            classes, or the first category whose name, frequency or id order differs from the split files; or the
            ``lvis`` package is not installed.
    """
    path = Path(path)
    dataset = read_annotation_json(path)
    _validate_lvis(dataset, path)
    categories = _lvis_categories(dataset["categories"], path)
    return _lvis_from_dataset(dataset), categories


# -- results -----------------------------------------------------------------------------------------------------


def detections_to_lvis(image_id: int, result, categories: OVCategories) -> list[dict]:
    """One image's :class:`~ovdense.detection.result.DetectionResult` as LVIS results dicts, as mmdet 2.28.1's
    ``CocoDataset._segm2json`` writes them (and ``encode_mask_results`` encodes the masks).

    Each dict: ``image_id``, ``bbox`` ``[x1, y1, x2 - x1, y2 - y1]``, ``score``, ``category_id`` (exactly as
    :func:`~ovdense.eval.detection.detections_to_coco`: grouped by label, stable), then, when the result has masks,
    ``segmentation``: ``{"size": [H, W], "counts": str}``, the compressed RLE of the mask
    (:func:`~ovdense.detection.result.mask_to_rle`). Without masks the dicts are box results (box AP only).

    Args:
        image_id: the annotation file's image id.
        result: the detector's result for the image, with ``class_names`` = ``categories.names`` (labels index them).
        categories: the evaluated categories.

    Raises:
        InvalidArgumentError: the result's classes are not the categories (count or names, compared without case and
            with ``_`` as a space).
    """
    from ..detection.result import mask_to_rle

    def key(name: str) -> str:
        return " ".join(str(name).replace("_", " ").lower().split())

    names = list(getattr(result, "class_names", []))
    if len(names) != len(categories.names) or any(
        key(a) != key(b) for a, b in zip(names, categories.names, strict=True)
    ):
        diff = next(
            (i for i, (a, b) in enumerate(zip(names, categories.names, strict=False)) if key(a) != key(b)), None
        )
        where = f"class {diff} is {names[diff]!r}, not {categories.names[diff]!r}" if diff is not None else ""
        raise InvalidArgumentError(
            f"detections_to_lvis: the result has {len(names)} classes, the benchmark {len(categories.names)}; "
            f"detect the categories' names in their order{': ' + where if where else ''}"
        )
    out = detections_to_coco(image_id, result.boxes, result.scores, result.labels, categories)
    if result.masks is not None:
        order = np.argsort(np.asarray(result.labels), kind="stable")  # detections_to_coco's order
        for entry, i in zip(out, order, strict=True):
            entry["segmentation"] = mask_to_rle(result.masks[i])
    return out


def _check_lvis_detections(lvis_gt, categories: OVCategories, detections, iou_type: str) -> list[dict]:
    """Copies of the detections (LVISResults writes into them and keeps them), checked."""
    images = lvis_gt.imgs
    evaluated = set(categories.ids)
    kept: list[dict] = []
    for i, det in enumerate(detections):
        bbox, score = check_detection(i, det, evaluated, ("segmentation",) if iou_type == "segm" else ())
        image_id = det["image_id"]
        img = (
            images.get(int(image_id))
            if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool)
            else None
        )
        if img is None:
            raise InvalidArgumentError(
                f"detections[{i}] has image_id {short_repr(det['image_id'])}, which is not in the annotation file"
            )
        entry = {"image_id": int(image_id), "category_id": det["category_id"], "bbox": bbox, "score": score}
        if iou_type == "segm":
            seg = det["segmentation"]
            size = [img["height"], img["width"]]
            if not isinstance(seg, dict) or not isinstance(seg.get("counts"), (str, bytes)) or seg.get("size") != size:
                raise InvalidArgumentError(
                    f"detections[{i}] has segmentation {short_repr(seg)}; give a compressed RLE {{'size': {size}, "
                    "'counts': str}} of the image's size (detections_to_lvis)"
                )
            entry["segmentation"] = {"size": size, "counts": seg["counts"]}
        kept.append(entry)
    return kept


@dataclass(frozen=True)
class LVISClassAP:
    """One class's LVIS result (percent; NaN where the class has no ground truth in the evaluated images).

    Attributes:
        name: the LVIS name; category_id: its id; frequency: ``r`` / ``c`` / ``f``; split: ``novel`` (= ``r``) or
        ``base``; ap: AP over IoU 0.50:0.95; ap50: AP at IoU 0.5 (CLIPSelf's per-class number); num_gt: its ground
        truth instances in the evaluated images.
    """

    name: str
    category_id: int
    frequency: str
    split: str
    ap: float
    ap50: float
    num_gt: int


def _clean(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


@dataclass
class LVISMetrics:
    """One LVIS evaluation (``iou_type`` ``segm``: mask AP, ``bbox``: box AP); every AP in percent.

    Attributes:
        iou_type: ``"segm"`` or ``"bbox"``.
        summary: LVISEval's results: ``AP``, ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl``, ``APr``, ``APc``,
            ``APf``, ``AR@300``, ``ARs@300``, ``ARm@300``, ``ARl@300`` (NaN where undefined).
        novel_ap50, base_ap50, all_ap50: CLIPSelf's extra numbers: ``np.nanmean`` of the per-class AP50 over the 337
            rare, the 866 common and frequent, and all classes (``novel_mask_ap50`` ... for ``segm``).
        per_class: one :class:`LVISClassAP` per category, in :class:`LVISCategories` order.
        num_images: ground-truth images evaluated; num_detections: detections given (before LVISResults keeps
            ``max_dets`` per image); max_dets: that limit.
        box: the box AP of the same detections (``bbox`` LVISMetrics), when evaluated alongside mask AP.
        log: what the lvis package logged and printed (its results table included).
    """

    iou_type: str
    summary: dict[str, float]
    novel_ap50: float
    base_ap50: float
    all_ap50: float
    per_class: list[LVISClassAP]
    num_images: int
    num_detections: int
    max_dets: int = MAX_DETS
    box: LVISMetrics | None = None
    log: str = field(default="", repr=False)

    def __getitem__(self, key: str) -> float:
        """``metrics["APr"]``: a summary value."""
        return self.summary[key]

    def to_dict(self, per_class: bool = True) -> dict:
        """JSON-ready: APs rounded to 4 decimals, NaN as ``null``; ``box`` nested without its per-class rows (they
        are in each row as ``box_AP`` / ``box_AP50``)."""
        out = {
            "benchmark": "ov-lvis",
            "iou_type": self.iou_type,
            **{k: _clean(v) for k, v in self.summary.items()},
            "novel_ap50": _clean(self.novel_ap50),
            "base_ap50": _clean(self.base_ap50),
            "all_ap50": _clean(self.all_ap50),
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "max_dets": self.max_dets,
        }
        if self.box is not None:
            out["box"] = self.box.to_dict(per_class=False)
        if per_class:
            box_rows = {c.category_id: c for c in self.box.per_class} if self.box is not None else {}
            rows = []
            for c in self.per_class:
                row = {"class": c.name, "category_id": c.category_id, "frequency": c.frequency, "split": c.split,
                       "num_gt": c.num_gt, "AP": _clean(c.ap), "AP50": _clean(c.ap50)}  # fmt: skip
                if c.category_id in box_rows:
                    row.update(box_AP=_clean(box_rows[c.category_id].ap), box_AP50=_clean(box_rows[c.category_id].ap50))
                rows.append(row)
            out["per_class"] = rows
        return out

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def _empty_results(shell: dict):
    """An LVISResults without detections (``LVISResults([])`` raises IndexError reading ``results[0]``)."""
    _, LVISResults, _ = _import_lvis()
    dt = LVISResults.__new__(LVISResults)
    dt.logger = logging.getLogger("lvis.results")
    dt.dataset = {**shell, "annotations": []}
    dt._create_index()
    return dt


def evaluate_ov_lvis(
    lvis_gt,
    categories: OVCategories,
    detections: list[dict],
    iou_type: str = "segm",
    image_ids: list[int] | None = None,
    max_dets: int = MAX_DETS,
) -> LVISMetrics:
    """LVIS AP (AP_r, AP_c, AP_f, AP ...) of detections with the official ``LVISEval``, as CLIPSelf's
    ``LVISV1DatasetOV.evaluate`` computes it, plus its per-class AP50 split seen / unseen.

    Args:
        lvis_gt: the ground truth from :func:`load_lvis_annotations`. LVISEval converts its polygons to RLE in place
            (the numbers of later evaluations do not change).
        categories: its categories (from the same call); every ground-truth category is evaluated.
        detections: LVIS results dicts (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score`` and,
            for ``segm``, ``segmentation`` as compressed RLE), e.g. from :func:`detections_to_lvis`; not modified.
            An empty list gives AP 0 for every class with ground truth.
        iou_type: ``"segm"`` (mask AP, OV-LVIS's metric) or ``"bbox"`` (box AP; ``segmentation`` is not needed).
        image_ids: evaluate these images only (``eval-det --limit``); default every ground-truth image.
        max_dets: results kept per image, best scores first (LVISResults' ``max_dets``; LVIS's official 300).

    Raises:
        InvalidArgumentError: a bad ``iou_type`` / ``max_dets`` / ``image_ids``, categories that are not the ground
            truth's, or a detection that lacks a field, has a category that is not evaluated, an image that is not
            in the annotation file or a segmentation that is not an RLE of its image's size.
    """
    LVIS, LVISResults, LVISEval = _import_lvis()
    if iou_type not in ("segm", "bbox"):
        raise InvalidArgumentError(f"iou_type must be 'segm' (mask AP) or 'bbox' (box AP), got {iou_type!r}")
    if not is_json_int(max_dets) or max_dets < 1:
        raise InvalidArgumentError(f"max_dets must be an integer >= 1, got {max_dets!r}")
    if not isinstance(lvis_gt, LVIS):
        raise InvalidArgumentError(
            f"lvis_gt must be an lvis.LVIS (load_lvis_annotations), not {type(lvis_gt).__name__}"
        )
    if set(categories.ids) != set(lvis_gt.cats) or len(categories.ids) != len(lvis_gt.cats):
        raise InvalidArgumentError(
            f"categories ({len(categories.ids)}) are not the ground truth's {len(lvis_gt.cats)} categories"
        )
    if image_ids is not None:
        image_ids = list(image_ids)
        unknown = [i for i in image_ids if i not in lvis_gt.imgs]
        if unknown:
            raise InvalidArgumentError(f"image_ids: {short_repr(unknown[0])} is not in the annotation file")
    dets = _check_lvis_detections(lvis_gt, categories, detections, iou_type)
    log = io.StringIO()
    # LVISResults deep-copies the ground truth's dataset only to replace its annotations: give it a shell without them.
    shell = {"images": lvis_gt.dataset["images"], "categories": lvis_gt.dataset["categories"], "annotations": []}
    with _lvis_output(log), numpy_float_alias():
        if dets:
            shell_gt = LVIS.__new__(LVIS)
            shell_gt.dataset = shell
            lvis_dt = LVISResults(shell_gt, dets, max_dets=max_dets)
        else:
            lvis_dt = _empty_results(shell)
        ev = LVISEval(lvis_gt, lvis_dt, iou_type)
        if image_ids is not None:
            ev.params.img_ids = image_ids
        ev.params.max_dets = max_dets  # only names the AR keys (AR@300); LVISResults applied the limit
        ev.run()
        ev.print_results()
    precision = ev.eval["precision"]  # (IoU threshold, recall point, class, area range)
    t50 = int(np.flatnonzero(np.isclose(ev.params.iou_thrs, 0.5))[0])
    area_all = ev.params.area_rng_lbl.index("all")
    eval_cats = list(ev.params.cat_ids)  # sorted ids: look each class up, never assume our order
    evaluated = set(ev.params.img_ids)
    num_gt = Counter(a["category_id"] for a in lvis_gt.dataset["annotations"] if a["image_id"] in evaluated)
    rows: list[LVISClassAP] = []
    freqs = getattr(categories, "frequency", None) or tuple(lvis_gt.cats[c]["frequency"] for c in categories.ids)
    for cid, name, is_novel, freq in zip(categories.ids, categories.names, categories.novel, freqs, strict=True):
        k = eval_cats.index(cid)
        p = precision[:, :, k, area_all]
        p = p[p > -1]
        p50 = precision[t50, :, k, area_all]
        p50 = p50[p50 > -1]
        ap = float(np.mean(p)) * 100 if p.size else float("nan")
        ap50 = float(np.mean(p50)) * 100 if p50.size else float("nan")
        rows.append(LVISClassAP(name, cid, freq, "novel" if is_novel else "base", ap, ap50, num_gt.get(cid, 0)))
    summary = {k: (float(v) * 100 if v > -1 else float("nan")) for k, v in ev.get_results().items()}
    return LVISMetrics(
        iou_type=iou_type,
        summary=summary,
        novel_ap50=nanmean([r.ap50 for r in rows if r.split == "novel"]),
        base_ap50=nanmean([r.ap50 for r in rows if r.split == "base"]),
        all_ap50=nanmean([r.ap50 for r in rows]),
        per_class=rows,
        num_images=len(ev.params.img_ids),
        num_detections=len(dets),
        max_dets=max_dets,
        log=log.getvalue(),
    )


# -- reports -----------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.2f}"


def lvis_table(metrics: LVISMetrics, per_class: bool = True) -> str:
    """Markdown: the APr / APc / APf / AP ... row of mask AP (and box AP when evaluated), CLIPSelf's AP50 split, then
    (``per_class``) the per-class table."""
    label = {"segm": "mask", "bbox": "box"}
    evals = [metrics] + ([metrics.box] if metrics.box is not None else [])
    lines = ["| | " + " | ".join(_AP_KEYS) + " |", "|---" * (len(_AP_KEYS) + 1) + "|"]
    for m in evals:
        lines.append(
            f"| {label[m.iou_type]} | " + " | ".join(_fmt(m.summary.get(k, math.nan)) for k in _AP_KEYS) + " |"
        )
    lines += [
        "",
        f"{label[metrics.iou_type]} AP50 per class, mean over novel (rare) {_fmt(metrics.novel_ap50)}, base "
        f"{_fmt(metrics.base_ap50)}, all {_fmt(metrics.all_ap50)}; {metrics.num_images} images, "
        f"{metrics.num_detections} detections (max {metrics.max_dets} per image)",
    ]
    if not per_class:
        return "\n".join(lines)
    lines.append("")
    head = "| class | frequency | category id | GT | AP | AP50 |"
    rule = "|---|---|---|---|---|---|"
    box_rows = {c.category_id: c for c in metrics.box.per_class} if metrics.box is not None else None
    if box_rows is not None:
        head, rule = head + " box AP | box AP50 |", rule + "---|---|"
    lines += [head, rule]
    for c in metrics.per_class:
        row = f"| {c.name} | {c.frequency} | {c.category_id} | {c.num_gt} | {_fmt(c.ap)} | {_fmt(c.ap50)} |"
        if box_rows is not None:
            b = box_rows[c.category_id]
            row += f" {_fmt(b.ap)} | {_fmt(b.ap50)} |"
        lines.append(row)
    return "\n".join(lines)


def write_lvis_report(metrics: LVISMetrics, out_dir, settings: dict | None = None) -> list[Path]:
    """Write ``metrics.json`` (:meth:`LVISMetrics.to_dict`, plus ``settings``), ``per_class.csv``
    (``class,category_id,frequency,split,num_gt,AP,AP50`` and ``box_AP,box_AP50`` when box AP was evaluated;
    percent, ``nan`` without ground truth) and ``results.md`` (:func:`lvis_table`) into ``out_dir``, atomically.

    Returns:
        the three paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, csv_path, md = out_dir / "metrics.json", out_dir / "per_class.csv", out_dir / "results.md"
    write_json_atomic({**metrics.to_dict(), **({"settings": settings} if settings is not None else {})}, js)

    def num(v: float) -> str:
        return "nan" if v != v else f"{v:.4f}"

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    box_rows = {c.category_id: c for c in metrics.box.per_class} if metrics.box is not None else None
    writer.writerow(
        ["class", "category_id", "frequency", "split", "num_gt", "AP", "AP50"]
        + (["box_AP", "box_AP50"] if box_rows is not None else [])
    )
    for c in metrics.per_class:
        row = [c.name, c.category_id, c.frequency, c.split, c.num_gt, num(c.ap), num(c.ap50)]
        if box_rows is not None:
            row += [num(box_rows[c.category_id].ap), num(box_rows[c.category_id].ap50)]
        writer.writerow(row)
    data = buf.getvalue().encode("utf-8")
    write_atomic(csv_path, lambda f: f.write(data))
    table = (lvis_table(metrics) + "\n").encode("utf-8")
    write_atomic(md, lambda f: f.write(table))
    return [js, csv_path, md]
