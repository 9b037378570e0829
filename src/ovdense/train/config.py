"""Training configuration: one dataclass, two DeCLIP recipes, saved as JSON beside the checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..methods import get_method
from ..precision import PRECISIONS
from ..ranges import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, POSITIVE_INT, Range, check

__all__ = ["BENCHMARK_DEFAULTS", "CHOICES", "RECIPES", "TrainConfig"]

#: Loss settings per recipe. ``released``: DeCLIP's CVPR code (row-wise L2 context loss, 1x1 RoI content
#: loss). ``extended``: the journal version's formulas with our defaults where no code is public (row-wise
#: KL with temperature, SD-guided VFM affinity, N x N RoI tokens, region correlation constraint).
RECIPES: dict[str, dict] = {
    "released": dict(context_loss="l2", sd=False, content_loss="roi", rcc_weight=0.0),
    "extended": dict(context_loss="kl", sd=True, content_loss="tokens", rcc_weight=1.0),
}


#: Defaults of the F-ViT objective where they differ from the fields' (CLIPSelf's F-ViT configs: AdamW 1e-4 for a
#: batch of 64, betas (0.9, 0.999), weight decay 0.1 on every parameter, 250 warm-up steps, 3 epochs of OV-COCO,
#: 8 images per process; the saved weights are the detector's, not an ensemble). ``image_size`` None: the
#: benchmark's (640 for /16 towers, 896 for /14).
OBJECTIVE_DEFAULTS: dict[str, dict] = {
    "fvit": dict(
        lr=1e-4, epochs=3, warmup_steps=250, batch_size=8, betas=(0.9, 0.999), eps=1e-8, alpha=1.0, image_size=None
    ),
}

#: Defaults per (objective, benchmark), applied after :data:`OBJECTIVE_DEFAULTS` to fields not given: CLIPSelf's
#: OV-LVIS configs run 48 epochs (``runner.max_epochs``; the learning rate steps at 32 and 44).
BENCHMARK_DEFAULTS: dict[tuple[str, str], dict] = {
    ("fvit", "ov-lvis"): dict(epochs=48),
}

#: Fields with a closed set of values (the command line offers them as choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES),
    "mode": get_method("declip").options["mode"].choices,
    "context_loss": ("l2", "kl"),
    "content_loss": ("roi", "tokens"),
    "precision": PRECISIONS,
    "benchmark": ("ov-coco", "ov-lvis"),
}


def _flag(default, help: str, objective: str | None = None, required: bool = False, range: Range | None = None):
    """A field that ``ovdense train`` offers as a flag: ``help`` is the flag's help text, ``objective`` the one
    objective that reads the field (the other objectives do not offer the flag), ``required`` whether the
    command line requires it, ``range`` the values a number accepts (each item of a tuple). The command line
    builds the flags from this metadata; :class:`TrainConfig` checks the ranges itself too."""
    metadata: dict = {"help": help}
    if range is not None:
        metadata["range"] = range
    if objective is not None:
        metadata["objective"] = objective
    if required:
        metadata["required"] = True
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Everything a training run needs; ``ovdense train`` flags map one to one onto these fields (all but
    ``objective``, the subcommand, and ``extra``), built from each field's metadata (``_flag``).

    Defaults reproduce DeCLIP's released EVA02-B/16 recipe (``scripts/dist_DeCLIP_eva_vitb16_coco.sh``:
    ``--mode qq_vfm_distill``, DINOv2-B/14 with registers), except the batch size, which is per process here
    (the reference: 4 GPUs x 4 = 16). ``betas``/``eps`` left unset follow the reference's ``params.py``:
    (0.9, 0.98) and 1e-6 for model names containing "vit", else (0.9, 0.999) and 1e-8.
    """

    objective: str = "declip"
    data: str = _flag(
        "", "folder of images (recursive) or webdataset .tar shards (a folder, a file or a glob)", required=True
    )
    out: str = _flag("", "run folder: config.json, checkpoints/, state/, log.csv, tb/", required=True)
    # student
    model: str = _flag("EVA02-B-16", "student architecture (open_clip name; default EVA02-B-16)")
    pretrained: str | None = _flag(None, "open_clip pretrained tag of the student")
    checkpoint: str | None = _flag(None, "student weights file (EVA-CLIP layout, open_clip, safetensors)")
    mode: str = _flag("qq", "DeCLIP attention: qq (the released scripts) or csa (q-q + k-k)", objective="declip")
    unlocked_blocks: int | None = _flag(
        None, "train only the last N transformer blocks (default all)", range=POSITIVE_INT
    )
    # data
    image_size: int | None = _flag(
        560, "student input side (longest side resized, padded right/bottom; fvit: the benchmark's)", range=POSITIVE_INT
    )
    max_split: int = _flag(6, "grid crops: up to this many rows (and columns)", range=POSITIVE_INT)
    max_boxes: int = _flag(20, "grid crops: at most this many cells per image", range=POSITIVE_INT)
    workers: int = _flag(4, "image-decoding worker processes", range=COUNT)
    # teachers
    vfm: str = _flag(
        "dinov2-b-reg", "VFM teacher: dinov2-{s,b,l}[-reg], dino-{s,b}{8,16} or timm:<name>", objective="declip"
    )
    vfm_checkpoint: str | None = _flag(None, "local weights file for the VFM teacher", objective="declip")
    sd: bool = _flag(
        False, "add the Stable Diffusion teacher (SD-guided VFM affinity; needs ovdense[diffusion])", objective="declip"
    )
    sd_model: str = _flag(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "diffusers model id or local folder of the SD teacher",
        objective="declip",
    )
    sd_size: int = _flag(512, "Stable Diffusion input side", objective="declip", range=POSITIVE_INT)
    sd_timestep: int = _flag(
        100,
        "diffusion timestep of the one UNet pass (ours: 100)",
        objective="declip",
        range=Range(0, 999, integer=True),
    )
    sd_layers: str = _flag(
        "up-finest-2", "UNet self-attention layers: up-finest-K or comma-separated module names", objective="declip"
    )
    teacher_cache: str | None = _flag(
        None, "folder caching VFM (and SD) outputs per image, so they run once over all epochs", objective="declip"
    )
    # losses
    recipe: str = _flag(
        "released",
        "released (DeCLIP's code) or extended (KL context, SD, RoI tokens, RCC; ours where unpublished)",
        objective="declip",
    )
    context_loss: str = _flag("l2", "l2 (released) or kl (extended)", objective="declip")
    context_tau: float = _flag(
        0.2, "temperature of the KL context loss (ours: 0.2)", objective="declip", range=POSITIVE
    )
    content_loss: str = _flag(
        "roi", "roi (1x1 RoIAlign, released) or tokens (N x N RoI tokens, extended)", objective="declip"
    )
    roi_tokens: int = _flag(4, "N of the N x N RoI tokens", objective="declip", range=POSITIVE_INT)
    rcc_weight: float = _flag(
        0.0, "weight of the region correlation constraint (extended: 1.0, ours)", objective="declip", range=NON_NEGATIVE
    )
    rcc_tau: float = _flag(
        0.2, "temperature of the region correlation constraint (ours: 0.2)", objective="declip", range=POSITIVE
    )
    content_weight: float = _flag(1.0, "weight of the content loss", objective="declip", range=NON_NEGATIVE)
    context_weight: float = _flag(
        0.1, "weight of the context loss (code 0.1; the paper's lambda 0.25)", objective="declip", range=NON_NEGATIVE
    )
    # SCD (ours where the paper gives no value: docs/design.md "SCD and the Refiner (ours)")
    scd_weight: float = _flag(1.0, "weight of the SCD loss (lambda)", objective="scd", range=NON_NEGATIVE)
    scd_tau: float = _flag(0.2, "SCD softmax temperature (ours)", objective="scd", range=POSITIVE)
    no_scd: bool = _flag(
        False, "SCD: train plain region-language alignment (RLA), no correlation loss", objective="scd"
    )
    refiner: str | None = _flag(
        None, "SCD: a Refiner checkpoint (ovdense train refiner) whose tokens give the SCD target", objective="scd"
    )
    no_refiner: bool = _flag(False, "SCD: ignore --refiner (target = the frozen CLIP's tokens)", objective="scd")
    # the Refiner's own stage (ours)
    refiner_depth: int = _flag(
        2, "Refiner stage: transformer blocks of the Refiner", objective="refiner", range=POSITIVE_INT
    )
    refiner_tokens: int = _flag(
        4, "Refiner stage: N of the N x N tokens matched per crop", objective="refiner", range=POSITIVE_INT
    )
    refiner_tau: float = _flag(0.2, "Refiner stage: InfoNCE temperature (ours)", objective="refiner", range=POSITIVE)
    # F-ViT detector (ovdense train fvit)
    benchmark: str = _flag(
        "ov-coco",
        "F-ViT: the detection benchmark trained for (ov-coco; ov-lvis: with masks, 48 epochs)",
        objective="fvit",
    )
    class_embeddings: str | None = _flag(
        None, "F-ViT: class-embedding file (.pt: name -> vector, with background) for the classes", objective="fvit"
    )
    # optimisation
    epochs: int = _flag(6, "passes over the data", range=POSITIVE_INT)
    batch_size: int = _flag(4, "images per process per micro-batch", range=POSITIVE_INT)
    accum_steps: int = _flag(1, "micro-batches per optimiser step", range=POSITIVE_INT)
    lr: float = _flag(1e-5, "peak learning rate", range=POSITIVE)
    weight_decay: float = _flag(0.1, "AdamW weight decay (not on biases, norms, logit_scale)", range=NON_NEGATIVE)
    betas: tuple[float, float] | None = _flag(
        None,
        "AdamW betas (default: DeCLIP's rule, 0.9 0.98 for model names with 'vit', else 0.9 0.999)",
        range=Range(0, 1, high_open=True),
    )
    eps: float | None = _flag(None, "AdamW eps (default: 1e-6 for model names with 'vit', else 1e-8)", range=POSITIVE)
    warmup_steps: int = _flag(1000, "linear warm-up steps before the cosine", range=COUNT)
    precision: str = _flag("auto", "auto (fp16 AMP on CUDA, fp32 on CPU), fp32, fp16, bf16")
    alpha: float = _flag(0.7, "saved weights = alpha*student + (1-alpha)*initial weights", range=FRACTION)
    seed: int = _flag(0, "seed of the data order, grid draws and SD noise", range=COUNT)
    # runtime
    device: str | None = _flag(None, "cpu, cuda, cuda:1 ... (default: cuda if available)")
    max_steps: int | None = _flag(None, "stop after this many optimiser steps (smoke runs)", range=POSITIVE_INT)
    save_every: int = _flag(0, "also write the resume point every N steps (0: at epoch ends only)", range=COUNT)
    log_every: int = _flag(
        10, "log.csv / TensorBoard row (and, off a terminal, a progress line) every N steps", range=POSITIVE_INT
    )
    val_data: str | None = _flag(None, "COCO panoptic folder: region classification at each epoch end")
    val_limit: int | None = _flag(None, "validation images (default all)", range=POSITIVE_INT)
    val_image_size: int = _flag(560, "detection input side of the validation", range=POSITIVE_INT)
    val_every: int = _flag(1, "validate every N epochs (and after the last)", range=POSITIVE_INT)
    resume: str | None = _flag(None, "run folder (or its state/) to continue from")
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Every number within the range its field declares: one line naming the first that is not."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "range" in f.metadata and value is not None:
                for item in value if isinstance(value, (tuple, list)) else (value,):
                    check(f.name, item, f.metadata["range"])

    def adam_betas_eps(self) -> tuple[tuple[float, float], float]:
        """AdamW betas and eps: the given ones, else DeCLIP's ``get_default_params`` rule on the model name."""
        vit = "vit" in self.model.lower()
        betas = tuple(self.betas) if self.betas is not None else ((0.9, 0.98) if vit else (0.9, 0.999))
        eps = self.eps if self.eps is not None else (1e-6 if vit else 1e-8)
        return betas, eps

    def with_recipe(self, recipe: str, explicit: set[str] | None = None) -> TrainConfig:
        """This config with ``recipe``'s loss settings, keeping any field named in ``explicit``."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
        explicit = explicit or set()
        updates = {k: v for k, v in RECIPES[recipe].items() if k not in explicit}
        return dataclasses.replace(self, recipe=recipe, **updates)

    def with_objective_defaults(self, explicit: set[str] | None = None) -> TrainConfig:
        """This config with its objective's own defaults (:data:`OBJECTIVE_DEFAULTS`, then its benchmark's,
        :data:`BENCHMARK_DEFAULTS`) for every field not in ``explicit``."""
        explicit = explicit or set()
        defaults = {
            **OBJECTIVE_DEFAULTS.get(self.objective, {}),
            **BENCHMARK_DEFAULTS.get((self.objective, self.benchmark), {}),
        }
        updates = {k: v for k, v in defaults.items() if k not in explicit}
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas) if self.betas is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config fields: {', '.join(unknown)}")
        d = dict(d)
        if d.get("betas") is not None:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        from ..fileio import write_json_atomic

        write_json_atomic(self.to_dict(), Path(path))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
