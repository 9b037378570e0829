"""The contract every registered head meets, run over the registry: a new method gets these tests with no edit.

On the 12-block test ViT (heads that read blocks by number need it), with a test VFM and test region masks. A toy
head registered in this file shows that a method is one registration: the registry, ``list-methods``, ``--method``
and this contract pick it up (registered while this module's tests run, so other tests see the built-ins only).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.cli import main
from ovdense.heads import DenseHead, PassInputs, TextQuery
from ovdense.methods import (
    builtin_methods,
    create_head,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from ovdense.text import build_text_classifier
from ovdense.vfm import load_vfm
from ovdense.vfm_map import VfmImageMap
from ovdense.weights import load_model


class ToyValueHead(DenseHead):
    """y = gain · out_proj(v): the value path without residual or FFN.

    Args:
        gain: how much the value path is scaled.
    """

    def __init__(self, gain: float = 2.0):
        self.gain = gain

    def last_block(self, tower, x, context):
        _, _, v = tower.qkv(tower.last_norm1(x))
        context.record(torch.eye(v.shape[2]).expand(len(v), 1, -1, -1))
        return tower.attn_out(v) * self.gain


# The registered dense heads (not the methods with a model of their own: sam3) and the toy above.
METHODS = [*(n for n in list_methods() if not get_method(n).own_model), "toy_value"]


@pytest.fixture(scope="module", autouse=True)
def toy_registered():
    register_method(
        "toy_value",
        summary="toy test head: the last block's value path, scaled, no residual (tests/test_contract.py)",
        defaults={"crop": 0},
    )(ToyValueHead)
    yield
    unregister_method("toy_value")


IMAGES = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))  # SC-CLIP's LOF needs > 30 patches


@pytest.fixture(scope="module")
def vit12():
    return load_model("ovdense-test-vit12", device="cpu")


@pytest.fixture(scope="module")
def dinos():
    """Two test DINOs with different weights."""
    dino = load_vfm("test-dino", device="cpu")
    other = copy.deepcopy(dino)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return dino, other


@pytest.fixture(scope="module")
def text(vit12):
    classes = "sky; grass; a dog, a puppy; a red car"
    return build_text_classifier(vit12.model, vit12.tokenizer, classes, cache_dir=False, device="cpu").embeddings


def region_ids(seed: int) -> torch.Tensor:
    """2 x 96 x 128 region ids: a few rectangles and an unsegmented rest (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2, 96, 128, dtype=torch.long)
    for b in range(2):
        for region in range(1, 5):
            y, x = (int(v) for v in torch.randint(0, 64, (2,), generator=g))
            ids[b, y : y + 32, x : x + 48] = region
    return ids


def native_map(vfm) -> VfmImageMap | None:
    """CorrCLIPv2's per-image VFM map standing in for a test DINO (a different one for each DINO)."""
    if vfm is None:
        return None
    grid = torch.randn(1, 16, 9, 11, generator=torch.Generator().manual_seed(id(vfm) % 1000))
    return VfmImageMap(grid, (96, 128))


