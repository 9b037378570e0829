"""Native-resolution VFMs (ovdense.vfm_native): CorrCLIPv2's input rules, RADIO's remote-code opt-in, loading."""

from __future__ import annotations

import json
import sys
import time
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import hub_server
from ovdense.errors import InvalidArgumentError, OvdenseError, RandomWeightsWarning
from ovdense.vfm_native import (
    DENSE_VFM_MODELS,
    RADIO_MODELS,
    TEST_DENSE_VFM_MODELS,
    load_dense_vfm,
    nearest_patch_multiple,
)

hf_hub = hub_server.hf_hub  # the loopback hub fixture


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _unit(image: np.ndarray) -> torch.Tensor:
    """1 x 3 x H x W in [0, 1], written out (ToTensor)."""
    return torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """B x (prefix + h*w) x C -> B x C x h x w."""
    return tokens[:, prefix:].transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


def _load(name: str, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return load_dense_vfm(name, device="cpu", **kwargs)


# -- the resize rule ----------------------------------------------------------------------------------------------


def test_nearest_patch_multiple_is_pythons_round_with_one_patch_at_least():
    assert nearest_patch_multiple(37, 50, 16) == (32, 48)  # 2.31 -> 2, 3.13 -> 3
    assert nearest_patch_multiple(40, 56, 16) == (32, 64)  # halves to even: 2.5 -> 2, 3.5 -> 4
    assert nearest_patch_multiple(5, 3, 14) == (14, 14)  # round -> 0: one patch
    assert nearest_patch_multiple(518, 700, 14) == (518, 700)
    assert nearest_patch_multiple(500, 375, 16) == (496, 368)  # a COCO-sized image: 31.25 -> 31, 23.4 -> 23


# -- timm:NAME and test-timm: RADIO's input rule ---------------------------------------------------------------------


def test_timm_rule_equals_a_direct_timm_call_on_the_resized_input():
    vfm = _load("test-timm")
    assert (vfm.rule, vfm.patch_size, vfm.dim, vfm.mean, vfm.std) == ("timm", 16, 32, (0.5,) * 3, (0.5,) * 3)
    for h, w, grid in [(37, 50, (2, 3)), (40, 56, (2, 4)), (5, 7, (1, 1))]:
        image = _image(h, w)
        feats, ref_size = vfm.dense(image)
        assert ref_size == (h, w) and feats.dtype == torch.float32 and feats.shape == (1, 32, *grid)
        x = F.interpolate(_unit(image), size=(grid[0] * 16, grid[1] * 16), mode="bilinear", align_corners=False)
        with torch.no_grad():
            tokens = vfm.model.forward_features(_norm(x, (0.5,) * 3, (0.5,) * 3))
        assert torch.allclose(feats, _grid(tokens, 1, *grid), atol=1e-5, rtol=1e-5)


def test_timm_name_loads_a_local_file_strictly(tmp_path):
    model = timm.create_model("test_vit", num_classes=0, dynamic_img_size=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    path = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    vfm = load_dense_vfm("timm:test_vit", checkpoint=path, device="cpu")
    assert (vfm.rule, vfm.patch_size, vfm.source) == ("timm", 16, str(path))
    assert vfm.mean == tuple(timm.models.get_pretrained_cfg("test_vit").mean)
    image = _image(70, 45, seed=3)
    feats, _ = vfm.dense(image)
    x = F.interpolate(_unit(image), size=(64, 48), mode="bilinear", align_corners=False)  # 4.4 -> 4, 2.8 -> 3
    with torch.no_grad():
        tokens = model.forward_features(_norm(x, vfm.mean, vfm.std))
    assert torch.allclose(feats, _grid(tokens, 1, 4, 3), atol=1e-5, rtol=1e-5)
    # A file of another architecture: one line naming what does not fit.
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in _load("test-timm").model.state_dict().items()}, str(other))
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm("timm:test_vit", checkpoint=other, device="cpu")
    assert "does not fit" in _one_line_error(e)


# -- dinov2 / dinov3: normalise, then resize ------------------------------------------------------------------------


