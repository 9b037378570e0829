"""Teachers of the distillation objectives: VFM (timm), Stable Diffusion (diffusers), frozen CLIP."""

from __future__ import annotations

import copy
import sys
import time

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ovdense.errors import OvdenseError
from ovdense.train import teachers
from ovdense.train.teachers import ClipTeacher, load_sd, load_vfm, resize_attention
from ovdense.train.tiny_teachers import TEST_DINOV2_ARCH, save_tiny_sd


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


# -- VFM ------------------------------------------------------------------------------------------------


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
    from timm.models.vision_transformer import VisionTransformer

    from ovdense.train.teachers import VfmTeacher

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
    feats = VfmTeacher(model, name="tiny-dino").features(x)
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


def test_vfm_errors(dinov2_file, tmp_path):
    path, model = dinov2_file
    with pytest.raises(OvdenseError) as e:
        load_vfm("dinov3-b")
    assert "dinov2-b-reg" in _one_line_error(e) and "timm:" in str(e.value)
    with pytest.raises(OvdenseError) as e:
        load_vfm("timm:no_such_model")
    _one_line_error(e)
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


def test_vfm_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_vfm("dinov2-b-reg")
    assert time.monotonic() - start < 10
    msg = _one_line_error(e)
    assert "vit_base_patch14_reg4_dinov2.lvd142m" in msg and "checkpoint=" in msg and "HF_HUB_CACHE" in msg


# -- Stable Diffusion -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd(sd_folder):
    return load_sd(sd_folder)


def _image(b: int = 2, side: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(b, 3, side, side, generator=g) * 2 - 1


def _rows_sum_to_one(a: torch.Tensor) -> None:
    torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]), rtol=0, atol=1e-5)
    assert (a >= 0).all()


def test_sd_layer_selection(sd):
    up0 = [f"up_blocks.0.attentions.{i}.transformer_blocks.0.attn1" for i in (0, 1)]
    up1 = [f"up_blocks.1.attentions.{i}.transformer_blocks.0.attn1" for i in (0, 1)]
    assert sd.layers == up0 + up1  # the two finest up-path resolutions, in execution order
    assert teachers.select_attn_layers(sd.unet, "up-finest-1") == up1
    assert teachers.select_attn_layers(sd.unet, f"{up1[1]}, {up0[0]}") == [up0[0], up1[1]]
    for bad in ("up-finest-0", "down_blocks.0.attentions.0.transformer_blocks.0.attn2", "nope"):
        with pytest.raises(OvdenseError) as e:
            teachers.select_attn_layers(sd.unet, bad)
        _one_line_error(e)


def test_sd_captured_maps_are_softmax_attention(sd):
    image = _image()
    layer = sd.layers[-1]
    module = dict(sd.unet.named_modules())[layer]
    seen = {}
    hook = module.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0]), with_kwargs=True)
    try:
        maps = sd.capture(image)
    finally:
        hook.remove()
    assert list(maps) == sd.layers
    for name, a in maps.items():
        n = 64 if name.startswith("up_blocks.0.") else 256  # 8 x 8 and 16 x 16 of the 16 x 16 latent
        assert a.shape == (2, n, n) and a.dtype == torch.float32
        _rows_sum_to_one(a)
    # Independently: softmax(q kᵀ · scale) per head, averaged over the heads.
    with torch.no_grad():
        x = seen["x"]
        q, k = module.to_q(x), module.to_k(x)
        heads = module.heads
        q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
        expected = (q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1)
    torch.testing.assert_close(maps[layer], expected, rtol=1e-5, atol=1e-6)


def test_sd_processor_keeps_unet_output(sd):
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.no_grad():
        lat = sd.latents(_image())
        noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(0))
        t = torch.full((2,), sd.timestep, dtype=torch.long)
        noisy = sd.scheduler.add_noise(lat, noise, t)
        emb = sd.prompt_embeds.expand(2, -1, -1)
        ours = sd.unet(noisy, t, encoder_hidden_states=emb).sample
        default = copy.deepcopy(sd.unet)
        default.set_attn_processor(AttnProcessor2_0())
        reference = default(noisy, t, encoder_hidden_states=emb).sample
    assert sum(isinstance(p, teachers.AttentionCapture) for p in sd.unet.attn_processors.values()) == 4
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_sd_attention_chain(sd):
    image = _image()
    chain = sd.attention_chain(image, (5, 5))
    assert chain.shape == (2, 25, 25) and chain.dtype == torch.float32
    _rows_sum_to_one(chain)
    torch.testing.assert_close(sd.attention_chain(image, (5, 5)), chain)  # noise seeded per call
    raw = sd.capture(image)
    expected = None
    for name, a in raw.items():
        g = 8 if name.startswith("up_blocks.0.") else 16
        r = resize_attention(a, (g, g), (5, 5))
        expected = r if expected is None else expected @ r
    torch.testing.assert_close(chain, expected, rtol=1e-5, atol=1e-6)


def test_resize_attention_identity_on_same_grid():
    a = torch.rand(2, 12, 12).softmax(-1)
    torch.testing.assert_close(resize_attention(a, (3, 4), (3, 4)), a)
    r = resize_attention(a, (3, 4), (5, 2))
    assert r.shape == (2, 10, 10)
    _rows_sum_to_one(r)


def test_sd_errors(sd_folder, tmp_path, monkeypatch):
    with pytest.raises(OvdenseError) as e:
        load_sd(tmp_path / "no-such-folder")
    assert "not found" in _one_line_error(e)
    (tmp_path / "half").mkdir()
    with pytest.raises(OvdenseError) as e:
        load_sd(tmp_path / "half")
    assert "unet" in _one_line_error(e)
    with pytest.raises(OvdenseError) as e:
        load_sd(sd_folder, timestep=1000)
    _one_line_error(e)

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_sd("stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert time.monotonic() - start < 10
    assert "--sd-model" in _one_line_error(e)


def test_sd_needs_the_diffusion_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(OvdenseError) as e:
        load_sd("anything")
    assert _one_line_error(e) == (
        "the Stable Diffusion teacher needs the diffusion extra: pip install 'ovdense[diffusion]'"
    )


# -- CLIP -----------------------------------------------------------------------------------------------


def test_clip_teacher_is_a_frozen_copy(tiny_vit):
    student = copy.deepcopy(tiny_vit.model)
    teacher = ClipTeacher(student)
    crops = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = student.encode_image(crops, normalize=True)
    out = teacher.crop_embeddings(crops)
    assert out.shape == expected.shape and out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, expected)
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert not {id(p) for p in teacher.model.parameters()} & {id(p) for p in student.parameters()}
    with torch.no_grad():
        for p in student.visual.parameters():
            p.add_(0.5)
    torch.testing.assert_close(teacher.crop_embeddings(crops), expected)
