"""Attention maps of a head whose VFM runs once per image (CorrCLIPv2): the pass on the image's VFM map, the VFM's
native-grid affinity, the CLI's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovdense.attention import token_at
from ovdense.heads import PassInputs
from ovdense.heads.vfm_proxies import resize_region_ids
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset
from ovdense.weights import load_model

POINTS = [(10, 10), (120, 80)]


@pytest.fixture(scope="module")
def vit12():
    return load_model("ovdense-test-vit12")


@pytest.fixture(scope="module")
def dense_vfm():
    from ovdense.vfm_native import load_dense_vfm

    return load_dense_vfm("test-timm")


def image_and_regions(height: int = 100, width: int = 140):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    regions = np.zeros((height, width), np.int64)
    regions[:, width // 2 :], regions[60:, :40] = 1, 2
    return image, regions


def pass_input(seg) -> torch.Tensor:
    """The attention pass's input of the :func:`v2` segmenter: its 112 x 157 network input at 112 x 112."""
    return F.interpolate(seg._input, size=(112, 112), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def v2(vit12, dense_vfm):
    """A corrclipv2 segmenter on a 100 x 140 image: network input 112 x 157, attention pass 112 x 112 (sides rounded
    to multiples of lcm(16, pad_multiple 56) = 112), so the pass pixels are mapped onto other input columns."""
    image, regions = image_and_regions()
    preset = get_preset("corrclipv2", short_side=112, crop=112, stride=56)
    seg = Segmenter(vit12, preset, torch.device("cpu"), vfm=dense_vfm, text_cache_dir=False)
    seg.set_image(image, masks=regions)
    return seg, seg.attention_maps(POINTS, layers=[1, 12])


def test_shapes_and_columns(v2, dense_vfm):
    seg, maps = v2
    assert tuple(seg._input.shape[-2:]) == (112, 157)
    assert maps.clip.shape == (3, 2, 7, 7)  # the pass's CLIP grid: 112 / 16
    assert maps.head.shape == maps.affinity.shape == (3, 14, 14)  # twice the CLIP grid, CorrCLIP's
    assert maps.vfm_attention is None and maps.vfm_affinity.shape == (3, 6, 9)  # 96 x 144 px at /16
    assert maps.vfm == "test-timm" and maps.method == "corrclipv2"
    assert [t for t, _ in maps.columns()] == [
        "CLIP block 1", "CLIP block 12", "corrclipv2 attention", "corrclipv2 affinity", "test-timm affinity"
    ]  # fmt: skip
    assert np.isnan(maps.head[0]).all() and np.isnan(maps.vfm_affinity[0]).all()  # no [CLS] in either output


@torch.no_grad()
def test_affinity_is_the_windows_features_on_the_heads_grid(v2):
    seg, maps = v2
    dense = seg.dense_features()
    unit = F.normalize(F.interpolate(dense[None], size=(14, 14), mode="bilinear", align_corners=False)[0], dim=0)
    tower = seg.loaded.tower  # the [CLS] row: CLIP's image embedding of the 112 x 112 pass
    x, ctx = tower.tokens_before_last_block(pass_input(seg), seg.preset.pos_rule)
    embedding = F.normalize(tower.project(tower.last_block(x, ctx))[0, 0], dim=-1)
    np.testing.assert_allclose(maps.affinity[0], torch.einsum("c,chw->hw", embedding, unit), atol=2e-6)
    for i, p in enumerate(POINTS):
        r, c = token_at(p, seg.image.shape[:2], (14, 14))
        want = torch.einsum("c,chw->hw", unit[:, r, c], unit).numpy()
        np.testing.assert_allclose(maps.affinity[1 + i], want, atol=2e-6)
        assert abs(maps.affinity[1 + i, r, c] - 1) < 1e-5
    assert np.abs(maps.affinity).max() <= 1 + 1e-5


@torch.no_grad()
def test_vfm_affinity_is_the_native_grids_cosines(v2, dense_vfm):
    seg, maps = v2
    grid, _ = dense_vfm.dense(seg.image)  # 1 x C x 6 x 9, straight from the VFM
    unit = F.normalize(grid[0], dim=0)
    for i, (x, y) in enumerate(POINTS):
        r, c = min(5, int((y + 0.5) * 6 / 100)), min(8, int((x + 0.5) * 9 / 140))
        want = torch.einsum("c,chw->hw", unit[:, r, c], unit).numpy()
        np.testing.assert_allclose(maps.vfm_affinity[1 + i], want, atol=1e-5)
        assert abs(maps.vfm_affinity[1 + i, r, c] - 1) < 1e-5
    assert np.abs(maps.vfm_affinity[1:]).max() <= 1 + 1e-5


@torch.no_grad()
def test_head_attention_is_the_scope_attention_on_the_mapped_pixels(v2, vit12):
    seg, maps = v2
    rows = maps.head[1:].reshape(len(POINTS), -1)
    assert (rows >= 0).all()
    np.testing.assert_allclose(rows.sum(-1), 1, atol=1e-5)  # softmax over the pass's cells, no prefix
    # The pass written out: pass pixel (i, j) of 112 x 112 shows network-input pixel (floor(i·112/112),
    # floor(j·157/112)), the legacy nearest rule its region ids follow too.
    x = pass_input(seg)
    ids = resize_region_ids(torch.from_numpy(image_and_regions()[1])[None], (112, 157))
    cols = torch.tensor([j * 157 // 112 for j in range(112)])
    coords = torch.stack([torch.arange(112)[:, None].expand(112, 112), cols[None, :].expand(112, 112)])[None]
    masks = ids[:, :, cols]
    inputs = PassInputs(seg.preset.pos_rule, masks=masks, vfm_map=seg._vfm_map, pixel_coords=coords)
    _, ctx = seg.head.run(vit12.tower, x, inputs, record_attention=True)
    for i, p in enumerate(POINTS):
        r, c = token_at(p, seg.image.shape[:2], (14, 14))
        np.testing.assert_allclose(maps.head[1 + i], ctx.head_attention[0, r * 14 + c].reshape(14, 14), atol=1e-6)


def test_a_dense_vfm_beside_another_head(dense_vfm):
    image, _ = image_and_regions()
    seg = Segmenter(load_model("ovdense-test-vit"), get_preset("sclip"), torch.device("cpu"), text_cache_dir=False)
    seg.set_image(image)
    maps = seg.attention_maps(POINTS, layers=[1], vfm=dense_vfm)
    assert maps.vfm_attention is None and [t for t, _ in maps.columns()][-1] == "test-timm affinity"
    unit = F.normalize(dense_vfm.dense(image)[0][0], dim=0)
    r, c = token_at(POINTS[1], image.shape[:2], tuple(unit.shape[-2:]))
    np.testing.assert_allclose(maps.vfm_affinity[2], torch.einsum("c,chw->hw", unit[:, r, c], unit), atol=1e-5)


def test_cli_writes_the_maps_of_corrclipv2(tmp_path, capsys, vit12, dense_vfm):
    from ovdense.cli import main

    image, regions = image_and_regions(90, 120)
    Image.fromarray(image).save(tmp_path / "img.png")
    np.savez_compressed(tmp_path / "img.npz", instance_mask=regions)
    out = tmp_path / "out"
    argv = ["attention", str(tmp_path / "img.png"), "--points", "10,10", "100,70", "--method", "corrclipv2",
            "--model", "ovdense-test-vit12", "--vfm", "test-timm", "--masks-dir", str(tmp_path), "--layers", "1,12",
            "--out", str(out), "--text-cache", "off", "--cell-height", "60"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [
        "img_affinity.npy", "img_attention.json", "img_attention.png", "img_clip.npy", "img_head.npy",
        "img_vfm_affinity.npy",
    ]  # fmt: skip
    summary = json.loads((out / "img_attention.json").read_text())
    assert summary["method"] == "corrclipv2" and summary["vfm"] == "test-timm"
    assert summary["columns"] == ["CLIP block 1", "CLIP block 12", "corrclipv2 attention", "corrclipv2 affinity",
                                  "test-timm affinity"]  # fmt: skip
    # The default preset: short side 336, so a 336 x 448 input and pass; CLIP grid 21 x 28, the head's 42 x 56.
    assert summary["arrays"] == {"img_clip.npy": [3, 2, 21, 28], "img_head.npy": [3, 42, 56],
                                 "img_affinity.npy": [3, 42, 56], "img_vfm_affinity.npy": [3, 6, 8]}  # fmt: skip
    head = np.load(out / "img_head.npy")
    np.testing.assert_allclose(np.nansum(head[1:], axis=(1, 2)), 1, atol=1e-5)
    seg = Segmenter(vit12, get_preset("corrclipv2"), torch.device("cpu"), vfm=dense_vfm, text_cache_dir=False)
    seg.set_image(image, masks=regions)
    want = seg.attention_maps([(10, 10), (100, 70)], layers=[1, 12])
    np.testing.assert_allclose(np.load(out / "img_vfm_affinity.npy"), want.vfm_affinity, atol=1e-6)
    np.testing.assert_allclose(head, want.head, atol=1e-6)
    picture = Image.open(out / "img_attention.png")
    cw = round(120 * 60 / 90)
    assert picture.mode == "RGB" and 3 * 60 < picture.height < 3 * 60 + 80 and 5 * cw < picture.width < 6 * cw + 200


def test_demo_shows_the_native_vfms_affinity_alone(vit12, dense_vfm, tmp_path):
    from ovdense.demo import DemoSession

    image, regions = image_and_regions()
    demo = DemoSession(vit12, ["corrclipv2"], vfm=dense_vfm, mask_generator=lambda img: regions, text_cache_dir=False,
                       out_dir=tmp_path)  # fmt: skip
    views = demo.attention(image, (120, 80), 12, "sky; car", ["corrclipv2"])
    assert [v.title for v in views] == [
        "CLIP block 12 attention", "corrclipv2 attention", "corrclipv2 affinity", "test-timm affinity"
    ]  # fmt: skip
