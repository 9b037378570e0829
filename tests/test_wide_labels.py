"""Label maps of more than 256 classes (ADE-847, PC-459, a long class list): the VOC palette past 256 colours,
16-bit greyscale label PNGs, their overlays, and `eval --save-predictions` / `segment` writing them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from eval_fixtures import make_dataset, voc_palette
from ovdense.cli import main
from ovdense.errors import OvdenseError
from ovdense.viz import (
    MAX_COLOURS,
    VizInputError,
    blend,
    label_image,
    label_palette,
    legend_font_size,
    legend_rows,
    overlay,
    prediction_and_truth,
    save_label_png,
)

VOC256 = np.asarray(voc_palette(256), np.uint8).reshape(256, 3)  # an independent VOC formula (eval_fixtures)


@pytest.fixture
def one_template(monkeypatch):
    """One prompt template instead of 80: these tests check files, not embeddings (hundreds of classes x 80
    templates through the test text tower take tens of seconds on two cores)."""
    from ovdense.predictor import Segmenter
    from ovdense.text import OPENAI_TEMPLATES

    original = Segmenter.text_classifier

    def text_classifier(self, classes, templates=None):
        return original(self, classes, OPENAI_TEMPLATES[:1] if templates is None else templates)

    monkeypatch.setattr(Segmenter, "text_classifier", text_classifier)


def _png_depth_and_colour_type(path) -> tuple[int, int]:
    """(bit depth, colour type) of a PNG's IHDR: (16, 0) is 16-bit greyscale, (8, 3) an 8-bit palette PNG."""
    data = open(path, "rb").read(26)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return data[24], data[25]


# --- palette -------------------------------------------------------------------------------------------------------


def test_palette_past_256_keeps_the_voc_rows_and_stays_distinct():
    wide = label_palette(1000)
    np.testing.assert_array_equal(wide[:256], VOC256)
    np.testing.assert_array_equal(wide[:256], label_palette(256))
    assert wide[255].tolist() == [224, 224, 192] and wide[15].tolist() == [192, 128, 128]  # void, person
    # by hand: bit b of the index goes to channel b % 3, bit 7 - b // 3 of it
    assert wide[256].tolist() == [0, 0, 32]  # bit 8 -> blue bit 5
    assert wide[300].tolist() == [64, 0, 224]  # bits 2, 3, 5, 8
    assert wide[846].tolist() == [112, 128, 160]  # bits 1, 2, 3, 6, 8, 9
    assert len(np.unique(wide, axis=0)) == 1000


def test_palette_bound():
    with pytest.raises(VizInputError, match=f"0..{MAX_COLOURS}, got {MAX_COLOURS + 1}"):
        label_palette(MAX_COLOURS + 1)


# --- 16-bit label PNGs ---------------------------------------------------------------------------------------------


def test_16_bit_png_round_trips_exactly(tmp_path):
    labels = np.zeros((40, 300), np.int64)  # 300 wide, 40 tall
    labels[:, 100:200] = 846
    labels[10:20, 250:] = 65535
    labels[0, 0] = 255
    for num_classes, name in ((847, "given.png"), (None, "by_values.png")):  # a label over 255: 16-bit either way
        save_label_png(labels, tmp_path / name, num_classes=num_classes)
        assert _png_depth_and_colour_type(tmp_path / name) == (16, 0)
        with Image.open(tmp_path / name) as im:
            assert im.mode == "I;16" and im.size == (300, 40)
            back = np.asarray(im)
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back, labels)
    # 847 classes: 16-bit even when this map holds only small values, so a run's files share one format
    small = np.array([[0, 1], [2, 3]])
    assert label_image(small, num_classes=847).mode == "I;16"
    assert np.asarray(label_image(small, num_classes=847)).tolist() == small.tolist()


