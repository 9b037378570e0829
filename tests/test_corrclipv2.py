"""CorrCLIPv2: the native-resolution VFM map, the head against v1's steps, retrieval and fusion written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.errors import OvdenseError
from ovdense.heads import PassInputs
from ovdense.heads.corrclip import CorrclipHead
from ovdense.inference import cosine_to_labels
from ovdense.masks import vote
from ovdense.methods import create_head
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset
from ovdense.vfm_map import VfmImageMap, linear_resize_matrix
from ovdense.weights import load_model

CLASSES = "sky; person; tree; car"


@pytest.fixture(scope="module")
def vit12():
    return load_model("ovdense-test-vit12")


@pytest.fixture(scope="module")
def aux():
    return load_model("ovdense-test-vit")


@pytest.fixture(scope="module")
def dense_vfm():
    from ovdense.vfm_native import load_dense_vfm

    return load_dense_vfm("test-timm")


def upsampled(grid: torch.Tensor, size) -> torch.Tensor:
    """The authors' V̂: the grid resized bilinearly to the image and normalised per pixel (1 x C x H x W)."""
    return F.normalize(F.interpolate(grid, size=size, mode="bilinear", align_corners=False), dim=1)


# -- the VFM map ------------------------------------------------------------------------------------------------


def test_resize_matrix_is_torch_bilinear():
    v = torch.randn(1, 3, 9, 1)
    for out in (4, 9, 23):
        expected = F.interpolate(v, size=(out, 1), mode="bilinear", align_corners=False)[0, :, :, 0]
        got = (linear_resize_matrix(9, out) @ v[0, :, :, 0].T).T
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_region_means_and_windows_equal_the_full_map_written_out():
    torch.manual_seed(0)
    grid = torch.randn(1, 8, 5, 7)
    size = (37, 51)
    vmap = VfmImageMap(grid, size)
    full = upsampled(grid, size)[0]
    ids = torch.randint(0, 4, size)
    values, index, means = vmap.region_means(ids)
    torch.testing.assert_close(values[index], ids, rtol=0, atol=0)
    expected = torch.stack([full[:, ids == v].mean(1) for v in values])
    torch.testing.assert_close(means, expected, rtol=0, atol=1e-6)
    # A window at rows 3..33, columns 10..40, padded by 5 on every side: the authors pad V̂ by replicating its edge.
    y1, y2, x1, x2, pad = 3, 33, 10, 40, (5, 5, 5, 5)
    window = F.pad(full[None, :, y1:y2, x1:x2], pad, mode="replicate")
    expected = F.normalize(F.interpolate(window, size=(10, 10), mode="bilinear", align_corners=False), dim=1)
    rows = F.pad(torch.arange(y1, y2).float()[None, None], pad[2:], mode="replicate")[0, 0]
    cols = F.pad(torch.arange(x1, x2).float()[None, None], pad[:2], mode="replicate")[0, 0]
    coords = torch.stack([rows[:, None].expand(40, 40), cols[None, :].expand(40, 40)])[None]
    got = vmap.window_features(coords, (10, 10))
    torch.testing.assert_close(got[0], expected[0].flatten(1).T, rtol=0, atol=1e-6)


# -- the head -----------------------------------------------------------------------------------------------------


def test_v2_head_is_v1_unmerged_on_the_vfm_map_features(vit12):
    """v2's pass = v1's scope/branches/semantic tokens without merging, on the VFM map's window features at twice
    the CLIP grid (the authors' feat_shape)."""
    torch.manual_seed(1)
    images = torch.randn(2, 3, 112, 112)  # two windows, CLIP grid 7 x 7, correlation grid 14 x 14
    masks = torch.randint(0, 4, (2, 112, 112))
    grid = torch.randn(1, 16, 9, 11)
    vmap = VfmImageMap(grid, (150, 170))
    offsets = ((0, 0), (30, 50))
    coords = torch.stack(
        [torch.stack(torch.meshgrid(torch.arange(112) + a, torch.arange(112) + b, indexing="ij")) for a, b in offsets]
    )
    full = upsampled(grid, (150, 170))
    features = torch.stack(
        [
            F.normalize(
                F.interpolate(full[:, :, a : a + 112, b : b + 112], size=(14, 14), mode="bilinear")[0].flatten(1).T,
                dim=-1,
            )
            for a, b in offsets
        ]
    )

    class Unmerged(CorrclipHead):
        merges_regions = False

        def correlation_features(self, tower, x, context):
            return features, (14, 14)

    Unmerged.name = "corrclip"
    v2 = create_head("corrclipv2")
    tower = vit12.tower
    inputs = PassInputs(masks=masks, vfm_map=vmap, pixel_coords=coords)
    with torch.no_grad():
        got = v2.encode_dense(tower, images, inputs)
        expected = Unmerged().encode_dense(tower, images, PassInputs(masks=masks, vfm=object()))
    assert got.shape[-2:] == (14, 14)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


