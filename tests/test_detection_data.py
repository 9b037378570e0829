"""F-ViT training data: the OV-COCO train set (base boxes only, mmdet's annotation rules) and mmdet 2.28.1's train
pipeline step by step, determinism across epochs and resumes, re-draws and unreadable images."""

from __future__ import annotations

import io
import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ovdense.detection.data import (
    DetectionTrainSet,
    collate,
    filter_boxes,
    flip,
    normalise_and_pad,
    random_crop,
    random_scale,
    rescale_size,
    resize_with_boxes,
)
from ovdense.detection.detector import prepare_image
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.eval.detection import COCO_2017_CATEGORIES

S = 64
CAT = dict((name, cid) for cid, name in COCO_2017_CATEGORIES)
# Labels in the 65-class order (COCO-id order of the OV-COCO names): person, bicycle, car, motorcycle, airplane (novel),
# bus (novel), train, truck, boat, ... Written out, not looked up, so the order itself is under test.
PERSON, BICYCLE, CAR, TRAIN, TRUCK, BOAT = 0, 1, 2, 6, 7, 8
NOVEL_NAMES = ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup")


def make_image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class FixedRng:
    """Stands in for a Generator: ``integers(lo, hi)`` returns ``pick(lo, hi)``."""

    def __init__(self, pick):
        self.pick = pick

    def integers(self, lo, hi):
        return self.pick(lo, hi)


# Images: (id, file, h, w). Sizes differ (portrait, landscape, square) and are the json's; d is too small (mmdet
# min_size 32), c has only novel boxes, e has only a crowd and a degenerate base box.
IMAGES = [
    (1, "a.png", 60, 80),
    (2, "b.png", 90, 50),
    (3, "c.png", 50, 70),
    (4, "d.png", 20, 100),
    (5, "e.png", 64, 64),
    (6, "f.png", 40, 120),
]
# (image, category, [x, y, w, h], extra). Base targets use person/bicycle/car/truck; train only as crowd, boat only
# as degenerate or outside the image: those labels and every novel one must never reach a sample.
ANNOTATIONS = [
    (1, "person", [5, 6, 30, 40], {}),
    (1, "car", [40.5, 10.25, 35, 20], {}),
    (1, "airplane", [10, 10, 50, 40], {}),  # novel
    (1, "train", [0, 0, 60, 50], {"iscrowd": 1}),  # crowd
    (1, "boat", [3, 3, 0.5, 10], {}),  # w < 1
    (1, "boat", [20, 30, 5.0, 0.0], {"area": 0.0}),  # h = 0, as COCO train2017's annotations 918 / 2206849
    (1, "hair drier", [1, 1, 10, 10], {}),  # one of the 15 COCO classes outside OV-COCO
    (2, "bicycle", [2, 50, 40, 35], {}),
    (2, "dog", [0, 0, 50, 90], {}),  # novel
    (2, "person", [10, 10, 20, 20], {"ignore": True}),
    (3, "cat", [5, 5, 20, 20], {}),  # novel only
    (3, "bus", [30, 5, 30, 30], {}),
    (4, "person", [1, 1, 10, 10], {}),  # image too small
    (5, "train", [0, 0, 30, 30], {"iscrowd": 1}),  # crowd-only image: mmdet keeps it, with no box
    (5, "boat", [70, 70, 10, 10], {}),  # no overlap with the 64 x 64 image
    (6, "truck", [10, 5, 100, 30], {}),
    (6, "umbrella", [0, 0, 20, 20], {}),  # novel
]
BASE_BOXES = {  # what each kept image must hold after parsing, XYXY, in the original pixels
    1: ([[5, 6, 35, 46], [40.5, 10.25, 75.5, 30.25]], [PERSON, CAR]),
    2: ([[2, 50, 42, 85]], [BICYCLE]),
    5: ([], []),
    6: ([[10, 5, 110, 35]], [TRUCK]),
}


