import json
import os

import imgviz
import numpy as np
import pytest
from PIL import Image

from ovdense.errors import OvdenseError
from ovdense.viz import (
    blend,
    class_areas,
    colorize,
    label_palette,
    legend_rows,
    overlay,
    prediction_and_truth,
    save_image_atomic,
    save_label_png,
)

NAMES = ["sky", "person", "tree", "car", "road", "dog", "building"]


def _blend(img: np.ndarray, labels: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """The documented overlay formula, computed independently of viz.py (colours from imgviz)."""
    colours = imgviz.label_colormap()[:n][labels].astype(np.float32)
    out = img.astype(np.float32) * np.float32(1.0 - alpha) + colours * np.float32(alpha)
    return np.rint(out).astype(np.uint8)


def _colour_counts(region: np.ndarray) -> dict[tuple[int, int, int], int]:
    colours, counts = np.unique(region.reshape(-1, 3), axis=0, return_counts=True)
    return {tuple(int(v) for v in c): int(k) for c, k in zip(colours, counts, strict=True)}


def _scene(h: int, w: int, classes=(1, 3, 5), seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    labels = np.asarray(classes)[(np.arange(w)[None, :] * len(classes)) // w].repeat(h, axis=0)
    return img, labels.astype(np.int64)


def _is_grey(c) -> bool:
    return c[0] == c[1] == c[2]


# ------------------------------------------------------------------------------------------- palette


@pytest.mark.parametrize("n", [0, 1, 2, 21, 150, 256])
def test_palette_matches_imgviz(n):
    pal = label_palette(n)
    assert pal.dtype == np.uint8 and pal.shape == (n, 3)
    np.testing.assert_array_equal(pal, imgviz.label_colormap()[:n])


def test_palette_first_colours_are_voc():
    pal = label_palette(4)
    assert pal.tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert label_palette(256)[255].tolist() == [224, 224, 192]  # VOC "void"


@pytest.mark.parametrize("n", [2**24 + 1, -1])  # past 256 the VOC formula goes on (tests/test_wide_labels.py)
def test_palette_size_limits(n):
    with pytest.raises(ValueError):
        label_palette(n)


# ------------------------------------------------------------------------------------------- colorize


def test_colorize():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 21, size=(9, 13))
    out = colorize(labels, label_palette(21))
    assert out.shape == (9, 13, 3) and out.dtype == np.uint8
    ref = imgviz.label_colormap()
    for y, x in [(0, 0), (4, 7), (8, 12)]:
        assert out[y, x].tolist() == ref[labels[y, x]].tolist()
    np.testing.assert_array_equal(out, ref[labels])
    np.testing.assert_array_equal(colorize(labels), out)  # default palette: 256 VOC colours
    custom = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.uint8)
    np.testing.assert_array_equal(colorize(np.array([[1, 0]]), custom), [[[4, 5, 6], [1, 2, 3]]])


@pytest.mark.parametrize("labels", [np.array([[0, 21]]), np.array([[-1, 0]]), np.zeros((2, 2), float)])
def test_colorize_rejects_bad_labels(labels):
    with pytest.raises(ValueError):
        colorize(labels, label_palette(21))


# ------------------------------------------------------------------------------------------- overlay


@pytest.mark.parametrize("alpha", [0.0, 0.4, 0.5, 1.0])
def test_overlay_blend_and_legend(alpha):
    h, w = 60, 80
    img, labels = _scene(h, w)
    out = overlay(img, labels, NAMES, alpha=alpha)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    arr = np.asarray(out)
    assert arr.shape[1] > w and arr.shape[0] >= h

    np.testing.assert_array_equal(arr[:h, :w], _blend(img, labels, len(NAMES), alpha))
    if arr.shape[0] > h:  # below a short image the canvas is white
        assert (arr[h:, :w] == 255).all()

    panel = arr[:, w:]
    assert panel[0, 0].tolist() == panel[-1, -1].tolist() == [255, 255, 255]
    counts = _colour_counts(panel)
    pal = imgviz.label_colormap()
    for i in (1, 3, 5):
        assert counts.get(tuple(pal[i]), 0) >= 16, f"swatch of present class {i} missing"
    for i in (2, 4, 6):
        assert not _is_grey(pal[i])  # text antialiasing only makes greys
        assert tuple(pal[i]) not in counts, f"absent class {i} in the legend"


def test_overlay_accepts_pil_image_and_no_legend():
    img, labels = _scene(20, 30)
    a = overlay(img, labels, NAMES, alpha=0.3)
    b = overlay(Image.fromarray(img), labels, NAMES, alpha=0.3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    plain = overlay(img, labels, NAMES, alpha=0.3, legend=False)
    assert plain.size == (30, 20)
    np.testing.assert_array_equal(np.asarray(plain), _blend(img, labels, len(NAMES), 0.3))


def test_overlay_all_classes():
    img, labels = _scene(40, 40, classes=(1,))
    out = np.asarray(overlay(img, labels, NAMES, only_present=False))
    counts = _colour_counts(out[:, 40:])
    pal = imgviz.label_colormap()
    for i in range(1, len(NAMES)):
        assert counts.get(tuple(pal[i]), 0) >= 16


def test_overlay_present_classes_in_class_order_top_to_bottom():
    img, labels = _scene(50, 60, classes=(5, 1, 3))
    panel = np.asarray(overlay(img, labels, NAMES))[:, 60:]
    pal = imgviz.label_colormap()
    rows = [np.flatnonzero((panel == pal[i]).all(axis=2).any(axis=1)).mean() for i in (1, 3, 5)]
    assert rows == sorted(rows)


@pytest.mark.parametrize("h, w", [(16, 16), (1000, 1500), (1500, 1000)])
def test_overlay_legend_tiny_and_huge(h, w):
    img, labels = _scene(h, w)
    out = np.asarray(overlay(img, labels, NAMES, alpha=0.5))
    np.testing.assert_array_equal(out[:h, :w], _blend(img, labels, len(NAMES), 0.5))
    panel = out[:, w:]
    assert panel.shape[1] < max(200, w)  # a side panel, not a second image
    counts = _colour_counts(panel)
    pal = imgviz.label_colormap()
    for i in (1, 3, 5):
        assert counts.get(tuple(pal[i]), 0) >= 16
    if h >= 1000:
        assert out.shape[0] == h  # a few classes fit beside a tall image


def test_overlay_legend_scales_with_image_height():
    def swatch_pixels(h):
        img, labels = _scene(h, h)
        panel = np.asarray(overlay(img, labels, NAMES))[:, h:]
        return _colour_counts(panel)[tuple(imgviz.label_colormap()[1])]

    small, big = swatch_pixels(16), swatch_pixels(1200)
    assert big > 4 * small


def test_overlay_many_classes_stays_near_image_height():
    names = [f"class {i}" for i in range(150)]
    h, w = 600, 400
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 150, size=(h, w))
    img = np.zeros((h, w, 3), np.uint8)
    out = overlay(img, labels, names)
    assert out.height <= h + 60  # extra columns instead of a very tall panel
    counts = _colour_counts(np.asarray(out)[:, w:])
    pal = imgviz.label_colormap()
    missing = [i for i in range(1, 150) if not _is_grey(pal[i]) and tuple(pal[i]) not in counts]
    assert not missing


def test_overlay_unlabelled_pixels_and_no_classes():
    img, labels = _scene(30, 30)
    labels[:10] = 255  # VOC "void"
    labels[10:12] = -1
    out = np.asarray(overlay(img, labels, NAMES, alpha=0.5))
    np.testing.assert_array_equal(out[:12, :30], img[:12])
    np.testing.assert_array_equal(out[12:30, :30], _blend(img[12:], labels[12:], len(NAMES), 0.5))

    none = overlay(img, np.full((30, 30), 255), NAMES)
    arr = np.asarray(none)
    np.testing.assert_array_equal(arr[:30, :30], img)
    panel = arr[:, 30:]
    assert panel.shape[1] > 20 and (panel < 128).any()  # "no classes" written in black
    assert all(_is_grey(c) for c in _colour_counts(panel))


def test_overlay_boundaries():
    img, labels = _scene(20, 30, classes=(1, 2))
    out = np.asarray(overlay(img, labels, NAMES, legend=False, boundaries=True))
    edge = labels[:, :-1] != labels[:, 1:]
    ys, xs = np.nonzero(edge)
    assert len(ys) == 20
    assert (out[ys, xs] == 255).all()
    blend = _blend(img, labels, len(NAMES), 0.5)
    keep = np.ones(labels.shape, bool)
    keep[ys, xs] = False
    np.testing.assert_array_equal(out[keep], blend[keep])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"labels": np.zeros((5, 6), int)},  # wrong shape
        {"labels": np.zeros((6, 5), float)},  # not integers
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"class_names": []},
    ],
)
def test_overlay_rejects_bad_input(kwargs):
    args = {"image": np.zeros((6, 5, 3), np.uint8), "labels": np.zeros((6, 5), int), "class_names": NAMES}
    args.update(kwargs)
    with pytest.raises(ValueError) as info:
        overlay(**args)
    assert isinstance(info.value, OvdenseError)  # the CLI reports it as a one-line user error


