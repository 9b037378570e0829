"""Label converters on tiny hand-made inputs, with hand-checked mappings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense.cli import main as cli_main
from ovdense.errors import OvdenseError
from ovdense.eval.convert import (
    COCO_STUFF_IDS,
    PASCAL_CONTEXT_59_IDS,
    cityscapes_lut,
    coco_object_lut,
    coco_stuff_lut,
    convert_cityscapes,
    convert_coco_object,
    convert_coco_stuff,
    convert_pascal_context,
    decode_rle,
)
from ovdense.eval.datasets import get_dataset


def _png(arr, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


# --- tables ------------------------------------------------------------------------------------------------


def test_coco_tables():
    assert len(COCO_STUFF_IDS) == 171
    lut = coco_stuff_lut()
    # person, bicycle; first id after the unused 11; last thing (toothbrush, 89); first and last stuff
    for cls_id, train_id in {
        0: 0,
        1: 1,
        10: 10,
        12: 11,
        26: 24,
        89: 79,
        91: 80,
        92: 81,
        181: 170,
        255: 255,
    }.items():
        assert lut[cls_id] == train_id, cls_id
    assert lut[11] == 255 and lut[90] == 255 and lut[182] == 255  # ids that never occur
    obj = coco_object_lut()
    for cls_id, inst in {0: 1, 1: 2, 12: 12, 89: 80, 91: 0, 181: 0, 255: 0}.items():
        assert obj[cls_id] == inst, cls_id
    from_train = coco_object_lut(from_train_ids=True)
    for train_id, inst in {0: 1, 79: 80, 80: 0, 170: 0, 255: 0}.items():
        assert from_train[train_id] == inst, train_id
    # both routes agree on every id a COCO-Stuff map can hold
    ids = np.array([*COCO_STUFF_IDS, 255])
    np.testing.assert_array_equal(obj[ids], from_train[lut[ids]])


def test_cityscapes_table():
    lut = cityscapes_lut()
    expected = {
        0: 255,
        1: 255,
        6: 255,
        7: 0,
        8: 1,
        9: 255,
        11: 2,
        17: 5,
        19: 6,
        20: 7,
        23: 10,
        24: 11,
        26: 13,
    }
    expected.update({29: 255, 30: 255, 31: 16, 33: 18, 34: 255, 255: 255})
    for label_id, train_id in expected.items():
        assert lut[label_id] == train_id, label_id
    assert sorted(set(lut.tolist()) - {255}) == list(range(19))


def test_pascal_context_ids():
    assert len(PASCAL_CONTEXT_59_IDS) == 60 and PASCAL_CONTEXT_59_IDS[0] == 0
    assert PASCAL_CONTEXT_59_IDS[1] == 2  # aeroplane is class 1
    assert PASCAL_CONTEXT_59_IDS[-1] == 458  # wood is class 59


# --- COCO ----------------------------------------------------------------------------------------------------


def test_convert_coco_stuff(tmp_path):
    raw = np.array([[0, 12, 91], [181, 255, 26]], np.uint8)
    src = _png(raw, tmp_path / "coco_stuff164k/annotations/val2017/000000000139.png")
    _png(np.zeros((2, 3)), tmp_path / "coco_stuff164k/annotations/val2017/000000000001_instanceTrainIds.png")
    res = convert_coco_stuff(tmp_path, progress=False, workers=1)
    assert (res.written, res.skipped) == (1, 0)
    out = src.with_name("000000000139_labelTrainIds.png")
    np.testing.assert_array_equal(_read(out), [[0, 11, 80], [170, 255, 24]])
    assert not (src.parent / "000000000001_instanceTrainIds_labelTrainIds.png").exists()  # outputs aren't inputs
    # idempotent: existing outputs are skipped unless asked
    out.write_bytes(out.read_bytes())
    mtime = out.stat().st_mtime_ns
    res = convert_coco_stuff(tmp_path / "coco_stuff164k", progress=False)
    assert (res.written, res.skipped) == (0, 1) and out.stat().st_mtime_ns == mtime
    res = convert_coco_stuff(tmp_path, overwrite=True, progress=False)
    assert (res.written, res.skipped) == (1, 0)
    assert not list(src.parent.glob(".*.tmp"))


def test_convert_coco_object_from_raw_maps(tmp_path):
    raw = np.array([[0, 12, 91], [181, 255, 89]], np.uint8)
    ann = tmp_path / "coco_stuff164k/annotations"
    _png(raw, ann / "val2017/000000000139.png")
    _png(raw, ann / "train2017/000000000009.png")
    res = convert_coco_object(tmp_path, progress=False)
    assert res.written == 2
    expected = [[1, 12, 0], [0, 0, 80]]  # person -> 1, stuff and unlabeled -> 0, toothbrush -> 80
    np.testing.assert_array_equal(_read(ann / "val2017/000000000139_instanceTrainIds.png"), expected)
    np.testing.assert_array_equal(_read(ann / "train2017/000000000009_instanceTrainIds.png"), expected)


def test_convert_coco_object_from_train_ids(tmp_path):
    ann = tmp_path / "coco_stuff164k/annotations/val2017"
    _png([[0, 79, 80], [170, 255, 11]], ann / "000000000139_labelTrainIds.png")
    res = convert_coco_object(tmp_path, progress=False)
    assert res.written == 1
    np.testing.assert_array_equal(_read(ann / "000000000139_instanceTrainIds.png"), [[1, 80, 0], [0, 0, 12]])


def test_coco_stuff_then_reader(tmp_path):
    root = tmp_path / "coco_stuff164k"
    _png(np.array([[0, 91], [255, 181]], np.uint8), root / "annotations/val2017/000000000139.png")
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(_dir(root / "images/val2017") / "000000000139.jpg")
    convert_coco_stuff(tmp_path, progress=False)
    convert_coco_object(tmp_path, progress=False)
    np.testing.assert_array_equal(get_dataset("coco_stuff", tmp_path)[0]["label"], [[0, 80], [255, 170]])
    np.testing.assert_array_equal(get_dataset("coco_object", tmp_path)[0]["label"], [[1, 0], [0, 0]])


def _dir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def test_coco_errors(tmp_path):
    with pytest.raises(OvdenseError, match="annotations"):
        convert_coco_stuff(tmp_path, progress=False)
    _dir(tmp_path / "coco_stuff164k/annotations/val2017")
    with pytest.raises(OvdenseError, match="no label maps"):
        convert_coco_object(tmp_path, progress=False)


# --- Cityscapes ------------------------------------------------------------------------------------------------


def test_convert_cityscapes(tmp_path):
    ids = np.array([[0, 7, 8], [26, 33, 18]], np.uint8)
    src = _png(ids, tmp_path / "cityscapes/gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png")
    _png(ids, tmp_path / "cityscapes/gtFine/train/bochum/bochum_000000_000019_gtFine_labelIds.png")
    _png(ids, tmp_path / "cityscapes/gtFine/test/berlin/berlin_000000_000019_gtFine_labelIds.png")
    res = convert_cityscapes(tmp_path, progress=False)
    assert res.written == 2  # train and val; test has no real labels
    out = src.with_name("aachen_000000_000019_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(_read(out), [[255, 0, 1], [13, 18, 255]])
    assert not (tmp_path / "cityscapes/gtFine/test/berlin/berlin_000000_000019_gtFine_labelTrainIds.png").exists()
    assert convert_cityscapes(tmp_path / "cityscapes", progress=False).skipped == 2


def test_cityscapes_errors(tmp_path):
    with pytest.raises(OvdenseError, match="gtFine"):
        convert_cityscapes(tmp_path, progress=False)
    _dir(tmp_path / "cityscapes/gtFine/val")
    with pytest.raises(OvdenseError, match="_gtFine_labelIds.png"):
        convert_cityscapes(tmp_path, progress=False)


# --- PASCAL-Context ----------------------------------------------------------------------------------------------


def _rle_string(counts: list[int]) -> str:
    """pycocotools rleToString, to build test inputs."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _rle(mask: np.ndarray, compressed: bool = True) -> dict:
    flat = mask.T.reshape(-1).astype(np.uint8)  # column-major
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": _rle_string(counts) if compressed else counts}


