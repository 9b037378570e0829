"""Per-method, per-dataset inference settings, as data.

Values come from the authors' configs (SCLIP ``configs/``, NACLIP, ClearCLIP, DeCLIP's segmentation-eval
branch ``declip_segmentor.py`` at commit 3b65d49e); see DESIGN.md "Presets". A method's defaults apply to
every dataset not listed in its overrides and to a user's own images.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

#: Attention of the DeCLIP head: ``csa`` (q-q + k-k) or ``qq`` (q-q only; DeCLIP's released training).
DECLIP_MODES = ("csa", "qq")

DATASETS = ("voc21", "context60", "coco_object", "voc20", "context59", "coco_stuff", "cityscapes", "ade20k")


@dataclass(frozen=True)
class Preset:
    """Everything the inference protocol needs besides the model and the class names.

    Attributes:
        method: preset name (``sclip``, ``naclip``...).
        head: dense head name; ``head_kwargs`` its options (e.g. DeCLIP's ``mode``).
        long_side, short_side: mmseg ``Resize(scale=(long_side, short_side), keep_ratio=True)``.
        crop, stride: sliding window in pixels; ``crop = 0`` runs the whole image in one pass.
        logit_scale: multiplies the cosine maps before the softmax over names.
        prob_thd: pixels whose best class probability is below it become class 0.
        area_thd: SCLIP's rule dropping classes predicted on at most this fraction of the
            foreground-predicted pixels (``None``: off).
        pamr: Pixel-Adaptive Mask Refinement on the cosine maps (NACLIP), ``pamr_iterations`` and
            ``pamr_dilations`` its settings.
        pos_rule: positional-embedding resize rule, ``"sclip"`` (``scale_factor=(h+0.1)/√N``) or
            ``"size"`` (``size=(h, w)``).
        pad_to_patch: zero-pad windows (centred) to a multiple of the patch size (ClearCLIP, DeCLIP).
        class_style: which benchmark class-name files the method's authors used: ``sclip`` (SCLIP and
            NACLIP: background words and synonyms), ``clearclip`` (``background`` alone, no synonyms),
            ``declip``, ``proxyclip``, ``corrclip`` (see :data:`ovdense.eval.datasets.CLASS_STYLES`).
        pad_multiple: zero-pad windows (centred) to a multiple of this many pixels (ProxyCLIP, CorrCLIP: 56);
            0 = off.
        vfm: the vision foundation model the method's head uses by default (``dino-b8``), else ``None``.
        model, pretrained: the CLIP weights the method's authors default to, where they are not OpenAI's
            ViT-B/16 (CorrCLIP: MetaCLIP ``ViT-B-16-quickgelu`` / ``metaclip_fullcc``).
    """

    method: str
    head: str
    head_kwargs: dict = field(default_factory=dict)
    long_side: int = 2048
    short_side: int = 336
    crop: int = 224
    stride: int = 112
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    pamr: bool = False
    pamr_iterations: int = 10
    pamr_dilations: tuple[int, ...] = (8, 16)
    pos_rule: str = "sclip"
    pad_to_patch: bool = False
    class_style: str = "sclip"
    pad_multiple: int = 0
    vfm: str | None = None
    model: str | None = None
    pretrained: str | None = None

    def to_dict(self) -> dict:
        """The resolved settings, for recording next to results (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["pamr_dilations"] = list(self.pamr_dilations)
        return out


@dataclass(frozen=True)
class Method:
    """A method: one line for ``ovdense list-methods``, its defaults and its per-dataset settings.

    ``defaults`` and each ``datasets`` entry hold :class:`Preset` fields; a dataset's ``head_kwargs`` update
    the method's rather than replace them.
    """

    summary: str
    defaults: dict
    datasets: dict[str, dict] = field(default_factory=dict)


# Method defaults, then per-dataset overrides (DESIGN.md "Presets").
_SCLIP_DATASETS = {
    "voc21": dict(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "context60": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_object": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_stuff": dict(short_side=448),
    "cityscapes": dict(short_side=560),
}
# Baselines share SCLIP's protocol (DESIGN: "as sclip") without its area rule.
_BASELINE_DATASETS = {k: {kk: vv for kk, vv in v.items() if kk != "area_thd"} for k, v in _SCLIP_DATASETS.items()}

# ProxyCLIP's and CorrCLIP's configs (the same values in both repositories).
_VFM_PROXY_DATASETS = {
    "voc21": dict(prob_thd=0.2),
    "context60": dict(prob_thd=0.15),
    "coco_object": dict(prob_thd=0.25),
    "cityscapes": dict(short_side=448, crop=224, stride=112),
    "ade20k": dict(short_side=448),
}

METHODS: dict[str, Method] = {
    "sclip": Method(
        "softmax(qq)+softmax(kk) attention, residual and FFN kept (SCLIP)", dict(head="sclip"), _SCLIP_DATASETS
    ),
    "naclip": Method(
        "softmax(kk + Gaussian neighbourhood) attention, no residual, no FFN, PAMR (NACLIP)",
        dict(head="naclip", pamr=True),
        {
            "voc21": dict(crop=0, prob_thd=0.1),
            "voc20": dict(crop=0),
            "context60": dict(prob_thd=0.1),
            "coco_object": dict(prob_thd=0.1),
            "cityscapes": dict(short_side=560),
        },
    ),
    "clearclip": Method(
        "softmax(qq) attention, no residual, no FFN (ClearCLIP)",
        dict(
            head="clearclip",
            short_side=448,
            crop=448,
            stride=224,
            logit_scale=50.0,
            pad_to_patch=True,
            class_style="clearclip",
        ),
        {
            "voc21": dict(prob_thd=0.5),
            "context60": dict(prob_thd=0.15),
            "coco_object": dict(prob_thd=0.4),
            "cityscapes": dict(crop=224, stride=224),
        },
    ),
    "declip": Method(
        "DeCLIP content head: softmax(qq)[+softmax(kk)], unscaled on EVA02, no residual/FFN (option mode=csa|qq)",
        dict(
            head="declip",
            head_kwargs={"mode": "csa"},
            long_side=4096,
            short_side=448,
            crop=336,
            stride=112,
            pos_rule="size",
            pad_to_patch=True,
            class_style="declip",
        ),
        {
            "voc21": dict(logit_scale=80.0, prob_thd=0.4),
            "context60": dict(prob_thd=0.15),
            "coco_object": dict(prob_thd=0.2, long_side=2048),
            "cityscapes": dict(short_side=560),
        },
    ),
    "scclip": Method(
        "SC-CLIP: LOF anomaly repair, similarity aggregation, multi-level pass, no residual/FFN",
        dict(head="scclip"),
        {
            "voc21": dict(logit_scale=50.0, prob_thd=0.15, area_thd=0.1),
            "context60": dict(prob_thd=0.15),
            "coco_object": dict(logit_scale=55.0, prob_thd=0.35),
            "cityscapes": dict(short_side=560),
        },
    ),
    "resclip": Method(
        "ResCLIP on NACLIP: kk + Gaussian attention mixed with blocks 6-9 (RCS) and a first-pass label prior (SFR)",
        dict(head="resclip"),
        {
            name: dict(head_kwargs=dict(temp_thd=t, rcs_lambda=rl, sfr_tau=st, sfr_lambda=sl), **extra)
            for name, (t, rl, st, sl, extra) in {
                "voc21": (0.50, 0.3, 2.2, 0.7, dict(crop=0, prob_thd=0.1)),
                "context60": (0.30, 0.3, 1.8, 0.7, dict(prob_thd=0.1)),
                "coco_object": (0.11, 0.4, 1.8, 0.7, dict(prob_thd=0.1)),
                "voc20": (0.10, 0.6, 2.1, 0.6, dict(crop=0)),
                "context59": (0.25, 0.4, 1.8, 0.7, {}),
                "coco_stuff": (0.11, 0.4, 1.8, 0.7, {}),
                "cityscapes": (0.10, 0.2, 2.1, 0.6, dict(short_side=560)),
                "ade20k": (0.25, 0.3, 2.1, 0.7, {}),
            }.items()
        },
    ),
    "proxyclip": Method(
        "ProxyCLIP: one attention for all heads from a VFM's patch similarities (DINO B/8) on CLIP's values",
        dict(
            head="proxyclip",
            short_side=336,
            crop=336,
            stride=112,
            pad_multiple=56,
            class_style="proxyclip",
            vfm="dino-b8",
        ),
        _VFM_PROXY_DATASETS,
    ),
    "corrclip": Method(
        "CorrCLIP: VFM correlations within class-agnostic masks, spatial and semantic branches, a vote per mask",
        dict(
            head="corrclip",
            short_side=336,
            crop=336,
            stride=112,
            pad_multiple=56,
            class_style="corrclip",
            vfm="dino-b8",
            model="ViT-B-16-quickgelu",
            pretrained="metaclip_fullcc",
        ),
        _VFM_PROXY_DATASETS,
    ),
    "clip": Method("unchanged last block (vanilla CLIP patch tokens)", dict(head="clip"), _BASELINE_DATASETS),
    "maskclip": Method(
        "value path out_proj(v), residual and FFN kept (MaskCLIP)",
        dict(head="maskclip", pos_rule="size"),
        _BASELINE_DATASETS,
    ),
}


def list_methods() -> list[str]:
    """Names accepted as ``method=``."""
    return list(METHODS)


def head_options(head: str) -> dict[str, object]:
    """The keyword options of a dense head and their defaults (e.g. ``{"mode": "csa"}`` for ``declip``)."""
    from .heads import HEADS

    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; available: {', '.join(HEADS)}")
    params = inspect.signature(HEADS[head].__init__).parameters
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in params.items() if n != "self" and p.kind in keyword}


def get_preset(method: str, dataset: str | None = None, **overrides) -> Preset:
    """Resolve a method's settings for a dataset, then apply explicit overrides.

    Args:
        method: one of :func:`list_methods`.
        dataset: one of :data:`DATASETS` or ``None`` for a user's own images.
        overrides: any :class:`Preset` field, or an option of the method's head (``mode="qq"`` for
            ``declip``); ``None`` values are ignored (unset CLI flags).

    Raises:
        ValueError: unknown method, dataset, setting or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    spec = METHODS[method]
    values = dict(spec.defaults)
    head_kwargs = dict(values.get("head_kwargs", {}))
    if dataset is not None:
        per_dataset = dict(spec.datasets.get(dataset, {}))
        head_kwargs.update(per_dataset.pop("head_kwargs", {}))
        values.update(per_dataset)
    head_kwargs.update(overrides.pop("head_kwargs", None) or {})
    fields = {f.name for f in dataclasses.fields(Preset)}
    options = head_options(values["head"])
    for key, value in overrides.items():
        if value is None:
            continue
        if key in fields:
            values[key] = value
        elif key in options:
            head_kwargs[key] = value
        else:
            known = ", ".join(sorted(options)) or "none"
            raise ValueError(
                f"method {method!r} has no setting or option {key!r} (its head's options: {known}; "
                f"settings: {', '.join(sorted(fields - {'method', 'head', 'head_kwargs'}))})"
            )
    values["head_kwargs"] = head_kwargs
    preset = Preset(method=method, **values)
    from .heads import create_head

    create_head(preset.head, **preset.head_kwargs)  # an option's value is checked by its head (ValueError)
    if preset.pad_multiple < 0:
        raise ValueError(f"pad_multiple must be >= 0 (got {preset.pad_multiple})")
    if preset.crop < 0 or preset.stride <= 0:
        raise ValueError(f"crop must be >= 0 and stride > 0 (got crop={preset.crop}, stride={preset.stride})")
    return preset
