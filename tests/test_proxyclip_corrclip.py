"""ProxyCLIP and CorrCLIP: each step against its formula written out here, the heads against a direct
computation through open_clip's own modules (CorrCLIP's semantic tokens as one masked sequence, the way its
authors run them), the masks part, and the Segmenter / CLI wiring."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovdense import OvdenseError, Segmenter
from ovdense.cli import main
from ovdense.heads import PassInputs
from ovdense.heads.corrclip import CorrclipHead, connected_components, merge_regions, region_index, scope_attention
from ovdense.heads.proxyclip import proxy_attention
from ovdense.heads.vfm_proxies import resize_region_ids, vfm_input
from ovdense.inference import encode_windows
from ovdense.masks import paint_regions, read_region_map, region_map_for, vote
from ovdense.methods import create_head
from ovdense.presets import get_preset
from ovdense.vfm import load_vfm
from ovdense.weights import load_model

torch.manual_seed(0)
WIN = torch.randn(2, 3, 112, 112)  # CLIP 7 x 7, the 8-px test DINO 14 x 14
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def dino():
    return load_vfm("test-dino")


@pytest.fixture(scope="module")
def vit12():
    return load_model("ovdense-test-vit12")


def clip_tokens(visual, images, keep_states=False):
    """The tokens entering the last block (SCLIP's position rule written out) and every block's input."""
    x = visual.conv1(images)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    pos = visual.positional_embedding
    if grid != (14, 14):
        table = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        scale = ((grid[0] + 0.1) / 14, (grid[1] + 0.1) / 14)
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + pos)
    inputs = [x]
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
        inputs.append(x)
    return (x, grid, inputs) if keep_states else (x, grid)


def values_on(blk, tokens, grid, size):
    """The last block's values of ln_1(tokens), [CLS] dropped, bilinear to ``size``: N x C (heads concatenated)."""
    c = tokens.shape[-1]
    v = blk.ln_1(tokens) @ blk.attn.in_proj_weight[2 * c :].T + blk.attn.in_proj_bias[2 * c :]
    v = v[1:].T.reshape(1, c, *grid)
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False).reshape(c, -1).T


# -- ProxyCLIP ----------------------------------------------------------------------------------------------


