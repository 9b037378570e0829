"""CorrCLIPv2's VFMs at the image's native resolution: one dense feature grid per whole image.

CorrCLIPv2 (``CorrCLIPv2/vfms/factory.py`` of zdk258/CorrCLIP at 103bc18, VF:) runs its VFM once per image on the
original file, at (about) the original size, and hands back the patch grid with the size it is meant to be
bilinearly resized to. :func:`load_dense_vfm` gives the same for every VFM of the authors' registry and for any
timm ViT; :meth:`DenseVfm.dense` is ``VFMExtractor.extract_dense``. Each name runs under one input rule
(:data:`RULES`), read from the authors' code:

- ``radio`` (``radiov3`` = C-RADIOv3-L, ``radiov2.5`` = RADIOv2.5-L; VF:76-84, RADIO's radio_model.py:152-159):
  the image in [0, 1], bilinearly resized (align_corners False, no antialias) to the nearest multiples of the
  patch size (Python ``round`` per side, at least one patch: the model's ``get_nearest_supported_resolution``),
  then the model, which conditions its input itself ((x - mean) / std with its own constants, the OpenAI CLIP ones
  unless the checkpoint says otherwise) and drops its summary and register tokens. Its code lives in its hub repo
  (transformers ``trust_remote_code``), so these load only with an explicit opt-in.
- ``timm`` (``timm:<name>``: the stand-in for RADIO when its code may not run): RADIO's input rule with the model's
  own mean / std (timm's pretrained cfg): [0, 1] -> resize as above -> normalise -> ``forward_features`` with
  ``dynamic_img_size`` (timm's own position-table resample, final norm applied) -> prefix tokens dropped.
- ``dino`` (``dinov2`` = DINOv2-L/14 with registers, ``dinov3`` = DINOv3-L/16; VF:85-96): ToTensor + ImageNet
  normalisation, then a bilinear resize to the nearest multiples of the patch (as above) only when the size
  differs; the last block after the final norm, patch tokens (``get_intermediate_layers(x, reshape=True)[0]``).
  DINOv2's hub model ``dinov2_vitl14_reg`` resizes its position table bicubically to the exact grid with
  antialias (``interpolate_offset=0``): the same as timm's resample, so timm's model gives the hub's features
  (:class:`~ovdense.vfm.Vfm` with ``pos_interp="reference"``). DINOv3 has no position table (RoPE).
- ``pe`` (PE-Spatial-L14-448; VF:53-58, 97-104): ToTensor + Normalize(0.5, 0.5), **no resize**: the patch
  embedding sees floor(H / 14) x floor(W / 14) patches (the right / bottom remainder is never seen), all blocks,
  no final norm (PE-Spatial has ``use_ln_post=False`` and ``forward_features`` defaults to ``norm=False``), the cls
  token dropped. PE's own position rules, which timm's Eva does not follow off the 448 px grid, are used: the
  absolute table resized **bilinearly** (align_corners False, no antialias; timm: bicubic, antialiased) and RoPE
  at the integer patch positions + 1 (timm rescales them onto the 32 x 32 pretraining grid).

``ref_size`` is always the original (H, W): for ``pe`` the "preprocessed size" of the authors is the original size,
as nothing resizes it (their features are stretched over the unseen remainder too).

Weights are never silently random: a real name without weights in the hub cache fails in seconds, offline, with one
line that says what to download or to pass ``checkpoint=``; the ``test-*`` names (:data:`TEST_DENSE_VFM_MODELS`)
are tiny random models of each rule for tests (they warn once). ``import ovdense`` does not import this module.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from .errors import InvalidArgumentError, OvdenseError, RandomWeightsWarning, cause_line, first_line
from .precision import autocast
from .vfm import TEST_DINOV2_ARCH, Vfm, check_timm_weights_available, vfm_state_dict
from .weights import load_strict, model_folder_or_hub, resolve_device

__all__ = [
    "DENSE_VFM_MODELS",
    "RADIO_MODELS",
    "RULES",
    "TEST_DENSE_VFM_MODELS",
    "DenseVfm",
    "RadioRepo",
    "load_dense_vfm",
    "nearest_patch_multiple",
]

#: The input rules (see the module docstring).
RULES = ("radio", "timm", "dino", "pe")


@dataclass(frozen=True)
class RadioRepo:
    """A RADIO model on the Hugging Face hub (transformers remote code).

    Attributes:
        repo: the hub repo id.
        weights_licence: the licence of its weights (RADIO's README, "Licensing").
    """

    repo: str
    weights_licence: str


#: RADIO's licence for the code of its repos (NVlabs/RADIO LICENSE: "NVIDIA Source Code License for RADIO",
#: non-commercial; README "Licenses": "NVIDIA Source Code License-NC"), which the hub repos carry as their code.
RADIO_CODE_LICENCE = "NVIDIA Source Code License-NC (non-commercial)"

#: RADIO names (the authors' registry, VF:19-20) -> hub repo. The authors load them through torch hub
#: (``NVlabs/RADIO`` ``radio_model``, versions ``c-radio_v3-l`` / ``radio_v2.5-l``). ``nvidia/RADIO-L`` is RADIOv2.5-L:
#: RADIO's README lists it as the hub repo of "RADIO-L", created on 2024-07-23, a day after the RADIOv2.5 ViT-B/L
#: release (the torch hub weights of ``radio_v2.5-l`` are ``nvidia/RADIO``'s ``radio-v2.5-l_half.pth.tar``).
RADIO_MODELS: dict[str, RadioRepo] = {
    "radiov3": RadioRepo("nvidia/C-RADIOv3-L", "weights under the NVIDIA Open Model License"),
    "radiov2.5": RadioRepo("nvidia/RADIO-L", "weights under the same non-commercial licence"),
}

#: The other names of the authors' registry (VF:21-23) -> (rule, timm model).
DENSE_VFM_MODELS: dict[str, tuple[str, str]] = {
    "dinov2": ("dino", "vit_large_patch14_reg4_dinov2.lvd142m"),
    "dinov3": ("dino", "vit_large_patch16_dinov3.lvd1689m"),
    "pe": ("pe", "vit_pe_spatial_large_patch14_448.fb"),
}

#: Tiny random models of each timm rule, for tests: name -> (rule, timm architecture, its overrides). ``test-timm``
#: is a 2-block ViT/16 (mean / std 0.5 from its timm cfg), ``test-dinov2`` vfm.py's DINOv2-with-registers test
#: architecture, ``test-dinov3`` a 2-block DINOv3 layout (RoPE, 4 registers), ``test-pe`` a 2-block PE-Spatial layout
#: (cls token, absolute table on a 4 x 4 grid, RoPE).
TEST_DENSE_VFM_MODELS: dict[str, tuple[str, str, dict]] = {
    "test-timm": ("timm", "vit_base_patch16_224", dict(img_size=64, embed_dim=32, depth=2, num_heads=2)),
    "test-dinov2": ("dino", TEST_DINOV2_ARCH, {}),
    "test-dinov3": ("dino", "vit_large_patch16_dinov3", dict(img_size=64, embed_dim=32, depth=2, num_heads=2)),
    "test-pe": ("pe", "vit_pe_spatial_large_patch14_448", dict(img_size=56, embed_dim=32, depth=2, num_heads=2)),
}

_RADIO_OFFLINE_HELP = (
    "On a machine with internet run `huggingface-cli download {repo}` and copy ~/.cache/huggingface/hub to this "
    "machine (or set HF_HUB_CACHE), or pass the downloaded folder with --vfm-checkpoint / checkpoint="
)

#: Test models already warned about in this process.
_WARNED_RANDOM: set[str] = set()


def nearest_patch_multiple(height: int, width: int, step: int) -> tuple[int, int]:
    """The size RADIO (``get_nearest_supported_resolution``) and the authors' DINO branch run an image at.

    Each side rounded to the nearest multiple of ``step`` with Python's ``round`` (halves to even: 40 / 16 = 2.5
    -> 32, 56 / 16 = 3.5 -> 64), at least ``step``.
    """
    return max(step, int(round(height / step)) * step), max(step, int(round(width / step)) * step)


def _image_tensor(image: np.ndarray, device: torch.device) -> Tensor:
    """H x W x 3 uint8 RGB -> 1 x 3 x H x W float32 in [0, 1] (ToTensor / ``pil_to_tensor() / 255``)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        what = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise InvalidArgumentError(f"image: expected an H x W x 3 uint8 RGB array, got a {what}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise InvalidArgumentError(f"image: empty image of shape {image.shape}")
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)


