"""The 10 open-vocabulary segmentation benchmarks as data: one :class:`DatasetSpec` per benchmark.

Every fact about a benchmark lives in its spec: its classes, label rule, background class, folder layout, the
papers' column title and how to prepare it. :data:`DATASETS` lists them in the order of the papers' tables:
the classic 8 (:data:`CLASSIC`, SCLIP Table 1 and its successors), then the two large-vocabulary benchmarks
CorrCLIPv2 adds, ADE20K-847 and PASCAL-Context-459 (:data:`LARGE`, CAT-Seg's preparation: 16-bit TIFF labels).
The readers are in :mod:`ovdense.eval.datasets`.

``data_root`` is the folder holding ``VOCdevkit/``, ``coco_stuff164k/``, ``cityscapes/``, ``ade/`` and
``ADE20K_2021_17_01/`` (the ``--data-root`` of ``ovdense eval``). It may also point straight at one benchmark's
folder: the folder containing ``VOC2012/`` (or ``VOC2010/``), or the ``VOC2012``, ``coco_stuff164k``,
``cityscapes``, ``ADEChallengeData2016`` or ``ADE20K_2021_17_01`` folder itself (what mmseg configs call
``data_root``). See :attr:`DatasetSpec.roots`.

Ignore index: the classic 8 ignore label 255. ADE-847 and PC-459 store class indices up to 846 / 458 in 16-bit
labels, with 65535 for unlabelled pixels, and 255 is a real class there (``pier`` / ``monkey``). Which value the
metric leaves out is a choice (:data:`IGNORE_POLICIES`, :func:`ignore_index`): ``authors`` reproduces
CorrCLIPv2's harness (mmseg's ``IoUMetric`` default 255: class 255 left out, unlabelled pixels counted in the
union), ``unlabelled`` is CAT-Seg's evaluation (65535 left out, class 255 scored).

This module imports neither torch nor numpy: the command line reads the benchmark names from it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CLASSIC",
    "CLASS_STYLES",
    "DATASETS",
    "IGNORE_POLICIES",
    "LARGE",
    "PAPER_COLUMNS",
    "STYLE_FALLBACK",
    "DatasetSpec",
    "ignore_index",
]

#: Class-name styles and where each comes from. ``sclip``: SCLIP ``configs/cls_*.txt`` (NACLIP's are
#: byte-identical). ``clearclip``: ClearCLIP ``configs/cls_*.txt`` (``background`` as class 0, no synonyms).
#: ``declip``: the files DeCLIP's ``declip_segmentor.py`` reads are not published; ProxyCLIP's
#: ``configs/cls_*.txt`` (same ``'; '`` separator and segmentor lineage) stand in for them. ``proxyclip``:
#: ProxyCLIP's ``configs/cls_*.txt`` (SCLIP's names without its synonyms). ``corrclip``: CorrCLIP v1's
#: (``people`` for ``person``, no ``bed`` among COCO-Object's background words). ``corrclipv2``: CorrCLIPv2's, which
#: are CorrCLIP v1's except Cityscapes' ``people\, person`` (one prompt). The ``'; '`` of those files is written
#: ``', '`` here, as every ovdense class file, and a comma inside one name ``\,``: ADE-847's WordNet names such as
#: ``building\, edifice`` are one prompt each, as CAT-Seg and CorrCLIPv2 use them. A style without a file of its own
#: for a benchmark falls back along :data:`STYLE_FALLBACK`, then to the generic ``<name>.txt``. SC-CLIP and ResCLIP
#: ship SCLIP's. ADE-847 and PC-459 have one list each (the authors', which are CAT-Seg's), for every style.
CLASS_STYLES = ("sclip", "clearclip", "declip", "proxyclip", "corrclip", "corrclipv2")

#: The style whose file a style without its own file uses first (before the generic ``<name>.txt``).
STYLE_FALLBACK = {"corrclipv2": "corrclip"}

#: What ``ovdense eval --ignore-index`` chooses for ADE-847 and PC-459 (see the module docstring): the first is
#: the default.
IGNORE_POLICIES = ("authors", "unlabelled")


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
        label_mode: how the label files are stored: ``"P"`` palette or ``"L"`` grey PNGs, or ``"I;16"`` 16-bit
            TIFFs (read without any narrowing, see :func:`ovdense.eval.datasets.read_label_16`).
        prepare_hint: one line on how to get or prepare the data.
        paper_column: the benchmark's column title in the papers' result tables (:data:`PAPER_COLUMNS`).
        background_class: the class that stands for background, matched by the class file's background words
            and by the presets' ``prob_thd`` (class 0 of VOC21, Context60 and COCO-Object), or ``None`` where no
            class is background. Result tables and overlays name it as such.
        unlabelled: the label value of unlabelled pixels where it is not the ignore index 255 (65535 in the 16-bit
            labels of ADE-847 and PC-459), else ``None``; see :func:`ignore_index`.
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
    unlabelled: int | None = None


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
        DatasetSpec(
            "ade847", "ADE847", 847, False, ("ADE20K_2021_17_01", "."),
            "images_detectron2/validation", "annotations_detectron2/validation", ".jpg", ".tif", None, "I;16",
            "get ADE20K_2021_17_01.zip (ADE20K full) and extract it into DATA_ROOT, then run "
            "`ovdense convert ade847 --data-root DATA_ROOT`",
            paper_column="ADE847", background_class=None, unlabelled=65535,
        ),
        DatasetSpec(
            "context459", "PC459", 459, False, ("VOCdevkit/VOC2010", "VOC2010", "."),
            "JPEGImages", "annotations_detectron2/pc459_val", ".jpg", ".tif",
            "ImageSets/SegmentationContext/val.txt", "I;16",
            "extract PASCAL VOC 2010 (VOCtrainval_03-May-2010.tar) into DATA_ROOT and PASCAL-Context's "
            "trainval.tar.gz (459-class .mat files) next to VOC2010, then run "
            "`ovdense convert pascal-context-459 --data-root DATA_ROOT`",
            paper_column="PC459", background_class=None, unlabelled=65535,
        ),
    )
}  # fmt: skip

#: The classic 8 benchmarks (SCLIP Table 1 and its successors; ``ovdense eval --eight``, the Avg8 column).
CLASSIC: tuple[str, ...] = (
    "voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k",
)  # fmt: skip
#: The large-vocabulary benchmarks with 16-bit labels (CorrCLIPv2's additions, CAT-Seg's preparation).
LARGE: tuple[str, ...] = ("ade847", "context459")


def ignore_index(spec: DatasetSpec, policy: str = "authors") -> int:
    """The label value the metric leaves out for ``spec`` under ``policy`` (one of :data:`IGNORE_POLICIES`).

    255 for the benchmarks whose unlabelled pixels are 255 (the classic 8), whatever the policy. For ADE-847 and
    PC-459: ``"authors"`` gives 255 (CorrCLIPv2's harness: class 255 is left out, 65535 pixels count in the union),
    ``"unlabelled"`` gives :attr:`DatasetSpec.unlabelled` (65535, CAT-Seg's evaluation).

    Raises:
        ValueError: an unknown policy.
    """
    if policy not in IGNORE_POLICIES:
        raise ValueError(f"unknown ignore policy {policy!r}; choose one of: {', '.join(IGNORE_POLICIES)}")
    if spec.unlabelled is None or policy == "authors":
        return 255
    return spec.unlabelled


#: Column titles of the papers' result tables (SCLIP Table 1 and its successors), in DATASETS order.
PAPER_COLUMNS: dict[str, str] = {name: spec.paper_column for name, spec in DATASETS.items()}
