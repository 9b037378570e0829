"""Vision foundation models (VFMs): frozen DINO / DINOv2 ViTs through timm, for dense features.

- :func:`load_vfm` -> :class:`Vfm`: a named VFM (:data:`VFM_MODELS`, ``timm:<name>``, or a random test
  architecture of :data:`TEST_VFM_MODELS`) with weights from the Hugging Face hub cache or a local file.
- :meth:`Vfm.features`: patch tokens of the last block after the final norm (DeCLIP's context teacher,
  ProxyCLIP's proxy features); :meth:`Vfm.last_qk`: q + k of the last block (CorrCLIP's DINO feature).
- :func:`resize_pos_table`: the position-table rules of DINO and DINOv2 (with registers) for other grids.

Weights are never silently random: a real name without weights in the cache, offline, fails in seconds
with a one-line :class:`~ovdense.errors.OvdenseError` that says what to download or to pass a local file;
a test architecture warns once per process (:class:`~ovdense.errors.RandomWeightsWarning`).

Importing this module registers the test architectures with timm (idempotent). ``import ovdense`` does not
import it: it loads torch and timm.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from .errors import InvalidArgumentError, OvdenseError, RandomWeightsWarning, cause_line
from .precision import autocast
from .weights import hub_reachable, load_strict, read_checkpoint, resolve_device

__all__ = [
    "POS_INTERP",
    "POS_RULES",
    "TEST_DINOV2_ARCH",
    "TEST_DINO_ARCH",
    "TEST_VFM_MODELS",
    "VFM_MODELS",
    "Vfm",
    "check_timm_weights_available",
    "load_vfm",
    "ovdense_test_dino",
    "ovdense_test_dinov2",
    "resize_pos_table",
    "vfm_state_dict",
]

#: VFM names -> timm model. DeCLIP's ``dinov2-B`` is torch hub's ``dinov2_vitb14_reg``, the ViT-B/14 *with
#: registers*, here ``dinov2-b-reg`` (the default of the B/16 recipe; L/14 uses ``dinov2-l-reg``). DINO's
#: ViT-B/8 (``dino-b8``) is ProxyCLIP's and CorrCLIP's default.
VFM_MODELS: dict[str, str] = {
    "dinov2-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-s-reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dino-s8": "vit_small_patch8_224.dino",
    "dino-s16": "vit_small_patch16_224.dino",
    "dino-b8": "vit_base_patch8_224.dino",
    "dino-b16": "vit_base_patch16_224.dino",
}

TEST_DINOV2_ARCH = "ovdense_test_dinov2"
TEST_DINO_ARCH = "ovdense_test_dino"
#: VFM names of the random test architectures -> timm architecture. The ``test`` in both names is there so
#: that nobody mistakes one for a real DINO / DINOv2.
TEST_VFM_MODELS: dict[str, str] = {"test-dinov2": TEST_DINOV2_ARCH, "test-dino": TEST_DINO_ARCH}

#: :class:`Vfm` ``pos_interp`` options.
POS_INTERP = ("reference", "timm")
#: :func:`resize_pos_table` rules.
POS_RULES = ("dino", "dinov2-reg")

_VFM_OFFLINE_HELP = (
    "On a machine with internet run `python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"` "
    "and copy ~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), "
    "or pass a local weights file with --vfm-checkpoint / checkpoint="
)

#: Test architectures already warned about in this process.
_WARNED_RANDOM: set[str] = set()


# -- test architectures ---------------------------------------------------------------------------------

_TEST_CFG = {
    "mean": IMAGENET_DEFAULT_MEAN,
    "std": IMAGENET_DEFAULT_STD,
    "interpolation": "bicubic",
    "crop_pct": 1.0,
    "num_classes": 0,
    "first_conv": "patch_embed.proj",
    "classifier": "head",
}
# register_model reads this module's ``default_cfgs``: no url / hub id, so timm knows they have no weights.
default_cfgs = generate_default_cfgs(
    {
        TEST_DINOV2_ARCH: {"input_size": (3, 56, 56), **_TEST_CFG},
        TEST_DINO_ARCH: {"input_size": (3, 64, 64), **_TEST_CFG},
    }
)


def ovdense_test_dinov2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 2-block, width-32 ViT/14 laid out like DINOv2 with registers (random init only).

    4 register tokens, layer scale, ``no_embed_class`` (timm's DINOv2 layout: the cls position folded into
    the cls token), 2 heads, native 56 px (a 4 x 4 grid).
    """
    if pretrained:
        raise ValueError(f"{TEST_DINOV2_ARCH} is a random test architecture; it has no pretrained weights")
    args = dict(
        img_size=56,
        patch_size=14,
        embed_dim=32,
        depth=2,
        num_heads=2,
        init_values=1e-5,
        reg_tokens=4,
        no_embed_class=True,
        num_classes=0,
    )
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, TEST_DINOV2_ARCH, pretrained=False, **args)


