"""VFMs (ovdense.vfm): names, loading, the position-table rules, features and last-block q + k."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

import hub_server
from ovdense import vfm as vfm_module
from ovdense.errors import InvalidArgumentError, OvdenseError, RandomWeightsWarning
from ovdense.vfm import (
    TEST_DINO_ARCH,
    TEST_DINOV2_ARCH,
    TEST_VFM_MODELS,
    VFM_MODELS,
    Vfm,
    load_vfm,
    resize_pos_table,
)

hf_hub = hub_server.hf_hub  # the loopback hub fixture


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# -- fixtures and written-out references ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory):
    """The tiny DINOv2 (random, layer scale 1 so the blocks matter) as a safetensors file."""
    torch.manual_seed(1)
    model = timm.create_model(TEST_DINOV2_ARCH, dynamic_img_size=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
            elif name in ("pos_embed", "cls_token", "reg_token"):
                p.normal_()
    path = tmp_path_factory.mktemp("vfm") / "tiny_dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model.eval()


@pytest.fixture(scope="module")
def dino():
    """The tiny DINO (test-dino) with a unit-scale position table and cls token, so the position rule shows."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        vfm = load_vfm("test-dino")
    torch.manual_seed(4)
    with torch.no_grad():
        vfm.model.pos_embed.normal_()
        vfm.model.cls_token.normal_()
    return vfm


def _dinov2_reference(model, x: torch.Tensor, registers: bool = True) -> torch.Tensor:
    """DINOv2's get_intermediate_layers(x, reshape=True)[0], written out: patch embedding, position table
    resized (with registers, as hub dinov2_*_reg: exact size, antialiased; without: scale_factor (n + 0.1) / M,
    no antialias), cls + registers, blocks, norm."""
    b = x.shape[0]
    h, w = x.shape[-2] // 14, x.shape[-1] // 14
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # B x hw x C
    c = tokens.shape[-1]
    table = model.pos_embed.reshape(1, 4, 4, c).permute(0, 3, 1, 2)  # tiny arch: native 56 px, 4 x 4
    if (h, w) != (4, 4) and registers:
        table = F.interpolate(table, size=(h, w), mode="bicubic", antialias=True)
    elif (h, w) != (4, 4):
        table = F.interpolate(table, scale_factor=((h + 0.1) / 4, (w + 0.1) / 4), mode="bicubic", antialias=False)
    tokens = tokens + table.flatten(2).transpose(1, 2)
    seq = torch.cat([model.cls_token.expand(b, -1, -1), model.reg_token.expand(b, -1, -1), tokens], dim=1)
    for blk in model.blocks:
        seq = blk(seq)
    seq = model.norm(seq)[:, 5:]  # drop cls + 4 registers
    return seq.transpose(1, 2).reshape(b, c, h, w)


def _dino_prepare_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """DINO's VisionTransformer.prepare_tokens, written out from its repository (vision_transformer.py):
    patch embedding, cls token, then ``interpolate_pos_encoding(x, w, h)`` with ``B, nc, w, h = x.shape``:
    the table as is when the patch count matches and the image is square, else bicubic with
    ``scale_factor = (w0 / sqrt(N), h0 / sqrt(N))``, ``w0 = w // patch + 0.1`` (w is the height here)."""
    b, _, w, h = x.shape
    patch = model.patch_embed.patch_size[0]
    tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.cls_token.expand(b, -1, -1), tokens], dim=1)
    npatch, n = tokens.shape[1] - 1, model.pos_embed.shape[1] - 1
    if npatch == n and w == h:
        pos = model.pos_embed
    else:
        dim = tokens.shape[-1]
        w0, h0 = w // patch + 0.1, h // patch + 0.1
        side = int(math.sqrt(n))
        table = model.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
        assert int(w0) == table.shape[-2] and int(h0) == table.shape[-1]
        pos = torch.cat([model.pos_embed[:, :1], table.permute(0, 2, 3, 1).view(1, -1, dim)], dim=1)
    return tokens + pos


# -- features (moved from test_teachers) ----------------------------------------------------------------


