"""Build the label PNGs the benchmark readers expect, as the references' converter scripts do.

=============================  ====================================================================
``ovdense convert``            reference script it reproduces
=============================  ====================================================================
``coco-stuff``                 mmseg ``tools/dataset_converters/coco_stuff164k.py``
``coco-object``                SCLIP/NACLIP/ClearCLIP ``datasets/cvt_coco_object.py`` (from GroupViT)
``cityscapes``                 mmseg ``tools/dataset_converters/cityscapes.py`` (cityscapesScripts)
``pascal-context``             mmseg ``tools/dataset_converters/pascal_context.py`` (``detail`` API)
``ade847``                     CAT-Seg ``datasets/prepare_ade20k_full.py`` (validation only)
``pascal-context-459``         CAT-Seg ``datasets/prepare_pascal_context_459.py``
=============================  ====================================================================

Every converter is idempotent: outputs that exist are skipped unless ``overwrite=True``, and each file is
written atomically (a temp file, then rename), so an interrupted run can simply be started again.
Outputs are 8-bit grey (``L``) PNGs of class indices, as the references write them; ADE-847 and PC-459 get
16-bit (``I;16``) TIFFs with 65535 for unlabelled pixels, as CAT-Seg writes them.
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
    "ADE20K_847_IDS",
    "CITYSCAPES_LABELS",
    "COCO_STUFF_IDS",
    "PASCAL_CONTEXT_59_IDS",
    "UNLABELLED_16",
    "ConvertResult",
    "ade847_lut",
    "ade_full_class_mask",
    "ade_resize_shape",
    "cityscapes_lut",
    "coco_object_lut",
    "convert_ade847",
    "coco_stuff_lut",
    "convert_cityscapes",
    "convert_coco_object",
    "convert_coco_stuff",
    "convert_pascal_context",
    "convert_pascal_context_459",
    "decode_rle",
    "pascal_context_459_labels",
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


#: ADE20K-full object class indices (``R // 10 * 256 + G`` of an ``*_seg.png``) of the 847 ADE-847 classes, in class
#: order: class = position (CAT-Seg ``prepare_ade20k_full.py`` ``ADE20K_SEM_SEG_FULL_CATEGORIES``: ``id`` ->
#: ``trainId``; the names are ``classes/ade847.txt``).
ADE20K_847_IDS: tuple[int, ...] = (
    2978, 312, 2420, 2855, 2131, 976, 447, 165, 2377, 838, 350, 1831, 1125, 3055, 401, 1610, 1910, 2684, 471, 687,
    774, 2473, 2264, 1735, 2994, 1564, 1276, 2178, 2329, 57, 907, 913, 1395, 2138, 2272, 2128, 724, 155, 2053, 2380,
    689, 1788, 3087, 2530, 581, 2388, 2985, 2454, 2096, 137, 294, 212, 2185, 524, 2212, 943, 1869, 2251, 2793, 2423,
    1121, 266, 1948, 1744, 783, 571, 627, 629, 491, 1374, 223, 3016, 2598, 978, 239, 608, 236, 2531, 2616, 591, 327,
    2679, 1451, 181, 420, 2821, 1023, 855, 2733, 2928, 1240, 77, 1969, 2880, 14, 1936, 2828, 631, 103, 3144, 308,
    1282, 38, 1563, 29, 480, 2569, 247, 187, 778, 2243, 1941, 2833, 120, 95, 2836, 1087, 868, 1401, 220, 47, 843, 123,
    2537, 1927, 2337, 1702, 64, 249, 642, 1981, 609, 2840, 2586, 1393, 2704, 1304, 146, 1494, 2739, 389, 1551, 131,
    738, 161, 747, 1919, 3109, 2179, 2989, 206, 1930, 1002, 2254, 1708, 2526, 160, 2901, 2262, 44, 597, 2235, 1260,
    682, 2151, 3107, 432, 1098, 2932, 461, 410, 2046, 533, 1481, 1858, 894, 1322, 1891, 1756, 49, 1272, 1229, 2850,
    1784, 2962, 259, 319, 954, 1974, 1013, 2356, 97, 318, 592, 2885, 1017, 851, 1407, 1332, 303, 2714, 1924, 1346,
    1081, 1583, 2727, 2509, 2123, 602, 202, 10, 490, 530, 2213, 1884, 2934, 2687, 387, 2668, 982, 2547, 1474, 877,
    1391, 414, 698, 2019, 2422, 3010, 1139, 753, 1747, 2175, 1301, 1033, 1789, 2939, 2730, 1652, 90, 1349, 2830, 1485,
    2370, 2155, 118, 1402, 1957, 3130, 1197, 52, 2688, 96, 762, 772, 1857, 2315, 1016, 643, 3105, 1849, 791, 349, 6,
    3114, 1587, 1233, 559, 1223, 3049, 1943, 853, 709, 1390, 2748, 2007, 1546, 1513, 2600, 2538, 1790, 194, 326, 2877,
    594, 2036, 1662, 2366, 1754, 418, 2553, 1951, 1963, 918, 2086, 997, 2731, 704, 1365, 569, 3108, 948, 839, 63,
    1305, 378, 2362, 2734, 2982, 2398, 1119, 382, 1141, 1805, 3102, 2341, 1131, 2316, 2626, 3104, 198, 1896, 2800,
    190, 3131, 1463, 357, 929, 209, 912, 1164, 1509, 2539, 3116, 2615, 1644, 818, 242, 2217, 2347, 2686, 2300, 572,
    789, 358, 2443, 101, 2969, 2692, 606, 2339, 1533, 2060, 1782, 495, 371, 2707, 889, 3156, 2683, 1499, 1135, 1619,
    125, 2838, 2792, 1695, 746, 1343, 1370, 2858, 145, 2565, 1892, 1103, 286, 170, 3073, 922, 1655, 1602, 2160, 1151,
    2176, 2239, 132, 394, 1424, 607, 700, 116, 1425, 2676, 141, 2360, 2449, 897, 317, 2228, 2351, 1543, 656, 1088,
    373, 2472, 2892, 1740, 3067, 1367, 188, 79, 1633, 1885, 677, 1779, 1297, 2334, 3027, 2735, 1791, 2405, 1748, 2983,
    3035, 2824, 2168, 385, 2148, 2465, 175, 390, 268, 2722, 2857, 3088, 2926, 2782, 1378, 1934, 2072, 2889, 944, 1158,
    1383, 867, 2145, 1915, 361, 402, 482, 2761, 300, 1554, 636, 260, 1186, 871, 2859, 2103, 208, 2236, 2012, 2462,
    1462, 2832, 2617, 1024, 1129, 18, 376, 134, 407, 434, 2017, 2717, 2005, 2993, 1545, 1445, 2831, 1161, 2411, 2949,
    1769, 552, 2327, 939, 3013, 1986, 1486, 2723, 1549, 2649, 1020, 392, 422, 1419, 2099, 2464, 3058, 430, 675, 2941,
    2955, 2355, 840, 32, 2338, 1232, 2834, 2991, 2879, 444, 1657, 2246, 296, 245, 2661, 1202, 1714, 251, 1095, 1828,
    311, 2732, 947, 2115, 2738, 2525, 2194, 634, 740, 2682, 2020, 1156, 1036, 1295, 1181, 3037, 1614, 736, 893, 2047,
    1274, 1361, 3036, 2606, 2797, 2022, 2876, 2758, 472, 3028, 882, 1189, 743, 3122, 2401, 468, 1061, 1523, 3059,
    2843, 2853, 1529, 214, 3032, 3071, 277, 813, 426, 1039, 727, 1508, 2490, 2299, 768, 1172, 537, 1847, 1664, 1110,
    1014, 662, 121, 227, 2410, 2165, 2696, 3005, 1231, 635, 292, 2690, 65, 2607, 2574, 1188, 456, 2913, 459, 1955,
    827, 1111, 2412, 2997, 528, 366, 1863, 500, 1001, 1958, 1441, 809, 210, 435, 718, 1674, 388, 1572, 1584, 1944,
    674, 99, 2352, 1019, 1763, 185, 554, 1066, 2508, 951, 2822, 415, 297, 1914, 2619, 1338, 2505, 955, 2786, 238,
    3000, 2763, 299, 822, 1288, 3101, 2894, 992, 489, 2157, 2309, 1576, 1810, 2964, 2662, 2087, 1569, 503, 1505, 1468,
    1613, 1138, 1256, 2715, 2846, 477, 2576, 108, 2245, 1162, 2149, 2183, 858, 1324, 1055, 1741, 149, 615, 825, 2143,
    304, 283, 2322, 3017, 2510, 1960, 265, 2282, 2184, 1461, 3113, 2372, 2166, 232, 693, 1945, 3039, 2494, 1908, 2827,
    280, 2950, 1044, 288, 2863, 1342, 2409, 1258, 2249, 2862, 920, 1607, 2802, 610, 3129, 1108, 2823, 476, 2641, 2788,
    2070, 1368, 2903, 699, 2844, 942, 2663, 457, 2701, 2540, 2231, 2746, 1738, 2350, 2808, 2025, 2541, 2156, 126,
    2512, 831, 2503, 2039, 2774, 886, 919, 2240, 2636, 963, 1218, 1406, 1420, 526, 2639, 975, 1921, 2305, 1193, 2517,
    2809, 1647, 314, 2560, 545, 1345, 775, 603, 1163, 1641, 1678, 2450, 2915, 42, 2242, 2741, 1143, 862, 1654, 1826,
    1689, 3124, 2710, 152, 549, 360, 1982, 1478, 2203, 2612, 2956, 2681, 437, 2171, 1933, 3110, 1824, 2803, 234, 764,
    177, 817, 3145, 1262, 864, 2359, 2992, 1725, 2667, 2484, 1133, 1667, 2847, 932, 1392, 2573, 2140, 1046, 264, 2927,
    2752, 679, 2493, 1658, 2466, 1057, 2444, 2093, 2248, 2432, 726, 816, 1171, 2766, 2900, 2313, 488, 2265, 2043, 332,
    1771, 2320, 2646, 1089, 2826, 3148,
)  # fmt: skip

#: The label value of unlabelled pixels in the 16-bit labels (CAT-Seg's ADE-847 and PC-459).
UNLABELLED_16 = 65535


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
    """What a converter did: label files written and existing ones skipped, and where they went (``what``: the
    kind of output, for the message)."""

    written: int = 0
    skipped: int = 0
    out_dirs: list[Path] = field(default_factory=list)
    what: str = "label PNG(s)"

    def __str__(self) -> str:
        where = ", ".join(str(d) for d in self.out_dirs)
        return f"wrote {self.written} {self.what}, skipped {self.skipped} existing, in {where}"


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ..fileio import write_atomic

    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def _save_tif16(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    from ..fileio import write_atomic

    if arr.dtype != np.uint16:  # the caller's bug, never the data's: values were checked on the way
        raise TypeError(f"16-bit label expected, got {arr.dtype}")
    img = Image.fromarray(np.ascontiguousarray(arr))  # mode I;16, as CAT-Seg's Image.fromarray(uint16)
    write_atomic(path, lambda f: img.save(f, format="TIFF"))


def _run_jobs(
    jobs: list[tuple[object, Path]],
    make: Callable[[object], object],
    overwrite: bool,
    desc: str,
    progress: bool,
    workers: int | None,
    result: ConvertResult,
    save: Callable[[object, Path], None] = _save_png,
    done: Callable[[Path], bool] = Path.exists,
    out_dirs: Iterable[Path] = (),
) -> None:
    """Run ``save(make(src), dst)`` for every job whose output is not ``done`` (or every job with ``overwrite``),
    in ``workers`` threads; ``out_dirs``: folders written besides the outputs' own, checked first as well."""
    from tqdm import tqdm

    from ..fileio import check_output_dir

    for folder in sorted({dst.parent for _, dst in jobs} | set(out_dirs)):  # before any work: a folder we cannot fill
        check_output_dir(folder, flag=f"{desc}: output folder")
    todo = []
    for src, dst in jobs:
        if done(dst) and not overwrite:
            result.skipped += 1
        else:
            todo.append((src, dst))
    if not todo:
        return

    def one(job):
        src, dst = job
        dst.parent.mkdir(parents=True, exist_ok=True)
        save(make(src), dst)

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


