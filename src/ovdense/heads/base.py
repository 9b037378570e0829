"""What all dense heads share: run the tower up to the last block, replace that block, project."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import NO_TAPS, DenseTower, Taps


@dataclass(frozen=True)
class TextQuery:
    """The text side a head may need inside its pass (ResCLIP's first segmentation of each window).

    Attributes:
        embeddings: N x D L2-normalised name embeddings (all names of all classes).
        logit_scale: the method's softmax temperature for the cosines.
    """

    embeddings: torch.Tensor
    logit_scale: float


def attend(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply attention weights B x heads x L x L to values B x heads x L x head_dim."""
    return weights @ v.to(weights.dtype)


def record_attention(context: dict, weights: torch.Tensor) -> None:
    """Keep the attention a head applies, averaged over heads (B x M x M over the head's output tokens), when
    the caller asked for it (``context["record_attention"]``, see :meth:`DenseHead.run`); the last call wins."""
    if context.get("record_attention"):
        context["head_attention"] = weights.detach().float().mean(dim=1)


def self_softmax(t: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * t tᵀ) over the last axis for t of shape B x heads x L x head_dim."""
    return torch.softmax((t * scale) @ t.transpose(-2, -1), dim=-1)


class DenseHead:
    """A training-free replacement for the last ViT block.

    Subclasses implement :meth:`last_block` mapping the B x L x C tokens entering the last block to the tokens
    that the tower's final norm and projection turn into dense features: B x L x C, or B x (h·w) x C for a head
    whose output has no prefix rows (``output_has_prefix = False``). A head that reads earlier blocks says
    which in :meth:`taps`; their values arrive in ``context`` from the same pass. A head that needs the class
    names inside its pass (``needs_text = True``) finds a :class:`TextQuery` in ``context["text"]``; one that
    needs a vision foundation model (``uses_vfm``) an :class:`ovdense.vfm.Vfm` in ``context["vfm"]``; one that
    needs class-agnostic masks (``uses_masks``) the windows' B x H x W region ids in ``context["masks"]``. A head
    whose features live on another grid than the tower's (a VFM's) puts it in ``context["out_grid"]``. A head
    hands the attention it applies in its last block to :func:`record_attention` (what the demo and
    ``ovdense attention`` show).
    """

    name: str = "abstract"
    #: Whether :meth:`last_block` returns the prefix ([CLS]) rows too.
    output_has_prefix: bool = True
    #: Whether the pass needs the text embeddings (then the dense features depend on the class list).
    needs_text: bool = False
    #: Whether the pass needs a vision foundation model.
    uses_vfm: bool = False
    #: Whether the pass needs class-agnostic region masks of each window.
    uses_masks: bool = False

    def taps(self, tower: DenseTower) -> Taps:
        """The earlier blocks this head reads on ``tower`` (none by default)."""
        return NO_TAPS

    def last_block(self, tower: DenseTower, x: torch.Tensor, context: dict) -> torch.Tensor:
        raise NotImplementedError

    def encode_dense(
        self,
        tower: DenseTower,
        images: torch.Tensor,
        pos_rule: str = "sclip",
        normalize: bool = True,
        text: TextQuery | None = None,
        vfm=None,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Dense features of a batch of images: B x D x h x w (see :meth:`run`)."""
        return self.run(tower, images, pos_rule, normalize, text, vfm, masks)[0]

    def run(
        self,
        tower: DenseTower,
        images: torch.Tensor,
        pos_rule: str = "sclip",
        normalize: bool = True,
        text: TextQuery | None = None,
        vfm=None,
        masks: torch.Tensor | None = None,
        record_attention: bool = False,
    ) -> tuple[torch.Tensor, dict]:
        """Dense features of a batch of images, and the pass's context.

        Args:
            tower: the image tower.
            images: B x 3 x H x W normalised images.
            pos_rule: positional-embedding resize rule (``"sclip"`` or ``"size"``, see
                :func:`ovdense.backbones.base.resize_patch_pos_embed`).
            normalize: L2-normalise each token. Region pooling on EVA02 works on the un-normalised map
                and normalises the pooled vector, as DeCLIP does.
            text: the class names' embeddings, for heads with ``needs_text`` (ignored by the others).
            vfm: an :class:`ovdense.vfm.Vfm`, for heads with ``uses_vfm``.
            masks: B x H x W integer region ids of each image, for heads with ``uses_masks``.
            record_attention: keep the attention the head applies in ``context["head_attention"]``: B x M x M
                averaged over heads, M the head's output tokens (prefix rows first when ``output_has_prefix``,
                then the h x w grid row-major); absent for a head that records none.

        Returns:
            ``(features, context)``: B x D x h x w projected features (D = joint embedding width; h x w the tower's
            grid H/p x W/p, or the grid the head computes on, e.g. a VFM's), L2-normalised per token when
            ``normalize``; the context holds ``grid`` and, where the head set one, ``out_grid``.
        """
        for needed, value, what in (
            (self.needs_text, text, "segments inside its pass: give it the text embeddings"),
            (self.uses_vfm, vfm, "needs a vision foundation model: give it vfm="),
            (self.uses_masks, masks, "needs class-agnostic masks of each image: give it masks="),
        ):
            if needed and value is None:
                raise ValueError(f"the {self.name} head {what}")
        x, context = tower.tokens_before_last_block(images, pos_rule, self.taps(tower))
        context.update(images=images, text=text, vfm=vfm, masks=masks, record_attention=record_attention)
        y = self.project(tower, self.last_block(tower, x, context), context)
        if normalize:
            y = F.normalize(y, dim=-1)
        h, w = context.get("out_grid", context["grid"])
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w), context

    def project(self, tower: DenseTower, y, context: dict) -> torch.Tensor:
        """The last block's output to B x (h·w) x D dense tokens: the tower's final norm and projection, prefix
        rows dropped (a head that mixes branches between the norm and the projection overrides this)."""
        y = tower.project(y)
        return y[:, tower.num_prefix_tokens :] if self.output_has_prefix else y

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
