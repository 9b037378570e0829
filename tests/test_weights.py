"""Weights files in every supported format load back to the model that wrote them; bad input fails clearly.

The tiny test architectures load with seed-0 random weights, and ``load_model(..., checkpoint=...)`` builds
its model from the same seed before loading the file. A round trip of those weights would therefore pass even
if nothing were loaded, so every file here is written from a *perturbed* copy, and the tests check that the
loaded features equal that copy's and differ from the seed-0 model's.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import time
from types import SimpleNamespace

import open_clip
import pytest
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

import hub_server
from hub_server import HubServer, point_hub_at, skip_backoff
from ovdense.backbones import tower_for
from ovdense.errors import OvdenseError
from ovdense.heads import PassInputs
from ovdense.methods import create_head
from ovdense.weights import load_model, read_checkpoint

IMAGES = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
VIT, EVA = "ovdense-test-vit", "ovdense-test-eva02"
HEADS = {VIT: ("sclip",), EVA: ("sclip", "declip")}
POS_RULE = {VIT: "sclip", EVA: "size"}  # EVA02 resizes its position table by size (see ovdense.heads)

hf_hub = hub_server.hf_hub  # the loopback hub fixture


# --- helpers ----------------------------------------------------------------------------------------
@torch.no_grad()
def dense(tower, arch: str, head: str) -> torch.Tensor:
    return create_head(head).encode_dense(tower, IMAGES, PassInputs(POS_RULE[arch]))


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with different weights (as after training)."""
    model = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


class Reference(SimpleNamespace):
    """A perturbed model, its state dict and its dense features per head (``feats``), and the seed-0 ones."""


def make_reference(base, arch: str, seed: int) -> Reference:
    model = perturbed(base.model, seed)
    tower = tower_for(model)
    return Reference(
        arch=arch,
        model=model,
        state_dict={k: v.detach().clone() for k, v in model.state_dict().items()},
        feats={h: dense(tower, arch, h) for h in HEADS[arch]},
        random_feats={h: dense(base.tower, arch, h) for h in HEADS[arch]},
    )


@pytest.fixture(scope="module")
def vit_ref(tiny_vit):
    return make_reference(tiny_vit, VIT, seed=1)


@pytest.fixture(scope="module")
def eva_ref(tiny_eva):
    return make_reference(tiny_eva, EVA, seed=2)


@pytest.fixture
def ref(request):
    return request.getfixturevalue({VIT: "vit_ref", EVA: "eva_ref"}[request.param])


def assert_same_model(loaded, ref: Reference) -> None:
    """Same weights and the same dense features as the reference (and not the seed-0 ones)."""
    assert loaded.model_name == ref.arch
    got = loaded.model.state_dict()
    assert set(got) == set(ref.state_dict)
    for key, value in ref.state_dict.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key
    for head, expected in ref.feats.items():
        feats = dense(loaded.tower, ref.arch, head)
        assert feats.shape == (2, 32, 14, 14)
        torch.testing.assert_close(feats, expected, rtol=0, atol=1e-6)
        assert not torch.allclose(feats, ref.random_feats[head], atol=1e-3), "the weights were not loaded"


def save_safetensors(state_dict: dict, path) -> None:
    # safetensors refuses shared or non-contiguous storage: give each tensor its own.
    save_file({k: v.detach().clone().contiguous() for k, v in state_dict.items()}, str(path))


def to_eva_clip_layout(ref: Reference) -> dict:
    """The EVA-CLIP (DeCLIP release) layout of an open_clip EVA02 model: the inverse of timm's
    ``eva.checkpoint_filter_fn`` for the trunk, ``text.*`` as is, and ``logit_scale``."""
    renames = (
        ("attn.q_proj.bias", "attn.q_bias"),
        ("attn.v_proj.bias", "attn.v_bias"),
        ("attn.norm.", "attn.inner_attn_ln."),
        ("mlp.norm.", "mlp.ffn_ln."),
        ("mlp.fc1_g.", "mlp.w1."),
        ("mlp.fc1_x.", "mlp.w2."),
        ("mlp.fc2.", "mlp.w3."),
    )
    out = {}
    for key, value in ref.model.visual.trunk.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        out["visual." + key] = value.clone()
    # EVA-CLIP files carry the RoPE tables as buffers; timm recomputes them, the filter drops them.
    out["visual.rope.freqs_cos"] = torch.randn(196, 16)
    out["visual.rope.freqs_sin"] = torch.randn(196, 16)
    out.update({"text." + k: v.clone() for k, v in ref.model.text.state_dict().items()})
    out["logit_scale"] = ref.model.logit_scale.detach().clone()
    return out


