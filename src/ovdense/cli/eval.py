"""``ovdense eval``: mIoU on the 10 benchmarks (mmseg protocol, no mmseg), one, all ten or the classic eight (the
paper-style row: the benchmarks' columns, then Avg10 and Avg8)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..errors import OvdenseError
from ..eval.specs import IGNORE_POLICIES
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
    open_bank_for_cli,
    resolve_preset,
    segmenter,
)


def register(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="mIoU on the 10 benchmarks (mmseg protocol, no mmseg)")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--dataset", default=None, choices=DATASETS, help="one benchmark")
    which.add_argument(
        "--all", action="store_true", help="run the 10 benchmarks and print the paper-style row (Avg10, Avg8)"
    )
    which.add_argument(
        "--eight", action="store_true", help="run the classic 8 (no ADE847, PC459) and print their row (Avg8)"
    )
    ev.add_argument(
        "--data-root",
        default="data",
        help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ade/, ADE20K_2021_17_01/",
    )
    ev.add_argument(
        "--ignore-index",
        default=None,
        choices=IGNORE_POLICIES,
        help="ADE847 and PC459 only: 'authors' leaves out label 255 (a real class there) and scores unlabelled "
        "(65535) pixels as CorrCLIPv2's harness does (default; compares with its README); 'unlabelled' leaves out "
        "65535 as CAT-Seg does. The classic 8 always leave out 255",
    )
    ev.add_argument(
        "--limit", type=flag_type("limit", POSITIVE_INT), default=None, help="only the first N images (smoke runs)"
    )
    ev.add_argument("--out", default="results", help="where the tables go (markdown, CSV, JSON; default results)")
    ev.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write label PNGs (16-bit greyscale for ADE847 and PC459: pixel = class index) and overlays",
    )
    ev.add_argument(
        "--workers", type=flag_type("workers", COUNT), default=2, help="image-decoding worker processes (default 2)"
    )
    add_model_args(ev, masks=True)
    ev.set_defaults(func=run)


def paper_row(results: dict, method: str, ignore: str) -> tuple[str, dict]:
    """The paper-style table of a run over the ten (or the classic eight) benchmarks.

    Args:
        results: benchmark name -> :class:`~ovdense.eval.metrics.SegMetrics`, in column order.
        method: the row's name.
        ignore: the ``--ignore-index`` policy, recorded where ADE847 or PC459 are in the row.

    Returns:
        The markdown table (header: the benchmarks' column titles, then ``Avg10`` where all ten are there and
        ``Avg8``, the mean over the classic 8) and its JSON (mIoU per benchmark, ``avg10``, ``avg8``, and
        ``ignore_index``: the policy, where ADE847 or PC459 are in the row).
    """
    from ..eval.specs import CLASSIC, LARGE, PAPER_COLUMNS

    miou = {name: metrics.miou for name, metrics in results.items()}
    averages = {}
    if set(miou) >= set(CLASSIC) | set(LARGE):
        averages["Avg10"] = sum(miou.values()) / len(miou)
    averages["Avg8"] = sum(miou[name] for name in CLASSIC) / len(CLASSIC)
    titles = [PAPER_COLUMNS[name] for name in miou] + list(averages)
    values = list(miou.values()) + list(averages.values())
    header = "| method | " + " | ".join(titles) + " |"
    row = f"| {method} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
    table = "\n".join([header, "|" + "---|" * (len(titles) + 1), row])
    summary = {**miou, **{key.lower(): value for key, value in averages.items()}}
    if set(miou) & set(LARGE):
        summary["ignore_index"] = ignore
    return table, summary


def _print_paper_row(results, out: Path, method: str, ignore: str) -> list[Path]:
    from ..fileio import write_atomic, write_json_atomic

    table, summary = paper_row(results, method, ignore)
    print("\n" + table)
    md, js = out / f"summary_{method}.md", out / f"summary_{method}.json"
    write_atomic(md, lambda f: f.write((table + "\n").encode()))
    write_json_atomic(summary, js)
    return [md, js]


def run(args) -> int:
    from ..distributed import init_distributed_from_env
    from ..eval.datasets import get_dataset
    from ..eval.runner import evaluate, metrics_table, write_results
    from ..eval.specs import CLASSIC, DATASETS, LARGE
    from ..fileio import check_output_dir

    if not (args.all or args.eight or args.dataset):
        raise OvdenseError("give --dataset NAME, --all (the 10 benchmarks) or --eight (the classic 8)")
    apply_max_pixels(args)
    out = check_output_dir(args.out)
    names = list(DATASETS) if args.all else list(CLASSIC) if args.eight else [args.dataset]
    ignore = args.ignore_index or IGNORE_POLICIES[0]  # None: not given (the classic 8 warn when it is)
    datasets, missing, unread = [], [], []
    for name in names:  # every path checked before any work, every problem named at once
        try:
            datasets.append(get_dataset(name, args.data_root, ignore=ignore))
        except OvdenseError as err:
            missing.append(str(err))
            unread.append(name)
    if len(names) == 1 and missing:
        raise OvdenseError(missing[0])
    if missing:
        hint = " (--eight runs the classic 8 alone)" if set(unread) <= set(LARGE) else ""
        raise OvdenseError(f"{len(missing)} of {len(names)} datasets cannot be read{hint}: " + " | ".join(missing))
    if args.ignore_index is not None and not set(names) & set(LARGE):
        warnings.warn("--ignore-index changes ADE847 and PC459 only; the classic 8 leave out 255", stacklevel=1)
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
    support = open_bank_for_cli(args, loaded, vfm)  # one memory bank for every benchmark
    results = {}
    for dataset in datasets:
        seg = segmenter(args, loaded, weights, dataset.spec.name, vfm, support=support)
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
                "ignore_index": dataset.ignore_index,
                **({"ignore_policy": dataset.ignore_policy} if dataset.spec.unlabelled is not None else {}),
                "preset": preset.to_dict(),
                "processes": info.world_size,
            }
            written = write_results(metrics, out, f"{stem}_{model_tag}".replace("/", "-"), settings)
            if save_dir is not None:
                written.append(save_dir)
            print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    if (args.all or args.eight) and info.is_main:
        written = _print_paper_row(results, out, args.method, ignore)
        print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
