"""``ovdense eval``: mIoU on the 8 benchmarks (mmseg protocol, no mmseg), one or all (the paper-style row)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OvdenseError
from ..methods import get_method
from ..presets import DATASETS
from ..ranges import COUNT, POSITIVE_INT, flag_type
from .common import (
    add_model_args,
    apply_max_pixels,
    check_inputs,
    cuda_available,
    load_for_cli,
    load_vfm_for_cli,
    resolve_preset,
    segmenter,
)


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="mIoU on the 8 benchmarks (mmseg protocol, no mmseg)")
    ev.add_argument("--dataset", default=None, choices=DATASETS, help="one benchmark")
    ev.add_argument("--all", action="store_true", help="run the 8 benchmarks and print the paper-style row")
    ev.add_argument("--data-root", default="data", help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ade/")
    ev.add_argument(
        "--limit", type=flag_type("limit", POSITIVE_INT), default=None, help="only the first N images (smoke runs)"
    )
    ev.add_argument("--out", default="results", help="where the tables go (markdown, CSV, JSON; default results)")
    ev.add_argument("--save-predictions", action="store_true", help="also write label PNGs and overlays")
    ev.add_argument(
        "--workers", type=flag_type("workers", COUNT), default=2, help="image-decoding worker processes (default 2)"
    )
    add_model_args(ev, masks=True)
    ev.set_defaults(func=run)


def _print_paper_row(results, datasets, out: Path, method: str) -> list[Path]:
    from ..eval.specs import PAPER_COLUMNS
    from ..fileio import write_atomic, write_json_atomic

    titles = [PAPER_COLUMNS[d.spec.name] for d in datasets]
    values = [results[d.spec.name].miou for d in datasets]
    avg = sum(values) / len(values)
    header = "| method | " + " | ".join(titles) + " | Avg |"
    row = f"| {method} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {avg:.1f} |"
    table = "\n".join([header, "|" + "---|" * (len(titles) + 2), row])
    print("\n" + table)
    md, js = out / f"summary_{method}.md", out / f"summary_{method}.json"
    write_atomic(md, lambda f: f.write((table + "\n").encode()))
    write_json_atomic({**{d.spec.name: results[d.spec.name].miou for d in datasets}, "avg": avg}, js)
    return [md, js]


def run(args) -> int:
    from ..distributed import init_distributed_from_env
    from ..eval.datasets import get_dataset
    from ..eval.runner import evaluate, metrics_table, write_results
    from ..eval.specs import DATASETS
    from ..fileio import check_output_dir

    if bool(args.all) == bool(args.dataset):
        raise OvdenseError("give --dataset NAME or --all")
    apply_max_pixels(args)
    out = check_output_dir(args.out)
    names = list(DATASETS) if args.all else [args.dataset]
    datasets, missing = [], []
    for name in names:  # every path checked before any work, every problem named at once
        try:
            datasets.append(get_dataset(name, args.data_root))
        except OvdenseError as err:
            missing.append(str(err))
    if len(names) == 1 and missing:
        raise OvdenseError(missing[0])
    if missing:
        raise OvdenseError(f"{len(missing)} of {len(names)} datasets cannot be read: " + " | ".join(missing))
    for name in names:  # every benchmark's settings and options, before any model loads
        resolve_preset(args, name)
    for dataset in datasets:
        check_inputs(args, [img for img, _ in dataset.samples[: args.limit]], dataset.spec.name)
    info = init_distributed_from_env(args.device)
    device = args.device
    if device is None and info.world_size > 1 and cuda_available():
        device = f"cuda:{info.local_rank}"
    args.device = device
    loaded, weights = load_for_cli(args, verbose=info.is_main)
    model_tag = loaded.model_name if not args.checkpoint else Path(args.checkpoint).stem
    vfm = None
    if get_method(args.method).uses_vfm:  # one VFM for every benchmark
        vfm = load_vfm_for_cli(args, next(loaded.model.parameters()).device, verbose=info.is_main)
    results = {}
    for dataset in datasets:
        seg = segmenter(args, loaded, weights, dataset.spec.name, vfm)
        preset = seg.preset
        stem = f"{dataset.spec.name}_{preset.method}"
        save_dir = out / "predictions" / stem if args.save_predictions else None
        metrics = evaluate(seg, dataset, limit=args.limit, num_workers=args.workers, save_dir=save_dir)
        results[dataset.spec.name] = metrics
        if info.is_main:
            print(f"\n## {dataset.spec.title} ({metrics.num_images} images), {preset.method}\n")
            print(metrics_table(metrics))
            settings = {
                "dataset": dataset.spec.name,
                "data_root": str(args.data_root),
                "model": loaded.model_name,
                "weights": loaded.source,
                "activation": loaded.activation,
                "limit": args.limit,
                "preset": preset.to_dict(),
                "processes": info.world_size,
            }
            written = write_results(metrics, out, f"{stem}_{model_tag}".replace("/", "-"), settings)
            if save_dir is not None:
                written.append(save_dir)
            print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if args.all and info.is_main:
        written = _print_paper_row(results, datasets, out, args.method)
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
