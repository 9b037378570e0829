"""Command line: ``ovdense segment | attention | demo | eval | eval-regions | train | convert | list-...``.

Bad input (missing image, empty class list, unknown model, corrupt checkpoint, CUDA without CUDA, an ``--out``
that cannot be written...) prints one line on stderr and exits 2, before anything is written to ``--out``.
Warnings are one line each (``ovdense: warning: ...``). This module imports torch, open_clip and timm only
inside the commands that need them, so ``--help``, ``list-methods`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import OvdenseError, RandomWeightsWarning
from .presets import DATASETS, METHODS

EXIT_USAGE = 2


def _add_model_args(
    p: argparse.ArgumentParser, preset_overrides: bool = True, masks: bool = False, method: bool = True
) -> None:
    from .precision import PRECISIONS
    from .presets import DECLIP_MODES

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="open_clip architecture or hf-hub:org/repo (default ViT-B-16; corrclip: ViT-B-16-quickgelu, MetaCLIP)",
    )
    g.add_argument("--pretrained", default=None, help="open_clip pretrained tag, e.g. openai (default for ViT-B-16)")
    g.add_argument(
        "--checkpoint",
        default=None,
        help="local weights file (.safetensors, .pt, .bin, OpenAI JIT, EVA-CLIP)",
    )
    if method:
        g.add_argument(
            "--method",
            default="sclip",
            choices=list(METHODS),
            help="dense head and its authors' settings (default sclip)",
        )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: fp16 autocast on CUDA (as the references), fp32 on the CPU",
    )
    g.add_argument(
        "--declip-mode",
        default=None,
        choices=DECLIP_MODES,
        help="DeCLIP head attention (default csa; DeCLIP's released training and region numbers use qq)",
    )
    g.add_argument("--window-batch", type=int, default=16, help="sliding windows per forward pass (default 16)")
    g.add_argument(
        "--text-cache", default=None, help="text-embedding cache dir ('off' disables; default $OVDENSE_CACHE/text)"
    )
    g.add_argument(
        "--vfm",
        default=None,
        help="VFM of proxyclip/corrclip (default dino-b8): dino-{s,b}{8,16}, dinov2-{s,b,l}[-reg], timm:NAME",
    )
    g.add_argument("--vfm-checkpoint", default=None, help="local weights file of the VFM (DINO/timm layout)")
    if masks and method:
        g.add_argument(
            "--masks-dir",
            default=None,
            help="corrclip's class-agnostic masks: <image stem>.npz files (instance_mask); for eval the folder "
            "holding voc/, context/, coco/, city/, ade/ (CorrCLIP's region_masks)",
        )
    if masks:
        from .mask_generators import MASK_GENERATORS

        g.add_argument(
            "--mask-generator",
            default=None,
            choices=tuple(MASK_GENERATORS),
            help="corrclip: generate the masks with transformers' SAM or SAM2 instead (pip install 'ovdense[masks]')",
        )
        g.add_argument(
            "--mask-model",
            default=None,
            help="SAM/SAM2 hub id or folder of --mask-generator (default facebook/sam-vit-base / sam2-hiera-large)",
        )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image to decode, in pixels (default Pillow's ~89.5 MP or $OVDENSE_MAX_PIXELS; 0 = no limit)",
    )
    if not preset_overrides:
        return
    o = p.add_argument_group("preset overrides (default: the method's published settings)")
    o.add_argument("--short-side", type=int, default=None, help="resize so the short side is at most this (mmseg rule)")
    o.add_argument("--long-side", type=int, default=None, help="... and the long side at most this")
    o.add_argument("--crop", type=int, default=None, help="window size in pixels, 0 = whole image")
    o.add_argument("--stride", type=int, default=None, help="window stride in pixels")
    o.add_argument("--logit-scale", type=float, default=None, help="multiplies the cosine maps before the softmax")
    o.add_argument("--prob-thd", type=float, default=None, help="pixels below it become class 0 (background)")
    o.add_argument(
        "--area-thd",
        type=float,
        default=None,
        help="drop classes predicted on at most this fraction of the foreground (SCLIP's VOC21 rule)",
    )
    o.add_argument("--pamr", default=None, choices=("on", "off"), help="PAMR refinement of the cosine maps (NACLIP)")


def _preset_overrides(args) -> dict:
    names = ("short_side", "long_side", "crop", "stride", "logit_scale", "prob_thd", "area_thd")
    overrides = {name: getattr(args, name, None) for name in names}
    pamr = getattr(args, "pamr", None)
    overrides["pamr"] = None if pamr is None else pamr == "on"
    return overrides


def _apply_method_weights(args, preset) -> None:
    """The CLIP a method's authors default to (CorrCLIP: MetaCLIP) when --model is not given; else ViT-B-16."""
    if args.model is None:
        args.model = preset.model or "ViT-B-16"
        if preset.pretrained and not args.pretrained and not args.checkpoint:
            args.pretrained = preset.pretrained