def test_v2_needs_its_map_and_coordinates(vit12):
    head = create_head("corrclipv2")
    with pytest.raises(ValueError, match="VFM map"):
        head.encode_dense(vit12.tower, torch.zeros(1, 3, 112, 112), PassInputs(masks=torch.zeros(1, 112, 112).long()))


def test_a_vfm_of_the_other_kind_is_one_line(vit12, dense_vfm):
    from ovdense.vfm import load_vfm

    with pytest.raises(OvdenseError, match="corrclipv2 runs its VFM once per image") as info:
        Segmenter.from_model(vit12, "corrclipv2", vfm=load_vfm("test-dino"), masks_dir=".")
    assert "\n" not in str(info.value) and "'test-dino'" in str(info.value)
    with pytest.raises(OvdenseError, match="proxyclip runs its VFM on every window") as info:
        Segmenter.from_model(vit12, "proxyclip", vfm=dense_vfm)
    assert "\n" not in str(info.value) and "'test-timm'" in str(info.value)


def test_window_batch_changes_nothing(vit12, dense_vfm):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)
    regions = rng.integers(0, 4, (100, 140))
    preset = get_preset("corrclipv2", short_side=112, crop=112, stride=56)
    results = []
    for batch in (1, 16):
        seg = Segmenter(vit12, preset, torch.device("cpu"), vfm=dense_vfm, window_batch=batch)
        seg.set_image(image, masks=regions)
        results.append(seg.predict(CLASSES))
    assert len(seg._features[None].windows) > 1
    np.testing.assert_array_equal(results[0].labels, results[1].labels)
    np.testing.assert_allclose(results[0].probs, results[1].probs, atol=1e-5, rtol=0)


# -- the memory bank ------------------------------------------------------------------------------------------------


def write_bank(root, keys: np.ndarray, stores: dict[str, torch.Tensor], name: str = "coco", vfm: str = "radiov3"):
    """A bank in the authors' ``memory_bank/`` layout: one image owning every region, fp16 stores, an index."""
    from ovdense.bank.index import build_index, write_index
    from ovdense.bank.layout import BankLayout
    from ovdense.bank.manifest import append_images
    from ovdense.bank.store import write_store

    layout = BankLayout(root, name)
    append_images(layout, [("bank_image", len(keys))])
    for folder in ("clip_embeddings", "vfm_embeddings"):
        (layout.root / folder).mkdir(parents=True, exist_ok=True)
    for store, rows in stores.items():
        write_store(layout.store(store), F.normalize(rows.float(), dim=-1).half())
    write_index(build_index(keys, np.arange(len(keys)), kind="flat"), layout.index(vfm))
    return layout


def clip_width(loaded) -> int:
    return int(loaded.model.visual.output_dim)


