"""SC-CLIP and ResCLIP: taps of earlier blocks, each step against its formula written out here, whole heads
against a direct batch-of-one computation, and batching that changes no number."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense import Segmenter
from ovdense.backbones import Taps
from ovdense.heads import PassInputs, TextQuery
from ovdense.heads.naclip import gaussian_neighbourhood_bias
from ovdense.heads.resclip import patch_labels, sfr_prior, valid_paths
from ovdense.heads.scclip import local_outlier_factor, repair_anomalies, similarity_aggregation
from ovdense.methods import create_head
from ovdense.pamr import pamr
from ovdense.presets import get_preset
from ovdense.weights import load_model

torch.manual_seed(0)
IMG = torch.randn(2, 3, 224, 224)


@pytest.fixture(scope="module")
def vit12():
    return load_model("ovdense-test-vit12")


def pos_embed(visual, grid):
    """SCLIP's rule written out: the native table, or bicubic with scale_factor (g + 0.1) / 14."""
    pos = visual.positional_embedding
    if grid == (14, 14):
        return pos
    table = pos[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / 14, (grid[1] + 0.1) / 14)
    table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], table.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


def blocks_by_hand(visual, images):
    """X_1..X_{L-1} through open_clip's own modules, and per-head attention of every block (need_weights)."""
    x = visual.conv1(images)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = visual.ln_pre(torch.cat([cls, x], 1) + pos_embed(visual, grid))
    states, attention = {}, {}
    for i, blk in enumerate(visual.transformer.resblocks[:-1], start=1):
        y = blk.ln_1(x)
        _, attention[i] = blk.attn(y, y, y, need_weights=True, average_attn_weights=False)
        x = blk(x)
        states[i] = x
    return states, attention


# -- taps ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_taps_give_states_and_attention_of_one_pass(vit12):
    tower = vit12.tower
    states, attention = blocks_by_hand(vit12.model.visual, IMG)
    plain, _ = tower.tokens_before_last_block(IMG, "sclip")
    assert torch.equal(plain, states[11])
    x, context = tower.tokens_before_last_block(IMG, "sclip", Taps(states=(4, 9, 10), attention=(6, 9)))
    assert set(context["states"]) == {4, 9, 10} and set(context["attention"]) == {6, 9}
    torch.testing.assert_close(context["states"][4], states[4], rtol=0, atol=0)  # before any tapped block: exact
    for block in (6, 9):
        torch.testing.assert_close(context["attention"][block], attention[block], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context["states"][10], states[10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x, states[11], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="taps blocks 1..11"):
        tower.tokens_before_last_block(IMG, "sclip", Taps(states=(12,)))


@torch.no_grad()
def test_eva02_attention_taps_apply_rope(tiny_eva):
    tower = tiny_eva.tower
    plain, _ = tower.tokens_before_last_block(IMG, "size")
    tapped, context = tower.tokens_before_last_block(IMG, "size", Taps(attention=(1, 2)))
    torch.testing.assert_close(tapped, plain, rtol=1e-4, atol=1e-5)  # a wrong rotation would not match
    weights = context["attention"][1]
    assert weights.shape == (2, tower.num_heads, 197, 197)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, tower.num_heads, 197))


# -- SC-CLIP ------------------------------------------------------------------------------------------------


def lof_by_hand(points: np.ndarray, k: int) -> np.ndarray:
    """LOF(p) = mean over its k nearest o of kd(p) / kd(o), squared distances, the code's variant."""
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, 1 : k + 1]
    kd = np.take_along_axis(d, order[:, -1:], axis=1)[:, 0]
    return np.array([np.mean(kd[p] / kd[order[p]]) for p in range(len(points))])


def test_lof_is_the_codes_own_variant():
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(196, 8)).astype(np.float64)
    pts[[5, 77]] += 6.0  # two clear outliers
    scores = local_outlier_factor(torch.from_numpy(pts), 30).numpy()
    np.testing.assert_allclose(scores, lof_by_hand(pts, 30), rtol=1e-10)
    from ovdense.heads.scclip import anomalies

    mask = anomalies(torch.from_numpy(pts).float())
    assert int(mask.sum()) == 10  # strict > of the 95% quantile: ranks 186..195 of 196
    assert mask[5] and mask[77]


