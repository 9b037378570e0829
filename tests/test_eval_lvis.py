"""OV-LVIS evaluation (ovdense.eval.lvis) with the official lvis package, on a tiny LVIS-format file the test writes
(the 1203 LVIS v1 categories synthesized from the OV-LVIS split files), and ``eval-det --benchmark ov-lvis`` end to
end on a tiny random OV-LVIS F-ViT."""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.eval.lvis import (
    LVISCategories,
    detections_to_lvis,
    evaluate_ov_lvis,
    load_lvis_annotations,
    lvis_table,
    numpy_float_alias,
    write_lvis_report,
)

try:  # through ovdense, which keeps lvis' logging.basicConfig off the root logger (a plain import would not)
    from ovdense.eval.lvis import _import_lvis

    LVIS = _import_lvis()[0]
except OvdenseError:
    pytest.skip("OV-LVIS evaluation needs the lvis package (pip install 'ovdense[lvis]')", allow_module_level=True)


def _split(name: str) -> list[str]:
    text = resources.files("ovdense.eval").joinpath("classes", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


BASE, NOVEL = _split("ov_lvis_base.txt"), _split("ov_lvis_novel.txt")


def lvis_categories() -> list[dict]:
    """LVIS v1's 1203 categories as the split files give them: ids 1..866 the base names (frequency alternating f /
    c), 867..1203 the novel names (r). Each split keeps its file's (LVIS id) order, which is what the loader checks;
    the real file interleaves the two splits by id, which it accepts as well."""
    cats = [{"id": i + 1, "name": n, "frequency": "fc"[i % 2], "synonyms": [n]} for i, n in enumerate(BASE)]
    cats += [{"id": len(BASE) + i + 1, "name": n, "frequency": "r"} for i, n in enumerate(NOVEL)]
    return cats


ID = {c["name"]: c["id"] for c in lvis_categories()}
FREQ = {c["name"]: c["frequency"] for c in lvis_categories()}
# Two base classes (one frequent, one common) and one rare class with ground truth.
FREQUENT, COMMON, RARE = BASE[0], BASE[1], NOVEL[0]
OTHER_RARE = NOVEL[1]
assert (FREQ[FREQUENT], FREQ[COMMON], FREQ[RARE]) == ("f", "c", "r")


def _rect(x, y, w, h) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ann(ann_id, image_id, name, bbox, rle_of=None):
    x, y, w, h = bbox
    seg = _rect(x, y, w, h)
    if rle_of is not None:  # an uncompressed-free compressed RLE of the same rectangle
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, *rle_of))
        seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
    return {"id": ann_id, "image_id": image_id, "category_id": ID[name], "bbox": [x, y, w, h], "area": w * h,
            "segmentation": seg}  # fmt: skip


def tiny_lvis() -> dict:
    """3 images (COCO file names only in coco_url, as LVIS v1): image 1 with a frequent and a rare object, 2 with a
    common one (RLE) and the rare class in its negative list, 3 with the frequent class not exhaustively annotated."""
    sizes = {1: (90, 120), 2: (80, 100), 3: (96, 96)}
    images = [
        {"id": i, "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg", "height": h, "width": w,
         "neg_category_ids": [], "not_exhaustive_category_ids": []}
        for i, (h, w) in sizes.items()
    ]  # fmt: skip
    images[1]["neg_category_ids"] = [ID[RARE], ID[OTHER_RARE]]
    images[2]["not_exhaustive_category_ids"] = [ID[FREQUENT]]
    annotations = [
        _ann(1, 1, FREQUENT, [10.0, 10.0, 40.0, 30.0]),
        _ann(2, 1, RARE, [60.0, 40.0, 30.0, 40.0]),
        _ann(3, 2, COMMON, [20.0, 20.0, 50.0, 40.0], rle_of=sizes[2]),
        _ann(4, 3, FREQUENT, [5.0, 50.0, 30.0, 30.0]),
    ]
    return {"info": {}, "images": images, "annotations": annotations, "categories": lvis_categories()}


def write(tmp_path, dataset, name="lvis_v1_val.json"):
    path = tmp_path / name
    path.write_text(json.dumps(dataset))
    return path


def _gt_rle(ann, image) -> dict:
    seg = ann["segmentation"]
    if isinstance(seg, dict):
        return dict(seg)
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, image["height"], image["width"]))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def perfect(dataset, score=0.9) -> list[dict]:
    images = {img["id"]: img for img in dataset["images"]}
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": score,
         "segmentation": _gt_rle(a, images[a["image_id"]])}
        for a in dataset["annotations"]
    ]  # fmt: skip


