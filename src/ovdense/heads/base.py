"""What all dense heads share: run the tower up to the last block, replace that block, project.

The contract between the caller, the tower and a head is typed: :class:`PassInputs` is what the caller hands a
pass besides the images (the position-table rule, the text, a VFM, region masks), :class:`PassContext` what the
pass collects for the head (the grid, the tapped blocks, the attention it records, the grid of its output), and
:meth:`DenseHead.last_block` returns a token tensor or :class:`Branches`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

import torch
import torch.nn.functional as F

from ..backbones.base import NO_TAPS, DenseTower, Taps

if TYPE_CHECKING:
    from ..vfm import Vfm
    from ..vfm_map import VfmImageMap


@dataclass(frozen=True)
class TextQuery:
    """The text side a head may need inside its pass (ResCLIP's first segmentation of each window).

    Attributes:
        embeddings: N x D L2-normalised name embeddings (all names of all classes).
        logit_scale: the method's softmax temperature for the cosines.
    """

    embeddings: torch.Tensor
    logit_scale: float


@dataclass(frozen=True)
class PassInputs:
    """What a pass needs besides the images.

    Attributes:
        pos_rule: positional-embedding resize rule (``"sclip"`` or ``"size"``, see
            :func:`ovdense.backbones.base.resize_patch_pos_embed`).
        text: the class names' embeddings, for heads with ``needs_text`` (ignored by the others).
        vfm: a vision foundation model, for heads with ``uses_vfm``.
        masks: B x H x W integer region ids of each image, for heads with ``uses_masks``.
        vfm_map: the whole image's VFM features (:class:`ovdense.vfm_map.VfmImageMap`), for heads whose VFM runs
            once per image at its own resolution (``native_vfm``: CorrCLIPv2) instead of on each window.
        pixel_coords: B x 2 x H x W, the network-input pixel (row, column) each window pixel shows (padding repeats
            the window's edge), with ``vfm_map``.
    """

    pos_rule: str = "sclip"
    text: TextQuery | None = None
    vfm: Vfm | None = None
    masks: torch.Tensor | None = None
    vfm_map: VfmImageMap | None = None
    pixel_coords: torch.Tensor | None = None


@dataclass
class PassContext:
    """What one pass collects for the head, and what the head leaves for the caller.

    Attributes:
        images: B x 3 x H x W, the pass's input.
        inputs: the caller's :class:`PassInputs`.
        grid: (h, w) patches of the tower.
        tower_state: the tower's own per-pass values (EVA02's RoPE), handed back to its block calls.
        states: the residual stream after each tapped block, B x L x C (see :class:`~ovdense.backbones.base.Taps`).
        attention: per-head attention probabilities of each tapped block, B x heads x L x L.
        record_attention: whether the caller wants the attention the head applies (:meth:`record`).
        head_attention: that attention, B x M x M averaged over heads, when recorded.
        out_grid: the grid of the head's output where it is not the tower's (a VFM's), else None.
    """

    images: torch.Tensor
    inputs: PassInputs
    grid: tuple[int, int]
    tower_state: dict = field(default_factory=dict)
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)
    record_attention: bool = False
    head_attention: torch.Tensor | None = None
    out_grid: tuple[int, int] | None = None

    def record(self, weights: torch.Tensor) -> None:
        """Keep the attention a head applies (B x heads x M x M), averaged over heads, when the caller asked for
        it; the last call wins. M: the head's output tokens (prefix rows first when it keeps them, then the
        grid row-major)."""
        if self.record_attention:
            self.head_attention = weights.detach().float().mean(dim=1)

    @property
    def output_grid(self) -> tuple[int, int]:
        """The grid of the dense features: ``out_grid`` where the head set one, else the tower's."""
        return self.grid if self.out_grid is None else self.out_grid


@dataclass(frozen=True)
class Branches:
    """Token streams a head mixes after the tower's final norm and before its projection (CorrCLIP):
    ``post_proj(Σ weight_i · post_norm(tokens_i))``; each B x N x C."""

    tokens: tuple[torch.Tensor, ...]
    weights: tuple[float, ...]


#: What :meth:`DenseHead.last_block` returns.
HeadOutput = Union[torch.Tensor, Branches]  # noqa: UP007 - a runtime alias, readable on Python 3.10


def attend(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Apply attention weights B x heads x L x L to values B x heads x L x head_dim."""
    return weights @ v.to(weights.dtype)


def self_softmax(t: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * t tᵀ) over the last axis for t of shape B x heads x L x head_dim."""
    return torch.softmax((t * scale) @ t.transpose(-2, -1), dim=-1)


class DenseHead:
    """A training-free replacement for the last ViT block.

    A subclass implements :meth:`last_block`, mapping the B x L x C tokens entering the last block to what the
    tower's final norm and projection turn into dense features: B x L x C tokens, or B x (h·w) x C for a head
    whose output has no prefix rows (``output_has_prefix = False``), or :class:`Branches` mixed after the norm.
    It reads what it needs from the :class:`PassContext`: earlier blocks it declared in :meth:`taps`, the text
    (``needs_text``), a VFM (``uses_vfm``), region masks (``uses_masks``), all in ``context.inputs``; a head whose
    features live on another grid than the tower's (a VFM's) sets ``context.out_grid``; it hands the attention
    it applies to :meth:`PassContext.record` (what the demo and ``ovdense attention`` show).

    A head becomes a method by its registration (:func:`ovdense.methods.register_method`), which sets ``name``.
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
    #: With ``uses_vfm``: whether the VFM runs once per image at the image's own resolution
    #: (:mod:`ovdense.vfm_native`), the pass getting ``vfm_map`` and ``pixel_coords`` instead of ``vfm``.
    native_vfm: bool = False

    def taps(self, tower: DenseTower) -> Taps:
        """The earlier blocks this head reads on ``tower`` (none by default); raises ValueError when the tower
        lacks them."""
        return NO_TAPS

    def last_block(self, tower: DenseTower, x: torch.Tensor, context: PassContext) -> HeadOutput:
        """The head's last block: B x L x C tokens entering it -> tokens for :meth:`project` (class docstring)."""
        raise NotImplementedError

    def check_inputs(self, inputs: PassInputs) -> None:
        """Raise ValueError when ``inputs`` lack what this head needs (text, VFM, masks)."""
        for needed, value, what in (
            (self.needs_text, inputs.text, "segments inside its pass: give it the text embeddings"),
            (self.uses_vfm and not self.native_vfm, inputs.vfm, "needs a vision foundation model: give it vfm="),
            (self.native_vfm, inputs.vfm_map, "needs the image's VFM map: give it vfm_map="),
            (self.native_vfm, inputs.pixel_coords, "needs the windows' pixel coordinates: give it pixel_coords="),
            (self.uses_masks, inputs.masks, "needs class-agnostic masks of each image: give it masks="),
        ):
            if needed and value is None:
                raise ValueError(f"the {self.name} head {what}")

    def begin(
        self, tower: DenseTower, images: torch.Tensor, inputs: PassInputs, record_attention: bool = False
    ) -> tuple[torch.Tensor, PassContext]:
        """Embed B x 3 x H x W images and run every block but the last, with this head's taps.

        Returns:
            the B x L x C tokens entering the last block and the pass's :class:`PassContext`.
        """
        self.check_inputs(inputs)
        x, tower_state = tower.tokens_before_last_block(images, inputs.pos_rule, self.taps(tower))
        states, attention = tower_state.pop("states", {}), tower_state.pop("attention", {})
        context = PassContext(
            images=images, inputs=inputs, grid=tuple(tower_state["grid"]), tower_state=tower_state,
            states=states, attention=attention, record_attention=record_attention,
        )  # fmt: skip
        return x, context

    def run(
        self,
        tower: DenseTower,
        images: torch.Tensor,
        inputs: PassInputs = PassInputs(),  # noqa: B008 - frozen, shared safely
        *,
        normalize: bool = True,
        record_attention: bool = False,
    ) -> tuple[torch.Tensor, PassContext]:
        """Dense features of a batch of images, and the pass's context.

        Args:
            tower: the image tower.
            images: B x 3 x H x W normalised images.
            inputs: the position-table rule and what the head needs (:class:`PassInputs`).
            normalize: L2-normalise each token. Region pooling on EVA02 works on the un-normalised map
                and normalises the pooled vector, as DeCLIP does.
            record_attention: keep the attention the head applies in ``context.head_attention`` (see
                :meth:`PassContext.record`); None for a head that records none.

        Returns:
            ``(features, context)``: B x D x h x w projected features (D = joint embedding width; h x w the tower's
            grid H/p x W/p, or the grid the head computes on, e.g. a VFM's: ``context.output_grid``), L2-normalised
            per token when ``normalize``.

        Raises:
            ValueError: ``inputs`` lack what the head needs, or the tower lacks the blocks it reads.
        """
        x, context = self.begin(tower, images, inputs, record_attention)
        y = self.project(tower, self.last_block(tower, x, context), context)
        if normalize:
            y = F.normalize(y, dim=-1)
        h, w = context.output_grid
        return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w), context

    def encode_dense(
        self,
        tower: DenseTower,
        images: torch.Tensor,
        inputs: PassInputs = PassInputs(),  # noqa: B008 - frozen, shared safely
        *,
        normalize: bool = True,
    ) -> torch.Tensor:
        """Dense features of a batch of images: B x D x h x w (see :meth:`run`)."""
        return self.run(tower, images, inputs, normalize=normalize)[0]

    def project(self, tower: DenseTower, y: HeadOutput, context: PassContext) -> torch.Tensor:
        """The last block's output to B x (h·w) x D dense tokens: the tower's final norm and projection, prefix
        rows dropped; :class:`Branches` are normalised each, weighted, summed, then projected."""
        if isinstance(y, Branches):
            terms = [tower.post_norm(tokens) * weight for tokens, weight in zip(y.tokens, y.weights, strict=True)]
            mixed = terms[0]
            for term in terms[1:]:  # summed in order, as the references write the mix
                mixed = mixed + term
            return tower.post_proj(mixed)
        y = tower.project(y)
        return y[:, tower.num_prefix_tokens :] if self.output_has_prefix else y

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
