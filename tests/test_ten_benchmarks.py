"""ADE-847 and PC-459: specs, 16-bit labels, the ignore-index choice (by hand), converters, `eval --all/--eight`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from eval_fixtures import make_dataset
from ovdense.cli import main
from ovdense.errors import OvdenseError
from ovdense.eval.convert import (
    ADE20K_847_IDS,
    ade847_lut,
    ade_resize_shape,
    convert_ade847,
    convert_pascal_context_459,
    pascal_context_459_labels,
)
from ovdense.eval.datasets import get_dataset, read_class_names, read_label_16
from ovdense.eval.runner import evaluate
from ovdense.eval.specs import CLASSIC, DATASETS, LARGE, PAPER_COLUMNS, ignore_index
from ovdense.presets import get_preset


def _tif(arr, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint16)).save(path, format="TIFF")
    return path


def _jpg(path: Path, h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(path, format="JPEG")
    return path


# --- specs, presets, class files ----------------------------------------------------------------------------------


def test_specs_and_ignore_rule():
    assert list(DATASETS) == [*CLASSIC, *LARGE] and LARGE == ("ade847", "context459")
    ade, pc = DATASETS["ade847"], DATASETS["context459"]
    assert (ade.title, ade.num_classes, ade.seg_map_suffix, ade.split_file) == ("ADE847", 847, ".tif", None)
    assert (pc.title, pc.num_classes, pc.ann_dir) == ("PC459", 459, "annotations_detectron2/pc459_val")
    assert pc.split_file == "ImageSets/SegmentationContext/val.txt" and PAPER_COLUMNS["context459"] == "PC459"
    for spec in (ade, pc):
        assert not spec.reduce_zero_label and spec.background_class is None
        assert ignore_index(spec) == ignore_index(spec, "authors") == 255
        assert ignore_index(spec, "unlabelled") == 65535
    for name in CLASSIC:
        assert ignore_index(DATASETS[name], "authors") == ignore_index(DATASETS[name], "unlabelled") == 255
    with pytest.raises(ValueError, match="unknown ignore policy 'none'"):
        ignore_index(ade, "none")


def test_presets_for_the_new_benchmarks():
    # the authors' (CorrCLIPv2 cfg_ade847.py / cfg_context459.py)
    p = get_preset("corrclipv2", "ade847")
    assert (p.short_side, p.crop, p.stride, p.prob_thd) == (448, 336, 112, 0.0)
    p = get_preset("corrclipv2", "context459")
    assert (p.short_side, p.crop, p.stride, p.prob_thd) == (336, 336, 112, 0.0)
    # ours: ADE20K's settings for ADE-847, Context59's for PC-459, never a background threshold
    for method in ("sclip", "naclip", "clearclip", "proxyclip", "resclip"):
        for new, base in (("ade847", "ade20k"), ("context459", "context59")):
            got, ref = get_preset(method, new).to_dict(), get_preset(method, base).to_dict()
            assert got == ref and got["prob_thd"] == 0.0, (method, new)
    assert get_preset("proxyclip", "ade847").short_side == 448 and get_preset("sclip", "context459").prob_thd == 0.0
    assert get_preset("sclip", "context60").prob_thd > 0  # what PC-459 must not inherit
    assert get_preset("sclip", "context459", prob_thd=0.3).prob_thd == 0.3  # overrides still apply


def test_class_files_are_the_authors():
    ade, pc = read_class_names("ade847"), read_class_names("context459")
    assert len(ade) == 847 and len(pc) == 459 and all(len(c) == 1 for c in ade + pc)
    assert ade[255] == ["pier"] and pc[255] == ["monkey"]  # class 255 is real: what the authors' harness drops
    assert ade[1] == ["building, edifice"]  # WordNet synonyms stay one prompt, as CAT-Seg and the authors use them
    assert ade[300] == ["altar, communion table, lords table"]  # the authors' class file, not CAT-Seg's "lord's"
    assert sum("," in c[0] for c in ade) == 217 and not any("," in c[0] for c in pc)
    assert pc[283] == ["person"] and pc[2] == ["air conditioner"]
    for style in ("sclip", "clearclip", "corrclip", "corrclipv2"):  # one list for every method
        assert read_class_names("ade847", style) == ade and read_class_names("context459", style) == pc


# --- 16-bit labels -------------------------------------------------------------------------------------------------


def test_read_label_16_keeps_every_value(tmp_path):
    vals = np.array([[0, 255, 256], [846, 4095, 65535]], np.uint16)
    got = read_label_16(_tif(vals, tmp_path / "a.tif"))
    assert Image.open(tmp_path / "a.tif").mode == "I;16"
    assert got.dtype == np.uint16 and got.tolist() == vals.tolist()
    Image.fromarray(vals.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I: accepted while in range
    assert read_label_16(tmp_path / "i32.tif").tolist() == vals.tolist()
    Image.frombytes("I;16B", (3, 2), vals.astype(">u2").tobytes()).save(tmp_path / "be.tif")
    assert read_label_16(tmp_path / "be.tif").tolist() == vals.tolist()


@pytest.mark.parametrize(
    "arr, match",
    [
        (np.array([[1, 200]], np.uint8), "mode L.*16-bit"),  # 8 bits cannot hold 847 classes
        (np.array([[1.0, 2.5]], np.float32), "mode F.*16-bit"),
        (np.array([[-1, 70000]], np.int32), "outside 0..65535"),
        (np.zeros((2, 2, 3), np.uint8), "one channel"),
    ],
)
def test_read_label_16_refuses_lossy_files(tmp_path, arr, match):
    Image.fromarray(arr).save(tmp_path / "x.tif")
    with pytest.raises(OvdenseError, match=match):
        read_label_16(tmp_path / "x.tif")
    with pytest.raises(OvdenseError, match="cannot read label"):
        read_label_16(tmp_path / "missing.tif")


@pytest.mark.parametrize("name", LARGE)
def test_reader_returns_uint16_labels(name, tmp_path):
    fx = make_dataset(name, tmp_path, n=2, size=(20, 28), seed=2)
    ds = get_dataset(name, tmp_path)
    assert ds.ignore_index == 255 and get_dataset(name, tmp_path, ignore="unlabelled").ignore_index == 65535
    assert [s["name"] for s in ds] == fx.names and not {s["name"] for s in ds} & set(fx.unlisted)
    for i, s in enumerate(ds):
        assert s["label"].dtype == np.uint16
        np.testing.assert_array_equal(s["label"], fx.labels[i])
        values = set(np.unique(s["label"]).tolist())
        assert {0, 255, 65535, DATASETS[name].num_classes - 1} <= values
    with pytest.raises(OvdenseError, match="unknown ignore policy 'x'"):
        get_dataset(name, tmp_path, ignore="x")


def test_missing_large_benchmark_names_the_converter(tmp_path):
    with pytest.raises(OvdenseError, match="ADE847: image folder not found.*ovdense convert ade847"):
        get_dataset("ade847", tmp_path)


# --- the ignore index, numerically ---------------------------------------------------------------------------------

# A 2 x 4 image. Label: class 0 twice, class 255 (pier / monkey) twice, class 300 twice, unlabelled twice.
LABEL = np.array([[0, 0, 255, 255], [300, 65535, 65535, 300]], np.uint16)
PRED = np.array([[0, 1, 255, 0], [300, 300, 0, 1]], np.int64)
# By hand, IoU = I / (pred + label - I) over the pixels kept:
# authors (255 left out; the 65535 pixels keep their predictions 300 and 0 in the union):
#   class 0: I 1, pred 2 ((0,0), (1,2)), label 2 -> 1/3; class 1: 0/2; class 300: I 1, pred 2, label 2 -> 1/3
# unlabelled (65535 left out):
#   class 0: I 1, pred 2 ((0,0), (0,3)), label 2 -> 1/3; class 1: 0/2; class 255: 1/2; class 300: 1/2
EXPECTED = {
    "authors": ({0: 100 / 3, 1: 0.0, 300: 100 / 3}, 100 * 2 / 9),
    "unlabelled": ({0: 100 / 3, 1: 0.0, 255: 50.0, 300: 50.0}, 100 / 3),
}


class _FixedSegmenter:
    """Predicts PRED for every image: what `evaluate` needs of a Segmenter, without a model."""

    def __init__(self):
        self.preset = SimpleNamespace(class_style="corrclip", method="fixed")
        self.head = SimpleNamespace(uses_masks=False)
        self.masks_dir = None

    def text_classifier(self, classes):
        pass

    def set_image(self, image, masks=None):
        self.image = image

    def predict(self, classes):
        return SimpleNamespace(labels=PRED.copy(), image=self.image)


def _tiny_benchmark(name: str, root: Path) -> None:
    if name == "ade847":
        base = root / "ADE20K_2021_17_01"
        _jpg(base / "images_detectron2/validation/ADE_val_00000001.jpg", 2, 4)
        _tif(LABEL, base / "annotations_detectron2/validation/ADE_val_00000001.tif")
    else:
        base = root / "VOCdevkit/VOC2010"
        _jpg(base / "JPEGImages/2008_000002.jpg", 2, 4)
        _tif(LABEL, base / "annotations_detectron2/pc459_val/2008_000002.tif")
        (base / "ImageSets/SegmentationContext").mkdir(parents=True)
        (base / "ImageSets/SegmentationContext/val.txt").write_text("2008_000002\n")


@pytest.mark.parametrize("policy", ["authors", "unlabelled"])
@pytest.mark.parametrize("name", LARGE)
def test_ignore_index_by_hand(name, policy, tmp_path):
    _tiny_benchmark(name, tmp_path)
    metrics = evaluate(_FixedSegmenter(), get_dataset(name, tmp_path, ignore=policy), num_workers=0, progress=False)
    per_class, miou = EXPECTED[policy]
    scored = {c: v for c, v in enumerate(metrics.iou) if v == v}  # NaN: in neither labels nor predictions
    assert scored.keys() == per_class.keys()
    for c, v in per_class.items():
        assert scored[c] == pytest.approx(v)
    assert metrics.miou == pytest.approx(miou)


def test_classic_benchmarks_ignore_255_whatever_the_policy(tmp_path):
    make_dataset("ade20k", tmp_path, n=1)
    for policy in ("authors", "unlabelled"):
        assert get_dataset("ade20k", tmp_path, ignore=policy).ignore_index == 255


@pytest.mark.parametrize("name", LARGE)
def test_evaluate_saves_16_bit_pngs_of_the_wide_benchmarks(name, tmp_path):
    _tiny_benchmark(name, tmp_path)
    evaluate(_FixedSegmenter(), get_dataset(name, tmp_path), num_workers=0, save_dir=tmp_path / "p", progress=False)
    stem = "ADE_val_00000001" if name == "ade847" else "2008_000002"
    for file, want in ((f"{stem}.png", PRED), (f"{stem}_gt.png", LABEL)):  # the exact values, 65535 included
        with Image.open(tmp_path / "p" / file) as im:
            assert im.mode == "I;16"
            np.testing.assert_array_equal(np.asarray(im), want)


# --- converters ----------------------------------------------------------------------------------------------------


def test_pascal_context_459_labels():
    # CAT-Seg: LabelMap - 1 on uint16, so 0 (unlabelled) wraps to 65535
    lm = np.array([[0, 1, 256], [459, 2, 0]], np.uint16)
    assert pascal_context_459_labels(lm).tolist() == [[65535, 0, 255], [458, 1, 65535]]
    assert pascal_context_459_labels(lm.astype(np.float64)).dtype == np.uint16
    with pytest.raises(OvdenseError, match="outside 0..459"):
        pascal_context_459_labels(np.array([[460]]))
    with pytest.raises(OvdenseError, match="2-D map of integer"):
        pascal_context_459_labels(np.array([[1.5]]))


def _voc2010(root: Path, val: str, split: str | None = None) -> Path:
    voc = root / "VOCdevkit/VOC2010"
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "ImageSets/Main/val.txt").write_text(val)
    if split is not None:
        (voc / "ImageSets/SegmentationContext").mkdir(parents=True)
        (voc / "ImageSets/SegmentationContext/val.txt").write_text(split)
    return voc


def test_convert_pascal_context_459_then_read(tmp_path):
    sio = pytest.importorskip("scipy.io")
    voc = _voc2010(tmp_path, "2008_000010\n2008_000002\n")
    (tmp_path / "VOCdevkit/trainval").mkdir()
    maps = {
        "2008_000010": np.array([[1, 256, 459], [0, 0, 300]], np.uint16),
        "2008_000002": np.array([[2, 2], [3, 4]], np.uint16),
        "2008_000099": np.array([[5]], np.uint16),  # a train image: not converted
    }
    for stem, lm in maps.items():
        sio.savemat(tmp_path / f"VOCdevkit/trainval/{stem}.mat", {"LabelMap": lm})
        _jpg(voc / f"JPEGImages/{stem}.jpg", *lm.shape)
    res = convert_pascal_context_459(tmp_path, progress=False)
    assert (res.written, res.skipped) == (2, 0) and "16-bit label TIFF" in str(res)
    out = voc / "annotations_detectron2/pc459_val"
    assert sorted(p.name for p in out.iterdir()) == ["2008_000002.tif", "2008_000010.tif"]
    assert Image.open(out / "2008_000010.tif").mode == "I;16"
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000010\n2008_000002\n"
    ds = get_dataset("context459", tmp_path)
    assert [s["name"] for s in ds] == ["2008_000010", "2008_000002"]
    assert ds[0]["label"].tolist() == [[0, 255, 458], [65535, 65535, 299]]
    assert convert_pascal_context_459(tmp_path, progress=False).skipped == 2  # idempotent


def test_pascal_context_459_keeps_the_split_file_and_checks_sources(tmp_path):
    sio = pytest.importorskip("scipy.io")
    voc = _voc2010(tmp_path, "2008_000001\n2008_000002\n", split="2008_000002\n")
    _jpg(voc / "JPEGImages/2008_000002.jpg", 1, 1)
    src = tmp_path / "mats"
    src.mkdir()
    with pytest.raises(OvdenseError, match=r"val.txt lists 2008_000002, not in .*mats"):
        convert_pascal_context_459(tmp_path, source=src, progress=False)
    sio.savemat(src / "2008_000002.mat", {"LabelMap": np.array([[7]], np.uint16)})
    assert convert_pascal_context_459(tmp_path, source=src, progress=False).written == 1  # the split file's ids
    assert (voc / "ImageSets/SegmentationContext/val.txt").read_text() == "2008_000002\n"
    with pytest.raises(OvdenseError, match="no trainval/ folder"):
        convert_pascal_context_459(tmp_path, progress=False)


def test_ade_resize_rule():
    assert ade_resize_shape(520, 600) == (512, 591) and ade_resize_shape(600, 520) == (591, 512)
    assert ade_resize_shape(512, 2000) is None and ade_resize_shape(300, 400) is None
    assert ade_resize_shape(1024, 1025) == (512, 512)  # 512.5: Python's round, halves to even, as CAT-Seg
    assert ade_resize_shape(1024, 1027) == (512, 514)  # 513.5 -> 514


def _seg_png(ids: np.ndarray, path: Path) -> None:
    """An ADE20K-full *_seg.png encoding class index i as R = (i // 256) * 10 + 3, G = i % 256 (B: instances)."""
    rgb = np.stack([(ids // 256) * 10 + 3, ids % 256, np.full_like(ids, 7)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_convert_ade847_then_read(tmp_path):
    lut = ade847_lut()
    wall, building, pier = ADE20K_847_IDS[0], ADE20K_847_IDS[1], ADE20K_847_IDS[255]
    assert (wall, building) == (2978, 312) and lut[wall] == 0 and lut[building] == 1 and lut[pier] == 255
    outside = next(i for i in range(1, 4000) if i not in ADE20K_847_IDS)
    assert lut[0] == lut[outside] == 65535
    src = tmp_path / "ADE20K_2021_17_01/images/ADE/validation/some_scene"
    small = np.array([[wall, building, 0], [pier, outside, wall]])
    _jpg(src / "ADE_val_00000002.jpg", 2, 3)
    _seg_png(small, src / "ADE_val_00000002_seg.png")
    big = np.full((520, 600), wall)  # short side > 512: resized to 512 x 591
    big[:, 300:] = building
    _jpg(src / "ADE_val_00000001.jpg", 520, 600)
    _seg_png(big, src / "ADE_val_00000001_seg.png")
    _jpg(src / "ADE_train_00000003.jpg", 2, 2)  # not a validation image (CAT-Seg's split rule)
    res = convert_ade847(tmp_path, progress=False, workers=1)
    assert (res.written, res.skipped) == (2, 0)
    root = tmp_path / "ADE20K_2021_17_01"
    assert sorted(p.name for p in (root / "annotations_detectron2/validation").iterdir()) == [
        "ADE_val_00000001.tif", "ADE_val_00000002.tif",
    ]  # fmt: skip
    ds = get_dataset("ade847", tmp_path)
    assert [s["name"] for s in ds] == ["ADE_val_00000001", "ADE_val_00000002"]
    first, second = ds[0], ds[1]
    assert first["image"].shape == (512, 591, 3) and first["label"].shape == (512, 591)
    assert set(np.unique(first["label"][:, :290]).tolist()) == {0} and set(np.unique(first["label"][:, 300:])) == {1}
    assert second["label"].tolist() == [[0, 1, 65535], [255, 65535, 0]]
    assert convert_ade847(tmp_path, progress=False).skipped == 2
    (root / "images_detectron2/validation/ADE_val_00000002.jpg").unlink()  # an image lost: its pair is redone
    assert convert_ade847(tmp_path, progress=False).written == 1


def test_ade847_errors(tmp_path):
    with pytest.raises(OvdenseError, match="ADE20K-847: folder not found"):
        convert_ade847(tmp_path, progress=False)
    src = tmp_path / "ADE20K_2021_17_01/images/ADE/validation"
    _jpg(src / "a/ADE_val_00000001.jpg", 4, 4)
    with pytest.raises(OvdenseError, match="cannot read ADE20K segmentation PNG .*ADE_val_00000001_seg.png"):
        convert_ade847(tmp_path, progress=False, workers=1)
    _seg_png(np.zeros((3, 4), np.int64), src / "a/ADE_val_00000001_seg.png")
    with pytest.raises(OvdenseError, match="_seg.png is 4x3 but .*ADE_val_00000001.jpg 4x4"):
        convert_ade847(tmp_path, progress=False, workers=1)


def test_cli_convert_large(tmp_path, capsys):
    assert main(["convert", "ade847", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovdense: error: ADE20K-847") and err.count("\n") == 1
    assert main(["convert", "pascal-context-459", "--data-root", str(tmp_path)]) == 2
    assert "PASCAL-Context-459: folder not found" in capsys.readouterr().err


# --- ovdense eval ------------------------------------------------------------------------------------------------


@pytest.fixture
def one_template(monkeypatch):
    """One prompt template instead of 80: these tests check rows and records, not embeddings, and 847 + 459 classes
    x 80 templates through the test text tower take a minute on two cores."""
    from ovdense.predictor import Segmenter
    from ovdense.text import OPENAI_TEMPLATES

    original = Segmenter.text_classifier

    def text_classifier(self, classes, templates=None):
        return original(self, classes, OPENAI_TEMPLATES[:1] if templates is None else templates)

    monkeypatch.setattr(Segmenter, "text_classifier", text_classifier)


@pytest.fixture(scope="module")
def ten_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return root, {name: make_dataset(name, root, n=1, size=(48, 64), seed=0) for name in DATASETS}


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str) -> tuple[list[str], list[str]]:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    return cells(lines[i]), cells(lines[i + 2])


def test_cli_eval_all_is_ten_columns_with_avg10_and_avg8(ten_sets, one_template, tmp_path, capsys):
    root, _ = ten_sets
    argv = ["eval", "--all", "--data-root", str(root), "--model", "ovdense-test-vit", "--limit", "1"]
    argv += ["--out", str(tmp_path), "--workers", "0", "--crop", "0", "--short-side", "112", "--save-predictions"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    assert "--save-predictions" not in err  # every benchmark's predictions saved, no warning
    assert sorted(p.name for p in (tmp_path / "predictions").iterdir()) == sorted(f"{n}_sclip" for n in DATASETS)
    header, row = _row(out)
    assert header == ["method", *(PAPER_COLUMNS[n] for n in DATASETS), "Avg10", "Avg8"]
    summary = json.loads((tmp_path / "summary_sclip.json").read_text())
    assert set(summary) == set(DATASETS) | {"avg10", "avg8", "ignore_index"} and summary["ignore_index"] == "authors"
    assert summary["avg10"] == pytest.approx(np.mean([summary[n] for n in DATASETS]))
    assert summary["avg8"] == pytest.approx(np.mean([summary[n] for n in CLASSIC]))
    assert row[0] == "sclip" and [float(v) for v in row[1:]] == pytest.approx(
        [summary[n] for n in DATASETS] + [summary["avg10"], summary["avg8"]], abs=0.051
    )
    settings = json.loads(next(tmp_path.glob("ade847_sclip_*.json")).read_text())["settings"]
    assert settings["ignore_index"] == 255 and settings["ignore_policy"] == "authors"
    assert json.loads(next(tmp_path.glob("voc21_sclip_*.json")).read_text())["settings"]["ignore_index"] == 255


def test_paper_row_of_the_eight_and_of_the_ten():
    from ovdense.cli.eval import paper_row

    miou = {name: float(i) for i, name in enumerate(DATASETS)}  # 0..9
    results = {name: SimpleNamespace(miou=v) for name, v in miou.items()}
    table, summary = paper_row(results, "m", "unlabelled")
    header, _, row = table.splitlines()
    assert header == "| method | " + " | ".join(PAPER_COLUMNS.values()) + " | Avg10 | Avg8 |"
    assert row == "| m | 0.0 | 1.0 | 2.0 | 3.0 | 4.0 | 5.0 | 6.0 | 7.0 | 8.0 | 9.0 | 4.5 | 3.5 |"
    assert summary == {**miou, "avg10": 4.5, "avg8": 3.5, "ignore_index": "unlabelled"}
    table, summary = paper_row({n: results[n] for n in CLASSIC}, "m", "authors")
    assert table.splitlines()[0].endswith("| ADE | Avg8 |") and table.splitlines()[2].endswith("| 7.0 | 3.5 |")
    assert summary == {**{n: miou[n] for n in CLASSIC}, "avg8": 3.5}  # no ADE847/PC459: no policy to record


def test_cli_eval_unlabelled_policy_is_recorded(ten_sets, one_template, tmp_path, capsys):
    root, _ = ten_sets
    argv = ["eval", "--dataset", "context459", "--data-root", str(root), "--model", "ovdense-test-vit"]
    code, out, err = _run(
        argv + ["--out", str(tmp_path), "--workers", "0", "--crop", "0", "--ignore-index", "unlabelled"], capsys
    )
    assert code == 0, err
    settings = json.loads(next(tmp_path.glob("context459_sclip_*.json")).read_text())["settings"]
    assert settings["ignore_index"] == 65535 and settings["ignore_policy"] == "unlabelled"
    assert "| method |" not in out  # one benchmark: no paper row


def test_cli_eval_errors_before_any_model(ten_sets, tmp_path, capsys):
    root, _ = ten_sets
    only8 = tmp_path / "only8"
    for name in CLASSIC:
        make_dataset(name, only8, n=1)
    base = ["--model", "no-such-model", "--out", str(tmp_path / "r")]  # a model load would fail differently
    code, _, err = _run(["eval", "--all", "--data-root", str(only8), *base], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "2 of 10 datasets cannot be read (--eight runs the classic 8 alone): ADE847" in err and "PC459" in err
    code, _, err = _run(["eval", "--data-root", str(root), *base], capsys)
    assert code == 2 and "--all (the 10 benchmarks) or --eight" in err
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--all", "--eight", "--data-root", str(root), *base])
    assert exc.value.code == 2 and "--eight: not allowed with argument --all" in capsys.readouterr().err


def test_cli_eval_warns_where_the_flags_do_not_apply(ten_sets, one_template, tmp_path, capsys):
    root, _ = ten_sets
    argv = ["eval", "--dataset", "voc21", "--data-root", str(root), "--model", "ovdense-test-vit", "--workers", "0"]
    code, _, err = _run(argv + ["--out", str(tmp_path), "--ignore-index", "unlabelled"], capsys)
    assert code == 0 and "--ignore-index changes ADE847 and PC459 only" in err