def _loadmat() -> Callable:
    """scipy's ``loadmat``, or a one-line error naming the extra that installs it."""
    try:
        from scipy.io import loadmat
    except ImportError:
        hint = "pip install 'ovdense[pascal-context]'"
        raise OvdenseError(f"reading PASCAL-Context .mat files needs scipy: {hint}") from None
    return loadmat


def _context_from_mat(source: Path, voc2010: Path) -> tuple[dict[str, list[str]], dict[str, Callable]]:
    loadmat = _loadmat()
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


# --- ADE20K-847 (ADE20K full, CAT-Seg's preparation) ------------------------------------------------------------

_ADE_FULL_HINT = (
    "expected ADE20K_2021_17_01/images/ADE/validation/**/ADE_val_*.jpg with their *_seg.png "
    "(ADE20K_2021_17_01.zip from the ADE20K site)"
)
#: CAT-Seg resizes images whose short side exceeds this to it (labels nearest-neighbour).
ADE_MAX_SHORT_SIDE = 512


def ade847_lut() -> np.ndarray:
    """ADE20K-full object class index -> ADE-847 class (0..846); every other index (0 = unlabelled, and the
    classes outside the 847) -> 65535.

    Returns:
        (6656,) uint16 lookup table (``R // 10 * 256 + G`` of an 8-bit ``*_seg.png`` is at most 6655).
    """
    lut = np.full(25 * 256 + 256, UNLABELLED_16, np.uint16)
    lut[list(ADE20K_847_IDS)] = np.arange(len(ADE20K_847_IDS), dtype=np.uint16)
    return lut