def _check_method_inputs(args, preset, image_paths=None, dataset=None, vfm_for_any_method: bool = False) -> None:
    """The VFM and mask flags against what the method's head uses, and every image's mask file, before any
    model loads (``vfm_for_any_method``: --vfm is valid with every method, as in ``attention``)."""
    from .heads import HEADS
    from .masks import region_map_for

    head = HEADS[preset.head]
    if (args.vfm or args.vfm_checkpoint) and not head.uses_vfm and not vfm_for_any_method:
        raise OvdenseError(
            f"--vfm and --vfm-checkpoint apply to methods with a VFM (proxyclip, corrclip), not {args.method}"
        )
    masks_dir, generator = getattr(args, "masks_dir", None), getattr(args, "mask_generator", None)
    if (masks_dir or generator or getattr(args, "mask_model", None)) and not head.uses_masks:
        raise OvdenseError(f"--masks-dir, --mask-generator and --mask-model apply to corrclip, not {args.method}")
    if not head.uses_masks:
        return
    if masks_dir and generator:
        raise OvdenseError("give --masks-dir or --mask-generator, not both")
    if not masks_dir and not generator:
        raise OvdenseError(
            f"{args.method} needs class-agnostic masks: --masks-dir DIR (CorrCLIP's <image stem>.npz files) or "
            "--mask-generator sam"
        )
    if masks_dir:
        if not Path(masks_dir).is_dir():
            raise OvdenseError(f"--masks-dir {masks_dir} is not a folder")
        for path in image_paths or ():
            region_map_for(masks_dir, path, dataset)  # one line naming the first image without a mask file


def _default_pretrained(args) -> str | None:
    if args.pretrained or args.checkpoint or args.model.startswith("hf-hub:"):
        return args.pretrained
    from .backbones import is_test_model

    if is_test_model(args.model):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(args.model)
    return "openai" if "openai" in tags else (tags[0] if tags else None)


def _read_classes(args) -> list[list[str]]:
    from .classes import parse_class_string, read_class_file
    from .errors import first_line

    if args.classes and args.classes_file:
        raise OvdenseError("give --classes or --classes-file, not both")
    if args.classes is None and not args.classes_file:
        raise OvdenseError('no classes: pass --classes "sky; person, person in shirt; tree" or --classes-file')
    try:
        # Checked here, before any model loads; its warnings come once, when the segmenter takes the list.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return read_class_file(args.classes_file) if args.classes_file else parse_class_string(args.classes)
    except (ValueError, OSError) as err:
        raise OvdenseError(first_line(err)) from None