def test_vfm_input_is_the_unnormalised_window_renormalised():
    rgb = torch.rand(1, 3, 8, 8)  # pixels in [0, 1]
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    x_clip = (rgb - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    got = vfm_input(x_clip, clip_mean, clip_std, *IMAGENET)
    want = (rgb - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_proxy_attention_formula():
    feats = torch.randn(2, 6, 3, 4)
    p = proxy_attention(feats, 1.2, 3.0)
    for b in range(2):
        f = feats[b].reshape(6, -1)
        f = f / f.norm(dim=0, keepdim=True)
        s = f.T @ f
        a = 3.0 * (s - 1.2 * s.mean())
        a[a < 0] = float("-inf")
        torch.testing.assert_close(p[b], torch.softmax(a, -1))
    assert p.shape == (2, 12, 12) and torch.isinf(torch.log(p)).any()  # masked entries are exactly 0


@torch.no_grad()
def test_proxyclip_head_equals_the_steps_written_out(tiny_vit, dino):
    visual = tiny_vit.model.visual
    dense = create_head("proxyclip").encode_dense(tiny_vit.tower, WIN, PassInputs("sclip", vfm=dino))
    assert dense.shape == (2, 32, 14, 14)  # the VFM's grid
    pre = tiny_vit.tower.preprocess
    blk = visual.transformer.resblocks[-1]
    for i in range(2):
        x, grid = clip_tokens(visual, WIN[i : i + 1])
        feats = dino.features(vfm_input(WIN[i : i + 1], pre.mean, pre.std, dino.mean, dino.std))[0]
        f = feats.reshape(feats.shape[0], -1)
        f = f / f.norm(dim=0, keepdim=True)
        s = f.T @ f
        a = 3.0 * (s - 1.2 * s.mean())
        a[a < 0] = float("-inf")
        p = torch.softmax(a, -1)
        out = (p @ values_on(blk, x[0], grid, (14, 14))) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        want = F.normalize(visual.ln_post(out) @ visual.proj, dim=-1).T.reshape(1, -1, 14, 14)
        torch.testing.assert_close(dense[i : i + 1], want, atol=2e-5, rtol=0)


def test_proxyclip_needs_a_vfm(tiny_vit):
    with pytest.raises(ValueError, match="needs a vision foundation model"):
        create_head("proxyclip").encode_dense(tiny_vit.tower, WIN[:1])
    with pytest.raises(OvdenseError, match="vfm: the proxyclip head needs a vision foundation model"):
        Segmenter(tiny_vit, get_preset("proxyclip"), torch.device("cpu"))
    with pytest.raises(OvdenseError, match="vfm: the sclip head uses no vision foundation model"):
        Segmenter(tiny_vit, get_preset("sclip"), torch.device("cpu"), vfm=object())


# -- CorrCLIP pieces ----------------------------------------------------------------------------------------


def test_connected_components_are_dbscan_with_one_sample():
    adjacency = torch.tensor(
        [[1, 1, 0, 0, 0], [1, 1, 0, 0, 1], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 1, 0, 0, 1]], dtype=torch.bool
    )
    assert connected_components(adjacency).tolist() == [0, 0, 1, 2, 0]  # transitive: 0-1-4


def test_merge_regions_keeps_the_smallest_id_and_joins_similar_regions():
    ids = torch.tensor([[5, 5, 1, 1], [5, 5, 2, 2], [7, 7, 2, 2], [9, 9, 9, 9]])
    feats = torch.zeros(16, 3)
    flat = ids.reshape(-1)
    feats[flat == 5] = torch.tensor([1.0, 0, 0])
    feats[flat == 1] = torch.tensor([0.3, 1.0, 0])  # the smallest id: never merged, whatever it looks like
    feats[flat == 2] = torch.tensor([0.0, 1.0, 0.1])
    feats[flat == 7] = torch.tensor([0.99, 0.1, 0.0])  # like 5
    feats[flat == 9] = torch.tensor([0.0, 0.0, 1.0])
    feats = F.normalize(feats, dim=1)
    merged = merge_regions(ids, feats, eps=0.2)
    assert (merged[ids == 1] == 1).all()
    assert len(torch.unique(merged[(ids == 5) | (ids == 7)])) == 1  # joined
    assert len(torch.unique(merged)) == 4 and int(merged[ids != 1].min()) >= 10000
    two = torch.tensor([[3, 3], [4, 4]])
    assert torch.equal(merge_regions(two, F.normalize(torch.randn(4, 3), dim=1)), two)  # <= 2 values: as is


def test_scope_attention_rule():
    ids = torch.tensor([0, 0, 3, 3, 8])
    s = torch.tensor(
        [
            [1.0, 0.1, 0.9, -0.2, 0.4],
            [0.1, 1.0, 0.0, 0.5, -0.5],
            [0.9, 0.0, 1.0, 0.3, 0.8],
            [-0.2, 0.5, 0.3, 1.0, 0.1],
            [0.4, -0.5, 0.8, 0.1, 1.0],
        ]
    )
    got = scope_attention(s, ids, tau=4.0)
    allowed = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        for j in range(5):
            same = ids[i] == ids[j] and ids[i] != 0
            touches_rest = (ids[i] == 0 or ids[j] == 0) and s[i, j] > s.mean()
            allowed[i, j] = bool(same or touches_rest)
    want = torch.softmax(torch.where(allowed, 4.0 * s, torch.full_like(s, float("-inf"))), -1)
    torch.testing.assert_close(got, want)
    assert got[4, 2] == 0  # different segmented regions never attend to each other


@torch.no_grad()
def corrclip_by_hand(visual, dino, image, window_ids):
    """CorrCLIP for one window through open_clip's blocks, the semantic tokens in one masked sequence."""
    pre = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    x, grid, inputs = clip_tokens(visual, image, keep_states=True)
    qk = dino.last_qk(vfm_input(image, *pre, dino.mean, dino.std))[0]
    grid_f = tuple(qk.shape[-2:])
    d = F.normalize(qk.reshape(qk.shape[0], -1).T, dim=-1)
    s = d @ d.T
    ids_f = F.interpolate(window_ids[None, None].float(), size=grid_f, mode="nearest")[0, 0].long()
    merged = merge_regions(ids_f, d).reshape(-1)
    p = scope_attention(s, merged, 4.0)
    blk = visual.transformer.resblocks[-1]
    spatial = torch.stack([inputs[b][0] for b in range(6, 11)]).mean(0)  # outputs of blocks 6..10

    def branch(tokens):
        out = p @ values_on(blk, tokens, grid, grid_f)
        return visual.ln_post(out @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias)

    ids_c = F.interpolate(merged.view(1, 1, *grid_f).float(), size=grid, mode="nearest")[0, 0].long().reshape(-1)
    values = torch.unique(ids_c)
    n_tok = len(values)
    seq = torch.cat([inputs[0][0, :1].expand(n_tok, -1), inputs[0][0]])[None]  # mask tokens = [CLS] after ln_pre
    length = seq.shape[1]
    blocked = torch.ones(length, length, dtype=torch.bool)
    blocked[n_tok:, n_tok:] = False  # [CLS] and patches see [CLS] and patches
    for r, v in enumerate(values):
        blocked[r, n_tok] = False
        blocked[r, n_tok + 1 :] = ids_c != v
    # An additive mask: open_clip's block casts a boolean one to floats (CorrCLIP's vendored copy keeps booleans).
    additive = torch.zeros(length, length).masked_fill(blocked, float("-inf"))
    for b in visual.transformer.resblocks:
        seq = b(seq, attn_mask=additive)
    cells = F.interpolate((ids_c[None] == values[:, None]).float().view(n_tok, 1, *grid), size=grid_f, mode="nearest")
    semantic = visual.ln_post(cells.flatten(1).T @ seq[0, :n_tok])
    feat = branch(x[0]) + branch(spatial) * 1.0 + semantic * 0.5
    return F.normalize(feat @ visual.proj, dim=-1).T.reshape(1, -1, *grid_f)


@torch.no_grad()
def test_corrclip_head_equals_the_steps_written_out(vit12, dino):
    ids = torch.zeros(2, 112, 112, dtype=torch.long)
    ids[0, 20:70, 10:60], ids[0, 60:, 50:] = 4, 9
    ids[0, :15] = 12
    ids[1, :, 56:] = 3  # two values only: no merging
    dense = create_head("corrclip").encode_dense(vit12.tower, WIN, PassInputs("sclip", vfm=dino, masks=ids))
    assert dense.shape == (2, 32, 14, 14)
    for i in range(2):
        want = corrclip_by_hand(vit12.model.visual, dino, WIN[i : i + 1], ids[i])
        torch.testing.assert_close(dense[i : i + 1], want, atol=5e-5, rtol=0)


def test_region_index_is_each_windows_unique():
    ids = torch.tensor([[[5, 5, -1], [9, 5, 9]], [[10000, 3, 3], [3, 3, 3]], [[7, 7, 7], [7, 7, 7]]])
    local, values, counts = region_index(ids)
    assert counts.tolist() == [3, 2, 1] and values.shape == (3, 3)
    for b in range(3):
        want_values, want_local = torch.unique(ids[b], return_inverse=True)
        assert torch.equal(values[b, : counts[b]], want_values)
        assert torch.equal(local[b], want_local.reshape(-1))


def test_connected_components_of_a_batch_are_each_matrix_own():
    a = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    b = torch.zeros(4, 4, dtype=torch.bool)  # no edges: every node alone
    chain = torch.diag(torch.ones(3, dtype=torch.bool), 1)
    chain = chain | chain.T  # 0-1-2-3: needs more than one squaring
    got = connected_components(torch.stack([a, b, chain]))
    assert got.tolist() == [[0, 1, 1, 0], [0, 1, 2, 3], [0, 0, 0, 0]]


def test_merge_and_scope_of_a_batch_equal_each_window_alone():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 6, (4, 6, 6), generator=g)
    ids[1] = ids[1] % 2  # two values: never merged
    ids[2, :, 3:] = 10000  # padding ids, as padded windows carry
    ids[3] = ids[3] - 1  # -1 as the unsegmented id (EoMT's masks)
    centres = F.normalize(torch.randn(7, 5, generator=g), dim=1)
    feats = F.normalize(centres[(ids.reshape(4, -1) + 1) % 7] + 0.3 * torch.randn(4, 36, 5, generator=g), dim=-1)
    merged = merge_regions(ids, feats, eps=0.5)
    similarity = feats @ feats.transpose(1, 2)
    weights = scope_attention(similarity, merged.reshape(4, -1))
    assert torch.equal(merged[1], ids[1]) and not torch.equal(merged[0], ids[0])
    for b in range(4):
        alone = merge_regions(ids[b], feats[b], eps=0.5)
        assert torch.equal(merged[b], alone)
        torch.testing.assert_close(weights[b], scope_attention(similarity[b], alone.reshape(-1)), atol=1e-7, rtol=0)


