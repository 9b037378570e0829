"""Region classification benchmark: the accuracy metric, the runner, `ovdense eval-regions`, torchrun sharding."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ovdense.cli import main
from ovdense.eval.panoptic import CocoPanoptic
from ovdense.eval.regions import RegionAccuracy, evaluate_regions, mean_class_accuracy
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset
from panoptic_fixtures import break_panoptic, make_panoptic

SIZE = 128  # detection input of the tests (8 x 8 grid for the /16 test towers)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_panoptic(tmp_path_factory.mktemp("coco"))


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # an argument error, found while the flags are parsed
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_accuracy_is_a_mean_over_classes_not_regions():
    # 5 classes: 0, 1 things; 2, 3, 4 stuff. Class 4 has no regions and must not count as 0.
    acc = RegionAccuracy(5, kinds=("box",))
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3])
    topk = torch.tensor(
        [
            [0, 1, 2, 3, 4],  # class 0: top-1 hit
            [1, 0, 2, 3, 4],  # class 0: top-5 hit only
            [1, 2, 3, 4, 0],  # class 0: top-5 hit at rank 5
            [1, 2, 3, 4, 4],  # class 0: miss
            [1, 0, 0, 0, 0],  # class 1: top-1 hit
            [3, 4, 0, 1, 2],  # class 2: top-5 hit only
            [2, 0, 1, 3, 4],  # class 2: top-1 hit
            [0, 1, 2, 4, 3],  # class 3: top-5 hit only
        ]
    )
    acc.update("box", labels, topk)
    is_thing = torch.tensor([True, True, False, False, False])
    out = acc.compute(is_thing)["box"]
    # things: class 0 top-1 1/4, class 1 1/1 -> mean 62.5 (over regions it would be 2/5 = 40)
    assert out["things"]["top1"] == pytest.approx((0.25 + 1.0) / 2 * 100)
    assert out["things"]["top5"] == pytest.approx((0.75 + 1.0) / 2 * 100)
    # stuff: class 2 top-1 1/2, class 3 0/1, class 4 left out
    assert out["stuff"]["top1"] == pytest.approx((0.5 + 0.0) / 2 * 100)
    assert out["stuff"]["top5"] == pytest.approx((1.0 + 1.0) / 2 * 100)
    assert torch.equal(acc.counts["box"][4], torch.zeros(3, dtype=torch.int64))


def test_accuracy_of_a_group_without_regions_is_nan():
    assert math.isnan(mean_class_accuracy(torch.tensor([1]), torch.tensor([0]), torch.tensor([True])))
    acc = RegionAccuracy(2, kinds=("mask",))
    acc.update("mask", torch.tensor([0]), torch.tensor([[0, 1]]))
    out = acc.compute(torch.tensor([True, False]))["mask"]
    assert out["things"]["top1"] == 100.0 and math.isnan(out["stuff"]["top1"])


def test_runner_equals_classify_regions_image_by_image(tiny_eva, coco):
    dataset = CocoPanoptic(coco.data_root)
    seg = Segmenter(tiny_eva, get_preset("declip"), torch.device("cpu"), text_cache_dir=False)
    metrics, records = evaluate_regions(seg, dataset, image_size=SIZE, crops=True, num_workers=0, save_predictions=True)
    acc = RegionAccuracy(len(dataset.class_names), ("box", "mask", "crop"))
    expected_records = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if not sample["segments"]:
            continue
        seg.set_image(sample["image"])
        boxes = [s.box for s in sample["segments"]]
        labels = torch.tensor([s.label for s in sample["segments"]])
        box = seg.classify_regions(dataset.class_names, boxes=boxes, image_size=SIZE)
        mask = seg.classify_regions(dataset.class_names, masks=sample["masks"], image_size=SIZE)
        enlarge = [1.5 if s.isthing else 1.0 for s in sample["segments"]]
        crop = seg.classify_regions(dataset.class_names, boxes=boxes, pooling="crop", crop_enlarge=enlarge)
        for kind, result in (("box", box), ("mask", mask), ("crop", crop)):
            acc.update(kind, labels, result.topk_indices)
        for k, s in enumerate(sample["segments"]):
            ids = [dataset.categories[c]["id"] for c in box.topk_indices[k].tolist()]
            expected_records.append((sample["image_id"], s.segment_id, s.category_id, ids))
    assert metrics.results == acc.compute(dataset.is_thing)
    kept = sum(len(s) for s in coco.segments) - 3  # the fixture's three segments below 8 x 8 pixels
    assert metrics.num_images == 4 and sum(metrics.num_regions.values()) == kept == len(records)
    assert [(r["image_id"], r["segment_id"], r["category_id"], r["box_top5"]) for r in records] == expected_records
    assert set(records[0]) == {"image_id", "segment_id", "category_id", "isthing", "box_top5", "mask_top5", "crop_top5"}
    per_class = {row["class"]: row for row in metrics.per_class}
    assert per_class["person"]["regions"] == 3 and per_class["person"]["isthing"]


def test_cli_writes_metrics_tables_and_predictions(coco, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["eval-regions", "--data-root", str(coco.data_root), "--model", "ovdense-test-vit", "--image-size",
            str(SIZE), "--out", str(out), "--workers", "0", "--save-predictions", "--text-cache", "off"]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"box", "mask"}
    for kind in metrics.values():
        assert set(kind) == {"things", "stuff"}
        for group in kind.values():
            assert set(group) == {"top1", "top5"} and 0 <= group["top1"] <= group["top5"] <= 100
    assert "| box |" in stdout and "| mask |" in stdout and "RANDOM test architecture" in err
    lines = (out / "regions.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert first["image_id"] == coco.image_ids[0] and len(first["box_top5"]) == 5
    assert all(cid in {1, 3, 7, 92, 118, 200} for cid in first["mask_top5"])
    settings = json.loads((out / "settings.json").read_text())
    assert settings["method"] == "declip" and settings["image_size"] == SIZE and settings["num_images"] == 4
    csv = (out / "per_class.csv").read_text().splitlines()
    assert csv[0].startswith("class,category_id,isthing,regions,box_top1") and len(csv) == 7
    assert "| pooling |" in (out / "regions.md").read_text()


def test_cli_crops_and_limit(coco, tmp_path, capsys):
    out = tmp_path / "r"
    argv = ["eval-regions", "--data-root", str(coco.data_root), "--model", "ovdense-test-eva02", "--image-size",
            str(SIZE), "--out", str(out), "--workers", "0", "--crops", "--limit", "1", "--method", "clip"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"box", "mask", "crop"}
    assert not (out / "regions.jsonl").exists()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["num_images"] == 1 and settings["num_regions"] == {"things": 2, "stuff": 1}


@pytest.mark.parametrize("kind", ["no_json", "no_png_dir", "no_image_dir"])
def test_missing_paths_fail_before_any_work(tmp_path, capsys, kind):
    fx = make_panoptic(tmp_path / "fresh")
    broken = break_panoptic(fx, kind)
    out = tmp_path / "r"
    code, _, err = run(["eval-regions", "--data-root", str(broken.data_root), "--model", "no-such-model",
                        "--out", str(out)], capsys)  # fmt: skip
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ovdense: error: ")
    assert all(n in lines[0] for n in broken.needles) and not out.exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_segment_absent_from_png_is_one_line_from_any_worker(tmp_path, capsys, workers):
    fx = make_panoptic(tmp_path / "coco")
    broken = break_panoptic(fx, "segment_absent")
    out = tmp_path / "r"
    argv = ["eval-regions", "--data-root", str(broken.data_root), "--model", "ovdense-test-vit", "--image-size",
            str(SIZE), "--out", str(out), "--workers", workers]  # fmt: skip
    code, _, err = run(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("ovdense:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert all(n in lines[0] for n in broken.needles) and not (out / "metrics.json").exists()


def test_bad_flags(coco, tmp_path, capsys):
    base = ["eval-regions", "--data-root", str(coco.data_root), "--model", "ovdense-test-vit", "--out", str(tmp_path)]
    for extra, needle in (
        (["--limit", "0"], "--limit"),
        (["--image-size", "8"], "--image-size"),
    ):
        code, _, err = run(base + extra, capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("ovdense:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], err
    code, _, err = run(base + ["--method", "nope"], capsys)  # a closed set: refused, the choices named
    assert code == 2 and "invalid choice: 'nope'" in err


def test_torchrun_two_processes_equal_one(coco, tmp_path):
    """gloo on CPU: two shards, all-reduced counts and gathered records, the same files as one process."""
    base = ["eval-regions", "--data-root", str(coco.data_root), "--model", "ovdense-test-vit", "--image-size",
            str(SIZE), "--workers", "0", "--save-predictions", "--crops"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ovdense", *base, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "ovdense", *base, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    for name in ("metrics.json", "regions.jsonl", "per_class.csv", "regions.md"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    a, b = (json.loads((tmp_path / d / "settings.json").read_text()) for d in ("one", "two"))
    assert a["processes"] == 1 and b["processes"] == 2 and a["num_regions"] == b["num_regions"]
    assert len((tmp_path / "one" / "regions.jsonl").read_text().splitlines()) == sum(a["num_regions"].values())


def test_masks_from_the_dataset_are_the_segments(coco):
    """The reader's masks feed mask pooling as K x H x W bool at the image size."""
    sample = CocoPanoptic(coco.data_root)[0]
    assert sample["masks"].dtype == np.bool_ and sample["masks"].shape[1:] == sample["image"].shape[:2]
    assert len(sample["masks"]) == len(sample["segments"])
