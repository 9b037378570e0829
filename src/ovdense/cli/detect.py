"""``ovdense detect``: open-vocabulary boxes with an F-ViT; writes a box overlay PNG and a JSON per image.

A detector with a mask head (OV-LVIS) also gives instance masks: the overlay blends them in and each JSON detection
holds ``mask_rle``, COCO's compressed RLE (:meth:`ovdense.detection.result.DetectionResult.to_json` with ``rle``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..fileio import unique_stems
from .common import add_detector_args, apply_max_pixels, check_detector_inputs, detector_for_cli, read_classes
from .outputs import ImageFailures, add_overwrite_flag, decode_sizes, run_inputs


def register(subparsers) -> None:
    det = subparsers.add_parser(
        "detect",
        help="detect any class names with an F-ViT detector; writes box overlays and JSON (with masks as COCO RLE "
        "for a mask-head detector, OV-LVIS)",
    )
    det.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    det.add_argument("--classes", default=None, help='"cat; dog, puppy; sofa" (; between classes, , between synonyms)')
    det.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    det.add_argument("--out", required=True, help="output directory")
    add_overwrite_flag(det)
    add_detector_args(det)
    det.set_defaults(func=run)


def output_files(out, stem: str) -> dict[str, object]:
    """The two files of one image: ``{kind: path}``."""
    return {"overlay": out / f"{stem}_boxes.png", "json": out / f"{stem}.json"}


def run(args) -> int:
    import json

    from tqdm import tqdm

    from ..fileio import check_output_dir, check_outputs, write_group_atomic

    apply_max_pixels(args)
    classes = read_classes(args)
    out = check_output_dir(args.out)
    check_detector_inputs(args)
    images, _ = decode_sizes(args.images)
    stems = unique_stems(images)
    renamed = [f"{p} -> {stem}" for p, stem in zip(images, stems, strict=True) if stem != p.stem]
    if renamed:
        print(f"note: images share file names; writing them as: {', '.join(renamed)}", file=sys.stderr)
    files = [output_files(out, stem) for stem in stems]
    planned = {f: path for path, group in zip(images, files, strict=True) for f in group.values()}
    inputs = run_inputs(args, images) + [Path(p) for p in (args.detector, args.class_embeddings) if p]
    check_outputs(planned, inputs, args.overwrite)
    det = detector_for_cli(args)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for group in classes for n in group]
    det.class_embeddings(names)  # text first: errors before any image work
    failures = ImageFailures(len(images))
    for path, group in tqdm(list(zip(images, files, strict=True)), desc="detect", unit="img", disable=None):
        with failures.image(path):
            det.set_image(path)
            result = det.detect(classes)
            summary = {
                "image": str(path),
                "detector": str(args.detector),
                "model": det.settings["model"],
                "benchmark": args.benchmark,
                **result.to_json(rle=True),
            }
            overlay = result.overlay(det.image)
            data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            write_group_atomic(
                {
                    group["overlay"]: lambda f, im=overlay: im.save(f, format="PNG"),
                    group["json"]: lambda f, data=data: f.write(data),
                }
            )
    if failures.done:
        print(f"wrote {failures.done} box overlay(s) and JSON file(s) to {out}", file=sys.stderr)
    return failures.finish(out)