def test_fusion_equals_the_retrieval_written_out(vit12, aux, dense_vfm, tmp_path):
    """(1 − w)·O + w·½(L_main + L_aux) before the ×40 softmax, every region of the resized mask retrieving its K
    nearest keys; checked against a brute-force search and numpy means, and retrieval visibly changes labels."""
    from ovdense.bank.retrieval import BankSupport
    from ovdense.inference import mmseg_resize_size

    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)
    regions = np.zeros((100, 140), np.int64)
    regions[:, 60:], regions[50:, 100:] = 2, 7  # three regions; 0 is the unsegmented one, which retrieves too
    preset = get_preset("corrclipv2", short_side=112, crop=112, stride=56)
    plain = Segmenter(vit12, preset, torch.device("cpu"), vfm=dense_vfm)
    text = plain.text_classifier(CLASSES)
    n_bank, k = 40, 5
    keys = rng.normal(size=(n_bank, dense_vfm.dim)).astype(np.float32)
    # Main values: every bank region looks like "car" (class 3), so the support pulls pixels towards it.
    main_rows = text.embeddings[3].repeat(n_bank, 1) + 0.3 * torch.randn(n_bank, clip_width(vit12))
    aux_rows = torch.randn(n_bank, clip_width(aux))
    write_bank(tmp_path / "memory_bank", keys, {"metaclip_b": main_rows, "dfnclip_b": aux_rows})
    support = BankSupport.open(
        tmp_path / "memory_bank", main_store="metaclip_b", aux_store="dfnclip_b", aux_model=aux, num_support=k
    )
    support.check(key_dim=dense_vfm.dim, main_dim=clip_width(vit12), aux_dim=clip_width(aux))
    fused = Segmenter(vit12, preset, torch.device("cpu"), vfm=dense_vfm, support=support)
    plain.set_image(image, masks=regions)
    fused.set_image(image, masks=regions)
    without, with_bank = plain.predict(CLASSES), fused.predict(CLASSES)

    # Written out: queries = normalised means of V̂ over the regions of the nearest-resized mask.
    size = mmseg_resize_size(100, 140, preset.long_side, preset.short_side)
    ids = F.interpolate(torch.from_numpy(regions)[None, None].float(), size=size, mode="nearest")[0, 0].long()
    grid, _ = dense_vfm.dense(image)
    full = upsampled(grid, size)[0]
    values = torch.unique(ids)
    queries = F.normalize(torch.stack([full[:, ids == v].mean(1) for v in values]), dim=-1).numpy()
    unit_keys = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    neighbours = np.argsort(-(queries @ unit_keys.T), axis=1)[:, :k]
    stored = {n: F.normalize(r.float(), dim=-1).half().float() for n, r in (("main", main_rows), ("aux", aux_rows))}
    aux_text = fused.auxiliary_text(text)

    def region_cosines(rows, names):
        means = torch.stack([rows[torch.from_numpy(nb)].mean(0) for nb in neighbours])
        return F.normalize(means.half().float(), dim=-1) @ F.normalize(names, dim=-1).T

    per_region = 0.5 * (region_cosines(stored["main"], text.embeddings) + region_cosines(stored["aux"], aux_text))
    index = torch.searchsorted(values, ids)
    support_map = per_region.T[:, index][None]  # 1 x N x H x W at the network input
    support_full = F.interpolate(support_map, size=(100, 140), mode="bilinear", align_corners=False)[0]
    # One name per class: 40·cos = log p + a per-pixel constant, so the fused softmax follows from the plain probs.
    logits = 0.5 * torch.log(torch.from_numpy(without.probs)) + 40 * 0.5 * support_full
    expected = logits.softmax(0)
    np.testing.assert_allclose(with_bank.probs, expected.numpy(), atol=2e-3, rtol=0)
    labels, _ = cosine_to_labels(logits / 40, torch.arange(4), 40.0)
    agree = (with_bank.labels == vote(labels.numpy(), regions)).mean()
    assert agree > 0.999
    # Retrieval changes the answer: the support pulls towards "car".
    assert (with_bank.labels == 3).sum() > (without.labels == 3).sum()
    assert fused.settings["bank"]["main_store"] == "metaclip_b"


def test_bank_checks_are_one_line(vit12, aux, dense_vfm, tmp_path):
    from ovdense.bank.retrieval import BankSupport

    rng = np.random.default_rng(0)
    keys = rng.normal(size=(10, dense_vfm.dim + 1)).astype(np.float32)
    write_bank(tmp_path / "mb", keys, {"metaclip_b": torch.randn(10, clip_width(vit12))})
    support = BankSupport.open(tmp_path / "mb", main_width=clip_width(vit12))
    assert support.main_store == "metaclip_b"
    with pytest.raises(OvdenseError) as err:
        support.check(key_dim=dense_vfm.dim, main_dim=clip_width(vit12))
    assert "\n" not in str(err.value) and str(dense_vfm.dim) in str(err.value)
    with pytest.raises(OvdenseError, match="no value store fits"):
        BankSupport.open(tmp_path / "mb", main_width=clip_width(vit12) + 8)


def test_cli_segment_with_a_bank_and_its_errors(vit12, aux, dense_vfm, tmp_path, capsys):
    from PIL import Image

    from ovdense.cli import main

    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    np.savez_compressed(tmp_path / "img.npz", instance_mask=rng.integers(0, 4, (90, 120)))
    keys = rng.normal(size=(30, dense_vfm.dim)).astype(np.float32)
    write_bank(tmp_path / "mb", keys, {"metaclip_b": torch.randn(30, clip_width(vit12)),
                                       "dfnclip_b": torch.randn(30, clip_width(aux))})  # fmt: skip
    common = ["segment", str(tmp_path / "img.png"), "--classes", "sky; car; tree", "--method", "corrclipv2",
              "--model", "ovdense-test-vit12", "--vfm", "test-timm", "--masks-dir", str(tmp_path),
              "--short-side", "112", "--crop", "112", "--stride", "56", "--text-cache", "off"]  # fmt: skip
    assert main([*common, "--bank", str(tmp_path / "mb"), "--aux-model", "ovdense-test-vit", "--bank-store",
                 "metaclip_b", "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    assert (tmp_path / "out" / "img_overlay.png").is_file()
    capsys.readouterr()
    assert main([*common, "--bank", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main([*common[:5], "sclip", "--model", "ovdense-test-vit", "--bank", str(tmp_path / "mb"),
                 "--out", str(tmp_path / "o3")]) == 2  # fmt: skip
    assert "only corrclipv2 retrieves" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