class _FixedFeatures(CorrclipHead):
    """A head that takes its correlation features from outside, on twice the CLIP grid (CorrCLIPv2's shape)."""

    uses_vfm = False

    def __init__(self, feats, merges):
        super().__init__()
        self.feats, self.merges_regions = feats, merges

    def correlation_features(self, tower, x, context):
        return self.feats, (2 * context.grid[0], 2 * context.grid[1])


@torch.no_grad()
@pytest.mark.parametrize("merges", [True, False])
def test_subclass_chooses_the_correlation_features_and_the_merging(vit12, merges):
    ids = torch.zeros(2, 112, 112, dtype=torch.long)  # 0, the smallest id, on the last 8 columns
    ids[:, :56, :56], ids[:, 56:, :56], ids[:, :, 56:104] = 1, 2, 3
    feats = torch.zeros(2, 14, 14, 3)
    feats[:, :, :7, 0] = 1.0  # regions 1 and 2 alike: merged when merging
    feats[:, :, 7:, 1] = 1.0
    feats[:, :, 13:, 2] = 1.0
    feats[1, :7] += 0.1  # the second window differs
    noise = 0.01 * torch.randn(2, 14, 14, 3, generator=torch.Generator().manual_seed(0))
    feats = F.normalize(feats + noise, dim=-1).reshape(2, 196, 3)
    head = _FixedFeatures(feats, merges)
    dense, context = head.run(vit12.tower, WIN, PassInputs(masks=ids), record_attention=True)
    assert dense.shape == (2, 32, 14, 14) and context.out_grid == (14, 14)
    ids_f = resize_region_ids(ids, (14, 14))
    for b in range(2):
        used = merge_regions(ids_f[b], feats[b]) if merges else ids_f[b]
        assert len(torch.unique(used)) == (3 if merges else 4)
        want = scope_attention(feats[b] @ feats[b].T, used.reshape(-1))
        torch.testing.assert_close(context.head_attention[b], want, atol=1e-7, rtol=0)


@torch.no_grad()
def test_corrclip_batch_of_windows_equals_each_window_alone(vit12, dino):
    ids = torch.zeros(4, 112, 112, dtype=torch.long)
    ids[0, 20:70, 10:60], ids[0, 60:, 50:], ids[0, :15] = 4, 9, 12
    ids[1, :, 56:] = 3  # two values
    g = torch.Generator().manual_seed(5)
    ids[2] = torch.randint(0, 6, (7, 7), generator=g).repeat_interleave(16, 0).repeat_interleave(16, 1)
    ids[3, :8], ids[3, :, :8] = 10000, 10000  # a padded window's border
    images = torch.cat([WIN, torch.randn(2, 3, 112, 112, generator=g)])
    head = create_head("corrclip")
    dense, context = head.run(vit12.tower, images, PassInputs("sclip", vfm=dino, masks=ids), record_attention=True)
    for b in range(4):
        alone, ctx = head.run(vit12.tower, images[b : b + 1], PassInputs("sclip", vfm=dino, masks=ids[b : b + 1]),
                              record_attention=True)  # fmt: skip
        torch.testing.assert_close(dense[b : b + 1], alone, atol=1e-5, rtol=0)
        assert torch.equal(context.head_attention[b : b + 1], ctx.head_attention)


def test_corrclip_window_batch_changes_no_label_nor_feature(vit12, dino):
    rng = np.random.default_rng(4)
    image = rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)  # 112 x 336: 5 windows, batches of 4 and 1
    regions = np.repeat(np.repeat(rng.integers(0, 6, (10, 30)), 10, axis=0), 10, axis=1)
    preset = get_preset("corrclip", short_side=112, crop=112, stride=56)
    labels, features = [], []
    for batch in (1, 4):
        seg = Segmenter(vit12, preset, torch.device("cpu"), window_batch=batch, vfm=dino)
        seg.set_image(image, masks=regions)
        labels.append(seg.predict("sky, wall; person; tree; car").labels)
        features.append(seg.dense_features())
    assert len(seg._features[None].windows) == 5
    np.testing.assert_array_equal(labels[0], labels[1])
    torch.testing.assert_close(features[0], features[1], atol=1e-5, rtol=0)


