"""Frozen teachers of the distillation objectives: a VFM (DINO / DINOv2 via timm), Stable Diffusion, CLIP.

- :func:`load_vfm` / :class:`VfmTeacher`: DeCLIP's context teacher. Patch tokens of the last block after
  the final norm, on a proxy image of ``grid * patch`` pixels (DESIGN "DeCLIP training").
- :func:`load_sd` / :class:`SdTeacher`: the extended recipe's Stable Diffusion self-attention chain
  (DESIGN "Extended version", SD-GSC), from a diffusers folder or hub id. diffusers / transformers are only
  imported here, inside :func:`load_sd` (the ``[diffusion]`` extra).
- :class:`ClipTeacher`: a frozen copy of the student's initial weights (crop [CLS] teacher).

Weights are never silently random: a real name without weights in the cache, offline, fails in seconds
with a one-line :class:`~ovdense.errors.OvdenseError` that says what to download or to pass a local file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OvdenseError, first_line
from ..weights import hub_reachable, load_strict, read_checkpoint, resolve_device
from .losses import attention_chain as _chain
from .losses import resize_attention
from .tiny_teachers import TEST_VFM_MODELS

__all__ = [
    "DEFAULT_SD_LAYERS",
    "DEFAULT_SD_MODEL",
    "VFM_MODELS",
    "AttentionCapture",
    "ClipTeacher",
    "SdTeacher",
    "VfmTeacher",
    "load_sd",
    "load_vfm",
    "resize_attention",
    "select_attn_layers",
]

#: VFM names (DeCLIP's options) -> timm model. DeCLIP's ``dinov2-B`` is torch hub's ``dinov2_vitb14_reg``,
#: the ViT-B/14 *with registers*, here ``dinov2-b-reg`` (the default of the B/16 recipe; L/14 uses
#: ``dinov2-l-reg``). DeCLIP's SAM options are not offered.
VFM_MODELS: dict[str, str] = {
    "dinov2-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-s-reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dino-b8": "vit_base_patch8_224.dino",
    "dino-b16": "vit_base_patch16_224.dino",
}

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Ours: the up-path self-attention layers at the two finest resolutions (DESIGN "Extended version").
DEFAULT_SD_LAYERS = "up-finest-2"

_VFM_OFFLINE_HELP = (
    "On a machine with internet run `python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"` "
    "and copy ~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), "
    "or pass a local weights file with --vfm-checkpoint / checkpoint="
)
_SD_OFFLINE_HELP = (
    'On a machine with internet run `python -c "from diffusers import StableDiffusionPipeline; '
    "StableDiffusionPipeline.from_pretrained('{repo}')\"` and copy ~/.cache/huggingface/hub to this machine "
    "(or set HF_HUB_CACHE), or pass a local diffusers folder with --sd-model / model="
)
_DIFFUSION_EXTRA = "the Stable Diffusion teacher needs the diffusion extra: pip install 'ovdense[diffusion]'"


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause (hub and timm errors wrap the one that says what happened)."""
    cause = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    return first_line(cause)