def standard_lof(points: np.ndarray, k: int) -> np.ndarray:
    """The textbook LOF (sklearn's): Euclidean distances, reach-dist(p, o) = max(d(p, o), kd(o))."""
    d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    order = np.argsort(d, axis=1, kind="stable")[:, 1 : k + 1]
    kd = np.take_along_axis(d, order[:, -1:], axis=1)[:, 0]
    reach = np.maximum(np.take_along_axis(d, order, axis=1), kd[order])
    lrd = 1 / reach.mean(1)
    return np.array([lrd[order[p]].mean() / lrd[p] for p in range(len(points))])


def test_the_codes_lof_picks_other_tokens_than_the_textbook_one():
    rng = np.random.default_rng(3)
    pts = np.concatenate([rng.normal(size=(150, 4)), rng.normal(scale=0.3, size=(46, 4)) + 3])
    ours = local_outlier_factor(torch.from_numpy(pts), 30).numpy()
    textbook = standard_lof(pts, 30)
    top = lambda s: set(np.argsort(-s, kind="stable")[:10].tolist())  # noqa: E731
    assert top(ours) != top(textbook)


def test_repair_uses_valid_neighbours_and_row_major_cells():
    grid = (2, 5)  # not square: the reference would index cells with the row count
    tokens = torch.arange(10, dtype=torch.float32).view(1, 10, 1).repeat(1, 1, 3)
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, 3] = True  # (row 0, col 3)
    mask[0, 4] = True  # (row 0, col 4), neighbour of 3: not used for its mean
    out = repair_anomalies(tokens, mask, grid)
    # neighbours of (0,3): (0,2)=2, (1,2)=7, (1,3)=8, (1,4)=9 and (0,4) masked
    assert out[0, 3, 0] == pytest.approx((2 + 7 + 8 + 9) / 4)
    assert out[0, 4, 0] == pytest.approx((8 + 9) / 2)  # (0,3) masked, (1,3), (1,4)
    unchanged = [i for i in range(10) if i not in (3, 4)]
    assert torch.equal(out[0, unchanged], tokens[0, unchanged])
    lonely = repair_anomalies(tokens[:, :1], torch.ones(1, 1, dtype=torch.bool), (1, 1))
    assert torch.equal(lonely, tokens[:, :1])  # no valid neighbour: kept


def test_similarity_aggregation_formula():
    s = torch.tensor([[[1.0, 0.5, 0.3], [0.5, 1.0, 0.45], [0.3, 0.45, 1.0]]])
    agg = similarity_aggregation(s, 0.4)
    kept = torch.tensor([[[1.0, 0.5, 0.0], [0.5, 1.0, 0.45], [0.0, 0.45, 1.0]]])
    torch.testing.assert_close(agg, kept / (kept.sum(-1, keepdim=True) + 1e-6))


