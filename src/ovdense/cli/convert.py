"""``ovdense convert {coco-stuff,coco-object,cityscapes,pascal-context,ade847,pascal-context-459}``: build the
benchmark label files the eval readers expect (the conversions themselves live in :mod:`ovdense.eval.convert`)."""

from __future__ import annotations

import sys

from ..ranges import POSITIVE_INT, flag_type

#: Subcommand -> help line; the last two write CAT-Seg's 16-bit TIFFs.
HELPS = {
    "coco-stuff": "COCO-Stuff164k stuffthingmaps -> *_labelTrainIds.png (171 classes, as mmseg)",
    "coco-object": "COCO-Stuff164k stuffthingmaps -> *_instanceTrainIds.png (bg + 80 things, as SCLIP)",
    "cityscapes": "gtFine *_labelIds.png -> *_gtFine_labelTrainIds.png (19 classes)",
    "pascal-context": "trainval_merged.json (or trainval/*.mat) -> VOC2010/SegmentationClassContext + splits",
    "ade847": "ADE20K_2021_17_01 validation -> images_detectron2 + annotations_detectron2 16-bit TIFFs (as CAT-Seg)",
    "pascal-context-459": "trainval/*.mat -> VOC2010/annotations_detectron2/pc459_val 16-bit TIFFs (as CAT-Seg)",
}


def register(subparsers) -> None:
    """Add ``ovdense convert DATASET`` (one subcommand per :data:`HELPS` key) to the CLI's subparsers."""
    conv = subparsers.add_parser("convert", help="build the benchmark label files the eval readers expect")
    sub = conv.add_subparsers(dest="convert_dataset", required=True, metavar="DATASET")
    for name, text in HELPS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--data-root",
            default="data",
            help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ADE20K_2021_17_01/ (or that folder)",
        )
        p.add_argument("--overwrite", action="store_true", help="rewrite outputs that already exist")
        p.add_argument(
            "--workers", type=flag_type("workers", POSITIVE_INT), default=None, help="threads (default: up to 8)"
        )
        if name == "pascal-context":
            p.add_argument("--source", default=None, help="trainval_merged.json or a folder of trainval/*.mat")
        if name == "pascal-context-459":
            p.add_argument("--source", default=None, help="the folder of trainval/*.mat (default: trainval/ nearby)")
        p.set_defaults(func=run)


def run(args) -> int:
    from ..eval.convert import (
        convert_ade847,
        convert_cityscapes,
        convert_coco_object,
        convert_coco_stuff,
        convert_pascal_context,
        convert_pascal_context_459,
    )

    kw = {"overwrite": args.overwrite, "workers": args.workers}
    if args.convert_dataset == "pascal-context":
        result = convert_pascal_context(args.data_root, source=args.source, **kw)
    elif args.convert_dataset == "pascal-context-459":
        result = convert_pascal_context_459(args.data_root, source=args.source, **kw)
    else:
        fn = {
            "coco-stuff": convert_coco_stuff,
            "coco-object": convert_coco_object,
            "cityscapes": convert_cityscapes,
            "ade847": convert_ade847,
        }
        result = fn[args.convert_dataset](args.data_root, **kw)
    print(f"{args.convert_dataset}: {result}", file=sys.stderr)
    return 0
