"""Per-method, per-dataset inference settings, as data.

Values come from the authors' configs (SCLIP ``configs/``, NACLIP, ClearCLIP, DeCLIP's segmentation-eval
branch ``declip_segmentor.py`` at commit 3b65d49e); see DESIGN.md "Presets". A method's defaults apply to
every dataset not listed in its overrides and to a user's own images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .heads import HEADS

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
            ``declip``.
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

    def to_dict(self) -> dict:
        """The resolved settings, for recording next to results (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["pamr_dilations"] = list(self.pamr_dilations)
        return out


# Method defaults, then per-dataset overrides (DESIGN.md "Presets").
_SCLIP_DATASETS = {
    "voc21": dict(logit_scale=65.0, prob_thd=0.1, area_thd=0.1),
    "context60": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_object": dict(logit_scale=50.0, prob_thd=0.1),
    "coco_stuff": dict(short_side=448),
    "cityscapes": dict(short_side=560),
}

METHODS: dict[str, tuple[dict, dict[str, dict]]] = {
    "sclip": (dict(head="sclip"), _SCLIP_DATASETS),
    "naclip": (
        dict(head="naclip", pamr=True),
        {
            "voc21": dict(crop=0, prob_thd=0.1),
            "voc20": dict(crop=0),
            "context60": dict(prob_thd=0.1),
            "coco_object": dict(prob_thd=0.1),
            "cityscapes": dict(short_side=560),
        },
    ),
    "clearclip": (
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
    "declip": (
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
    # Baselines share SCLIP's protocol (DESIGN: "as sclip") without its area rule.
    "clip": (
        dict(head="clip"),
        {k: {kk: vv for kk, vv in v.items() if kk != "area_thd"} for k, v in _SCLIP_DATASETS.items()},
    ),
    "maskclip": (
        dict(head="maskclip", pos_rule="size"),
        {k: {kk: vv for kk, vv in v.items() if kk != "area_thd"} for k, v in _SCLIP_DATASETS.items()},
    ),
}


def list_methods() -> list[str]:
    """Names accepted as ``method=``."""
    return list(METHODS)


def get_preset(method: str, dataset: str | None = None, **overrides) -> Preset:
    """Resolve a method's settings for a dataset, then apply explicit overrides.

    Args:
        method: one of :func:`list_methods`.
        dataset: one of :data:`DATASETS` or ``None`` for a user's own images.
        overrides: any :class:`Preset` field; ``None`` values are ignored (unset CLI flags).

    Raises:
        ValueError: unknown method, dataset or field.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    base, per_dataset = METHODS[method]
    values = dict(base)
    if dataset is not None:
        values.update(per_dataset.get(dataset, {}))
    fields = {f.name for f in dataclasses.fields(Preset)}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown preset setting {key!r}")
        if value is not None:
            values[key] = value
    preset = Preset(method=method, **values)
    if preset.head not in HEADS:
        raise ValueError(f"preset {method!r} names unknown head {preset.head!r}")
    if preset.crop < 0 or preset.stride <= 0:
        raise ValueError(f"crop must be >= 0 and stride > 0 (got crop={preset.crop}, stride={preset.stride})")
    return preset
