"""Vanilla CLIP: the unchanged last block (the 14.1 mIoU baseline of SCLIP's table)."""

from .base import DenseHead


class ClipHead(DenseHead):
    """The tower's own last block; the patch tokens are those of open_clip's forward."""

    name = "clip"

    def last_block(self, tower, x, context):
        return tower.last_block(x, context)
