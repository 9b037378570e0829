"""Teachers of the distillation objectives: Stable Diffusion (diffusers), frozen CLIP (the VFM: test_vfm.py)."""

from __future__ import annotations

import copy
import sys
import time

import pytest
import torch

from ovdense.errors import OvdenseError
from ovdense.train import teachers
from ovdense.train.teachers import ClipTeacher, load_sd, resize_attention
from ovdense.train.tiny_teachers import save_tiny_sd


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


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
