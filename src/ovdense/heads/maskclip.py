"""MaskCLIP (Zhou et al. 2022): the value path of the last attention, residual and FFN kept."""

import torch

from ..methods import register_method
from .base import DenseHead


@register_method(
    "maskclip",
    order=100,
    summary="value path out_proj(v), residual and FFN kept (MaskCLIP)",
    defaults={"pos_rule": "size"},
    datasets_of="sclip",
    without=("area_thd",),  # the baselines share SCLIP's protocol without its area rule
)
class MaskClipHead(DenseHead):
    """y = x + out_proj(v); y = y + mlp(ln_2(y)) (chongzhou96/MaskCLIP ``vit.py``, ``return_qkv``)."""

    def last_block(self, tower, x, context):
        _, _, v = tower.qkv(tower.last_norm1(x))
        if context.record_attention:  # each token keeps its own value: the identity attention
            context.record(torch.eye(v.shape[2], device=v.device).expand(len(v), 1, -1, -1))
        y = x + tower.attn_out(v)
        return y + tower.ffn(y)
