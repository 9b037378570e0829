"""SCLIP (Wang et al. 2024): correlative self-attention, q-q plus k-k, residual and FFN kept."""

from .base import DenseHead, attend, record_attention, self_softmax


class SclipHead(DenseHead):
    """A = softmax(s q qᵀ) + softmax(s k kᵀ); y = x + out_proj(A v); y = y + mlp(ln_2(y)).

    s = head_dim^-0.5 (SCLIP ``clip/model.py``, ``custom_attn(csa=True)``).
    """

    name = "sclip"

    def last_block(self, tower, x, context):
        q, k, v = tower.qkv(tower.last_norm1(x))
        weights = self_softmax(q, tower.scale) + self_softmax(k, tower.scale)
        record_attention(context, weights)
        y = x + tower.attn_out(attend(weights, v))
        return y + tower.ffn(y)
