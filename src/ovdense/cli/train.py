"""``ovdense train {declip,scd,refiner}``: distillation training (one trainer).

The flags are built from :class:`~ovdense.train.config.TrainConfig`'s fields: one flag per field, its help text
from the field's metadata, its type from the annotation, its choices from ``CHOICES``; a field whose metadata
names an objective is a flag of that objective only.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import OvdenseError
from ..ranges import flag_type
from .common import warn_test_model

#: The objectives (subcommands) and their help lines.
OBJECTIVES = {
    "declip": "DeCLIP: content (CLIP crops) + context (VFM affinities)",
    "scd": "SCD: region-language alignment + spatial correlation distillation (optionally via a Refiner)",
    "refiner": "the Refiner for SCD, self-supervised on the frozen CLIP (its own stage)",
    "fvit": "F-ViT: CLIPSelf's open-vocabulary detector on the frozen tower (OV-COCO)",
}

#: TrainConfig fields that are no flags: the subcommand, and what only code sets.
_NOT_FLAGS = ("objective", "extra")


def register(subparsers) -> None:
    tr = subparsers.add_parser("train", help="distillation training: declip, scd, refiner (one trainer)")
    objectives = tr.add_subparsers(dest="objective", required=True)
    for kind, text in OBJECTIVES.items():
        _train_flags(objectives.add_parser(kind, help=text), kind)


def _flag_type(annotation) -> tuple[type, int | None]:
    """The argparse type of a field's resolved annotation (``X | None``: X) and its ``nargs`` (tuples)."""
    import types
    import typing

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        items = typing.get_args(annotation)
        return items[0], len(items)
    return annotation, None


def _train_flags(p, objective: str) -> None:
    import dataclasses
    import typing

    from ..train.config import CHOICES, TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        owner = f.metadata.get("objective")
        if f.name in _NOT_FLAGS or (owner is not None and owner != objective):
            continue
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"]  # every flag has a help line (KeyError here: a TrainConfig field without one)
        if f.default is not None and f.default != "" and not isinstance(f.default, bool):
            text += f" (default: {f.default})"
        kw = {"dest": f.name, "default": None, "help": text}
        kind, nargs = _flag_type(hints[f.name])
        if "range" in f.metadata:  # numbers: read and checked by the field's declared range
            kind = flag_type(f.name, replace(f.metadata["range"], integer=kind is int))
        if kind is bool:
            p.add_argument(flag, action="store_true", **kw)
        elif nargs is not None:
            p.add_argument(flag, type=kind, nargs=nargs, **kw)
        else:
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            p.add_argument(flag, type=kind, required=f.metadata.get("required", False), **kw)
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from ..train.config import RECIPES, TrainConfig
    from ..train.trainer import Trainer

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    # Flags not given are None (store_true ones False): only given ones override the config and the recipe.
    given = {n: v for n in names if (v := getattr(args, n, None)) is not None and v is not False}
    given["objective"] = args.objective
    recipe = given.pop("recipe", "released")
    if args.objective != "declip":
        recipe = "released"  # the recipes are DeCLIP's loss settings
    if recipe not in RECIPES:
        raise OvdenseError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    try:
        cfg = TrainConfig(**given).with_recipe(recipe, explicit=set(given)).with_objective_defaults(set(given))
    except (TypeError, ValueError) as err:
        raise OvdenseError(str(err)) from None
    if cfg.objective == "fvit":
        from ..train.fvit import FViTTrainer as Trainer  # noqa: F811 (the detector's trainer)
    try:
        trainer = Trainer.from_config(cfg)
    except ValueError as err:
        raise OvdenseError(str(err).splitlines()[0]) from None
    if trainer.dist.is_main:
        if trainer.loaded.is_test_model:
            warn_test_model(cfg.model)
        vfm = getattr(trainer.objective, "vfm", None)
        if getattr(vfm, "is_test_model", False):
            warn_test_model(f"the VFM teacher {cfg.vfm}")
    last = trainer.fit()
    if last is not None and trainer.dist.is_main:
        print(f"wrote {last}")
    return 0