def test_background_class_is_transparent_and_named_background():
    img, labels = _scene(40, 60, classes=(0, 1, 3))
    out = np.asarray(overlay(img, labels, NAMES, background=0))
    bg = labels == 0
    np.testing.assert_array_equal(out[:40, :60][bg], img[bg])  # not blended with black
    np.testing.assert_array_equal(out[:40, :60][~bg], _blend(img, labels, len(NAMES), 0.5)[~bg])
    np.testing.assert_array_equal(out[:40, :60], blend(img, labels, len(NAMES), 0.5, background=0))
    panel = _colour_counts(out[:, 60:])
    assert (0, 0, 0) not in panel or panel[(0, 0, 0)] < 16  # no black swatch (text pixels only)
    without = _colour_counts(np.asarray(overlay(img, labels, NAMES))[:, 60:])
    assert without[(0, 0, 0)] >= 16  # class 0's black swatch when it is not the background
    rows = legend_rows(labels, NAMES, background=0)
    assert [r["name"] for r in rows] == ["background", "person", "car"]
    assert rows[0]["colour"] is None and rows[1]["colour"] == (128, 0, 0)
    with pytest.raises(ValueError, match="background must be a class index"):
        overlay(img, labels, NAMES, background=7)


def test_legend_rows_percentages():
    labels = np.zeros((10, 100), np.int64)
    labels[:, :25] = 2
    labels[0, 99] = 255  # unlabelled: counted in the total, in no row
    labels[0, 98] = 4
    rows = legend_rows(labels, NAMES)
    assert [(r["index"], r["pixels"]) for r in rows] == [(0, 748), (2, 250), (4, 1)]
    assert [r["percent"] for r in rows] == ["74.8%", "25.0%", "0.1%"]
    assert abs(sum(r["fraction"] for r in rows) - 999 / 1000) < 1e-12
    big = np.zeros((100, 100), np.int64)
    big[0, 0] = 1
    assert [r["percent"] for r in legend_rows(big, NAMES)] == ["100.0%", "<0.1%"]
    assert len(legend_rows(big, NAMES, only_present=False)) == len(NAMES)


