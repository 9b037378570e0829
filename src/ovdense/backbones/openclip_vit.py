"""open_clip's ``VisionTransformer`` (OpenAI, LAION, MetaCLIP, DFN... ViTs) as a :class:`DenseTower`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer

from .base import DenseTower, Preprocess, resize_patch_pos_embed


class OpenClipViTTower(DenseTower):
    """Dense access to an open_clip ``VisionTransformer`` through its own modules.

    The last block is ``visual.transformer.resblocks[-1]`` with ``ln_1``, ``attn`` (an
    ``nn.MultiheadAttention``: ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``ls_1``,
    ``ln_2``, ``mlp``, ``ls_2``; after it come ``ln_post`` and ``proj``.
    """

    kind = "openclip-vit"
    num_prefix_tokens = 1
    region_tokens_normalized = True

    def __init__(self, visual: VisionTransformer, preprocess: Preprocess):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("ViTs with attentional pooling (CoCa) have no dense head in ovdense")
        block = visual.transformer.resblocks[-1]
        if not hasattr(block, "attn") or not hasattr(block.attn, "in_proj_weight"):
            raise ValueError("this ViT's last block has no packed in_proj attention; it is not supported")
        width = block.attn.embed_dim
        out_dim = visual.proj.shape[1] if visual.proj is not None else width
        super().__init__(preprocess, visual.patch_size[0], block.attn.num_heads, width, out_dim)
        self.visual = visual
        # DeCLIP's OpenAI-ViT path scales its attention logits by head_dim^-0.5.
        self.declip_scale = self.scale

    def _run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        batch_first = getattr(self.visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for blk in blocks:
            x = blk(x)
        return x if batch_first else x.transpose(0, 1)

    def run_blocks(self, x: torch.Tensor, context: dict, start: int, stop: int) -> torch.Tensor:
        return self._run_blocks(self.visual.transformer.resblocks[start:stop], x)

    def embed(self, images: torch.Tensor, pos_rule: str) -> tuple[torch.Tensor, dict]:
        v = self.visual
        x = v.conv1(images)  # B x C x h x w
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, c).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding
        patch_pos = resize_patch_pos_embed(pos[1:], (h, w), pos_rule)
        x = x + torch.cat([pos[:1], patch_pos], dim=0).to(x.dtype)
        x = v.patch_dropout(x)
        x = v.ln_pre(x)
        return x, {"grid": (h, w)}

    @property
    def _block(self):
        return self.visual.transformer.resblocks[-1]

    def norm1(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        return self.blocks[block].ln_1(x)

    def qkv(self, x_normed, block: int = -1):
        attn = self.blocks[block].attn
        q, k, v = F.linear(x_normed, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return tuple(self.split_heads(t, self.num_heads) for t in (q, k, v))

    def attn_out(self, heads_out: torch.Tensor, block: int = -1) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls_1(blk.attn.out_proj(self.merge_heads(heads_out)))

    def ffn(self, y: torch.Tensor, block: int = -1) -> torch.Tensor:
        blk = self.blocks[block]
        return blk.ls_2(blk.mlp(blk.ln_2(y)))

    def last_block(self, x: torch.Tensor, context: dict) -> torch.Tensor:
        return self._run_blocks([self._block], x)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        return self.visual.transformer.resblocks

    def ffn_modules(self) -> list[torch.nn.Module]:
        return [self._block.ln_2, self._block.mlp, self._block.ls_2]

    def key_parameters(self) -> list[torch.nn.Parameter]:
        # k lives in rows C..2C of the packed in_proj: it cannot be frozen on its own (nor does DeCLIP).
        return []

    def post_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(x)

    def post_proj(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.visual.proj if self.visual.proj is not None else x