def write_set(root, images=IMAGES, annotations=ANNOTATIONS, skip_files=("d.png",)):
    image_dir = root / "train2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    for k, (_, name, h, w) in enumerate(images):
        if name not in skip_files:  # the too-small image is never read: its size comes from the json
            (image_dir / name).write_bytes(png(make_image(k, h, w)))
    anns = []
    for k, (image_id, name, bbox, extra) in enumerate(annotations):
        ann = {"id": 100 + k, "image_id": image_id, "category_id": CAT[name], "bbox": bbox, "iscrowd": 0}
        ann["area"] = float(bbox[2] * bbox[3])
        ann.update(extra)
        anns.append(ann)
    dataset = {
        "info": {},
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in images],
        "annotations": anns,
        "categories": [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_2017_CATEGORIES],
    }
    path = root / "instances_train2017.json"
    path.write_text(json.dumps(dataset))
    return path, image_dir


@pytest.fixture
def files(tmp_path):
    return write_set(tmp_path)


def make_set(files, **kwargs):
    args = dict(benchmark="ov-coco", image_size=S, seed=0)
    args.update(kwargs)
    return DetectionTrainSet(*files, **args)


def assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


# -- the annotation file -------------------------------------------------------------------------------------------


def test_only_base_boxes_of_eligible_images_are_kept(files):
    ds = make_set(files)
    assert len(ds) == 4
    assert [int(i) for i in ds._image_ids] == [1, 2, 5, 6]  # file order; c (novel only) and d (small) are out
    for j, image_id in enumerate(ds._image_ids):
        boxes, labels = ds.annotations(j)
        want_boxes, want_labels = BASE_BOXES[int(image_id)]
        np.testing.assert_array_equal(boxes, np.asarray(want_boxes, dtype=np.float32).reshape(-1, 4))
        np.testing.assert_array_equal(labels, want_labels)
    assert ds.categories.names[PERSON] == "person" and ds.categories.names[TRUCK] == "truck"
    assert len(ds.categories.ids) == 65 and sum(ds.categories.novel) == 17
    s = ds.stats
    # the h = 0 box fails mmdet's overlap test before its size test
    assert (s["novel"], s["other"], s["crowd"], s["degenerate"], s["no_overlap"], s["ignore"]) == (5, 1, 2, 1, 2, 1)
    assert (s["images"], s["images_small"], s["images_without_boxes"], s["boxes"]) == (4, 1, 1, 4)


def test_boxes_are_rounded_once_to_float32(tmp_path):
    # mmdet: np.array([x1, y1, x1 + w, y1 + h], dtype=float32) from Python floats.
    x, w = 0.1, 0.2  # 0.1 + 0.2 = 0.30000000000000004 in float64
    path, image_dir = write_set(
        tmp_path, images=[(1, "a.png", 40, 40)], annotations=[(1, "person", [x, 1.0, 10 + w, 10.0], {})]
    )
    boxes, _ = DetectionTrainSet(path, image_dir, "ov-coco", S).annotations(0)
    np.testing.assert_array_equal(boxes[0], np.array([x, 1.0, x + 10 + w, 11.0], dtype=np.float32))


def test_benchmarks_and_arguments(files):
    with pytest.raises(OvdenseError, match="LVIS v1 has 1203"):  # a COCO file given for OV-LVIS
        make_set(files, benchmark="ov-lvis")
    with pytest.raises(InvalidArgumentError, match="unknown detection training benchmark"):
        make_set(files, benchmark="coco")
    for bad in (dict(image_size=0), dict(seed=-1), dict(ratio_range=(2.0, 1.0)), dict(flip=1.5)):
        with pytest.raises(InvalidArgumentError):
            make_set(files, **bad)


def test_bad_annotation_files(tmp_path):
    path, image_dir = write_set(tmp_path)
    data = json.loads(path.read_text())
    data["images"][0].pop("width")
    path.write_text(json.dumps(data))
    with pytest.raises(OvdenseError, match="image 1 needs a 'file_name' and positive integer 'width'"):
        DetectionTrainSet(path, image_dir, "ov-coco", S)
    data = json.loads(write_set(tmp_path)[0].read_text())
    data["categories"] = [c for c in data["categories"] if c["name"] != "dog"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != CAT["dog"]]
    path.write_text(json.dumps(data))
    with pytest.raises(OvdenseError, match="no category named 'dog'"):
        DetectionTrainSet(path, image_dir, "ov-coco", S)
    path.write_text("{")
    with pytest.raises(OvdenseError, match="is not JSON"):
        DetectionTrainSet(path, image_dir, "ov-coco", S)
    only_novel = write_set(tmp_path, annotations=[a for a in ANNOTATIONS if a[1] in NOVEL_NAMES])
    with pytest.raises(OvdenseError, match="leaves no training image"):
        DetectionTrainSet(*only_novel, "ov-coco", S)


