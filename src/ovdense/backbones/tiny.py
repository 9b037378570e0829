"""Tiny random test architectures, registered by name like timm's ``test_vit``.

``ovdense-test-vit`` is an OpenAI-style ViT (QuickGELU, patch 16, 224 px, so the native 14 x 14 grid
and every preset behave as with ViT-B/16), ``ovdense-test-vit12`` the same with ViT-B's 12 blocks (for the heads
that read blocks by number: SC-CLIP, ResCLIP) and ``ovdense-test-eva02`` an EVA02 tower (timm ``Eva`` with
sub-LN, SwiGLU, RoPE, unfused q/k/v) with open_clip's text tower. All are a few MB and random:
for tests and smoke runs only, never a stand-in for real weights. Their open_clip configs are the JSON files of
``test_model_configs/``.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
from timm.models import register_model
from timm.models.eva import Eva

TEST_MODELS = ("ovdense-test-vit", "ovdense-test-vit12", "ovdense-test-eva02")

#: The open_clip configs of the test archs, one ``<name>.json`` each (shipped as package data).
CONFIG_DIR = Path(__file__).parent / "test_model_configs"


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
    """Make the tiny architectures known to open_clip (idempotent): :data:`CONFIG_DIR` through
    ``open_clip.add_model_config``, once."""
    if not all(name in open_clip.list_models() for name in TEST_MODELS):
        open_clip.add_model_config(CONFIG_DIR)


def is_test_model(name: str) -> bool:
    return name in TEST_MODELS


register_test_models()
