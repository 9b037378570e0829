"""CLIP image towers behind one small interface (see :class:`DenseTower`)."""

from __future__ import annotations

from open_clip.transformer import VisionTransformer

from .base import NO_TAPS, DenseTower, Preprocess, Taps, resize_patch_pos_embed
from .eva02 import Eva02Tower
from .openclip_vit import OpenClipViTTower
from .tiny import TEST_MODELS, is_test_model, register_test_models


def preprocess_of(model) -> Preprocess:
    """Mean/std/size that travel with an open_clip model's weights."""
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(model.visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return Preprocess(
        mean=tuple(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),
        image_size=size,
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def tower_for(model) -> DenseTower:
    """Wrap the image tower of a loaded open_clip model.

    Raises:
        ValueError: for towers without a dense head (ResNets, CoCa, non-EVA timm trunks...).
    """
    visual = model.visual
    preprocess = preprocess_of(model)
    if isinstance(visual, VisionTransformer):
        return OpenClipViTTower(visual, preprocess)
    if hasattr(visual, "trunk"):
        return Eva02Tower(visual, preprocess)
    raise ValueError(f"{type(visual).__name__} image towers have no dense head; use an open_clip ViT or an EVA02 model")


__all__ = [
    "NO_TAPS",
    "TEST_MODELS",
    "DenseTower",
    "Eva02Tower",
    "OpenClipViTTower",
    "Preprocess",
    "Taps",
    "is_test_model",
    "preprocess_of",
    "register_test_models",
    "resize_patch_pos_embed",
    "tower_for",
]