def _check_images(paths: list[str]) -> list[Path]:
    """Decode every image before anything is written, so a bad file stops the run with nothing half-done."""
    from .images import decode_image

    for raw in paths:
        decode_image(raw)
    return [Path(p) for p in paths]


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names, one per input, that never collide (compared without case, as some file systems do).

    A file's stem where it is unique; else, for files in different folders, the stem prefixed by as many
    parent folders as it takes (``d1/x.jpg``, ``d2/x.jpg`` -> ``d1_x``, ``d2_x``); for files in one folder, the
    extension (``x.jpg``, ``x.png`` -> ``x_jpg``, ``x_png``); for the same file twice, a counter.
    """
    full = [Path(os.path.abspath(p)) for p in paths]
    depth = [0] * len(full)
    with_suffix = [False] * len(full)

    def name(i: int) -> str:
        folders = full[i].parent.parts[1:]  # without the root
        prefix = list(folders[len(folders) - depth[i] :]) if depth[i] else []
        return "_".join([*prefix, full[i].name.replace(".", "_") if with_suffix[i] else full[i].stem])

    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(full)):
            groups.setdefault(name(i).casefold(), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(i) for i in range(len(full))]
        grown = False
        for group in clashes:
            can_grow = [i for i in group if depth[i] < len(full[i].parent.parts) - 1]
            if len({full[i].parent for i in group}) > 1 and can_grow:
                for i in can_grow:
                    depth[i] += 1
                grown = True
            elif not all(with_suffix[i] for i in group):
                for i in group:
                    with_suffix[i] = True
                grown = True
        if not grown:
            break
    names: list[str] = []
    seen: set[str] = set()
    for i in range(len(full)):
        candidate, n = name(i), 1
        while candidate.casefold() in seen:
            n += 1
            candidate = f"{name(i)}_{n}"
        seen.add(candidate.casefold())
        names.append(candidate)
    return names


def _warn_test_model(name: str) -> None:
    bar = "!" * 78
    print(
        f"{bar}\nWARNING: {name} is a RANDOM test architecture. Its predictions are meaningless;\n"
        f"use it for tests and smoke runs only.\n{bar}",
        file=sys.stderr,
    )


def cmd_segment(args) -> int:
    import json

    from tqdm import tqdm

    from .fileio import check_output_dir, write_group_atomic
    from .viz import MAX_PALETTE, label_image

    _apply_max_pixels(args)
    classes = _read_classes(args)
    if len(classes) > MAX_PALETTE:
        raise OvdenseError(f"{len(classes)} classes: a label PNG colours at most {MAX_PALETTE}")
    out = check_output_dir(args.out)
    images = _check_images(args.images)
    stems = unique_stems(images)
    renamed = [f"{p} -> {stem}" for p, stem in zip(images, stems, strict=True) if stem != p.stem]
    if renamed:
        print(f"note: images share file names; writing them as: {', '.join(renamed)}", file=sys.stderr)
    preset = _resolve_preset(args, args.dataset)
    _apply_method_weights(args, preset)
    _check_method_inputs(args, preset, images)
    loaded = _load_for_cli(args)
    seg = _segmenter(args, loaded, preset)
    out.mkdir(parents=True, exist_ok=True)
    seg.text_classifier(classes)  # text first: one bar, and errors before any image work
    for path, stem in tqdm(list(zip(images, stems, strict=True)), desc="segment", unit="img", disable=None):
        seg.set_image(path)
        result = seg.predict(classes)
        summary = {
            "image": str(path),
            "size": list(result.labels.shape),
            "model": args.model,
            "weights": loaded.source,
            "activation": loaded.activation,
            "classes": result.class_names,
            "areas": result.areas(),
            "settings": result.settings,
        }
        overlay, labels = result.overlay(alpha=args.alpha), label_image(result.labels)
        data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        # The three files of an image appear together or not at all, also on Ctrl-C.
        write_group_atomic(
            {
                out / f"{stem}_overlay.png": lambda f, im=overlay: im.save(f, format="PNG"),
                out / f"{stem}_labels.png": lambda f, im=labels: im.save(f, format="PNG"),
                out / f"{stem}.json": lambda f, data=data: f.write(data),
            }
        )
    print(f"wrote {len(images)} overlay(s), label map(s) and JSON summaries to {out}", file=sys.stderr)
    return 0


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


def cmd_attention(args) -> int:
    import json

    import numpy as np

    from .attention import check_points
    from .fileio import check_output_dir, write_group_atomic
    from .heads import HEADS
    from .images import decode_image
    from .viz import attention_grid

    _apply_max_pixels(args)
    if args.cell_height < 16:
        raise OvdenseError(f"--cell-height must be at least 16 pixels, got {args.cell_height}")
    points = _parse_points(args.points)
    layers = _parse_layers(args.layers)
    out = check_output_dir(args.out)
    images = [Path(p) for p in args.images]
    for path in images:  # every image decodes and holds every point, before any model loads
        check_points(points, decode_image(path).shape[:2])
    stems = unique_stems(images)
    preset = _resolve_preset(args, None)
    _apply_method_weights(args, preset)
    head = HEADS[preset.head]
    classes = _read_classes(args) if head.needs_text or args.classes or args.classes_file else None
    _check_method_inputs(args, preset, images, vfm_for_any_method=True)  # --vfm: a VFM to show beside CLIP
    loaded = _load_for_cli(args)
    if layers is not None:
        blocks = loaded.tower.num_blocks
        if not layers or any(not 1 <= v <= blocks for v in layers):
            raise OvdenseError(f"--layers: {args.model} has blocks 1..{blocks}, got {args.layers}")
    seg = _segmenter(args, loaded, preset)
    shown = None
    if (args.vfm or args.vfm_checkpoint) and not head.uses_vfm:
        shown = _load_vfm_for_cli(args, preset, seg.device)
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


def cmd_demo(args) -> int:
    from .errors import first_line
    from .heads import HEADS
    from .presets import get_preset

    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise OvdenseError(f"--methods: expected a comma list of {', '.join(METHODS)}; got {args.methods!r}")
    if not 0 < args.port < 65536:
        raise OvdenseError(f"--port must be in 1..65535, got {args.port}")
    _apply_max_pixels(args)
    presets = {m: get_preset(m) for m in methods}
    heads = {m: HEADS[p.head] for m, p in presets.items()}
    needs_masks = [m for m, h in heads.items() if h.uses_masks]
    if needs_masks and not args.mask_generator:
        raise OvdenseError(f"{needs_masks[0]} needs class-agnostic masks of each upload: add --mask-generator sam")
    if args.mask_generator and not needs_masks:
        raise OvdenseError("--mask-generator and --mask-model apply to corrclip; it is not among --methods")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OvdenseError("the demo needs Gradio: pip install 'ovdense[demo]'") from None
    from .demo import DemoSession, build_app

    _apply_method_weights(args, presets[methods[0]])
    loaded = _load_for_cli(args)
    device = next(loaded.model.parameters()).device
    vfm = None
    if args.vfm or args.vfm_checkpoint or any(h.uses_vfm for h in heads.values()):
        vfm = _load_vfm_for_cli(args, presets[methods[0]], device)
    generator = None
    if args.mask_generator:
        from .mask_generators import mask_generator

        kwargs = {"model": args.mask_model} if args.mask_model else {}
        generator = mask_generator(args.mask_generator, device=device, **kwargs)
    random = [name for name, is_test in ((args.model, loaded.is_test_model),
              (vfm.name if vfm else "", bool(vfm and vfm.is_test_model))) if is_test]  # fmt: skip
    warning = None
    if random:
        warning = (f"WARNING: {' and '.join(random)}: RANDOM test weights; the labels and maps mean nothing "
                   "(for trying the page only).")  # fmt: skip
    session = DemoSession(
        loaded, methods, device, precision=args.precision, window_batch=args.window_batch, vfm=vfm,
        mask_generator=generator, text_cache_dir=False if args.text_cache == "off" else args.text_cache,
        warning=warning,
    )  # fmt: skip
    app = build_app(session)
    print(f"ovdense demo: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise OvdenseError(f"cannot serve on {args.host}:{args.port}: {first_line(err)}") from None
    return 0


def _apply_max_pixels(args) -> None:
    if getattr(args, "max_pixels", None) is None:
        return
    if args.max_pixels < 0:
        raise OvdenseError("--max-pixels must be >= 0 (0 = no limit)")
    from .images import MAX_PIXELS_ENV

    # Through the environment, so DataLoader workers (forked or spawned) decode under the same limit.
    os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)


def _load_for_cli(args, verbose: bool = True):
    """Load the weights the flags name; say so loudly for test archs, and pass on the loader's notes."""
    from .weights import load_model

    loaded = load_model(
        args.model, pretrained=_default_pretrained(args), checkpoint=args.checkpoint, device=args.device
    )
    if verbose:
        if loaded.is_test_model:
            _warn_test_model(args.model)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return loaded


