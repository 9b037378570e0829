"""COCO panoptic reader: categories and labels, segments (boxes, areas, filters, masks), decoding, errors."""

from __future__ import annotations

import json
import pickle
import struct
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.errors import OvdenseError
from ovdense.eval.panoptic import CocoPanoptic, PanopticSegment, read_panoptic_ids
from panoptic_fixtures import (
    BROKEN_KINDS,
    CATEGORIES,
    CLASS_NAMES,
    IS_THING,
    LABELS,
    break_panoptic,
    encode_ids,
    make_panoptic,
)


@pytest.fixture
def fx(tmp_path):
    return make_panoptic(tmp_path / "coco")


def _as_tuple(seg):
    return (seg.segment_id, seg.category_id, seg.label, seg.isthing, seg.box, seg.area)


def _ids(sample):
    return [s.segment_id for s in sample["segments"]]


def _first(collated):
    return collated[0]


# --- categories --------------------------------------------------------------------------------------------------


def test_categories_sorted_by_id_with_labels(fx):
    ds = CocoPanoptic(fx.data_root)
    assert [c["id"] for c in CATEGORIES] != sorted(c["id"] for c in CATEGORIES)  # the json is not sorted
    assert ds.categories == [
        {"id": 1, "name": "person", "isthing": True},
        {"id": 3, "name": "car", "isthing": True},
        {"id": 7, "name": "train", "isthing": True},
        {"id": 92, "name": "banner", "isthing": False},
        {"id": 118, "name": "floor-wood", "isthing": False},
        {"id": 200, "name": "wall-other-merged", "isthing": False},
    ]
    assert {cid: ds.label_of(cid) for cid in LABELS} == LABELS == {1: 0, 3: 1, 7: 2, 92: 3, 118: 4, 200: 5}
    with pytest.raises(OvdenseError, match="category id 2 is not in .*panoptic_val2017.json"):
        ds.label_of(2)


def test_class_names_and_is_thing(fx):
    ds = CocoPanoptic(fx.data_root)
    assert ds.class_names == CLASS_NAMES
    assert ds.class_names[5] == ["wall-other-merged"]  # verbatim json name
    assert ds.is_thing.dtype == torch.bool and ds.is_thing.shape == (6,)
    assert ds.is_thing.tolist() == IS_THING == [True, True, True, False, False, False]


# --- images ------------------------------------------------------------------------------------------------------


def test_image_order_and_fields(fx):
    ds = CocoPanoptic(fx.data_root)
    assert len(ds) == 4
    samples = list(ds)
    assert [s["image_id"] for s in samples] == [285, 9, 42, 777] == fx.image_ids
    assert [s["file_name"] for s in samples] == fx.file_names
    for s, name, size, img in zip(samples, fx.file_names, fx.sizes, fx.images, strict=True):
        assert s["image_path"] == str(fx.data_root / "val2017" / name)
        assert s["image"].dtype == np.uint8 and s["image"].shape == (*size, 3)
        np.testing.assert_array_equal(s["image"], img)
    assert repr(ds) == f"CocoPanoptic({str(fx.data_root)!r}, split='val2017', 4 images, 6 categories)"


def test_grayscale_jpeg_gives_three_channels(fx):
    with Image.open(fx.data_root / "val2017" / fx.file_names[1]) as im:
        assert im.mode == "L"
    img = CocoPanoptic(fx.data_root)[1]["image"]
    assert img.shape == (48, 64, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
    np.testing.assert_array_equal(img, fx.images[1])


def test_no_exif_transpose(fx):
    h, w = fx.sizes[2]
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :10] = 255  # white band on the left, as stored
    im = Image.fromarray(img)
    exif = im.getexif()
    exif[0x0112] = 6  # a viewer would rotate 90 degrees clockwise
    im.save(fx.data_root / "val2017" / fx.file_names[2], exif=exif, quality=95)
    with Image.open(fx.data_root / "val2017" / fx.file_names[2]) as check:
        assert check.getexif()[0x0112] == 6
    out = CocoPanoptic(fx.data_root)[2]
    assert out["image"].shape == (60, 72, 3)  # stored layout, matching the PNG
    assert out["image"][:, :8].mean() > 200 and out["image"][:, -30:].mean() < 50
    assert out["masks"].shape == (0, 60, 72)