def by_name(metrics):
    return {c.name: c for c in metrics.per_class}


def test_categories_follow_the_split_files(tmp_path):
    gt, cats = load_lvis_annotations(write(tmp_path, tiny_lvis()))
    assert isinstance(cats, LVISCategories) and isinstance(gt, LVIS)
    assert len(cats.ids) == 1203 and cats.ids == tuple(sorted(cats.ids))
    assert sum(cats.novel) == 337 and set(cats.names) == set(BASE) | set(NOVEL)
    assert all(n == (f == "r") for n, f in zip(cats.novel, cats.frequency, strict=True))
    # Real LVIS v1 interleaves the splits by id; any id assignment that keeps each split's order is accepted.
    data = tiny_lvis()
    order = sorted(data["categories"], key=lambda c: (c["name"] != RARE, c["id"]))  # the rare class first
    remap = {c["id"]: i + 1 for i, c in enumerate(order)}
    for c in data["categories"]:
        c["id"] = remap[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = remap[a["category_id"]]
    for img in data["images"]:
        img["neg_category_ids"] = [remap[i] for i in img["neg_category_ids"]]
        img["not_exhaustive_category_ids"] = [remap[i] for i in img["not_exhaustive_category_ids"]]
    _, cats2 = load_lvis_annotations(write(tmp_path, data, "remapped.json"))
    assert cats2.names[0] == RARE and cats2.ids[0] == 1


def test_perfect_detections_give_100_for_present_classes(tmp_path, capsys):
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    dets = perfect(data)
    before = copy.deepcopy(dets)
    for iou_type in ("segm", "bbox"):
        m = evaluate_ov_lvis(gt, cats, dets, iou_type=iou_type)
        assert m.iou_type == iou_type
        for key in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
            assert m[key] == pytest.approx(100.0), (iou_type, key)
        rows = by_name(m)
        for name in (FREQUENT, COMMON, RARE):
            assert rows[name].ap == pytest.approx(100.0) and rows[name].ap50 == pytest.approx(100.0)
        assert rows[FREQUENT].num_gt == 2 and rows[RARE].split == "novel" and rows[RARE].frequency == "r"
        assert math.isnan(rows[OTHER_RARE].ap) and math.isnan(rows[OTHER_RARE].ap50)  # no ground truth
        assert [m.novel_ap50, m.base_ap50, m.all_ap50] == pytest.approx([100.0] * 3)
        assert m.num_images == 3 and m.num_detections == 4
        assert "Average Precision" in m.log  # lvis' print_results went into the log ...
    assert capsys.readouterr().out == ""  # ... not to stdout
    assert dets == before  # not modified
    assert not hasattr(np, "float")  # the alias lvis needs is gone again


def test_apr_is_over_rare_classes_only_and_federated(tmp_path):
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    dets = perfect(data)
    # A better-scored false positive of the rare class on image 2, whose negative list holds it: AP50 of RARE = 50.
    dets.append({"image_id": 2, "category_id": ID[RARE], "bbox": [0.0, 0.0, 10.0, 10.0], "score": 0.95,
                 "segmentation": _gt_rle({"segmentation": _rect(0, 0, 10, 10)}, data["images"][1])})  # fmt: skip
    # Not scored: a class that image 1 neither has nor lists as negative; an unmatched detection of a class that
    # image 3 does not annotate exhaustively.
    for image_id, name, box in ((1, COMMON, [0.0, 0.0, 20.0, 20.0]), (3, FREQUENT, [60.0, 0.0, 20.0, 20.0])):
        img = data["images"][image_id - 1]
        dets.append({"image_id": image_id, "category_id": ID[name], "bbox": box, "score": 0.99,
                     "segmentation": _gt_rle({"segmentation": _rect(*box)}, img)})  # fmt: skip
    m = evaluate_ov_lvis(gt, cats, dets)
    rows = by_name(m)
    assert rows[RARE].ap50 == pytest.approx(50.0) and m["APr"] == pytest.approx(50.0)
    assert m["APc"] == pytest.approx(100.0) and m["APf"] == pytest.approx(100.0)
    assert m["AP"] == pytest.approx((100 + 100 + 50) / 3)
    assert m.novel_ap50 == pytest.approx(50.0) and m.base_ap50 == pytest.approx(100.0)


def test_empty_detections_and_limits(tmp_path):
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    m = evaluate_ov_lvis(gt, cats, [])
    assert m["AP"] == 0.0 and m["APr"] == 0.0 and m.num_detections == 0
    assert by_name(m)[RARE].ap == 0.0 and math.isnan(by_name(m)[OTHER_RARE].ap)
    # image_ids: image 1 only (no common class there: APc undefined)
    m1 = evaluate_ov_lvis(gt, cats, perfect(data), image_ids=[1])
    assert m1.num_images == 1 and m1["APf"] == pytest.approx(100.0) and math.isnan(m1["APc"])
    assert by_name(m1)[FREQUENT].num_gt == 1
    # max_dets: 300 per image as LVISResults; a 1 keeps only the best of image 1's two
    m2 = evaluate_ov_lvis(gt, cats, perfect(data), max_dets=1, iou_type="bbox")
    assert m2["AP"] < 100.0 and "AR@1" in m2.summary
    assert not hasattr(np, "float")


def test_bad_detections_and_arguments(tmp_path):
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    good = perfect(data)[0]
    cases = [
        ({k: v for k, v in good.items() if k != "segmentation"}, "has no 'segmentation'"),
        ({**good, "image_id": 99}, "image_id 99, which is not in the annotation file"),
        ({**good, "category_id": 5000}, "category_id 5000, not one of the 1203"),
        ({**good, "bbox": [1.0, 2.0]}, "needs a bbox of 4 finite numbers"),
        ({**good, "segmentation": {"size": [1, 1], "counts": "0"}}, "compressed RLE"),
    ]
    for det, message in cases:
        with pytest.raises(InvalidArgumentError, match=message):
            evaluate_ov_lvis(gt, cats, [det])
    # box AP needs no segmentation
    assert evaluate_ov_lvis(gt, cats, [cases[0][0]], iou_type="bbox").num_detections == 1
    with pytest.raises(InvalidArgumentError, match="iou_type"):
        evaluate_ov_lvis(gt, cats, [], iou_type="keypoints")
    with pytest.raises(InvalidArgumentError, match="image_ids"):
        evaluate_ov_lvis(gt, cats, [], image_ids=[42])
    assert not hasattr(np, "float")


def _without(key):
    def edit(d):
        del d[key]

    return edit


def _img(key, value=None):
    def edit(d):
        if value is None:
            del d["images"][1][key]
        else:
            d["images"][1][key] = value

    return edit


def _ann_without(key):
    def edit(d):
        del d["annotations"][2][key]

    return edit


def _cat(name, key, value):
    def edit(d):
        next(c for c in d["categories"] if c["name"] == name)[key] = value

    return edit


def _swap(d):
    a, b = (next(c for c in d["categories"] if c["name"] == n) for n in (BASE[3], BASE[4]))
    a["id"], b["id"] = b["id"], a["id"]


def _drop_category(d):
    d["categories"] = [c for c in d["categories"] if c["name"] != NOVEL[-1]]


def _coco(d):
    d["categories"] = [{"id": 1, "name": "person", "supercategory": "person"}]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (_without("images"), "has no 'images' list"),
        (_without("annotations"), "has no 'annotations' list"),
        (_img("coco_url"), "image 2 has no 'coco_url'"),
        (_img("height"), "image 2 needs positive integer 'height' and 'width'"),
        (_img("neg_category_ids"), "image 2 has no 'neg_category_ids' list"),
        (_img("not_exhaustive_category_ids"), "image 2 has no 'not_exhaustive_category_ids' list"),
        (_ann_without("segmentation"), "annotation 3 has no 'segmentation'"),
        (_ann_without("area"), "annotation 3 has no 'area'"),
        (_ann_without("category_id"), "annotation 3 has no 'category_id'"),
        (_cat(RARE, "frequency", "c"), f"({RARE!r}) has frequency 'c', but OV-LVIS lists it in ov_lvis_novel.txt"),
        (_cat(COMMON, "frequency", "r"), f"({COMMON!r}) has frequency 'r', but OV-LVIS lists it in ov_lvis_base.txt"),
        (_cat(COMMON, "frequency", None), "has frequency None, not 'r', 'c' or 'f'"),
        (_cat(COMMON, "name", "unicorn"), "named 'unicorn', which is not an LVIS v1 class"),
        (_swap, f"not in LVIS v1's id order: the 4th of ov_lvis_base.txt by id is {BASE[4]!r}"),
        (_drop_category, "has 1202 categories; LVIS v1 has 1203"),
        (_coco, "category 1 ('person') has frequency None"),
    ],
)
def test_schema_errors_are_one_line(tmp_path, edit, expected):
    data = tiny_lvis()
    edit(data)
    path = write(tmp_path, data)
    with pytest.raises(OvdenseError) as info:
        load_lvis_annotations(path)
    message = str(info.value)
    assert expected in message and str(path) in message and "\n" not in message