@torch.no_grad()
def scclip_by_hand(visual, image, grid=(14, 14)):
    """SC-CLIP for one image, step by step from the spec (batch of one, open_clip modules, row-major cells)."""
    states, _ = blocks_by_hand(visual, image)
    blk = visual.transformer.resblocks[-1]
    x11 = states[11][0]
    p11 = x11[1:]
    scores = torch.from_numpy(lof_by_hand(p11.double().numpy(), 30))
    mask = scores > torch.quantile(scores, 0.95)

    def repair(tokens):
        fmap = tokens.T.reshape(-1, *grid).clone()
        src = fmap.clone()
        for idx in torch.nonzero(mask).flatten().tolist():
            r, c = divmod(idx, grid[1])
            nb = [
                src[:, rr, cc]
                for rr in range(r - 1, r + 2)
                for cc in range(c - 1, c + 2)
                if (rr, cc) != (r, c) and 0 <= rr < grid[0] and 0 <= cc < grid[1] and not mask[rr * grid[1] + cc]
            ]
            if nb:
                fmap[:, r, c] = torch.stack(nb).mean(0)
        return fmap.reshape(fmap.shape[0], -1).T

    def cos(t):
        t = F.normalize(t, dim=-1)
        return t @ t.T

    def agg(s):
        s = torch.where(s < 0.4, torch.zeros_like(s), s)
        return s / (s.sum(-1, keepdim=True) + 1e-6)

    s9 = cos(repair(states[9][0, 1:]))
    z = 3 * (s9 - s9.mean())
    prior = torch.softmax(torch.where(z < 0, torch.full_like(z, float("-inf")), z), -1)
    heads = blk.attn.num_heads

    def final(tokens, cls):
        y = blk.ln_1(tokens)
        c = y.shape[-1]
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        k = (y @ w[c : 2 * c].T + b[c : 2 * c]).view(-1, heads, c // heads).transpose(0, 1)
        v = (y @ w[2 * c :].T + b[2 * c :]).view(-1, heads, c // heads).transpose(0, 1)
        a = (prior + torch.softmax(k @ k.transpose(1, 2) * (c // heads) ** -0.5, -1)) / 2
        o = (a @ v).transpose(0, 1).reshape(-1, c) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        return agg(cos(states[4][0, 1:])) @ (o + 0.3 * cls)

    y1 = final(agg(s9) @ repair(p11), x11[:1])
    multi = sum(states[i][0] for i in range(4, 11))
    y2 = final(multi[1:], multi[:1])
    out = F.normalize(visual.ln_post(y1 + y2) @ visual.proj, dim=-1)
    return out.T.reshape(1, -1, *grid)


@torch.no_grad()
def test_scclip_head_equals_the_steps_written_out(vit12):
    head = create_head("scclip")
    dense = head.encode_dense(vit12.tower, IMG, PassInputs("sclip"))
    assert dense.shape == (2, 32, 14, 14)
    for i in range(2):
        by_hand = scclip_by_hand(vit12.model.visual, IMG[i : i + 1])
        torch.testing.assert_close(dense[i : i + 1], by_hand, atol=2e-5, rtol=0)
    # A non-square grid (the reference raises or repairs the wrong cells there): row-major cells.
    rect = torch.randn(1, 3, 160, 272)
    by_hand = scclip_by_hand(vit12.model.visual, rect, grid=(10, 17))
    torch.testing.assert_close(head.encode_dense(vit12.tower, rect, PassInputs("sclip")), by_hand, atol=2e-5, rtol=0)


@torch.no_grad()
def test_the_2025_heads_differ_from_their_parents(vit12):
    from ovdense.text import build_text_classifier

    text = build_text_classifier(vit12.model, vit12.tokenizer, "sky; person; tree", cache_dir=False).embeddings
    maps = {n: create_head(n).encode_dense(vit12.tower, IMG[:1], PassInputs(text=TextQuery(text, 40.0))) for n in
            ("sclip", "naclip", "clearclip", "scclip", "resclip")}  # fmt: skip
    for new in ("scclip", "resclip"):
        for old in ("sclip", "naclip", "clearclip"):
            assert not torch.allclose(maps[new], maps[old], atol=1e-4), (new, old)


def test_scclip_needs_the_blocks_it_reads(tiny_vit):
    with pytest.raises(ValueError, match="reads blocks up to 10; this tower has 3 blocks"):
        create_head("scclip").encode_dense(tiny_vit.tower, IMG[:1])


# -- ResCLIP ------------------------------------------------------------------------------------------------


def test_patch_labels_mode_and_threshold():
    probs = torch.zeros(3, 4, 6)
    probs[1, :, :2] = 0.9  # left third: name 1
    probs[2, :, 2:] = 0.6  # the rest: name 2
    probs[2, 0, 4:] = 0.05  # below temp_thd: name 0 at the top right
    labels = patch_labels(probs, patch_size=2, grid=(2, 3), temp_thd=0.1)
    assert labels.tolist() == [[1, 2, 0], [1, 2, 2]]
    tie = torch.zeros(2, 2, 2)
    tie[1, 0] = 1.0  # two pixels name 1, two pixels name 0: the smaller label wins
    assert patch_labels(tie, 2, (1, 1), 0.5).item() == 0


def valid_by_hand(labels: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    n = h * w
    coords = [(i // w, i % w) for i in range(n)]
    big = max(max(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in coords for b in coords)
    ts = np.linspace(0, 1, big + 1, dtype=np.float32)
    out = np.ones((n, n), dtype=bool)
    for i, (r0, c0) in enumerate(coords):
        for j, (r1, c1) in enumerate(coords):
            d = max(abs(r1 - r0), abs(c1 - c0))
            for s in range(d + 1):
                t = ts[s]
                r = int(np.rint(np.float32(r0) * (np.float32(1) - t) + np.float32(r1) * t))
                c = int(np.rint(np.float32(c0) * (np.float32(1) - t) + np.float32(c1) * t))
                if labels[r, c] != labels[r0, c0]:
                    out[i, j] = False
                    break
    return out


def test_valid_paths_check_the_first_d_over_d_of_each_segment():
    labels = np.array([[1, 1, 2, 1], [1, 2, 2, 1], [3, 1, 1, 1]])
    got = valid_paths(torch.from_numpy(labels)).numpy()
    np.testing.assert_array_equal(got, valid_by_hand(labels))
    assert got.any() and not got.all()


def test_sfr_prior_formula():
    labels = torch.tensor([[0, 0, 1], [2, 1, 1]])
    prior = sfr_prior(labels, sigma=1.0, delete_same_entity=True)
    n = 6
    flat = labels.flatten()
    m = (flat[:, None] == flat[None]).float()
    m.fill_diagonal_(1)
    rows, cols = torch.arange(n) // 3, torch.arange(n) % 3
    d = torch.maximum((rows[:, None] - rows).abs(), (cols[:, None] - cols).abs()).float()
    m = torch.where(valid_paths(labels), m, m * torch.exp(-d / d.max()))
    size = 7  # int(6 * 1 + 1)
    g = torch.exp(-((torch.arange(size) - 3).float() ** 2) / 2)
    g = g / g.sum()
    blurred = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            blurred[i, j] = sum(m[i, jj] * g[jj - j + 3] for jj in range(n) if abs(jj - j) <= 3)
    blurred = blurred.clamp_min(0)
    expected = blurred / (blurred.sum(1, keepdim=True) + 1e-8)
    assert prior.shape == (7, 7) and prior[0].abs().sum() == 0 and prior[:, 0].abs().sum() == 0
    torch.testing.assert_close(prior[1:, 1:], expected, atol=1e-6, rtol=0)


@torch.no_grad()
def resclip_by_hand(visual, image, text, logit_scale, head):
    """ResCLIP for one window from the spec: RCS, first pass + PAMR, labels, prior, final pass."""
    grid = (image.shape[-2] // 16, image.shape[-1] // 16)
    states, attention = blocks_by_hand(visual, image)
    x = states[11][0]
    blk = visual.transformer.resblocks[-1]
    heads, c = blk.attn.num_heads, x.shape[-1]
    y = blk.ln_1(x)
    w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    k = (y @ w[c : 2 * c].T + b[c : 2 * c]).view(-1, heads, c // heads).transpose(0, 1)
    v = (y @ w[2 * c :].T + b[2 * c :]).view(-1, heads, c // heads).transpose(0, 1)
    kk = k @ k.transpose(1, 2) * (c // heads) ** -0.5
    omega = gaussian_neighbourhood_bias(grid, 5.0)
    rcs = torch.stack([attention[i][0] for i in (6, 7, 8, 9)]).mean(0)

    def attend(s):
        logits = kk if s is None else head.sfr_tau * ((1 - head.sfr_lambda) * kk + head.sfr_lambda * s)
        a = head.rcs_tau * ((1 - head.rcs_lambda) * torch.softmax(logits + omega, -1) + head.rcs_lambda * rcs)
        o = (a @ v).transpose(0, 1).reshape(-1, c) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        return F.normalize(visual.ln_post(o) @ visual.proj, dim=-1)[1:]

    cos = (attend(None) @ text.T).T.reshape(1, -1, *grid)
    cos = F.interpolate(cos, size=image.shape[-2:], mode="bilinear", align_corners=False)
    probs = torch.softmax(pamr(image, cos, 10, (8, 16))[0] * logit_scale, 0)
    s = sfr_prior(patch_labels(probs, 16, grid, head.temp_thd))
    s = (s / s.max()).half().float()
    return attend(s).T.reshape(1, -1, *grid)


@torch.no_grad()
def test_resclip_head_equals_the_steps_written_out(vit12):
    from ovdense.text import build_text_classifier

    text = build_text_classifier(vit12.model, vit12.tokenizer, "sky, wall; person; tree", cache_dir=False).embeddings
    head = create_head("resclip", temp_thd=0.3)
    dense = head.encode_dense(vit12.tower, IMG, PassInputs("sclip", text=TextQuery(text, 40.0)))
    for i in range(2):
        by_hand = resclip_by_hand(vit12.model.visual, IMG[i : i + 1], text, 40.0, head)
        torch.testing.assert_close(dense[i : i + 1], by_hand, atol=5e-4, rtol=0)
    rect = torch.randn(1, 3, 160, 232)  # a whole-image pass: a non-square grid, a remainder column of pixels
    by_hand = resclip_by_hand(vit12.model.visual, rect, text, 40.0, head)
    got = head.encode_dense(vit12.tower, rect, PassInputs("sclip", text=TextQuery(text, 40.0)))
    torch.testing.assert_close(got, by_hand, atol=5e-4, rtol=0)
    with pytest.raises(ValueError, match="give it the text embeddings"):
        head.encode_dense(vit12.tower, IMG[:1], PassInputs("sclip"))


# -- presets, batching, the Segmenter -----------------------------------------------------------------------


def test_presets_are_the_authors_configs():
    voc = get_preset("scclip", "voc21")
    assert (voc.logit_scale, voc.prob_thd, voc.area_thd, voc.crop, voc.short_side) == (50.0, 0.15, 0.1, 224, 336)
    assert get_preset("scclip", "coco_stuff").short_side == 336  # SCLIP's is 448
    assert (get_preset("scclip", "coco_object").logit_scale, get_preset("scclip", "coco_object").prob_thd) == (55, 0.35)
    r = get_preset("resclip", "voc21")
    assert r.crop == 0 and r.prob_thd == 0.1 and r.pamr is False
    assert r.head_kwargs == {"temp_thd": 0.5, "rcs_lambda": 0.3, "sfr_tau": 2.2, "sfr_lambda": 0.7}
    assert get_preset("resclip", "cityscapes").head_kwargs["rcs_lambda"] == 0.2
    assert get_preset("resclip", "ade20k", temp_thd=0.4).head_kwargs["temp_thd"] == 0.4  # an option as a keyword
    assert get_preset("resclip", "context59").crop == 224


@pytest.mark.parametrize("method", ["scclip", "resclip"])
def test_batching_windows_changes_no_label(vit12, method):
    image = np.ascontiguousarray(np.random.default_rng(1).integers(0, 255, (240, 330, 3), dtype=np.uint8))
    results = []
    for batch in (1, 16):
        seg = Segmenter(vit12, get_preset(method, short_side=224), torch.device("cpu"), window_batch=batch)
        seg.set_image(image)
        results.append(seg.predict("sky, wall; person; tree; car"))
    assert len(seg._features[next(iter(seg._features))].windows) > 1
    np.testing.assert_array_equal(results[0].labels, results[1].labels)
    np.testing.assert_allclose(results[0].probs, results[1].probs, atol=1e-5, rtol=0)


def test_resclip_features_follow_the_class_list(vit12):
    seg = Segmenter(vit12, get_preset("resclip", "voc21", short_side=160), torch.device("cpu"))
    seg.set_image(np.full((120, 150, 3), 90, dtype=np.uint8))
    seg.predict("sky; person")
    seg.predict("sky; person")
    assert len(seg._features) == 1  # the same list reuses its pass
    seg.predict("tree; car; road")
    assert len(seg._features) == 2  # its first-pass labels, and so its features, differ
    with pytest.raises(Exception, match="needs the class list or masks inside its pass"):
        seg.classify_regions("sky; person", boxes=[[0, 0, 50, 50]])


@pytest.mark.parametrize("method, extra", [("scclip", {}), ("resclip", {}), ("corrclip", {"vfm": "test-dino"})])
def test_a_tower_without_the_blocks_a_head_reads_is_one_line(method, extra):
    from ovdense.errors import OvdenseError
    from ovdense.predictor import Segmenter

    with pytest.raises(OvdenseError, match=rf"^{method}: .*this tower has 3 blocks") as info:
        Segmenter.from_pretrained("ovdense-test-vit", method=method, text_cache_dir=False, **extra)
    assert "\n" not in str(info.value)
