"""F-ViT weights: CLIPSelf's mmdet checkpoints read as they are, ovdense's own written as safetensors.

mmdet layout (CLIPSelf ``F-ViT``, mmdet 2.28.1 module names) against ours:

=========================================================  ==============================================
mmdet key                                                  ovdense key
=========================================================  ==============================================
``backbone.visual.*`` (EVA-CLIP names: q_bias, w1...)      the open_clip tower (``visual.*``, timm names)
``backbone.interpolate1.{0,1,3}.*``                        ``pyramid.level0.{0,1,3}.*``
``backbone.interpolate2.0.*``                              ``pyramid.level1.0.*``
``neck.lateral_convs.i.{conv,bn}.*``                       ``fpn.inner_blocks.i.{0,1}.*``
``neck.fpn_convs.i.{conv,bn}.*``                           ``fpn.layer_blocks.i.{0,1}.*``
``rpn_head.rpn_conv.j.{conv,bn}.*``                        ``rpn.convs.j.{0,1}.*``
``rpn_head.rpn_cls.*`` / ``rpn_head.rpn_reg.*``            ``rpn.cls.*`` / ``rpn.reg.*``
``roi_head.bbox_head.shared_convs.i.{conv,bn}.*``          ``box_head.shared_convs.i.{0,1}.*``
``roi_head.bbox_head.shared_fcs.{0,1}.*``                  ``box_head.shared_fcs.{0,1}.*``
``roi_head.bbox_head.cls_fcs.0.*`` / ``reg_fcs.0.*``       ``box_head.cls_fc.*`` / ``box_head.reg_fc.*``
``roi_head.bbox_head.fc_reg.*`` / ``fc_cls.*`` (dead)      ``box_head.fc_reg.*`` / ``box_head.fc_cls.*``
``roi_head.bbox_head.detect_temperature``                  ``box_head.detect_temperature``
``roi_head.bbox_head.all_embeddings`` (D x (C+1))          ``train_embeddings``
``roi_head.mask_head.convs.i.{conv,bn}.*``                 ``mask_head.convs.i.{0,1}.*``
``roi_head.mask_head.upsample.*`` / ``conv_logits.*``      ``mask_head.upsample.*`` / ``mask_head.logits.*``
=========================================================  ==============================================

EVA-CLIP's RoPE tables (``rope.freqs_cos/sin``) are recomputed by the tower for every grid and are not kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..errors import OvdenseError

#: (regex on ovdense keys, replacement giving the mmdet key); applied in order, first match wins.
_TO_MMDET = [
    (r"^pyramid\.level0\.", "backbone.interpolate1."),
    (r"^pyramid\.level1\.", "backbone.interpolate2."),
    (r"^fpn\.inner_blocks\.(\d+)\.0\.", r"neck.lateral_convs.\1.conv."),
    (r"^fpn\.inner_blocks\.(\d+)\.1\.", r"neck.lateral_convs.\1.bn."),
    (r"^fpn\.layer_blocks\.(\d+)\.0\.", r"neck.fpn_convs.\1.conv."),
    (r"^fpn\.layer_blocks\.(\d+)\.1\.", r"neck.fpn_convs.\1.bn."),
    (r"^rpn\.convs\.(\d+)\.0\.", r"rpn_head.rpn_conv.\1.conv."),
    (r"^rpn\.convs\.(\d+)\.1\.", r"rpn_head.rpn_conv.\1.bn."),
    (r"^rpn\.cls\.", "rpn_head.rpn_cls."),
    (r"^rpn\.reg\.", "rpn_head.rpn_reg."),
    (r"^box_head\.shared_convs\.(\d+)\.0\.", r"roi_head.bbox_head.shared_convs.\1.conv."),
    (r"^box_head\.shared_convs\.(\d+)\.1\.", r"roi_head.bbox_head.shared_convs.\1.bn."),
    (r"^box_head\.cls_fc\.", "roi_head.bbox_head.cls_fcs.0."),
    (r"^box_head\.reg_fc\.", "roi_head.bbox_head.reg_fcs.0."),
    (r"^box_head\.", "roi_head.bbox_head."),
    (r"^train_embeddings$", "roi_head.bbox_head.all_embeddings"),
    (r"^mask_head\.convs\.(\d+)\.0\.", r"roi_head.mask_head.convs.\1.conv."),
    (r"^mask_head\.convs\.(\d+)\.1\.", r"roi_head.mask_head.convs.\1.bn."),
    (r"^mask_head\.logits\.", "roi_head.mask_head.conv_logits."),
    (r"^mask_head\.", "roi_head.mask_head."),
]

_FROM_MMDET = [
    (r"^backbone\.interpolate1\.", "pyramid.level0."),
    (r"^backbone\.interpolate2\.", "pyramid.level1."),
    (r"^neck\.lateral_convs\.(\d+)\.conv\.", r"fpn.inner_blocks.\1.0."),
    (r"^neck\.lateral_convs\.(\d+)\.bn\.", r"fpn.inner_blocks.\1.1."),
    (r"^neck\.fpn_convs\.(\d+)\.conv\.", r"fpn.layer_blocks.\1.0."),
    (r"^neck\.fpn_convs\.(\d+)\.bn\.", r"fpn.layer_blocks.\1.1."),
    (r"^rpn_head\.rpn_conv\.(\d+)\.conv\.", r"rpn.convs.\1.0."),
    (r"^rpn_head\.rpn_conv\.(\d+)\.bn\.", r"rpn.convs.\1.1."),
    (r"^rpn_head\.rpn_cls\.", "rpn.cls."),
    (r"^rpn_head\.rpn_reg\.", "rpn.reg."),
    (r"^roi_head\.bbox_head\.shared_convs\.(\d+)\.conv\.", r"box_head.shared_convs.\1.0."),
    (r"^roi_head\.bbox_head\.shared_convs\.(\d+)\.bn\.", r"box_head.shared_convs.\1.1."),
    (r"^roi_head\.bbox_head\.cls_fcs\.0\.", "box_head.cls_fc."),
    (r"^roi_head\.bbox_head\.reg_fcs\.0\.", "box_head.reg_fc."),
    (r"^roi_head\.bbox_head\.all_embeddings$", "train_embeddings"),
    (r"^roi_head\.bbox_head\.", "box_head."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"mask_head.convs.\1.0."),
    (r"^roi_head\.mask_head\.convs\.(\d+)\.bn\.", r"mask_head.convs.\1.1."),
    (r"^roi_head\.mask_head\.conv_logits\.", "mask_head.logits."),
    (r"^roi_head\.mask_head\.", "mask_head."),
]

#: timm EVA names -> EVA-CLIP names (the inverse of timm's ``checkpoint_filter_fn`` renames).
_TIMM_TO_EVA_CLIP = [
    (r"\.attn\.q_proj\.bias$", ".attn.q_bias"),
    (r"\.attn\.v_proj\.bias$", ".attn.v_bias"),
    (r"\.attn\.norm\.", ".attn.inner_attn_ln."),
    (r"\.mlp\.fc1_g\.", ".mlp.w1."),
    (r"\.mlp\.fc1_x\.", ".mlp.w2."),
    (r"\.mlp\.norm\.", ".mlp.ffn_ln."),
    (r"\.mlp\.fc2\.", ".mlp.w3."),
]

FORMAT = "ovdense-fvit"


def _rename(key: str, rules) -> str | None:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return None


def to_mmdet_key(key: str) -> str:
    """An ovdense F-ViT key (not the tower's) -> CLIPSelf's mmdet key."""
    new = _rename(key, _TO_MMDET)
    if new is None:
        raise KeyError(f"no mmdet name for {key}")
    return new


def from_mmdet_key(key: str) -> str | None:
    """A CLIPSelf mmdet key (not ``backbone.visual``) -> ovdense's, or None for one F-ViT never reads."""
    return _rename(key, _FROM_MMDET)


def is_mmdet_layout(state_dict: dict) -> bool:
    return any(k.startswith("roi_head.bbox_head.") for k in state_dict)


def head_state(model) -> dict[str, torch.Tensor]:
    """The detector's own weights (everything but the frozen tower), ovdense names."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("tower.")}


def visual_state(model) -> dict[str, torch.Tensor]:
    """The frozen tower's weights in open_clip names (``visual.*`` of the CLIP)."""
    return {f"visual.{k}": v for k, v in model.tower.visual.state_dict().items()}


def eva_clip_visual_keys(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's EVA02 ``visual.trunk.*`` (timm names) -> EVA-CLIP's ``visual.*`` names; other towers unchanged."""
    out = {}
    for key, value in visual.items():
        if key.startswith("visual.trunk."):
            name = "visual." + key[len("visual.trunk.") :]
            for pattern, repl in _TIMM_TO_EVA_CLIP:
                name = re.sub(pattern, repl, name)
            out[name] = value
        else:
            out[key] = value
    return out


def to_mmdet_state(model) -> dict[str, torch.Tensor]:
    """The whole detector in CLIPSelf's mmdet layout (``backbone.visual`` in EVA-CLIP names for EVA02 towers)."""
    state = {to_mmdet_key(k): v for k, v in head_state(model).items()}
    for k, v in eva_clip_visual_keys(visual_state(model)).items():
        state[f"backbone.{k}"] = v
    return state


def split_mmdet_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """A CLIPSelf checkpoint -> (ovdense head state, CLIP ``visual.*`` state, keys F-ViT does not read)."""
    head, visual, unused = {}, {}, []
    for key, value in state.items():
        if key.startswith("backbone.visual."):
            visual[key[len("backbone.") :]] = value
            continue
        new = from_mmdet_key(key)
        if new is None:
            unused.append(key)
        else:
            head[new] = value
    return head, visual, unused


def save_mmdet(model, path: str | Path, meta: dict | None = None) -> None:
    """Write the detector as an mmdet checkpoint (``{"meta", "state_dict"}``, tensors only) atomically."""
    from ..fileio import write_atomic

    payload = {"meta": dict(meta or {}), "state_dict": {k: v.detach().cpu() for k, v in to_mmdet_state(model).items()}}
    write_atomic(path, lambda f: torch.save(payload, f))


def save_safetensors(model, path: str | Path, model_name: str, extra: dict | None = None) -> None:
    """Write the detector as ovdense safetensors: the head in ovdense names, the tower as ``visual.*``, and the
    architecture (CLIP name, :class:`FViTConfig`) in the metadata."""
    from safetensors.torch import save

    from ..fileio import write_atomic

    tensors = {k: v.detach().cpu().contiguous() for k, v in {**head_state(model), **visual_state(model)}.items()}
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "config": json.dumps(model.config.to_dict()),
        **{k: json.dumps(v) for k, v in (extra or {}).items()},
    }
    data = save(tensors, metadata=metadata)
    write_atomic(path, lambda f: f.write(data))


def read_safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:
        raise OvdenseError(f"cannot read detector {path}: {err}") from None