def trace_openai_archive(model: torch.nn.Module, path) -> None:
    """An OpenAI-style TorchScript archive: the traced CLIP, with the ``input_resolution``,
    ``context_length`` and ``vocab_size`` entries OpenAI's archives carry in their state dict."""
    model = copy.deepcopy(model).eval()
    for name, value in (("input_resolution", 224), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(name, None)  # open_clip keeps the last two as plain ints
        model.register_buffer(name, torch.tensor(value))
    # OpenAI's text mask is a constant of the graph, not a buffer: keep it out of the state dict.
    mask = model._buffers.pop("attn_mask")
    model.attn_mask = mask
    text = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traced = torch.jit.trace(model, (IMAGES[:1], text), check_trace=False)
    torch.jit.save(traced, str(path))


def hub_config(arch: str) -> str:
    return json.dumps(
        {
            "model_cfg": open_clip.get_model_config(arch),
            "preprocess_cfg": {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)},
        }
    )


# --- round trips ------------------------------------------------------------------------------------
def test_openai_layout_state_dict_pt(vit_ref, tmp_path):
    # open_clip's CLIP uses OpenAI's key names: a plain torch.save of its state dict is the OpenAI layout.
    openai_keys = {"positional_embedding", "text_projection", "visual.proj", "visual.conv1.weight"}
    assert openai_keys <= set(vit_ref.state_dict)
    path = tmp_path / "ViT-tiny.pt"
    torch.save(vit_ref.state_dict, path)
    assert read_checkpoint(path)[1] == "torch"
    loaded = load_model(VIT, checkpoint=path)
    assert_same_model(loaded, vit_ref)
    assert loaded.activation == "quick_gelu"
    assert "open_clip layout" in loaded.source and "torch" in loaded.source


@pytest.mark.parametrize("ref", [VIT, EVA], indirect=True)
def test_open_clip_pytorch_model_bin(ref, tmp_path):
    path = tmp_path / "open_clip_pytorch_model.bin"
    torch.save(ref.state_dict, path)
    assert_same_model(load_model(ref.arch, checkpoint=path), ref)


@pytest.mark.parametrize("ref", [VIT, EVA], indirect=True)
def test_safetensors(ref, tmp_path):
    path = tmp_path / "open_clip_model.safetensors"
    save_safetensors(ref.state_dict, path)
    assert read_checkpoint(path)[1] == "safetensors"
    loaded = load_model(ref.arch, checkpoint=path)
    assert_same_model(loaded, ref)
    assert "safetensors" in loaded.source


def test_weights_file_as_pretrained(vit_ref, tmp_path):
    path = tmp_path / "weights.safetensors"
    save_safetensors(vit_ref.state_dict, path)
    assert_same_model(load_model(VIT, pretrained=str(path)), vit_ref)


def test_open_clip_training_checkpoint(vit_ref, tmp_path):
    # open_clip's training script saves {'epoch', 'name', 'state_dict' (DDP: 'module.' keys), 'optimizer'}.
    model = copy.deepcopy(vit_ref.model)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    checkpoint = {
        "epoch": 32,
        "name": "tiny",
        "state_dict": {"module." + k: v for k, v in vit_ref.state_dict.items()},
        "optimizer": optim.state_dict(),
    }
    path = tmp_path / "epoch_32.pt"
    torch.save(checkpoint, path)
    assert_same_model(load_model(VIT, checkpoint=path), vit_ref)