def ovdense_test_dino(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 2-block, width-32 ViT/8 laid out like DINO's ``vit_*_patch8_224.dino`` (random init only).

    A cls token with its own position (``pos_embed`` is 1 x (1 + 64) x 32), no registers, no layer scale,
    qkv bias, 4 heads, native 64 px (an 8 x 8 grid). The stand-in for ``dino-b8`` in tests.
    """
    if pretrained:
        raise ValueError(f"{TEST_DINO_ARCH} is a random test architecture; it has no pretrained weights")
    args = dict(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=4, qkv_bias=True, num_classes=0)
    args.update(kwargs)
    return build_model_with_cfg(VisionTransformer, TEST_DINO_ARCH, pretrained=False, **args)


# Registering twice (a reload of this module) would make timm warn and clear the first entry's cfgs.
for _entry in (ovdense_test_dinov2, ovdense_test_dino):
    if not timm.is_model(_entry.__name__):
        register_model(_entry)


# -- position tables ------------------------------------------------------------------------------------


def resize_pos_table(
    patch_pos: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], rule: str = "dino"
) -> Tensor:
    """Resize a ViT's patch position table to another grid, the way DINO / DINOv2 do it.

    Args:
        patch_pos: 1 x (G_h * G_w) x C patch positions (no prefix-token entries), row-major.
        old_grid: (G_h, G_w) of the table.
        new_grid: (h, w) wanted.
        rule: ``dino``: DINO's (and DINOv2-without-registers') ``interpolate_pos_encoding``: bicubic with
            ``scale_factor = ((h + 0.1) / G_h, (w + 0.1) / G_w)``, align_corners False, no antialias (the
            sampling positions differ slightly from an exact-size resize, and the weights were evaluated
            with these). ``dinov2-reg``: DINOv2 with registers (torch hub ``dinov2_vit*14_reg``, built with
            ``interpolate_offset=0, interpolate_antialias=True``): bicubic to the exact size, antialiased —
            the same as timm's ``dynamic_img_size`` resample.

    Returns:
        1 x (h * w) x C in the dtype of ``patch_pos`` (interpolated in float32); the table itself when the
        grids are equal.
    """
    if rule not in POS_RULES:
        raise InvalidArgumentError(f"rule: unknown position-table rule {rule!r}; expected one of {POS_RULES}")
    (gh, gw), (h, w) = (int(old_grid[0]), int(old_grid[1])), (int(new_grid[0]), int(new_grid[1]))
    c = patch_pos.shape[-1]
    if patch_pos.ndim != 3 or patch_pos.shape[:2] != (1, gh * gw):
        raise InvalidArgumentError(f"patch_pos: expected 1 x {gh * gw} x C, got {tuple(patch_pos.shape)}")
    if (h, w) == (gh, gw):
        return patch_pos
    table = patch_pos.float().reshape(1, gh, gw, c).permute(0, 3, 1, 2)
    if rule == "dinov2-reg":
        table = F.interpolate(table, size=(h, w), mode="bicubic", antialias=True)
    else:
        table = F.interpolate(table, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic")
        if tuple(table.shape[-2:]) != (h, w):  # floor(G * (n + 0.1) / G) is n unless float error
            raise RuntimeError(f"position table resized to {tuple(table.shape[-2:])}, expected {(h, w)}")
    return table.permute(0, 2, 3, 1).reshape(1, h * w, c).to(patch_pos.dtype)


# -- the model ------------------------------------------------------------------------------------------


class Vfm:
    """A frozen timm ViT giving dense patch features of an image.

    Args:
        model: timm ViT (``VisionTransformer`` or any timm model with ``patch_embed`` and
            ``num_prefix_tokens``), built with ``dynamic_img_size=True``.
        name: the VFM name it was loaded under.
        source: where the weights came from.
        pos_interp: how the position table is resized to a grid other than the pretraining one.
            ``reference`` (default): as the torch hub models the references ran, DINO's and DINOv2's own
            ``interpolate_pos_encoding`` (:func:`resize_pos_table`): rule ``dino`` without registers (DINO,
            DINOv2), ``dinov2-reg`` with registers (the same as timm). ``timm``: timm's own resample (exact
            size, antialiased). Only ``VisionTransformer`` models use ``reference``; other timm models
            always run ``timm``.
        is_test_model: a random test architecture.

    Attributes:
        model, name, source, pos_interp, is_test_model: as given (the model in eval mode, no grad).
        patch_size: int, the square patch side.
        mean, std: 3-tuples, the normalisation of the input (ImageNet for DINO / DINOv2), from timm's
            pretrained cfg.
        device: the model's device (a property).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str = "",
        source: str = "",
        pos_interp: str = "reference",
        is_test_model: bool = False,
    ):
        if pos_interp not in POS_INTERP:
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
        self.mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def proxy_size(self, grid: int) -> int:
        """Image side for a ``grid`` x ``grid`` feature map (DeCLIP's proxy: (560 // 16) * 14 = 490)."""
        return int(grid) * self.patch_size

    def _is_vit(self) -> bool:
        return isinstance(self.model, VisionTransformer)

    def _use_reference(self) -> bool:
        m = self.model
        return self.pos_interp == "reference" and self._is_vit() and m.pos_embed is not None and m.dynamic_img_size

    def _reference_pos_embed(self, x: Tensor) -> Tensor:
        """timm's ``_pos_embed`` with DINO / DINOv2's position-table rule.

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
        rule = "dino" if m.reg_token is None else "dinov2-reg"
        patch_pos = resize_pos_table(patch_pos, tuple(m.patch_embed.grid_size), (h, w), rule=rule)
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if m.no_embed_class:
            # DINOv2 with registers (timm layout): the cls position is folded into cls_token, registers have none.
            return torch.cat([*prefix, x + patch_pos], dim=1)
        return torch.cat([*prefix, x], dim=1) + torch.cat([prefix_pos, patch_pos], dim=1)

    def _embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The input of the first block, B x (prefix + h*w) x C, and the grid (h, w); ``VisionTransformer`` only.

        Exactly timm's ``forward_features`` up to the blocks, with :meth:`_reference_pos_embed` in place of
        timm's position step under ``pos_interp="reference"``.
        """
        m = self.model
        x = m.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: B x h x w x C
            grid = (int(x.shape[1]), int(x.shape[2]))
        else:  # a fixed input size: B x N x C on the pretraining grid
            grid = tuple(int(v) for v in m.patch_embed.grid_size)
        x = self._reference_pos_embed(x) if self._use_reference() else m._pos_embed(x)
        return m.norm_pre(m.patch_drop(x)), grid

    def _check_images(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidArgumentError(f"images: expected B x 3 x H x W, got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """All tokens of the last block after the final norm, and the patch grid.

        fp16 autocast on CUDA (the precision the references run their VFMs in), fp32 on the CPU.

        Args:
            images: B x 3 x H x W normalised with :attr:`mean` / :attr:`std`; sides are multiples of
                :attr:`patch_size` (a remainder is cut off by the patch embedding).

        Returns:
            (B x (prefix + h*w) x C float32 tokens, prefix (``model.num_prefix_tokens``: cls, registers)
            first, patches row-major; (h, w) = (H // patch, W // patch)), no grad.
        """
        images = self._check_images(images)
        m = self.model
        with torch.no_grad(), autocast("auto", images.device):
            if self._is_vit():
                x, grid = self._embed(images)
                x = m.norm(m.blocks(x))
            else:
                grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
                x = m.forward_features(images)
        return x.float(), grid

    def _patch_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """B x (prefix + h*w) x C -> B x C x h x w, the prefix tokens dropped."""
        h, w = grid
        patches = tokens[:, self.model.num_prefix_tokens :]
        if patches.shape[1] != h * w:
            raise RuntimeError(f"VFM returned {patches.shape[1]} patch tokens for a {h} x {w} grid")
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)

    def features(self, images: Tensor) -> Tensor:
        """Dense VFM features: last block, after the final norm, patch tokens only.

        Equals DINOv2's ``get_intermediate_layers(x, reshape=True)[0]`` (norm=True) and DINO's
        ``get_intermediate_layers(x)[0][:, 1:]`` reshaped (with ``pos_interp="reference"``); the cls and
        register tokens (``num_prefix_tokens``) are dropped. fp16 autocast on CUDA, fp32 on the CPU.

        Args:
            images: B x 3 x H x W (see :meth:`tokens`).

        Returns:
            B x C x (H / patch) x (W / patch) float32, no grad.
        """
        return self._patch_map(*self.tokens(images))

    def _last_block(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The last block and its attention module, checked to be timm's fused-qkv ``Attention`` (DINO / DINOv2)."""
        m = self.model
        last = m.blocks[-1] if self._is_vit() and len(m.blocks) else None
        attn = getattr(last, "attn", None)
        qkv = getattr(attn, "qkv", None)
        # q / k norms would act per head after the projection: the raw sum would not be the model's q + k.
        plain_qk = all(
            isinstance(getattr(attn, n, None), (torch.nn.Identity, type(None))) for n in ("q_norm", "k_norm")
        )
        if not isinstance(qkv, torch.nn.Linear) or not hasattr(last, "norm1") or not plain_qk:
            raise OvdenseError(
                f"VFM {self.name or type(m).__name__}: this needs a timm VisionTransformer whose last block "
                "has a fused qkv projection and no q/k norms (DINO / DINOv2)"
            )
        return last, attn

    def _last_qkv(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """B x N x 3·attn_dim: the last block's fused (q, k, v) of all tokens (heads concatenated in each)."""
        last, attn = self._last_block()
        images = self._check_images(images)
        with torch.no_grad(), autocast("auto", images.device):
            x, grid = self._embed(images)
            x = self.model.blocks[:-1](x)
            out = attn.qkv(last.norm1(x)).float()
        return out, grid

    def last_qk(self, images: Tensor) -> Tensor:
        """CorrCLIP's DINO feature: q + k of the last block, patch tokens only, not normalised.

        With x the input of the last block (position rule as :meth:`features`): ``qkv = attn.qkv(norm1(x))``
        (biases included), q = its first ``attn_dim`` channels, k the next ``attn_dim`` (heads concatenated,
        timm's fused layout), summed; the prefix tokens are dropped. The blocks are run here (no hooks); the
        last block's attention itself is not computed. fp16 autocast on CUDA, fp32 on the CPU.

        Args:
            images: B x 3 x H x W (see :meth:`tokens`).

        Returns:
            B x attn_dim x (H / patch) x (W / patch) float32 (attn_dim = C for DINO), no grad.

        Raises:
            OvdenseError: the model is not a timm ``VisionTransformer`` whose last block has a fused qkv
                projection without q / k norms.
        """
        out, grid = self._last_qkv(images)
        d = out.shape[-1] // 3
        return self._patch_map(out[..., :d] + out[..., d : 2 * d], grid)

    def last_attention(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """The last block's attention probabilities, averaged over heads (DINO's attention maps).

        softmax(s q kᵀ) per head with timm's scale s = head_dim^-0.5, over every token (prefix first: [CLS],
        registers; then the patches row-major), then the mean over heads. fp16 autocast on CUDA, fp32 on the CPU.

        Args:
            images: B x 3 x H x W (see :meth:`tokens`).

        Returns:
            (B x N x N float32, N = ``model.num_prefix_tokens`` + h·w; the grid (h, w)), no grad.
        """
        _, attn = self._last_block()
        out, grid = self._last_qkv(images)
        b, n, _ = out.shape
        heads = attn.num_heads
        q, k, _ = out.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)  # each B x heads x N x head_dim
        weights = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)
        return weights.mean(dim=1), grid


# -- loading --------------------------------------------------------------------------------------------


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
        f"(test architectures: {', '.join(TEST_VFM_MODELS)})"
    )


def check_timm_weights_available(name: str, timm_name: str) -> None:
    """Fail in seconds, not after the hub client's retries, when timm's weights can't be had.

    Weights already in the hub cache pass; offline (``HF_HUB_OFFLINE``) without them fails at once;
    otherwise the download host must accept a connection.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an invalid tag
        raise OvdenseError(f"{name}: {cause_line(err)}") from None
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


#: Keys that mark a DINOv3 (``storage_tokens``) or Perception Encoder (``conv1.weight``) release file.
_EVA_RELEASE_KEYS = ("storage_tokens", "conv1.weight", "visual.conv1.weight")


def vfm_state_dict(path: str | Path, model: torch.nn.Module) -> dict[str, Tensor]:
    """A weights file as a state dict in timm's layout for ``model`` (a timm ``VisionTransformer`` or ``Eva``).

    Release layouts timm converts are converted: DINOv2's own files (``mask_token``) for a ``VisionTransformer``;
    DINOv3's (``storage_tokens``) and Perception Encoder's (``conv1.weight``) for an ``Eva``.
    """
    from timm.models.eva import Eva

    state_dict, _ = read_checkpoint(path)
    converter = None
    if "mask_token" in state_dict and isinstance(model, VisionTransformer):
        # DINOv2's own release files (dinov2_vit*14[_reg4]_pretrain.pth): timm's converter renames and folds
        # them into its layout (registers, the cls position); DINO's releases already use timm's keys.
        from timm.models.vision_transformer import checkpoint_filter_fn as converter
    elif isinstance(model, Eva) and any(k in state_dict for k in _EVA_RELEASE_KEYS):
        # DINOv3's release files (dinov3_vit*_pretrain_*.pth) and PE's (PE-Spatial-*.pt): timm's Eva converter.
        from timm.models.eva import checkpoint_filter_fn as converter
    if converter is not None:
        try:
            state_dict = converter(dict(state_dict), model)
        except Exception as err:
            raise OvdenseError(f"checkpoint {path} does not fit the VFM: {cause_line(err)}") from None
    own = model.state_dict()
    # The VFM is built without a classifier (num_classes=0); a head in the file is unused, not a misfit.
    return {k: v for k, v in state_dict.items() if k in own or not k.startswith(("head.", "fc_norm."))}


def load_vfm(
    name: str = "dinov2-b-reg",
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    pos_interp: str = "reference",
) -> Vfm:
    """Load a frozen VFM.

    Args:
        name: ``dinov2-{s,b,l}``, ``dinov2-{s,b,l}-reg`` (with registers; DeCLIP's ``dinov2-B`` is
            ``dinov2-b-reg``, torch hub ``dinov2_vitb14_reg``), ``dino-{s,b}{8,16}``, ``timm:<name>`` (any
            timm ViT), or a random test architecture ``test-dinov2`` / ``test-dino`` (warns once).
        checkpoint: a local weights file (safetensors or torch; timm layout, DINO's release files, which
            use timm's keys, or DINOv2's own release files); ``name`` picks the architecture, the file must
            fit it exactly (strict load; a classifier head in the file is ignored). Without it the weights
            come from the Hugging Face hub (cache) through timm.
        device: where to put the model (None: CUDA when present).
        pos_interp: see :class:`Vfm`.

    Raises:
        OvdenseError: unknown name, no weights (offline, not cached), missing / corrupt / mismatched file.
    """
    if pos_interp not in POS_INTERP:  # before any download
        raise OvdenseError(f"unknown position interpolation {pos_interp!r}; expected reference or timm")
    dev = resolve_device(device)
    timm_name, test_arch = _resolve_vfm_name(name)
    if checkpoint is None and not test_arch:
        check_timm_weights_available(name, timm_name)
    pretrained = checkpoint is None and not test_arch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # test archs and the shell a checkpoint fills: reproducible init
            model = timm.create_model(timm_name, pretrained=pretrained, dynamic_img_size=True, num_classes=0)
    except Exception as err:
        if pretrained:
            raise OvdenseError(
                f"weights for {name} ({timm_name}) could not be loaded ({cause_line(err)}). "
                + _VFM_OFFLINE_HELP.format(timm_name=timm_name)
            ) from None
        raise OvdenseError(f"cannot build VFM {name} ({timm_name}): {cause_line(err)}") from None
    if checkpoint is not None:
        load_strict(model, vfm_state_dict(checkpoint, model), f"VFM {name} ({timm_name})")
        source = str(checkpoint)
    elif test_arch:
        source = "random (test architecture)"
    else:
        source = f"timm {timm_name}"
    if test_arch and timm_name not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(timm_name)
        weights = "" if checkpoint is not None else " with RANDOM weights"
        warnings.warn(
            f"VFM {name} ({timm_name}) is a tiny test architecture{weights}, not a real VFM: its features are "
            "meaningless (tests and smoke runs only)",
            RandomWeightsWarning,
            stacklevel=2,
        )
    logging.getLogger(__name__).debug("loaded VFM %s from %s", name, source)
    return Vfm(model.to(dev), name=name, source=source, pos_interp=pos_interp, is_test_model=test_arch)
