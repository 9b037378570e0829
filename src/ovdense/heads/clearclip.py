"""ClearCLIP (Lan et al. 2024): q-q attention, no residual, no FFN."""

from .base import DenseHead, attend, record_attention, self_softmax


class ClearClipHead(DenseHead):
    """y = out_proj(softmax(s q qᵀ) v), residual and FFN dropped.

    ClearCLIP's ``model_type='ClearCLIP'`` with ``ignore_residual=True``; s = head_dim^-0.5.
    """

    name = "clearclip"

    def last_block(self, tower, x, context):
        q, _, v = tower.qkv(tower.last_norm1(x))
        weights = self_softmax(q, tower.scale)
        record_attention(context, weights)
        return tower.attn_out(attend(weights, v))