def test_fp16_state_dict_loads_into_fp32(vit_ref, tmp_path):
    # OpenAI's and many released weights are fp16: they load into the fp32 model, rounded.
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in vit_ref.state_dict.items()}, path)
    loaded = load_model(VIT, checkpoint=path)
    for key, value in loaded.model.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, vit_ref.state_dict[key].half().float()), key


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_openai_torchscript_archive(vit_ref, tmp_path):
    path = tmp_path / "ViT-tiny-jit.pt"
    trace_openai_archive(vit_ref.model, path)
    state_dict, fmt = read_checkpoint(path)
    assert fmt == "openai-jit"
    assert set(state_dict) == set(vit_ref.state_dict)  # the three OpenAI extras are dropped
    loaded = load_model(VIT, checkpoint=path)
    assert loaded.activation == "quick_gelu"
    assert any(isinstance(m, open_clip.transformer.QuickGELU) for m in loaded.model.modules())
    assert "openai-jit" in loaded.source
    assert_same_model(loaded, vit_ref)


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
def test_eva_clip_layout(eva_ref, tmp_path, prefix):
    state_dict = to_eva_clip_layout(eva_ref)
    assert "visual.blocks.0.attn.q_bias" in state_dict and "visual.blocks.0.mlp.w3.weight" in state_dict
    path = tmp_path / "declip_eva02.pth"
    torch.save({"state_dict": {prefix + k: v for k, v in state_dict.items()}}, path)
    loaded = load_model(EVA, checkpoint=path)
    assert "eva-clip layout" in loaded.source
    assert loaded.activation == "swiglu"
    assert_same_model(loaded, eva_ref)


def test_eva_clip_layout_without_text_tower(eva_ref, tmp_path):
    state_dict = {k: v for k, v in to_eva_clip_layout(eva_ref).items() if not k.startswith("text.")}
    path = tmp_path / "visual_only.pth"
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(OvdenseError, match=r"no text tower \(text\.\*\).*--pretrained"):
        load_model(EVA, checkpoint=path)


# --- hf-hub: repos through the loopback hub -----------------------------------------------------------
REPO = "ovdense-test/tiny-vit"


def test_hf_hub_repo(hf_hub, vit_ref, tmp_path, monkeypatch):
    hf_hub.add_file(REPO, "open_clip_config.json", hub_config(VIT))
    save_safetensors(vit_ref.state_dict, tmp_path / "w.safetensors")
    hf_hub.add_file(REPO, "open_clip_model.safetensors", tmp_path / "w.safetensors")

    loaded = load_model("hf-hub:" + REPO)
    assert loaded.source == "hf-hub:" + REPO
    assert loaded.activation == "quick_gelu"
    loaded.model_name = VIT  # for assert_same_model
    assert_same_model(loaded, vit_ref)
    # huggingface_hub asks for metadata (HEAD) then bytes (GET) of the config, then of the safetensors
    # weights (open_clip's first choice), and nothing else: no /api calls, no .bin.
    base = f"/{REPO}/resolve/main/"
    assert hf_hub.seen("GET") == [base + "open_clip_config.json", base + "open_clip_model.safetensors"]
    assert set(hf_hub.seen("HEAD")) == {base + "open_clip_config.json", base + "open_clip_model.safetensors"}
    assert all(r.headers.get("accept-encoding") == "identity" for r in hf_hub.requests if r.method == "HEAD")
    snapshot = tmp_path / "hf_cache" / "models--ovdense-test--tiny-vit" / "snapshots" / hf_hub.commit(REPO)
    assert (snapshot / "open_clip_model.safetensors").is_file()

    # Hub down: the client falls back to the cached snapshot of refs/main (no retry: the file is cached).
    hf_hub.stop()
    start = time.monotonic()
    again = load_model("hf-hub:" + REPO)
    assert time.monotonic() - start < 5
    again.model_name = VIT
    assert_same_model(again, vit_ref)

    # Offline mode: the same, without trying the network.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = load_model("hf-hub:" + REPO)
    offline.model_name = VIT
    assert_same_model(offline, vit_ref)