# -- samples ------------------------------------------------------------------------------------------------------


def test_novel_crowd_and_degenerate_boxes_never_reach_a_sample(files):
    ds = make_set(files)
    allowed = {PERSON, CAR, BICYCLE, TRUCK}
    seen: set[int] = set()
    empty = 0
    for epoch in range(12):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            out = ds[i]
            labels = out["labels"]
            seen |= set(labels.tolist())
            assert set(labels.tolist()) <= allowed
            assert not any(ds.categories.novel[k] for k in labels.tolist())
            want = BASE_BOXES[out["image_id"]][1]
            assert len(labels) <= len(want)
            assert out["image"].shape == (3, S, S) and out["image"].dtype == torch.float32
            assert out["boxes"].shape == (len(labels), 4) and out["boxes"].dtype == torch.float32
            assert labels.dtype == torch.int64
            h, w = out["image_shape"]
            assert 1 <= h <= S and 1 <= w <= S
            b = out["boxes"]
            assert bool(((b[:, 0] >= 0) & (b[:, 2] <= w) & (b[:, 1] >= 0) & (b[:, 3] <= h)).all())
            assert bool(((b[:, 2] - b[:, 0] > 0.01) & (b[:, 3] - b[:, 1] > 0.01)).all())
            assert not out["image"][:, h:, :].any() and not out["image"][:, :, w:].any()
            empty += len(labels) == 0
    assert seen == allowed
    assert empty > 0  # the crowd-only image, and crops off every box, train as background (mmdet)


def test_exact_targets_without_randomness(files):
    # ratio 1 at S = 128 with no flip: every image fits, so the targets are the base boxes times the resize factors.
    ds = make_set(files, image_size=128, ratio_range=(1.0, 1.0), flip=0.0)
    out = ds[0]  # a.png, 60 x 80 -> 96 x 128 (factor 1.6, exact)
    assert out["image_shape"] == (96, 128) and out["resampled"] == 0 and out["skipped"] == 0
    want = np.array([[5, 6, 35, 46], [40.5, 10.25, 75.5, 30.25]], dtype=np.float32) * np.float32(1.6)
    np.testing.assert_array_equal(out["boxes"].numpy(), want)
    assert out["labels"].tolist() == [PERSON, CAR]
    flipped = make_set(files, image_size=128, ratio_range=(1.0, 1.0), flip=1.0)[0]
    np.testing.assert_array_equal(flipped["boxes"].numpy()[:, [2, 0]], 128 - want[:, [0, 2]])
    assert torch.equal(flipped["image"][:, :96, :128], out["image"][:, :96, :128].flip(-1))


def test_samples_are_a_function_of_seed_epoch_and_index(files):
    ds = make_set(files)
    first = [ds[i] for i in range(len(ds))]
    for i in range(len(ds)):
        assert_samples_equal(ds[i], first[i])  # drawn twice
    resumed = make_set(files)  # a new process after kill -9 rebuilds the set and sets the epoch
    resumed.set_epoch(0)
    for i in reversed(range(len(ds))):  # in any order
        assert_samples_equal(resumed[i], first[i])
    ds.set_epoch(1)
    assert any(ds[i]["image_shape"] != first[i]["image_shape"] for i in range(len(ds)))
    other_seed = make_set(files, seed=1)
    assert any(other_seed[i]["image_shape"] != first[i]["image_shape"] for i in range(len(ds)))


def test_collate_and_dataloader(files):
    ds = make_set(files)
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate, num_workers=0))
    batch = batches[0]
    assert batch["images"].shape == (3, 3, S, S)
    assert len(batch["boxes"]) == len(batch["labels"]) == len(batch["image_shapes"]) == 3
    assert batch["index"].tolist() == [0, 1, 2] and batch["skipped"].dtype == torch.int64
    for k in range(3):
        assert torch.equal(batch["boxes"][k], ds[k]["boxes"]) and batch["image_shapes"][k] == ds[k]["image_shape"]


