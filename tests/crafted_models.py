"""A tiny CLIP whose attention is known in advance: every token attends most to itself.

``ovdense-test-vit`` with crafted weights: the patch embedding and class embedding are zero, so every token is
its position embedding after ``ln_pre``; every block's attention output and MLP are zero, so the residual stream
never changes; q = k = 3 · ln_1(x) with no bias. After a LayerNorm every token has the same norm, so by
Cauchy-Schwarz q_i · k_j is largest at j = i: each token's attention (CLIP's, SCLIP's q-q + k-k) peaks at the
token itself, on any grid the position table is resized to.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from ovdense.weights import load_model


def self_attending_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    model = load_model("ovdense-test-vit").model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    visual = model.visual
    width = visual.conv1.weight.shape[0]
    state["visual.conv1.weight"].zero_()
    state["visual.class_embedding"].zero_()
    state["visual.positional_embedding"] = torch.randn(visual.positional_embedding.shape, generator=g) * 2
    for i, _ in enumerate(visual.transformer.resblocks):
        p = f"visual.transformer.resblocks.{i}."
        w = torch.zeros(3 * width, width)
        w[:width] = torch.eye(width) * 3
        w[width : 2 * width] = torch.eye(width) * 3
        w[2 * width :] = torch.randn(width, width, generator=g) * 0.1
        state[p + "attn.in_proj_weight"] = w
        state[p + "attn.in_proj_bias"] = torch.zeros(3 * width)
        for name in ("attn.out_proj.weight", "attn.out_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
            state[p + name].zero_()
    return state


def save_self_attending(path) -> str:
    """Write the crafted weights as a safetensors file (the format users load); returns the path."""
    save_file({k: v.contiguous() for k, v in self_attending_state_dict().items()}, str(path))
    return str(path)