def test_nearest_is_the_legacy_floor_rule():
    ids = torch.arange(12).view(1, 3, 4)
    out = resize_region_ids(ids, (6, 2))
    rows, cols = (torch.arange(6) * 3 / 6).floor().long(), (torch.arange(2) * 4 / 2).floor().long()
    assert torch.equal(out[0], ids[0][rows][:, cols])


# -- masks --------------------------------------------------------------------------------------------------


def test_paint_in_ascending_area_larger_on_top():
    big = np.zeros((4, 4), bool)
    big[:3, :3] = True
    small = np.zeros((4, 4), bool)
    small[0, 0] = small[3, 3] = True
    painted = paint_regions(np.stack([big, small]))
    # the small mask gets id 1, the big one id 2 and overwrites it where they overlap
    assert painted[0, 0] == 2 and painted[3, 3] == 1 and painted[1, 1] == 2 and painted[3, 0] == 0


def test_vote_excludes_the_smallest_id_and_breaks_ties_low():
    regions = np.array([[0, 0, 5, 5], [0, 0, 5, 5], [7, 7, 7, 7]])
    labels = np.array([[1, 2, 3, 3], [4, 2, 3, 1], [6, 2, 6, 2]])
    out = vote(labels, regions)
    assert out[:2, :2].tolist() == [[1, 2], [4, 2]]  # the smallest id (unsegmented): untouched
    assert (out[regions == 5] == 3).all() and (out[regions == 7] == 2).all()  # 2 vs 6 tie -> 2