@pytest.mark.parametrize("name, patch, prefix", [("test-dinov2", 14, 5), ("test-dinov3", 16, 5)])
def test_dino_rule_normalises_then_resizes_to_patch_multiples(name, patch, prefix):
    vfm = _load(name)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert (vfm.rule, vfm.patch_size, vfm.mean, vfm.std) == ("dino", patch, mean, std)
    assert vfm.model.num_prefix_tokens == prefix  # cls + 4 registers, dropped
    for h, w in [(37, 50), (2 * patch, 3 * patch), (4, 9)]:
        image = _image(h, w, seed=h)
        feats, ref_size = vfm.dense(image)
        gh, gw = nearest_patch_multiple(h, w, patch)
        x = _norm(_unit(image), mean, std)
        if (gh, gw) != (h, w):
            x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False)
        with torch.no_grad():
            tokens = vfm.model.forward_features(x)  # timm's position rule = DINOv2 hub's *_reg rule (test_vfm)
        assert ref_size == (h, w) and feats.shape == (1, 32, gh // patch, gw // patch)
        assert torch.allclose(feats, _grid(tokens, prefix, gh // patch, gw // patch), atol=1e-5, rtol=1e-5)


def test_dinov3_checkpoint_round_trip_and_misfit(tmp_path):
    vfm = _load("test-dinov3")
    with torch.no_grad():
        for p in vfm.model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "dinov3.pt"
    torch.save(vfm.model.state_dict(), path)
    loaded = _load("test-dinov3", checkpoint=path)
    image = _image(33, 47)
    assert torch.equal(loaded.dense(image)[0], vfm.dense(image)[0])
    assert not torch.allclose(_load("test-dinov3").dense(image)[0], vfm.dense(image)[0])
    with pytest.raises(OvdenseError) as e:
        _load("test-pe", checkpoint=path)
    assert "does not fit" in _one_line_error(e)


# -- pe: no resize, PE's own position rules ---------------------------------------------------------------------------


def test_pe_rule_no_resize_bilinear_table_and_integer_rope_positions():
    vfm = _load("test-pe")
    assert (vfm.rule, vfm.patch_size, vfm.mean, vfm.std) == ("pe", 14, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        vfm.model.pos_embed.normal_()  # a table that matters
    image = _image(50, 75, seed=5)  # grid 3 x 5; the last 8 rows and 5 columns are never seen
    feats, ref_size = vfm.dense(image)
    assert ref_size == (50, 75) and feats.shape == (1, 32, 3, 5)
    state = vfm.model.state_dict()

    # The authors' PE at this grid, written with timm at a fixed input size: the table resized bilinearly
    # (PE's _sample_abs_posemb) and RoPE at positions 1..n (ref_feat_shape = the grid itself: no rescaling).
    ref = timm.create_model(
        "vit_pe_spatial_large_patch14_448", img_size=(42, 70), embed_dim=32, depth=2, num_heads=2,
        ref_feat_shape=(3, 5), num_classes=0,
    ).eval()  # fmt: skip
    table = state["pos_embed"][:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(3, 5), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    ref.load_state_dict({**state, "pos_embed": torch.cat([state["pos_embed"][:, :1], table.reshape(1, 15, 32)], 1)})
    x = _norm(_unit(image)[..., :42, :70], (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        expected = _grid(ref.forward_features(x), 1, 3, 5)
    assert torch.allclose(feats, expected, atol=1e-5, rtol=1e-5)

    # timm's own dynamic-size route (bicubic antialiased table, RoPE rescaled onto the 32 x 32 pretraining grid)
    # gives other features: the rule matters.
    own = timm.create_model(
        "vit_pe_spatial_large_patch14_448", img_size=56, embed_dim=32, depth=2, num_heads=2, num_classes=0,
        dynamic_img_size=True,
    ).eval()  # fmt: skip
    own.load_state_dict(state)
    with torch.no_grad():
        timm_feats = _grid(own.forward_features(x), 1, 3, 5)
    assert (timm_feats - feats).abs().max() > 1e-2


def test_pe_refuses_an_image_smaller_than_a_patch():
    vfm = _load("test-pe")
    with pytest.raises(InvalidArgumentError) as e:
        vfm.dense(_image(10, 40))
    assert "smaller than one 14 x 14 patch" in _one_line_error(e)


# -- RADIO: the opt-in and the transformers remote-code route ---------------------------------------------------------

_TINY_RADIO_CODE = '''
import torch
from transformers import PretrainedConfig, PreTrainedModel


class TinyRadioConfig(PretrainedConfig):
    model_type = "ovdense_tiny_radio"

    def __init__(self, patch=16, width=8, **kwargs):
        self.patch = patch
        self.width = width
        super().__init__(**kwargs)


class TinyRadioModel(PreTrainedModel):
    """RADIO's HF interface in small: input in [0, 1], conditioned inside; (summary, patch features) out."""

    config_class = TinyRadioConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Linear(3 * config.patch**2, config.width)
        self.summary = torch.nn.Parameter(torch.zeros(2, config.width))
        self.register_buffer("norm_mean", torch.zeros(3, 1, 1))
        self.register_buffer("norm_std", torch.ones(3, 1, 1))
        self.post_init()

    @property
    def patch_size(self):
        return self.config.patch

    def get_nearest_supported_resolution(self, height, width):
        p = self.config.patch
        return max(p, int(round(height / p)) * p), max(p, int(round(width / p)) * p)

    def forward(self, x):
        p = self.config.patch
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError("the input resolution must be a multiple of the patch size")
        x = (x - self.norm_mean) / self.norm_std
        b, c, h, w = x.shape
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)
        tokens = torch.cat([self.summary.expand(b, -1, -1), self.embed(patches)], dim=1)
        return tokens[:, 0], tokens[:, 2:]  # summary, patch tokens (summary + register dropped)
'''


def _tiny_radio_files() -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """A transformers remote-code repo: config.json with auto_map, the code, and weights."""
    torch.manual_seed(7)
    weights = {
        "embed.weight": torch.randn(8, 3 * 16 * 16) * 0.05,
        "embed.bias": torch.randn(8),
        "summary": torch.randn(2, 8),
        "norm_mean": torch.tensor([0.48, 0.46, 0.41]).view(3, 1, 1),
        "norm_std": torch.tensor([0.27, 0.26, 0.28]).view(3, 1, 1),
    }
    from safetensors.torch import save

    config = {
        "model_type": "ovdense_tiny_radio",
        "architectures": ["TinyRadioModel"],
        "patch": 16,
        "width": 8,
        "auto_map": {
            "AutoConfig": "modeling_tiny_radio.TinyRadioConfig",
            "AutoModel": "modeling_tiny_radio.TinyRadioModel",
        },
    }
    return {
        "config.json": json.dumps(config).encode(),
        "modeling_tiny_radio.py": _TINY_RADIO_CODE.encode(),
        "model.safetensors": save(weights),
    }, weights


def _radio_expected(image: np.ndarray, weights: dict, size: tuple[int, int]) -> torch.Tensor:
    """RADIO's rule written out: [0, 1], bilinear to ``size``, (x - mean) / std, patches -> linear, on the grid."""
    x = F.interpolate(_unit(image), size=size, mode="bilinear", align_corners=False)
    x = (x - weights["norm_mean"]) / weights["norm_std"]
    h, w = size[0] // 16, size[1] // 16
    patches = x.reshape(1, 3, h, 16, w, 16).permute(0, 2, 4, 1, 3, 5).reshape(1, h * w, -1)
    tokens = patches @ weights["embed.weight"].T + weights["embed.bias"]
    return tokens.transpose(1, 2).reshape(1, 8, h, w)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code to HF_MODULES_CACHE and puts it on sys.path: a fresh one per test."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path / "hf_modules"


@pytest.mark.parametrize("name", sorted(RADIO_MODELS))
def test_radio_refuses_without_the_remote_code_opt_in(name, tmp_path):
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm(name, checkpoint=tmp_path, device="cpu")
    assert time.monotonic() - start < 5
    msg = _one_line_error(e)
    assert RADIO_MODELS[name].repo in msg and "--trust-remote-code" in msg and "trust_remote_code=True" in msg
    assert "NVIDIA Source Code License-NC" in msg
    if name == "radiov3":
        assert "NVIDIA Open Model License" in msg


def test_radio_remote_code_from_a_local_folder(tmp_path, modules_cache):
    files, weights = _tiny_radio_files()
    folder = tmp_path / "tiny_radio_folder"
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    vfm = load_dense_vfm("radiov3", checkpoint=folder, device="cpu", trust_remote_code=True)
    assert (vfm.rule, vfm.patch_size, vfm.dim, vfm.mean, vfm.source) == ("radio", 16, 8, None, str(folder))
    for h, w, size in [(37, 50, (32, 48)), (40, 56, (32, 64)), (6, 9, (16, 16))]:
        image = _image(h, w, seed=h + w)
        feats, ref_size = vfm.dense(image)
        assert ref_size == (h, w) and feats.dtype == torch.float32
        assert vfm.input_size(h, w) == size
        assert torch.allclose(feats, _radio_expected(image, weights, size), atol=1e-5, rtol=1e-5)
    # A file is not a model folder.
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm("radiov3", checkpoint=folder / "model.safetensors", device="cpu", trust_remote_code=True)
    assert "is a file" in _one_line_error(e)


def test_radio_remote_code_without_post_init_loads(tmp_path, modules_cache):
    """RADIO's hub code of its v2.5 / C-RADIOv3 releases never calls post_init(), which transformers 5 needs."""
    files, weights = _tiny_radio_files()
    code = files["modeling_tiny_radio.py"].decode()
    assert "        self.post_init()\n" in code
    files["modeling_tiny_radio.py"] = code.replace("        self.post_init()\n", "").encode()
    folder = tmp_path / "old_radio_code"
    folder.mkdir()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    vfm = load_dense_vfm("radiov3", checkpoint=folder, device="cpu", trust_remote_code=True)
    image = _image(37, 50, seed=3)
    assert torch.allclose(vfm.dense(image)[0], _radio_expected(image, weights, (32, 48)), atol=1e-5, rtol=1e-5)
    assert type(vfm.model).__name__ == "TinyRadioModel"


def test_radio_remote_code_from_the_hub(hf_hub, modules_cache):
    files, weights = _tiny_radio_files()
    for fname, data in files.items():
        hf_hub.add_file("nvidia/C-RADIOv3-L", fname, data)
    vfm = load_dense_vfm("radiov3", device="cpu", trust_remote_code=True)
    assert vfm.source == "hub nvidia/C-RADIOv3-L" and vfm.dim == 8
    image = _image(45, 31)
    assert torch.allclose(vfm.dense(image)[0], _radio_expected(image, weights, (48, 32)), atol=1e-5, rtol=1e-5)
    assert any(p.endswith("/modeling_tiny_radio.py") for p in hf_hub.seen("GET"))


def test_radio_offline_without_cache_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm("radiov3", device="cpu", trust_remote_code=True)
    assert time.monotonic() - start < 10
    msg = _one_line_error(e)
    assert "nvidia/C-RADIOv3-L" in msg and "HF_HUB_CACHE" in msg and "checkpoint=" in msg


# -- timm names offline, names, inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*DENSE_VFM_MODELS, "timm:test_vit"])
def test_timm_names_offline_without_cache_fail_fast(name, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm(name, device="cpu")
    assert time.monotonic() - start < 10
    msg = _one_line_error(e)
    timm_name = DENSE_VFM_MODELS[name][1] if name in DENSE_VFM_MODELS else "test_vit"
    assert timm_name in msg and "checkpoint=" in msg and "HF_HUB_CACHE" in msg


def test_unknown_names_and_bad_images():
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm("radiov4", device="cpu")
    msg = _one_line_error(e)
    assert "radiov3" in msg and "timm:" in msg and "test-pe" in msg
    with pytest.raises(OvdenseError) as e:
        load_dense_vfm("timm:no_such_model", device="cpu")
    assert "no_such_model" in _one_line_error(e)
    vfm = _load("test-timm")
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8)):
        with pytest.raises(InvalidArgumentError) as e:
            vfm.dense(bad)
        assert "H x W x 3 uint8" in _one_line_error(e)


def test_test_models_warn_once_and_are_named_test(monkeypatch):
    from ovdense import vfm_native

    monkeypatch.setattr(vfm_native, "_WARNED_RANDOM", set())
    assert all(name.startswith("test-") for name in TEST_DENSE_VFM_MODELS)
    with pytest.warns(RandomWeightsWarning, match="test-dinov3"):
        load_dense_vfm("test-dinov3", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        load_dense_vfm("test-dinov3", device="cpu")  # once per process