def test_filtered_out_boxes_redraw_from_the_same_aspect_group(tmp_path):
    # g.png (40 x 80, landscape) has one box 0.1 px inside its right edge: at ratio 0.1 and S = 64 the image becomes
    # 6 x 3 and the box 0.0075 px wide, which FilterAnnotations removes -> mmdet draws another landscape image.
    images = [(1, "a.png", 60, 80), (2, "b.png", 90, 50), (3, "g.png", 40, 80)]
    anns = [
        (1, "person", [5, 6, 30, 40], {}),
        (2, "bicycle", [2, 50, 40, 35], {}),
        (3, "car", [79.9, 10, 1.0, 10], {}),
    ]
    ds = DetectionTrainSet(*write_set(tmp_path, images, anns), "ov-coco", S, ratio_range=(0.1, 0.1))
    for epoch in range(5):
        ds.set_epoch(epoch)
        out = ds[2]
        assert out["index"] == 2 and out["resampled"] >= 1
        assert out["image_index"] == 0 and out["image_id"] == 1  # the only other landscape image
        assert out["labels"].tolist() == [PERSON]
        again = ds[2]
        assert_samples_equal(out, again)
    # A crop without any box is a background sample (mmdet), unless resample_empty.
    files = write_set(tmp_path / "two")
    plain, strict = make_set(files), make_set(files, resample_empty=True)
    crowd_only = [int(i) for i in plain._image_ids].index(5)
    out = plain[crowd_only]
    assert len(out["boxes"]) == 0 and out["resampled"] == 0 and out["image_id"] == 5
    out = strict[crowd_only]
    assert len(out["boxes"]) > 0 and out["resampled"] >= 1 and out["image_id"] != 5


def test_unreadable_image_is_replaced_and_counted(files):
    path, image_dir = files
    (image_dir / "b.png").write_bytes(b"not an image")
    ds = make_set(files)
    with pytest.warns(UserWarning, match="skipping unreadable image .*b.png"):
        out = ds[1]
    assert out["index"] == 1 and out["skipped"] == 1 and out["image_index"] == 2 and out["image_id"] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per file and process
        again = ds[1]
    assert_samples_equal(out, again)
    assert ds[0]["skipped"] == 0


# -- the pipeline steps --------------------------------------------------------------------------------------------


def test_resize_with_boxes_matches_mmdet_arithmetic():
    image = make_image(0, 100, 200)  # h = 100, w = 200
    scale = random_scale(S, 0.5)
    assert scale == (32, 32)  # int(64 * 0.5)
    assert random_scale(640, 0.1234) == (78, 78)  # truncated: 640 * 0.1234 = 78.976
    boxes = np.array([[10, 20, 110, 90], [150, 50, 210, 120]], dtype=np.float32)
    resized, out = resize_with_boxes(image, boxes, scale)
    # factor = min(32 / 200, 32 / 100) = 0.16: w' = int(200 * 0.16 + 0.5) = 32, h' = int(100 * 0.16 + 0.5) = 16
    assert resized.shape == (16, 32, 3) and resized.dtype == np.uint8
    np.testing.assert_array_equal(resized, cv2.resize(image, (32, 16), interpolation=cv2.INTER_LINEAR))
    f = np.float32(0.16)
    want = np.array([[10 * f, 20 * f, 110 * f, 90 * f], [150 * f, 50 * f, 32, 16]], dtype=np.float32)  # clipped
    np.testing.assert_array_equal(out, want)
    # The size uses one factor, the boxes the per-axis ones: 75 x 130 to (32, 32): factor 32 / 130, w' = 32,
    # h' = int(75 * 32 / 130 + 0.5) = int(18.96) = 18, so boxes scale by 32 / 130 in x and 18 / 75 = 0.24 in y.
    assert rescale_size(130, 75, (32, 32)) == (32, 18)
    resized, out = resize_with_boxes(make_image(1, 75, 130), np.array([[13, 25, 65, 50]], dtype=np.float32), (32, 32))
    assert resized.shape == (18, 32, 3)
    np.testing.assert_array_equal(out[0], np.array([13, 25, 65, 50], np.float32) * np.float32([32 / 130, 0.24] * 2))
    # mmcv rounds half up: 100 x 30 at (45, 45): factor 0.45, w' = int(13.5 + 0.5) = 14, h' = 45
    assert rescale_size(30, 100, (45, 45)) == (14, 45)


