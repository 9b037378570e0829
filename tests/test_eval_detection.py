"""OV-COCO / COCO box-AP evaluation (ovdense.eval.detection) on a tiny hand-made COCO file: fast and offline."""

from __future__ import annotations

import csv
import json
import math
from importlib import resources

import numpy as np
import pytest

from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.eval.detection import (
    COCO_2017_CATEGORIES,
    OVCategories,
    detections_to_coco,
    evaluate_ov_coco,
    load_coco_annotations,
    ov_coco_categories,
    write_detection_report,
)

# CLIPSelf's F-ViT/datasets/mscoco_65_classes.json, in its order (the label order of the 65 text embeddings).
MSCOCO_65 = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "kite", "skateboard", "surfboard", "bottle", "cup", "fork", "knife",
    "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "cake", "chair",
    "couch", "bed", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "toothbrush",
]  # fmt: skip
NOVEL_17 = [
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup", "knife",
    "cake", "couch", "keyboard", "sink", "scissors",
]  # fmt: skip

ID = {name: i for i, name in COCO_2017_CATEGORIES}
PERSON, CAR, AIRPLANE, CAT, TRAFFIC_LIGHT = ID["person"], ID["car"], ID["airplane"], ID["cat"], ID["traffic light"]


def _ann(ann_id, image_id, category_id, bbox, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


def tiny_coco() -> dict:
    """4 images: 1 and 4 with base and novel classes, 2 with a crowd box too, 3 with only a class outside the 65."""
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 200, "height": 150} for i in (1, 2, 3, 4)]
    annotations = [
        _ann(11, 1, PERSON, [10.0, 10.0, 40.0, 80.0]),
        _ann(12, 1, PERSON, [100.0, 20.0, 30.0, 60.0]),
        _ann(13, 1, AIRPLANE, [60.0, 5.0, 50.0, 20.0]),
        _ann(21, 2, CAT, [20.0, 30.0, 60.0, 50.0]),
        _ann(22, 2, CAR, [100.0, 60.0, 80.0, 40.0]),
        _ann(23, 2, PERSON, [0.0, 0.0, 200.0, 150.0], iscrowd=1),  # ignored by COCOeval, not counted in num_gt
        _ann(31, 3, TRAFFIC_LIGHT, [50.0, 50.0, 10.0, 30.0]),
        _ann(41, 4, PERSON, [30.0, 40.0, 50.0, 90.0]),
        _ann(42, 4, TRAFFIC_LIGHT, [150.0, 10.0, 10.0, 30.0]),
    ]
    categories = [{"id": i, "name": n, "supercategory": "x"} for i, n in COCO_2017_CATEGORIES]
    return {"info": {}, "images": images, "annotations": annotations, "categories": categories}


def write(tmp_path, dataset, name="instances.json"):
    path = tmp_path / name
    path.write_text(json.dumps(dataset) if not isinstance(dataset, str) else dataset)
    return path


def perfect(dataset, categories: OVCategories, score=0.9) -> list[dict]:
    """Detections equal to the non-crowd ground truth of the evaluated categories."""
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score}
        for a in dataset["annotations"]
        if not a["iscrowd"] and a["category_id"] in categories.ids
    ]


def by_name(metrics):
    return {c.name: c for c in metrics.per_class}


def test_split_files_give_the_65_in_mscoco_65_order():
    cats = ov_coco_categories([{"id": i, "name": n} for i, n in COCO_2017_CATEGORIES])
    assert list(cats.names) == MSCOCO_65
    assert [n for n, nv in zip(cats.names, cats.novel, strict=True) if nv] == NOVEL_17
    assert len(cats.base_ids) == 48 and len(cats.novel_ids) == 17
    assert cats.ids == tuple(ID[n] for n in MSCOCO_65)
    assert cats.index_of(ID["toothbrush"]) == 64
    with pytest.raises(InvalidArgumentError):
        cats.index_of(TRAFFIC_LIGHT)
    for name, count in (("ov_coco_base.txt", 48), ("ov_coco_novel.txt", 17)):
        lines = (resources.files("ovdense.eval") / "classes" / name).read_text().splitlines()
        assert len(lines) == count and [ID[n] for n in lines] == sorted(ID[n] for n in lines)  # COCO-id order