def test_vfm_features_match_dinov2_and_timm(dinov2_file):
    path, model = dinov2_file
    vfm = load_vfm("test-dinov2", checkpoint=path)
    assert vfm.patch_size == 14 and vfm.proxy_size(35) == 490
    assert vfm.mean == pytest.approx((0.485, 0.456, 0.406)) and vfm.std == pytest.approx((0.229, 0.224, 0.225))
    assert not any(p.requires_grad for p in vfm.model.parameters()) and not vfm.model.training
    torch.manual_seed(0)
    native = torch.randn(2, 3, 56, 56)
    proxy = torch.randn(2, 3, 70, 70)  # not the pretraining size: a 5 x 5 grid from the 4 x 4 table
    with torch.no_grad():
        timm_tokens = model.forward_features(proxy)[:, model.num_prefix_tokens :]
        expected_timm = timm_tokens.transpose(1, 2).reshape(2, 32, 5, 5)
        expected_ref = _dinov2_reference(model, proxy)
        native_ref = _dinov2_reference(model, native)
    feats = vfm.features(proxy)
    assert feats.shape == (2, 32, 5, 5) and feats.dtype == torch.float32 and not feats.requires_grad
    torch.testing.assert_close(feats, expected_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vfm.features(native), native_ref, rtol=1e-4, atol=1e-4)
    timm_vfm = load_vfm("test-dinov2", checkpoint=path, pos_interp="timm")
    torch.testing.assert_close(timm_vfm.features(proxy), expected_timm, rtol=1e-4, atol=1e-4)
    assert vfm.features(torch.randn(1, 3, 490, 490)).shape == (1, 32, 35, 35)


def test_vfm_without_registers_uses_the_dino_offset_rule():
    """DINO / DINOv2 without registers resize the table with scale_factor (n + 0.1) / M and no antialias."""
    torch.manual_seed(2)
    model = VisionTransformer(
        img_size=56, patch_size=14, embed_dim=32, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True
    ).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
    x = torch.randn(1, 3, 70, 70)
    with torch.no_grad():
        tokens = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        table = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
        table = F.interpolate(table, scale_factor=(5.1 / 4, 5.1 / 4), mode="bicubic", antialias=False)
        seq = torch.cat([model.cls_token + model.pos_embed[:, :1], tokens + table.flatten(2).transpose(1, 2)], 1)
        expected = model.norm(model.blocks(seq))[:, 1:].transpose(1, 2).reshape(1, 32, 5, 5)
        timm_tokens = model.forward_features(x)[:, 1:].transpose(1, 2).reshape(1, 32, 5, 5)
    feats = Vfm(model, name="tiny-dino").features(x)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(feats, timm_tokens, atol=1e-3)  # the rule matters


