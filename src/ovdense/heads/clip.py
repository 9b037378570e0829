"""Vanilla CLIP: the unchanged last block (the 14.1 mIoU baseline of SCLIP's table)."""

from .base import DenseHead, record_attention


class ClipHead(DenseHead):
    """The tower's own last block; the patch tokens are those of open_clip's forward."""

    name = "clip"

    def last_block(self, tower, x, context):
        if context.get("record_attention"):  # the weights from the block's parts; the output stays the module's
            record_attention(context, tower.block_with_attention(tower.num_blocks - 1, x, context)[1])
        return tower.last_block(x, context)