def _resolve_preset(args, dataset: str | None):
    from .presets import get_preset

    overrides = _preset_overrides(args)
    mode = getattr(args, "declip_mode", None)
    if mode is not None:
        if args.method != "declip":
            raise OvdenseError(f"--declip-mode applies to --method declip, not {args.method}")
        overrides["mode"] = mode
    try:
        return get_preset(args.method, dataset, **overrides)
    except ValueError as err:
        raise OvdenseError(str(err)) from None


def _segmenter(args, loaded, preset, vfm=None):
    from .heads import HEADS
    from .predictor import Segmenter

    device = next(loaded.model.parameters()).device
    head = HEADS[preset.head]
    if head.uses_vfm and vfm is None:
        vfm = _load_vfm_for_cli(args, preset, device)
    generator = None
    if head.uses_masks and getattr(args, "mask_generator", None):
        from .mask_generators import mask_generator

        kwargs = {"model": args.mask_model} if args.mask_model else {}
        generator = mask_generator(args.mask_generator, device=device, **kwargs)
    return Segmenter(
        loaded,
        preset,
        device,
        precision=args.precision,
        window_batch=args.window_batch,
        text_cache_dir=False if args.text_cache == "off" else args.text_cache,
        vfm=vfm,
        masks_dir=getattr(args, "masks_dir", None) if head.uses_masks else None,
        mask_generator=generator,
    )


