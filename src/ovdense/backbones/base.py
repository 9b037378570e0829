"""The interface every CLIP image tower offers the dense heads.

A head replaces the last transformer block, so a tower exposes the pieces a head needs: the tokens entering
the last block, that block's normalisation, its q/k/v projections, its attention output path and FFN, the
unchanged block itself, and the final norm + projection into the joint embedding space. A head may also read
earlier blocks (:class:`Taps`): the residual stream after given blocks and their per-head attention
probabilities, collected in the same single pass. The towers wrap the real modules of a loaded open_clip /
timm model; no CLIP code is forked and no hook is registered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

POS_EMBED_RULES = ("sclip", "size")


@dataclass(frozen=True)
class Taps:
    """What a head reads from the tower's pass besides the tokens entering the last block.

    Blocks are numbered from 1 (the first) to ``num_blocks``; only blocks before the last can be tapped.

    Attributes:
        states: the residual stream (B x L x C, prefix tokens first) after each of these blocks, as
            ``context["states"][block]``; block 0 is the embedding (the input of block 1). The tokens entering
            the last block are the state after block ``num_blocks - 1``.
        attention: the per-head attention probabilities softmax(s q kᵀ) (B x heads x L x L) of each of these
            blocks, as ``context["attention"][block]``. A tapped block is computed from its parts (norm, q/k/v,
            softmax, output projection, FFN), which equals the module's own forward to fp32 rounding.
    """

    states: tuple[int, ...] = ()
    attention: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.states or self.attention)


NO_TAPS = Taps()


@dataclass(frozen=True)
class Preprocess:
    """Pixel normalisation that travels with the weights (values in [0, 1] units)."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: tuple[int, int]
    interpolation: str = "bicubic"