def ade_full_class_mask(seg: np.ndarray) -> np.ndarray:
    """The object class index map of an ADE20K-full ``*_seg.png`` (HxWx3+ uint8): ``R // 10 * 256 + G`` (the
    ADE20K toolkit's ``loadAde20K``; ``int(R / 10)`` there is ``R // 10`` for 0..255).

    Returns:
        HxW int32.
    """
    r, g = seg[:, :, 0].astype(np.int32), seg[:, :, 1].astype(np.int32)
    return (r // 10) * 256 + g


def ade_resize_shape(h: int, w: int, max_size: int = ADE_MAX_SHORT_SIDE) -> tuple[int, int] | None:
    """CAT-Seg's rule: an image whose short side exceeds ``max_size`` is resized to short side ``max_size``, the
    long side ``round(long / short * max_size)`` (Python's round, halves to even).

    Returns:
        the new (H, W), or ``None`` to keep the size.
    """
    if w >= h > max_size:
        return max_size, round(w / float(h) * max_size)
    if h >= w > max_size:
        return round(h / float(w) * max_size), max_size
    return None


def _ade847_sample(img_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ADE20K-full validation image and its ADE-847 label, resized as CAT-Seg does."""
    import cv2
    from PIL import Image

    seg_path = img_path.with_name(img_path.name[: -len(".jpg")] + "_seg.png")
    seg = read_label_png(seg_path, rgb=True, what="ADE20K segmentation PNG")
    try:
        with Image.open(img_path) as im:
            img = np.asarray(im)  # as stored: CAT-Seg applies no EXIF rotation and no mode conversion
    except (OSError, ValueError) as err:
        raise OvdenseError(f"cannot read image {img_path}: {err}") from None
    if img.shape[:2] != seg.shape[:2]:
        raise OvdenseError(f"{seg_path} is {seg.shape[1]}x{seg.shape[0]} but {img_path} {img.shape[1]}x{img.shape[0]}")
    mask = ade_full_class_mask(seg)
    size = ade_resize_shape(*img.shape[:2])
    if size is not None:
        h_new, w_new = size
        img = cv2.resize(img, (w_new, h_new), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (w_new, h_new), interpolation=cv2.INTER_NEAREST)
    return img, ade847_lut()[mask]


def _save_ade847(sample: tuple[np.ndarray, np.ndarray], label_path: Path) -> None:
    """The image (JPEG, Pillow's default quality 75, as CAT-Seg's ``Image.fromarray(img).save``) and the label TIFF,
    renamed into place together: a label on disk means its image is complete."""
    from PIL import Image

    from ..fileio import write_group_atomic

    img, label = sample
    image_path = _ade847_image_for(label_path)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    pic = Image.fromarray(img)
    lab = Image.fromarray(np.ascontiguousarray(label, dtype=np.uint16))
    write_group_atomic(
        {image_path: lambda f: pic.save(f, format="JPEG"), label_path: lambda f: lab.save(f, format="TIFF")}
    )


def _ade847_image_for(label_path: Path) -> Path:
    """``annotations_detectron2/validation/X.tif`` -> ``images_detectron2/validation/X.jpg``."""
    return label_path.parents[2] / "images_detectron2" / label_path.parent.name / (label_path.stem + ".jpg")


def convert_ade847(
    root: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """ADE20K full (``ADE20K_2021_17_01``) -> ADE-847's ``images_detectron2/validation/*.jpg`` and
    ``annotations_detectron2/validation/*.tif``, as CAT-Seg's ``prepare_ade20k_full.py`` (validation only).

    Per image ``ADE_val_*.jpg`` under ``images/ADE/validation`` (CAT-Seg walks ``index_ade20k.pkl``, whose
    validation entries are these files; the pickle is not read here): the class map ``R // 10 * 256 + G`` of its
    ``*_seg.png`` (:func:`ade_full_class_mask`), then, where the short side exceeds 512, the image resized with
    OpenCV's bilinear and the map with its nearest-neighbour rule to short side 512 (:func:`ade_resize_shape`),
    then the map through :func:`ade847_lut` (65535 for unlabelled pixels and classes outside the 847). The image is
    re-encoded as JPEG at Pillow's default quality (as CAT-Seg, even when not resized) and the label written as
    a 16-bit TIFF.

    Args:
        root: the ``ADE20K_2021_17_01`` folder, or the data root that holds it.

    Raises:
        OvdenseError: no validation images, or an image without its ``*_seg.png`` or of another size.
    """
    root = _find_root(root, ("ADE20K_2021_17_01", "."), "images/ADE", "ADE20K-847", _ADE_FULL_HINT)
    src_dir = root / "images" / "ADE" / "validation"
    # CAT-Seg's split rule: file_name.split("_")[1] == "val"
    is_val = lambda p: p.is_file() and p.name.split("_")[1:2] == ["val"]  # noqa: E731
    images = sorted(p for p in src_dir.rglob("*.jpg") if is_val(p)) if src_dir.is_dir() else []
    if not images:
        raise OvdenseError(f"ADE20K-847: no ADE_val_*.jpg under {src_dir}; {_ADE_FULL_HINT}")
    names = [p.name for p in images]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise OvdenseError(f"ADE20K-847: two images named {dup} under {src_dir}: outputs are named by file name")
    label_dir = root / "annotations_detectron2" / "validation"
    image_dir = root / "images_detectron2" / "validation"
    jobs = [(p, label_dir / (p.name[: -len(".jpg")] + ".tif")) for p in images]
    result = ConvertResult(out_dirs=[image_dir, label_dir], what="image(s) with 16-bit label TIFF(s)")
    _run_jobs(
        jobs, _ade847_sample, overwrite, "ADE20K-847", progress, workers, result, save=_save_ade847,
        done=lambda dst: dst.exists() and _ade847_image_for(dst).exists(), out_dirs=[image_dir],
    )  # fmt: skip
    return result


# --- PASCAL-Context-459 (CAT-Seg's preparation) ------------------------------------------------------------------

_CONTEXT_459_HINT = "pass --source, the folder of PASCAL-Context's trainval/*.mat files (trainval.tar.gz)"


def pascal_context_459_labels(label_map: np.ndarray, where: str = "LabelMap") -> np.ndarray:
    """PASCAL-Context ``LabelMap`` (ids 1..459 of ``labels.txt``, 0 = unlabelled) -> PC-459 labels: ``id - 1`` in
    16 bits, so 0 wraps to 65535, as CAT-Seg's ``mask - 1`` on the uint16 ``LabelMap``.

    Returns:
        HxW uint16 (0..458, 65535 = unlabelled).

    Raises:
        OvdenseError: ids outside 0..459, or a map that is not 2-D integers.
    """
    arr = np.asarray(label_map)
    if arr.ndim != 2 or arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and (arr != np.round(arr)).any()):
        raise OvdenseError(f"{where}: expected a 2-D map of integer class ids, got {arr.dtype} of shape {arr.shape}")
    ids = arr.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > 459):
        raise OvdenseError(f"{where}: class ids {int(ids.min())}..{int(ids.max())} outside 0..459")
    return ((ids - 1) % 65536).astype(np.uint16)


def _pc459_val_ids(voc2010: Path) -> tuple[list[str], Path]:
    """The validation ids: the authors' split file, else CAT-Seg's list, else VOC2010's ``Main/val.txt``."""
    for listing in (
        voc2010 / "ImageSets" / "SegmentationContext" / "val.txt",  # what CorrCLIPv2's config reads
        voc2010 / "pascalcontext_val.txt",  # CAT-Seg's
        voc2010 / "ImageSets" / "Main" / "val.txt",  # PASCAL-Context's val = VOC2010 val
    ):
        if listing.is_file():
            ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
            if ids:
                return ids, listing
    raise OvdenseError(
        f"PASCAL-Context-459: no validation list in {voc2010} (ImageSets/SegmentationContext/val.txt, "
        "pascalcontext_val.txt or ImageSets/Main/val.txt); extract VOCtrainval_03-May-2010.tar first"
    )


def convert_pascal_context_459(
    root: str | Path,
    source: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
) -> ConvertResult:
    """PASCAL-Context ``trainval/*.mat`` -> PC-459's ``VOC2010/annotations_detectron2/pc459_val/*.tif``, as
    CAT-Seg's ``prepare_pascal_context_459.py`` (validation only; labels by :func:`pascal_context_459_labels`).

    The validation ids are those of ``ImageSets/SegmentationContext/val.txt`` (the split file the reader and
    CorrCLIPv2 use; :func:`convert_pascal_context` writes it), else of CAT-Seg's ``pascalcontext_val.txt``, else
    of VOC2010's ``ImageSets/Main/val.txt``; the first found that is not the split file is written as the split
    file. Every listed id needs its ``.mat`` (CAT-Seg skips missing ones silently; here it is an error). Needs
    scipy (the ``pascal-context`` extra).

    Args:
        root: the ``VOC2010`` folder, or a folder holding ``VOC2010/`` or ``VOCdevkit/VOC2010/``.
        source: the folder of ``.mat`` files; ``None`` looks for ``trainval/`` in and next to ``root``.

    Raises:
        OvdenseError: VOC2010, the list or the source not found, a listed id without its ``.mat``, or a
            ``LabelMap`` with ids outside 0..459.
    """
    loadmat = _loadmat()
    data_root = Path(root)
    voc2010 = _find_root(
        data_root, ("VOCdevkit/VOC2010", "VOC2010", "."), "JPEGImages", "PASCAL-Context-459",
        "extract VOCtrainval_03-May-2010.tar first",
    )  # fmt: skip
    if source is None:
        found = [d / "trainval" for d in (data_root, voc2010, voc2010.parent) if (d / "trainval").is_dir()]
        if not found:
            raise OvdenseError(f"PASCAL-Context-459: no trainval/ folder next to {data_root}; {_CONTEXT_459_HINT}")
        source = found[0]
    source = Path(source)
    if not source.is_dir():
        raise OvdenseError(f"PASCAL-Context-459: {source} is not a folder; {_CONTEXT_459_HINT}")
    ids, listing = _pc459_val_ids(voc2010)
    missing = [i for i in ids if not (source / f"{i}.mat").is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OvdenseError(f"PASCAL-Context-459: {listing} lists {missing[0]}{more}, not in {source}")

    def make(stem: str) -> np.ndarray:
        path = source / f"{stem}.mat"
        try:
            label_map = loadmat(str(path))["LabelMap"]
        except (OSError, ValueError, KeyError) as err:
            raise OvdenseError(f"cannot read LabelMap from {path}: {err}") from None
        return pascal_context_459_labels(label_map, str(path))

    out_dir = voc2010 / "annotations_detectron2" / "pc459_val"
    result = ConvertResult(out_dirs=[out_dir], what="16-bit label TIFF(s)")
    jobs = [(stem, out_dir / f"{stem}.tif") for stem in ids]
    _run_jobs(jobs, make, overwrite, "PASCAL-Context-459", progress, workers, result, save=_save_tif16)
    split = voc2010 / "ImageSets" / "SegmentationContext" / "val.txt"
    if not split.is_file():
        from ..fileio import write_atomic

        split.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(f"{i}\n" for i in ids).encode()
        write_atomic(split, lambda f: f.write(text))
        result.out_dirs.append(split)
    return result