def _load_vfm_for_cli(args, preset, device, verbose: bool = True):
    from .vfm import load_vfm

    vfm = load_vfm(args.vfm or preset.vfm, checkpoint=args.vfm_checkpoint, device=device)
    if verbose and vfm.is_test_model:
        _warn_test_model(f"the VFM {vfm.name}")
    return vfm


def cmd_eval(args) -> int:
    from .eval.datasets import DATASETS, get_dataset
    from .eval.runner import evaluate, init_distributed_from_env, metrics_table, write_results
    from .fileio import check_output_dir

    if bool(args.all) == bool(args.dataset):
        raise OvdenseError("give --dataset NAME or --all")
    if args.limit is not None and args.limit < 1:
        raise OvdenseError("--limit must be >= 1")
    _apply_max_pixels(args)
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
    presets = [_resolve_preset(args, name) for name in names]
    _apply_method_weights(args, presets[0])
    for dataset, preset in zip(datasets, presets, strict=True):
        paths = [img for img, _ in dataset.samples[: args.limit]]
        _check_method_inputs(args, preset, paths, dataset.spec.name)
    info = init_distributed_from_env(args.device)
    device = args.device
    if device is None and info.world_size > 1 and _cuda_available():
        device = f"cuda:{info.local_rank}"
    args.device = device
    loaded = _load_for_cli(args, verbose=info.is_main)
    model_tag = args.model if not args.checkpoint else Path(args.checkpoint).stem
    from .heads import HEADS

    vfm = None
    if HEADS[presets[0].head].uses_vfm:  # one VFM for every benchmark
        vfm = _load_vfm_for_cli(args, presets[0], next(loaded.model.parameters()).device, verbose=info.is_main)
    results = {}
    for dataset, preset in zip(datasets, presets, strict=True):
        seg = _segmenter(args, loaded, preset, vfm)
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
                "model": args.model,
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


def cmd_eval_regions(args) -> int:
    from .eval.panoptic import CocoPanoptic
    from .eval.regions import evaluate_regions, regions_table, write_region_results
    from .eval.runner import init_distributed_from_env
    from .fileio import check_output_dir

    if args.limit is not None and args.limit < 1:
        raise OvdenseError("--limit must be >= 1")
    if args.image_size is not None and args.image_size < 1:
        raise OvdenseError("--image-size must be >= 1")
    _apply_max_pixels(args)
    check_output_dir(args.out)
    dataset = CocoPanoptic(args.data_root, split=args.split)  # paths checked before any model work
    if len(dataset) == 0:
        raise OvdenseError(f"{args.data_root}: the {args.split} panoptic annotations list no images")
    preset = _resolve_preset(args, None)
    _apply_method_weights(args, preset)
    _check_method_inputs(args, preset)
    info = init_distributed_from_env(args.device)
    if args.device is None and info.world_size > 1 and _cuda_available():
        args.device = f"cuda:{info.local_rank}"
    loaded = _load_for_cli(args, verbose=info.is_main)
    seg = _segmenter(args, loaded, preset)
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
            "model": args.model,
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