def test_decode_rle():
    # column-major runs 0,11,000: column 0 = (0, 1), column 1 = (1, 0), column 2 = (0, 0)
    assert decode_rle({"size": [2, 3], "counts": [1, 2, 3]}).tolist() == [[0, 1, 0], [1, 0, 0]]
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = (rng.random((13, 17)) > 0.6).astype(np.uint8)
        m[:, 5:] = 1  # long runs exercise multi-byte and negative deltas
        np.testing.assert_array_equal(decode_rle(_rle(m)), m)
        np.testing.assert_array_equal(decode_rle(_rle(m, compressed=False)), m)
    with pytest.raises(OvdenseError, match="corrupt RLE"):
        decode_rle({"size": [2, 3], "counts": [1, 2]})


def _context_json(path: Path, cats_val=(2, 458), extra_cat=None) -> None:
    h, w = 4, 5
    a = np.zeros((h, w), np.uint8)
    a[:2] = 1
    b = np.zeros((h, w), np.uint8)
    b[1:3, 2:] = 1  # overlaps a: painted later, wins
    c = np.ones((h, w), np.uint8)
    anns = [
        {"id": 1, "image_id": 10, "category_id": cats_val[0], "segmentation": _rle(a)},
        {"id": 2, "image_id": 10, "category_id": cats_val[1], "segmentation": _rle(b, compressed=False)},
        {"id": 3, "image_id": 11, "category_id": extra_cat or 115, "segmentation": _rle(c)},
    ]
    images = [
        {"image_id": 10, "file_name": "2008_000010.jpg", "height": h, "width": w, "phase": "val"},
        {"image_id": 11, "file_name": "2008_000002.jpg", "height": h, "width": w, "phase": "train"},
        {"image_id": 12, "file_name": "2008_000099.jpg", "height": h, "width": w, "phase": "test"},
    ]
    path.write_text(json.dumps({"images": images, "annos_segmentation": anns, "categories": []}))