def test_vfm_reads_dinov2_release_layout(dinov2_file, tmp_path):
    """DINOv2's own files: registers as register_tokens, a mask token, the cls position inside pos_embed."""
    path, model = dinov2_file
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    c = sd["cls_token"].shape[-1]
    cls_pos = torch.randn(1, 1, c)
    sd["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    sd["cls_token"] = sd["cls_token"] - cls_pos
    sd["register_tokens"] = sd.pop("reg_token")
    sd["mask_token"] = torch.zeros(1, c)
    release = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(sd, release)
    x = torch.randn(1, 3, 56, 56)
    a = load_vfm("test-dinov2", checkpoint=release).features(x)
    torch.testing.assert_close(a, load_vfm("test-dinov2", checkpoint=path).features(x), rtol=1e-5, atol=1e-5)


def test_dino_features_match_dino_get_intermediate_layers(dino):
    """test-dino: features = DINO's get_intermediate_layers(x, n=1)[0][:, 1:] (norm, blocks), on the native
    grid and on a non-square other grid; tokens() keeps the cls token first."""
    m = dino.model
    torch.manual_seed(5)
    for x in (torch.randn(2, 3, 64, 64), torch.randn(2, 3, 96, 80)):
        h, w = x.shape[-2] // 8, x.shape[-1] // 8
        with torch.no_grad():
            expected_tokens = m.norm(m.blocks(_dino_prepare_tokens(m, x)))
        tokens, grid = dino.tokens(x)
        assert grid == (h, w) and tokens.shape == (2, 1 + h * w, 32) and tokens.dtype == torch.float32
        torch.testing.assert_close(tokens, expected_tokens, rtol=1e-5, atol=1e-5)
        expected = expected_tokens[:, 1:].transpose(1, 2).reshape(2, 32, h, w)
        torch.testing.assert_close(dino.features(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidArgumentError, match="B x 3 x H x W"):
        dino.features(torch.randn(1, 1, 64, 64))


# -- last_qk --------------------------------------------------------------------------------------------


def _qk_from_timm_attention(block, x: torch.Tensor) -> torch.Tensor:
    """q + k of a timm Block as its Attention.forward splits them: qkv -> B x N x 3 x heads x d, q = [0], k = [1];
    heads concatenated back. B x N x (heads * d)."""
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    q, k = qkv[:, :, 0], qkv[:, :, 1]  # B x N x heads x d
    return (q + k).reshape(b, n, attn.num_heads * attn.head_dim)


def test_last_qk_matches_direct_computation(dino):
    m = dino.model
    torch.manual_seed(6)
    native = torch.randn(2, 3, 64, 64)
    other = torch.randn(2, 3, 96, 80)  # a 12 x 10 grid from the 8 x 8 table
    with torch.no_grad():
        # Native grid: timm's own modules, the table as is.
        x = m.patch_embed(native)  # B x 8 x 8 x C (dynamic_img_size)
        x = torch.cat([m.cls_token.expand(2, -1, -1), x.flatten(1, 2)], dim=1) + m.pos_embed
        x = m.blocks[:-1](x)
        last = m.blocks[-1]
        out = last.attn.qkv(last.norm1(x))
        expected_native = (out[..., :32] + out[..., 32:64])[:, 1:].transpose(1, 2).reshape(2, 32, 8, 8)
        # Another grid: DINO's own position rule, written out.
        x = m.blocks[:-1](_dino_prepare_tokens(m, other))
        expected_other = _qk_from_timm_attention(last, x)[:, 1:].transpose(1, 2).reshape(2, 32, 12, 10)
        x_timm = m.blocks[:-1](m.norm_pre(m._pos_embed(m.patch_embed(other))))
        timm_rule = _qk_from_timm_attention(last, x_timm)[:, 1:].transpose(1, 2).reshape(2, 32, 12, 10)
    qk = dino.last_qk(native)
    assert qk.shape == (2, 32, 8, 8) and qk.dtype == torch.float32 and not qk.requires_grad
    torch.testing.assert_close(qk, expected_native, rtol=1e-5, atol=1e-5)
    qk_other = dino.last_qk(other)
    assert qk_other.shape == (2, 32, 12, 10)
    torch.testing.assert_close(qk_other, expected_other, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(qk_other, timm_rule, atol=1e-3)  # the position rule reaches q + k
    timm_vfm = Vfm(m, name="test-dino", pos_interp="timm")
    torch.testing.assert_close(timm_vfm.last_qk(other), timm_rule, rtol=1e-5, atol=1e-5)
    # Not normalised (the head normalises): the norms are those of the raw projections.
    assert not torch.allclose(qk.norm(dim=1), torch.ones(2, 8, 8), atol=1e-2)


def test_last_qk_with_registers_drops_them(dinov2_file):
    path, model = dinov2_file
    vfm = load_vfm("test-dinov2", checkpoint=path)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        seq = model.blocks[:-1](model.norm_pre(model._pos_embed(model.patch_embed(x))))
        expected = _qk_from_timm_attention(model.blocks[-1], seq)[:, 5:].transpose(1, 2).reshape(1, 32, 4, 4)
    torch.testing.assert_close(vfm.last_qk(x), expected, rtol=1e-5, atol=1e-5)


def test_last_qk_refuses_qk_norm_models():
    model = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, qk_norm=True, num_classes=0
    )
    with pytest.raises(OvdenseError) as e:
        Vfm(model, name="qk-norm-vit", pos_interp="timm").last_qk(torch.randn(1, 3, 32, 32))
    assert "q/k norms" in _one_line_error(e)


# -- position-table rules -------------------------------------------------------------------------------


def test_dino_pos_rule_is_the_scale_factor_formula_not_timms_resample():
    torch.manual_seed(7)
    table = torch.randn(1, 64, 16)  # an 8 x 8 grid
    grid = table.reshape(1, 8, 8, 16).permute(0, 3, 1, 2)
    for h, w in ((12, 10), (5, 7)):  # up and down
        ours = resize_pos_table(table, (8, 8), (h, w), rule="dino")
        formula = F.interpolate(
            grid, scale_factor=((h + 0.1) / 8, (w + 0.1) / 8), mode="bicubic", align_corners=False, antialias=False
        )
        torch.testing.assert_close(ours, formula.permute(0, 2, 3, 1).reshape(1, h * w, 16), rtol=0, atol=0)
        timm_rule = resample_abs_pos_embed(table, new_size=(h, w), old_size=(8, 8), num_prefix_tokens=0)
        assert (ours - timm_rule).abs().max() > 1e-2  # the rule matters
        reg = resize_pos_table(table, (8, 8), (h, w), rule="dinov2-reg")
        torch.testing.assert_close(reg, timm_rule, rtol=0, atol=0)  # DINOv2 with registers: timm's resample
    assert resize_pos_table(table, (8, 8), (8, 8)) is table
    with pytest.raises(InvalidArgumentError):
        resize_pos_table(table, (8, 8), (4, 4), rule="nearest")
    with pytest.raises(InvalidArgumentError):
        resize_pos_table(table, (7, 7), (4, 4))


# -- names, test architectures, loading -----------------------------------------------------------------


def test_vfm_names():
    assert VFM_MODELS["dino-s8"] == "vit_small_patch8_224.dino"
    assert VFM_MODELS["dino-s16"] == "vit_small_patch16_224.dino"
    assert VFM_MODELS["dino-b8"] == "vit_base_patch8_224.dino"
    assert VFM_MODELS["dinov2-b-reg"] == "vit_base_patch14_reg4_dinov2.lvd142m"
    assert set(VFM_MODELS) == {
        *(f"dinov2-{s}{r}" for s in "sbl" for r in ("", "-reg")),
        *(f"dino-{s}{p}" for s in "sb" for p in (8, 16)),
    }
    for timm_name in VFM_MODELS.values():
        cfg = timm.models.get_pretrained_cfg(timm_name)
        assert cfg.hf_hub_id, timm_name  # what the offline check looks up in the hub cache
    assert TEST_VFM_MODELS == {"test-dinov2": TEST_DINOV2_ARCH, "test-dino": TEST_DINO_ARCH}


def test_test_dino_architecture():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        vfm = load_vfm("test-dino")
    m = vfm.model
    assert isinstance(m, VisionTransformer) and vfm.is_test_model and vfm.source == "random (test architecture)"
    assert vfm.patch_size == 8 and tuple(m.patch_embed.grid_size) == (8, 8) and m.embed_dim == 32
    assert len(m.blocks) == 2 and m.blocks[0].attn.num_heads == 4 and m.blocks[0].attn.qkv.bias is not None
    assert m.cls_token is not None and m.reg_token is None and m.num_prefix_tokens == 1
    assert tuple(m.pos_embed.shape) == (1, 65, 32)  # the cls token has its own position, as DINO
    assert isinstance(m.blocks[0].ls1, torch.nn.Identity)  # no layer scale
    assert vfm.mean == pytest.approx((0.485, 0.456, 0.406)) and vfm.std == pytest.approx((0.229, 0.224, 0.225))
    assert vfm.device == torch.device("cpu")
    assert not timm.models.get_pretrained_cfg(TEST_DINO_ARCH).has_weights
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(TEST_DINO_ARCH, pretrained=True)
    # Seeded init: two loads are the same model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        again = load_vfm("test-dino")
    other = again.model.state_dict()
    assert all(torch.equal(v, other[k]) for k, v in m.state_dict().items())


def test_test_architectures_warn_once(monkeypatch):
    monkeypatch.setattr(vfm_module, "_WARNED_RANDOM", set())
    with pytest.warns(RandomWeightsWarning, match="test-dino .*RANDOM") as record:
        assert load_vfm("test-dino").is_test_model
    assert len(record) == 1 and "\n" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        load_vfm("test-dino")
        assert load_vfm(f"timm:{TEST_DINO_ARCH}").is_test_model  # the same architecture: already warned
    with pytest.warns(RandomWeightsWarning, match="test-dinov2"):
        assert load_vfm("test-dinov2").is_test_model
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        load_vfm("test-dinov2")
    # Re-importing the module does not register the architectures twice (timm would warn and drop cfgs).
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        importlib.reload(vfm_module)
    assert timm.models.get_pretrained_cfg(TEST_DINO_ARCH).input_size == (3, 64, 64)


def _dino_release_state_dict(dim: int, depth: int, patch: int, grid: int, fill=torch.randn) -> dict:
    """The keys and shapes of DINO's backbone releases (dino_deit*_pretrain.pth, dino_vitbase*_pretrain.pth),
    from DINO's vision_transformer.py: cls_token, pos_embed (cls first), patch_embed.proj, blocks.i.{norm1,
    attn.qkv (with bias), attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; the head is an Identity (no keys)."""
    sd = {
        "cls_token": fill(1, 1, dim),
        "pos_embed": fill(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": fill(dim, 3, patch, patch),
        "patch_embed.proj.bias": fill(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": fill(dim),
            p + "norm1.bias": fill(dim),
            p + "attn.qkv.weight": fill(3 * dim, dim),
            p + "attn.qkv.bias": fill(3 * dim),
            p + "attn.proj.weight": fill(dim, dim),
            p + "attn.proj.bias": fill(dim),
            p + "norm2.weight": fill(dim),
            p + "norm2.bias": fill(dim),
            p + "mlp.fc1.weight": fill(4 * dim, dim),
            p + "mlp.fc1.bias": fill(4 * dim),
            p + "mlp.fc2.weight": fill(dim, 4 * dim),
            p + "mlp.fc2.bias": fill(dim),
        }
    return sd | {"norm.weight": fill(dim), "norm.bias": fill(dim)}


def test_dino_release_layout_loads_strictly(tmp_path):
    torch.manual_seed(8)
    sd = _dino_release_state_dict(dim=32, depth=2, patch=8, grid=8)
    path = tmp_path / "dino_test8_pretrain.pth"
    torch.save(sd, path)
    vfm = load_vfm("test-dino", checkpoint=path)
    assert vfm.source == str(path)
    own = vfm.model.state_dict()
    assert set(own) == set(sd) and all(torch.equal(own[k], v) for k, v in sd.items())
    # The real names take DINO's files unchanged too (ViT-S/8: width 384, 12 blocks, 28 x 28 at 224 px).
    big = _dino_release_state_dict(dim=384, depth=12, patch=8, grid=28, fill=torch.zeros)
    big_path = tmp_path / "dino_deitsmall8_pretrain.pth"
    torch.save(big, big_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)  # a real architecture never warns
        s8 = load_vfm("dino-s8", checkpoint=big_path)
    assert not s8.is_test_model and s8.patch_size == 8
    assert s8.features(torch.zeros(1, 3, 16, 24)).shape == (1, 384, 2, 3)


def test_vfm_errors(dinov2_file, tmp_path):
    path, model = dinov2_file
    with pytest.raises(OvdenseError) as e:
        load_vfm("dinov3-b")
    msg = _one_line_error(e)
    assert all(n in msg for n in [*VFM_MODELS, *TEST_VFM_MODELS]) and "timm:" in msg
    with pytest.raises(OvdenseError) as e:
        load_vfm("timm:no_such_model")
    _one_line_error(e)
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dinov2", pos_interp="nearest")
    assert "reference or timm" in _one_line_error(e)
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dinov2", checkpoint=tmp_path / "missing.safetensors")
    assert "not found" in _one_line_error(e)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dinov2", checkpoint=corrupt)
    assert "cannot read" in _one_line_error(e)
    sd = dict(model.state_dict())
    sd.pop("norm.weight")
    sd["blocks.7.extra"] = torch.zeros(1)
    mismatched = tmp_path / "mismatched.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(mismatched))
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dinov2", checkpoint=mismatched)
    msg = _one_line_error(e)
    assert "norm.weight" in msg and "blocks.7.extra" in msg
    # A real name must never come back as the (random) test architecture, nor the other way round.
    with pytest.raises(OvdenseError) as e:
        load_vfm("dinov2-b-reg", checkpoint=path)
    assert "does not fit" in _one_line_error(e)


def test_dino_file_of_another_size_fails_in_one_line(tmp_path):
    """A DINO file of the right keys but another grid (pos_embed) or width: one line naming the misfit."""
    sd = _dino_release_state_dict(dim=32, depth=2, patch=8, grid=7)  # a 56 px table for the 64 px arch
    path = tmp_path / "dino_other_grid.pth"
    torch.save(sd, path)
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dino", checkpoint=path)
    msg = _one_line_error(e)
    assert "does not fit" in msg and "pos_embed" in msg
    sd = _dino_release_state_dict(dim=32, depth=1, patch=8, grid=8)  # one block short
    torch.save(sd, path)
    with pytest.raises(OvdenseError) as e:
        load_vfm("test-dino", checkpoint=path)
    assert "blocks.1." in _one_line_error(e)


@pytest.mark.parametrize("name", ["dinov2-b-reg", "dino-b8", "dino-s8"])
def test_vfm_offline_without_cache_fails_fast(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_vfm(name)
    assert time.monotonic() - start < 10
    msg = _one_line_error(e)
    assert VFM_MODELS[name] in msg and "checkpoint=" in msg and "HF_HUB_CACHE" in msg


def test_vfm_hub_down_without_cache_fails_fast(tmp_path, monkeypatch):
    """Online, but the hub refuses connections (a stopped loopback hub) and nothing is cached: seconds, one line."""
    server = hub_server.HubServer(tmp_path / "repos").start()
    server.stop()
    hub_server.point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_vfm("dino-b8")
    assert time.monotonic() - start < 10
    msg = _one_line_error(e)
    assert "vit_base_patch8_224.dino" in msg and "unreachable" in msg and "--vfm-checkpoint" in msg