def _train_parser(sub) -> None:

    helps = {
        "data": "folder of images (recursive) or webdataset .tar shards (a folder, a file or a glob)",
        "out": "run folder: config.json, checkpoints/, state/, log.csv, tb/",
        "model": "student architecture (open_clip name; default EVA02-B-16)",
        "pretrained": "open_clip pretrained tag of the student",
        "checkpoint": "student weights file (EVA-CLIP layout, open_clip, safetensors)",
        "mode": "DeCLIP attention: qq (the released scripts) or csa (q-q + k-k)",
        "betas": "AdamW betas (default: DeCLIP's rule, 0.9 0.98 for model names with 'vit', else 0.9 0.999)",
        "eps": "AdamW eps (default: 1e-6 for model names with 'vit', else 1e-8)",
        "unlocked_blocks": "train only the last N transformer blocks (default all)",
        "image_size": "student input side (longest side resized, padded right/bottom)",
        "vfm": "VFM teacher: dinov2-{s,b,l}[-reg], dino-{s,b}{8,16} or timm:<name>",
        "vfm_checkpoint": "local weights file for the VFM teacher",
        "sd": "add the Stable Diffusion teacher (SD-guided VFM affinity; needs ovdense[diffusion])",
        "sd_model": "diffusers model id or local folder of the SD teacher",
        "teacher_cache": "folder caching VFM (and SD) outputs per image, so they run once over all epochs",
        "recipe": "released (DeCLIP's code) or extended (KL context, SD, RoI tokens, RCC; ours where unpublished)",
        "context_loss": "l2 (released) or kl (extended)",
        "content_loss": "roi (1x1 RoIAlign, released) or tokens (N x N RoI tokens, extended)",
        "roi_tokens": "N of the N x N RoI tokens",
        "batch_size": "images per process per micro-batch",
        "accum_steps": "micro-batches per optimiser step",
        "precision": "auto (fp16 AMP on CUDA, fp32 on CPU), fp32, fp16, bf16",
        "alpha": "saved weights = alpha*student + (1-alpha)*initial weights",
        "max_steps": "stop after this many optimiser steps (smoke runs)",
        "save_every": "also write the resume point every N steps (0: at epoch ends only)",
        "val_data": "COCO panoptic folder: region classification at each epoch end",
        "val_limit": "validation images (default all)",
        "resume": "run folder (or its state/) to continue from",
        "device": "cpu, cuda, cuda:1 ... (default: cuda if available)",
    }
    helps.update(
        {
            "scd_weight": "weight of the SCD loss (lambda)",
            "no_scd": "SCD: train plain region-language alignment (RLA), no correlation loss",
            "refiner": "SCD: a Refiner checkpoint (ovdense train refiner) whose tokens give the SCD target",
            "no_refiner": "SCD: ignore --refiner (target = the frozen CLIP's tokens)",
            "refiner_depth": "Refiner stage: transformer blocks of the Refiner",
            "refiner_tokens": "Refiner stage: N of the N x N tokens matched per crop",
            "refiner_tau": "Refiner stage: InfoNCE temperature (ours)",
            "scd_tau": "SCD softmax temperature (ours)",
            "max_split": "grid crops: up to this many rows (and columns)",
            "max_boxes": "grid crops: at most this many cells per image",
            "workers": "image-decoding worker processes",
            "sd_size": "Stable Diffusion input side",
            "sd_timestep": "diffusion timestep of the one UNet pass (ours: 100)",
            "sd_layers": "UNet self-attention layers: up-finest-K or comma-separated module names",
            "context_tau": "temperature of the KL context loss (ours: 0.2)",
            "rcc_weight": "weight of the region correlation constraint (extended: 1.0, ours)",
            "rcc_tau": "temperature of the region correlation constraint (ours: 0.2)",
            "content_weight": "weight of the content loss",
            "context_weight": "weight of the context loss (code 0.1; the paper's lambda 0.25)",
            "epochs": "passes over the data",
            "lr": "peak learning rate",
            "weight_decay": "AdamW weight decay (not on biases, norms, logit_scale)",
            "warmup_steps": "linear warm-up steps before the cosine",
            "seed": "seed of the data order, grid draws and SD noise",
            "log_every": "log.csv / TensorBoard row (and, off a terminal, a progress line) every N steps",
            "val_image_size": "detection input side of the validation",
        }
    )
    tr = sub.add_parser("train", help="distillation training: declip, scd, refiner (one trainer)")
    objectives = tr.add_subparsers(dest="objective", required=True)
    kinds = {
        "declip": "DeCLIP: content (CLIP crops) + context (VFM affinities)",
        "scd": "SCD: region-language alignment + spatial correlation distillation (optionally via a Refiner)",
        "refiner": "the Refiner for SCD, self-supervised on the frozen CLIP (its own stage)",
    }
    for kind, text in kinds.items():
        _train_flags(objectives.add_parser(kind, help=text), helps, kind)


