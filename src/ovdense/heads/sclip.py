"""SCLIP (Wang et al. 2024): correlative self-attention, q-q plus k-k, residual and FFN kept."""

from ..methods import register_method
from .base import DenseHead, attend, self_softmax


@register_method(
    "sclip",
    order=10,
    summary="softmax(qq)+softmax(kk) attention, residual and FFN kept (SCLIP)",
    datasets={
        "voc21": {"logit_scale": 65.0, "prob_thd": 0.1, "area_thd": 0.1},
        "context60": {"logit_scale": 50.0, "prob_thd": 0.1},
        "coco_object": {"logit_scale": 50.0, "prob_thd": 0.1},
        "coco_stuff": {"short_side": 448},
        "cityscapes": {"short_side": 560},
    },
)
class SclipHead(DenseHead):
    """A = softmax(s q qᵀ) + softmax(s k kᵀ); y = x + out_proj(A v); y = y + mlp(ln_2(y)).

    s = head_dim^-0.5 (SCLIP ``clip/model.py``, ``custom_attn(csa=True)``).
    """

    def last_block(self, tower, x, context):
        q, k, v = tower.qkv(tower.last_norm1(x))
        weights = self_softmax(q, tower.scale) + self_softmax(k, tower.scale)
        context.record(weights)
        y = x + tower.attn_out(attend(weights, v))
        return y + tower.ffn(y)
