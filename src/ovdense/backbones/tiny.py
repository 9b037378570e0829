"""Tiny random test architectures, registered by name like timm's ``test_vit``.

``ovdense-test-vit`` is an OpenAI-style ViT (QuickGELU, patch 16, 224 px, so the native 14 x 14 grid
and every preset behave as with ViT-B/16), ``ovdense-test-vit12`` the same with ViT-B's 12 blocks (for the heads
that read blocks by number: SC-CLIP, ResCLIP) and ``ovdense-test-eva02`` an EVA02 tower (timm ``Eva`` with
sub-LN, SwiGLU, RoPE, unfused q/k/v) with open_clip's text tower. Both are a few MB and random:
for tests and smoke runs only, never a stand-in for real weights.
"""

from __future__ import annotations

import copy

import open_clip
from open_clip import factory as _oc_factory
from timm.models import register_model
from timm.models.eva import Eva

TEST_MODELS = ("ovdense-test-vit", "ovdense-test-vit12", "ovdense-test-eva02")

_TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}

_CONFIGS = {
    "ovdense-test-vit": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 3, "width": 64, "head_width": 16, "patch_size": 16},
        "text_cfg": _TEXT_CFG,
    },
    "ovdense-test-vit12": {
        "embed_dim": 32,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 64, "head_width": 16, "patch_size": 16},
        "text_cfg": _TEXT_CFG,
    },
    "ovdense-test-eva02": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 224,
            "timm_model_name": "ovdense_test_eva02_clip_224",
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": _TEXT_CFG,
        "custom_text": True,
    },
}


@register_model
def ovdense_test_eva02_clip_224(pretrained: bool = False, **kwargs) -> Eva:
    """A 3-block, width-64 EVA02-CLIP-style trunk (random init only)."""
    if pretrained:
        raise ValueError("ovdense_test_eva02_clip_224 is a random test architecture; it has no weights")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(
        img_size=224,
        patch_size=16,
        embed_dim=64,
        depth=3,
        num_heads=4,
        qkv_fused=False,
        mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True,
        scale_mlp=True,
        scale_attn_inner=True,
        use_rot_pos_emb=True,
        ref_feat_shape=(16, 16),
        global_pool="token",
    )
    args.update(kwargs)
    return Eva(**args)


def register_test_models() -> None:
    """Make the tiny architectures known to open_clip (idempotent)."""
    for name, cfg in _CONFIGS.items():
        if name not in _oc_factory._MODEL_CONFIGS:
            _oc_factory._MODEL_CONFIGS[name] = copy.deepcopy(cfg)


def is_test_model(name: str) -> bool:
    return name in TEST_MODELS


register_test_models()
assert all(name in open_clip.list_models() for name in TEST_MODELS)