def test_hf_hub_repo_with_pytorch_bin(hf_hub, vit_ref, tmp_path, monkeypatch):
    # Repos from before safetensors: open_clip asks for open_clip_model.safetensors, gets EntryNotFound
    # (which the client caches under .no_exist/), and falls back to open_clip_pytorch_model.bin.
    hf_hub.add_file(REPO, "open_clip_config.json", hub_config(VIT))
    torch.save(vit_ref.state_dict, tmp_path / "w.bin")
    hf_hub.add_file(REPO, "open_clip_pytorch_model.bin", tmp_path / "w.bin")
    loaded = load_model("hf-hub:" + REPO)
    loaded.model_name = VIT
    assert_same_model(loaded, vit_ref)
    base = f"/{REPO}/resolve/main/"
    assert base + "open_clip_model.safetensors" in hf_hub.seen("HEAD")
    assert base + "open_clip_model.safetensors" not in hf_hub.seen("GET")
    assert base + "open_clip_pytorch_model.bin" in hf_hub.seen("GET")
    no_exist = tmp_path / "hf_cache" / "models--ovdense-test--tiny-vit" / ".no_exist" / hf_hub.commit(REPO)
    assert (no_exist / "open_clip_model.safetensors").exists()

    # Hub answering 503: the client falls back to the cached config and .bin. The .no_exist marker does not
    # spare the safetensors: not cached, so the client retries it with backoff (1+2+4+8+8 s, skipped here)
    # before open_clip moves on to the .bin.
    skip_backoff(monkeypatch)
    hf_hub.clear()
    hf_hub.fail_status = 503
    again = load_model("hf-hub:" + REPO)
    again.model_name = VIT
    assert_same_model(again, vit_ref)
    assert hf_hub.seen("GET") == []
    assert hf_hub.seen("HEAD").count(base + "open_clip_model.safetensors") > 1
    assert hf_hub.seen("HEAD").count(base + "open_clip_pytorch_model.bin") == 1


def test_hf_hub_repo_lfs_redirect(hf_hub, eva_ref, tmp_path):
    # As on huggingface.co: weights answer the HEAD with a 302 to another host and X-Linked-Etag/-Size.
    hf_hub.lfs_redirect = True
    repo = "ovdense-test/tiny-eva02"
    hf_hub.add_file(repo, "open_clip_config.json", hub_config(EVA))
    save_safetensors(eva_ref.state_dict, tmp_path / "w.safetensors")
    hf_hub.add_file(repo, "open_clip_model.safetensors", tmp_path / "w.safetensors")
    loaded = load_model("hf-hub:" + repo)
    loaded.model_name = EVA
    assert_same_model(loaded, eva_ref)
    assert any(p.startswith(f"/blobs/{repo}/") for p in hf_hub.seen("GET"))
    assert f"/{repo}/resolve/main/open_clip_model.safetensors" not in hf_hub.seen("GET")


def assert_hub_repo_message(err: OvdenseError, repo: str) -> None:
    msg = str(err)
    assert msg.startswith(f"weights for hf-hub:{repo} (hub repo) are not in the local cache and could not be")
    assert f"open_clip.create_model('hf-hub:{repo}')" in msg and "--checkpoint" in msg
    assert "\n" not in msg


def test_hf_hub_repo_without_weights(hf_hub):
    # open_clip itself only logs a warning when a hub repo's weights cannot be had, and returns a
    # randomly initialised model: load_model must refuse instead.
    hf_hub.add_file(REPO, "open_clip_config.json", hub_config(VIT))
    with pytest.raises(OvdenseError, match=r"Required pretrained weights .* could not be loaded") as info:
        load_model("hf-hub:" + REPO)
    assert_hub_repo_message(info.value, REPO)
    base = f"/{REPO}/resolve/main/"
    weights = {base + "open_clip_model.safetensors", base + "open_clip_pytorch_model.bin"}
    assert weights <= set(hf_hub.seen("HEAD"))


def test_hf_hub_unknown_repo(hf_hub):
    with pytest.raises(OvdenseError) as info:
        load_model("hf-hub:ovdense-test/nope")
    assert_hub_repo_message(info.value, "ovdense-test/nope")
    assert hf_hub.seen() and all(p.startswith("/ovdense-test/nope/resolve/main/") for p in hf_hub.seen())


def test_hf_hub_repo_offline_without_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OvdenseError) as info:
        load_model("hf-hub:" + REPO)
    assert_hub_repo_message(info.value, REPO)


# --- bad input ----------------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(OvdenseError, match=r"^checkpoint not found: .*nope\.pt$"):
        load_model(VIT, checkpoint=path)


