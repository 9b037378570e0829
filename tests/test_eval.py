"""`ovdense eval` end to end: synthetic sets in the classic 8 layouts, the real VOC samples, torchrun sharding (ADE847
and PC459, and `eval --all` over the ten: tests/test_ten_benchmarks.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval_fixtures import make_dataset
from ovdense.cli import main
from ovdense.eval.datasets import get_dataset
from ovdense.eval.metrics import IoUAccumulator
from ovdense.eval.runner import evaluate
from ovdense.eval.specs import CLASSIC, DATASETS
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset

VOC_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2011-samples"


@pytest.fixture(scope="module")
def all_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, {name: make_dataset(name, root, n=3, size=(48, 64), seed=i) for i, name in enumerate(CLASSIC)}


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_equals_metric_over_predict(tiny_vit, all_sets):
    """The runner's number is the metric of Segmenter.predict over the dataset, image by image."""
    root, sets = all_sets
    dataset = get_dataset("context59", root)  # reduce_zero_label + 59 classes
    seg = Segmenter(tiny_vit, get_preset("sclip", "context59"), torch.device("cpu"))
    metrics = evaluate(seg, dataset, num_workers=0, progress=False)
    acc = IoUAccumulator(59)
    classes = dataset.class_names("sclip")
    for i in range(len(dataset)):
        sample = dataset[i]
        seg.set_image(sample["image"])
        acc.update(seg.predict(classes).labels, sample["label"])
    expected = acc.compute()
    assert metrics.num_images == 3
    assert metrics.miou == pytest.approx(expected.miou) and metrics.aacc == pytest.approx(expected.aacc)


@pytest.mark.parametrize("name", CLASSIC)
def test_cli_eval_every_layout(name, all_sets, tmp_path, capsys):
    root, _ = all_sets
    method = {"cityscapes": "clearclip", "ade20k": "naclip", "voc20": "declip"}.get(name, "sclip")
    model = "ovdense-test-eva02" if method == "declip" else "ovdense-test-vit"
    argv = ["eval", "--dataset", name, "--data-root", str(root), "--method", method, "--model", model]
    code, out, err = run(argv + ["--out", str(tmp_path), "--workers", "0", "--limit", "2"], capsys)
    assert code == 0, err
    result = json.loads(next(tmp_path.glob(f"{name}_{method}_*.json")).read_text())
    assert result["num_images"] == 2 and 0 <= result["mIoU"] <= 100
    assert len(result["per_class"]) == DATASETS[name].num_classes
    assert result["settings"]["preset"]["method"] == method and result["settings"]["limit"] == 2
    assert "mIoU" in out and next(tmp_path.glob(f"{name}_{method}_*.csv")).read_text().startswith("class,IoU,Acc")
    wrote = [ln for ln in err.splitlines() if ln.startswith("wrote ")]
    assert len(wrote) == 1 and all(str(p) in wrote[0] for p in tmp_path.glob(f"{name}_{method}_*"))