def test_convert_pascal_context_json(tmp_path):
    voc = _dir(tmp_path / "VOCdevkit/VOC2010")
    _dir(voc / "JPEGImages")
    _context_json(tmp_path / "trainval_merged.json")
    res = convert_pascal_context(tmp_path, progress=False)  # finds trainval_merged.json in the data root
    assert res.written == 2
    val = _read(voc / "SegmentationClassContext/2008_000010.png")
    np.testing.assert_array_equal(
        val, [[1, 1, 1, 1, 1], [1, 1, 59, 59, 59], [0, 0, 59, 59, 59], [0, 0, 0, 0, 0]]
    )  # aeroplane (2) -> 1, wood (458) -> 59, unpainted -> 0
    train = _read(voc / "SegmentationClassContext/2008_000002.png")
    assert (train == PASCAL_CONTEXT_59_IDS.index(115)).all()
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000010\n"
    assert (voc / "ImageSets/SegmentationContext/train.txt").read_text() == "2008_000002\n"
    assert not (voc / "SegmentationClassContext/2008_000099.png").exists()
    again = convert_pascal_context(voc, source=tmp_path / "trainval_merged.json", progress=False)
    assert (again.written, again.skipped) == (0, 2)
    # the converted data reads as Context60 / Context59
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(voc / "JPEGImages/2008_000010.jpg")
    np.testing.assert_array_equal(get_dataset("context60", tmp_path)[0]["label"], val)
    c59 = get_dataset("context59", tmp_path)[0]["label"]
    assert c59[0, 0] == 0 and c59[3, 0] == 255 and c59[1, 3] == 58


def test_pascal_context_rejects_ids_outside_the_59(tmp_path):
    _dir(tmp_path / "VOC2010/JPEGImages")
    _context_json(tmp_path / "t.json", extra_cat=3)
    with pytest.raises(OvdenseError, match=r"2008_000002.*\[3\].*59"):
        convert_pascal_context(tmp_path, source=tmp_path / "t.json", progress=False)


def test_pascal_context_errors(tmp_path):
    with pytest.raises(OvdenseError, match="VOC2010"):
        convert_pascal_context(tmp_path, progress=False)
    _dir(tmp_path / "VOC2010/JPEGImages")
    with pytest.raises(OvdenseError, match="trainval_merged.json"):
        convert_pascal_context(tmp_path, progress=False)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(OvdenseError, match="not a PASCAL in Detail"):
        convert_pascal_context(tmp_path, source=tmp_path / "bad.json", progress=False)


def test_pascal_context_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    voc = _dir(tmp_path / "VOC2010")
    _dir(voc / "JPEGImages")
    _dir(voc / "ImageSets/Main")
    (voc / "ImageSets/Main/train.txt").write_text("2008_000002\n")
    (voc / "ImageSets/Main/val.txt").write_text("2008_000010\n2008_000011\n")
    mats = _dir(tmp_path / "trainval")
    sio.savemat(mats / "2008_000010.mat", {"LabelMap": np.array([[2, 3], [458, 459]], np.uint16)})
    sio.savemat(mats / "2008_000002.mat", {"LabelMap": np.array([[115, 1]], np.uint16)})
    res = convert_pascal_context(tmp_path, progress=False)
    assert res.written == 2
    np.testing.assert_array_equal(_read(voc / "SegmentationClassContext/2008_000010.png"), [[1, 0], [59, 0]])
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000010\n"


# --- command line --------------------------------------------------------------------------------------------


def test_cli_convert(tmp_path, capsys):
    _png([[0, 255]], tmp_path / "coco_stuff164k/annotations/val2017/000000000139.png")
    assert cli_main(["convert", "coco-stuff", "--data-root", str(tmp_path)]) == 0
    assert "wrote 1 label PNG" in capsys.readouterr().err
    assert cli_main(["convert", "coco-object", "--data-root", str(tmp_path), "--overwrite", "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli_main(["convert", "cityscapes", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdense: error: Cityscapes") and err.count("\n") == 1