def test_256_classes_or_fewer_keep_the_palette_png_bytes(tmp_path):
    labels = np.random.default_rng(0).integers(0, 150, (17, 23))
    labels[0, :3] = 255
    save_label_png(labels, tmp_path / "default.png")
    save_label_png(labels, tmp_path / "150.png", num_classes=150)
    save_label_png(labels, tmp_path / "256.png", num_classes=256)
    # what the writer did before wide maps existed: a P image with the VOC palette
    ref = Image.frombytes("P", (23, 17), labels.astype(np.uint8).tobytes())
    ref.putpalette(VOC256.reshape(-1).tolist(), rawmode="RGB")
    ref.save(tmp_path / "ref.png", format="PNG")
    want = (tmp_path / "ref.png").read_bytes()
    for name in ("default.png", "150.png", "256.png"):
        assert (tmp_path / name).read_bytes() == want, name
    assert _png_depth_and_colour_type(tmp_path / "default.png") == (8, 3)
    with Image.open(tmp_path / "150.png") as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
        np.testing.assert_array_equal(np.asarray(im.getpalette(), np.uint8).reshape(-1, 3), VOC256)


@pytest.mark.parametrize(
    "labels, kwargs, match",
    [
        (np.array([[0, 65536]]), {}, r"0\.\.65535 for a 16-bit PNG, got 0\.\.65536"),
        (np.array([[-1, 300]]), {"num_classes": 847}, r"0\.\.65535 for a 16-bit PNG, got -1\.\.300"),
        (np.array([[0, 300]]), {"num_classes": 150}, r"0\.\.255 for a palette PNG, got 0\.\.300"),
        (np.array([[0, 1]]), {"num_classes": 847, "palette": label_palette(2)}, "has no palette"),
        (np.array([[0, 1]]), {"num_classes": 65537}, r"num_classes must be in 0\.\.65536"),
        (np.array([[0, 1]]), {"palette": label_palette(300)}, "at most 256"),
    ],
)
def test_label_png_errors_are_one_line_and_write_nothing(tmp_path, labels, kwargs, match):
    with pytest.raises(VizInputError, match=match) as info:
        save_label_png(labels, tmp_path / "x.png", **kwargs)
    assert isinstance(info.value, OvdenseError) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --- pictures of 847 classes ---------------------------------------------------------------------------------------