def resize_patch_pos_embed(patch_pos: torch.Tensor, grid: tuple[int, int], rule: str) -> torch.Tensor:
    """Resample a square grid of patch positional embeddings to another grid.

    Args:
        patch_pos: N x C embeddings of a sqrt(N) x sqrt(N) grid (no class token).
        grid: target (h, w) in patches.
        rule: ``"sclip"``: ``F.interpolate(scale_factor=((h + 0.1) / sqrt(N), (w + 0.1) / sqrt(N)))`` as
            SCLIP, ClearCLIP and NACLIP do; they keep the original table whenever the token count is
            unchanged (``h * w == N``, even for a 7 x 28 grid: their ``x.shape[1] != L`` test), and so do we.
            ``"size"``: ``F.interpolate(size=(h, w))`` as EVA02/DeCLIP and MaskCLIP do, keeping the table
            only for the native grid (DeCLIP's ``(h, w) == grid_size`` test). Both bicubic,
            align_corners=False, never antialiased.

    Returns:
        (h * w) x C embeddings, row-major over the target grid.
    """
    if rule not in POS_EMBED_RULES:
        raise ValueError(f"unknown positional-embedding rule {rule!r}; expected one of {POS_EMBED_RULES}")
    num, dim = patch_pos.shape
    side = int(round(math.sqrt(num)))
    if side * side != num:
        raise ValueError(f"positional embedding of {num} patches is not a square grid")
    h, w = grid
    if rule == "sclip":
        if h * w == num:
            return patch_pos
    elif (h, w) == (side, side):
        return patch_pos
    table = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    # Interpolate in fp32: bicubic on fp16 tables is not supported everywhere and loses precision.
    table = table.float()
    if rule == "sclip":
        out = F.interpolate(
            table, scale_factor=((h + 0.1) / side, (w + 0.1) / side), mode="bicubic", align_corners=False
        )
    else:
        out = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
    if out.shape[-2:] != (h, w):
        raise RuntimeError(f"positional embedding resized to {tuple(out.shape[-2:])}, expected {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(h * w, dim).to(patch_pos.dtype)


class DenseTower(nn.Module):
    """A CLIP image tower seen by the dense heads.

    Token tensors are B x L x C with L = 1 + h * w (the class token first). q/k/v are
    B x heads x L x head_dim.
    """

    kind: str = "abstract"
    #: Tokens before the patch tokens ([CLS], registers); the dense map drops them.
    num_prefix_tokens: int = 1
    #: Attention-logit scale the DeCLIP head uses on this tower (EVA02: none, OpenAI ViT: head_dim^-0.5).
    declip_scale: float = 1.0
    #: Whether region pooling (RoIAlign, mask means; training's content RoIs too) runs on L2-normalised tokens.
    #: CLIPSelf's and DeCLIP's open_clip ViT ``encode_dense`` normalises every token ("FIXME code from
    #: clipself"); their EVA02 ``encode_dense`` does not.
    region_tokens_normalized: bool = False

    def __init__(self, preprocess: Preprocess, patch_size: int, num_heads: int, width: int, out_dim: int):
        super().__init__()
        self.preprocess = preprocess
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.width = width
        self.head_dim = width // num_heads
        self.out_dim = out_dim

    @property
    def scale(self) -> float:
        """The standard attention scale head_dim^-0.5."""
        return self.head_dim**-0.5

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in the tower."""
        return len(self.blocks)

    def tokens_before_last_block(
        self, images: torch.Tensor, pos_rule: str, taps: Taps = NO_TAPS
    ) -> tuple[torch.Tensor, dict]:
        """Embed B x 3 x H x W images and run all blocks but the last, in one pass.

        Returns the B x L x C tokens entering the last block and a context dict for the head: ``grid``
        ``(h, w)`` (and the tower's own entries, e.g. RoPE); with ``taps``, also ``states`` and ``attention``
        (see :class:`Taps`).
        """
        x, context = self.embed(images, pos_rule)
        if not taps:
            return self.run_blocks(x, context, 0, self.num_blocks - 1), context
        last = self.num_blocks - 1
        wanted = set(taps.states) | set(taps.attention)
        if any(not isinstance(i, int) or not 0 <= i <= last for i in wanted) or 0 in taps.attention:
            raise ValueError(f"taps name blocks {sorted(wanted)}; this tower taps blocks 1..{last} (states also 0)")
        states, attention = {}, {}
        if 0 in taps.states:
            states[0] = x
        done = 0
        for block in sorted(wanted - {0}):
            x = self.run_blocks(x, context, done, block - 1)
            if block in taps.attention:
                x, attention[block] = self.block_with_attention(block - 1, x, context)
            else:
                x = self.run_blocks(x, context, block - 1, block)
            if block in taps.states:
                states[block] = x
            done = block
        x = self.run_blocks(x, context, done, last)
        context.update(states=states, attention=attention)
        return x, context

    def block_with_attention(self, index: int, x: torch.Tensor, context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``index`` (0-based) computed from its parts, with its attention probabilities.

        Returns:
            ``(y, weights)``: the block's B x L x C output and B x heads x L x L softmax(s q kᵀ).
        """
        q, k, v = self.qkv(self.norm1(x, index), index)
        q, k = self.rotate(q, k, context)
        weights = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        y = x + self.attn_out(weights @ v.to(weights.dtype), index)
        return y + self.ffn(y, index), weights

    def rotate(self, q: torch.Tensor, k: torch.Tensor, context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's rotary position embedding on q and k (identity for towers without RoPE)."""
        return q, k

    # The pieces below are implemented per tower. ``block`` indexes ``blocks`` (default: the last).
    def embed(self, images: torch.Tensor, pos_rule: str) -> tuple[torch.Tensor, dict]:
        """Patch embedding, prefix tokens and positions: B x 3 x H x W -> B x L x C tokens and the context."""
        raise NotImplementedError

    def run_blocks(self, x: torch.Tensor, context: dict, start: int, stop: int) -> torch.Tensor:
        """Blocks ``start..stop-1`` (0-based) through their own forward: B x L x C -> B x L x C."""
        raise NotImplementedError

    def norm1(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """A block's pre-attention norm (ln_1 / norm1): B x L x C -> B x L x C."""
        raise NotImplementedError

    def last_norm1(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's pre-attention norm (ln_1 / norm1): B x L x C -> B x L x C."""
        return self.norm1(x, -1)

    def qkv(self, x_normed: torch.Tensor, block: int = -1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block's q, k, v (biases included, unscaled, no RoPE): each B x heads x L x head_dim."""
        raise NotImplementedError

    def attn_out(self, heads_out: torch.Tensor, block: int = -1) -> torch.Tensor:
        """A block's attention output: B x heads x L x head_dim -> B x L x C (incl. layer scale)."""
        raise NotImplementedError

    def ffn(self, y: torch.Tensor, block: int = -1) -> torch.Tensor:
        """A block's FFN branch (without the residual): B x L x C -> B x L x C."""
        raise NotImplementedError

    def last_block(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        """The unchanged last block: B x L x C -> B x L x C."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and projection into the joint space: B x L x C -> B x L x D."""
        return self.post_proj(self.post_norm(x))

    def post_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm alone (``ln_post``): B x L x C -> B x L x C."""
        raise NotImplementedError

    def post_proj(self, x: torch.Tensor) -> torch.Tensor:
        """The projection alone, after :meth:`post_norm`: B x L x C -> B x L x D."""
        raise NotImplementedError

    # Parameter groups the trainers freeze or unfreeze.
    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The transformer blocks, first to last."""
        raise NotImplementedError

    def ffn_modules(self) -> list[torch.nn.Module]:
        """The last block's FFN branch (norm, MLP, layer scale): unused by the training-free heads."""
        raise NotImplementedError

    def key_parameters(self) -> list[torch.nn.Parameter]:
        """The last block's separate key projection, or ``[]`` when q, k, v share one packed matrix."""
        raise NotImplementedError

    @staticmethod
    def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
        """B x L x C -> B x heads x L x head_dim."""
        b, n, c = t.shape
        return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)

    @staticmethod
    def merge_heads(t: torch.Tensor) -> torch.Tensor:
        """B x heads x L x head_dim -> B x L x C."""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)
