"""What all dense heads share: run the tower up to the last block, replace that block, project."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..backbones.base import DenseTower


def attend(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply attention weights B x heads x L x L to values B x heads x L x head_dim."""
    return weights @ v.to(weights.dtype)


def self_softmax(t: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * t tᵀ) over the last axis for t of shape B x heads x L x head_dim."""
    return torch.softmax((t * scale) @ t.transpose(-2, -1), dim=-1)


class DenseHead:
    """A training-free replacement for the last ViT block.

    Subclasses implement :meth:`last_block` mapping the B x L x C tokens entering the last block to
    the B x L x C tokens that the tower's final norm and projection turn into dense features.
    """

    name: str = "abstract"

    def last_block(self, tower: DenseTower, x: torch.Tensor, context: dict) -> torch.Tensor:
        raise NotImplementedError

    def encode_dense(
        self, tower: DenseTower, images: torch.Tensor, pos_rule: str = "sclip", normalize: bool = True
    ) -> torch.Tensor:
        """Dense features of a batch of images.

        Args:
            tower: the image tower.
            images: B x 3 x H x W normalised images.
            pos_rule: positional-embedding resize rule (``"sclip"`` or ``"size"``, see
                :func:`ovdense.backbones.base.resize_patch_pos_embed`).
            normalize: L2-normalise each token. Region pooling on EVA02 works on the un-normalised map
                and normalises the pooled vector, as DeCLIP does.

        Returns:
            B x D x H/p x W/p projected features (D = joint embedding width), L2-normalised per token
            when ``normalize``.
        """
        x, context = tower.tokens_before_last_block(images, pos_rule)
        y = self.last_block(tower, x, context)
        y = tower.project(y)[:, tower.num_prefix_tokens :]
        if normalize:
            y = F.normalize(y, dim=-1)
        h, w = context["grid"]
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
