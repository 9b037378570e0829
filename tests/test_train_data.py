"""Distillation data: grid choices and boxes, student/teacher/proxy inputs, sources, determinism, bad files."""

from __future__ import annotations

import io
import os
import pickle
import random
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from ovdense import regions
from ovdense.errors import OvdenseError
from ovdense.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DistillDataset,
    GridSampler,
    ImageFolder,
    TarShards,
    grid_boxes,
    grid_choices,
    open_source,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
S, C, P = 64, 32, 56  # student side, crop side, proxy side
H, W = 40, 60  # a landscape image: the student input is padded at the bottom


def make_image(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def write_images(folder, images, names=None):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        (folder / (names[k] if names else f"{k:03d}.png")).write_bytes(encode(image))
    return folder


def make_dataset(source, **kwargs):
    args = dict(
        student_size=S,
        crop_size=C,
        clip_mean=CLIP_MEAN,
        clip_std=CLIP_STD,
        proxies={"vfm": (P, IMAGENET_MEAN, IMAGENET_STD)},
        max_split=6,
        max_boxes=20,
        seed=0,
    )
    args.update(kwargs)
    return DistillDataset(source, **args)


def assert_samples_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        va, vb = torch.as_tensor(a[key]), torch.as_tensor(b[key])
        assert torch.equal(va, vb), key


@pytest.fixture
def folder(tmp_path):
    # Different sizes and aspect ratios, portrait and landscape.
    sizes = [(H, W), (50, 30), (33, 33), (24, 70)]
    return write_images(tmp_path / "images", [make_image(k, *hw) for k, hw in enumerate(sizes)])


# -- grid ---------------------------------------------------------------------------------------------------------


def test_grid_choices_match_the_reference():
    expected = [
        (1, 1), (1, 2),
        (2, 1), (2, 2), (2, 3), (2, 4),
        (3, 2), (3, 3), (3, 4), (3, 5), (3, 6),
        (4, 2), (4, 3), (4, 4), (4, 5), (4, 6),
        (5, 3), (5, 4), (5, 5), (5, 6),
        (6, 3), (6, 4), (6, 5), (6, 6),
    ]  # fmt: skip
    assert grid_choices(6) == expected
    assert GridSampler(6).choices == expected
    assert grid_choices(3) == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)]
    assert grid_choices(1) == [(1, 1)]


@pytest.mark.parametrize("m, n", grid_choices(6))
def test_grid_boxes_tile_the_unit_square_row_major(m, n):
    boxes = grid_boxes(m, n)
    assert boxes.dtype == torch.float32 and boxes.shape == (m * n, 4)
    assert bool((boxes >= 0).all()) and bool((boxes <= 1).all())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((w > 0).all()) and bool((h > 0).all())
    assert float((w * h).sum()) == pytest.approx(1.0, abs=1e-6)
    # No two cells overlap.
    ix = torch.minimum(boxes[:, None, 2], boxes[None, :, 2]) - torch.maximum(boxes[:, None, 0], boxes[None, :, 0])
    iy = torch.minimum(boxes[:, None, 3], boxes[None, :, 3]) - torch.maximum(boxes[:, None, 1], boxes[None, :, 1])
    inter = ix.clamp(min=0) * iy.clamp(min=0)
    inter.fill_diagonal_(0)
    assert float(inter.max()) < 1e-6
    # Cell r·n + c is row r, column c.
    for j in range(m * n):
        r, c = divmod(j, n)
        expected = torch.tensor([c / n, r / m, (c + 1) / n, (r + 1) / m])
        assert torch.allclose(boxes[j], expected, atol=1e-6)


def test_sampler_reaches_every_choice_and_keeps_at_most_max_boxes():
    sampler = GridSampler(max_split=6, max_boxes=7)
    rng = random.Random(0)
    seen = set()
    for step in range(2000):
        m, n, boxes = sampler.sample(rng)
        seen.add((m, n))
        assert boxes.shape == (min(m * n, 7), 4)
        if step < 100:
            # The kept cells are distinct cells of the template.
            match = (grid_boxes(m, n)[None] == boxes[:, None]).all(-1)  # K x (m·n)
            assert bool((match.sum(1) == 1).all()) and bool((match.sum(0) <= 1).all())
    assert seen == set(sampler.choices)