def test_overlay_percentages_widen_the_legend():
    img, labels = _scene(60, 80)
    plain = overlay(img, labels, NAMES)
    with_pct = overlay(img, labels, NAMES, percentages=True)
    assert with_pct.width > plain.width and with_pct.height == plain.height
    np.testing.assert_array_equal(np.asarray(with_pct)[:60, :80], np.asarray(plain)[:60, :80])


def test_prediction_and_truth_side_by_side():
    h, w = 64, 48
    img, pred = _scene(h, w, classes=(0, 1))
    truth = np.full((h, w), 3, np.int64)
    truth[:, :10] = 255  # not labelled: the image shows through
    out = np.asarray(prediction_and_truth(img, pred, truth, NAMES, background=0))
    # Find the title strip height: the first row where the left picture equals the prediction's blend.
    want_left = blend(img, pred, len(NAMES), 0.5, background=0)
    strip = next(t for t in range(out.shape[0] - h + 1) if np.array_equal(out[t : t + h, :w], want_left))
    assert strip > 0  # a title above the pictures
    want_right = blend(img, truth, len(NAMES))
    gap = next(g for g in range(80) if np.array_equal(out[strip : strip + h, w + g : 2 * w + g], want_right))
    right = out[strip : strip + h, w + gap : 2 * w + gap]
    np.testing.assert_array_equal(right[:, :10], img[:, :10])
    panel = _colour_counts(out[:, 2 * w + gap :])
    pal = imgviz.label_colormap()
    assert panel.get(tuple(pal[1]), 0) >= 16 and panel.get(tuple(pal[3]), 0) >= 16  # classes of either map
    with pytest.raises(ValueError, match="differs from the ground truth"):
        prediction_and_truth(img, pred, truth[:10], NAMES)


# ------------------------------------------------------------------------------------------- files


def test_save_label_png_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 21, size=(17, 23))
    labels[0, 0] = 255
    path = tmp_path / "labels.png"
    save_label_png(labels, path)
    with Image.open(path) as im:
        assert im.mode == "P" and im.format == "PNG" and im.size == (23, 17)
        np.testing.assert_array_equal(np.asarray(im), labels)
        pal = np.asarray(im.getpalette(), np.uint8).reshape(-1, 3)
    assert len(pal) == 256
    np.testing.assert_array_equal(pal, imgviz.label_colormap())
    # what a viewer shows: the VOC colours
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), imgviz.label_colormap()[labels])