def test_unreadable_and_not_json(tmp_path):
    with pytest.raises(OvdenseError, match="cannot read the annotation file"):
        load_lvis_annotations(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(OvdenseError, match="is not JSON"):
        load_lvis_annotations(tmp_path / "bad.json")


# pycocotools' mask.decode (used here to rebuild the ground-truth masks) warns under NumPy 2; nothing of ours.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_detections_to_lvis_round_trip(tmp_path):
    from ovdense.detection.result import DetectionResult

    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    dets = []
    for img in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=np.float32)
        masks = np.stack([mask_utils.decode({**_gt_rle(a, img), "counts": _gt_rle(a, img)["counts"].encode()})
                          for a in anns]).astype(bool)  # fmt: skip
        labels = np.array([cats.index_of(a["category_id"]) for a in anns])
        result = DetectionResult(boxes, np.full(len(anns), 0.9, np.float32), labels, list(cats.names),
                                 (img["height"], img["width"]), masks)  # fmt: skip
        out = detections_to_lvis(img["id"], result, cats)
        assert [d["category_id"] for d in out] == sorted(d["category_id"] for d in out)  # grouped by label
        for d in out:
            assert list(d) == ["image_id", "bbox", "score", "category_id", "segmentation"]  # mmdet's _segm2json
            assert isinstance(d["segmentation"]["counts"], str)
            assert d["segmentation"]["size"] == [img["height"], img["width"]]
        dets += out
    m = evaluate_ov_lvis(gt, cats, dets)
    assert m["AP"] == pytest.approx(100.0) and m["APr"] == pytest.approx(100.0)
    # box-only results (no masks) and names written with spaces are fine; other classes are refused
    result = DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), [n.replace("_", " ") for n in cats.names],
                             (10, 10))  # fmt: skip
    assert detections_to_lvis(1, result, cats) == []
    with pytest.raises(InvalidArgumentError, match="class 0 is 'cat'"):
        detections_to_lvis(1, DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int),
                                              ["cat", *cats.names[1:]], (10, 10)), cats)  # fmt: skip


