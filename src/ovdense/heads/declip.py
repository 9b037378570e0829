"""DeCLIP (Wang et al. 2025): the decoupled content head, no residual, no FFN."""

from __future__ import annotations

from ..presets import DECLIP_MODES
from .base import DenseHead, attend, record_attention, self_softmax


class DeclipHead(DenseHead):
    """y = attn_out(A v) with A = softmax(c q qᵀ) + softmax(c k kᵀ) (``csa``) or softmax(c q qᵀ) (``qq``).

    On EVA02 (DeCLIP's released backbone, ``eva_vit_model.py`` ss_attn) c = 1: the reference comments
    the scale out; q/k carry no RoPE; attn_out = proj(inner_attn_ln(·)) times gamma_1 where present.
    On an OpenAI-style ViT DeCLIP scales by head_dim^-0.5. The tower says which (``declip_scale``).
    """

    name = "declip"

    def __init__(self, mode: str = "csa"):
        if mode not in DECLIP_MODES:
            raise ValueError(f"unknown DeCLIP mode {mode!r}; expected one of {DECLIP_MODES}")
        self.mode = mode

    def last_block(self, tower, x, context):
        return self.decoupled(tower, x, context)[0]

    def decoupled(self, tower, x, context: dict | None = None):
        """Content tokens and the context features of one pass through the last block.

        Args:
            tower: the image tower.
            x: B x L x C tokens entering the last block.
            context: the pass's context, where the attention is recorded (see :func:`record_attention`).

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
            record_attention(context, weights)
        content = tower.attn_out(attend(weights, v))
        return content, tower.merge_heads(q), tower.merge_heads(k)

    def __repr__(self) -> str:
        return f"DeclipHead(mode={self.mode!r})"
