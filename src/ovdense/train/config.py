"""Training configuration: one dataclass, two DeCLIP recipes, saved as JSON beside the checkpoints."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..precision import PRECISIONS
from ..presets import DECLIP_MODES

__all__ = ["CHOICES", "RECIPES", "TrainConfig"]

#: Loss settings per recipe. ``released``: DeCLIP's CVPR code (row-wise L2 context loss, 1x1 RoI content
#: loss). ``extended``: the journal version's formulas with our defaults where no code is public (row-wise
#: KL with temperature, SD-guided VFM affinity, N x N RoI tokens, region correlation constraint).
RECIPES: dict[str, dict] = {
    "released": dict(context_loss="l2", sd=False, content_loss="roi", rcc_weight=0.0),
    "extended": dict(context_loss="kl", sd=True, content_loss="tokens", rcc_weight=1.0),
}


#: Fields with a closed set of values (the command line offers them as choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "recipe": tuple(RECIPES),
    "mode": DECLIP_MODES,
    "context_loss": ("l2", "kl"),
    "content_loss": ("roi", "tokens"),
    "precision": PRECISIONS,
}


@dataclass
class TrainConfig:
    """Everything a training run needs; ``ovdense train`` flags map one to one onto these fields.

    Defaults reproduce DeCLIP's released EVA02-B/16 recipe (``scripts/dist_DeCLIP_eva_vitb16_coco.sh``:
    ``--mode qq_vfm_distill``, DINOv2-B/14 with registers), except the batch size, which is per process here
    (the reference: 4 GPUs x 4 = 16). ``betas``/``eps`` left unset follow the reference's ``params.py``:
    (0.9, 0.98) and 1e-6 for model names containing "vit", else (0.9, 0.999) and 1e-8.
    """

    objective: str = "declip"
    data: str = ""
    out: str = ""
    # student
    model: str = "EVA02-B-16"
    pretrained: str | None = None
    checkpoint: str | None = None
    mode: str = "qq"
    unlocked_blocks: int | None = None
    # data
    image_size: int = 560
    max_split: int = 6
    max_boxes: int = 20
    workers: int = 4
    # teachers
    vfm: str = "dinov2-b-reg"
    vfm_checkpoint: str | None = None
    sd: bool = False
    sd_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    sd_size: int = 512
    sd_timestep: int = 100
    sd_layers: str = "up-finest-2"
    teacher_cache: str | None = None
    # losses
    recipe: str = "released"
    context_loss: str = "l2"
    context_tau: float = 0.2
    content_loss: str = "roi"
    roi_tokens: int = 4
    rcc_weight: float = 0.0
    rcc_tau: float = 0.2
    content_weight: float = 1.0
    context_weight: float = 0.1
    # SCD (ours where the paper gives no value: DESIGN "SCD")
    scd_weight: float = 1.0
    scd_tau: float = 0.2
    no_scd: bool = False
    refiner: str | None = None
    no_refiner: bool = False
    # the Refiner's own stage (ours)
    refiner_depth: int = 2
    refiner_tokens: int = 4
    refiner_tau: float = 0.2
    # optimisation
    epochs: int = 6
    batch_size: int = 4
    accum_steps: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.1
    betas: tuple[float, float] | None = None
    eps: float | None = None
    warmup_steps: int = 1000
    precision: str = "auto"
    alpha: float = 0.7
    seed: int = 0
    # runtime
    device: str | None = None
    max_steps: int | None = None
    save_every: int = 0
    log_every: int = 10
    val_data: str | None = None
    val_limit: int | None = None
    val_image_size: int = 560
    resume: str | None = None
    extra: dict = field(default_factory=dict)

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
