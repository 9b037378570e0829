"""ClearCLIP (Lan et al. 2024): q-q attention, no residual, no FFN."""

from ..methods import register_method
from .base import DenseHead, attend, self_softmax


@register_method(
    "clearclip",
    order=30,
    summary="softmax(qq) attention, no residual, no FFN (ClearCLIP)",
    defaults={
        "short_side": 448,
        "crop": 448,
        "stride": 224,
        "logit_scale": 50.0,
        "pad_to_patch": True,
        "class_style": "clearclip",
    },
    datasets={
        "voc21": {"prob_thd": 0.5},
        "context60": {"prob_thd": 0.15},
        "coco_object": {"prob_thd": 0.4},
        "cityscapes": {"crop": 224, "stride": 224},
    },
)
class ClearClipHead(DenseHead):
    """y = out_proj(softmax(s q qᵀ) v), residual and FFN dropped.

    ClearCLIP's ``model_type='ClearCLIP'`` with ``ignore_residual=True``; s = head_dim^-0.5.
    """

    def last_block(self, tower, x, context):
        q, _, v = tower.qkv(tower.last_norm1(x))
        weights = self_softmax(q, tower.scale)
        context.record(weights)
        return tower.attn_out(attend(weights, v))