def test_region_files(tmp_path):
    (tmp_path / "voc").mkdir()
    arr = np.arange(12, dtype=np.int16).reshape(3, 4)
    np.savez_compressed(tmp_path / "voc" / "2007_000033.npz", instance_mask=arr)
    path = region_map_for(tmp_path, "/data/JPEGImages/2007_000033.jpg", "voc21")
    assert path == tmp_path / "voc" / "2007_000033.npz"
    np.testing.assert_array_equal(read_region_map(path), arr)
    with pytest.raises(OvdenseError, match="no masks for x.jpg"):
        region_map_for(tmp_path, "x.jpg", "voc21")
    np.savez_compressed(tmp_path / "wrong.npz", masks=arr)
    with pytest.raises(OvdenseError, match="holds no 'instance_mask'"):
        read_region_map(tmp_path / "wrong.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(OvdenseError, match="cannot read mask file"):
        read_region_map(tmp_path / "bad.npz")


def test_windows_pad_region_ids_with_the_merged_offset():
    image = torch.zeros(1, 3, 100, 130)
    ids = torch.arange(100 * 130, dtype=torch.float32).view(1, 1, 100, 130)
    seen = []

    def encode(batch, extra):
        seen.append(extra)
        return torch.zeros(batch.shape[0], 4, batch.shape[-2] // 8, batch.shape[-1] // 8)

    encode_windows(image, encode, crop=0, stride=None, pad_to_patch=56, extra=ids, extra_pad=10000.0)
    (extra,) = seen
    assert extra.shape[-2:] == (112, 168)  # 56-multiples
    assert extra[0, 0, 0, 0] == 10000 and torch.equal(extra[0, 0, 6:106, 19:149], ids[0, 0])  # centred


# -- Segmenter and CLI --------------------------------------------------------------------------------------


def test_segmenter_takes_masks_from_a_folder_a_generator_or_the_call(vit12, dino, tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 140, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "photo.png")
    regions = np.zeros((100, 140), np.int64)
    regions[:50, :70], regions[50:, 70:] = 3, 5
    np.savez_compressed(tmp_path / "photo.npz", instance_mask=regions)
    preset = get_preset("corrclip", short_side=112, crop=112, stride=56)
    classes = "sky; person; tree; car"
    results = []
    for kw, arg in (
        ({}, {"masks": regions}),
        ({"masks_dir": tmp_path}, {}),
        ({"mask_generator": lambda im: regions}, {}),
    ):
        seg = Segmenter(vit12, preset, torch.device("cpu"), vfm=dino, **kw)
        seg.set_image(tmp_path / "photo.png" if "masks_dir" in kw else image, **arg)
        results.append(seg.predict(classes))
    for r in results[1:]:
        np.testing.assert_array_equal(r.labels, results[0].labels)
    for v in (3, 5):
        assert len(np.unique(results[0].labels[regions == v])) == 1  # voted
    seg = Segmenter(vit12, preset, torch.device("cpu"), vfm=dino)
    with pytest.raises(OvdenseError, match="needs class-agnostic masks"):
        seg.set_image(image)
    with pytest.raises(OvdenseError, match="region map is 10 x 10, the image 100 x 140"):
        seg.set_image(image, masks=np.zeros((10, 10), int))


@pytest.mark.parametrize("method", ["proxyclip", "corrclip"])
def test_batching_windows_changes_no_label(vit12, dino, method):
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    regions = rng.integers(0, 5, (120, 200)) if method == "corrclip" else None
    results = []
    for batch in (1, 16):
        preset = get_preset(method, short_side=112, crop=112, stride=56)
        seg = Segmenter(vit12, preset, torch.device("cpu"), window_batch=batch, vfm=dino)
        seg.set_image(image, masks=regions)
        results.append(seg.predict("sky, wall; person; tree; car"))
    assert len(seg._features[None].windows) > 1
    np.testing.assert_array_equal(results[0].labels, results[1].labels)
    np.testing.assert_allclose(results[0].probs, results[1].probs, atol=1e-5, rtol=0)


def test_eval_mask_of_the_wrong_size_is_one_line(tmp_path, capsys):
    from eval_fixtures import make_dataset

    make_dataset("voc21", tmp_path / "data", n=1, size=(48, 64), seed=0)
    (tmp_path / "m" / "voc").mkdir(parents=True)
    from ovdense.eval.datasets import get_dataset

    ((img, _),) = get_dataset("voc21", tmp_path / "data").samples
    np.savez_compressed(tmp_path / "m" / "voc" / f"{img.stem}.npz", instance_mask=np.zeros((5, 5), np.int16))
    argv = ["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "data"), "--method", "corrclip"]
    argv += ["--model", "ovdense-test-vit12", "--vfm", "test-dino", "--masks-dir", str(tmp_path / "m")]
    code = main(argv + ["--out", str(tmp_path / "r"), "--workers", "0"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense: error")]
    assert code == 2 and len(err) == 1 and "region map is 5 x 5, the image 48 x 64" in err[0] and img.stem in err[0]


def _masks_for(root, data_root):
    """CorrCLIP's region_masks layout for every image of the synthetic benchmarks under ``data_root``."""
    from ovdense.eval.datasets import get_dataset
    from ovdense.eval.specs import CLASSIC
    from ovdense.masks import MASK_SUBDIRS

    rng = np.random.default_rng(0)
    for name in CLASSIC:
        folder = root / MASK_SUBDIRS[name]
        folder.mkdir(parents=True, exist_ok=True)
        for img, _ in get_dataset(name, data_root).samples:
            h, w = np.asarray(Image.open(img)).shape[:2]
            np.savez_compressed(folder / f"{img.stem}.npz", instance_mask=rng.integers(0, 4, (h, w)).astype(np.int16))


def test_cli_eval_all_corrclip_prints_the_paper_row(tmp_path, capsys):
    from eval_fixtures import make_dataset
    from ovdense.eval.specs import CLASSIC

    data = tmp_path / "data"
    for i, name in enumerate(CLASSIC):
        make_dataset(name, data, n=1, size=(48, 64), seed=i)
    _masks_for(tmp_path / "region_masks", data)
    argv = ["eval", "--eight", "--data-root", str(data), "--method", "corrclip", "--model", "ovdense-test-vit12"]
    argv += ["--vfm", "test-dino", "--masks-dir", str(tmp_path / "region_masks"), "--out", str(tmp_path / "r")]
    argv += ["--workers", "0", "--short-side", "112", "--crop", "112", "--stride", "56"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    row = out.strip().splitlines()[-1]
    assert row.startswith("| corrclip |") and len(row.split("|")) == 2 + len(CLASSIC) + 2
    voc = json.loads(next((tmp_path / "r").glob("voc21_corrclip_*.json")).read_text())["settings"]["preset"]
    assert voc["class_style"] == "corrclip" and voc["pad_multiple"] == 56 and voc["vfm"] == "dino-b8"


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "corrclip needs class-agnostic masks"),
        (["--masks-dir", "MISSING"], "is not a folder"),
        (["--masks-dir", "EMPTY"], "no masks for"),
        (["--masks-dir", "EMPTY", "--mask-generator", "sam"], "not both"),
    ],
)
def test_cli_corrclip_mask_errors_come_before_any_model(extra, message, tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    (tmp_path / "EMPTY").mkdir()
    extra = [str(tmp_path / e) if e in ("MISSING", "EMPTY") else e for e in extra]
    argv = ["segment", str(img), "--classes", "a; b", "--method", "corrclip", "--model", "ovdense-test-vit12"]
    code = main(argv + ["--vfm", "test-dino", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "RANDOM" not in err and len(err.strip().splitlines()) == 1


def test_cli_vfm_flags_need_a_vfm_method(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(img)
    code = main(["segment", str(img), "--classes", "a; b", "--vfm", "dino-b8", "--out", str(tmp_path / "o")])
    assert code == 2 and "--vfm and --vfm-checkpoint apply to methods with a VFM" in capsys.readouterr().err
    argv = ["segment", str(img), "--classes", "a; b", "--method", "proxyclip", "--model", "ovdense-test-vit"]
    code = main(argv + ["--vfm", "test-dino", "--out", str(tmp_path / "o"), "--text-cache", "off"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "the VFM test-dino is a RANDOM test architecture" in captured.err.replace("\n", " ")
    assert json.loads((tmp_path / "o" / "x.json").read_text())["settings"]["method"] == "proxyclip"