def test_categories_map_by_name_whatever_the_ids_and_order():
    # a file with other ids, listed backwards: label k still means the k-th name of mscoco_65_classes.json
    cats = ov_coco_categories([{"id": 1000 + k, "name": n} for k, n in reversed(list(enumerate(MSCOCO_65)))])
    assert list(cats.names) == MSCOCO_65 and cats.ids == tuple(range(1000, 1065))


def test_perfect_detections(tmp_path, capsys):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    m = evaluate_ov_coco(coco, cats, perfect(data, cats))
    assert capsys.readouterr().out == ""  # pycocotools' prints are captured, not shown
    assert "Average Precision" in m.log
    rows = by_name(m)
    present = {"person", "car", "airplane", "cat"}
    for name, row in rows.items():
        if name in present:
            assert row.ap50 == pytest.approx(100.0), name
        else:
            assert math.isnan(row.ap50), name
    assert rows["airplane"].split == "novel" and rows["person"].split == "base"
    assert rows["person"].num_gt == 3 and rows["car"].num_gt == 1 and rows["bus"].num_gt == 0  # crowd not counted
    assert m.novel_ap50 == pytest.approx(100.0) and m.base_ap50 == pytest.approx(100.0)
    assert m.all_ap50 == pytest.approx(100.0)
    assert m.coco_stats["mAP_50"] == pytest.approx(100.0)
    assert m.num_images == 3 and m.num_dropped == 0 and m.num_detections == 6