def test_images_decode_by_the_shared_rules_as_stored(fx):
    # a 16-bit RGB PNG (under the .jpg name: the content decides) with an EXIF rotation: scaled from its 16-bit
    # values as a viewer does, left in the stored layout
    h, w = fx.sizes[3]
    rgb16 = np.random.default_rng(7).integers(0, 65536, (h, w, 3)).astype(np.uint16)
    rgb16[0, 0] = [129, 386, 65407]  # the high byte (Pillow's own 16 -> 8 bits) says 0, 1, 255
    ok, buf = cv2.imencode(".png", rgb16[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    assert ok and buf.tobytes()[24:26] == bytes([16, 2])  # IHDR: 16-bit RGB
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer would rotate 90 degrees clockwise
    tiff = exif.tobytes()[6:]  # a PNG eXIf chunk holds the TIFF data without the "Exif\0\0" prefix
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    path = fx.data_root / "val2017" / fx.file_names[3]
    path.write_bytes(buf.tobytes()[:33] + chunk + buf.tobytes()[33:])  # after the 8-byte signature + IHDR
    with Image.open(path) as check:
        assert check.getexif()[0x0112] == 6 and h != w
    out = CocoPanoptic(fx.data_root)[3]["image"]
    assert out.shape == (h, w, 3)
    np.testing.assert_array_equal(out, np.round(rgb16 * 255.0 / 65535).astype(np.uint8))
    assert out[0, 0].tolist() == [1, 2, 255]
    # 8-bit JPEGs: bit for bit the reference's convert("RGB")
    for i in range(3):
        with Image.open(fx.data_root / "val2017" / fx.file_names[i]) as ref:
            expected = np.asarray(ref.convert("RGB"))
        np.testing.assert_array_equal(CocoPanoptic(fx.data_root)[i]["image"], expected)


def test_unreadable_image_is_one_line_error(fx):
    path = fx.data_root / "val2017" / fx.file_names[0]
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(OvdenseError) as err:
        CocoPanoptic(fx.data_root)[0]
    msg = str(err.value)
    assert msg.startswith(f"cannot read image {path}: ") and "\n" not in msg


# --- segments ----------------------------------------------------------------------------------------------------


def test_segments_with_default_filter(fx):
    ds = CocoPanoptic(fx.data_root)
    s0 = ds[0]["segments"]
    assert s0 == [
        PanopticSegment(66049, 1, 0, True, (9.5, 4.25, 40.5, 45.75), 1286.5),  # json bbox -> xyxy, w*h
        PanopticSegment(258, 200, 5, False, (5.0, 20.0, 84.0, 69.0), 3871.0),  # tight box, max index
        PanopticSegment(131077, 3, 1, True, (0.0, 72.0, 41.0, 80.0), 328.0),  # iscrowd=1 kept
    ]
    assert all(isinstance(v, float) for seg in s0 for v in (*seg.box, seg.area))
    assert _ids(ds[1]) == [256, 11, 65536, 1804]
    assert ds[1]["segments"][0].box == (0.0, 20.0, 63.0, 47.0) and ds[1]["segments"][0].area == 1701.0
    assert ds[3]["segments"] == [
        PanopticSegment(65793, 200, 5, False, (10.0, 10.0, 50.0, 40.0), 1200.0),  # triangle
        PanopticSegment(2309, 92, 3, False, (5.0, 50.0, 13.0, 58.0), 64.0),  # area == 8**2: kept
        PanopticSegment(3, 1, 0, True, (55.0, 45.0, 75.0, 60.0), 300.0),
    ]
    for i in range(4):
        got = [_as_tuple(s) for s in ds[i]["segments"]]
        assert got == [_as_tuple(s) for s in fx.expected(i)]


def test_no_annotation_entry_means_no_segments(fx):
    data = json.loads(fx.ann_file.read_text())
    assert 42 not in {a["image_id"] for a in data["annotations"]}
    s = CocoPanoptic(fx.data_root)[2]
    assert s["segments"] == []
    assert s["masks"].dtype == bool and s["masks"].shape == (0, 60, 72)


def test_png_name_from_annotation(fx):
    assert fx.png_names[3] == "pan_777.png" and not (fx.png_dir / "000000000777.png").exists()
    assert len(CocoPanoptic(fx.data_root)[3]["segments"]) == 3


def test_size_filter_parameters(fx):
    small = CocoPanoptic(fx.data_root, min_size=6, max_size=8)  # 36 <= area <= 64, both ends inclusive
    assert [_ids(small[i]) for i in range(4)] == [[3, 4], [16776967], [], [2309]]
    assert small[0]["segments"][1] == PanopticSegment(4, 3, 1, True, (85.0, 70.0, 92.0, 78.0), 56.0)
    assert small[0]["segments"][0].box == (80.0, 2.0, 89.0, 6.0) and small[0]["segments"][0].area == 36.0
    capped = CocoPanoptic(fx.data_root, max_size=40)  # area > 1600 dropped
    assert [_ids(capped[i]) for i in range(4)] == [[66049, 131077], [11, 65536, 1804], [], [65793, 2309, 3]]
    for i in range(4):
        assert [_as_tuple(s) for s in capped[i]["segments"]] == [_as_tuple(s) for s in fx.expected(i, max_size=40)]


def test_max_segments_cut_before_filter(fx):
    # image 9 lists a tiny (filtered) segment first: with 2 considered, only the 2nd can be kept
    assert _ids(CocoPanoptic(fx.data_root, max_segments=2)[1]) == [256]
    assert _ids(CocoPanoptic(fx.data_root, max_segments=1)[1]) == []
    three = CocoPanoptic(fx.data_root, max_segments=3)
    assert _ids(three[0]) == [66049, 258] and _ids(three[1]) == [256, 11]
    for i in range(4):
        assert _ids(three[i]) == [s.segment_id for s in fx.expected(i, max_segments=3)]


def test_masks_are_segment_id_maps(fx):
    ds = CocoPanoptic(fx.data_root)
    for i in range(4):
        s = ds[i]
        h, w = fx.sizes[i]
        assert s["masks"].dtype == bool and s["masks"].shape == (len(s["segments"]), h, w)
        for seg, mask in zip(s["segments"], s["masks"], strict=True):
            np.testing.assert_array_equal(mask, fx.id_maps[i] == seg.segment_id)
    m = ds[0]["masks"]
    assert m[0].sum() == 40 * 30  # the painted person, not its (larger) json box
    assert m[1].sum() == 20 * 66 + 30 * 25  # the L-shaped wall
    assert not (m[0] & m[1]).any()


def test_read_panoptic_ids(tmp_path):
    ids = np.array([[0, 1, 255], [256, 65536, 16777215]], np.uint32)
    Image.fromarray(encode_ids(ids)).save(tmp_path / "a.png")
    got = read_panoptic_ids(tmp_path / "a.png")
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, ids)
    rgba = np.concatenate([encode_ids(ids), np.full((2, 3, 1), 255, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_panoptic_ids(tmp_path / "rgba.png"), ids)
    Image.fromarray(np.zeros((2, 3), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(OvdenseError, match="grey.png .*RGB"):
        read_panoptic_ids(tmp_path / "grey.png")


def test_train_split_layout(fx):
    root = fx.data_root
    (root / "val2017").rename(root / "train2017")
    (root / "annotations/panoptic_val2017").rename(root / "annotations/panoptic_train2017")
    (root / "annotations/panoptic_val2017.json").rename(root / "annotations/panoptic_train2017.json")
    ds = CocoPanoptic(root, split="train2017")
    assert ds.img_dir == root / "train2017" and _ids(ds[0]) == [66049, 258, 131077]
    with pytest.raises(OvdenseError, match="panoptic_val2017.json"):
        CocoPanoptic(root)


def test_pickles_and_dataloader_workers(fx):
    ds = pickle.loads(pickle.dumps(CocoPanoptic(fx.data_root)))
    assert _ids(ds[3]) == [65793, 2309, 3]
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_first)
    out = list(loader)
    assert [s["image_id"] for s in out] == [285, 9, 42, 777]
    assert [len(s["segments"]) for s in out] == [3, 4, 0, 3]
    np.testing.assert_array_equal(out[1]["masks"][0], fx.id_maps[1] == 256)


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_errors_name_the_problem(fx, kind):
    bad = break_panoptic(fx, kind)
    with pytest.raises(OvdenseError) as err:
        ds = CocoPanoptic(bad.data_root)
        if bad.index is not None:
            for i in range(bad.index):
                ds[i]  # the samples before the broken one still read
            ds[bad.index]
    msg = str(err.value)
    assert "\n" not in msg
    for needle in bad.needles:
        assert needle in msg, (needle, msg)


def test_init_checks_before_reading_pixels(fx):
    # broken pixels are found lazily; broken paths and json at construction
    break_panoptic(fx, "png_size")
    CocoPanoptic(fx.data_root)
    break_panoptic(fx, "no_png_dir")
    with pytest.raises(OvdenseError, match="panoptic PNG folder not found"):
        CocoPanoptic(fx.data_root)


def test_segments_past_max_segments_are_not_checked(fx):
    break_panoptic(fx, "segment_absent")  # the 2nd entry of image 9
    assert _ids(CocoPanoptic(fx.data_root, max_segments=1)[1]) == []
    with pytest.raises(OvdenseError, match="segment id 4242 of image 000000000009.jpg"):
        CocoPanoptic(fx.data_root, max_segments=2)[1]


def test_malformed_json_entries(fx):
    data = json.loads(fx.ann_file.read_text())
    del data["annotations"][0]["segments_info"][0]["bbox"]
    fx.ann_file.write_text(json.dumps(data))
    with pytest.raises(OvdenseError) as err:
        CocoPanoptic(fx.data_root)
    assert str(fx.ann_file) in str(err.value) and "bbox" in str(err.value) and "\n" not in str(err.value)
    fx.ann_file.write_text(json.dumps([1, 2]))
    with pytest.raises(OvdenseError, match="panoptic_val2017.json is not a COCO panoptic annotation file"):
        CocoPanoptic(fx.data_root)


@pytest.mark.parametrize(
    "hostile",
    [
        "[" * 100_000 + "]" * 100_000,  # deeper than the JSON parser's stack
        '{"images": [], "categories": [], "annotations": "not a list"}',
        '{"images": [[1, 2]], "categories": []}',
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [], "annotations": [{"image_id": [1]}]}',
        '{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [],'
        ' "annotations": [{"image_id": 1, "segments_info": [7]}]}',
    ],
    ids=["nested", "annotations-string", "image-list", "unhashable-id", "segment-number"],
)
def test_hostile_json_is_one_line(tmp_path, hostile):
    fx = make_panoptic(tmp_path / "coco")
    fx.ann_file.write_text(hostile)
    with pytest.raises(OvdenseError) as info:
        CocoPanoptic(fx.data_root)
    msg = str(info.value)
    assert msg.startswith("COCO panoptic: ") and "\n" not in msg and len(msg) < 400