def _normalise(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(x - mean) / std per channel (torchvision's Normalize)."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear, align_corners False, no antialias (the authors' ``F.interpolate``)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DenseVfm:
    """A frozen VFM giving one image's dense patch features at its native resolution (CorrCLIPv2's ``VFMExtractor``).

    Build it with :func:`load_dense_vfm`.

    Attributes:
        name: the name it was loaded under.
        rule: its input rule, one of :data:`RULES`.
        dim: C, the feature width.
        patch_size: the square patch side in pixels.
        mean, std: the normalisation applied before the model (3-tuples); None for ``radio`` (the model applies
            its own).
        source: where the weights came from.
        is_test_model: a random test model.
        model: the underlying module (eval mode, no grad).
        device: the model's device (a property).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        name: str,
        rule: str,
        patch_size: int,
        dim: int,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        source: str = "",
        is_test_model: bool = False,
    ):
        if rule not in RULES:
            raise OvdenseError(f"unknown VFM input rule {rule!r}; expected one of {RULES}")
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.rule = rule
        self.patch_size = int(patch_size)
        self.dim = int(dim)
        self.mean = mean
        self.std = std
        self.source = source
        self.is_test_model = is_test_model
        # timm-backed rules reuse vfm.Vfm: device handling, prefix dropping, DINOv2's position rule.
        self._vfm = None
        if rule in ("timm", "dino"):
            self._vfm = Vfm(model, name=name, source=source, pos_interp="timm" if rule == "timm" else "reference")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(H', W'): the size an H x W image is run at (``pe``: not resized; its grid covers floor(H' / patch))."""
        if self.rule == "pe":
            return int(height), int(width)
        nearest = getattr(self.model, "get_nearest_supported_resolution", None)
        if self.rule == "radio" and callable(nearest):
            h, w = nearest(int(height), int(width))
            return int(h), int(w)
        return nearest_patch_multiple(height, width, self.patch_size)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w): the feature grid of an H x W image."""
        h, w = self.input_size(height, width)
        return h // self.patch_size, w // self.patch_size

    def dense(self, image: np.ndarray) -> tuple[Tensor, tuple[int, int]]:
        """Dense features of one image, as the authors' ``extract_dense`` (VF:74-105).

        fp16 autocast on CUDA (the authors' precision; they also cast the result to fp16), fp32 on the CPU.

        Args:
            image: H x W x 3 uint8 RGB, the original image.

        Returns:
            (1 x C x h x w float32 patch features on the model's grid (:meth:`grid_size`), no grad;
            ``ref_size`` = (H, W), the size the features are meant to be bilinearly resized to).

        Raises:
            InvalidArgumentError: not an H x W x 3 uint8 array; for ``pe``, a side shorter than one patch.
        """
        x = _image_tensor(image, self.device)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        size = self.input_size(height, width)
        if self.rule == "radio":
            feats = self._radio_features(_resize(x, size))
        elif self.rule == "timm":
            feats = self._vfm.features(_normalise(_resize(x, size), self.mean, self.std))
        elif self.rule == "dino":
            x = _normalise(x, self.mean, self.std)
            feats = self._vfm.features(_resize(x, size) if size != (height, width) else x)
        else:
            feats = self._pe_features(_normalise(x, self.mean, self.std))
        return feats.float(), (height, width)

    # -- RADIO ------------------------------------------------------------------------------------------------

    def _radio_features(self, x: Tensor) -> Tensor:
        """1 x 3 x H' x W' in [0, 1] (sides multiples of the patch) -> 1 x C x H'/p x W'/p."""
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        with torch.no_grad(), autocast("auto", x.device):
            tokens = _radio_patch_tokens(self.model(x), self.name)
        if tokens.ndim != 3 or tokens.shape[1] != h * w:
            raise OvdenseError(
                f"VFM {self.name} returned features of shape {tuple(tokens.shape)} for a {h} x {w} patch grid; "
                "expected 1 x (h*w) x C patch tokens"
            )
        return tokens.float().transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

    # -- PE -----------------------------------------------------------------------------------------------------

    def _pe_features(self, x: Tensor) -> Tensor:
        """PE's ``forward_features(x, strip_cls_token=True)`` with PE's position rules, on timm's Eva.

        Args:
            x: 1 x 3 x H x W normalised, any size of at least one patch.

        Returns:
            1 x C x floor(H / p) x floor(W / p).
        """
        m, p = self.model, self.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if h == 0 or w == 0:
            raise InvalidArgumentError(
                f"image: {x.shape[-2]} x {x.shape[-1]} px is smaller than one {p} x {p} patch; VFM {self.name} "
                "does not resize its input"
            )
        # PE's strided patch convolution ignores the remainder rows / columns; timm's patch embedding asserts on
        # them instead, so they are cut off first (the same result).
        x = x[..., : h * p, : w * p]
        with torch.no_grad(), autocast("auto", x.device):
            tokens = m.patch_embed(x)  # 1 x h x w x C (dynamic_img_size)
            tokens = tokens.reshape(tokens.shape[0], h * w, -1)
            n_prefix = m.num_prefix_tokens
            table = m.pos_embed
            patch_pos = table[:, n_prefix:]
            grid = tuple(int(g) for g in m.patch_embed.grid_size)
            if (h, w) != grid:
                # PE's _sample_abs_posemb: bilinear, align_corners False, no antialias, in the table's dtype.
                patch_pos = patch_pos.reshape(1, grid[0], grid[1], -1).permute(0, 3, 1, 2)
                patch_pos = _resize(patch_pos, (h, w)).permute(0, 2, 3, 1).reshape(1, h * w, -1)
            tokens = torch.cat([m.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
            tokens = tokens + torch.cat([table[:, :n_prefix], patch_pos], dim=1)
            rope = m.rope.get_embed(shape=(h, w))  # integer positions + 1 (ref_feat_shape cleared at load)
            tokens = m.norm_pre(tokens)
            for blk in m.blocks:
                tokens = blk(tokens, rope=rope)
            tokens = m.norm(tokens)  # Identity for PE-Spatial (use_ln_post=False)
        patches = tokens[:, n_prefix:].float()
        return patches.transpose(1, 2).reshape(patches.shape[0], -1, h, w)


def _radio_patch_tokens(out, name: str) -> Tensor:
    """The B x N x C patch tokens of a RADIO forward: the remote code's ``RadioOutput(summary, features)`` (a named
    tuple), ``{"backbone": RadioOutput, <adaptor>: ...}`` when adaptors are configured, or transformers'
    ``RadioModelOutput`` (``.features``). Summary and register tokens are already dropped by the model."""
    if isinstance(out, dict) and "backbone" in out:
        out = out["backbone"]
    features = getattr(out, "features", None)
    if features is None and isinstance(out, (tuple, list)) and len(out) == 2:
        features = out[1]
    if not isinstance(features, Tensor):
        raise OvdenseError(
            f"VFM {name}: the model returned {type(out).__name__}, not RADIO's (summary, features) output"
        )
    return features


# -- loading ----------------------------------------------------------------------------------------------------


def _warn_random(name: str, with_checkpoint: bool) -> None:
    if name in _WARNED_RANDOM:
        return
    _WARNED_RANDOM.add(name)
    weights = "" if with_checkpoint else " with RANDOM weights"
    warnings.warn(
        f"VFM {name} is a tiny test model{weights}, not a real VFM: its features are meaningless "
        "(tests and smoke runs only)",
        RandomWeightsWarning,
        stacklevel=3,
    )


def _timm_model(name: str, timm_name: str, overrides: dict, checkpoint, test_arch: bool) -> tuple:
    """Build a timm model with ``dynamic_img_size`` and load its weights (hub cache or ``checkpoint``, strictly)."""
    if checkpoint is None and not test_arch:
        check_timm_weights_available(name, timm_name)
    pretrained = checkpoint is None and not test_arch
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # test models and the shell a checkpoint fills: reproducible init
            model = timm.create_model(
                timm_name, pretrained=pretrained, dynamic_img_size=True, num_classes=0, **overrides
            )
    except Exception as err:
        if pretrained:
            raise OvdenseError(
                f"weights for {name} ({timm_name}) could not be loaded ({cause_line(err)}); "
                "pass a local weights file with --vfm-checkpoint / checkpoint="
            ) from None
        raise OvdenseError(f"cannot build VFM {name} ({timm_name}): {cause_line(err)}") from None
    if checkpoint is not None:
        load_strict(model, vfm_state_dict(checkpoint, model), f"VFM {name} ({timm_name})")
        return model, str(checkpoint)
    return model, "random (test model)" if test_arch else f"timm {timm_name}"


def _radio_refusal(name: str, repo: RadioRepo) -> OvdenseError:
    return OvdenseError(
        f"VFM {name} ({repo.repo}) runs Python code from its Hugging Face repo, licensed under the "
        f"{RADIO_CODE_LICENCE}, {repo.weights_licence}: to allow it pass --trust-remote-code on the CLI or "
        "trust_remote_code=True in Python (or use a timm:<name> VFM, which runs no remote code)"
    )


def _radio_class(where: str, kwargs: dict) -> type:
    """The model class of a RADIO repo's remote code, as a subclass that runs ``post_init()`` after ``__init__``
    where the code does not.

    RADIO's hub code before NVlabs/RADIO 745b23a (2026-02-11; the RADIOv2.5 and C-RADIOv3 releases included) never
    calls ``post_init()``, which transformers 5's ``from_pretrained`` needs (it reads ``all_tied_weights_keys``):
    such a repo fails with "'RADIOModel' object has no attribute 'all_tied_weights_keys'". Newer code calls it
    itself, and nothing changes. A subclass, so the remote module's own class is left as it is.
    """
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(where, trust_remote_code=True, **kwargs)
    remote = get_class_from_dynamic_module(config.auto_map["AutoModel"], where, **kwargs)

    class PostInitRadio(remote):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()

    PostInitRadio.__name__ = PostInitRadio.__qualname__ = remote.__name__
    return PostInitRadio


def _load_radio(name: str, repo: RadioRepo, checkpoint, dev: torch.device) -> DenseVfm:
    """A RADIO model through transformers' remote code (``auto_map``'s AutoModel), from the hub (cache) or a folder."""
    where, source, kwargs = model_folder_or_hub(
        repo.repo if checkpoint is None else checkpoint,
        f"VFM {name}",
        entries=["config.json"],
        marker="config.json",
        offline_help=_RADIO_OFFLINE_HELP,
    )
    try:
        # fp32 weights: the authors' hub model is fp32 with fp16 autocast on CUDA (VF:83).
        model = _radio_class(where, kwargs).from_pretrained(where, dtype=torch.float32, **kwargs)
    except Exception as err:
        raise OvdenseError(
            f"VFM {name} could not be loaded from {source} ({cause_line(err)}). "
            + _RADIO_OFFLINE_HELP.format(repo=repo.repo)
        ) from None
    model = model.float()
    conditioner = getattr(model, "input_conditioner", None)
    cast = getattr(conditioner, "dtype", None)
    if isinstance(cast, torch.dtype) and cast != torch.float32:
        # RADIO's conditioner casts its output to the checkpoint's training dtype; the weights are fp32 here.
        warnings.warn(f"VFM {name}: its input conditioner casts to {cast}; running it in float32", stacklevel=3)
        conditioner.dtype = torch.float32
    model = model.to(dev).eval().requires_grad_(False)
    patch = getattr(model, "patch_size", None) or getattr(getattr(model, "config", None), "patch_size", None)
    if not isinstance(patch, int) or patch < 1:
        raise OvdenseError(f"VFM {name} ({source}) has no patch_size; is it a RADIO model?")
    vfm = DenseVfm(model, name=name, rule="radio", patch_size=patch, dim=0, source=source)
    # The width is read from one forward of a blank one-patch-step image: the remote code names it differently
    # across RADIO versions, and this also checks the output format once, at load time.
    step = vfm.input_size(1, 1)
    try:
        vfm.dim = int(vfm.dense(np.zeros((*step, 3), dtype=np.uint8))[0].shape[1])
    except OvdenseError:
        raise
    except Exception as err:
        raise OvdenseError(f"VFM {name} ({source}) failed on a test image: {first_line(err)}") from None
    return vfm


def load_dense_vfm(
    name: str,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
) -> DenseVfm:
    """Load one of CorrCLIPv2's VFMs (or any timm ViT) for native-resolution dense features.

    Args:
        name: ``radiov3`` (C-RADIOv3-L, the authors' default), ``radiov2.5`` (RADIOv2.5-L), ``dinov2``
            (DINOv2-L/14 with registers), ``dinov3`` (DINOv3-L/16), ``pe`` (PE-Spatial-L14-448), ``timm:<name>``
            (any timm ViT, run with RADIO's input rule and its own mean / std), or a random test model of
            :data:`TEST_DENSE_VFM_MODELS` (warns once).
        checkpoint: RADIO: a local folder of the model (a hub snapshot or ``save_pretrained``: config.json, the
            code files, the weights). Others: a local weights file (safetensors or torch; timm's layout, or the
            DINOv2 / DINOv3 / PE release files, which timm converts), loaded strictly. Without it the weights come
            from the Hugging Face hub (cache).
        device: where to run it (None: CUDA when present).
        trust_remote_code: allow RADIO's code from its hub repo (or folder) to run; RADIO names refuse to load
            without it.

    Raises:
        OvdenseError: unknown name; RADIO without ``trust_remote_code``; weights neither cached nor downloadable
            (in seconds, offline); a missing, unreadable or mismatched checkpoint.
    """
    dev = resolve_device(device)
    if name in RADIO_MODELS:
        repo = RADIO_MODELS[name]
        if not trust_remote_code:
            raise _radio_refusal(name, repo)
        vfm = _load_radio(name, repo, checkpoint, dev)
        logging.getLogger(__name__).debug("loaded VFM %s from %s", name, vfm.source)
        return vfm
    if name in DENSE_VFM_MODELS:
        (rule, timm_name), overrides, test_arch = DENSE_VFM_MODELS[name], {}, False
    elif name in TEST_DENSE_VFM_MODELS:
        (rule, timm_name, overrides), test_arch = TEST_DENSE_VFM_MODELS[name], True
    elif name.startswith("timm:"):
        rule, timm_name, overrides, test_arch = "timm", name[len("timm:") :], {}, False
        if not timm_name or not timm.is_model(timm_name):
            raise OvdenseError(f"unknown timm model {timm_name!r} (from {name!r}); see timm.list_models()")
    else:
        choices = [*RADIO_MODELS, *DENSE_VFM_MODELS, "timm:<timm model name>"]
        raise OvdenseError(
            f"unknown VFM {name!r}; available: {', '.join(choices)} (test models: {', '.join(TEST_DENSE_VFM_MODELS)})"
        )
    model, source = _timm_model(name, timm_name, overrides, checkpoint, test_arch)
    if test_arch:
        _warn_random(name, checkpoint is not None)
    if rule == "pe":
        layout = (getattr(model, k, None) is not None for k in ("pos_embed", "rope", "cls_token"))
        if not all(layout) or model.no_embed_class or model.num_prefix_tokens != 1:
            raise OvdenseError(f"VFM {name} ({timm_name}) is not a PE-Spatial layout (cls token, table and RoPE)")
        # PE's RoPE runs at the integer patch positions (+ 1), whatever the grid; timm's PE rescales them onto its
        # pretraining grid (ref_feat_shape, EVA02's rule). A None passed to timm.create_model is dropped, so it is
        # cleared here; the RoPE bands are not weights.
        model.rope.ref_feat_shape = None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if rule == "dino":  # the authors' constants (VF:64-67)
        mean, std = tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    elif rule == "pe":  # PE's transform (pe/core/vision_encoder/transforms.py)
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    else:
        mean = tuple(float(v) for v in cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        std = tuple(float(v) for v in cfg.get("std", IMAGENET_DEFAULT_STD))
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        raise OvdenseError(f"VFM {name} ({timm_name}) is not a ViT with a patch embedding")
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    if patch[0] != patch[1]:
        raise OvdenseError(f"VFM {name} has non-square patches {patch}; only square patches are supported")
    vfm = DenseVfm(
        model.to(dev),
        name=name,
        rule=rule,
        patch_size=patch[0],
        dim=int(model.num_features),
        mean=mean,
        std=std,
        source=source,
        is_test_model=test_arch,
    )
    logging.getLogger(__name__).debug("loaded VFM %s from %s", name, source)
    return vfm