def test_corrupt_pt(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(OvdenseError, match=r"^cannot read checkpoint .*garbage\.pt: ") as info:
        load_model(VIT, checkpoint=path)
    assert "\n" not in str(info.value)


def test_truncated_safetensors(vit_ref, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_safetensors(vit_ref.state_dict, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(OvdenseError, match=r"^cannot read checkpoint .*cut\.safetensors: ") as info:
        load_model(VIT, checkpoint=path)
    assert "\n" not in str(info.value)


def test_pickle_without_tensors(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "name": "x"}, path)
    with pytest.raises(OvdenseError, match=r"holds no state dict of tensors"):
        load_model(VIT, checkpoint=path)


def test_vit_weights_into_eva02(vit_ref, tmp_path):
    path = tmp_path / "vit.safetensors"
    save_safetensors(vit_ref.state_dict, path)
    with pytest.raises(OvdenseError, match=r"^checkpoint does not fit ovdense-test-eva02: \d+ missing keys"):
        load_model(EVA, checkpoint=path)


def test_eva02_weights_into_vit(eva_ref, tmp_path):
    path = tmp_path / "eva.safetensors"
    save_safetensors(eva_ref.state_dict, path)
    with pytest.raises(OvdenseError, match=r"^checkpoint does not fit ovdense-test-vit: \d+ missing keys"):
        load_model(VIT, checkpoint=path)
    path = tmp_path / "eva_clip.pth"
    torch.save({"state_dict": to_eva_clip_layout(eva_ref)}, path)
    with pytest.raises(OvdenseError, match=r"EVA-CLIP \(EVA02\) checkpoint; ovdense-test-vit is not an"):
        load_model(VIT, checkpoint=path)


def test_shape_mismatch(vit_ref, tmp_path):
    state_dict = dict(vit_ref.state_dict)
    state_dict["visual.proj"] = torch.zeros(64, 48)
    path = tmp_path / "wide.pt"
    torch.save(state_dict, path)
    with pytest.raises(OvdenseError, match=r"fit ovdense-test-vit: size mismatch for visual\.proj") as info:
        load_model(VIT, checkpoint=path)
    assert "\n" not in str(info.value)


def test_unknown_model():
    with pytest.raises(OvdenseError, match=r"unknown model 'ViT-Q-99'.*list-models"):
        load_model("ViT-Q-99", pretrained="openai")


def test_model_without_dense_head():
    with pytest.raises(OvdenseError, match=r"RN50.* has no dense head"):
        load_model("RN50", pretrained="openai")


def test_unknown_pretrained_tag_lists_tags_without_network(hf_hub, monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("create_model must not run for an unknown tag")

    monkeypatch.setattr(open_clip, "create_model", no_build)
    with pytest.raises(OvdenseError, match=r"unknown pretrained tag 'openia' for ViT-B-16; available: ") as e:
        load_model("ViT-B-16", pretrained="openia")
    assert "openai" in str(e.value) and "laion2b_s34b_b88k" in str(e.value)
    assert hf_hub.seen() == []


def test_pretrained_tag_on_test_architecture():
    with pytest.raises(OvdenseError, match=r"random test architecture; it has no pretrained tag"):
        load_model(VIT, pretrained="openai")


def test_hf_hub_with_pretrained_tag():
    with pytest.raises(OvdenseError, match=r"drop --pretrained"):
        load_model("hf-hub:" + REPO, pretrained="openai")


def test_no_weights_for_real_architecture():
    with pytest.raises(OvdenseError, match=r"no weights given for ViT-B-16: pass pretrained= a tag \(openai"):
        load_model("ViT-B-16")


def assert_not_cached_message(err: OvdenseError) -> None:
    msg = str(err)
    assert msg.startswith("weights for ViT-B-16 (openai) are not in the local cache and could not be")
    assert "--checkpoint" in msg and "HF_HUB_CACHE" in msg and "pretrained='openai'" in msg
    assert "\n" not in msg


def test_known_tag_offline_without_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(OvdenseError) as info:
        load_model("ViT-B-16", pretrained="openai")
    assert_not_cached_message(info.value)


def test_known_tag_hub_unreachable_without_cache(tmp_path, monkeypatch):
    server = HubServer(tmp_path / "repos").start()
    point_hub_at(monkeypatch, server.url, tmp_path / "empty_cache")
    server.stop()  # the endpoint's port is closed: connection refused
    start = time.monotonic()
    with pytest.raises(OvdenseError) as info:
        load_model("ViT-B-16", pretrained="openai")
    assert_not_cached_message(info.value)
    assert "unreachable" in str(info.value)
    assert time.monotonic() - start < 10  # no minute of hub-client retries before the answer


def test_hf_hub_repo_unreachable_without_cache_fails_in_seconds(tmp_path, monkeypatch, recwarn):
    server = HubServer(tmp_path / "repos").start()
    point_hub_at(monkeypatch, server.url, tmp_path / "empty_cache")
    server.stop()  # connection refused, and offline mode is off: the hub client would retry for a minute
    start = time.monotonic()
    with pytest.raises(OvdenseError) as info:
        load_model("hf-hub:" + REPO)
    assert time.monotonic() - start < 10
    assert_hub_repo_message(info.value, REPO)
    assert "unreachable" in str(info.value)
    assert not recwarn.list  # no retry warnings from the hub client


def test_first_line_cuts_at_a_word_boundary():
    from ovdense.errors import first_line

    err = RuntimeError("word " * 100 + "\nsecond line")
    line = first_line(err, limit=50)
    assert line.endswith(" ...") and len(line) <= 54 and line[:-4].split(" ")[-1] == "word"
    assert first_line(RuntimeError("short\nmore")) == "short" and first_line(KeyError()) == "KeyError"
    assert first_line("x" * 300, limit=200) == "x" * 200 + " ..."  # no space at all: a hard cut


def test_known_tag_repo_missing_on_hub(hf_hub):
    # Reachable hub without the repo (401 RepoNotFound): the same message, after asking for both files.
    with pytest.raises(OvdenseError) as info:
        load_model("ViT-B-16", pretrained="openai")
    assert_not_cached_message(info.value)
    base = "/timm/vit_base_patch16_clip_224.openai/resolve/main/"
    assert hf_hub.seen("HEAD") == [base + "open_clip_model.safetensors", base + "open_clip_pytorch_model.bin"]


def test_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OvdenseError, match=r"device 'cuda' requested but CUDA is not available"):
        load_model(VIT, device="cuda")


def test_unknown_device():
    with pytest.raises(OvdenseError, match=r"unknown device 'gpu0'"):
        load_model(VIT, device="gpu0")


class _PickledByReference:  # a raw pickle of it names this module and class
    pass


class _RunsACommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling it would run os.system: read_checkpoint must refuse it unopened
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_raw_pickles_are_refused_in_our_words_without_torch_warnings(tmp_path, protocol):
    import warnings

    marker = tmp_path / "ran"
    for obj, named in ((_PickledByReference(), "test_weights._PickledByReference"), (_RunsACommand(marker), "system")):
        path = tmp_path / "raw.pt"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(OvdenseError) as info:
                read_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"checkpoint {path} is not a weights file that loads safely: it contains Python ")
        assert named in message and "safetensors" in message and "\n" not in message
        assert not caught, [str(w.message) for w in caught]  # torch's "pickle protocol 4" note stays inside
    assert not marker.exists()


def test_pickles_of_plain_values_and_non_weights_files(tmp_path):
    path = tmp_path / "numbers.pt"
    path.write_bytes(pickle.dumps([1, 2, 3], protocol=4))  # no object, yet beyond what torch's safe loader reads
    with pytest.raises(OvdenseError, match=r"is not a weights file that loads safely: it is a Python pickle"):
        read_checkpoint(path)
    path.write_text("model weights\n")
    with pytest.raises(OvdenseError, match=r"^cannot read checkpoint .*numbers\.pt: not a PyTorch weights file"):
        read_checkpoint(path)
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert read_checkpoint(legacy)[0]["w"].tolist() == [1.0, 1.0, 1.0]  # the old torch.save format still reads
    legacy.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises(OvdenseError, match=r"^cannot read checkpoint .*legacy\.pt: a damaged or truncated pickle"):
        read_checkpoint(legacy)