def test_sampler_draws_choice_then_shuffle():
    sampler = GridSampler(6, 20)
    m, n, boxes = sampler.sample(random.Random(5))
    ref = random.Random(5)
    assert (m, n) == ref.choice(grid_choices(6))
    indices = list(range(m * n))
    ref.shuffle(indices)
    assert torch.equal(boxes, grid_boxes(m, n)[indices[:20]])


# -- sample tensors -----------------------------------------------------------------------------------------------


def test_student_input_boxes_and_crops(folder):
    ds = make_dataset(folder, max_boxes=5)
    image = np.asarray(Image.open(folder / "000.png").convert("RGB"))
    s = S / max(H, W)
    for epoch in range(4):
        ds.set_epoch(epoch)
        out = ds[0]
        assert out["index"] == 0 and out["skipped"] == 0
        assert torch.equal(out["image"], regions.detection_input(image, S, CLIP_MEAN, CLIP_STD)[0][0])
        m, n = out["grid"].tolist()
        k = min(m * n, 5)
        valid = out["box_valid"]
        assert valid.dtype == torch.bool and valid.shape == (5,)
        assert int(valid.sum()) == k and bool(valid[:k].all())
        boxes = out["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape == (5, 4)
        assert bool((boxes[k:] == 0).all())
        # On the resized image, never the padding.
        b = boxes[:k]
        assert float(b[:, [0, 2]].min()) >= 0 and float(b[:, [0, 2]].max()) <= W * s / S + 1e-6
        assert float(b[:, [1, 3]].min()) >= 0 and float(b[:, [1, 3]].max()) <= H * s / S + 1e-6
        # Each box covers the same fraction of the image as its normalised cell.
        _, _, normed = ds.sampler.sample(ds.rng(0))
        fraction = b * S / torch.tensor([W * s, H * s, W * s, H * s])
        assert torch.allclose(fraction, normed, atol=1e-5)
        # Teacher crops: cut from the original image, as regions.crop_inputs does.
        pixel = normed * torch.tensor([W, H, W, H])
        crops = out["crops"]
        assert crops.shape == (5, 3, C, C)
        assert torch.equal(crops[:k], regions.crop_inputs(image, pixel.numpy(), (C, C), CLIP_MEAN, CLIP_STD))
        assert bool((crops[k:] == 0).all())
        # ... and not from the resized student image.
        resized = np.asarray(TF.resize(Image.fromarray(image), [round(H * s), round(W * s)], InterpolationMode.BICUBIC))
        from_resized = regions.crop_inputs(resized, (pixel * s).numpy(), (C, C), CLIP_MEAN, CLIP_STD)
        assert not torch.allclose(crops[:k], from_resized, atol=1e-3)


def test_box_count_is_capped_by_max_boxes(folder):
    ds = make_dataset(folder, max_boxes=3)
    seen = set()
    for i in range(len(ds)):
        for epoch in range(6):
            ds.set_epoch(epoch)
            out = ds[i]
            m, n = out["grid"].tolist()
            assert int(out["box_valid"].sum()) == min(m * n, 3)
            seen.add(m * n > 3)
    assert seen == {True, False}


def test_proxy_and_sd_inputs(folder):
    ds = make_dataset(folder, sd_size=48)
    out = ds[0]  # 40 x 60: the resized image is 37 x 56 in the proxy, 32 x 48 in the SD input
    proxy = out["proxy_vfm"]
    assert proxy.shape == (3, P, P)
    image = np.asarray(Image.open(folder / "000.png").convert("RGB"))
    assert torch.equal(proxy, regions.detection_input(image, P, IMAGENET_MEAN, IMAGENET_STD)[0][0])
    rows = round(H * P / W)
    pad = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert torch.allclose(proxy[:, rows:, :], pad[:, None, None].expand(3, P - rows, P), atol=1e-6)
    # The image reaches the right edge (longest side = P) and the last image row is not padding.
    assert not torch.allclose(proxy[:, rows - 1, :], pad[:, None].expand(3, P))
    sd = out["sd"]
    assert sd.shape == (3, 48, 48)
    assert float(sd.min()) >= -1.0 and float(sd.max()) <= 1.0
    sd_rows = round(H * 48 / W)
    assert bool((sd[:, sd_rows:, :] == -1).all())
    assert float(sd[:, :sd_rows].max()) > 0.5  # random pixels: some bright
    # Optional inputs only when configured.
    plain = make_dataset(folder, proxies=None)[0]
    assert not any(k.startswith("proxy_") for k in plain) and "sd" not in plain
    two = make_dataset(folder, proxies={"a": (28, IMAGENET_MEAN, IMAGENET_STD), "b": (42, (0.5,) * 3, (0.5,) * 3)})[0]
    assert two["proxy_a"].shape == (3, 28, 28) and two["proxy_b"].shape == (3, 42, 42)


# -- determinism --------------------------------------------------------------------------------------------------


def test_samples_do_not_depend_on_workers_or_instance(folder):
    ds = make_dataset(folder, seed=3)
    ds.set_epoch(2)
    expected = [ds[i] for i in range(len(ds))]
    fresh = make_dataset(folder, seed=3)
    fresh.set_epoch(2)
    for i in (2, 0):  # another order too
        assert_samples_equal(fresh[i], expected[i])
    for workers in (0, 2):
        loader = DataLoader(fresh, batch_size=2, num_workers=workers, shuffle=False)
        batches = list(loader)
        got = [{k: v[j] for k, v in b.items()} for b in batches for j in range(len(b["index"]))]
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_samples_equal(g, {k: torch.as_tensor(v) for k, v in e.items()})


def test_epoch_and_seed_change_the_grids(folder):
    ds = make_dataset(folder)
    grids = {}
    for epoch in range(3):
        ds.set_epoch(epoch)
        grids[epoch] = [(tuple(s["grid"].tolist()), s["boxes"]) for s in (ds[i] for i in range(len(ds)))]
    for other in (1, 2):
        assert any(a[0] != b[0] or not torch.equal(a[1], b[1]) for a, b in zip(grids[0], grids[other], strict=True))
    other_seed = make_dataset(folder, seed=1)
    assert any(not torch.equal(other_seed[i]["boxes"], grids[0][i][1]) for i in range(len(ds)))


# -- sources ------------------------------------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_filtered(tmp_path):
    root = tmp_path / "data"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    data = {
        "z.JPG": encode(make_image(0), "JPEG"),
        "a/2.png": encode(make_image(1)),
        "a/10.jpeg": encode(make_image(2), "JPEG"),
        "b/deep/x.webp": encode(make_image(3), "WEBP"),
        "b/y.bmp": encode(make_image(4), "BMP"),
    }
    for name, payload in data.items():
        (root / name).write_bytes(payload)
    (root / "notes.txt").write_text("not an image")
    (root / "b" / "anim.gif").write_bytes(encode(make_image(5), "GIF"))
    src = ImageFolder(root)
    names = [src.name(i) for i in range(len(src))]
    assert names == ["a/10.jpeg", "a/2.png", "b/deep/x.webp", "b/y.bmp", "z.JPG"]
    assert [src.read(i) for i in range(len(src))] == [data[n] for n in names]
    assert isinstance(open_source(root), ImageFolder) and isinstance(open_source(str(root)), ImageFolder)


def test_image_folder_errors_name_the_folder(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(OvdenseError, match="missing"):
        ImageFolder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(OvdenseError, match="empty"):
        ImageFolder(empty)
    with pytest.raises(OvdenseError, match="empty"):
        open_source(empty)
    with pytest.raises(OvdenseError, match="missing"):
        open_source(missing)
    with pytest.raises(OvdenseError, match="no training data"):
        open_source("")


def write_shard(path, members):
    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


@pytest.fixture
def shards(tmp_path):
    """Two webdataset shards: 5 images (one a .png, one under a folder), json side files, one sample without."""
    root = tmp_path / "shards"
    root.mkdir()
    images = {k: encode(make_image(10 + k, 30 + 3 * k, 45), "JPEG" if k != 3 else "PNG") for k in range(5)}
    write_shard(
        root / "train-000000.tar",
        [
            ("000001.json", b'{"k": 1}'),
            ("000001.jpg", images[0]),
            ("000002.jpg", images[1]),
            ("000002.json", b'{"k": 2}'),
            ("000003.txt", b"caption only"),
            ("sub/000004.jpg", images[2]),
        ],
    )
    write_shard(
        root / "train-000001.tar",
        [("000005.png", images[3]), ("000005.seg.png", b"not the image"), ("000006.jpg", images[4])],
    )
    return root, [images[k] for k in range(5)]


def test_tar_shards_index_and_read(shards):
    root, images = shards
    src = TarShards(root)
    assert len(src) == 5
    assert [src.read(i) for i in range(5)] == images
    assert src.name(0).endswith("train-000000.tar:000001.jpg")
    assert src.name(2).endswith("train-000000.tar:sub/000004.jpg")
    assert src.name(3).endswith("train-000001.tar:000005.png")
    # Random access in any order, a glob, an explicit list, and a pickled copy (spawned workers).
    assert src.read(4) == images[4] and src.read(1) == images[1]
    assert [TarShards(str(root / "*.tar")).read(i) for i in range(5)] == images
    assert TarShards([root / "train-000001.tar"]).read(0) == images[3]
    assert pickle.loads(pickle.dumps(src)).read(3) == images[3]
    assert isinstance(open_source(root), TarShards)
    assert isinstance(open_source(root / "train-000001.tar"), TarShards)
    assert isinstance(open_source(str(root / "train-*.tar")), TarShards)
    src.close()


def test_tar_shards_never_reuse_a_handle_across_fork(shards, monkeypatch):
    root, images = shards
    src = TarShards(root)
    assert src.read(0) == images[0]
    inherited = src._handle(0)
    pid = os.getpid()
    monkeypatch.setattr("ovdense.train.data.os.getpid", lambda: pid + 1)  # as seen by a forked worker
    assert src.read(1) == images[1]
    assert src._handle(0) is not inherited and not inherited.closed
    inherited.close()
    src.close()


def test_tar_shards_in_dataloader_workers(shards):
    root, _ = shards
    ds = make_dataset(root)
    ds.source.read(0)  # the parent holds an open handle before the workers fork
    expected = [ds[i] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=1, num_workers=2, shuffle=False)
    for got, e in zip(loader, expected, strict=True):
        assert_samples_equal({k: v[0] for k, v in got.items()}, {k: torch.as_tensor(v) for k, v in e.items()})


def test_tar_shards_errors(tmp_path):
    with pytest.raises(OvdenseError, match="nothing"):
        TarShards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(OvdenseError, match="no .tar shards"):
        TarShards(tmp_path)
    write_shard(tmp_path / "text.tar", [("000001.txt", b"hello")])
    with pytest.raises(OvdenseError, match="no images"):
        TarShards(tmp_path / "text.tar")
    (tmp_path / "broken.tar").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(OvdenseError, match="broken.tar"):
        TarShards(tmp_path / "broken.tar")


# -- bad files ----------------------------------------------------------------------------------------------------


def test_bad_images_are_skipped_with_a_warning(tmp_path):
    root = tmp_path / "mixed"
    write_images(root, [make_image(0), make_image(1, 5, 5), make_image(2)], ["a.png", "b_tiny.png", "d.png"])
    (root / "c_corrupt.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    ds = make_dataset(root)
    assert [ds.source.name(i) for i in range(4)] == ["a.png", "b_tiny.png", "c_corrupt.jpg", "d.png"]
    with pytest.warns(UserWarning) as record:
        out = ds[1]
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "b_tiny.png" in messages[0] and "too small" in messages[0]
    assert "c_corrupt.jpg" in messages[1] and "not a recognised image" in messages[1]
    assert out["index"] == 3 and out["skipped"] == 2
    d = np.asarray(Image.open(root / "d.png").convert("RGB"))
    assert torch.equal(out["image"], regions.detection_input(d, S, CLIP_MEAN, CLIP_STD)[0][0])
    # Each bad file warns once; the grid still comes from the requested index's generator.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = ds[2]
    assert again["index"] == 3 and again["skipped"] == 1
    _, _, normed = ds.sampler.sample(ds.rng(2))
    assert int(again["box_valid"].sum()) == normed.shape[0]
    # The last index wraps around to the first.
    assert ds[3]["skipped"] == 0
    # Through a DataLoader, the skipped counts add up.
    with pytest.warns(UserWarning) as record:
        total = sum(int(b["skipped"].sum()) for b in DataLoader(make_dataset(root), batch_size=2, num_workers=0))
    assert sorted(str(w.message).split()[3].rstrip(":") for w in record) == ["b_tiny.png", "c_corrupt.jpg"]
    assert total == 2 + 1


def test_all_bad_source_raises(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    (root / "x.jpg").write_bytes(b"not a jpeg")
    (root / "y.png").write_bytes(b"")
    ds = make_dataset(root)
    with pytest.warns(UserWarning), pytest.raises(OvdenseError, match="could be read"):
        ds[0]
