"""DeCLIP (Wang et al. 2025): the decoupled content head, no residual, no FFN."""

from __future__ import annotations

from typing import Literal

from ..methods import register_method
from .base import DenseHead, PassContext, attend, self_softmax

#: The attentions of ``DeclipHead(mode=...)``, as its annotation lists them (the registry reads the annotation).
MODES = ("csa", "qq")


@register_method(
    "declip",
    order=40,
    summary="DeCLIP content head: softmax(qq)[+softmax(kk)], unscaled on EVA02, no residual/FFN (option mode=csa|qq)",
    defaults={
        "long_side": 4096,
        "short_side": 448,
        "crop": 336,
        "stride": 112,
        "pos_rule": "size",
        "pad_to_patch": True,
        "class_style": "declip",
    },
    datasets={
        "voc21": {"logit_scale": 80.0, "prob_thd": 0.4},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"prob_thd": 0.2, "long_side": 2048},
        "cityscapes": {"short_side": 560},
    },
)
class DeclipHead(DenseHead):
    """y = attn_out(A v) with A = softmax(c q qᵀ) + softmax(c k kᵀ) (``csa``) or softmax(c q qᵀ) (``qq``).

    On EVA02 (DeCLIP's released backbone, ``eva_vit_model.py`` ss_attn) c = 1: the reference comments
    the scale out; q/k carry no RoPE; attn_out = proj(inner_attn_ln(·)) times gamma_1 where present.
    On an OpenAI-style ViT DeCLIP scales by head_dim^-0.5. The tower says which (``declip_scale``).

    Args:
        mode: the attention: csa (q-q + k-k, the segmentation preset) or qq (q-q only, DeCLIP's released training
            and region numbers).
    """

    def __init__(self, mode: Literal["csa", "qq"] = "csa"):
        if mode not in MODES:
            raise ValueError(f"unknown DeCLIP mode {mode!r}; expected one of {MODES}")
        self.mode = mode

    def last_block(self, tower, x, context):
        return self.decoupled(tower, x, context)[0]

    def decoupled(self, tower, x, context: PassContext | None = None):
        """Content tokens and the context features of one pass through the last block.

        Args:
            tower: the image tower.
            x: B x L x C tokens entering the last block.
            context: the pass's context, where the attention is recorded (see :meth:`PassContext.record`).

        Returns:
            ``(content, q, k)``: content B x L x C (this head's last block, before the final norm and
            projection); q and k B x L x C, the last block's query and key features with heads concatenated
            (biases included, unscaled, no RoPE) — DeCLIP's context features.
        """
        q, k, v = tower.qkv(tower.last_norm1(x))
        weights = self_softmax(q, tower.declip_scale)
        if self.mode == "csa":
            weights = weights + self_softmax(k, tower.declip_scale)
        if context is not None:
            context.record(weights)
        content = tower.attn_out(attend(weights, v))
        return content, tower.merge_heads(q), tower.merge_heads(k)

    def __repr__(self) -> str:
        return f"DeclipHead(mode={self.mode!r})"