#: Config fields that only one objective reads; the others do not offer them as flags.
_OBJECTIVE_FIELDS = {
    "declip": {
        "mode", "vfm", "vfm_checkpoint", "sd", "sd_model", "sd_size", "sd_timestep", "sd_layers", "teacher_cache",
        "recipe", "context_loss", "context_tau", "content_loss", "roi_tokens", "rcc_weight", "rcc_tau",
        "content_weight", "context_weight",
    },
    "scd": {"scd_weight", "scd_tau", "no_scd", "refiner", "no_refiner"},
    "refiner": {"refiner_depth", "refiner_tokens", "refiner_tau"},
}  # fmt: skip


def _train_flags(p, helps: dict, objective: str) -> None:
    import dataclasses

    from .train.config import CHOICES, TrainConfig

    others = set().union(*(v for k, v in _OBJECTIVE_FIELDS.items() if k != objective))
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("objective", "extra") or f.name in others:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = helps[f.name]  # every flag has a help line (KeyError here is a bug in this table)
        if f.default is not None and f.default != "" and not isinstance(f.default, bool):
            text += f" (default: {f.default})"
        kw = {"dest": f.name, "default": None, "help": text}
        if f.type in ("bool",) or isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", **kw)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, **kw)
        else:
            base = f.default if f.default is not None else ""
            kind = {int: int, float: float}.get(type(base), str)
            if f.name in ("unlocked_blocks", "max_steps", "val_limit"):
                kind = int
            elif f.name == "eps":
                kind = float
            if f.name in CHOICES:
                kw["choices"] = CHOICES[f.name]
            p.add_argument(flag, type=kind, required=f.name in ("data", "out"), **kw)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import dataclasses

    from .train.config import RECIPES, TrainConfig
    from .train.trainer import Trainer

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
        cfg = TrainConfig(**given).with_recipe(recipe, explicit=set(given))
    except (TypeError, ValueError) as err:
        raise OvdenseError(str(err)) from None
    try:
        trainer = Trainer.from_config(cfg)
    except ValueError as err:
        raise OvdenseError(str(err).splitlines()[0]) from None
    if trainer.dist.is_main:
        if trainer.loaded.is_test_model:
            _warn_test_model(cfg.model)
        vfm = getattr(trainer.objective, "vfm", None)
        if getattr(vfm, "is_test_model", False):
            _warn_test_model(f"the VFM teacher {cfg.vfm}")
    last = trainer.fit()
    if last is not None and trainer.dist.is_main:
        print(f"wrote {last}")
    return 0


def _print_paper_row(results, datasets, out: Path, method: str) -> list[Path]:
    from .eval.datasets import PAPER_COLUMNS
    from .fileio import write_atomic, write_json_atomic

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


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_list_models(args) -> int:
    import open_clip

    from .weights import list_models

    for name in list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not tags:
            tags = ["(random test architecture)"] if name.startswith("ovdense-test") else ["-"]
        print(f"{name}\t{', '.join(tags)}")
    return 0


