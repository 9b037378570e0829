"""Build the label PNGs the benchmark readers expect, as the references' converter scripts do.

=============================  ====================================================================
``ovdense convert``            reference script it reproduces
=============================  ====================================================================
``coco-stuff``                 mmseg ``tools/dataset_converters/coco_stuff164k.py``
``coco-object``                SCLIP/NACLIP/ClearCLIP ``datasets/cvt_coco_object.py`` (from GroupViT)
``cityscapes``                 mmseg ``tools/dataset_converters/cityscapes.py`` (cityscapesScripts)
``pascal-context``             mmseg ``tools/dataset_converters/pascal_context.py`` (``detail`` API)
=============================  ====================================================================

Every converter is idempotent: outputs that exist are skipped unless ``overwrite=True``, and each PNG is
written atomically (a temp file, then rename), so an interrupted run can simply be started again.
Outputs are 8-bit grey (``L``) PNGs of class indices, as the references write them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import OvdenseError
from .labels import read_label_png

__all__ = [
    "CITYSCAPES_LABELS",
    "COCO_STUFF_IDS",
    "PASCAL_CONTEXT_59_IDS",
    "ConvertResult",
    "cityscapes_lut",
    "coco_object_lut",
    "coco_stuff_lut",
    "convert_cityscapes",
    "convert_coco_object",
    "convert_coco_stuff",
    "convert_pascal_context",
    "decode_rle",
    "pascal_context_lut",
]

# --- tables (data) -----------------------------------------------------------------------------------

#: COCO-Stuff label-map ids (0-based COCO category id - 1) of the 80 things and 91 stuff classes, in
#: trainId order: trainId = position. The 11 ids missing from 0..90 are COCO thing categories that were
#: never annotated (mmseg ``coco_stuff164k.py`` ``clsID_to_trID``: 0->0 ... 10->10, 12->11, ..., 181->170).
COCO_STUFF_IDS: tuple[int, ...] = tuple(i for i in range(182) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90))
COCO_NUM_THINGS = 80

#: cityscapesScripts ``helpers/labels.py``: (labelId, name, trainId); trainId 255 = ignored in evaluation.
#: ``license plate`` (id -1) is never drawn into the label images.
CITYSCAPES_LABELS: tuple[tuple[int, str, int], ...] = (
    (0, "unlabeled", 255),
    (1, "ego vehicle", 255),
    (2, "rectification border", 255),
    (3, "out of roi", 255),
    (4, "static", 255),
    (5, "dynamic", 255),
    (6, "ground", 255),
    (7, "road", 0),
    (8, "sidewalk", 1),
    (9, "parking", 255),
    (10, "rail track", 255),
    (11, "building", 2),
    (12, "wall", 3),
    (13, "fence", 4),
    (14, "guard rail", 255),
    (15, "bridge", 255),
    (16, "tunnel", 255),
    (17, "pole", 5),
    (18, "polegroup", 255),
    (19, "traffic light", 6),
    (20, "traffic sign", 7),
    (21, "vegetation", 8),
    (22, "terrain", 9),
    (23, "sky", 10),
    (24, "person", 11),
    (25, "rider", 12),
    (26, "car", 13),
    (27, "truck", 14),
    (28, "bus", 15),
    (29, "caravan", 255),
    (30, "trailer", 255),
    (31, "train", 16),
    (32, "motorcycle", 17),
    (33, "bicycle", 18),
)

#: The 59 PASCAL-Context classes (ids of the 459-class ``labels.txt``) plus 0 = background, sorted; the new
#: label is the position (mmseg ``pascal_context.py`` ``_mapping``).
PASCAL_CONTEXT_59_IDS: tuple[int, ...] = tuple(
    sorted(
        (0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454,
         295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80,
         355, 85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115)
    )
)  # fmt: skip


def coco_stuff_lut() -> np.ndarray:
    """COCO-Stuff label-map id -> trainId (0..170); 255 (unlabeled) and ids outside the table -> 255.

    Returns:
        (256,) uint8 lookup table.
    """
    lut = np.full(256, 255, np.uint8)
    lut[list(COCO_STUFF_IDS)] = np.arange(len(COCO_STUFF_IDS), dtype=np.uint8)
    return lut


def coco_object_lut(from_train_ids: bool = False) -> np.ndarray:
    """COCO-Object labels: the 80 thing classes -> 1..80, every stuff class and unlabeled (255) -> 0.

    Args:
        from_train_ids: map COCO-Stuff trainIds (``*_labelTrainIds.png``) instead of raw label-map ids.

    Returns:
        (256,) uint8 lookup table; values that the source never holds map to 255.
    """
    lut = np.full(256, 255, np.uint8)
    ids = np.arange(len(COCO_STUFF_IDS)) if from_train_ids else np.array(COCO_STUFF_IDS)
    lut[ids[:COCO_NUM_THINGS]] = np.arange(1, COCO_NUM_THINGS + 1, dtype=np.uint8)
    lut[ids[COCO_NUM_THINGS:]] = 0
    lut[255] = 0
    return lut


def cityscapes_lut() -> np.ndarray:
    """Cityscapes labelId -> trainId (0..18, others 255).

    Returns:
        (256,) uint8 lookup table.
    """
    lut = np.full(256, 255, np.uint8)
    for label_id, _, train_id in CITYSCAPES_LABELS:
        lut[label_id] = train_id
    return lut


def pascal_context_lut(strict: bool = True) -> np.ndarray:
    """PASCAL-Context 459-class id -> 60-class label (0 = background, 1..59 in id order).

    Args:
        strict: ids outside the 60 map to 65535 (flagged as errors by the converter), else to 0.

    Returns:
        (460,) uint16 lookup table.
    """
    lut = np.full(460, 65535 if strict else 0, np.uint16)
    lut[list(PASCAL_CONTEXT_59_IDS)] = np.arange(len(PASCAL_CONTEXT_59_IDS), dtype=np.uint16)
    return lut


# --- common machinery ------------------------------------------------------------------------------------


@dataclass
class ConvertResult:
    """What a converter did: label PNGs written and existing ones skipped, and where they went."""

    written: int = 0
    skipped: int = 0
    out_dirs: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        where = ", ".join(str(d) for d in self.out_dirs)
        return f"wrote {self.written} label PNG(s), skipped {self.skipped} existing, in {where}"


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ..fileio import write_atomic

    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def _run_jobs(
    jobs: list[tuple[object, Path]],
    make: Callable[[object], np.ndarray],
    overwrite: bool,
    desc: str,
    progress: bool,
    workers: int | None,
    result: ConvertResult,
) -> None:
    from tqdm import tqdm

    from ..fileio import check_output_dir

    for folder in sorted({dst.parent for _, dst in jobs}):  # before any work: a folder we cannot fill
        check_output_dir(folder, flag=f"{desc}: output folder")
    todo = []
    for src, dst in jobs:
        if dst.exists() and not overwrite:
            result.skipped += 1
        else:
            todo.append((src, dst))
    if not todo:
        return

    def one(job):
        src, dst = job
        dst.parent.mkdir(parents=True, exist_ok=True)
        _save_png(make(src), dst)

    workers = workers or min(8, os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or None)
    try:
        if workers <= 1:
            for job in todo:
                one(job)
                bar.update()
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(one, todo):
                    bar.update()
    finally:
        bar.close()
    result.written += len(todo)


def _find_root(root: str | Path, candidates: Iterable[str], marker: str, what: str, hint: str) -> Path:
    root = Path(root)
    candidates = list(candidates)
    for rel in candidates:
        if (root / rel / marker).is_dir():
            return root / rel
    tried = ", ".join(str(root / rel / marker) for rel in candidates)
    raise OvdenseError(f"{what}: folder not found (tried {tried}); {hint}")


# --- COCO-Stuff / COCO-Object ------------------------------------------------------------------------------

_COCO_HINT = "expected coco_stuff164k/annotations/{train2017,val2017}/*.png (COCO-Stuff stuffthingmaps_trainval2017)"


def _raw_coco_maps(ann_dir: Path) -> list[Path]:
    return sorted(p for p in ann_dir.glob("*.png") if "TrainIds" not in p.name)


def _stem(path: Path) -> str:
    return path.name.split(".")[0]  # as the references: basename.split('.')[0]


def convert_coco_stuff(
    root: str | Path,
    overwrite: bool = False,
    splits: Iterable[str] = ("train2017", "val2017"),
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """COCO-Stuff164k label maps (ids 0..181, 255 unlabeled) -> ``*_labelTrainIds.png`` (171 classes).

    Reads ``annotations/<split>/*.png`` (files with ``TrainIds`` in their name are outputs, not inputs) and
    writes ``annotations/<split>/<stem>_labelTrainIds.png`` next to them with :func:`coco_stuff_lut`.

    Args:
        root: the ``coco_stuff164k`` folder, or the data root that holds it.
        splits: sub-folders of ``annotations`` to convert; missing ones are skipped.

    Raises:
        OvdenseError: no annotation folder or no label maps found.
    """
    root = _find_root(root, ("coco_stuff164k", "."), "annotations", "COCO-Stuff", _COCO_HINT)
    lut = coco_stuff_lut()

    def plan(ann_dir: Path):
        jobs = [(p, ann_dir / f"{_stem(p)}_labelTrainIds.png") for p in _raw_coco_maps(ann_dir)]
        return jobs, lut

    return _convert_coco_splits(root, splits, "COCO-Stuff", plan, overwrite, progress, workers)


def convert_coco_object(
    root: str | Path,
    overwrite: bool = False,
    splits: Iterable[str] = ("train2017", "val2017"),
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """COCO-Stuff164k label maps -> ``*_instanceTrainIds.png`` (COCO-Object: background 0 + 80 things).

    As SCLIP's ``datasets/cvt_coco_object.py``: reads the raw label maps ``annotations/<split>/*.png``; thing
    ids map to 1..80, every stuff id and unlabeled (255) to 0, so COCO-Object has no ignore pixels. Where a
    split holds no raw maps but ``*_labelTrainIds.png`` (from :func:`convert_coco_stuff`), those are used
    with the equivalent mapping (trainIds 0..79 -> 1..80, 80..170 and 255 -> 0).

    Args:
        root: the ``coco_stuff164k`` folder, or the data root that holds it.
        splits: sub-folders of ``annotations`` to convert; missing ones are skipped.

    Raises:
        OvdenseError: no annotation folder or no label maps found.
    """
    root = _find_root(root, ("coco_stuff164k", "."), "annotations", "COCO-Object", _COCO_HINT)

    def plan(ann_dir: Path):
        files = _raw_coco_maps(ann_dir)
        if files:
            return [(p, ann_dir / f"{_stem(p)}_instanceTrainIds.png") for p in files], coco_object_lut()
        suffix = "_labelTrainIds.png"
        files = sorted(ann_dir.glob(f"*{suffix}"))
        jobs = [(p, ann_dir / f"{p.name[: -len(suffix)]}_instanceTrainIds.png") for p in files]
        return jobs, coco_object_lut(from_train_ids=True)

    return _convert_coco_splits(root, splits, "COCO-Object", plan, overwrite, progress, workers)


def _convert_coco_splits(
    root: Path,
    splits: Iterable[str],
    title: str,
    plan: Callable[[Path], tuple[list[tuple[Path, Path]], np.ndarray]],
    overwrite: bool,
    progress: bool,
    workers: int | None,
) -> ConvertResult:
    """Per split folder of ``annotations``: ``plan(ann_dir)`` gives the (input, output) pairs and the lookup
    table applied to each input's indices; missing or empty splits are skipped, none at all is an error."""
    splits = tuple(splits)  # read twice: the loop and the error message
    result = ConvertResult()
    for split in splits:
        ann_dir = root / "annotations" / split
        if not ann_dir.is_dir():
            continue
        jobs, lut = plan(ann_dir)
        if not jobs:
            continue
        _run_jobs(
            jobs, lambda p, lut=lut: lut[read_label_png(p)], overwrite, f"{title} {split}", progress, workers, result
        )
        result.out_dirs.append(ann_dir)
    if not result.out_dirs:
        raise OvdenseError(f"{title}: no label maps in {root / 'annotations'}/{{{','.join(splits)}}}; {_COCO_HINT}")
    return result


# --- Cityscapes ----------------------------------------------------------------------------------------------

_CITY_HINT = "expected cityscapes/gtFine/{train,val}/<city>/*_gtFine_labelIds.png (gtFine_trainvaltest.zip)"


def convert_cityscapes(
    root: str | Path,
    overwrite: bool = False,
    splits: Iterable[str] = ("train", "val"),
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """Cityscapes ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png``.

    mmseg draws the trainId images from the ``*_polygons.json`` with cityscapesScripts' ``json2labelImg``;
    the released labelId PNGs are drawn by the same routine with ids instead, so mapping them through the
    official labelId -> trainId table (:data:`CITYSCAPES_LABELS`) gives the same images.

    Args:
        root: the ``cityscapes`` folder, or the data root that holds it.
        splits: sub-folders of ``gtFine`` to convert; missing ones are skipped.

    Raises:
        OvdenseError: no ``gtFine`` folder or no labelId PNGs found.
    """
    root = _find_root(root, ("cityscapes", "."), "gtFine", "Cityscapes", _CITY_HINT)
    lut = cityscapes_lut()
    suffix = "_gtFine_labelIds.png"
    result = ConvertResult()
    for split in splits:
        split_dir = root / "gtFine" / split
        files = sorted(split_dir.rglob(f"*{suffix}")) if split_dir.is_dir() else []
        if not files:
            continue
        jobs = [(p, p.with_name(p.name[: -len(suffix)] + "_gtFine_labelTrainIds.png")) for p in files]
        _run_jobs(
            jobs,
            lambda p: lut[read_label_png(p)],
            overwrite,
            f"Cityscapes {split}",
            progress,
            workers,
            result,
        )
        result.out_dirs.append(split_dir)
    if not result.out_dirs:
        raise OvdenseError(f"Cityscapes: no *{suffix} under {root / 'gtFine'}; {_CITY_HINT}")
    return result


# --- PASCAL-Context --------------------------------------------------------------------------------------------

_CONTEXT_HINT = (
    "pass --source trainval_merged.json (PASCAL in Detail annotations, as mmseg's converter) "
    "or the folder of PASCAL-Context trainval/*.mat files"
)


def _rle_counts(counts) -> list[int]:
    """COCO RLE counts: a list of ints, or the compressed string of pycocotools ``rleToString``."""
    if isinstance(counts, list):
        return [int(c) for c in counts]
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x = k = 0
        more = True
        while more:
            c = s[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def decode_rle(rle: dict) -> np.ndarray:
    """Decode one COCO run-length-encoded mask (``{"size": [h, w], "counts": str | list}``), as
    ``pycocotools.mask.decode``.

    Returns:
        HxW uint8 mask of 0/1.
    """
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(_rle_counts(rle["counts"]), dtype=np.int64)
    if counts.sum() != h * w or (counts < 0).any():
        raise OvdenseError(f"corrupt RLE mask: counts sum to {counts.sum()}, size is {h}x{w}")
    values = (np.arange(len(counts)) % 2).astype(np.uint8)
    return np.repeat(values, counts).reshape(w, h).T  # column-major, runs start with 0s


def _context_from_json(source: Path) -> tuple[dict[str, list[str]], dict[str, Callable[[], np.ndarray]]]:
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
        images, anns = data["images"], data["annos_segmentation"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OvdenseError(f"{source}: not a PASCAL in Detail annotation file ({err})") from None
    per_image: dict[int, list[dict]] = {}
    for ann in anns:  # json order, as Detail.getMask paints them (later annotations win)
        per_image.setdefault(ann["image_id"], []).append(ann)
    lut = pascal_context_lut(strict=True)
    splits: dict[str, list[str]] = {"train": [], "val": []}
    makers: dict[str, Callable[[], np.ndarray]] = {}

    def maker(img: dict, stem: str) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            mask = np.zeros((int(img["height"]), int(img["width"])), np.int64)
            for ann in per_image.get(img["image_id"], []):
                seg = ann["segmentation"]
                if not isinstance(seg, dict):
                    raise OvdenseError(f"{source}: image {stem}: segmentation is not an RLE mask")
                mask[decode_rle(seg) > 0] = int(ann["category_id"])
            return _map_context(mask, lut, f"{source}: image {stem}")

        return make

    for img in images:
        phase = img.get("phase")
        if phase not in splits:
            continue
        stem = Path(img["file_name"]).stem
        splits[phase].append(stem)
        makers[stem] = maker(img, stem)
    return splits, makers


def _map_context(ids: np.ndarray, lut: np.ndarray, where: str) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= len(lut)):
        raise OvdenseError(f"{where}: class id {int(ids.max())} outside the 459 PASCAL-Context classes")
    out = lut[ids]
    if (out == 65535).any():
        bad = sorted(set(np.unique(ids[out == 65535]).tolist()))
        raise OvdenseError(f"{where}: class ids {bad[:10]} are not among the 59 PASCAL-Context classes")
    return out.astype(np.uint8)


def _context_from_mat(source: Path, voc2010: Path) -> tuple[dict[str, list[str]], dict[str, Callable]]:
    try:
        from scipy.io import loadmat
    except ImportError:
        hint = "pip install 'ovdense[pascal-context]'"
        raise OvdenseError(f"reading PASCAL-Context .mat files needs scipy: {hint}") from None
    mats = {p.stem: p for p in sorted(source.glob("*.mat"))}
    if not mats:
        raise OvdenseError(f"no .mat files in {source}; {_CONTEXT_HINT}")
    splits: dict[str, list[str]] = {}
    for split in ("train", "val"):
        listing = voc2010 / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            raise OvdenseError(f"{listing} not found: the VOC2010 train/val lists define PASCAL-Context's splits")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        splits[split] = [i for i in ids if i in mats]
    lut = pascal_context_lut(strict=False)

    def maker(path: Path) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            try:
                label_map = np.asarray(loadmat(str(path))["LabelMap"], dtype=np.int64)
            except (OSError, ValueError, KeyError) as err:
                raise OvdenseError(f"cannot read LabelMap from {path}: {err}") from None
            return _map_context(label_map, lut, str(path))

        return make

    return splits, {stem: maker(p) for stem, p in mats.items()}


def convert_pascal_context(
    root: str | Path,
    source: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """PASCAL-Context (59 classes + background) labels -> ``VOC2010/SegmentationClassContext/*.png`` and
    ``VOC2010/ImageSets/SegmentationContext/{train,val}.txt``.

    Two sources:

    - ``trainval_merged.json`` (PASCAL in Detail; what mmseg's ``pascal_context.py`` reads with the ``detail``
      package): for each image of phase ``train``/``val``, the RLE masks of ``annos_segmentation`` are painted
      in file order with their ``category_id`` (``Detail.getMask``), then ids are mapped to 0..59 by their
      position in :data:`PASCAL_CONTEXT_59_IDS`; an id outside those 60 is an error (mmseg asserts the same).
      RLE is decoded here, so neither ``detail`` nor ``pycocotools`` is needed.
    - a folder of the original PASCAL-Context ``trainval/*.mat`` files (``LabelMap``: ids of the 459 classes):
      the 59 classes map as above and every other id to 0 (background). Splits come from
      ``VOC2010/ImageSets/Main/{train,val}.txt``. Needs scipy. This is the usual alternative, not checked
      pixel for pixel against the Detail route.

    Args:
        root: the ``VOC2010`` folder, or a folder holding ``VOC2010/`` or ``VOCdevkit/VOC2010/``.
        source: the JSON file or the ``.mat`` folder; ``None`` looks for ``trainval_merged.json`` in and
            next to ``root``, then for a ``trainval/`` folder.

    Raises:
        OvdenseError: VOC2010 or the source not found, unreadable, or holding unexpected class ids.
    """
    data_root = Path(root)
    voc2010 = _find_root(
        data_root, ("VOCdevkit/VOC2010", "VOC2010", "."), "JPEGImages", "PASCAL-Context",
        "extract VOCtrainval_03-May-2010.tar first",
    )  # fmt: skip
    if source is None:
        candidates = [d / "trainval_merged.json" for d in (data_root, voc2010, voc2010.parent)]
        candidates += [d / "trainval" for d in (data_root, voc2010, voc2010.parent)]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise OvdenseError(f"PASCAL-Context: no annotation source next to {data_root}; {_CONTEXT_HINT}")
        source = found[0]
    source = Path(source)
    if source.is_dir():
        splits, makers = _context_from_mat(source, voc2010)
    elif source.is_file():
        splits, makers = _context_from_json(source)
    else:
        raise OvdenseError(f"PASCAL-Context: annotation source {source} not found; {_CONTEXT_HINT}")
    if not any(splits.values()):
        raise OvdenseError(f"PASCAL-Context: {source} holds no train or val images")
    out_dir = voc2010 / "SegmentationClassContext"
    result = ConvertResult(out_dirs=[out_dir])
    stems = sorted({s for ids in splits.values() for s in ids})
    jobs = [(stem, out_dir / f"{stem}.png") for stem in stems]
    _run_jobs(jobs, lambda stem: makers[stem](), overwrite, "PASCAL-Context", progress, workers, result)
    list_dir = voc2010 / "ImageSets" / "SegmentationContext"
    list_dir.mkdir(parents=True, exist_ok=True)
    from ..fileio import write_atomic

    for split, ids in splits.items():
        text = "".join(f"{i}\n" for i in sorted(ids)).encode()
        write_atomic(list_dir / f"{split}.txt", lambda f, text=text: f.write(text))
    return result
