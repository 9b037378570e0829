"""Frozen teachers of the distillation objectives: Stable Diffusion and CLIP.

- The VFM teacher (DeCLIP's context teacher: patch tokens of the last block after the final norm, on a
  proxy image of ``grid * patch`` pixels, docs/design.md "DeCLIP training") is the library's
  :func:`ovdense.vfm.load_vfm` / :class:`ovdense.vfm.Vfm.features`.
- :func:`load_sd` / :class:`SdTeacher`: the extended recipe's Stable Diffusion self-attention chain
  (docs/design.md "Extended version (ours where unpublished)", SD-GSC), from a diffusers folder or hub id.
  diffusers / transformers are only imported here, inside :func:`load_sd` (the ``[diffusion]`` extra).
- :class:`ClipTeacher`: a frozen copy of the student's initial weights (crop [CLS] teacher).

Weights are never silently random: a real name without weights in the cache, offline, fails in seconds
with a one-line :class:`~ovdense.errors.OvdenseError` that says what to download or to pass a local file.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import OvdenseError, cause_line
from ..precision import autocast
from ..weights import model_folder_or_hub, resolve_device
from .losses import attention_chain as _chain
from .losses import resize_attention

__all__ = [
    "DEFAULT_SD_LAYERS",
    "DEFAULT_SD_MODEL",
    "AttentionCapture",
    "ClipTeacher",
    "SdTeacher",
    "load_sd",
    "resize_attention",
    "select_attn_layers",
]


DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
#: Ours: the up-path self-attention layers at the two finest resolutions
#: (docs/design.md "Extended version (ours where unpublished)").
DEFAULT_SD_LAYERS = "up-finest-2"

_SD_OFFLINE_HELP = (
    'On a machine with internet run `python -c "from diffusers import StableDiffusionPipeline; '
    "StableDiffusionPipeline.from_pretrained('{repo}')\"` and copy ~/.cache/huggingface/hub to this machine "
    "(or set HF_HUB_CACHE), or pass a local diffusers folder with --sd-model / model="
)
_DIFFUSION_EXTRA = "the Stable Diffusion teacher needs the diffusion extra: pip install 'ovdense[diffusion]'"


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

    Built by :func:`load_sd`. Per docs/design.md "Extended version (ours where unpublished)" (SD-GSC) with our
    defaults: the empty prompt, one UNet pass at ``timestep`` 100, ``up-finest-2`` layers.

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
    where, source, kw = model_folder_or_hub(
        model,
        "Stable Diffusion",
        ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
        "unet/config.json",
        _SD_OFFLINE_HELP,
    )
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
        raise OvdenseError(f"cannot load Stable Diffusion from {where}: {cause_line(err)}") from None
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
        with torch.no_grad(), autocast("auto", crops.device):  # fp16 on CUDA, fp32 elsewhere
            return self.model.encode_image(crops, normalize=True).float()
