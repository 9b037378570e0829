"""``ovdense segment``: segment images with any class names; writes overlays, label PNGs and JSON summaries."""

from __future__ import annotations

import sys

from ..errors import OvdenseError
from ..fileio import unique_stems
from ..presets import DATASETS
from ..ranges import FRACTION, flag_type
from .common import (
    add_model_args,
    apply_max_pixels,
    check_inputs,
    load_for_cli,
    read_classes,
    resolve_preset,
    segmenter,
)
from .outputs import (
    ImageFailures,
    add_overwrite_flag,
    check_mask_files,
    check_network_sizes,
    check_windows,
    decode_sizes,
    run_inputs,
)


def register(subparsers) -> None:
    seg = subparsers.add_parser(
        "segment", help="segment images with any class names; writes overlays, label PNGs, JSON"
    )
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    seg.add_argument("--classes", default=None, help='"sky; person, person in shirt; tree" (; between classes)')
    seg.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    seg.add_argument("--out", required=True, help="output directory")
    add_overwrite_flag(seg)
    seg.add_argument(
        "--alpha", type=flag_type("alpha", FRACTION), default=0.5, help="overlay opacity, 0..1 (default 0.5)"
    )
    seg.add_argument("--dataset", default=None, choices=DATASETS, help="use the method's settings for this benchmark")
    add_model_args(seg, masks=True)
    seg.set_defaults(func=run)


def output_files(out, stem: str) -> dict[str, object]:
    """The three files of one image: ``{kind: path}``."""
    return {"overlay": out / f"{stem}_overlay.png", "labels": out / f"{stem}_labels.png", "json": out / f"{stem}.json"}


def run(args) -> int:
    import json

    from tqdm import tqdm

    from ..fileio import check_output_dir, check_outputs, write_group_atomic
    from ..viz import MAX_LABEL_VALUE, label_image

    apply_max_pixels(args)
    classes = read_classes(args)
    if len(classes) > MAX_LABEL_VALUE + 1:  # more than 256: a 16-bit labels PNG (pixel = class index)
        raise OvdenseError(f"{len(classes)} classes: a 16-bit label PNG holds at most {MAX_LABEL_VALUE + 1}")
    out = check_output_dir(args.out)
    images, sizes = decode_sizes(args.images)
    stems = unique_stems(images)
    renamed = [f"{p} -> {stem}" for p, stem in zip(images, stems, strict=True) if stem != p.stem]
    if renamed:
        print(f"note: images share file names; writing them as: {', '.join(renamed)}", file=sys.stderr)
    preset = resolve_preset(args, args.dataset)  # settings and options checked before any model loads
    check_inputs(args, images)
    # Every image against every limit the run will meet, before any model loads (the window sizes below, once
    # the tower's patch size is known, before the first image): no run stops half-way on an image it could judge.
    check_network_sizes(images, sizes, preset)
    check_mask_files(args, images, sizes)
    files = [output_files(out, stem) for stem in stems]
    planned = {f: path for path, group in zip(images, files, strict=True) for f in group.values()}
    check_outputs(planned, run_inputs(args, images), args.overwrite)
    loaded, weights = load_for_cli(args)
    seg = segmenter(args, loaded, weights, args.dataset)
    check_windows(images, sizes, seg)
    out.mkdir(parents=True, exist_ok=True)
    seg.text_classifier(classes)  # text first: one bar, and errors before any image work
    failures = ImageFailures(len(images))
    for path, group in tqdm(list(zip(images, files, strict=True)), desc="segment", unit="img", disable=None):
        with failures.image(path):  # what no check can know (memory...) fails this image only, in one line
            seg.set_image(path)
            result = seg.predict(classes)
            summary = {
                "image": str(path),
                "size": list(result.labels.shape),
                "model": loaded.model_name,
                "weights": loaded.source,
                "activation": loaded.activation,
                "classes": result.class_names,
                "areas": result.areas(),
                "settings": result.settings,
            }
            # One format for every image of the run: 16-bit when the class list has more than 256 classes.
            overlay = result.overlay(alpha=args.alpha)
            labels = label_image(result.labels, num_classes=len(result.class_names))
            data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            # The three files of an image appear together or not at all, also on Ctrl-C.
            write_group_atomic(
                {
                    group["overlay"]: lambda f, im=overlay: im.save(f, format="PNG"),
                    group["labels"]: lambda f, im=labels: im.save(f, format="PNG"),
                    group["json"]: lambda f, data=data: f.write(data),
                }
            )
    if failures.done:
        print(f"wrote {failures.done} overlay(s), label map(s) and JSON summaries to {out}", file=sys.stderr)
    return failures.finish(out)