def test_train_resize_and_normalisation_are_the_test_pipelines():
    image = make_image(2, 37, 90)
    resized, _ = resize_with_boxes(image, np.zeros((0, 4), np.float32), (S, S))
    assert torch.equal(normalise_and_pad(resized, S), prepare_image(image, S).tensor)


def test_random_crop_margins_offsets_and_boxes():
    image = make_image(3, 100, 80)  # h = 100 > S, w = 80 > S: crop 64 x 64, margins 36 (y) and 16 (x)
    seen_y, seen_x = set(), set()
    for seed in range(400):
        rng = np.random.default_rng(seed)
        crop, _, _, (y, x) = random_crop(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), S, rng)
        assert crop.shape == (S, S, 3)
        np.testing.assert_array_equal(crop, image[y : y + S, x : x + S])
        seen_y.add(y)
        seen_x.add(x)
    assert seen_y == set(range(37)) and seen_x == set(range(17))
    # An image smaller than S on one side keeps that side whole (offset 0): crop min(h, S) x min(w, S).
    last = FixedRng(lambda lo, hi: hi - 1)
    crop, _, _, (y, x) = random_crop(make_image(4, 40, 100), np.zeros((0, 4)), np.zeros(0), S, last)
    assert crop.shape == (40, S, 3) and (y, x) == (0, 36)
    # Boxes: shifted by the corner (y = 36, x = 16), clipped to [0, 64], kept where x2 > x1 and y2 > y1.
    boxes = np.array(
        [[20, 40, 50, 70], [0, 0, 30, 30], [10, 90, 79, 100], [16, 36, 16.5, 60], [85, 50, 95, 60]], dtype=np.float32
    )
    labels = np.arange(5, dtype=np.int64)
    _, out, kept, corner = random_crop(image, boxes, labels, S, last)
    assert corner == (36, 16)
    # box 1 ends at y = 30, above the crop (y1 = y2 = 0 after clipping); box 4 starts right of it (x1 = x2 = 64)
    np.testing.assert_array_equal(out, np.array([[4, 4, 34, 34], [0, 54, 63, 64], [0, 0, 0.5, 24]], dtype=np.float32))
    assert kept.tolist() == [0, 2, 3]


def test_filter_boxes_rules():
    boxes = np.array([[0, 0, 0.01, 5], [0, 0, 0.02, 5], [0, 0, 5, 0.005]], dtype=np.float32)
    out = filter_boxes(boxes, np.array([1, 2, 3]))
    assert out is not None
    np.testing.assert_array_equal(out[0], boxes[1:2])
    assert out[1].tolist() == [2]
    assert filter_boxes(boxes[[0, 2]], np.array([1, 3])) is None  # boxes, none kept: mmdet returns None
    empty = filter_boxes(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    assert empty is not None and len(empty[0]) == 0  # no boxes: returned unchanged


def test_flip_uses_the_width():
    image = make_image(5, 30, 50)
    flipped, out = flip(image, np.array([[10, 5, 20, 15], [0, 0, 50, 30]], dtype=np.float32))
    np.testing.assert_array_equal(out, np.array([[30, 5, 40, 15], [0, 0, 50, 30]], dtype=np.float32))
    np.testing.assert_array_equal(flipped, image[:, ::-1])
    np.testing.assert_array_equal(flipped[:, 0], image[:, 49])


def test_normalise_and_pad_constants_and_zeros():
    image = np.empty((10, 20, 3), dtype=np.uint8)
    image[...] = (124, 116, 104)
    out = normalise_and_pad(image, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    want = [(124 - 123.675) / 58.395, (116 - 116.28) / 57.12, (104 - 103.53) / 57.375]
    for c in range(3):
        assert torch.allclose(out[c, :10, :20], torch.tensor(want[c]), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(  # float32 (x - mean) * (1 / std), as mmcv's imnormalize
            out[c, 0, 0].numpy(),
            (np.float32(image[0, 0, c]) - np.float32((123.675, 116.28, 103.53)[c]))
            * np.float32(1 / (58.395, 57.12, 57.375)[c]),
        )
    assert not out[:, 10:, :].any() and not out[:, :, 20:].any()
    with pytest.raises(InvalidArgumentError):
        normalise_and_pad(np.zeros((40, 10, 3), np.uint8), 32)
