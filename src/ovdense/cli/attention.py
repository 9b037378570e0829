"""``ovdense attention``: where [CLS] and chosen points look (CLIP's attention per block, the head's, a VFM's),
as a picture grid, the maps as ``.npy`` and a JSON summary per image.

A method whose VFM runs once per image at its own resolution (``corrclipv2``) shows that VFM's affinity alone: no
``vfm_attention`` map is written and the grid has no column for it."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OvdenseError
from ..fileio import unique_stems
from ..ranges import CELL_HEIGHT, flag_type
from .common import (
    add_model_args,
    apply_max_pixels,
    check_inputs,
    load_for_cli,
    load_vfm_for_cli,
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

#: The maps written as ``.npy`` per image, in this order (the VFM's only when a VFM is shown; its attention only when
#: the VFM runs on the pass, not once per image at its own resolution).
ARRAYS = ("clip", "head", "affinity", "vfm_attention", "vfm_affinity")


def register(subparsers) -> None:
    at = subparsers.add_parser(
        "attention", help="where [CLS] and chosen points look: CLIP's attention per block, the head's, a VFM's"
    )
    at.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    at.add_argument("--points", nargs="+", required=True, metavar="X,Y", help="image pixels, e.g. 120,80 300,200")
    at.add_argument("--layers", default=None, help="CLIP blocks to show, e.g. 4,8,12 (default all)")
    at.add_argument("--classes", default=None, help="class list, for methods that need it inside the pass (resclip)")
    at.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    at.add_argument(
        "--cell-height",
        type=flag_type("cell_height", CELL_HEIGHT),
        default=160,
        help="height of each map in the grid, pixels, at least 16 (default 160)",
    )
    at.add_argument("--out", required=True, help="output directory")
    add_overwrite_flag(at)
    add_model_args(at, preset_overrides=False, masks=True)
    at.set_defaults(func=run)


def _parse_points(values: list[str]) -> list[tuple[float, float]]:
    points = []
    for raw in values:
        parts = raw.split(",")
        try:
            x, y = (float(v) for v in parts)
        except ValueError:
            raise OvdenseError(f"--points: expected x,y pixel pairs such as 120,80; got {raw!r}") from None
        points.append((x, y))
    return points


def _parse_layers(raw: str | None) -> list[int] | None:
    if raw is None:
        return None
    try:
        return [int(v) for v in raw.split(",")]
    except ValueError:
        raise OvdenseError(f"--layers: expected block numbers such as 4,8,12; got {raw!r}") from None


def output_files(out: Path, stem: str, vfm_shown: bool, vfm_attention: bool = True) -> dict[str, Path]:
    """The files of one image, ``{kind: path}``: the grid, every map it may write (the head's only when the head
    records its attention: every registered head does; the VFM's attention only with ``vfm_attention``) and the
    JSON."""
    files = {"picture": out / f"{stem}_attention.png"}
    for k in ARRAYS:
        if (vfm_shown or not k.startswith("vfm_")) and (vfm_attention or k != "vfm_attention"):
            files[k] = out / f"{stem}_{k}.npy"
    files["json"] = out / f"{stem}_attention.json"
    return files


def run(args) -> int:
    import json

    import numpy as np

    from ..attention import check_points
    from ..fileio import check_output_dir, check_outputs, write_group_atomic
    from ..methods import get_method
    from ..viz import attention_grid

    apply_max_pixels(args)
    points = _parse_points(args.points)
    layers = _parse_layers(args.layers)
    out = check_output_dir(args.out)
    images, sizes = decode_sizes(args.images)
    for size in sizes:  # every image decodes and holds every point, before any model loads
        check_points(points, size)
    stems = unique_stems(images)
    preset = resolve_preset(args, None)
    spec = get_method(args.method)
    classes = read_classes(args) if spec.needs_text or args.classes or args.classes_file else None
    check_inputs(args, images, any_vfm=True)  # --vfm: a VFM to show beside CLIP
    check_network_sizes(images, sizes, preset)  # every limit the run meets, before any model loads ...
    check_mask_files(args, images, sizes)
    vfm_shown = bool(spec.uses_vfm or args.vfm or args.vfm_checkpoint)
    # A native-resolution VFM (corrclipv2's) gives no attention: its affinity alone.
    files = [output_files(out, stem, vfm_shown, vfm_attention=not spec.native_vfm) for stem in stems]
    planned = {f: path for path, group in zip(images, files, strict=True) for f in group.values()}
    check_outputs(planned, run_inputs(args, images), args.overwrite)
    loaded, weights = load_for_cli(args)
    if layers is not None:
        blocks = loaded.tower.num_blocks
        if not layers or any(not 1 <= v <= blocks for v in layers):
            raise OvdenseError(f"--layers: {loaded.model_name} has blocks 1..{blocks}, got {args.layers}")
    seg = segmenter(args, loaded, weights)
    check_windows(images, sizes, seg)  # ... and the windows against the patch size, before the first image
    shown = None
    if (args.vfm or args.vfm_checkpoint) and not spec.uses_vfm:
        shown = load_vfm_for_cli(args, seg.device)
    out.mkdir(parents=True, exist_ok=True)
    failures = ImageFailures(len(images))
    for path, group in zip(images, files, strict=True):
        with failures.image(path):  # what no check can know (memory...) fails this image only, in one line
            seg.set_image(path)
            maps = seg.attention_maps(points, layers=layers, classes=classes, vfm=shown)
            picture = attention_grid(seg.image, maps, cell_height=args.cell_height)
            arrays = {k: getattr(maps, k) for k in ARRAYS}
            arrays = {k: v for k, v in arrays.items() if v is not None}
            summary = {
                "image": str(path),
                "size": list(maps.image_size),
                "method": maps.method,
                "vfm": maps.vfm,
                "layers": list(maps.layers),
                "rows": maps.row_names,
                "columns": [title for title, _ in maps.columns()],
                "arrays": {group[k].name: list(v.shape) for k, v in arrays.items()},
            }
            writes = {group["picture"]: lambda f, im=picture: im.save(f, format="PNG")}
            for k, v in arrays.items():
                writes[group[k]] = lambda f, v=v: np.save(f, v)
            data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            writes[group["json"]] = lambda f, data=data: f.write(data)
            write_group_atomic(writes)
    if failures.done:
        print(f"wrote {failures.done} attention grid(s), their maps (.npy) and JSON to {out}", file=sys.stderr)
    return failures.finish(out)