def test_write_lvis_report(tmp_path):
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    m = evaluate_ov_lvis(gt, cats, perfect(data))
    m.box = evaluate_ov_lvis(gt, cats, perfect(data), iou_type="bbox")
    out = tmp_path / "report"
    paths = write_lvis_report(m, out, settings={"benchmark": "ov-lvis"})
    assert sorted(p.name for p in paths) == sorted(p.name for p in out.iterdir()) == [
        "metrics.json", "per_class.csv", "results.md"
    ]  # fmt: skip
    js = json.loads((out / "metrics.json").read_text())
    assert js["APr"] == 100.0 and js["iou_type"] == "segm" and js["box"]["APr"] == 100.0
    assert js["settings"] == {"benchmark": "ov-lvis"} and "per_class" not in js["box"]
    per = {r["class"]: r for r in js["per_class"]}
    assert len(per) == 1203 and per[OTHER_RARE]["AP"] is None
    assert per[RARE] == {"class": RARE, "category_id": ID[RARE], "frequency": "r", "split": "novel", "num_gt": 1,
                         "AP": 100.0, "AP50": 100.0, "box_AP": 100.0, "box_AP50": 100.0}  # fmt: skip
    assert json.loads(m.to_json()) == {k: v for k, v in js.items() if k != "settings"}
    rows = list(csv.DictReader((out / "per_class.csv").read_text().splitlines()))
    assert len(rows) == 1203 and rows[0]["class"] == BASE[0] and rows[-1]["AP"] == "nan"
    assert set(rows[0]) == {"class", "category_id", "frequency", "split", "num_gt", "AP", "AP50", "box_AP", "box_AP50"}
    md = (out / "results.md").read_text()
    assert "| mask | 100.00" in md and "| box | 100.00" in md and RARE in md
    assert RARE not in lvis_table(m, per_class=False)


