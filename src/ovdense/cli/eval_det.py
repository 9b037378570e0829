"""``ovdense eval-det``: open-vocabulary detection AP of an F-ViT (OV-COCO novel / base / all AP50, COCO transfer,
OV-LVIS mask AP_r)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OvdenseError
from ..ranges import COUNT, POSITIVE_INT, flag_type
from .common import add_detector_args, apply_max_pixels, check_detector_inputs, cuda_available, detector_for_cli

#: Where each benchmark's ground truth and images lie under --data-root (the standard COCO 2017 layout; LVIS v1 val
#: images are COCO 2017 images, named by the last part of each image's coco_url).
LAYOUT = {
    "ov-coco": ("annotations/instances_val2017.json", "val2017"),
    "coco": ("annotations/instances_val2017.json", "val2017"),
    "ov-lvis": ("annotations/lvis_v1_val.json", "val2017"),
}


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval-det",
        help="detection AP of an F-ViT: OV-COCO novel/base/all AP50, COCO transfer (pycocotools), OV-LVIS mask AP_r "
        "(lvis)",
    )
    ev.add_argument(
        "--data-root",
        required=True,
        help="COCO 2017 folder: val2017/, annotations/instances_val2017.json (ov-lvis: annotations/lvis_v1_val.json)",
    )
    ev.add_argument(
        "--ann-file",
        default=None,
        help="ground-truth JSON instead of the layout's (e.g. OVR-CNN's instances_val2017_all_2.json)",
    )
    ev.add_argument("--out", required=True, help="where metrics.json, per_class.csv and results.md go")
    ev.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write OUT/detections.json (COCO results format; ov-lvis: LVIS results with mask RLEs)",
    )
    ev.add_argument(
        "--no-box-ap",
        action="store_true",
        help="ov-lvis: score mask AP only (CLIPSelf's metric), not also box AP (a second LVISEval pass)",
    )
    ev.add_argument(
        "--limit", type=flag_type("limit", POSITIVE_INT), default=None, help="only the first N images (smoke runs)"
    )
    ev.add_argument(
        "--workers", type=flag_type("workers", COUNT), default=2, help="image-decoding worker processes (default 2)"
    )
    add_detector_args(ev)
    ev.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..distributed import init_distributed_from_env
    from ..eval.detection import detection_table, load_coco_annotations, write_detection_report
    from ..eval.detection_runner import evaluate_detector
    from ..fileio import check_output_dir, write_atomic

    lvis = args.benchmark == "ov-lvis"
    apply_max_pixels(args)
    out = check_output_dir(args.out)
    check_detector_inputs(args)
    ann_rel, image_rel = LAYOUT[args.benchmark]
    root = Path(args.data_root)
    ann = Path(args.ann_file) if args.ann_file else root / ann_rel
    image_dir = root / image_rel
    if not ann.is_file():
        raise OvdenseError(f"annotation file not found: {ann}")
    if not image_dir.is_dir():
        raise OvdenseError(f"image folder not found: {image_dir}")
    if lvis:  # schema and split checked before any model
        from ..eval.lvis import load_lvis_annotations, lvis_table, write_lvis_report

        coco_gt, categories = load_lvis_annotations(ann)
    else:
        coco_gt, categories = load_coco_annotations(ann, args.benchmark)
    info = init_distributed_from_env(args.device)
    if args.device is None and info.world_size > 1 and cuda_available():
        args.device = f"cuda:{info.local_rank}"
    det = detector_for_cli(args, verbose=info.is_main)
    metrics, detections = evaluate_detector(
        det, coco_gt, categories, image_dir, limit=args.limit, num_workers=args.workers, box_ap=not args.no_box_ap
    )
    if not info.is_main:
        return 0
    print(f"\n## {args.benchmark} ({metrics.num_images} images), F-ViT {det.settings['model']}\n")
    print(lvis_table(metrics, per_class=False) if lvis else detection_table(metrics))  # 1203 rows: in results.md
    settings = {
        "benchmark": args.benchmark,
        "annotations": str(ann),
        "images": str(image_dir),
        "limit": args.limit,
        "processes": info.world_size,
        "detector": det.settings,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = (write_lvis_report if lvis else write_detection_report)(metrics, out, settings)
    if args.save_predictions:
        path = out / "detections.json"
        data = json.dumps(detections).encode("utf-8")
        write_atomic(path, lambda f: f.write(data))
        written.append(path)
    print(f"\nwrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0
