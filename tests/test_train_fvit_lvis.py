"""``ovdense train fvit --benchmark ov-lvis`` on a tiny LVIS-format set the test writes: the mask pipeline steps
against written-out computations, rare annotations never reach a loss, the class weights, the loss (with
``loss_mask``) falls, and a resume is bit-exact."""

import csv
import json
import sys
from importlib import resources

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ovdense.detection.data import (
    DetectionTrainSet,
    crop_boxes,
    decode_mask,
    flip,
    flip_masks,
    mask_boxes,
    pad_masks,
    resize_and_crop_masks,
    resize_mask,
)
from ovdense.errors import OvdenseError
from ovdense.train.config import TrainConfig
from ovdense.train.fvit import FViTTrainer
from ovdense.train.state import WEIGHTS_FILE, current_state


def split(name):
    text = resources.files("ovdense.eval").joinpath("classes", name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


BASE_NAMES, NOVEL_NAMES = split("ov_lvis_base.txt"), split("ov_lvis_novel.txt")
# ids 1..1203 in the files' order: the 866 base classes, then the 337 rare ones.
BASE = [1, 2, 3, 4]  # category ids used for base objects
RARE = [867, 868]  # rare (novel) ones


def lvis_categories():
    cats = []
    for k, name in enumerate(BASE_NAMES + NOVEL_NAMES):
        freq = "r" if k >= len(BASE_NAMES) else "cf"[k % 2]
        cats.append({"id": k + 1, "name": name, "frequency": freq, "image_count": 5, "instance_count": 9})
    return cats


def write_lvis(root, n=8, seed=0):
    """LVIS v1 layout: images in train2017/ and val2017/ named by coco_url, polygon objects (triangles and
    rectangles) of base and rare classes on dark noise."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True)
    images, anns = [], []
    for i in range(n):
        folder = "val2017" if i % 4 == 3 else "train2017"
        (root / folder).mkdir(exist_ok=True)
        h, w = int(rng.integers(56, 96)), int(rng.integers(56, 96))
        img = (rng.random((h, w, 3)) * 50).astype(np.uint8)
        for j, cid in enumerate([[1, RARE[0], 3], [2, 4, RARE[1]], [3, 1, 2]][i % 3]):
            bw, bh = int(rng.integers(16, w // 2)), int(rng.integers(16, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            if j % 2:  # a triangle: its mask is not its box
                poly = [x, y, x + bw, y + bh, x, y + bh]
            else:
                poly = [x, y, x + bw, y, x + bw, y + bh, x, y + bh]
            m = decode_mask([poly], h, w).astype(bool)
            img[m] = (cid * 37 % 255, cid * 71 % 255, (cid * 13 + 90) % 255)
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": cid, "bbox": [x, y, bw, bh],
                 "area": float(m.sum()), "segmentation": [poly]}
            )  # fmt: skip
        name = f"{i:012d}.png"
        Image.fromarray(img).save(root / folder / name)
        images.append({"id": i + 1, "coco_url": f"http://images.cocodataset.org/{folder}/{name}", "width": w,
                       "height": h, "neg_category_ids": [], "not_exhaustive_category_ids": []})  # fmt: skip
    images.append({"id": 99, "coco_url": "http://images.cocodataset.org/train2017/rare_only.png", "width": 64,
                   "height": 64, "neg_category_ids": [], "not_exhaustive_category_ids": []})  # fmt: skip
    anns.append({"id": 999, "image_id": 99, "category_id": RARE[0], "bbox": [1, 1, 20, 20], "area": 400.0,
                 "segmentation": [[1, 1, 21, 1, 21, 21, 1, 21]]})  # fmt: skip
    data = {"images": images, "annotations": anns, "categories": lvis_categories()}
    (root / "annotations" / "lvis_v1_train.json").write_text(json.dumps(data))
    return root


@pytest.fixture(scope="module")
def lvis(tmp_path_factory):
    return write_lvis(tmp_path_factory.mktemp("fvit_lvis") / "lvis")


@pytest.fixture
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def config(root, out, **kw) -> TrainConfig:
    base = dict(
        objective="fvit", benchmark="ov-lvis", data=str(root), out=str(out), model="ovdense-test-eva02",
        image_size=64, batch_size=2, epochs=1, workers=0, lr=0.02, warmup_steps=0, log_every=1,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base).with_objective_defaults(set(base))


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# -- the mask steps ------------------------------------------------------------------------------------------------


def test_mask_steps_against_written_out_computations():
    rng = np.random.default_rng(1)
    mask = (rng.random((7, 7)) > 0.5).astype(np.uint8)
    # Nearest resize: destination pixel d reads source floor(d * src / dst) (OpenCV's INTER_NEAREST).
    out = resize_mask(mask, (10, 10))
    idx = np.floor(np.arange(10) * 7 / 10).astype(int)
    np.testing.assert_array_equal(out, mask[idx][:, idx])
    big = (rng.random((12, 10)) > 0.5).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask(big, (5, 6)), big[::2, ::2])  # (w', h') = half
    assert resize_mask(big, (20, 24)).dtype == np.uint8
    np.testing.assert_array_equal(resize_mask(big, (20, 24)), big.repeat(2, 0).repeat(2, 1))

    # Crop, and the boxes recomputed from the cropped masks: [x_min, y_min, x_max + 1, y_max + 1], 0s when empty.
    masks = np.zeros((3, 20, 30), dtype=np.uint8)
    masks[0, 2:9, 5:26] = 1  # runs past the crop's right edge
    masks[1, 15:18, 1:3] = 1  # outside the crop entirely
    masks[2, 6, 12] = 1  # one pixel
    boxes = np.array([[5, 2, 26, 9], [1, 15, 3, 18], [12, 6, 13, 7]], dtype=np.float32)
    corner, crop = (1, 4), (12, 16)  # (y, x), (h, w)
    shifted, valid = crop_boxes(boxes, corner, crop)
    assert valid.tolist() == [True, False, True]
    np.testing.assert_array_equal(shifted[0], [1, 1, 16, 8])  # clipped to the crop's width
    cropped = resize_and_crop_masks([masks[0], masks[2]], (30, 20), corner, crop)
    np.testing.assert_array_equal(cropped, masks[[0, 2], 1:13, 4:20])
    np.testing.assert_array_equal(mask_boxes(cropped), [[1, 1, 16, 8], [8, 5, 9, 6]])
    np.testing.assert_array_equal(mask_boxes(masks[1:2, :12, :16]), [[0, 0, 0, 0]])  # empty mask: no box

    # Flip: the masks mirror as the boxes do (x1' = w - x2).
    image = np.zeros((12, 16, 3), dtype=np.uint8)
    flipped_image, flipped_boxes = flip(image, mask_boxes(cropped))
    np.testing.assert_array_equal(flip_masks(cropped), cropped[:, :, ::-1])
    np.testing.assert_array_equal(mask_boxes(flip_masks(cropped)), flipped_boxes)

    # Pad with zeros at the bottom and right.
    padded = pad_masks(cropped, 20)
    assert padded.shape == (2, 20, 20) and padded.dtype == np.uint8
    np.testing.assert_array_equal(padded[:, :12, :16], cropped)
    assert padded[:, 12:].sum() == 0 and padded[:, :, 16:].sum() == 0

    # Polygons -> bitmaps (pycocotools): a rectangle's pixels.
    rect = decode_mask([[2, 3, 9, 3, 9, 8, 2, 8]], 12, 12)
    assert rect.dtype == np.uint8 and rect.shape == (12, 12)
    ys, xs = np.nonzero(rect)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (2, 3, 9, 8)


def test_lvis_set_rare_removed_masks_follow_the_image(lvis):
    ds = DetectionTrainSet(lvis / "annotations" / "lvis_v1_train.json", lvis, "ov-lvis", 64, seed=3)
    assert len(ds.categories.ids) == 1203 and ds.with_masks
    rare = {i for i, n in enumerate(ds.categories.novel) if n}
    assert len(rare) == 337 and {k - 1 for k in RARE} <= rare
    assert [c for i, c in enumerate(ds.image_counts) if i in rare] == [0] * 337
    assert all(c == 5 for i, c in enumerate(ds.image_counts) if i not in rare)
    assert ds.stats["novel"] == 7 and len(ds) == 8  # the rare-only image is not a training image
    assert {str(ds.image_path(j).relative_to(lvis)).split("/")[0] for j in range(len(ds))} == {"train2017", "val2017"}
    for j in range(len(ds)):
        _, labels = ds.annotations(j)
        assert len(labels) in (2, 3) and not set(labels.tolist()) & rare
        assert ds.masks(j).shape[0] == len(labels)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            h, w = s["image_shape"]
            assert s["masks"].shape == (len(s["boxes"]), 64, 64) and s["masks"].dtype == torch.uint8
            assert s["masks"][:, h:].sum() == 0 and s["masks"][:, :, w:].sum() == 0
            # recompute_bbox: every box is its mask's tight box, so the mask lies inside it.
            np.testing.assert_array_equal(s["boxes"].numpy(), mask_boxes(s["masks"].numpy()))
            assert not set(s["labels"].tolist()) & rare
    # The same draws with and without masks: the image pipeline is unchanged by the masks.
    image = np.asarray(Image.open(ds.image_path(0)).convert("RGB"))
    boxes, labels = ds.annotations(0)
    with_m = ds.transform(image, boxes, labels, ds.rng(0), ds.masks(0))
    without = ds.transform(image, boxes, labels, ds.rng(0))
    assert torch.equal(with_m["image"], without["image"])
    batch = DetectionTrainSet.collate([ds[0], ds[1]])
    assert isinstance(batch["masks"], list) and len(batch["masks"]) == 2


def test_lvis_file_errors_are_one_line(tmp_path, lvis):
    data = json.loads((lvis / "annotations" / "lvis_v1_train.json").read_text())
    data["categories"] = data["categories"][:-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(OvdenseError, match="has 1202 categories; LVIS v1 has 1203"):
        DetectionTrainSet(bad, lvis, "ov-lvis", 64)
    data = json.loads((lvis / "annotations" / "lvis_v1_train.json").read_text())
    data["categories"][0]["frequency"] = "r"
    bad.write_text(json.dumps(data))
    with pytest.raises(OvdenseError, match="has frequency 'r', but OV-LVIS lists it as base"):
        DetectionTrainSet(bad, lvis, "ov-lvis", 64)


# -- training ------------------------------------------------------------------------------------------------------


def test_defaults_and_refusals(lvis, tmp_path):
    assert config(lvis, tmp_path / "a", epochs=1).epochs == 1
    given = dict(objective="fvit", benchmark="ov-lvis", data=str(lvis), out=str(tmp_path / "b"))
    assert TrainConfig(**given).with_objective_defaults(set(given)).epochs == 48  # CLIPSelf's 4x schedule
    given["benchmark"] = "ov-coco"
    assert TrainConfig(**given).with_objective_defaults(set(given)).epochs == 3
    with pytest.raises(OvdenseError, match="--val-data: .*lvis_v1_val.json not found"):
        FViTTrainer.from_config(config(lvis, tmp_path / "c", val_data=str(tmp_path / "nowhere")))
    with pytest.raises(OvdenseError, match="annotation file not found"):
        FViTTrainer.from_config(config(tmp_path / "nowhere", tmp_path / "d"))


def test_the_loss_falls_rare_boxes_never_reach_a_loss(lvis, tmp_path, monkeypatch, no_tensorboard):
    import ovdense.detection.targets as targets

    seen_labels, mask_calls = [], []
    real_targets, real_masks = targets.rcnn_targets, targets.rcnn_mask_targets

    def spy(proposals, gt_boxes, gt_labels, *args, **kwargs):
        assert kwargs["match_low_quality"] is True
        seen_labels.extend(int(v) for lab in gt_labels for v in lab)
        return real_targets(proposals, gt_boxes, gt_labels, *args, **kwargs)

    def spy_masks(rcnn, gt_masks, size=28):
        out = real_masks(rcnn, gt_masks, size)
        assert out.shape == (int(rcnn.pos.sum()), size, size) and set(out.unique().tolist()) <= {0.0, 1.0}
        # A gt's own box (prepended as a positive) is its mask's tight box: the target is not empty.
        assert (out[rcnn.pos_is_gt].flatten(1).sum(1) > 0).all()
        mask_calls.append(len(out))
        return out

    monkeypatch.setattr(targets, "rcnn_targets", spy)
    monkeypatch.setattr(targets, "rcnn_mask_targets", spy_masks)
    trainer = FViTTrainer.from_config(config(lvis, tmp_path / "run", epochs=3))
    rare = {i for i, n in enumerate(trainer.dataset.categories.novel) if n}
    weights = trainer.student.class_weight
    assert weights.shape == (1204,) and weights[sorted(rare)].eq(0).all() and weights[-1] == pytest.approx(0.9)
    assert weights[:-1].sum() == 866
    trainer.fit()
    assert seen_labels and not set(seen_labels) & rare
    assert set(seen_labels) <= {k - 1 for k in BASE} and mask_calls and sum(mask_calls) > 0
    log = rows(tmp_path / "run" / "log.csv")
    losses = [float(r["loss"]) for r in log]
    masks = [float(r["loss_mask"]) for r in log]
    assert len(losses) == 12 and all(np.isfinite(losses)) and all(np.isfinite(masks))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses  # 1203-way CE: slower than COCO
    assert np.mean(masks[-3:]) < np.mean(masks[:2]), masks


def test_resume_is_bit_exact(lvis, tmp_path, no_tensorboard):
    common = dict(epochs=2, save_every=1, warmup_steps=2)
    FViTTrainer.from_config(config(lvis, tmp_path / "ref", max_steps=5, **common)).fit()
    FViTTrainer.from_config(config(lvis, tmp_path / "cut", max_steps=2, **common)).fit()
    cut = tmp_path / "cut"
    FViTTrainer.from_config(config(lvis, cut, max_steps=5, resume=str(cut), **common)).fit()
    a = load_file(str(tmp_path / "ref" / "checkpoints" / "epoch_1.safetensors"))
    b = load_file(str(cut / "checkpoints" / "epoch_1.safetensors"))
    assert a.keys() == b.keys() and any("mask_head" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state_a, state_b = (load_file(str(current_state(r) / WEIGHTS_FILE)) for r in (tmp_path / "ref", cut))
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert [r["loss_mask"] for r in rows(tmp_path / "ref" / "log.csv")] == [
        r["loss_mask"] for r in rows(cut / "log.csv")
    ]


def test_cv2_nearest_is_what_the_written_formula_says():
    """The written-out rule of the first test is OpenCV's (a guard on the test itself)."""
    m = np.arange(35, dtype=np.uint8).reshape(5, 7)
    out = cv2.resize(m, (10, 8), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(
        out, m[np.floor(np.arange(8) * 5 / 8).astype(int)][:, np.floor(np.arange(10) * 7 / 10).astype(int)]
    )


def test_validation_scores_masks_on_lvis_val(lvis, tmp_path, no_tensorboard):
    data = json.loads((lvis / "annotations" / "lvis_v1_train.json").read_text())
    data["images"] = [im for im in data["images"] if im["id"] != 99]  # no file behind it
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 99]
    val = tmp_path / "val"
    (val / "annotations").mkdir(parents=True)
    (val / "annotations" / "lvis_v1_val.json").write_text(json.dumps(data))
    for folder in ("train2017", "val2017"):  # LVIS v1 val holds images of both COCO folders
        (val / folder).symlink_to(lvis / folder)
    out = tmp_path / "run"
    FViTTrainer.from_config(config(lvis, out, val_data=str(val), val_limit=3)).fit()
    logged = rows(out / "val.csv")
    assert logged and {"val/mask_AP", "val/mask_APr", "val/mask_APc", "val/mask_APf"} <= set(logged[-1])
    assert 0 <= float(logged[-1]["val/mask_AP"]) <= 100  # a random detector, but a real LVISEval score
