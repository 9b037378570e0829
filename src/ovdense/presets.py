"""The settings of the inference protocol (:class:`Preset`) and their resolution per method and benchmark.

Each method declares its settings in its registration beside its head (:mod:`ovdense.methods`, values from the
authors' configs, see ``docs/design.md`` "Presets"); :func:`get_preset` resolves them: the method's defaults,
then its settings for the benchmark, then the caller's overrides. A method's defaults apply to every benchmark
it lists no settings for and to a user's own images.

ADE-847 and PC-459: only CorrCLIPv2's authors published settings for them (its registration lists ``ade847``;
PC-459 takes its defaults, as the authors' ``cfg_context459.py``). For a method that lists none of its own, the
settings are ours (:data:`DERIVED_SETTINGS`): its ADE20K settings for ADE-847 and its Context59 settings for
PC-459 (same images, no background class), with ``prob_thd`` 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import methods, ranges
from .errors import InvalidArgumentError
from .eval.specs import CLASS_STYLES
from .eval.specs import DATASETS as BENCHMARKS
from .ranges import COUNT, FRACTION, POSITIVE, POSITIVE_INT

#: The positional-embedding resize rules (``ovdense.backbones.base.POS_EMBED_RULES``, spelled here so that this
#: module stays free of torch; a test holds the two equal).
POS_RULES = ("sclip", "size")

#: The benchmarks a method may have settings for (:mod:`ovdense.eval.specs`), in the papers' column order.
DATASETS = tuple(BENCHMARKS)

#: Ours, not the authors': a method without settings of its own for the key benchmark uses those of the value
#: benchmark, with ``prob_thd`` 0 (neither has a background class). ADE-847 has ADE20K's images at another
#: vocabulary; PC-459 has Context59's images.
DERIVED_SETTINGS = {"ade847": "ade20k", "context459": "context59"}


def _benchmark_settings(spec: methods.MethodSpec, dataset: str) -> dict:
    """A method's settings for one benchmark: its own, else (:data:`DERIVED_SETTINGS`) those of the sibling."""
    if dataset in DERIVED_SETTINGS and dataset not in spec.datasets_with_settings:
        return {**spec.dataset_settings(DERIVED_SETTINGS[dataset]), "prob_thd": 0.0}
    return dict(spec.dataset_settings(dataset))


@dataclass(frozen=True)
class Preset:
    """Everything the inference protocol needs besides the model and the class names.

    Attributes:
        method: preset name (``sclip``, ``naclip``...).
        head: the dense head, by the name it is registered under (the method's, see :mod:`ovdense.methods`);
            ``head_kwargs`` its options (e.g. DeCLIP's ``mode``).
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
    long_side: int = field(default=2048, metadata={"range": POSITIVE_INT})
    short_side: int = field(default=336, metadata={"range": POSITIVE_INT})
    crop: int = field(default=224, metadata={"range": COUNT})
    stride: int = field(default=112, metadata={"range": POSITIVE_INT})
    logit_scale: float = field(default=40.0, metadata={"range": POSITIVE})
    prob_thd: float = field(default=0.0, metadata={"range": FRACTION})
    area_thd: float | None = field(default=None, metadata={"range": FRACTION})
    pamr: bool = False
    pamr_iterations: int = field(default=10, metadata={"range": COUNT})
    pamr_dilations: tuple[int, ...] = field(default=(8, 16), metadata={"range": POSITIVE_INT})
    pos_rule: str = field(default="sclip", metadata={"choices": POS_RULES})
    pad_to_patch: bool = False
    class_style: str = field(default="sclip", metadata={"choices": CLASS_STYLES})
    pad_multiple: int = field(default=0, metadata={"range": COUNT})
    vfm: str | None = None
    model: str | None = None
    pretrained: str | None = None

    def __post_init__(self):
        """Every setting within its declared range (the field's ``range`` metadata), the windows covering the
        image: one line naming the first setting that is not."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "range" in f.metadata:
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    ranges.check(f.name, item, f.metadata["range"], optional=f.name == "area_thd")
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise InvalidArgumentError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
        if self.crop > 0 and self.stride > self.crop:
            raise InvalidArgumentError(
                f"stride must be at most crop ({self.crop}), got {self.stride}: the windows would leave pixels "
                "uncovered"
            )

    def to_dict(self) -> dict:
        """The resolved settings, for recording next to results (JSON-serialisable)."""
        out = dataclasses.asdict(self)
        out["pamr_dilations"] = list(self.pamr_dilations)
        return out


def setting_range(name: str) -> ranges.Range:
    """The declared range of a numeric :class:`Preset` setting (what ``--crop`` and the like are checked with)."""
    return next(f.metadata["range"] for f in dataclasses.fields(Preset) if f.name == name)


def list_methods() -> list[str]:
    """Names accepted as ``method=`` (see :mod:`ovdense.methods`)."""
    return methods.list_methods()


def get_preset(method: str, dataset: str | None = None, **overrides) -> Preset:
    """Resolve a method's settings for a dataset, then apply explicit overrides.

    Reads the method's registration (:mod:`ovdense.methods`) without importing its head.

    Args:
        method: one of :func:`list_methods`.
        dataset: one of :data:`DATASETS` or ``None`` for a user's own images.
        overrides: any :class:`Preset` field, or an option of the method's head (``mode="qq"`` for
            ``declip``); ``None`` values are ignored (unset CLI flags).

    Raises:
        ValueError: unknown method, dataset, setting or option, or an option's value of the wrong type.
    """
    spec = methods.get_method(method)
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(DATASETS)}")
    values = dict(spec.defaults)
    head_kwargs = dict(values.pop("head_kwargs", {}))
    if dataset is not None:
        per_dataset = _benchmark_settings(spec, dataset)
        head_kwargs.update(per_dataset.pop("head_kwargs", {}))
        values.update(per_dataset)
    head_kwargs.update(overrides.pop("head_kwargs", None) or {})
    fields = {f.name for f in dataclasses.fields(Preset)} - {"method", "head", "head_kwargs"}
    for key, value in overrides.items():
        if value is None:
            continue
        if key in fields:
            values[key] = value
        elif key in spec.options:
            head_kwargs[key] = value
        else:
            known = ", ".join(sorted(spec.options)) or "none"
            raise ValueError(
                f"method {method!r} has no setting or option {key!r} (its head's options: {known}; "
                f"settings: {', '.join(sorted(fields))})"
            )
    for key in ("model", "pretrained", "vfm"):
        values.setdefault(key, getattr(spec, key))
    return Preset(method=method, head=spec.name, head_kwargs=methods.check_options(method, head_kwargs), **values)