def test_cli_eval_eight_prints_the_paper_row(all_sets, tmp_path, capsys):
    root, _ = all_sets
    argv = ["eval", "--eight", "--data-root", str(root), "--model", "ovdense-test-vit", "--limit", "1"]
    code, out, err = run(argv + ["--out", str(tmp_path), "--workers", "0", "--crop", "0"], capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| method |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["method", "VOC21", "C60", "Obj", "VOC20", "C59", "Stuff", "City", "ADE", "Avg8"]
    summary = json.loads((tmp_path / "summary_sclip.json").read_text())
    assert set(summary) == set(CLASSIC) | {"avg8"}
    assert summary["avg8"] == pytest.approx(np.mean([summary[n] for n in CLASSIC]))


def test_cli_eval_eight_with_scclip(all_sets, tmp_path, capsys):
    root, _ = all_sets
    argv = ["eval", "--eight", "--data-root", str(root), "--method", "scclip", "--model", "ovdense-test-vit12"]
    argv += ["--out", str(tmp_path), "--workers", "0", "--limit", "1", "--short-side", "160"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    row = out.strip().splitlines()[-1]
    assert row.startswith("| scclip |") and len(row.split("|")) == 2 + len(CLASSIC) + 2
    summary = json.loads((tmp_path / "summary_scclip.json").read_text())
    assert set(summary) == set(CLASSIC) | {"avg8"}
    voc = json.loads(next(tmp_path.glob("voc21_scclip_*.json")).read_text())["settings"]["preset"]
    assert voc["head"] == "scclip" and voc["short_side"] == 160 and voc["logit_scale"] == 50.0


@pytest.mark.parametrize("name", ["voc21", "context60"])  # a whole-image pass, and windows
def test_cli_eval_resclip(name, all_sets, tmp_path, capsys):
    root, _ = all_sets
    argv = ["eval", "--dataset", name, "--data-root", str(root), "--method", "resclip", "--model", "ovdense-test-vit12"]
    argv += ["--out", str(tmp_path), "--workers", "0", "--limit", "1", "--short-side", "160"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    preset = json.loads(next(tmp_path.glob(f"{name}_resclip_*.json")).read_text())["settings"]["preset"]
    assert preset["crop"] == (0 if name == "voc21" else 224) and preset["head_kwargs"]["temp_thd"] == (
        0.5 if name == "voc21" else 0.3
    )


def test_save_predictions(all_sets, tmp_path, capsys):
    root, sets = all_sets
    argv = ["eval", "--dataset", "ade20k", "--data-root", str(root), "--model", "ovdense-test-vit"]
    code, _, err = run(argv + ["--out", str(tmp_path), "--workers", "0", "--save-predictions"], capsys)
    assert code == 0, err
    pred_dir = tmp_path / "predictions" / "ade20k_sclip"
    for stem, label in zip(sets["ade20k"].names, sets["ade20k"].labels, strict=True):
        png = Image.open(pred_dir / f"{stem}.png")
        assert png.mode == "P" and png.size == (label.shape[1], label.shape[0])
        assert np.asarray(png).max() < 150  # dataset class indices (after reduce_zero_label)
        np.testing.assert_array_equal(np.asarray(Image.open(pred_dir / f"{stem}_gt.png")), label)
        pair = Image.open(pred_dir / f"{stem}_overlay.png")
        assert pair.width > 2 * label.shape[1] and pair.height > label.shape[0]  # prediction | truth | legend


def test_missing_dataset_root_is_one_line(tmp_path, capsys):
    code, _, err = run(
        ["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys
    )
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "VOC2012" in lines[0]
    assert not (tmp_path / "r").exists()
    code, _, err = run(["eval", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and "--dataset" in err


@pytest.mark.skipif(not VOC_SAMPLES.is_dir(), reason="shared/data/voc2011-samples is outside the repo")
def test_real_voc_samples(tmp_path, capsys):
    argv = ["eval", "--dataset", "voc21", "--data-root", str(VOC_SAMPLES), "--model", "ovdense-test-vit"]
    code, out, err = run(argv + ["--out", str(tmp_path), "--workers", "1"], capsys)
    assert code == 0, err
    result = json.loads(next(tmp_path.glob("voc21_sclip_*.json")).read_text())
    assert result["num_images"] == 3 and result["per_class"][15]["class"] == "person"
    assert result["per_class"][0]["class"] == "background"  # not the first background word


def test_torchrun_two_processes_equal_one(all_sets, tmp_path):
    """gloo on CPU: two shards, all-reduced sums, the same table as one process."""
    root, _ = all_sets
    make_dataset("voc21", tmp_path / "five", n=5, size=(48, 64), seed=7)
    base = [
        "--dataset",
        "voc21",
        "--data-root",
        str(tmp_path / "five"),
        "--model",
        "ovdense-test-vit",
        "--workers",
        "0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ovdense", "eval", *base, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "ovdense", "eval", *base, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads(next((tmp_path / "one").glob("*.json")).read_text())
    b = json.loads(next((tmp_path / "two").glob("*.json")).read_text())
    assert b["settings"]["processes"] == 2 and a["settings"]["processes"] == 1
    assert a["num_images"] == b["num_images"] == 5
    assert a["per_class"] == b["per_class"] and a["mIoU"] == b["mIoU"]


@pytest.mark.parametrize("workers", ["0", "1"])
def test_label_of_wrong_size_is_one_line_from_any_worker(tmp_path, capsys, workers):
    data = make_dataset("ade20k", tmp_path / "data", n=2, size=(48, 64), seed=3)
    bad = next((data.root / "annotations" / "validation").glob(f"{data.names[1]}*.png"))
    Image.new("L", (10, 10)).save(bad)
    argv = ["eval", "--dataset", "ade20k", "--data-root", str(data.data_root), "--model", "ovdense-test-vit"]
    code, _, err = run(argv + ["--out", str(tmp_path / "r"), "--workers", workers], capsys)
    lines = [ln for ln in err.splitlines() if ln.startswith("ovdense:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert bad.name in lines[0] and "10x10" in lines[0]
    assert not (tmp_path / "r").exists()  # no table for a failed run
