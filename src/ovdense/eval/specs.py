"""The 8 open-vocabulary segmentation benchmarks as data: one :class:`DatasetSpec` per benchmark.

Every fact about a benchmark lives in its spec: its classes, label rule, background class, folder layout, the
papers' column title and how to prepare it. :data:`DATASETS` lists them in the order of the papers' tables
(SCLIP Table 1 and its successors). The readers are in :mod:`ovdense.eval.datasets`.

``data_root`` is the folder holding ``VOCdevkit/``, ``coco_stuff164k/``, ``cityscapes/`` and ``ade/`` (the
``--data-root`` of ``ovdense eval``). It may also point straight at one benchmark's folder: the folder
containing ``VOC2012/`` (or ``VOC2010/``), or the ``VOC2012``, ``coco_stuff164k``, ``cityscapes`` or
``ADEChallengeData2016`` folder itself (what mmseg configs call ``data_root``). See :attr:`DatasetSpec.roots`.

This module imports neither torch nor numpy: the command line reads the benchmark names from it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CLASS_STYLES", "DATASETS", "PAPER_COLUMNS", "DatasetSpec"]

#: Class-name styles and where each comes from. ``sclip``: SCLIP ``configs/cls_*.txt`` (NACLIP's are
#: byte-identical). ``clearclip``: ClearCLIP ``configs/cls_*.txt`` (``background`` as class 0, no synonyms).
#: ``declip``: the files DeCLIP's ``declip_segmentor.py`` reads are not published; ProxyCLIP's
#: ``configs/cls_*.txt`` (same ``'; '`` separator and segmentor lineage) stand in for them. ``proxyclip``:
#: ProxyCLIP's ``configs/cls_*.txt`` (SCLIP's names without its synonyms). ``corrclip``: CorrCLIP v1's
#: (``people`` for ``person``, no ``bed`` among COCO-Object's background words). The ``'; '`` of those files is
#: written ``', '`` here, as every ovdense class file (no name holds a comma). SC-CLIP and ResCLIP ship SCLIP's.
CLASS_STYLES = ("sclip", "clearclip", "declip", "proxyclip", "corrclip")


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark: its classes, label rule and folder layout (as the mmseg dataset classes define them).

    Attributes:
        name: the ``ovdense eval --dataset`` name, also the class-file stem.
        title: the benchmark's display name.
        num_classes: classes scored by mIoU (after ``reduce_zero_label``).
        reduce_zero_label: labels become ``0 -> 255, c -> c - 1`` (255 stays 255).
        roots: candidate benchmark folders relative to ``data_root``, tried in order; the first is the
            canonical layout, ``"."`` means ``data_root`` itself.
        img_dir, ann_dir: image and label folders inside the benchmark folder.
        img_suffix, seg_map_suffix: a sample ``x`` is ``img_dir/x<img_suffix>`` + ``ann_dir/x<seg_map_suffix>``.
        split_file: file listing the sample ids, one per line (``None``: scan ``img_dir``).
        label_mode: how the released label PNGs are stored (``"P"`` palette or ``"L"`` grey); informative.
        prepare_hint: one line on how to get or prepare the data.
        paper_column: the benchmark's column title in the papers' result tables (:data:`PAPER_COLUMNS`).
        background_class: the class that stands for background, matched by the class file's background words
            and by the presets' ``prob_thd`` (class 0 of VOC21, Context60 and COCO-Object), or ``None`` where no
            class is background. Result tables and overlays name it as such.
    """

    name: str
    title: str
    num_classes: int
    reduce_zero_label: bool
    roots: tuple[str, ...]
    img_dir: str
    ann_dir: str
    img_suffix: str
    seg_map_suffix: str
    split_file: str | None
    label_mode: str
    prepare_hint: str
    paper_column: str
    background_class: int | None


_VOC_HINT = (
    "get PASCAL VOC 2012 (VOCtrainval_11-May-2012.tar) and extract it into DATA_ROOT, "
    "giving DATA_ROOT/VOCdevkit/VOC2012"
)
_CONTEXT_HINT = (
    "extract PASCAL VOC 2010 (VOCtrainval_03-May-2010.tar) into DATA_ROOT, then build the labels with "
    "`ovdense convert pascal-context --data-root DATA_ROOT --source trainval_merged.json`"
)
_COCO_HINT = (
    "put COCO val2017 images in DATA_ROOT/coco_stuff164k/images/val2017 and stuffthingmaps_trainval2017 "
    "in DATA_ROOT/coco_stuff164k/annotations/val2017, then run `ovdense convert {cmd} --data-root DATA_ROOT`"
)

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "voc21", "VOC21", 21, False, ("VOCdevkit/VOC2012", "VOC2012", "."),
            "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt", "P", _VOC_HINT,
            paper_column="VOC21", background_class=0,
        ),
        DatasetSpec(
            "context60", "Context60", 60, False, ("VOCdevkit/VOC2010", "VOC2010", "."),
            "JPEGImages", "SegmentationClassContext", ".jpg", ".png", "ImageSets/SegmentationContext/val.txt",
            "L", _CONTEXT_HINT, paper_column="C60", background_class=0,
        ),
        DatasetSpec(
            "coco_object", "COCO-Object", 81, False, ("coco_stuff164k", "."),
            "images/val2017", "annotations/val2017", ".jpg", "_instanceTrainIds.png", None, "L",
            _COCO_HINT.format(cmd="coco-object"), paper_column="Obj", background_class=0,
        ),
        DatasetSpec(
            "voc20", "VOC20", 20, True, ("VOCdevkit/VOC2012", "VOC2012", "."),
            "JPEGImages", "SegmentationClass", ".jpg", ".png", "ImageSets/Segmentation/val.txt", "P", _VOC_HINT,
            paper_column="VOC20", background_class=None,
        ),
        DatasetSpec(
            "context59", "Context59", 59, True, ("VOCdevkit/VOC2010", "VOC2010", "."),
            "JPEGImages", "SegmentationClassContext", ".jpg", ".png", "ImageSets/SegmentationContext/val.txt",
            "L", _CONTEXT_HINT, paper_column="C59", background_class=None,
        ),
        DatasetSpec(
            "coco_stuff", "COCO-Stuff", 171, False, ("coco_stuff164k", "."),
            "images/val2017", "annotations/val2017", ".jpg", "_labelTrainIds.png", None, "L",
            _COCO_HINT.format(cmd="coco-stuff"), paper_column="Stuff", background_class=None,
        ),
        DatasetSpec(
            "cityscapes", "Cityscapes", 19, False, ("cityscapes", "."),
            "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png", "_gtFine_labelTrainIds.png", None, "L",
            "extract leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip into DATA_ROOT/cityscapes, "
            "then run `ovdense convert cityscapes --data-root DATA_ROOT`",
            paper_column="City", background_class=None,
        ),
        DatasetSpec(
            "ade20k", "ADE20K", 150, True, ("ade/ADEChallengeData2016", "ADEChallengeData2016", "."),
            "images/validation", "annotations/validation", ".jpg", ".png", None, "L",
            "extract ADEChallengeData2016.zip into DATA_ROOT/ade, giving DATA_ROOT/ade/ADEChallengeData2016",
            paper_column="ADE", background_class=None,
        ),
    )
}  # fmt: skip


#: Column titles of the papers' result tables (SCLIP Table 1 and its successors), in DATASETS order.
PAPER_COLUMNS: dict[str, str] = {name: spec.paper_column for name, spec in DATASETS.items()}