def _autocast(device: torch.device):
    """fp16 autocast on CUDA (DESIGN: the VFM "run in fp16"); plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


# -- VFM ------------------------------------------------------------------------------------------------


class VfmTeacher:
    """A frozen timm ViT giving dense patch features of a proxy image.

    Args:
        model: timm ViT (``VisionTransformer`` or any timm model with ``patch_embed`` and
            ``num_prefix_tokens``), built with ``dynamic_img_size=True``.
        name: the VFM name it was loaded under.
        source: where the weights came from.
        pos_interp: how the position table is resized to a proxy grid other than the pretraining one.
            ``reference`` (default): as the torch hub models DeCLIP ran, DINO's and DINOv2's own
            ``interpolate_pos_encoding``: without registers (DINO, DINOv2) bicubic with ``scale_factor =
            (n + 0.1) / M``, no antialias; with registers (``dinov2_vit*14_reg``, built with
            ``interpolate_offset=0, interpolate_antialias=True``) bicubic to the exact size, antialiased —
            the same as timm. ``timm``: timm's ``forward_features`` (exact size, antialiased). Only
            ``VisionTransformer`` models use ``reference``; other timm models always run ``timm``.
        is_test_model: a random test architecture.

    Attributes:
        patch_size: int, the square patch side.
        mean, std: normalisation of the proxy (ImageNet for DINO / DINOv2), from timm's pretrained cfg.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str = "",
        source: str = "",
        pos_interp: str = "reference",
        is_test_model: bool = False,
    ):
        if pos_interp not in ("reference", "timm"):
            raise OvdenseError(f"unknown position interpolation {pos_interp!r}; expected reference or timm")
        patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
        if patch is None or not hasattr(model, "num_prefix_tokens"):
            raise OvdenseError(f"VFM {name or type(model).__name__} is not a ViT with a patch embedding")
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise OvdenseError(f"VFM {name} has non-square patches {patch}; only square patches are supported")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.source = source
        self.pos_interp = pos_interp
        self.is_test_model = is_test_model
        self.patch_size = int(patch[0])
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", timm.data.IMAGENET_DEFAULT_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def proxy_size(self, grid: int) -> int:
        """Proxy image side for a ``grid`` x ``grid`` feature map (DeCLIP: (560 // 16) * 14 = 490)."""
        return int(grid) * self.patch_size

    def _reference_pos_embed(self, x: Tensor) -> Tensor:
        """timm's ``_pos_embed`` with DINO / DINOv2's position-table resize.

        Args:
            x: B x h x w x C patch embeddings (timm's NHWC output with ``dynamic_img_size``).

        Returns:
            B x (prefix + h*w) x C tokens with position embeddings, prefix (cls, registers) first.
        """
        m = self.model
        b, h, w, c = x.shape
        n_pre_pos = 0 if m.no_embed_class else m.num_prefix_tokens
        pos = m.pos_embed
        prefix_pos, patch_pos = pos[:, :n_pre_pos], pos[:, n_pre_pos:]
        gh, gw = m.patch_embed.grid_size
        if (h, w) != (gh, gw) and m.reg_token is not None:
            # DINOv2 with registers (hub: interpolate_offset=0, interpolate_antialias=True): exact size.
            table = patch_pos.float().reshape(1, gh, gw, c).permute(0, 3, 1, 2)
            table = F.interpolate(table, size=(h, w), mode="bicubic", antialias=True)
            patch_pos = table.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos.dtype)
        elif (h, w) != (gh, gw):
            # DINO, DINOv2 without registers: scale_factor (n + 0.1) / M rather than size=n: the sampling positions
            # differ slightly from an exact-size resize, and the weights were evaluated with these.
            table = patch_pos.float().reshape(1, gh, gw, c).permute(0, 3, 1, 2)
            table = F.interpolate(table, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic")
            if tuple(table.shape[-2:]) != (h, w):  # floor(M * (n + 0.1) / M) is n unless float error
                raise RuntimeError(f"position table resized to {tuple(table.shape[-2:])}, expected {(h, w)}")
            patch_pos = table.permute(0, 2, 3, 1).reshape(1, h * w, c).to(pos.dtype)
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            # DINOv2 with registers (timm layout): the cls position is folded into cls_token, registers have none.
            return torch.cat([*prefix, x + patch_pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)

    def _tokens(self, proxy: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """All tokens after the final norm (B x (prefix + h*w) x C) and the grid (h, w)."""
        m = self.model
        use_reference = (
            self.pos_interp == "reference"
            and isinstance(m, timm.models.vision_transformer.VisionTransformer)
            and m.pos_embed is not None
            and m.dynamic_img_size
        )
        if use_reference:
            x = m.patch_embed(proxy)  # B x h x w x C
            grid = (int(x.shape[1]), int(x.shape[2]))
            x = m.norm_pre(m.patch_drop(self._reference_pos_embed(x)))
            x = m.norm(m.blocks(x))
            return x, grid
        grid = (proxy.shape[-2] // self.patch_size, proxy.shape[-1] // self.patch_size)
        return m.forward_features(proxy), grid

    def features(self, proxy: Tensor) -> Tensor:
        """Dense VFM features: last block, after the final norm, patch tokens only.

        Equals DINOv2's ``get_intermediate_layers(x, reshape=True)[0]`` (norm=True) and DINO's
        ``get_intermediate_layers(x)[0][:, 1:]`` reshaped (with ``pos_interp="reference"``); the cls and
        register tokens (``num_prefix_tokens``) are dropped. fp16 autocast on CUDA, fp32 on the CPU.

        Args:
            proxy: B x 3 x P x P (or P_h x P_w) image normalised with :attr:`mean` / :attr:`std`;
                sides are multiples of :attr:`patch_size` (a remainder is cut off by the patch embedding).

        Returns:
            B x C x (P_h / patch) x (P_w / patch) float32, no grad.
        """
        if proxy.ndim != 4 or proxy.shape[1] != 3:
            raise ValueError(f"proxy: expected B x 3 x H x W, got {tuple(proxy.shape)}")
        proxy = proxy.to(self.device, torch.float32)
        with torch.no_grad(), _autocast(proxy.device):
            tokens, (h, w) = self._tokens(proxy)
        patches = tokens[:, self.model.num_prefix_tokens :].float()
        if patches.shape[1] != h * w:
            raise RuntimeError(f"VFM returned {patches.shape[1]} patch tokens for a {h} x {w} grid")
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)


def _resolve_vfm_name(name: str) -> tuple[str, bool]:
    """VFM name -> (timm model name, is a test architecture)."""
    if name in VFM_MODELS:
        return VFM_MODELS[name], False
    if name in TEST_VFM_MODELS:
        return TEST_VFM_MODELS[name], True
    if name.startswith("timm:"):
        timm_name = name[len("timm:") :]
        if not timm_name or not timm.is_model(timm_name):
            raise OvdenseError(f"unknown timm model {timm_name!r} (from {name!r}); see timm.list_models()")
        return timm_name, timm_name in TEST_VFM_MODELS.values()
    raise OvdenseError(
        f"unknown VFM {name!r}; available: {', '.join(VFM_MODELS)}, timm:<timm model name> "
        f"(test architecture: {', '.join(TEST_VFM_MODELS)})"
    )


def _check_timm_weights_available(name: str, timm_name: str) -> None:
    """Fail in seconds, not after the hub client's retries, when timm's weights can't be had.

    Weights already in the hub cache pass; offline (``HF_HUB_OFFLINE``) without them fails at once;
    otherwise the download host must accept a connection.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an invalid tag
        raise OvdenseError(f"{name}: {_first_line(err)}") from None
    if cfg is None or not cfg.has_weights:
        raise OvdenseError(f"timm has no pretrained weights for {timm_name}; pass a weights file with checkpoint=")
    if cfg.hf_hub_id:
        repo_id, _, revision = cfg.hf_hub_id.partition("@")
        # timm's names: an explicit filename, else model.safetensors before pytorch_model.bin.
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in files):
            return
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        else:
            reason = hub_reachable(constants.ENDPOINT)
    elif cfg.url:
        from timm.models._hub import check_cached_file

        if check_cached_file(cfg.url):
            return
        reason = hub_reachable(cfg.url)
    else:
        return  # a local file or state dict named by the cfg itself
    if reason:
        raise OvdenseError(
            f"weights for {name} ({timm_name}) are not in the local cache and could not be downloaded "
            f"({reason}). " + _VFM_OFFLINE_HELP.format(timm_name=timm_name)
        )


def _vfm_state_dict(path: str | Path, model: torch.nn.Module) -> dict[str, Tensor]:
    state_dict, _ = read_checkpoint(path)
    if "mask_token" in state_dict and isinstance(model, timm.models.vision_transformer.VisionTransformer):
        # DINOv2's own release files (dinov2_vit*14[_reg4]_pretrain.pth): timm's converter renames and folds
        # them into its layout (registers, the cls position); DINO's releases already use timm's keys.
        from timm.models.vision_transformer import checkpoint_filter_fn

        try:
            state_dict = checkpoint_filter_fn(dict(state_dict), model)
        except Exception as err:
            raise OvdenseError(f"checkpoint {path} does not fit the VFM: {_first_line(err)}") from None
    own = model.state_dict()
    # The teacher is built without a classifier (num_classes=0); a head in the file is unused, not a misfit.
    return {k: v for k, v in state_dict.items() if k in own or not k.startswith(("head.", "fc_norm."))}


def load_vfm(
    name: str = "dinov2-b-reg",
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    pos_interp: str = "reference",
) -> VfmTeacher:
    """Load a frozen VFM teacher.

    Args:
        name: ``dinov2-{s,b,l}``, ``dinov2-{s,b,l}-reg`` (with registers; DeCLIP's ``dinov2-B`` is
            ``dinov2-b-reg``, torch hub ``dinov2_vitb14_reg``), ``dino-b8``, ``dino-b16``, ``timm:<name>``
            (any timm ViT), or the random test architecture ``test-dinov2``.
        checkpoint: a local weights file (safetensors or torch; timm layout, or DINOv2's own release file);
            ``name`` picks the architecture, the file must fit it exactly (strict load; a classifier head
            in the file is ignored). Without it the
            weights come from the Hugging Face hub (cache) through timm.
        device: where to put the model.
        pos_interp: see :class:`VfmTeacher`.

    Raises:
        OvdenseError: unknown name, no weights (offline, not cached), missing / corrupt / mismatched file.
    """
    dev = resolve_device(device)
    timm_name, test_arch = _resolve_vfm_name(name)
    if checkpoint is None and not test_arch:
        _check_timm_weights_available(name, timm_name)
    pretrained = checkpoint is None and not test_arch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # test archs and the shell a checkpoint fills: reproducible init
            model = timm.create_model(timm_name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
    except Exception as err:
        if pretrained:
            raise OvdenseError(
                f"weights for {name} ({timm_name}) could not be loaded ({_first_line(err)}). "
                + _VFM_OFFLINE_HELP.format(timm_name=timm_name)
            ) from None
        raise OvdenseError(f"cannot build VFM {name} ({timm_name}): {_first_line(err)}") from None
    if checkpoint is not None:
        load_strict(model, _vfm_state_dict(checkpoint, model), f"VFM {name} ({timm_name})")
        source = str(checkpoint)
    elif test_arch:
        source = "random (test architecture)"
    else:
        source = f"timm {timm_name}"
    logging.getLogger(__name__).debug("loaded VFM %s from %s", name, source)
    return VfmTeacher(model.to(dev), name=name, source=source, pos_interp=pos_interp, is_test_model=test_arch)


# -- Stable Diffusion -----------------------------------------------------------------------------------


class AttentionCapture:
    """A diffusers attention processor that also hands its self-attention probabilities to a sink.

    Computes exactly what diffusers' ``AttnProcessor`` computes (explicit ``softmax(q kᵀ · scale)``, so
    the probabilities exist; the default SDPA processor gives the same output up to round-off), then calls
    ``sink(name, probs)`` with ``probs`` the head-averaged map, B x N_q x N_k float32, when a sink is set.

    Args:
        name: the attention module's name in the UNet (passed to the sink).
    """

    def __init__(self, name: str):
        self.name = name
        self.sink: Callable[[str, Tensor], None] | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)  # (B * heads) x N x d
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        # SD's UNet has no q/k norms; other UNets' (AttnProcessor2_0 applies them per head) are kept.
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B * heads) x N_q x N_k
        if self.sink is not None:
            # head_to_batch_dim orders the batch axis (image, head); the mean accumulates in fp32.
            self.sink(self.name, probs.unflatten(0, (batch, attn.heads)).mean(dim=1, dtype=torch.float32))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))  # linear, dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _up_levels(unet) -> dict[int, int]:
    """Up block index -> resolution level (0 = the finest; each upsampler after a block halves its level)."""
    blocks = list(unet.up_blocks)
    has_up = [getattr(b, "upsamplers", None) is not None for b in blocks]
    return {i: sum(has_up[i:]) for i in range(len(blocks))}


def select_attn_layers(unet, layers: str | Sequence[str] = DEFAULT_SD_LAYERS) -> list[str]:
    """Names of the UNet self-attention modules to capture, in execution order.

    Args:
        unet: a diffusers ``UNet2DConditionModel``.
        layers: ``up-finest-<k>``: every up-path ``attn1`` at the k finest up-path resolutions that have
            self-attention (ours, default k = 2; SD 1.5: ``up_blocks.{2,3}``, 32² and 64² tokens at 512 px);
            or module names (a list, or one comma-separated string), each a self-attention module.

    Raises:
        OvdenseError: an unknown selection, a name that is not a self-attention module, or nothing found.
    """
    from diffusers.models.attention_processor import Attention

    modules = dict(unet.named_modules())
    self_attn = [n for n, m in modules.items() if isinstance(m, Attention) and not m.is_cross_attention]
    if isinstance(layers, str) and layers.startswith("up-finest-"):
        k_text = layers[len("up-finest-") :]
        if not k_text.isdigit() or int(k_text) < 1:
            raise OvdenseError(f"unknown SD layer selection {layers!r}; expected up-finest-<k> with k >= 1")
        levels = _up_levels(unet)
        up = [
            (n, levels[int(n.split(".")[1])])
            for n in self_attn
            if re.match(r"up_blocks\.\d+\.", n) and n.endswith(".attn1")
        ]
        if not up:
            raise OvdenseError("the SD UNet has no self-attention (attn1) layers on its up path")
        finest = sorted({lvl for _, lvl in up})[: int(k_text)]
        return [n for n, lvl in up if lvl in finest]
    names = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else [str(s) for s in layers]
    names = [n for n in names if n]
    if not names:
        raise OvdenseError("no SD attention layers given")
    for n in names:
        if n not in self_attn:
            hint = "a cross-attention module" if n in modules else "not in the UNet"
            raise OvdenseError(f"SD layer {n!r} is {hint}; expected a self-attention module such as {self_attn[-1]}")
    order = {n: i for i, n in enumerate(self_attn)}  # named_modules follows the forward order of a UNet
    return sorted(dict.fromkeys(names), key=order.__getitem__)


def _token_grid(n_tokens: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Grid (h, w) of a UNet layer with ``n_tokens`` tokens: the latent halved (rounding up) f times."""
    h, w = latent_hw
    for _ in range(16):
        if h * w == n_tokens:
            return h, w
        if h == 1 and w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise RuntimeError(f"{n_tokens} attention tokens match no UNet resolution of a {latent_hw} latent")


class SdTeacher:
    """Frozen Stable Diffusion: the chained, head-averaged self-attention of one UNet pass.

    Built by :func:`load_sd`. Per DESIGN "Extended version" (SD-GSC) with our defaults: the empty prompt,
    one UNet pass at ``timestep`` 100, ``up-finest-2`` layers.

    Args:
        vae: diffusers ``AutoencoderKL``.
        unet: diffusers ``UNet2DConditionModel``.
        scheduler: a diffusers scheduler with ``add_noise`` (the model's DDPM training schedule).
        prompt_embeds: 1 x L x D text-encoder output for the empty prompt.
        timestep: the diffusion timestep of the noised latent (ours: 100).
        layers: see :func:`select_attn_layers`.
        seed: the noise generator is re-seeded with this at every call (so a given image always gets the
            same noise, on any device); each image of a batch still draws different noise.
        source: where the weights came from.
    """

    def __init__(
        self,
        vae,
        unet,
        scheduler,
        prompt_embeds: Tensor,
        timestep: int = 100,
        layers: str | Sequence[str] = DEFAULT_SD_LAYERS,
        seed: int = 0,
        source: str = "",
    ):
        n_train = int(scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < n_train:
            raise OvdenseError(f"SD timestep {timestep} is outside the model's 0..{n_train - 1}")
        self.vae = vae.eval().requires_grad_(False)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.timestep = int(timestep)
        self.seed = int(seed)
        self.source = source
        param = next(unet.parameters())
        self.prompt_embeds = prompt_embeds.to(param.device, param.dtype)
        self.layers = select_attn_layers(unet, layers)
        modules = dict(unet.named_modules())
        # Only the chosen modules get the capturing processor: the others keep the fast default (SDPA).
        self._processors = {n: AttentionCapture(n) for n in self.layers}
        for n, proc in self._processors.items():
            modules[n].set_processor(proc)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def latents(self, sd_image: Tensor) -> Tensor:
        """VAE latents: the posterior mean (deterministic; ours, rather than a sample) times the scaling factor.

        Args:
            sd_image: B x 3 x H x W in [-1, 1], sides multiples of the VAE's and UNet's downsampling.

        Returns:
            B x 4 x H/8 x W/8 (SD 1.5) in the model's dtype.
        """
        x = sd_image.to(self.device, self.dtype)
        with torch.no_grad():
            return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def capture(self, sd_image: Tensor, grid: Sequence[int] | None = None) -> dict[str, Tensor]:
        """Self-attention maps of the chosen layers, from one UNet pass over the noised latent.

        Args:
            sd_image: B x 3 x H x W in [-1, 1].
            grid: (h, w): bring every map to this token grid (:func:`resize_attention`) as soon as it is
                captured, which keeps only small maps in memory; None: the layers' own grids.

        Returns:
            layer name -> B x N x N float32 row-stochastic map (N = h*w, or the layer's token count), in
            the order the UNet ran them.
        """
        if sd_image.ndim != 4 or sd_image.shape[1] != 3:
            raise ValueError(f"sd_image: expected B x 3 x H x W, got {tuple(sd_image.shape)}")
        with torch.no_grad():
            lat = self.latents(sd_image)
            b = lat.shape[0]
            # CPU generator: the same noise for a given seed whatever the device.
            gen = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(lat.shape, generator=gen, dtype=torch.float32).to(lat.device, lat.dtype)
            t = torch.full((b,), self.timestep, dtype=torch.long, device=lat.device)
            noisy = self.scheduler.add_noise(lat, noise, t)
            latent_hw = (int(lat.shape[-2]), int(lat.shape[-1]))
            maps: dict[str, Tensor] = {}

            def sink(name: str, attn: Tensor) -> None:
                if grid is not None:
                    attn = resize_attention(attn, _token_grid(attn.shape[-1], latent_hw), grid)
                maps[name] = attn

            for proc in self._processors.values():
                proc.sink = sink
            try:
                self.unet(noisy, t, encoder_hidden_states=self.prompt_embeds.expand(b, -1, -1))
            finally:
                for proc in self._processors.values():
                    proc.sink = None
        return maps

    def attention_chain(self, sd_image: Tensor, grid: Sequence[int]) -> Tensor:
        """Â = A_1 @ A_2 @ … of the captured maps (capture order), each resized to ``grid``.

        Args:
            sd_image: B x 3 x H x W in [-1, 1] (SD 1.5: 512 x 512).
            grid: (h, w) of the VFM feature map.

        Returns:
            B x (h·w) x (h·w) float32, row-stochastic.
        """
        maps = self.capture(sd_image, grid=tuple(int(v) for v in grid))
        return _chain(list(maps.values()))


def _import_diffusion():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise OvdenseError(_DIFFUSION_EXTRA) from None
    return diffusers, transformers


def _looks_like_path(model: str) -> bool:
    """A string meant as a folder rather than a hub id ('org/name')."""
    return model.startswith((".", "/", "~")) or model.count("/") != 1 or "\\" in model


def _check_sd_available(repo: str) -> bool:
    """True when the hub is unreachable but the cache has the model (then load with local_files_only)."""
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo, "unet/config.json"), str)
    if constants.HF_HUB_OFFLINE:
        reason = None if cached else "HF_HUB_OFFLINE is set"
    else:
        reason = hub_reachable(constants.ENDPOINT)
        if reason and cached:
            return True
    if reason:
        raise OvdenseError(
            f"Stable Diffusion {repo} is not in the local cache and could not be downloaded ({reason}). "
            + _SD_OFFLINE_HELP.format(repo=repo)
        )
    return False


def load_sd(
    model: str | Path = DEFAULT_SD_MODEL,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype | None = None,
    timestep: int = 100,
    layers: str | Sequence[str] = DEFAULT_SD_LAYERS,
    seed: int = 0,
) -> SdTeacher:
    """Load a frozen Stable Diffusion teacher (VAE, UNet, scheduler; the empty prompt encoded once).

    Args:
        model: a diffusers hub id (default SD 1.5) or a local diffusers folder with ``unet/``, ``vae/``,
            ``text_encoder/``, ``tokenizer/``, ``scheduler/``.
        device: where to put the VAE and UNet.
        dtype: their dtype; None: fp16 on CUDA, fp32 elsewhere.
        timestep, layers, seed: see :class:`SdTeacher`.

    Raises:
        OvdenseError: diffusers / transformers missing (the ``[diffusion]`` extra), a missing or incomplete
            folder, weights not cached while offline, unreadable weights.
    """
    _import_diffusion()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    text = str(model)
    local = Path(text).expanduser()
    local_only = False
    if local.is_dir():
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (local / s).is_dir()]
        if missing:
            raise OvdenseError(f"{local} is not a diffusers Stable Diffusion folder (no {', '.join(missing)}/)")
        source, where = str(local), str(local)
    elif local.is_file():
        raise OvdenseError(f"{local} is a file; the Stable Diffusion teacher needs a diffusers folder or hub id")
    elif _looks_like_path(text):
        raise OvdenseError(f"Stable Diffusion folder not found: {local}")
    else:
        local_only = _check_sd_available(text)
        source, where = f"hub {text}", text
    kw = {"local_files_only": True} if local_only else {}
    # diffusers defaults to low_cpu_mem_usage and warns when accelerate (which it needs) is absent.
    low_mem = {"low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kw).eval()
        # The empty prompt, padded to the context length as SD's pipelines do; the encoder is dropped after.
        ids = tokenizer(
            "", padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            prompt_embeds = text_encoder(ids)[0]  # 1 x L x D
        del text_encoder
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **low_mem, **kw)
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **low_mem, **kw)
        scheduler = DDPMScheduler.from_pretrained(where, subfolder="scheduler", **kw)
    except OvdenseError:
        raise
    except Exception as err:
        raise OvdenseError(f"cannot load Stable Diffusion from {where}: {_first_line(err)}") from None
    return SdTeacher(
        vae.to(dev),
        unet.to(dev),
        scheduler,
        prompt_embeds,
        timestep=timestep,
        layers=layers,
        seed=seed,
        source=source,
    )


# -- CLIP -----------------------------------------------------------------------------------------------


class ClipTeacher:
    """A frozen deep copy of the student's initial open_clip model (crop [CLS] teacher, ensembling partner).

    Args:
        model: the open_clip model (``CLIP`` / ``CustomTextCLIP``); copied, so training the student later
            does not move the teacher.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def crop_embeddings(self, crops: Tensor) -> Tensor:
        """L2-normalised image embeddings of crops: the vanilla forward, [CLS] -> norm -> head.

        Args:
            crops: K x 3 x c x c, CLIP-normalised, at the tower's input size.

        Returns:
            K x D float32, no grad (fp16 autocast on CUDA).
        """
        crops = crops.to(self.device)
        with torch.no_grad(), _autocast(crops.device):
            return self.model.encode_image(crops, normalize=True).float()