def _wide_scene(h: int = 40, w: int = 60):
    image = np.full((h, w, 3), 100, np.uint8)
    labels = np.zeros((h, w), np.int64)
    labels[:, : w // 3] = 300
    labels[:, w // 3 : 2 * w // 3] = 846
    return image, labels


def test_overlay_of_847_classes_draws_their_colours():
    image, labels = _wide_scene()
    names = [f"class {i}" for i in range(847)]
    pal = label_palette(847)
    pic = np.asarray(overlay(image, labels, names, alpha=1.0))
    assert pic.shape[0] >= 40 and pic.shape[1] > 60  # the legend on the right (and as tall as it needs)
    drawn = pic[:40, :60]
    assert (drawn[:, :20] == pal[300]).all() and (drawn[:, 20:40] == pal[846]).all() and (drawn[:, 40:] == 0).all()
    half = blend(image, labels, 847, alpha=0.5)
    assert half[0, 0].tolist() == np.rint(100 * 0.5 + pal[300] * 0.5).astype(int).tolist()
    rows = legend_rows(labels, names)  # only the classes present, in class order
    assert [(r["index"], r["colour"], r["pixels"]) for r in rows] == [
        (0, (0, 0, 0), 800),
        (300, tuple(pal[300].tolist()), 800),
        (846, tuple(pal[846].tolist()), 800),
    ]
    legend = pic[:, 60:].reshape(-1, 3)
    for c in (300, 846):  # each present class's swatch is in the legend
        assert (legend == pal[c]).all(axis=1).any(), c


def test_prediction_and_truth_of_847_classes():
    image, pred = _wide_scene()
    truth = pred.copy()
    truth[:, 40:] = 255  # pier: a real class in ADE-847
    truth[:5, :] = 65535  # not labelled
    names = [f"class {i}" for i in range(847)]
    pal = label_palette(847)
    pic = np.asarray(prediction_and_truth(image, pred, truth, names, alpha=1.0, ignore_index=65535))
    font = legend_font_size(40)
    top, right = round(font * 1.6), 60 + max(4, font // 2)  # the title strip; the ground truth's left edge
    left_panel, gt_panel = pic[top : top + 40, :60], pic[top : top + 40, right : right + 60]
    assert (left_panel[:, :20] == pal[300]).all() and (left_panel[:, 20:40] == pal[846]).all()
    assert (gt_panel[5:, :20] == pal[300]).all() and (gt_panel[5:, 20:40] == pal[846]).all()
    assert (gt_panel[5:, 40:] == pal[255]).all()  # class 255 coloured, not taken for "not labelled"
    assert (gt_panel[:5] == 100).all()  # 65535 keeps the image


# --- the commands --------------------------------------------------------------------------------------------------


def test_eval_ade847_saves_16_bit_predictions_and_truth(one_template, tmp_path, capsys):
    from ovdense.eval.metrics import IoUAccumulator

    fx = make_dataset("ade847", tmp_path / "data", n=1, size=(48, 64), seed=0)
    out = tmp_path / "r"
    argv = ["eval", "--dataset", "ade847", "--data-root", str(fx.data_root), "--model", "ovdense-test-vit"]
    argv += ["--out", str(out), "--workers", "0", "--crop", "0", "--short-side", "112", "--save-predictions"]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    folder = out / "predictions" / "ade847_sclip"
    name = fx.names[0]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{name}{s}.png" for s in ("", "_gt", "_overlay"))
    arrays = {}
    for suffix in ("", "_gt"):
        path = folder / f"{name}{suffix}.png"
        assert _png_depth_and_colour_type(path) == (16, 0)
        with Image.open(path) as im:
            assert im.mode == "I;16" and im.size == (64, 48)
            arrays[suffix] = np.array(im)  # a writable copy, as torch wants
    gt, pred = arrays["_gt"], arrays[""]
    np.testing.assert_array_equal(gt, fx.labels[0])  # the converted labels exactly: 255 (pier) and 65535 kept
    assert {0, 255, 846, 65535} <= set(np.unique(gt).tolist()) and pred.max() < 847
    # the saved files are what was scored: the mIoU recomputed from them is the reported one
    result = json.loads(next(out.glob("ade847_sclip_*.json")).read_text())
    acc = IoUAccumulator(847, ignore_index=result["settings"]["ignore_index"])
    acc.update(pred, gt)
    assert round(acc.compute([str(i) for i in range(847)]).miou, 4) == result["mIoU"]
    with Image.open(folder / f"{name}_overlay.png") as im:
        assert im.mode == "RGB" and im.width > 2 * 64


def test_segment_with_300_classes_writes_a_16_bit_labels_png(one_template, tmp_path, capsys):
    photo = tmp_path / "photo.png"
    yy, xx = np.mgrid[0:48, 0:64]
    Image.fromarray(np.stack([xx * 4, yy * 5, (xx + yy) * 2], -1).astype(np.uint8)).save(photo)
    classes = "; ".join(f"thing {i}" for i in range(300))
    out = tmp_path / "o"
    argv = ["segment", str(photo), "--classes", classes, "--model", "ovdense-test-vit", "--text-cache", "off"]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["photo.json", "photo_labels.png", "photo_overlay.png"]
    assert _png_depth_and_colour_type(out / "photo_labels.png") == (16, 0)
    with Image.open(out / "photo_labels.png") as im:
        assert im.mode == "I;16" and im.size == (64, 48)
        labels = np.asarray(im)
    assert labels.dtype == np.uint16 and labels.max() < 300
    summary = json.loads((out / "photo.json").read_text())
    assert len(summary["classes"]) == 300
    for area in summary["areas"]:  # the JSON describes the PNG
        assert area["pixels"] == int((labels == area["index"]).sum())