def test_wrong_class_detection_lowers_only_that_class(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    dets = perfect(data, cats)
    # the cat box called "airplane", ranked above airplane's one true positive
    dets.append({"image_id": 2, "category_id": AIRPLANE, "bbox": [20.0, 30.0, 60.0, 50.0], "score": 0.95})
    m = evaluate_ov_coco(coco, cats, dets)
    rows = by_name(m)
    # airplane: FP then TP -> precision 0 at recall 0, 1/2 at recall 1; COCO's interpolated precision (max over
    # higher recall) is 1/2 at all 101 recall points -> AP50 = 50
    assert rows["airplane"].ap50 == pytest.approx(50.0)
    for name in ("person", "car", "cat"):
        assert rows[name].ap50 == pytest.approx(100.0), name
    ap = {c.name: c.ap50 for c in m.per_class}
    assert m.novel_ap50 == pytest.approx(np.nanmean([ap[n] for n in NOVEL_17]))
    assert m.base_ap50 == pytest.approx(np.nanmean([ap[n] for n in MSCOCO_65 if n not in NOVEL_17]))
    assert m.all_ap50 == pytest.approx(np.nanmean([ap[n] for n in MSCOCO_65]))
    assert (m.novel_ap50, m.base_ap50, m.all_ap50) == pytest.approx((75.0, 100.0, 87.5))


def test_out_of_split_image_excluded_for_ov_coco_included_for_coco(tmp_path):
    data = tiny_coco()
    path = write(tmp_path, data)
    false_positive = {"image_id": 3, "category_id": PERSON, "bbox": [50.0, 50.0, 10.0, 30.0], "score": 0.95}

    coco, cats = load_coco_annotations(path, "ov-coco")
    assert sorted(coco.getImgIds()) == [1, 2, 4] and coco.ovdense_excluded_image_ids == {3}
    assert TRAFFIC_LIGHT not in coco.getCatIds() and len(coco.getCatIds()) == 65
    assert all(a["category_id"] != TRAFFIC_LIGHT for a in coco.dataset["annotations"])
    m = evaluate_ov_coco(coco, cats, [*perfect(data, cats), false_positive])
    assert by_name(m)["person"].ap50 == pytest.approx(100.0)
    assert m.num_dropped == 1 and m.num_images == 3

    coco80, cats80 = load_coco_annotations(path, "coco")
    assert len(cats80.ids) == 80 and not any(cats80.novel) and sorted(coco80.getImgIds()) == [1, 2, 3, 4]
    m80 = evaluate_ov_coco(coco80, cats80, [*perfect(data, cats80), false_positive])
    # person: FP (0.95) then 3 TPs -> interpolated precision 3/4 everywhere
    assert by_name(m80)["person"].ap50 == pytest.approx(75.0)
    assert by_name(m80)["traffic light"].ap50 == pytest.approx(100.0)
    assert math.isnan(m80.novel_ap50) and m80.base_ap50 == pytest.approx(m80.all_ap50)
    assert m80.num_images == 4 and m80.num_dropped == 0


def test_unknown_image_or_category_in_detections(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    with pytest.raises(InvalidArgumentError, match="image_id 99"):
        evaluate_ov_coco(coco, cats, [{"image_id": 99, "category_id": PERSON, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(InvalidArgumentError, match="category_id 10"):
        evaluate_ov_coco(coco, cats, [{"image_id": 1, "category_id": 10, "bbox": [0, 0, 1, 1], "score": 1}])
    with pytest.raises(InvalidArgumentError, match="score"):
        evaluate_ov_coco(coco, cats, [{"image_id": 1, "category_id": PERSON, "bbox": [0, 0, 1, 1]}])


def test_detections_are_not_modified(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    dets = perfect(data, cats)
    before = json.dumps(dets)
    evaluate_ov_coco(coco, cats, dets)
    assert json.dumps(dets) == before  # loadRes adds area/id/segmentation to what it is given: it gets copies


def test_empty_detections(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    m = evaluate_ov_coco(coco, cats, [])
    rows = by_name(m)
    for name in ("person", "car", "airplane", "cat"):
        assert rows[name].ap50 == 0.0, name
    assert math.isnan(rows["bus"].ap50)
    assert (m.novel_ap50, m.base_ap50, m.all_ap50) == (0.0, 0.0, 0.0)
    assert m.coco_stats["mAP"] == 0.0 and m.num_detections == 0


def _without(key):
    def edit(d):
        del d[key]

    return edit


def _ann_without(key):
    def edit(d):
        del d["annotations"][3][key]

    return edit


def _bbox(value):
    def edit(d):
        d["annotations"][3]["bbox"] = value

    return edit


def _lvis(d):
    d["categories"] = [{"id": 1, "name": "aerosol_can"}, {"id": 2, "name": "air_conditioner"}]
    for a in d["annotations"]:
        a["category_id"] = 1


@pytest.mark.parametrize(
    ("edit", "benchmark", "expected"),
    [
        (_without("images"), "ov-coco", "no 'images'"),
        (_without("annotations"), "ov-coco", "no 'annotations'"),
        (_without("categories"), "coco", "no 'categories'"),
        (_ann_without("image_id"), "ov-coco", "annotation 21 has no 'image_id'"),
        (_ann_without("category_id"), "ov-coco", "annotation 21 has no 'category_id'"),
        (_ann_without("bbox"), "ov-coco", "annotation 21 has no 'bbox'"),
        (_bbox([1.0, 2.0, 3.0]), "ov-coco", "annotation 21 has bbox [1.0, 2.0, 3.0], not 4 numbers"),
        (_bbox([1.0, 2.0, "3", 4.0]), "ov-coco", "annotation 21 has bbox"),
        (_bbox([1.0, 2.0, 0.0, 4.0]), "ov-coco", "annotation 21 has a box of width 0.0"),
        (_bbox([1.0, 2.0, 3.0, -1.0]), "coco", "annotation 21 has a box of width 3.0 and height -1.0"),
        (_lvis, "ov-coco", "no category named 'person'"),
        (_lvis, "coco", "no category named 'person'"),
    ],
)
def test_schema_errors(tmp_path, edit, benchmark, expected):
    data = tiny_coco()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(OvdenseError) as info:
        load_coco_annotations(path, benchmark)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_unreadable_and_not_json(tmp_path):
    for path, expected in (
        (tmp_path / "missing.json", "cannot read"),
        (write(tmp_path, "{not json", "broken.json"), "is not JSON"),
        (write(tmp_path, "[1, 2]", "list.json"), "not a COCO instances file"),
    ):
        with pytest.raises(OvdenseError) as info:
            load_coco_annotations(path, "ov-coco")
        assert expected in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InvalidArgumentError, match="unknown detection benchmark"):
        load_coco_annotations(write(tmp_path, tiny_coco()), "lvis")


def test_ov_coco_file_is_not_a_coco_file(tmp_path):
    data = tiny_coco()
    data["categories"] = [c for c in data["categories"] if c["name"] in MSCOCO_65]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != TRAFFIC_LIGHT]
    path = write(tmp_path, data)
    load_coco_annotations(path, "ov-coco")  # the 65-class file (as instances_val2017_all_2.json) is fine
    with pytest.raises(OvdenseError, match="no category named 'traffic light'.*15 of the 80"):
        load_coco_annotations(path, "coco")
    data["categories"].append({"id": 200, "name": "person"})
    with pytest.raises(OvdenseError, match="2 categories named 'person'"):
        load_coco_annotations(write(tmp_path, data), "ov-coco")


def test_detections_to_coco():
    cats = ov_coco_categories([{"id": i, "name": n} for i, n in COCO_2017_CATEGORIES])
    boxes = np.array([[10.1, 20.2, 30.3, 60.7], [0.5, 0.5, 1.5, 2.25], [5.0, 6.0, 7.0, 9.0]], dtype=np.float32)
    scores = np.array([0.9, 0.8, 0.7], dtype=np.float32)
    labels = np.array([4, 0, 4])
    out = detections_to_coco(7, boxes, scores, labels, cats)
    # grouped by label (stable), as mmdet's per-class arrays; w = x2 - x1 of the float32 values, no +1, no rounding
    assert [d["category_id"] for d in out] == [PERSON, AIRPLANE, AIRPLANE]
    assert [d["score"] for d in out] == [float(np.float32(0.8)), float(np.float32(0.9)), float(np.float32(0.7))]
    x1, y1, x2, y2 = (float(v) for v in boxes[0])
    assert out[1]["bbox"] == [x1, y1, x2 - x1, y2 - y1]
    assert out[2]["bbox"] == [5.0, 6.0, 2.0, 3.0]
    assert all(d["image_id"] == 7 and isinstance(d["bbox"][0], float) for d in out)
    assert detections_to_coco(7, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int), cats) == []
    with pytest.raises(InvalidArgumentError, match="labels"):
        detections_to_coco(7, boxes, scores, np.array([0, 65, 1]), cats)
    with pytest.raises(InvalidArgumentError, match="K x 4"):
        detections_to_coco(7, boxes[:, :3], scores, labels, cats)


def test_round_trip_through_detections_to_coco(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    dets = []
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32)
        labels = np.array([cats.index_of(a["category_id"]) for a in anns])
        dets += detections_to_coco(image_id, boxes, np.full(len(anns), 0.9, np.float32), labels, cats)
    m = evaluate_ov_coco(coco, cats, dets)
    assert m.all_ap50 == pytest.approx(100.0) and m.num_detections == 6


def test_write_detection_report(tmp_path):
    data = tiny_coco()
    coco, cats = load_coco_annotations(write(tmp_path, data), "ov-coco")
    dets = perfect(data, cats)
    dets.append({"image_id": 2, "category_id": AIRPLANE, "bbox": [20.0, 30.0, 60.0, 50.0], "score": 0.95})
    m = evaluate_ov_coco(coco, cats, dets)
    out = tmp_path / "report"
    paths = write_detection_report(m, out, settings={"benchmark": "ov-coco"})
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "per_class.csv", "results.md"]  # no temp files
    assert sorted(p.name for p in paths) == ["metrics.json", "per_class.csv", "results.md"]

    js = json.loads((out / "metrics.json").read_text())
    assert (js["novel_ap50"], js["base_ap50"], js["all_ap50"]) == (75.0, 100.0, 87.5)
    assert js["settings"] == {"benchmark": "ov-coco"} and js["num_images"] == 3
    per = {r["class"]: r for r in js["per_class"]}
    assert len(per) == 65 and per["airplane"]["AP50"] == 50.0 and per["bus"]["AP50"] is None
    assert per["airplane"] == {"class": "airplane", "category_id": AIRPLANE, "split": "novel", "AP50": 50.0,
                               "num_gt": 1}  # fmt: skip
    assert json.loads(m.to_json()) == {k: v for k, v in js.items() if k != "settings"}

    rows = list(csv.DictReader((out / "per_class.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == MSCOCO_65
    assert rows[MSCOCO_65.index("airplane")] == {
        "class": "airplane", "category_id": str(AIRPLANE), "split": "novel", "num_gt": "1", "AP50": "50.0000"
    }  # fmt: skip
    assert rows[MSCOCO_65.index("bus")]["AP50"] == "nan"

    md = (out / "results.md").read_text()
    lines = md.splitlines()
    assert lines[:3] == ["| novel AP50 | base AP50 | all AP50 |", "|---|---|---|", "| 75.00 | 100.00 | 87.50 |"]
    assert f"| airplane | novel | {AIRPLANE} | 1 | 50.00 |" in lines
    assert f"| bus | novel | {ID['bus']} | 0 | nan |" in lines
    assert f"| person | base | {PERSON} | 3 | 100.00 |" in lines
