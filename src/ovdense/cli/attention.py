"""``ovdense attention``: where [CLS] and chosen points look (CLIP's attention per block, the head's, a VFM's),
as a picture grid, the maps as ``.npy`` and a JSON summary per image."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import OvdenseError
from ..fileio import unique_stems
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


def register(subparsers) -> None:
    at = subparsers.add_parser(
        "attention", help="where [CLS] and chosen points look: CLIP's attention per block, the head's, a VFM's"
    )
    at.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    at.add_argument("--points", nargs="+", required=True, metavar="X,Y", help="image pixels, e.g. 120,80 300,200")
    at.add_argument("--layers", default=None, help="CLIP blocks to show, e.g. 4,8,12 (default all)")
    at.add_argument("--classes", default=None, help="class list, for methods that need it inside the pass (resclip)")
    at.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    at.add_argument("--cell-height", type=int, default=160, help="height of each map in the grid, pixels (default 160)")
    at.add_argument("--out", required=True, help="output directory")
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


def run(args) -> int:
    import json

    import numpy as np

    from ..attention import check_points
    from ..fileio import check_output_dir, write_group_atomic
    from ..images import decode_image
    from ..methods import get_method
    from ..viz import attention_grid

    apply_max_pixels(args)
    if args.cell_height < 16:
        raise OvdenseError(f"--cell-height must be at least 16 pixels, got {args.cell_height}")
    points = _parse_points(args.points)
    layers = _parse_layers(args.layers)
    out = check_output_dir(args.out)
    images = [Path(p) for p in args.images]
    for path in images:  # every image decodes and holds every point, before any model loads
        check_points(points, decode_image(path).shape[:2])
    stems = unique_stems(images)
    resolve_preset(args, None)
    spec = get_method(args.method)
    classes = read_classes(args) if spec.needs_text or args.classes or args.classes_file else None
    check_inputs(args, images, any_vfm=True)  # --vfm: a VFM to show beside CLIP
    loaded, weights = load_for_cli(args)
    if layers is not None:
        blocks = loaded.tower.num_blocks
        if not layers or any(not 1 <= v <= blocks for v in layers):
            raise OvdenseError(f"--layers: {loaded.model_name} has blocks 1..{blocks}, got {args.layers}")
    seg = segmenter(args, loaded, weights)
    shown = None
    if (args.vfm or args.vfm_checkpoint) and not spec.uses_vfm:
        shown = load_vfm_for_cli(args, seg.device)
    out.mkdir(parents=True, exist_ok=True)
    for path, stem in zip(images, stems, strict=True):
        seg.set_image(path)
        maps = seg.attention_maps(points, layers=layers, classes=classes, vfm=shown)
        picture = attention_grid(seg.image, maps, cell_height=args.cell_height)
        arrays = {"clip": maps.clip, "head": maps.head, "affinity": maps.affinity,
                  "vfm_attention": maps.vfm_attention, "vfm_affinity": maps.vfm_affinity}  # fmt: skip
        arrays = {k: v for k, v in arrays.items() if v is not None}
        summary = {
            "image": str(path),
            "size": list(maps.image_size),
            "method": maps.method,
            "vfm": maps.vfm,
            "layers": list(maps.layers),
            "rows": maps.row_names,
            "columns": [title for title, _ in maps.columns()],
            "arrays": {f"{stem}_{k}.npy": list(v.shape) for k, v in arrays.items()},
        }
        files = {out / f"{stem}_attention.png": lambda f, im=picture: im.save(f, format="PNG")}
        for k, v in arrays.items():
            files[out / f"{stem}_{k}.npy"] = lambda f, v=v: np.save(f, v)
        data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        files[out / f"{stem}_attention.json"] = lambda f, data=data: f.write(data)
        write_group_atomic(files)
    print(f"wrote {len(images)} attention grid(s), their maps (.npy) and JSON to {out}", file=sys.stderr)
    return 0
