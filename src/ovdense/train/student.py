"""The student of the distillation trainers: which weights train, and one differentiable forward.

Freezing (DeCLIP's released ``lock_image_tower(unlocked_groups=12)`` + ``freeze_parameters``): everything is
frozen, then the image tower's transformer blocks are unfrozen (all of them by default, the last
``unlocked_blocks`` otherwise), minus the last block's FFN branch (norm2, MLP, layer scale: the dense head
does not use it) and, in ``qq`` mode, the last block's key projection (EVA02's separate ``k_proj``; open_clip
ViTs pack q, k, v in one matrix, which DeCLIP leaves trainable). Patch embedding, class token, positional
embedding, the final norm and projection, ``logit_scale`` and the text tower stay frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import DenseTower
from ..heads import PassInputs
from ..heads.declip import DeclipHead

__all__ = ["StudentForward", "StudentOutput", "freeze_for_distillation", "trainable_names"]


def _params_of(items) -> list[torch.nn.Parameter]:
    out = []
    for item in items:
        if isinstance(item, torch.nn.Parameter):
            out.append(item)
        elif isinstance(item, torch.nn.Module):
            out.extend(item.parameters())
    return out


def freeze_for_distillation(
    model: torch.nn.Module,
    tower: DenseTower,
    mode: str = "csa",
    unlocked_blocks: int | None = None,
    freeze_ffn: bool = True,
) -> list[str]:
    """Set ``requires_grad`` on ``model`` for distillation and return the trainable parameter names.

    Args:
        model: the open_clip model holding ``tower``.
        tower: its image tower.
        mode: DeCLIP attention mode (``csa`` or ``qq``; ``qq`` also freezes the last key projection).
        unlocked_blocks: how many of the last transformer blocks train (None: all).
        freeze_ffn: freeze the last block's FFN branch (DeCLIP: its head does not use it; SCD's value-path
            head does, so SCD keeps it trainable — ours).

    Returns:
        the names (as in ``model.named_parameters()``) of the parameters left trainable, in order.
    """
    blocks = list(tower.blocks)
    n = len(blocks) if unlocked_blocks is None else unlocked_blocks
    if not 1 <= n <= len(blocks):
        raise ValueError(f"unlocked_blocks must be in 1..{len(blocks)}, got {unlocked_blocks}")
    model.requires_grad_(False)
    for blk in blocks[len(blocks) - n :]:
        blk.requires_grad_(True)
    frozen_again = _params_of(tower.ffn_modules()) if freeze_ffn else []
    if mode == "qq":
        frozen_again += tower.key_parameters()
    for p in frozen_again:
        p.requires_grad_(False)
    return trainable_names(model)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters with ``requires_grad``."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


@dataclass
class StudentOutput:
    """What the student's one pass yields.

    Attributes:
        content: B x D x h x w content map (DeCLIP head, final norm, projection; tokens L2-normalised where
            the tower's ``region_tokens_normalized`` says the reference does).
        q, k: B x N x C context features of the last block (N = h * w patch tokens; heads concatenated);
            None for heads other than DeCLIP's.
        grid: (h, w).
    """

    content: torch.Tensor
    q: torch.Tensor | None
    k: torch.Tensor | None
    grid: tuple[int, int]


class StudentForward(torch.nn.Module):
    """Wraps the student so DistributedDataParallel sees one ``forward`` (it syncs gradients through it).

    Args:
        model: the open_clip model being trained (registered as a submodule).
        tower: its dense tower.
        head: the dense head of the student's content map (DeCLIP's also gives the context features).
        pos_rule: positional-embedding resize rule for the training input size.
    """

    def __init__(self, model: torch.nn.Module, tower: DenseTower, head, pos_rule: str = "size"):
        super().__init__()
        self.model = model
        # A view over ``model``'s modules: a plain attribute, so no parameter is registered twice (state_dict, DDP).
        object.__setattr__(self, "tower", tower)
        self.head = head
        self.pos_rule = pos_rule

    def forward(self, images: torch.Tensor) -> StudentOutput:
        """images: B x 3 x S x S normalised -> :class:`StudentOutput`."""
        tower = self.tower
        x, ctx = self.head.begin(tower, images, PassInputs(self.pos_rule))
        if isinstance(self.head, DeclipHead):
            content, q, k = self.head.decoupled(tower, x)
        else:
            content, q, k = self.head.last_block(tower, x, ctx), None, None
        p = tower.num_prefix_tokens
        y = tower.project(content)[:, p:]
        if tower.region_tokens_normalized:  # DeCLIP's open_clip ViT path pools normalised tokens
            y = torch.nn.functional.normalize(y, dim=-1)
        h, w = ctx.grid
        dense = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)
        q, k = (None, None) if q is None else (q[:, p:], k[:, p:])
        return StudentOutput(content=dense, q=q, k=k, grid=(h, w))
