"""open_clip's EVA02 towers (a timm ``Eva`` trunk, DeCLIP's backbone) as a :class:`DenseTower`."""

from __future__ import annotations

import torch
from timm.models.eva import Eva

from .base import DenseTower, Preprocess, resize_patch_pos_embed


class Eva02Tower(DenseTower):
    """Dense access to a timm EVA02 trunk (``visual.trunk``) through its own modules.

    The last block is ``trunk.blocks[-1]`` with ``norm1``, ``attn`` (``q_proj`` with the q bias,
    ``k_proj`` without bias, ``v_proj``, the sub-LN ``attn.norm`` = EVA-CLIP's ``inner_attn_ln``,
    ``proj``), optional ``gamma_1``/``gamma_2`` layer scales, ``norm2`` and the SwiGLU ``mlp``.
    After it come ``trunk.norm``, ``trunk.fc_norm`` and ``trunk.head`` (EVA-CLIP's projection).
    RoPE is rebuilt for every input grid (square or not) from the trunk's own rotary module.
    """

    kind = "eva02"
    # DeCLIP's EVA02 head multiplies by no scale (the `* self.scale` is commented out in the reference).
    declip_scale = 1.0

    def __init__(self, visual, preprocess: Preprocess):
        trunk = getattr(visual, "trunk", None)
        if not isinstance(trunk, Eva):
            raise ValueError("expected an open_clip TimmModel with a timm Eva trunk")
        block = trunk.blocks[-1]
        attn = block.attn
        if getattr(trunk, "rope_mixed", False):
            raise ValueError("EVA towers with mixed (per-block) RoPE are not supported")
        if attn.num_heads * attn.head_dim != trunk.embed_dim:
            raise ValueError("EVA towers with an attention width other than the embed width are not supported")
        out_dim = trunk.head.out_features if isinstance(trunk.head, torch.nn.Linear) else trunk.embed_dim
        super().__init__(preprocess, trunk.patch_embed.patch_size[0], attn.num_heads, trunk.embed_dim, out_dim)
        self.visual = visual
        self.trunk = trunk
        self.num_prefix_tokens = trunk.num_prefix_tokens

    def embed(self, images: torch.Tensor, pos_rule: str) -> tuple[torch.Tensor, dict]:
        t = self.trunk
        x = t.patch_embed.proj(images)  # B x C x h x w; the patch conv floors like the references
        b, c, h, w = x.shape
        x = t.patch_embed.norm(x.flatten(2).transpose(1, 2))
        prefix = []
        if t.cls_token is not None:
            prefix.append(t.cls_token.expand(b, -1, -1))
        if t.reg_token is not None:
            prefix.append(t.reg_token.expand(b, -1, -1))
        num_prefix = 0 if t.no_embed_class else t.num_prefix_tokens
        if t.pos_embed is not None:
            pos = t.pos_embed[0]
            patch_pos = resize_patch_pos_embed(pos[num_prefix:], (h, w), pos_rule)
            pos = torch.cat([pos[:num_prefix], patch_pos], dim=0).to(x.dtype)
            if t.no_embed_class:
                x = torch.cat(prefix + [x + pos], dim=1)
            else:
                x = torch.cat(prefix + [x], dim=1) + pos
        else:
            x = torch.cat(prefix + [x], dim=1)
        x = t.pos_drop(x)
        rope = self.rope_for((h, w))
        x = t.norm_pre(x)
        return x, {"grid": (h, w), "rope": rope}

    def run_blocks(self, x: torch.Tensor, context: dict, start: int, stop: int) -> torch.Tensor:
        for blk in self.trunk.blocks[start:stop]:
            x = blk(x, rope=context.get("rope"))
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, context: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's ``EvaAttention`` RoPE: the patch tokens of q and k rotated, the prefix tokens left alone."""
        rope = context.get("rope")
        if rope is None:
            return q, k
        from timm.layers import apply_rot_embed_cat

        npt = self.num_prefix_tokens
        half = getattr(self._block.attn, "rotate_half", False)

        def rot(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2)

        return rot(q), rot(k)

    def rope_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """RoPE sin/cos table ((h * w) x 2 * rope_dim) for a patch grid, square or not.

        timm caches the table of the construction grid and ignores ``shape`` in that mode, so other
        grids are built from the module's own frequency bands with the same ``ref_feat_shape`` rescale.
        """
        rope = self.trunk.rope
        if rope is None:
            return None
        if not getattr(rope, "_use_cached_embed", False):
            return rope.get_embed(shape=list(grid))
        if list(grid) == list(rope.feat_shape):
            return rope.get_embed()
        if not hasattr(rope, "_build_embed_cat"):
            raise ValueError(f"{type(rope).__name__} cannot be rebuilt for a {grid} grid")
        return rope._build_embed_cat(list(grid), rope.bands)

    @property
    def _block(self):
        return self.trunk.blocks[-1]

    def norm1(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        return self.trunk.blocks[block].norm1(x)

    def qkv(self, x_normed, block: int = -1):
        attn = self.trunk.blocks[block].attn
        if attn.qkv is not None:  # fused layout: k has a fixed zero bias
            bias = None
            if attn.q_bias is not None:
                bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            q, k, v = torch.nn.functional.linear(x_normed, attn.qkv.weight, bias).chunk(3, dim=-1)
        else:
            q, k, v = attn.q_proj(x_normed), attn.k_proj(x_normed), attn.v_proj(x_normed)
        q, k, v = (self.split_heads(t, self.num_heads) for t in (q, k, v))
        return attn.q_norm(q), attn.k_norm(k), v

    def attn_out(self, heads_out: torch.Tensor, block: int = -1) -> torch.Tensor:
        blk = self.trunk.blocks[block]
        out = blk.attn.proj(blk.attn.norm(self.merge_heads(heads_out)))
        return blk.gamma_1 * out if blk.gamma_1 is not None else out

    def ffn(self, y: torch.Tensor, block: int = -1) -> torch.Tensor:
        blk = self.trunk.blocks[block]
        out = blk.mlp(blk.norm2(y))
        return blk.gamma_2 * out if blk.gamma_2 is not None else out

    def last_block(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        return self._block(x, rope=context.get("rope"))

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.trunk.blocks

    def ffn_modules(self) -> list[torch.nn.Module]:
        blk = self._block
        return [blk.norm2, blk.mlp] + ([blk.gamma_2] if isinstance(blk.gamma_2, torch.nn.Parameter) else [])

    def key_parameters(self) -> list[torch.nn.Parameter]:
        attn = self._block.attn
        if attn.qkv is not None:
            return []
        return list(attn.k_proj.parameters())

    def post_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.fc_norm(self.trunk.norm(x))

    def post_proj(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.head(self.trunk.head(x))