def test_save_label_png_custom_palette(tmp_path):
    labels = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
    path = tmp_path / "l.png"
    save_label_png(labels, path, palette=palette)
    with Image.open(path) as im:
        assert im.mode == "P"
        np.testing.assert_array_equal(np.asarray(im), labels)
        np.testing.assert_array_equal(np.asarray(im.getpalette()[:9]), palette.reshape(-1))


@pytest.mark.parametrize(
    "labels, palette",
    [
        (np.array([[0, 256]]), label_palette(256)),  # a palette PNG holds 0..255 (None: a 16-bit PNG)
        (np.array([[0, 65536]]), None),  # nor does a 16-bit PNG hold 65536
        (np.array([[-1, 0]]), None),
        (np.array([[0.0, 1.0]]), None),
        (np.zeros((2, 2, 2), int), None),
        (np.array([[0, 3]]), label_palette(3)),  # no colour for 3
        (np.array([[0, 1]]), np.zeros((257, 3), np.uint8)),
    ],
)
def test_save_label_png_rejects(tmp_path, labels, palette):
    with pytest.raises(ValueError):
        save_label_png(labels, tmp_path / "x.png", palette=palette)
    assert os.listdir(tmp_path) == []


def test_atomic_writes_leave_no_temp_files(tmp_path):
    img, labels = _scene(12, 14)
    save_label_png(labels, tmp_path / "a_labels.png")
    save_image_atomic(overlay(img, labels, NAMES), tmp_path / "a_overlay.png")
    save_label_png(labels, tmp_path / "a_labels.png")  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["a_labels.png", "a_overlay.png"]
    with Image.open(tmp_path / "a_overlay.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"


def test_save_image_atomic_format_from_extension(tmp_path):
    img = Image.new("RGB", (8, 8), (10, 200, 30))
    save_image_atomic(img, tmp_path / "o.jpg")
    save_image_atomic(img, tmp_path / "o.unknownext")
    with Image.open(tmp_path / "o.jpg") as im:
        assert im.format == "JPEG"
    with Image.open(tmp_path / "o.unknownext") as im:
        assert im.format == "PNG"


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.png"
    path.write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_image_atomic(Image.new("RGB", (4, 4)), path)
    with pytest.raises(OSError, match="disk full"):
        save_label_png(np.zeros((4, 4), int), path)
    assert os.listdir(tmp_path) == ["out.png"]
    assert path.read_bytes() == b"old"


def test_atomic_write_file_mode_follows_umask(tmp_path):
    if os.name != "posix":
        pytest.skip("POSIX permissions")
    old = os.umask(0o022)
    try:
        save_image_atomic(Image.new("RGB", (2, 2)), tmp_path / "p.png")
    finally:
        os.umask(old)
    assert (tmp_path / "p.png").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------------- areas


def test_class_areas():
    labels = np.zeros((10, 10), np.int64)
    labels[:, :3] = 2  # 30 px
    labels[:, 3:5] = 4  # 20 px
    labels[0, 9] = 5  # 1 px; class 0 keeps 49 px
    labels[1, 9] = 3
    areas = class_areas(labels, NAMES)
    assert [a["index"] for a in areas] == [0, 2, 4, 3, 5]  # largest first; ties by index
    assert [a["name"] for a in areas] == ["sky", "tree", "road", "car", "dog"]
    assert [a["pixels"] for a in areas] == [48, 30, 20, 1, 1]
    assert sum(a["pixels"] for a in areas) == labels.size
    assert sum(a["fraction"] for a in areas) == pytest.approx(1.0)
    assert areas[1]["fraction"] == pytest.approx(0.3)
    assert all(a["pixels"] > 0 for a in areas)
    assert set(areas[0]) == {"index", "name", "pixels", "fraction"}
    json.dumps(areas)  # plain Python types
    assert type(areas[0]["index"]) is int and type(areas[0]["fraction"]) is float


def test_class_areas_skips_unlabelled():
    labels = np.array([[0, 255], [1, 1]], dtype=np.uint8)
    areas = class_areas(labels, ["a", "b"])
    assert [(a["name"], a["pixels"], a["fraction"]) for a in areas] == [("b", 2, 0.5), ("a", 1, 0.25)]
