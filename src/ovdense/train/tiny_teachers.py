"""Tiny random teacher for tests and smoke runs (never a stand-in for real weights).

- :func:`save_tiny_sd`: a Stable-Diffusion-shaped diffusers folder (VAE, UNet, CLIP text encoder and
  tokenizer, DDPM scheduler) of a few thousand random parameters, for :func:`~ovdense.train.teachers.load_sd`.

The random VFM test architectures (``test-dinov2``, ``test-dino``) are the library's: see :mod:`ovdense.vfm`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["save_tiny_sd"]


# -- Stable Diffusion ---------------------------------------------------------------------------------

_TOKENS = [c for c in "abcdefghijklmnopqrstuvwxyz"]
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_CONTEXT_LENGTH = 8


def _write_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer over single letters, in the file layout of SD 1.5's ``tokenizer/``.

    Written as files (not through ``CLIPTokenizer.save_pretrained``) because the constructor's arguments
    changed between transformers 4 (``vocab_file``) and 5 (``vocab``); ``from_pretrained`` reads both.

    Returns:
        The vocabulary size.
    """
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for c in _TOKENS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab[_BOS] = len(vocab)
    vocab[_EOS] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": _BOS, "eos_token": _EOS, "unk_token": _EOS, "pad_token": _EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": _CONTEXT_LENGTH, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return len(vocab)


def save_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion in the diffusers folder layout.

    Layout: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``.
    The VAE downsamples by 2 (a 32 px image -> 16 x 16 latent); the UNet has two resolutions with
    self-attention on both the down and the up path (``up_blocks.{0,1}.attentions.{0,1}...attn1``, so
    the default ``up-finest-2`` layer choice finds two resolutions), 2 heads, cross-attention width 16;
    the text encoder has width 16 and a context of 8 tokens. Weights are random (seeded).

    Args:
        folder: created if missing.
        seed: seed of the random weights.

    Returns:
        The folder.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16,
            attention_head_dim=2,  # diffusers reads this UNet argument as the number of heads
            norm_num_groups=4,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=_CONTEXT_LENGTH,
                bos_token_id=vocab_size - 2,
                eos_token_id=vocab_size - 1,
                pad_token_id=vocab_size - 1,
            )
        )
    # SD 1.5's training schedule.
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    scheduler.save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder
