"""A tiny synthetic COCO panoptic set in the real layout (for tests of ``ovdense.eval.panoptic``).

``make_panoptic(tmp_path)`` writes ``val2017/*.jpg``, ``annotations/panoptic_val2017.json`` and
``annotations/panoptic_val2017/*.png`` and returns what a correct reader must give back. Every segment is
painted from rectangles (one from a triangle) on an id canvas; its expected box and area are written here by
hand from those shapes (and only cross-checked against the canvas), never computed by the code under test.

The set: 4 images in json order 285, 9, 42, 777 (neither id- nor name-sorted); image 9 is a grayscale JPEG;
image 42 has no annotation entry; image 777's PNG has a name of its own (``pan_777.png``). Categories are
listed out of id order, things 1, 3, 7 and stuff 92, 118, 200. Segment ids use the G and B channels.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["Broken", "ExpectedSegment", "FixturePanoptic", "break_panoptic", "encode_ids", "make_panoptic"]

#: The json's categories, deliberately not sorted by id.
CATEGORIES = [
    {"id": 92, "name": "banner", "isthing": 0, "supercategory": "textile", "color": [100, 170, 30]},
    {"id": 7, "name": "train", "isthing": 1, "supercategory": "vehicle", "color": [0, 80, 100]},
    {"id": 1, "name": "person", "isthing": 1, "supercategory": "person", "color": [220, 20, 60]},
    {"id": 200, "name": "wall-other-merged", "isthing": 0, "supercategory": "wall", "color": [102, 102, 156]},
    {"id": 3, "name": "car", "isthing": 1, "supercategory": "vehicle", "color": [0, 0, 142]},
    {"id": 118, "name": "floor-wood", "isthing": 0, "supercategory": "floor", "color": [250, 141, 255]},
]
#: Labels = index in id order: 1, 3, 7, 92, 118, 200.
LABELS = {1: 0, 3: 1, 7: 2, 92: 3, 118: 4, 200: 5}
CLASS_NAMES = [["person"], ["car"], ["train"], ["banner"], ["floor-wood"], ["wall-other-merged"]]
IS_THING = [True, True, True, False, False, False]


@dataclass(frozen=True)
class ExpectedSegment:
    """One ``segments_info`` entry and what the reader must make of it (box and area by hand)."""

    segment_id: int
    category_id: int
    label: int
    isthing: bool
    iscrowd: int
    box: tuple[float, float, float, float]
    area: float


@dataclass
class FixturePanoptic:
    """What :func:`make_panoptic` wrote.

    Attributes:
        data_root: the COCO folder (pass as ``data_root``).
        image_ids, file_names, png_names, sizes: per image in json order; sizes are (H, W).
        images: HxWx3 uint8, the JPEGs as decoded from disk (stored orientation, RGB).
        id_maps: HxW uint32, the segment ids painted into each PNG.
        segments: per image, every ``segments_info`` entry in json order (filtered ones too).
    """

    data_root: Path
    image_ids: list[int]
    file_names: list[str]
    png_names: list[str]
    sizes: list[tuple[int, int]]
    images: list[np.ndarray]
    id_maps: list[np.ndarray]
    segments: list[list[ExpectedSegment]]

    @property
    def ann_file(self) -> Path:
        return self.data_root / "annotations" / "panoptic_val2017.json"

    @property
    def png_dir(self) -> Path:
        return self.data_root / "annotations" / "panoptic_val2017"

    @property
    def img_dir(self) -> Path:
        return self.data_root / "val2017"

    def expected(self, i: int, max_segments: int = 100, min_size: float = 8, max_size: float = 1024):
        """The segments of image ``i`` the reader must keep: the first ``max_segments`` entries whose
        hand-written area lies in ``[min_size**2, max_size**2]``."""
        return [s for s in self.segments[i][:max_segments] if min_size**2 <= s.area <= max_size**2]


def encode_ids(ids: np.ndarray) -> np.ndarray:
    """HxW segment ids -> HxWx3 uint8 RGB, ``id = R + 256 G + 256^2 B`` (panopticapi ``id2rgb``)."""
    ids = ids.astype(np.uint32)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def _seg(sid, cat, box, area, iscrowd=0) -> ExpectedSegment:
    thing = IS_THING[LABELS[cat]]
    return ExpectedSegment(sid, cat, LABELS[cat], thing, iscrowd, tuple(float(v) for v in box), float(area))


def _rects(*rects):
    """Inclusive (y0, y1, x0, x1) rectangles -> a painter."""

    def paint(h, w):
        m = np.zeros((h, w), bool)
        for y0, y1, x0, x1 in rects:
            m[y0 : y1 + 1, x0 : x1 + 1] = True
        return m

    return paint


def _triangle(h, w):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy >= 10) & (yy <= 40) & (xx >= 10) & (xx <= 50) & (xx >= yy)


# Per image: (id, file, (H, W), mode, png name or None for no annotation entry, segments).
# A segment: (expected, painter, json bbox). Things' expected boxes come from the json bbox (deliberately not
# the painted one for 66049); stuff boxes from the painted shape: min and max pixel index, area (x1-x0)*(y1-y0).
_IMAGES = [
    (285, "000000000285.jpg", (80, 96), "RGB", "000000000285.png", [
        # thing, json bbox with fractions (x, y, w, h) -> (x, y, x + w, y + h), area w * h = 31 * 41.5
        (_seg(1 + 2 * 256 + 65536, 1, (9.5, 4.25, 40.5, 45.75), 1286.5), _rects((5, 44, 10, 39)),
         [9.5, 4.25, 31.0, 41.5]),
        # tiny stuff: 5 rows x 10 cols -> box (80, 2, 89, 6), area 9 * 4 = 36 < 64
        (_seg(3, 92, (80, 2, 89, 6), 36), _rects((2, 6, 80, 89)), [80, 2, 10, 5]),
        # irregular stuff (L shape), json bbox ignored for stuff: box (5, 20, 84, 69), area 79 * 49
        (_seg(2 + 256, 200, (5, 20, 84, 69), 3871), _rects((50, 69, 5, 70), (20, 49, 60, 84)), [5, 20, 80, 50]),
        # tiny thing: 7 * 8 = 56 < 64
        (_seg(4, 3, (85, 70, 92, 78), 56), _rects((70, 77, 85, 91)), [85, 70, 7, 8]),
        # crowd thing, kept like any other
        (_seg(5 + 2 * 65536, 3, (0, 72, 41, 80), 328, iscrowd=1), _rects((72, 79, 0, 40)), [0, 72, 41, 8]),
    ]),
    (9, "000000000009.jpg", (48, 64), "L", "000000000009.png", [
        # tiny thing first: with max_segments=2 only the next one can be kept
        (_seg(7 + 255 * 256 + 255 * 65536, 7, (1, 1, 7, 7), 36), _rects((1, 6, 1, 6)), [1, 1, 6, 6]),
        (_seg(256, 118, (0, 20, 63, 47), 1701), _rects((30, 47, 0, 63), (20, 29, 0, 15)), [0, 20, 64, 28]),
        (_seg(11, 1, (20, 2, 40, 17), 300), _rects((2, 16, 20, 39)), [20.0, 2.0, 20.0, 15.0]),
        (_seg(65536, 92, (45, 5, 60, 24), 285), _rects((5, 24, 45, 60)), [45, 5, 16, 20]),
        (_seg(12 + 7 * 256, 7, (40, 25, 64, 30), 120), _rects((25, 29, 40, 63)), [40, 25, 24, 5]),
    ]),
    (42, "000000000042.jpg", (60, 72), "RGB", None, []),
    (777, "000000000777.jpg", (64, 80), "RGB", "pan_777.png", [
        # triangle 10 <= y <= 40, 10 <= x <= 50, x >= y: box (10, 10, 50, 40), area 40 * 30
        (_seg(1 + 256 + 65536, 200, (10, 10, 50, 40), 1200), _triangle, [10, 10, 41, 31]),
        # 9x9 pixels: box (5, 50, 13, 58), area 8 * 8 = 64, exactly min_size**2: kept
        (_seg(5 + 9 * 256, 92, (5, 50, 13, 58), 64), _rects((50, 58, 5, 13)), [5, 50, 9, 9]),
        (_seg(3, 1, (55, 45, 75, 60), 300), _rects((45, 59, 55, 74)), [55, 45, 20, 15]),
    ]),
]  # fmt: skip


def _image(rng: np.random.Generator, size: tuple[int, int], mode: str) -> np.ndarray:
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + yy) * 127 // (h + w)], -1)
    img = np.clip(base + rng.integers(-20, 21, size=(h, w, 3)), 0, 255).astype(np.uint8)
    return img[:, :, 0] if mode == "L" else img


def _check_stuff_box(mask: np.ndarray, seg: ExpectedSegment) -> None:
    # cross-check of the hand-written stuff box against what was painted
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    assert seg.box == (cols.min(), rows.min(), cols.max(), rows.max()), (seg, rows, cols)
    assert seg.area == (cols.max() - cols.min()) * (rows.max() - rows.min())


def make_panoptic(root: str | Path, seed: int = 0) -> FixturePanoptic:
    """Write the synthetic COCO panoptic val2017 set under ``root`` (the COCO folder) and return the truth."""
    root = Path(root)
    img_dir, png_dir = root / "val2017", root / "annotations" / "panoptic_val2017"
    img_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    fx = FixturePanoptic(root, [], [], [], [], [], [], [])
    images_json, anns_json = [], []
    for image_id, file_name, (h, w), mode, png_name, segs in _IMAGES:
        Image.fromarray(_image(rng, (h, w), mode)).save(img_dir / file_name, format="JPEG", quality=95)
        with Image.open(img_dir / file_name) as im:
            assert im.mode == mode
            decoded = np.asarray(im.convert("RGB")).copy()
        ids = np.zeros((h, w), np.uint32)
        infos = []
        for seg, paint, bbox in segs:
            mask = paint(h, w)
            assert not ids[mask].any(), "fixture segments must not overlap"
            ids[mask] = seg.segment_id
            if not seg.isthing:
                _check_stuff_box(mask, seg)
            info = {"id": seg.segment_id, "category_id": seg.category_id, "iscrowd": seg.iscrowd, "bbox": bbox}
            infos.append({**info, "area": int(mask.sum())})
        png = png_name or file_name.replace("jpg", "png")
        Image.fromarray(encode_ids(ids), mode="RGB").save(png_dir / png)
        images_json.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        if png_name is not None:
            anns_json.append({"image_id": image_id, "file_name": png_name, "segments_info": infos})
        fx.image_ids.append(image_id)
        fx.file_names.append(file_name)
        fx.png_names.append(png)
        fx.sizes.append((h, w))
        fx.images.append(decoded)
        fx.id_maps.append(ids)
        fx.segments.append([seg for seg, _, _ in segs])
    anns_json.reverse()  # annotations in another order than images: matched by image_id
    data = {"info": {}, "images": images_json, "annotations": anns_json, "categories": CATEGORIES}
    fx.ann_file.write_text(json.dumps(data))
    return fx


# --- broken variants ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Broken:
    """A broken variant: build ``CocoPanoptic(data_root)``; the error comes from the constructor when
    ``index`` is None, else from ``ds[index]``; its one-line message must contain every string of ``needles``."""

    data_root: Path
    index: int | None
    needles: tuple[str, ...]


BROKEN_KINDS = (
    "no_root", "no_json", "bad_json", "json_no_images", "json_no_categories", "no_png_dir", "no_image_dir",
    "missing_image", "missing_png", "png_size", "segment_absent", "unknown_category",
)  # fmt: skip


def _edit_json(fx: FixturePanoptic, edit) -> None:
    data = json.loads(fx.ann_file.read_text())
    edit(data)
    fx.ann_file.write_text(json.dumps(data))


def _ann_of(data: dict, image_id: int) -> dict:
    return next(a for a in data["annotations"] if a["image_id"] == image_id)


def break_panoptic(fx: FixturePanoptic, kind: str) -> Broken:
    """Break the set written by :func:`make_panoptic` in place in one way (``kind`` from :data:`BROKEN_KINDS`)."""
    root = fx.data_root
    if kind == "no_root":
        return Broken(root / "nope", None, (str(root / "nope"),))
    if kind == "no_json":
        fx.ann_file.unlink()
        return Broken(root, None, (str(fx.ann_file),))
    if kind == "bad_json":
        fx.ann_file.write_text('{"images": [\n  {"id": 1,,}\n')
        return Broken(root, None, (str(fx.ann_file), "JSON"))
    if kind in ("json_no_images", "json_no_categories"):
        key = kind.removeprefix("json_no_")
        _edit_json(fx, lambda d: d.pop(key))
        return Broken(root, None, (str(fx.ann_file), f"'{key}'"))
    if kind == "no_png_dir":
        shutil.rmtree(fx.png_dir)
        return Broken(root, None, (str(fx.png_dir),))
    if kind == "no_image_dir":
        shutil.rmtree(fx.img_dir)
        return Broken(root, None, (str(fx.img_dir),))
    if kind == "missing_image":
        (fx.img_dir / fx.file_names[1]).unlink()
        return Broken(root, 1, (str(fx.img_dir / fx.file_names[1]),))
    if kind == "missing_png":
        (fx.png_dir / fx.png_names[3]).unlink()
        return Broken(root, 3, (str(fx.png_dir / fx.png_names[3]), fx.file_names[3]))
    if kind == "png_size":
        h, w = fx.sizes[0]
        Image.fromarray(encode_ids(fx.id_maps[0][: h - 3, : w - 5])).save(fx.png_dir / fx.png_names[0])
        return Broken(root, 0, (str(fx.png_dir / fx.png_names[0]), fx.file_names[0], f"{w - 5}x{h - 3}", f"{w}x{h}"))
    if kind == "segment_absent":
        # a listed segment (the 2nd of image 9, a stuff one) whose id was never painted
        def edit(d):
            _ann_of(d, fx.image_ids[1])["segments_info"][1]["id"] = 4242

        _edit_json(fx, edit)
        return Broken(root, 1, (fx.file_names[1], "4242"))
    if kind == "unknown_category":
        sid = fx.segments[3][2].segment_id

        def edit(d):
            _ann_of(d, fx.image_ids[3])["segments_info"][2]["category_id"] = 999

        _edit_json(fx, edit)
        return Broken(root, 3, (fx.file_names[3], "999", str(sid)))
    raise ValueError(f"unknown kind {kind!r}")