def test_numpy_alias_is_temporary():
    assert not hasattr(np, "float")
    with numpy_float_alias():
        assert np.float is float
    assert not hasattr(np, "float")


def test_importing_lvis_leaves_the_root_logger_alone(tmp_path):
    # A fresh interpreter: lvis/__init__.py calls logging.basicConfig at import.
    code = (
        "import logging, sys, numpy as np\n"
        "from ovdense.eval.lvis import _import_lvis\n"
        "root = logging.getLogger(); before = (list(root.handlers), root.level)\n"
        "_import_lvis()\n"
        "assert 'lvis' in sys.modules\n"
        "assert (list(root.handlers), root.level) == before, (root.handlers, root.level)\n"
        "assert not hasattr(np, 'float')\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    logger = logging.getLogger("lvis")
    handlers = list(logger.handlers)
    data = tiny_lvis()
    gt, cats = load_lvis_annotations(write(tmp_path, data))
    evaluate_ov_lvis(gt, cats, perfect(data))
    assert list(logger.handlers) == handlers and logger.propagate


# -- eval-det --benchmark ov-lvis end to end -----------------------------------------------------------------------


def write_lvis_root(root, dataset):
    """ROOT/annotations/lvis_v1_val.json and ROOT/val2017/<coco_url name> random images of the file's sizes."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for img in dataset["images"]:
        pixels = (rng.random((img["height"], img["width"], 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "val2017" / img["coco_url"].rsplit("/", 1)[-1])
    (root / "annotations" / "lvis_v1_val.json").write_text(json.dumps(dataset))


def test_eval_det_ov_lvis_end_to_end(tmp_path, capsys):
    from ovdense.cli import main
    from ovdense.detection.checkpoint import save_safetensors
    from ovdense.detection.text import write_class_embeddings
    from test_detection import TOWER, tiny_fvit

    save_safetensors(tiny_fvit("ov-lvis", image_size=96), tmp_path / "lvis.safetensors", TOWER)
    names = [c["name"] for c in sorted(lvis_categories(), key=lambda c: c["id"])]  # LVIS's raw names
    emb = torch.nn.functional.normalize(
        torch.randn(32, len(names) + 1, generator=torch.Generator().manual_seed(3)), dim=0
    )
    write_class_embeddings(tmp_path / "lvis_emb.pt", names, emb)
    root = tmp_path / "lvis"
    data = tiny_lvis()
    write_lvis_root(root, data)
    out = tmp_path / "eval"
    argv = ["eval-det", "--benchmark", "ov-lvis", "--data-root", str(root), "--detector",
            str(tmp_path / "lvis.safetensors"), "--class-embeddings", str(tmp_path / "lvis_emb.pt"), "--workers", "0",
            "--max-detections", "50"]  # fmt: skip
    code = main([*argv, "--out", str(out), "--save-predictions"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {"metrics.json", "per_class.csv", "results.md", "detections.json"} <= {p.name for p in out.iterdir()}
    assert "| mask |" in captured.out and "Average Precision" not in captured.out + captured.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and metrics["iou_type"] == "segm" and "APr" in metrics
    assert metrics["box"]["iou_type"] == "bbox" and metrics["settings"]["benchmark"] == "ov-lvis"
    assert len(metrics["per_class"]) == 1203
    detections = json.loads((out / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {1, 2, 3}
    sizes = {img["id"]: [img["height"], img["width"]] for img in data["images"]}
    for d in detections:
        seg = d["segmentation"]
        assert isinstance(seg["counts"], str) and seg["size"] == sizes[d["image_id"]]
        assert 1 <= d["category_id"] <= 1203 and len(d["bbox"]) == 4
    assert len([d for d in detections if d["image_id"] == 1]) <= 50
    # The evaluation of the saved detections reproduces metrics.json.
    gt, cats = load_lvis_annotations(root / "annotations" / "lvis_v1_val.json")
    again = evaluate_ov_lvis(gt, cats, detections)
    assert again.to_dict()["APr"] == metrics["APr"] and again.to_dict()["AP"] == metrics["AP"]
    # A bad file is one line, before any model loads.
    data["images"][0].pop("neg_category_ids")
    (root / "annotations" / "lvis_v1_val.json").write_text(json.dumps(data))
    assert main([*argv, "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "image 1 has no 'neg_category_ids' list" in err and "Traceback" not in err
