"""MaskCLIP (Zhou et al. 2022): the value path of the last attention, residual and FFN kept."""

import torch

from .base import DenseHead, record_attention


class MaskClipHead(DenseHead):
    """y = x + out_proj(v); y = y + mlp(ln_2(y)) (chongzhou96/MaskCLIP ``vit.py``, ``return_qkv``)."""

    name = "maskclip"

    def last_block(self, tower, x, context):
        _, _, v = tower.qkv(tower.last_norm1(x))
        if context.get("record_attention"):  # each token keeps its own value: the identity attention
            record_attention(context, torch.eye(v.shape[2], device=v.device).expand(len(v), 1, -1, -1))
        y = x + tower.attn_out(v)
        return y + tower.ffn(y)
