"""Each dense head against its formula, computed here directly from the model's parameters."""

import pytest
import torch
import torch.nn.functional as F

from ovdense.backbones import resize_patch_pos_embed
from ovdense.heads import PassInputs
from ovdense.heads.naclip import gaussian_neighbourhood_bias
from ovdense.methods import create_head, get_method, list_methods

torch.manual_seed(0)
IMG = torch.randn(2, 3, 224, 224)
RECT = torch.randn(1, 3, 224, 320)


def dense_map(tokens, grid):
    """B x L x D projected tokens incl. [CLS] -> B x D x h x w normalised."""
    t = F.normalize(tokens[:, 1:], dim=-1)
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *grid)


# --- OpenAI-style ViT (open_clip VisionTransformer) -------------------------------------------------
def vit_parts(visual, images):
    """Tokens entering the last block at the native 14 x 14 grid, via open_clip's own modules."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], 1) + visual.positional_embedding
    x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks[:-1]:
        x = blk(x)
    return x


def vit_qkv(blk, x):
    heads = blk.attn.num_heads
    y = blk.ln_1(x)
    w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
    c = x.shape[-1]
    q, k, v = (y @ w[i * c : (i + 1) * c].T + b[i * c : (i + 1) * c] for i in range(3))
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    return split(q), split(k), split(v), (c // heads) ** -0.5


def vit_out(blk, o):
    o = o.permute(0, 2, 1, 3).flatten(2)
    return o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias


def vit_project(visual, y):
    return visual.ln_post(y) @ visual.proj


@torch.no_grad()
def test_clip_head_equals_open_clip_forward(tiny_vit):
    visual = tiny_vit.model.visual
    visual.output_tokens = True
    try:
        _, tokens = visual(IMG)
    finally:
        visual.output_tokens = False
    expected = F.normalize(tokens @ visual.proj, dim=-1).transpose(1, 2).reshape(2, -1, 14, 14)
    got = create_head("clip").encode_dense(tiny_vit.tower, IMG)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("name", ["maskclip", "sclip", "clearclip", "naclip", "declip"])
def test_vit_heads_match_formulas(tiny_vit, name):
    visual = tiny_vit.model.visual
    blk = visual.transformer.resblocks[-1]
    x = vit_parts(visual, IMG)
    q, k, v, s = vit_qkv(blk, x)
    sm = lambda a, b, sc: torch.softmax(sc * a @ b.transpose(-1, -2), -1)  # noqa: E731
    mlp = lambda y: blk.mlp(blk.ln_2(y))  # noqa: E731
    if name == "maskclip":  # value path, residual and FFN kept
        y = x + vit_out(blk, v)
        y = y + mlp(y)
    elif name == "sclip":  # softmax(qq)+softmax(kk), residual and FFN kept
        y = x + vit_out(blk, (sm(q, q, s) + sm(k, k, s)) @ v)
        y = y + mlp(y)
    elif name == "clearclip":  # softmax(qq), no residual, no FFN
        y = vit_out(blk, sm(q, q, s) @ v)
    elif name == "naclip":  # softmax(kk + Gaussian), no residual, no FFN
        omega = torch.zeros(197, 197)
        for i in range(196):
            for j in range(196):
                dy, dx = i // 14 - j // 14, i % 14 - j % 14
                omega[i + 1, j + 1] = torch.exp(torch.tensor(-(dy * dy + dx * dx) / (2 * 5.0**2)))
        y = vit_out(blk, torch.softmax(s * k @ k.transpose(-1, -2) + omega, -1) @ v)
    else:  # DeCLIP on an OpenAI ViT: scaled csa, no residual, no FFN
        y = vit_out(blk, (sm(q, q, s) + sm(k, k, s)) @ v)
    expected = dense_map(vit_project(visual, y), (14, 14))
    got = create_head(name).encode_dense(tiny_vit.tower, IMG)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_heads_differ_from_each_other(tiny_vit):
    with torch.no_grad():
        # SC-CLIP and ResCLIP read blocks by number (a 12-block tower), ProxyCLIP and CorrCLIP (v1, v2) need a VFM:
        # compared in test_scclip_resclip.py and test_proxyclip_corrclip.py.
        own_tests = ("scclip", "resclip", "proxyclip", "corrclip", "corrclipv2")
        heads = [n for n in list_methods() if n not in own_tests and not get_method(n).own_model]  # sam3: no head
        maps = {n: create_head(n).encode_dense(tiny_vit.tower, IMG) for n in heads}
    names = list(maps)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if {a, b} == {"sclip", "declip"}:
                continue  # on an OpenAI ViT they differ only in residual/FFN; checked above
            assert not torch.allclose(maps[a], maps[b], atol=1e-4), (a, b)


def test_naclip_bias_formula():
    omega = gaussian_neighbourhood_bias((3, 4), sigma=2.0)
    assert omega.shape == (13, 13)
    assert torch.all(omega[0] == 0) and torch.all(omega[:, 0] == 0)
    assert torch.allclose(torch.diagonal(omega)[1:], torch.ones(12, dtype=omega.dtype))
    p, q = 1 * 4 + 2, 2 * 4 + 0  # (1, 2) and (2, 0)
    expected = torch.exp(torch.tensor(-(1**2 + 2**2) / (2 * 4.0)))
    assert torch.isclose(omega[p + 1, q + 1], expected.to(omega.dtype))


# --- positional embeddings --------------------------------------------------------------------------
def test_pos_embed_rules():
    table = torch.randn(196, 8)
    grid = table.reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    # SCLIP's rule keeps the table whenever the token count is unchanged, whatever the grid shape
    # (the references test x.shape[1] != L), ...
    assert resize_patch_pos_embed(table, (14, 14), "sclip") is table
    assert resize_patch_pos_embed(table, (7, 28), "sclip") is table
    # ... and resamples with (h+0.1)/sqrt(N) scale factors otherwise, which differs from size=.
    got = resize_patch_pos_embed(table, (14, 20), "sclip")
    ref = F.interpolate(grid, scale_factor=(14.1 / 14, 20.1 / 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(got, ref.permute(0, 2, 3, 1).reshape(-1, 8))
    assert resize_patch_pos_embed(table, (14, 14), "size") is table
    assert resize_patch_pos_embed(table, (7, 28), "size") is not table  # DeCLIP compares grids
    by_size = resize_patch_pos_embed(table, (14, 20), "size")
    ref_size = F.interpolate(grid, size=(14, 20), mode="bicubic", align_corners=False)
    torch.testing.assert_close(by_size, ref_size.permute(0, 2, 3, 1).reshape(-1, 8))
    assert not torch.allclose(got, by_size)
    with pytest.raises(ValueError):
        resize_patch_pos_embed(table, (3, 3), "nearest")


@torch.no_grad()
def test_vit_rectangular_input_uses_sclip_rule(tiny_vit):
    visual = tiny_vit.model.visual
    pos = visual.positional_embedding
    patch = resize_patch_pos_embed(pos[1:], (14, 20), "sclip")
    x = visual.conv1(RECT).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], 1) + torch.cat([pos[:1], patch])
    x = visual.ln_pre(x)
    for blk in visual.transformer.resblocks:
        x = blk(x)
    expected = dense_map(vit_project(visual, x), (14, 20))
    got = create_head("clip").encode_dense(tiny_vit.tower, RECT, PassInputs("sclip"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- EVA02 (timm Eva trunk) -------------------------------------------------------------------------
@torch.no_grad()
def test_eva_clip_head_equals_timm_forward(tiny_eva):
    trunk = tiny_eva.model.visual.trunk
    expected = dense_map(trunk.head(trunk.forward_features(IMG)), (14, 14))
    got = create_head("clip").encode_dense(tiny_eva.tower, IMG, PassInputs("size"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_eva_rectangular_grid_matches_timm_dynamic_size(tiny_eva, monkeypatch):
    """Rectangular grids: our pos-embed resize and rebuilt RoPE equal timm's dynamic-size forward once
    timm's resample is told not to antialias (its default antialiases, which the references never do)."""
    import timm
    import timm.models.eva as eva

    original = eva.resample_abs_pos_embed
    monkeypatch.setattr(eva, "resample_abs_pos_embed", lambda *a, **k: original(*a, **{**k, "antialias": False}))
    trunk = tiny_eva.model.visual.trunk
    dyn = timm.create_model("ovdense_test_eva02_clip_224", num_classes=32, dynamic_img_size=True).eval()
    dyn.load_state_dict(trunk.state_dict())
    expected = dense_map(dyn.head(dyn.forward_features(RECT)), (14, 20))
    got = create_head("clip").encode_dense(tiny_eva.tower, RECT, PassInputs("size"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("mode", ["csa", "qq"])
def test_declip_eva_head_unscaled_without_rope(tiny_eva, mode):
    trunk = tiny_eva.model.visual.trunk
    x = trunk.patch_embed(IMG)
    x, rope = trunk._pos_embed(x)
    for blk in trunk.blocks[:-1]:
        x = blk(x, rope=rope)
    blk = trunk.blocks[-1]
    a = blk.attn
    y = blk.norm1(x)
    heads = a.num_heads
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q = split(y @ a.q_proj.weight.T + a.q_proj.bias)  # q bias
    k = split(y @ a.k_proj.weight.T)  # no k bias
    v = split(y @ a.v_proj.weight.T + a.v_proj.bias)
    attn = torch.softmax(q @ q.transpose(-1, -2), -1)  # no head_dim scale, no RoPE
    if mode == "csa":
        attn = attn + torch.softmax(k @ k.transpose(-1, -2), -1)
    o = (attn @ v).permute(0, 2, 1, 3).flatten(2)
    o = a.proj(a.norm(o))  # EVA's sub-LN before the output projection
    expected = dense_map(trunk.head(trunk.norm(o)), (14, 14))
    got = create_head("declip", mode=mode).encode_dense(tiny_eva.tower, IMG, PassInputs("size"))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # A scaled head gives a different (softer) attention: the scale really is off.
    assert tiny_eva.tower.declip_scale == 1.0


def test_unknown_head():
    with pytest.raises(ValueError, match="unknown head"):
        create_head("segformer")
    with pytest.raises(ValueError, match="DeCLIP mode"):
        create_head("declip", mode="kk")
