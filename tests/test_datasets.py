"""Benchmark readers: layouts, sample order, label decoding, class files and every error message."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from eval_fixtures import make_dataset, voc_palette
from ovdense.errors import OvdenseError
from ovdense.eval.datasets import (
    SegDataset,
    class_file,
    get_dataset,
    read_class_names,
    read_image,
    read_label,
)
from ovdense.eval.specs import CLASS_STYLES, CLASSIC, DATASETS
from ovdense.images import set_max_pixels

VOC_SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "voc2011-samples"


def test_table_order_and_specs():
    assert list(DATASETS) == [
        "voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k",
        "ade847", "context459",
    ]  # fmt: skip
    assert list(CLASSIC) == list(DATASETS)[:8]
    n = {k: s.num_classes for k, s in DATASETS.items()}
    assert n == {
        "voc21": 21, "context60": 60, "coco_object": 81, "voc20": 20, "context59": 59, "coco_stuff": 171,
        "cityscapes": 19, "ade20k": 150, "ade847": 847, "context459": 459,
    }  # fmt: skip
    assert {k for k, s in DATASETS.items() if s.reduce_zero_label} == {"ade20k", "context59", "voc20"}
    for spec in DATASETS.values():
        assert spec.prepare_hint and "\n" not in spec.prepare_hint


@pytest.mark.parametrize("name", CLASSIC)  # the 16-bit ADE847 and PC459: tests/test_ten_benchmarks.py
def test_reads_each_layout(name, tmp_path):
    fx = make_dataset(name, tmp_path, n=3, size=(20, 28), seed=1)
    ds = get_dataset(name, tmp_path)
    assert isinstance(ds, SegDataset) and ds.spec.name == name
    assert len(ds) == 3
    for i in range(3):
        s = ds[i]
        assert s["name"] == fx.names[i]
        assert s["image"].dtype == np.uint8 and s["image"].shape == (20, 28, 3)
        assert s["label"].dtype == np.uint8 and s["label"].shape == (20, 28)
        np.testing.assert_array_equal(s["image"], fx.images[i])
        np.testing.assert_array_equal(s["label"], fx.labels[i])
        assert Path(s["image_path"]) == ds.samples[i][0]
        labels = s["label"]
        assert (labels == 255).any()
        assert labels[labels != 255].max() < ds.spec.num_classes
    names = {s["name"] for s in ds}
    assert not names & set(fx.unlisted)
    for style in CLASS_STYLES:
        assert len(ds.class_names(style)) == ds.spec.num_classes


@pytest.mark.parametrize("name", ["voc20", "context59", "ade20k"])
def test_reduce_zero_label_in_reader(name, tmp_path):
    fx = make_dataset(name, tmp_path, n=2)
    ds = get_dataset(name, tmp_path)
    raw, got = fx.raw_labels[0], ds[0]["label"]
    assert (got[raw == 0] == 255).all()
    assert (got[raw == 255] == 255).all()
    keep = (raw != 0) & (raw != 255)
    np.testing.assert_array_equal(got[keep], raw[keep] - 1)
    assert got[0, 1] == ds.spec.num_classes - 1  # the highest raw class lands on the last class


@pytest.mark.parametrize("name", ["voc21", "context60", "coco_object", "coco_stuff", "cityscapes"])
def test_no_reduce_keeps_values(name, tmp_path):
    fx = make_dataset(name, tmp_path, n=1)
    np.testing.assert_array_equal(get_dataset(name, tmp_path)[0]["label"], fx.raw_labels[0])


def _save_p(arr, path):
    im = Image.frombytes("P", (arr.shape[1], arr.shape[0]), arr.astype(np.uint8).tobytes())
    im.putpalette(voc_palette())
    im.save(path)


def test_read_label_palette_and_grey(tmp_path):
    vals = np.array([[0, 1, 5], [254, 255, 20]], np.uint8)
    _save_p(vals, tmp_path / "p.png")
    Image.fromarray(vals).save(tmp_path / "l.png")
    for f in ("p.png", "l.png"):
        np.testing.assert_array_equal(read_label(tmp_path / f, False), vals)
        np.testing.assert_array_equal(read_label(tmp_path / f, True), [[255, 0, 4], [253, 255, 19]])
    # the palette's colours never matter: indices, not RGB
    assert Image.open(tmp_path / "p.png").mode == "P"


def test_read_label_rejects_colour_and_wide_values(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(OvdenseError, match="rgb.png.*one channel"):
        read_label(tmp_path / "rgb.png", False)
    Image.fromarray(np.full((4, 4), 300, np.uint16)).save(tmp_path / "wide.png")
    with pytest.raises(OvdenseError, match="outside 0..255"):
        read_label(tmp_path / "wide.png", False)
    Image.fromarray(np.full((4, 4), 7, np.uint16)).save(tmp_path / "narrow16.png")
    np.testing.assert_array_equal(read_label(tmp_path / "narrow16.png", False), np.full((4, 4), 7))


def test_read_image_applies_exif_orientation(tmp_path):
    img = np.zeros((10, 20, 3), np.uint8)
    img[:, :5] = 255  # white band on the left
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rot.jpg")
    assert out.shape == (20, 10, 3)
    assert out[:5].mean() > 200 and out[-5:].mean() < 50  # the band is now on top


def test_read_image_8bit_is_pillows_convert(tmp_path):
    # benchmark numbers must not move: JPEG, greyscale JPEG and palette PNG decode as before, bit for bit
    rgb = np.random.default_rng(0).integers(0, 256, (21, 34, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 8
    im.save(tmp_path / "a.jpg", exif=exif, quality=90)
    Image.fromarray(rgb[..., 2]).save(tmp_path / "g.jpg")
    im.quantize(32).save(tmp_path / "p.png")
    for name in ("a.jpg", "g.jpg", "p.png"):
        with Image.open(tmp_path / name) as ref:
            expected = np.asarray(ImageOps.exif_transpose(ref).convert("RGB"))
        out = read_image(tmp_path / name)
        np.testing.assert_array_equal(out, expected, err_msg=name)
        assert out.flags.writeable and out.flags.c_contiguous
    assert read_image(tmp_path / "a.jpg").shape == (34, 21, 3)


def test_read_image_scales_16_bit_and_composites_alpha(tmp_path):
    v = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    cv2.imwrite(str(tmp_path / "g16.png"), v)
    assert (tmp_path / "g16.png").read_bytes()[24] == 16  # IHDR bit depth: a genuine 16-bit PNG
    viewer = np.round(v * 255.0 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png"), np.repeat(viewer[..., None], 3, axis=2))
    rgb16 = np.random.default_rng(1).integers(0, 65536, (8, 9, 3)).astype(np.uint16)
    rgb16[0, 0] = [129, 386, 65407]  # the high byte says 0, 1, 255; a viewer 1, 2, 255
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])
    assert (tmp_path / "c16.png").read_bytes()[24:26] == bytes([16, 2])
    out = read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(out, np.round(rgb16 * 255.0 / 65535).astype(np.uint8))
    assert out[0, 0].tolist() == [1, 2, 255]
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # over white: round(c a / 255 + 255 (1 - a / 255))
    assert read_image(tmp_path / "a.png").tolist() == [[[255, 255, 255], [200, 100, 0], [227, 177, 127]]]


def test_read_image_errors_and_pixel_limit(tmp_path):
    with pytest.raises(OvdenseError, match=r"image not found: .*nope\.jpg"):
        read_image(tmp_path / "nope.jpg")
    (tmp_path / "t.jpg").write_text("not a picture")
    with pytest.raises(OvdenseError, match=r"cannot read image .*t\.jpg: not a recognised image format"):
        read_image(tmp_path / "t.jpg")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "x.png")
    set_max_pixels(1199)
    try:
        with pytest.raises(OvdenseError, match=r"x\.png is 40 x 30 = 1200 pixels, over the 1199 pixels limit"):
            read_image(tmp_path / "x.png")
    finally:
        set_max_pixels(None)
    assert read_image(tmp_path / "x.png").shape == (30, 40, 3)


def test_split_file_order_is_kept(tmp_path):
    fx = make_dataset("voc21", tmp_path, n=4)
    ds = get_dataset("voc21", tmp_path)
    split = (fx.root / "ImageSets/Segmentation/val.txt").read_text().split()
    assert [s["name"] for s in ds] == split == fx.names
    assert split != sorted(split)
    assert fx.unlisted and fx.unlisted[0] not in split
    # blank lines and surrounding spaces are ignored, as mmengine's list_from_file + strip
    (fx.root / "ImageSets/Segmentation/val.txt").write_text("\n  " + "\n\n".join(split) + "  \n\n")
    assert [s["name"] for s in get_dataset("voc21", tmp_path)] == split


def test_scan_order_is_sorted_paths(tmp_path):
    fx = make_dataset("cityscapes", tmp_path, n=4)
    ds = get_dataset("cityscapes", tmp_path)
    rel = [p.relative_to(fx.root / "leftImg8bit/val").as_posix() for p, _ in ds.samples]
    assert rel == sorted(rel) and rel[0].startswith("aachen/")
    assert [s["name"] for s in ds] == fx.names
    assert all(lab.name.endswith("_gtFine_labelTrainIds.png") for _, lab in ds.samples)


def test_data_root_may_point_inside(tmp_path):
    fx = make_dataset("voc21", tmp_path, n=2)
    for root in (tmp_path, tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOC2012"):
        ds = get_dataset("voc21", root)
        assert [s["name"] for s in ds] == fx.names
    make_dataset("coco_stuff", tmp_path / "c", n=2)
    assert len(get_dataset("coco_stuff", tmp_path / "c" / "coco_stuff164k")) == 2
    make_dataset("ade20k", tmp_path / "a", n=2)
    assert len(get_dataset("ade20k", tmp_path / "a" / "ade")) == 2


def test_shared_files_between_variants(tmp_path):
    fx21 = make_dataset("voc21", tmp_path, n=2, seed=3)
    fx20 = make_dataset("voc20", tmp_path, n=2, seed=3)
    np.testing.assert_array_equal(fx21.raw_labels[0], fx20.raw_labels[0])
    a, b = get_dataset("voc21", tmp_path)[0]["label"], get_dataset("voc20", tmp_path)[0]["label"]
    np.testing.assert_array_equal(b[(a != 0) & (a != 255)], a[(a != 0) & (a != 255)] - 1)
    assert (b[a == 0] == 255).all()


def test_dataset_pickles_for_workers(tmp_path):
    make_dataset("ade20k", tmp_path, n=2)
    ds = pickle.loads(pickle.dumps(get_dataset("ade20k", tmp_path)))
    assert ds[1]["label"].shape == (24, 32)


# --- errors ------------------------------------------------------------------------------------------------


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_unknown_dataset(tmp_path):
    with pytest.raises(OvdenseError) as err:
        get_dataset("voc2012", tmp_path)
    msg = _one_line(err)
    assert "voc2012" in msg and all(n in msg for n in DATASETS)


def test_missing_data_root(tmp_path):
    with pytest.raises(OvdenseError) as err:
        get_dataset("ade20k", tmp_path / "nope")
    msg = _one_line(err)
    assert str(tmp_path / "nope") in msg and DATASETS["ade20k"].prepare_hint in msg


def test_missing_image_dir(tmp_path):
    with pytest.raises(OvdenseError) as err:
        get_dataset("coco_object", tmp_path)
    msg = _one_line(err)
    assert str(tmp_path / "coco_stuff164k" / "images/val2017") in msg
    assert "ovdense convert coco-object" in msg


def test_missing_label_dir(tmp_path):
    fx = make_dataset("cityscapes", tmp_path, n=1)
    shutil.rmtree(fx.root / "gtFine")
    with pytest.raises(OvdenseError) as err:
        get_dataset("cityscapes", tmp_path)
    msg = _one_line(err)
    assert str(fx.root / "gtFine/val") in msg and "ovdense convert cityscapes" in msg


def test_missing_split_file(tmp_path):
    fx = make_dataset("context59", tmp_path, n=1)
    (fx.root / "ImageSets/SegmentationContext/val.txt").unlink()
    with pytest.raises(OvdenseError) as err:
        get_dataset("context59", tmp_path)
    msg = _one_line(err)
    assert str(fx.root / "ImageSets/SegmentationContext/val.txt") in msg and "pascal-context" in msg


def test_listed_image_without_label(tmp_path):
    fx = make_dataset("voc21", tmp_path, n=3)
    (fx.root / "SegmentationClass" / f"{fx.names[1]}.png").unlink()
    with pytest.raises(OvdenseError) as err:
        get_dataset("voc21", tmp_path)
    msg = _one_line(err)
    assert f"{fx.names[1]}.png" in msg and f"{fx.names[1]}.jpg" in msg


def test_scanned_image_without_label(tmp_path):
    fx = make_dataset("coco_stuff", tmp_path, n=2)
    (fx.root / "annotations/val2017" / f"{fx.names[0]}_labelTrainIds.png").unlink()
    with pytest.raises(OvdenseError, match=f"{fx.names[0]}_labelTrainIds.png"):
        get_dataset("coco_stuff", tmp_path)


def test_listed_image_missing(tmp_path):
    fx = make_dataset("voc21", tmp_path, n=2)
    (fx.root / "JPEGImages" / f"{fx.names[0]}.jpg").unlink()
    with pytest.raises(OvdenseError, match=f"{fx.names[0]}.jpg"):
        get_dataset("voc21", tmp_path)


def test_label_size_mismatch_is_lazy(tmp_path):
    fx = make_dataset("ade20k", tmp_path, n=2)
    bad = fx.root / "annotations/validation" / f"{fx.names[1]}.png"
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(bad)
    ds = get_dataset("ade20k", tmp_path)  # building the dataset reads no pixels
    ds[0]
    with pytest.raises(OvdenseError) as err:
        ds[1]
    msg = _one_line(err)
    assert str(bad) in msg and f"{fx.names[1]}.jpg" in msg and "6x5" in msg and "32x24" in msg


def test_empty_split_and_empty_folder(tmp_path):
    fx = make_dataset("voc21", tmp_path, n=1)
    (fx.root / "ImageSets/Segmentation/val.txt").write_text("\n\n")
    with pytest.raises(OvdenseError, match="lists no images"):
        get_dataset("voc21", tmp_path)
    (tmp_path / "ade/ADEChallengeData2016/images/validation").mkdir(parents=True)
    (tmp_path / "ade/ADEChallengeData2016/annotations/validation").mkdir(parents=True)
    with pytest.raises(OvdenseError, match=r"no \*\.jpg images in"):
        get_dataset("ade20k", tmp_path)


# --- class names ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", CLASS_STYLES)
@pytest.mark.parametrize("name", list(DATASETS))
def test_class_files_have_one_line_per_class(name, style):
    classes = read_class_names(name, style)
    assert len(classes) == DATASETS[name].num_classes
    escaped = "\\," in class_file(name, style).read_text()  # a comma inside a name is written \,
    for names in classes:
        assert names and all(n and n == n.strip() and (escaped or "," not in n) for n in names)


def test_class_styles_pick_the_right_file():
    bg_words = read_class_names("voc21")[0]
    assert len(bg_words) == 26 and bg_words[:3] == ["sky", "wall", "tree"] and bg_words[-1] == "fence"
    assert read_class_names("voc21")[15][:2] == ["person", "person in shirt"]
    assert read_class_names("voc21", "clearclip")[0] == ["background"]
    assert read_class_names("voc21", "clearclip")[20] == ["tvmonitor"]
    assert read_class_names("coco_object", "clearclip")[0] == ["background"]
    assert read_class_names("context60")[0] == ["background"]
    assert read_class_names("context60", "clearclip") == read_class_names("context60")  # no own file: fallback
    assert read_class_names("voc21", "proxyclip")[15] == ["person"]  # SCLIP's names without its synonyms
    assert read_class_names("voc21", "corrclip")[15] == ["people"]  # CorrCLIP v1's class-name correction
    assert "bed" in read_class_names("coco_object", "proxyclip")[0]
    assert "bed" not in read_class_names("coco_object", "corrclip")[0] and read_class_names("coco_stuff", "corrclip")[
        0
    ] == ["people"]
    assert read_class_names("voc20", "declip")[14] == ["person"]
    assert len(read_class_names("coco_object", "declip")[0]) == 17
    # SCLIP's COCO-Object lists "bed" both as a background word and as class "bed": kept as written
    obj = read_class_names("coco_object")
    assert "bed" in obj[0] and ["bed"] in obj
    assert all(len(c) == 1 for c in read_class_names("ade20k"))
    # CorrCLIPv2: CorrCLIP v1's names, except Cityscapes' one prompt "people, person"
    assert read_class_names("cityscapes", "corrclipv2")[11] == ["people, person"]
    assert read_class_names("cityscapes", "corrclip")[11] == ["people"]
    assert read_class_names("voc21", "corrclipv2") == read_class_names("voc21", "corrclip")
    assert read_class_names("ade20k", "corrclipv2") == read_class_names("ade20k", "corrclip")


def test_unknown_class_style(tmp_path):
    with pytest.raises(OvdenseError, match="unknown class-name style 'naclp'.*sclip, clearclip, declip"):
        read_class_names("voc21", "naclp")


# --- real photos ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not VOC_SAMPLES.is_dir(), reason="shared VOC samples not present")
def test_real_voc_samples():
    ds = get_dataset("voc21", VOC_SAMPLES)
    assert ds.root == VOC_SAMPLES / "VOC2012"
    assert [s["name"] for s in ds] == ["2011_000003", "2011_000006", "2011_000025"]
    s = ds[0]
    assert s["image"].shape == (338, 500, 3) and s["label"].shape == (338, 500)
    assert set(np.unique(s["label"]).tolist()) == {0, 5, 15, 255}
    assert set(np.unique(ds[1]["label"]).tolist()) == {0, 9, 15, 18, 255}
    v20 = get_dataset("voc20", VOC_SAMPLES)
    assert set(np.unique(v20[0]["label"]).tolist()) == {4, 14, 255}
    assert set(np.unique(v20[2]["label"]).tolist()) == {5, 6, 255}
