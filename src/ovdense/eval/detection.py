"""Open-vocabulary detection evaluation without mmdet: OV-COCO box AP50 (novel / base / all) as CLIPSelf's F-ViT
reports it, and COCO box AP for transfer evaluation, both with pycocotools' ``COCOeval``.

The protocol (CLIPSelf ``F-ViT/datasets/coco_ov.py``, ``CocoDatasetOV.evaluate(metric='bbox', classwise=True)`` on
mmdet 2.28.1):

- Detections become COCO results: ``[x1, y1, x2 - x1, y2 - y1]`` (no +1), the score, the category id of the label
  (:func:`detections_to_coco`).
- One ``COCOeval(iouType='bbox')`` over every ground-truth image, with ``catIds`` = the evaluated categories and
  ``maxDets = [100, 300, 1000]``, standard IoU thresholds 0.50:0.05:0.95.
- AP50 of class k = the mean of ``precision[IoU 0.50, :, k, area 'all', maxDets 1000]`` over the recall points
  that are not -1 (NaN where the class has no ground truth box). ``novel_ap50``, ``base_ap50`` and ``all_ap50``
  are ``np.nanmean`` over the 17 novel, 48 base and all 65 classes: a mean of per-class APs, not a separate
  ``COCOeval`` on a subset of the classes.
- COCO's own summary (``stats``) is kept for information; note that its ``mAP`` (stats[0]) uses maxDets 100 while
  its ``mAP_50`` ... ``mAP_l`` use maxDets 1000 (pycocotools' ``summarize`` with these maxDets; mmdet reports the
  same numbers as ``bbox_mAP`` ...). It is the headline for the ``coco`` transfer benchmark.

Every AP here is in percent (0-100, as the papers' tables and CLIPSelf's logs), like
:class:`~ovdense.eval.metrics.SegMetrics`.

The OV-COCO class split (``classes/ov_coco_base.txt``, 48 names, ``classes/ov_coco_novel.txt``, 17 names, COCO
category-id order) is CLIPSelf's ``mscoco_seen_classes.json`` / ``mscoco_unseen_classes.json`` (Bansal et al.'s
zero-shot split as used by OVR-CNN); their union in COCO-id order is ``mscoco_65_classes.json``, the label order of
the model's 65 text embeddings.

pycocotools is imported on first use; its prints go into :attr:`DetectionMetrics.log`, never to stdout.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..fileio import write_atomic, write_json_atomic

__all__ = [
    "BENCHMARKS",
    "COCO_2017_CATEGORIES",
    "ClassAP",
    "DetectionMetrics",
    "OVCategories",
    "coco_categories",
    "detection_table",
    "detections_to_coco",
    "evaluate_ov_coco",
    "load_coco_annotations",
    "ov_coco_categories",
    "write_detection_report",
]

#: ``load_coco_annotations`` benchmarks: ``ov-coco`` (the 65 OV-COCO classes, 17 of them novel) and ``coco`` (all 80
#: COCO classes, none novel: transfer evaluation on ``instances_val2017.json``).
BENCHMARKS = ("ov-coco", "coco")

#: The 80 COCO 2017 detection categories, ``(category id, name)`` in id order (``instances_val2017.json``; the names
#: are mmdet 2.x's ``CocoDataset.CLASSES`` and CLIPSelf's ``mscoco_all_classes.json``).
COCO_2017_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"), (47, "cup"),
    (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"), (54, "sandwich"),
    (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"),
    (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone"),
    (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"), (84, "book"),
    (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)  # fmt: skip

BASE_FILE = "ov_coco_base.txt"
NOVEL_FILE = "ov_coco_novel.txt"
#: What CLIPSelf passes to ``COCOeval.params.maxDets`` (mmdet's ``proposal_nums``).
MAX_DETS = (100, 300, 1000)
_STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
_HINT = "give a COCO 2017 instances file (instances_val2017.json, or OVR-CNN's instances_val2017_all_2.json)"


@dataclass(frozen=True)
class OVCategories:
    """The categories a detection benchmark scores, in evaluation order (= the model's label order).

    Attributes:
        ids: the annotation file's category ids; label ``k`` of a detector means ``ids[k]``.
        names: the class names (COCO 2017 spelling), one per id.
        novel: whether each class is novel (unseen in training: OV-COCO's 17), one per id.
    """

    ids: tuple[int, ...]
    names: tuple[str, ...]
    novel: tuple[bool, ...]

    def __post_init__(self):
        if not len(self.ids) == len(self.names) == len(self.novel):
            raise InvalidArgumentError(
                f"OVCategories: {len(self.ids)} ids, {len(self.names)} names, {len(self.novel)} novel flags"
            )
        if len(set(self.ids)) != len(self.ids):
            raise InvalidArgumentError("OVCategories: the category ids repeat")

    @property
    def base_ids(self) -> tuple[int, ...]:
        """The ids of the base (seen) classes, in evaluation order."""
        return tuple(i for i, n in zip(self.ids, self.novel, strict=True) if not n)

    @property
    def novel_ids(self) -> tuple[int, ...]:
        """The ids of the novel (unseen) classes, in evaluation order."""
        return tuple(i for i, n in zip(self.ids, self.novel, strict=True) if n)

    def index_of(self, category_id: int) -> int:
        """The label (position in :attr:`ids`) of a category id.

        Raises:
            InvalidArgumentError: the id is not one of the evaluated categories.
        """
        try:
            return self.ids.index(category_id)
        except ValueError:
            raise InvalidArgumentError(
                f"category id {category_id!r} is not one of the {len(self.ids)} evaluated categories"
            ) from None


def read_split(name: str) -> list[str]:
    """The class names of a split file of ``ovdense/eval/classes`` (one per line), in file order."""
    text = resources.files("ovdense.eval").joinpath("classes", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _match_categories(wanted: list[tuple[str, bool, str]], coco_gt_categories: list[dict], source: str) -> OVCategories:
    """Map ``(name, novel, where the name comes from)`` to the file's category ids by name."""
    by_name: dict[str, list[int]] = {}
    for cat in coco_gt_categories:
        by_name.setdefault(cat.get("name"), []).append(cat.get("id"))
    missing = [(name, where) for name, _, where in wanted if name not in by_name]
    if missing:
        name, where = missing[0]
        raise OvdenseError(
            f"{source} has no category named {name!r} (from {where}; {len(missing)} of the {len(wanted)} names "
            f"are missing): {_HINT}"
        )
    for name, _, _ in wanted:
        if len(by_name[name]) > 1:
            ids = ", ".join(map(str, by_name[name]))
            raise OvdenseError(f"{source} has {len(by_name[name])} categories named {name!r} (ids {ids}): {_HINT}")
    return OVCategories(
        ids=tuple(by_name[name][0] for name, _, _ in wanted),
        names=tuple(name for name, _, _ in wanted),
        novel=tuple(novel for _, novel, _ in wanted),
    )


def ov_coco_categories(coco_gt_categories: list[dict], source: str = "the annotation file") -> OVCategories:
    """The 65 OV-COCO classes (48 base, 17 novel) with the annotation file's category ids.

    The order is COCO 2017's category-id order of the names (CLIPSelf's ``mscoco_65_classes.json``), whatever ids
    the file gives them, so label ``k`` always means the k-th of those 65 names.

    Args:
        coco_gt_categories: the annotation file's ``categories`` (dicts with ``id`` and ``name``, COCO 2017 names).
        source: how messages name the annotation file.

    Raises:
        OvdenseError: a split name (from ``ov_coco_base.txt`` / ``ov_coco_novel.txt``) has no category, or more
            than one, in the file; the message names the file and the first such name.
    """
    base, novel = read_split(BASE_FILE), read_split(NOVEL_FILE)
    where = {n: f"the OV-COCO base classes, {BASE_FILE}" for n in base}
    where.update({n: f"the OV-COCO novel classes, {NOVEL_FILE}" for n in novel})
    order = [name for _, name in COCO_2017_CATEGORIES if name in where]
    if len(order) != len(where):  # a split file with a name that is not COCO's: a packaging error, not the user's
        raise AssertionError(f"OV-COCO split names outside COCO 2017: {sorted(set(where) - set(order))}")
    novel_set = set(novel)
    return _match_categories([(n, n in novel_set, where[n]) for n in order], coco_gt_categories, source)


def coco_categories(coco_gt_categories: list[dict], source: str = "the annotation file") -> OVCategories:
    """The 80 COCO 2017 classes, none novel (transfer evaluation), in COCO-id order with the file's ids.

    Raises:
        OvdenseError: as :func:`ov_coco_categories`, for the 80 COCO 2017 names.
    """
    wanted = [(name, False, "the 80 COCO 2017 classes") for _, name in COCO_2017_CATEGORIES]
    return _match_categories(wanted, coco_gt_categories, source)


def is_json_int(v) -> bool:
    """An integer JSON value (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_json_number(v) -> bool:
    """A finite real JSON number (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def finite_numbers(values) -> list[float] | None:
    """``values`` as Python floats, or None unless it is a sequence of finite real numbers (NumPy scalars too)."""
    try:
        out = [float(v) for v in values if not isinstance(v, (bool, str, bytes))]
    except (TypeError, ValueError):
        return None
    return out if len(out) == len(values) and all(map(math.isfinite, out)) else None


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for one-line messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + " ..."


def read_annotation_json(path) -> object:
    """The parsed JSON of an annotation file.

    Raises:
        OvdenseError: one line: the file cannot be read, or is not JSON.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise OvdenseError(f"cannot read the annotation file {path}: {err.strerror or first_line(err)}") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OvdenseError(f"the annotation file {path} is not JSON: {first_line(err)}") from None


def annotation_error(path):
    """``bad(what)`` -> the one-line :class:`OvdenseError` about the annotation file ``path``."""

    def bad(what: str) -> OvdenseError:
        return OvdenseError(f"the annotation file {path}: {what}")

    return bad


def check_instances(dataset, path, kind: str, annotation_keys: tuple[str, ...]) -> tuple[dict, dict, list]:
    """The structure every COCO-style instances file shares (COCO, LVIS), checked so that a wrong file is one line:
    ``images``, ``annotations`` and ``categories`` lists; unique integer ids; categories with a name; every
    annotation with ``annotation_keys``, an image and a category of the file, and a ``bbox`` of 4 finite numbers
    (each kind of file checks the signs of width and height itself).

    Args:
        dataset: the parsed JSON.
        path: the file, for the messages.
        kind: what the file should be, for the messages ("a COCO instances file").
        annotation_keys: keys every annotation must have besides ``id`` and ``bbox``.

    Returns:
        ``(images, categories, annotations)``: images and categories by id, and the annotation list.

    Raises:
        OvdenseError: the first problem, in one line.
    """
    bad = annotation_error(path)
    if not isinstance(dataset, dict):
        raise bad(f"not {kind} (a JSON object with images, annotations and categories)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            has = "has no" if key not in dataset else "has a non-list"
            raise bad(f"{has} {key!r} list; not {kind}")
    images: dict = {}
    for i, img in enumerate(dataset["images"]):
        if not isinstance(img, dict) or not is_json_int(img.get("id")):
            raise bad(f"image #{i} has no integer 'id'")
        if img["id"] in images:
            raise bad(f"image id {img['id']} appears twice")
        images[img["id"]] = img
    categories: dict = {}
    for i, cat in enumerate(dataset["categories"]):
        if not isinstance(cat, dict) or not is_json_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise bad(f"category #{i} needs an integer 'id' and a 'name'")
        if cat["id"] in categories:
            raise bad(f"category id {cat['id']} appears twice")
        categories[cat["id"]] = cat
    ann_ids: set = set()
    for i, ann in enumerate(dataset["annotations"]):
        if not isinstance(ann, dict) or not is_json_int(ann.get("id")):
            raise bad(f"annotation #{i} has no integer 'id'")
        name = f"annotation {ann['id']}"
        if ann["id"] in ann_ids:
            raise bad(f"{name} appears twice")
        ann_ids.add(ann["id"])
        for key in ("image_id", "category_id", "bbox", *annotation_keys):
            if key not in ann:
                raise bad(f"{name} has no {key!r}")
        if ann["image_id"] not in images:
            raise bad(f"{name} has image_id {short_repr(ann['image_id'])}, which is not in 'images'")
        if ann["category_id"] not in categories:
            raise bad(f"{name} has category_id {short_repr(ann['category_id'])}, which is not in 'categories'")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(is_json_number, bbox)):
            raise bad(f"{name} has bbox {short_repr(bbox)}, not 4 numbers [x, y, width, height]")
    return images, categories, dataset["annotations"]


def _validate(dataset, path) -> None:
    """Check what pycocotools and COCOeval rely on, so a wrong file gives one line instead of a traceback."""
    bad = annotation_error(path)
    # pycocotools' COCOeval reads area (area ranges) and iscrowd (crowd matching) of every ground-truth box
    _, _, annotations = check_instances(dataset, path, "a COCO instances file", ("area", "iscrowd"))
    for ann in annotations:
        name, bbox = f"annotation {ann['id']}", ann["bbox"]
        if bbox[2] <= 0 or bbox[3] <= 0:
            raise bad(f"{name} has a box of width {bbox[2]} and height {bbox[3]}; both must be > 0")
        if not is_json_number(ann["area"]) or ann["iscrowd"] not in (0, 1):
            raise bad(f"{name} has area {short_repr(ann['area'])} and iscrowd {short_repr(ann['iscrowd'])}")


def _coco_from_dataset(dataset: dict):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints "creating index..."
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    return coco


def load_coco_annotations(path, benchmark: str):
    """Read a COCO-format instances file for a detection benchmark.

    ``ov-coco``: the ground truth is restricted to the 65 OV-COCO classes: their annotations (crowd ones included),
    the images holding at least one of them (in file order) and their categories. This is how OVR-CNN's
    ``ipynb/003.ipynb`` writes ``instances_val2017_all_2.json`` from ``instances_val2017.json`` (the file CLIPSelf
    evaluates on), and matches its reported 4,836 val2017 images; the file itself (from the authors' Drive) is not
    verifiable here. Either file works: applied to ``instances_val2017_all_2.json`` the filter changes nothing.
    ``coco``: every image and annotation, the 80 COCO classes, none novel (what mmdet's ``CocoDataset`` evaluates on
    ``instances_val2017.json``: all 5,000 images).

    Returns:
        ``(coco_gt, categories)``: a pycocotools ``COCO`` built in memory, and the evaluated categories. For
        ``ov-coco``, ``coco_gt.ovdense_excluded_image_ids`` holds the ids of the file's images left out (their
        detections are dropped by :func:`evaluate_ov_coco`).

    Raises:
        OvdenseError: one line: the file cannot be read or is not JSON; it lacks ``images`` / ``annotations`` /
            ``categories``; an image, category or annotation lacks its fields (annotations: ``id``, ``image_id``,
            ``category_id``, ``bbox``, ``area``, ``iscrowd``), refers to an unknown image or category, or has a box
            that is not 4 numbers or has a width or height <= 0 (named by annotation id); or the categories are not
            the benchmark's (e.g. an LVIS file).
        InvalidArgumentError: ``benchmark`` is not one of :data:`BENCHMARKS`.
    """
    if benchmark not in BENCHMARKS:
        raise InvalidArgumentError(f"unknown detection benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}")
    path = Path(path)
    dataset = read_annotation_json(path)
    _validate(dataset, path)
    source = f"the annotation file {path}"
    if benchmark == "coco":
        categories = coco_categories(dataset["categories"], source)
        coco = _coco_from_dataset(dataset)
        coco.ovdense_excluded_image_ids = frozenset()
        return coco, categories
    categories = ov_coco_categories(dataset["categories"], source)
    keep = set(categories.ids)
    annotations = [a for a in dataset["annotations"] if a["category_id"] in keep]
    with_boxes = {a["image_id"] for a in annotations}
    filtered = {
        **{k: v for k, v in dataset.items() if k not in ("images", "annotations", "categories")},  # info, licenses
        "images": [img for img in dataset["images"] if img["id"] in with_boxes],
        "annotations": annotations,
        "categories": [c for c in dataset["categories"] if c["id"] in keep],
    }
    coco = _coco_from_dataset(filtered)
    coco.ovdense_excluded_image_ids = frozenset(img["id"] for img in dataset["images"] if img["id"] not in with_boxes)
    return coco, categories


@dataclass(frozen=True)
class ClassAP:
    """One class's result.

    Attributes:
        name: the class name.
        category_id: its id in the annotation file.
        split: ``"novel"`` or ``"base"``.
        ap50: box AP at IoU 0.5 in percent (maxDets 1000, all areas); NaN where the class has no ground-truth box.
        num_gt: its non-crowd ground-truth boxes over the evaluated images (crowd boxes are ignored by COCOeval).
    """

    name: str
    category_id: int
    split: str
    ap50: float
    num_gt: int


@dataclass
class DetectionMetrics:
    """Box AP of one detection evaluation; every AP in percent (0-100).

    Attributes:
        novel_ap50, base_ap50, all_ap50: ``np.nanmean`` of the per-class AP50 over the novel, base and all classes
            (CLIPSelf's ``novel_ap50`` / ``base_ap50`` / ``all_ap50``); NaN where no class of the group has ground
            truth (``novel_ap50`` of the ``coco`` benchmark, which has no novel class).
        per_class: one :class:`ClassAP` per evaluated class, in evaluation order.
        coco_stats: pycocotools' summary over the evaluated classes: ``mAP`` (IoU 0.50:0.95, maxDets 100),
            ``mAP_50``, ``mAP_75``, ``mAP_s``, ``mAP_m``, ``mAP_l`` (maxDets 1000); NaN where undefined.
        num_images: ground-truth images evaluated.
        num_detections: detections evaluated.
        num_dropped: detections on images of the annotation file left out of the benchmark (OV-COCO images without
            any of the 65 classes), which are not counted, as they are never run in CLIPSelf's evaluation.
        log: what pycocotools printed (its summary table included).
    """

    novel_ap50: float
    base_ap50: float
    all_ap50: float
    per_class: list[ClassAP]
    coco_stats: dict[str, float]
    num_images: int
    num_detections: int
    num_dropped: int = 0
    log: str = field(default="", repr=False)

    def to_dict(self) -> dict:
        """JSON-ready: APs in percent rounded to 4 decimals, NaN as ``null``."""

        def clean(v: float):
            return None if v is None or math.isnan(v) else round(float(v), 4)

        return {
            "novel_ap50": clean(self.novel_ap50),
            "base_ap50": clean(self.base_ap50),
            "all_ap50": clean(self.all_ap50),
            "coco_stats": {k: clean(v) for k, v in self.coco_stats.items()},
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "num_dropped": self.num_dropped,
            "per_class": [
                {
                    "class": c.name,
                    "category_id": c.category_id,
                    "split": c.split,
                    "AP50": clean(c.ap50),
                    "num_gt": c.num_gt,
                }
                for c in self.per_class
            ],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)


def nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN (without NumPy's warning) when there are none."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if v.size and not np.all(np.isnan(v)) else float("nan")  # no empty-slice warning


def check_detection(i: int, det, evaluated: set, extra_keys: tuple[str, ...] = ()) -> tuple[list[float], float]:
    """One results dict (``detections[i]``) checked: a dict with ``image_id``, ``category_id``, ``bbox``, ``score``
    and ``extra_keys``, a bbox of 4 finite numbers, a finite score, a category among ``evaluated``.

    Returns:
        ``(bbox, score)`` as Python floats.

    Raises:
        InvalidArgumentError: the first problem, in one line.
    """
    if not isinstance(det, dict):
        raise InvalidArgumentError(f"detections[{i}] is a {type(det).__name__}, not a dict")
    for key in ("image_id", "category_id", "bbox", "score", *extra_keys):
        if key not in det:
            raise InvalidArgumentError(
                f"detections[{i}] has no {key!r}"
                + (" (mask AP needs a mask RLE per detection)" if key == "segmentation" else "")
            )
    bbox, score = finite_numbers(det["bbox"]), finite_numbers([det["score"]])
    if bbox is None or len(bbox) != 4 or score is None:
        raise InvalidArgumentError(
            f"detections[{i}] needs a bbox of 4 finite numbers and a finite score; got bbox "
            f"{short_repr(det['bbox'])}, score {short_repr(det['score'])}"
        )
    if det["category_id"] not in evaluated:
        raise InvalidArgumentError(
            f"detections[{i}] has category_id {short_repr(det['category_id'])}, not one of the "
            f"{len(evaluated)} evaluated categories"
        )
    return bbox, score[0]


def _check_detections(coco_gt, categories: OVCategories, detections) -> tuple[list[dict], int]:
    """Copies of the detections to evaluate (pycocotools' ``loadRes`` writes into them) and how many were dropped."""
    excluded = getattr(coco_gt, "ovdense_excluded_image_ids", frozenset())
    gt_images = set(coco_gt.getImgIds())
    evaluated = set(categories.ids)
    kept: list[dict] = []
    dropped = 0
    for i, det in enumerate(detections):
        bbox, score = check_detection(i, det, evaluated)
        if det["image_id"] not in gt_images:
            if det["image_id"] in excluded:
                dropped += 1
                continue
            raise InvalidArgumentError(
                f"detections[{i}] has image_id {short_repr(det['image_id'])}, which is not in the annotation file"
            )
        kept.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": bbox,
                "score": score,
            }
        )
    return kept, dropped


def evaluate_ov_coco(
    coco_gt, categories: OVCategories, detections: list[dict], image_ids: list[int] | None = None
) -> DetectionMetrics:
    """Box AP50 per class and novel / base / all, as CLIPSelf's ``CocoDatasetOV.evaluate`` computes it.

    Args:
        coco_gt: the ground truth from :func:`load_coco_annotations`.
        categories: the evaluated categories (from the same call).
        detections: COCO results dicts (``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score``), e.g.
            from :func:`detections_to_coco`; not modified. Detections on images that the benchmark leaves out
            (``coco_gt.ovdense_excluded_image_ids``) are dropped and counted in ``num_dropped``. An empty list gives
            AP 0 for every class with ground truth.
        image_ids: evaluate these images only (``eval-det --limit``); default every ground-truth image.

    Raises:
        InvalidArgumentError: a detection lacks a field, has a category that is not evaluated, or an image that is
            not in the annotation file.
    """
    from pycocotools.cocoeval import COCOeval

    dets, dropped = _check_detections(coco_gt, categories, detections)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes([]) raises IndexError (it reads anns[0]): an empty result set, built as loadRes would
            coco_dt = _coco_from_dataset(
                {
                    "images": list(coco_gt.dataset["images"]),
                    "categories": copy.deepcopy(coco_gt.dataset["categories"]),
                    "annotations": [],
                }
            )
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.catIds = list(categories.ids)
        ev.params.imgIds = coco_gt.getImgIds() if image_ids is None else list(image_ids)
        ev.params.maxDets = list(MAX_DETS)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (IoU threshold, recall point, class, area range, maxDets)
    t50 = int(np.flatnonzero(np.isclose(ev.params.iouThrs, 0.5))[0])
    area_all = ev.params.areaRngLbl.index("all")
    eval_cats = list(ev.params.catIds)  # COCOeval sorts the ids: look each class up, never assume our order
    num_gt = Counter(a["category_id"] for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0))
    rows: list[ClassAP] = []
    for cid, name, is_novel in zip(categories.ids, categories.names, categories.novel, strict=True):
        p = precision[t50, :, eval_cats.index(cid), area_all, -1]
        p = p[p > -1]
        ap50 = float(np.mean(p)) * 100 if p.size else float("nan")
        rows.append(ClassAP(name, cid, "novel" if is_novel else "base", ap50, num_gt.get(cid, 0)))
    stats = {k: (float(v) * 100 if v > -1 else float("nan")) for k, v in zip(_STAT_NAMES, ev.stats[:6], strict=True)}
    return DetectionMetrics(
        novel_ap50=nanmean([r.ap50 for r in rows if r.split == "novel"]),
        base_ap50=nanmean([r.ap50 for r in rows if r.split == "base"]),
        all_ap50=nanmean([r.ap50 for r in rows]),
        per_class=rows,
        coco_stats=stats,
        num_images=len(ev.params.imgIds),
        num_detections=len(dets),
        num_dropped=dropped,
        log=log.getvalue(),
    )


def detections_to_coco(image_id: int, boxes, scores, labels, categories: OVCategories) -> list[dict]:
    """One image's detections as COCO results dicts, as mmdet 2.28.1's ``CocoDataset._det2json`` writes them.

    ``bbox = [x1, y1, x2 - x1, y2 - y1]`` (no +1) from the box's values as Python floats (``tolist()``, no
    rounding), ``score = float(score)``, ``category_id = categories.ids[label]``. Detections are grouped by label
    (stable: each label's boxes keep their order), the order mmdet's per-class result arrays give; it matters only
    to COCOeval's tie-breaking between equal scores. Pass the model's float32 arrays to reproduce mmdet's numbers
    bit for bit.

    Args:
        image_id: the annotation file's image id.
        boxes: K x 4 ``[x1, y1, x2, y2]`` in original-image pixels.
        scores: K scores.
        labels: K integer labels, indices into ``categories.ids``.

    Raises:
        InvalidArgumentError: shapes that do not match, or a label outside ``0..len(categories.ids) - 1``.
    """
    boxes, scores, labels = np.asarray(boxes), np.asarray(scores), np.asarray(labels)
    k = boxes.shape[0] if boxes.ndim == 2 else -1
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (k,) or labels.shape != (k,):
        raise InvalidArgumentError(
            f"detections_to_coco: boxes must be K x 4, scores and labels K long; got boxes {tuple(boxes.shape)}, "
            f"scores {tuple(scores.shape)}, labels {tuple(labels.shape)}"
        )
    if k and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(categories.ids)):
        raise InvalidArgumentError(
            f"detections_to_coco: labels must be integers in 0..{len(categories.ids) - 1} (indices into the "
            "evaluated categories)"
        )
    results = []
    for i in np.argsort(labels, kind="stable"):
        x1, y1, x2, y2 = boxes[i].tolist()
        results.append(
            {
                "image_id": int(image_id),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(scores[i]),
                "category_id": categories.ids[int(labels[i])],
            }
        )
    return results


def _fmt(v: float) -> str:
    return "nan" if v != v else f"{v:.2f}"


def detection_table(metrics: DetectionMetrics) -> str:
    """Markdown: the novel / base / all AP50 row (percent), COCO's summary, then the per-class table."""
    s = metrics.coco_stats
    lines = [
        "| novel AP50 | base AP50 | all AP50 |",
        "|---|---|---|",
        f"| {_fmt(metrics.novel_ap50)} | {_fmt(metrics.base_ap50)} | {_fmt(metrics.all_ap50)} |",
        "",
        f"COCO box AP {_fmt(s['mAP'])} (maxDets 100), AP50 {_fmt(s['mAP_50'])}, AP75 {_fmt(s['mAP_75'])}, "
        f"APs {_fmt(s['mAP_s'])}, APm {_fmt(s['mAP_m'])}, APl {_fmt(s['mAP_l'])} (maxDets 1000); "
        f"{metrics.num_images} images, {metrics.num_detections} detections",
        "",
        "| class | split | category id | GT boxes | AP50 |",
        "|---|---|---|---|---|",
    ]
    for c in metrics.per_class:
        lines.append(f"| {c.name} | {c.split} | {c.category_id} | {c.num_gt} | {_fmt(c.ap50)} |")
    return "\n".join(lines)


def write_detection_report(metrics: DetectionMetrics, out_dir, settings: dict | None = None) -> list[Path]:
    """Write ``metrics.json`` (:meth:`DetectionMetrics.to_dict`, plus ``settings`` when given), ``per_class.csv``
    (``class,category_id,split,num_gt,AP50``; AP in percent, ``nan`` without ground truth) and ``results.md``
    (:func:`detection_table`) into ``out_dir`` (created), each written atomically.

    Returns:
        the three paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, csv_path, md = out_dir / "metrics.json", out_dir / "per_class.csv", out_dir / "results.md"
    write_json_atomic({**metrics.to_dict(), **({"settings": settings} if settings is not None else {})}, js)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", "category_id", "split", "num_gt", "AP50"])
    for c in metrics.per_class:
        writer.writerow([c.name, c.category_id, c.split, c.num_gt, "nan" if c.ap50 != c.ap50 else f"{c.ap50:.4f}"])
    data = buf.getvalue().encode("utf-8")
    write_atomic(csv_path, lambda f: f.write(data))
    table = (detection_table(metrics) + "\n").encode("utf-8")
    write_atomic(md, lambda f: f.write(table))
    return [js, csv_path, md]
