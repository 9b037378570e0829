"""Vanilla CLIP: the unchanged last block (the 14.1 mIoU baseline of SCLIP's table)."""

from ..methods import register_method
from .base import DenseHead


@register_method(
    "clip",
    order=90,
    summary="unchanged last block (vanilla CLIP patch tokens)",
    datasets_of="sclip",
    without=("area_thd",),  # the baselines share SCLIP's protocol without its area rule
)
class ClipHead(DenseHead):
    """The tower's own last block; the patch tokens are those of open_clip's forward."""

    def last_block(self, tower, x, context):
        if context.record_attention:  # the weights from the block's parts; the output stays the module's
            context.record(tower.block_with_attention(tower.num_blocks - 1, x, context.tower_state)[1])
        return tower.last_block(x, context.tower_state)
