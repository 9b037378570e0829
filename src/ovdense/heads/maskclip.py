"""MaskCLIP (Zhou et al. 2022): the value path of the last attention, residual and FFN kept."""

from .base import DenseHead


class MaskClipHead(DenseHead):
    """y = x + out_proj(v); y = y + mlp(ln_2(y)) (chongzhou96/MaskCLIP ``vit.py``, ``return_qkv``)."""

    name = "maskclip"

    def last_block(self, tower, x, context):
        _, _, v = tower.qkv(tower.last_norm1(x))
        y = x + tower.attn_out(v)
        return y + tower.ffn(y)