def cmd_list_methods(args) -> int:
    for name, spec in METHODS.items():
        extra = f" (datasets with own settings: {', '.join(spec.datasets)})" if spec.datasets else ""
        print(f"{name}\t{spec.summary}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovdense", description="Dense open-vocabulary perception with CLIP.")
    parser.add_argument("--version", action="version", version=f"ovdense {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    seg = sub.add_parser("segment", help="segment images with any class names; writes overlays, label PNGs, JSON")
    seg.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    seg.add_argument("--classes", default=None, help='"sky; person, person in shirt; tree" (; between classes)')
    seg.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    seg.add_argument("--out", required=True, help="output directory")
    seg.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    seg.add_argument("--dataset", default=None, choices=DATASETS, help="use the method's settings for this benchmark")
    _add_model_args(seg, masks=True)
    seg.set_defaults(func=cmd_segment)
    at = sub.add_parser(
        "attention", help="where [CLS] and chosen points look: CLIP's attention per block, the head's, a VFM's"
    )
    at.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    at.add_argument("--points", nargs="+", required=True, metavar="X,Y", help="image pixels, e.g. 120,80 300,200")
    at.add_argument("--layers", default=None, help="CLIP blocks to show, e.g. 4,8,12 (default all)")
    at.add_argument("--classes", default=None, help="class list, for methods that need it inside the pass (resclip)")
    at.add_argument("--classes-file", default=None, help="one class per line, names separated by ', '")
    at.add_argument("--cell-height", type=int, default=160, help="height of each map in the grid, pixels (default 160)")
    at.add_argument("--out", required=True, help="output directory")
    _add_model_args(at, preset_overrides=False, masks=True)
    at.set_defaults(func=cmd_attention)
    dm = sub.add_parser("demo", help="a web page to try methods on your images and click points for attention")
    dm.add_argument("--methods", default="sclip,naclip,declip", help="comma list (default sclip,naclip,declip)")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    dm.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    _add_model_args(dm, preset_overrides=False, masks=True, method=False)
    dm.set_defaults(func=cmd_demo)
    ev = sub.add_parser("eval", help="mIoU on the 8 benchmarks (mmseg protocol, no mmseg)")
    ev.add_argument("--dataset", default=None, choices=DATASETS, help="one benchmark")
    ev.add_argument("--all", action="store_true", help="run the 8 benchmarks and print the paper-style row")
    ev.add_argument("--data-root", default="data", help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ade/")
    ev.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    ev.add_argument("--out", default="results", help="where the tables go (markdown, CSV, JSON; default results)")
    ev.add_argument("--save-predictions", action="store_true", help="also write label PNGs and overlays")
    ev.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    _add_model_args(ev, masks=True)
    ev.set_defaults(func=cmd_eval)
    er = sub.add_parser("eval-regions", help="region classification on COCO panoptic (boxes, masks, crops)")
    er.add_argument("--data-root", default="data/coco", help="folder holding val2017/ and annotations/")
    er.add_argument("--split", default="val2017", help="val2017 (default) or another panoptic split")
    er.add_argument("--image-size", type=int, default=None, help="detection input side (default 64 patches)")
    er.add_argument("--limit", type=int, default=None, help="only the first N images (smoke runs)")
    er.add_argument("--crops", action="store_true", help="also score the crop baseline (vanilla tower)")
    er.add_argument("--out", default="results/regions", help="where metrics.json and the tables go")
    er.add_argument("--save-predictions", action="store_true", help="also write regions.jsonl")
    er.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    _add_model_args(er, preset_overrides=False)
    er.set_defaults(func=cmd_eval_regions, method="declip")
    from .eval.convert import register_cli

    register_cli(sub)
    _train_parser(sub)
    lm = sub.add_parser("list-models", help="architectures with a dense head and their pretrained tags")
    lm.set_defaults(func=cmd_list_models)
    lme = sub.add_parser("list-methods", help="dense heads / method presets")
    lme.set_defaults(func=cmd_list_methods)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    text = " ".join(str(message).split())
    print(f"ovdense: warning: {text}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        # The command prints its own banner for random test models.
        warnings.simplefilter("ignore", RandomWeightsWarning)
        try:
            return args.func(args)
        except OvdenseError as err:
            print(f"ovdense: error: {' '.join(str(err).split())}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("ovdense: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
