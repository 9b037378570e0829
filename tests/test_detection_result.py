import json

import numpy as np
import pytest
from PIL import Image

from ovdense.detection.result import DetectionResult, detection_colours
from ovdense.viz import VizInputError, label_palette

NAMES = ["person", "cat", "dog", "traffic light"]
GREY = 60
# Fractions of (W, H): boxes side by side, bottoms far below every tag; the dog's box touches the top.
BOXES = np.array([[0.02, 0.40, 0.30, 0.98], [0.35, 0.00, 0.62, 0.95], [0.68, 0.30, 0.98, 0.92]])
SCORES = np.array([0.9, 0.87, 0.5], dtype=np.float32)
LABELS = np.array([0, 2, 0])


def _result(h: int, w: int, masks=None) -> DetectionResult:
    boxes = (BOXES * np.array([w, h, w, h])).astype(np.float32)
    return DetectionResult(boxes, SCORES, LABELS, NAMES, (h, w), masks)


def _image(h: int, w: int) -> np.ndarray:
    return np.full((h, w, 3), GREY, dtype=np.uint8)


def _pixel_box(box, h: int, w: int) -> tuple[int, int, int, int]:
    """The pixel rectangle a box outlines: floor of the top-left, last pixel before the bottom-right."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return int(np.floor(x1)), int(np.floor(y1)), min(int(np.ceil(x2)) - 1, w - 1), min(int(np.ceil(y2)) - 1, h - 1)


def _colours_in(region: np.ndarray) -> set[tuple[int, int, int]]:
    return {tuple(int(v) for v in c) for c in np.unique(region.reshape(-1, 3), axis=0)}


def test_colours_are_voc_without_black():
    colours = detection_colours(300)
    assert colours.shape == (300, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[:255], label_palette(256)[1:])
    np.testing.assert_array_equal(colours[255], label_palette(256)[1])
    assert not (colours == 0).all(axis=1).any()


@pytest.mark.parametrize("h, w", [(48, 64), (900, 1200)])
def test_overlay_boxes_tags_and_legend(h, w):
    result = _result(h, w)
    image = _image(h, w)
    out = result.overlay(image)
    bare = result.overlay(image, legend=False)
    assert bare.size == (w, h)
    panel_w = out.width - w
    assert panel_w > 0 and out.height >= h
    pixels, bare_px = np.asarray(out), np.asarray(bare)
    np.testing.assert_array_equal(pixels[:h, :w], bare_px)
    colours = detection_colours(len(NAMES))
    line = max(1, round(min(h, w) / 300))
    for box, label in zip(result.boxes, result.labels, strict=True):
        left, top, right, bottom = _pixel_box(box, h, w)
        colour = colours[label]
        # The bottom edge (no tag reaches it) is `line` pixels of the class colour, the image just inside it.
        assert (bare_px[bottom - line + 1 : bottom + 1, left : right + 1] == colour).all()
        assert (bare_px[bottom - line, left + line : right - line + 1] == GREY).all()
        # So are the lower parts of the left and right edges.
        lower = slice((top + bottom) // 2 + h // 8, bottom + 1)
        assert (bare_px[lower, left : left + line] == colour).all()
        assert (bare_px[lower, right - line + 1 : right + 1] == colour).all()
        assert (bare_px[lower.start : bottom - line + 1, left + line] == GREY).all()
    # The dog's box touches the top: its tag is inside the image, at the top.
    dog_left, _, dog_right, _ = _pixel_box(result.boxes[1], h, w)
    assert tuple(colours[2]) in _colours_in(bare_px[:2, :])
    if w >= 400:  # tags narrower than their boxes: each tag starts at its box's left edge
        assert (bare_px[0:2, dog_left : dog_left + 3] == colours[2]).all()
        left, top, _, _ = _pixel_box(result.boxes[0], h, w)
        assert (bare_px[top - 3 : top - 1, left : left + 3] == colours[0]).all()  # the person's tag sits above it
    # Legend: the detected classes' swatches, not the undetected ones; white elsewhere.
    panel = _colours_in(pixels[:, w:])
    assert tuple(colours[0]) in panel and tuple(colours[2]) in panel
    assert tuple(colours[1]) not in panel and tuple(colours[3]) not in panel
    assert result.legend_rows() == [
        {"label": 0, "name": "person", "colour": tuple(int(v) for v in colours[0]), "count": 2},
        {"label": 2, "name": "dog", "colour": tuple(int(v) for v in colours[2]), "count": 1},
    ]


def test_overlay_scales_with_image_size():
    small = _result(48, 64).overlay(_image(48, 64))
    large = _result(900, 1200).overlay(_image(900, 1200))
    assert large.width - 1200 > 2 * (small.width - 64)


def test_overlay_accepts_pil_and_filters():
    h, w = 90, 120
    result = _result(h, w)
    image = _image(h, w)
    a = np.asarray(result.overlay(image))
    b = np.asarray(result.overlay(Image.fromarray(image)))
    np.testing.assert_array_equal(a, b)
    assert result.shown().tolist() == [0, 1, 2]
    assert result.shown(min_score=0.88).tolist() == [0]
    assert result.shown(max_boxes=2).tolist() == [0, 1]
    assert result.shown(max_boxes=0).tolist() == []
    assert [r["name"] for r in result.legend_rows(min_score=0.6)] == ["person", "dog"]
    assert [r["count"] for r in result.legend_rows(min_score=0.88)] == [1]
    # Nothing above the threshold: the image unchanged and a legend without swatches.
    none = np.asarray(result.overlay(image, min_score=0.95))
    assert (none[:h, :w] == GREY).all()
    assert not _colours_in(none[:, w:]) & {tuple(int(v) for v in c) for c in detection_colours(len(NAMES))}


def test_overlay_blends_masks_in_the_class_colour():
    h, w = 48, 64
    masks = np.zeros((3, h, w), dtype=bool)
    masks[0, 30:40, 4:10] = True
    masks[2, 30:40, 50:55] = True
    result = _result(h, w, masks)
    out = np.asarray(result.overlay(_image(h, w), legend=False))
    colours = detection_colours(len(NAMES)).astype(np.float32)
    expected = np.rint(GREY * 0.5 + colours[0] * 0.5).astype(np.uint8)
    assert (out[32:38, 6:9] == expected).all()
    assert (out[32:38, 52:54] == expected).all()  # the third detection is a person too
    assert (out[20:28, 6:9] == GREY).all()
    # Below min_score the mask is not drawn either.
    out = np.asarray(result.overlay(_image(h, w), min_score=0.6, legend=False))
    assert (out[32:38, 52:54] == GREY).all()
    clear = np.asarray(result.overlay(_image(h, w), legend=False, mask_alpha=0.0))
    assert (clear[32:38, 6:9] == GREY).all()


def test_to_json():
    result = _result(48, 64)
    data = result.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["image_size"] == {"height": 48, "width": 64}
    assert data["class_names"] == NAMES
    assert data["detections"][0] == {
        "label": 0,
        "class_name": "person",
        "score": 0.9,
        "box_xyxy": [1.28, 19.2, 19.2, 47.04],
    }
    assert [d["class_name"] for d in data["detections"]] == ["person", "dog", "person"]
    assert [d["score"] for d in data["detections"]] == [0.9, 0.87, 0.5]
    assert len(result) == 3
    empty = DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), NAMES, (10, 20))
    assert len(empty) == 0 and empty.to_json()["detections"] == []
    assert empty.overlay(_image(10, 20)).width > 20


def test_fields_are_converted():
    result = DetectionResult([[1, 2, 3, 4]], [0.5], [1], ("a", "b"), [10, 20], np.ones((1, 10, 20), dtype=np.uint8))
    assert result.boxes.dtype == np.float32 and result.scores.dtype == np.float32
    assert result.labels.dtype == np.int64 and result.masks.dtype == bool
    assert result.class_names == ["a", "b"] and result.image_size == (10, 20)


GOOD = {
    "boxes": np.array([[1, 2, 5, 6]], np.float32),
    "scores": np.array([0.5], np.float32),
    "labels": np.array([1]),
    "class_names": ["a", "b"],
    "image_size": (10, 20),
}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"boxes": np.zeros((1, 5))}, "K x 4"),
        ({"boxes": np.array([[5, 2, 1, 6]])}, "x2 >= x1"),
        ({"boxes": np.array([[1, 2, np.nan, 6]])}, "non-finite"),
        ({"scores": np.zeros(2)}, "scores"),
        ({"scores": np.array([np.inf])}, "non-finite"),
        ({"labels": np.array([2])}, "0..1"),
        ({"labels": np.array([-1])}, "0..1"),
        ({"labels": np.array([1.0])}, "integers"),
        ({"class_names": []}, "empty"),
        ({"class_names": "ab"}, "list"),
        ({"image_size": (10,)}, "image_size"),
        ({"image_size": (0, 20)}, "positive"),
        ({"masks": np.zeros((1, 20, 10), bool)}, "masks"),
        ({"masks": np.zeros((1, 10, 20), np.float32)}, "bool"),
    ],
)
def test_construction_refusals(change, words):
    with pytest.raises(VizInputError) as err:
        DetectionResult(**{**GOOD, **change})
    assert words in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "image, kwargs, words",
    [
        (np.zeros((20, 10, 3), np.uint8), {}, "10 x 20"),
        (np.zeros((10, 20), np.uint8), {}, "H x W x 3"),
        (np.zeros((10, 20, 4), np.uint8), {}, "H x W x 3"),
        (np.zeros((10, 20, 3), np.float32), {}, "uint8"),
        (np.zeros((10, 20, 3), np.uint8), {"min_score": float("nan")}, "min_score"),
        (np.zeros((10, 20, 3), np.uint8), {"max_boxes": -1}, "max_boxes"),
        (np.zeros((10, 20, 3), np.uint8), {"mask_alpha": 2.0}, "mask_alpha"),
    ],
)
def test_overlay_refusals(image, kwargs, words):
    result = DetectionResult(**GOOD)
    with pytest.raises(VizInputError) as err:
        result.overlay(image, **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
