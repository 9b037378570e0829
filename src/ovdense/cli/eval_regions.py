"""``ovdense eval-regions``: region classification on COCO panoptic (boxes, masks, crops)."""

from __future__ import annotations

import sys

from ..errors import OvdenseError
from ..ranges import COUNT, POSITIVE_INT, flag_type
from .common import (
    add_model_args,
    apply_max_pixels,
    check_inputs,
    cuda_available,
    load_for_cli,
    resolve_preset,
    segmenter,
)


def register(subparsers) -> None:
    er = subparsers.add_parser("eval-regions", help="region classification on COCO panoptic (boxes, masks, crops)")
    er.add_argument("--data-root", default="data/coco", help="folder holding val2017/ and annotations/")
    er.add_argument("--split", default="val2017", help="val2017 (default) or another panoptic split")
    er.add_argument(
        "--image-size",
        type=flag_type("image_size", POSITIVE_INT),
        default=None,
        help="detection input side (default 64 patches; at least the patch size)",
    )
    er.add_argument(
        "--limit", type=flag_type("limit", POSITIVE_INT), default=None, help="only the first N images (smoke runs)"
    )
    er.add_argument("--crops", action="store_true", help="also score the crop baseline (vanilla tower)")
    er.add_argument("--out", default="results/regions", help="where metrics.json and the tables go")
    er.add_argument("--save-predictions", action="store_true", help="also write regions.jsonl")
    er.add_argument(
        "--workers", type=flag_type("workers", COUNT), default=2, help="image-decoding worker processes (default 2)"
    )
    add_model_args(er, preset_overrides=False)
    er.set_defaults(func=run, method="declip")


def run(args) -> int:
    from ..distributed import init_distributed_from_env
    from ..eval.panoptic import CocoPanoptic
    from ..eval.regions import evaluate_regions, regions_table, write_region_results
    from ..fileio import check_output_dir

    apply_max_pixels(args)
    check_output_dir(args.out)
    dataset = CocoPanoptic(args.data_root, split=args.split)  # paths checked before any model work
    if len(dataset) == 0:
        raise OvdenseError(f"{args.data_root}: the {args.split} panoptic annotations list no images")
    preset = resolve_preset(args, None)
    check_inputs(args)
    info = init_distributed_from_env(args.device)
    if args.device is None and info.world_size > 1 and cuda_available():
        args.device = f"cuda:{info.local_rank}"
    loaded, weights = load_for_cli(args, verbose=info.is_main)
    seg = segmenter(args, loaded, weights, verbose=info.is_main)
    if args.image_size is not None and args.image_size < loaded.tower.patch_size:
        raise OvdenseError(f"--image-size must be at least the patch size ({loaded.tower.patch_size})")
    size = args.image_size or seg.default_region_size
    metrics, records = evaluate_regions(
        seg,
        dataset,
        image_size=size,
        crops=args.crops,
        limit=args.limit,
        num_workers=args.workers,
        save_predictions=args.save_predictions,
    )
    if info.is_main:
        print(f"\n## COCO panoptic {args.split} region classification, {preset.method} head, input {size}\n")
        print(regions_table(metrics))
        settings = {
            "data_root": str(args.data_root),
            "split": args.split,
            "model": loaded.model_name,
            "weights": loaded.source,
            "activation": loaded.activation,
            "method": preset.method,
            "head": preset.head,
            "head_kwargs": preset.head_kwargs,
            "pos_rule": preset.pos_rule,
            "image_size": size,
            "crops": args.crops,
            "templates": "ViLD detection templates (63)",
            "limit": args.limit,
            "processes": info.world_size,
        }
        written = write_region_results(metrics, args.out, settings, records)
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