#: Each window pixel's place in the 96 x 128 image (both test images are whole windows).
COORDS = torch.stack(torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij"))[None].expand(2, -1, -1, -1)


def pass_inputs(spec, text, vfm, masks) -> PassInputs:
    """Inputs with ``vfm`` as the head takes it: the VFM itself, or for a native-VFM head its map of the image."""
    if spec.native_vfm:
        coords = COORDS if masks is None else COORDS[: len(masks)]
        return PassInputs("sclip", text=text, masks=masks, vfm_map=native_map(vfm), pixel_coords=coords)
    return PassInputs("sclip", text=text, vfm=vfm, masks=masks)


def full_inputs(spec, text, vfm, masks) -> PassInputs:
    """Everything a head may need: it must ignore what it does not declare."""
    return pass_inputs(spec, TextQuery(text, 40.0), vfm, masks)


@pytest.mark.parametrize("method", METHODS)
def test_dense_features_have_the_declared_shape_and_unit_norm(method, vit12, dinos, text):
    spec = get_method(method)
    head = create_head(method)
    assert head.name == method and type(head).__module__ + ":" + type(head).__qualname__ == spec.head
    with torch.no_grad():
        feats, ctx = head.run(vit12.tower, IMAGES, full_inputs(spec, text, dinos[0], region_ids(0)),
                              record_attention=True)  # fmt: skip
    h, w = ctx.output_grid
    # Test DINO: /8 patches; native VFM heads: twice the CLIP grid (the same here); the ViT: /16.
    grid = (96 // 8, 128 // 8) if spec.uses_vfm else (96 // 16, 128 // 16)
    assert (h, w) == grid and ctx.grid == (6, 8)
    assert feats.shape == (2, vit12.model.visual.output_dim, h, w)
    assert torch.isfinite(feats).all()
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(2, h, w), atol=1e-5, rtol=0)
    if ctx.head_attention is not None:
        tokens = h * w + (vit12.tower.num_prefix_tokens if head.output_has_prefix else 0)
        assert ctx.head_attention.shape == (2, tokens, tokens)


@pytest.mark.parametrize("method", METHODS)
def test_batching_changes_no_window(method, vit12, dinos, text):
    spec = get_method(method)
    inputs = full_inputs(spec, text, dinos[0], region_ids(1))
    head = create_head(method)
    with torch.no_grad():
        both = head.encode_dense(vit12.tower, IMAGES, inputs)
        for i in range(2):
            one = pass_inputs(spec, inputs.text, dinos[0], inputs.masks[i : i + 1])
            torch.testing.assert_close(both[i : i + 1], head.encode_dense(vit12.tower, IMAGES[i : i + 1], one),
                                       atol=2e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_declared_needs_are_required_and_used_and_the_rest_ignored(method, vit12, dinos, text):
    spec = get_method(method)
    head = create_head(method)
    base = full_inputs(spec, text, dinos[0], region_ids(2))
    other_text = torch.nn.functional.normalize(torch.randn_like(text), dim=-1)
    masks = base.masks
    changed = {
        "needs_text": pass_inputs(spec, TextQuery(other_text, 40.0), dinos[0], masks),
        "uses_vfm": pass_inputs(spec, base.text, dinos[1], masks),
        "uses_masks": pass_inputs(spec, base.text, dinos[0], region_ids(3)),
    }
    missing = {
        "needs_text": pass_inputs(spec, None, dinos[0], masks),
        "uses_vfm": pass_inputs(spec, base.text, None, masks),
        "uses_masks": pass_inputs(spec, base.text, dinos[0], None),
    }
    with torch.no_grad():
        ref = head.encode_dense(vit12.tower, IMAGES, base)
        for need in ("needs_text", "uses_vfm", "uses_masks"):
            declared = getattr(spec, need)
            assert getattr(head, need) == declared
            if declared:
                with pytest.raises(ValueError, match=f"the {method} head"):
                    head.encode_dense(vit12.tower, IMAGES, missing[need])
                out = head.encode_dense(vit12.tower, IMAGES, changed[need])
                assert out.shape != ref.shape or not torch.allclose(out, ref, atol=1e-4), (method, need, "unused")
            else:
                torch.testing.assert_close(head.encode_dense(vit12.tower, IMAGES, missing[need]), ref)


def test_the_toy_head_is_a_method_everywhere(tmp_path, capsys):
    assert "toy_value" in list_methods() and "toy_value" not in builtin_methods()
    spec = get_method("toy_value")
    assert spec.options["gain"].default == 2.0 and spec.options["gain"].help == "how much the value path is scaled."
    assert main(["list-methods"]) == 0
    assert "toy_value\ttoy test head" in capsys.readouterr().out
    image = tmp_path / "x.png"
    Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)).save(image)
    argv = ["segment", str(image), "--classes", "a; b; c", "--model", "ovdense-test-vit", "--text-cache", "off"]
    assert main([*argv, "--method", "toy_value", "--toy-value-gain", "0.5", "--out", str(tmp_path / "o")]) == 0
    settings = json.loads((tmp_path / "o" / "x.json").read_text())["settings"]
    assert settings["method"] == "toy_value" and settings["head_kwargs"] == {"gain": 0.5} and settings["crop"] == 0
