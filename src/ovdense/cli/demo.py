"""``ovdense demo``: a web page (Gradio) to try methods on your images and click points for attention; with
``--detector``, a page of an F-ViT's boxes instead (see :mod:`ovdense.demo`).

Each method among --methods reads the flags as ``ovdense segment --method METHOD`` would (:func:`for_method`): its
own ``--METHOD-OPTION`` flags, the CLIP of the first CLIP method, SAM 3 loaded by its head as ``segment`` loads it,
corrclipv2's --bank opened once (:func:`~ovdense.cli.common.open_bank_for_cli`); all flags are checked before anything
loads."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import OvdenseError
from ..methods import head_class
from ..methods import methods as registered
from ..ranges import Range, flag_type
from .common import (
    add_detector_args,
    add_model_args,
    apply_max_pixels,
    check_bank_flags,
    load_for_cli,
    load_vfm_for_cli,
    method_options,
    open_bank_for_cli,
    option_flag,
    resolve_preset,
)

#: The methods of the segmentation page when --methods is not given.
DEFAULT_METHODS = "sclip,naclip,declip"


def register(subparsers) -> None:
    dm = subparsers.add_parser(
        "demo", help="a web page to try methods on your images and click points for attention (or F-ViT boxes)"
    )
    dm.add_argument("--methods", default=None, help=f"comma list (default {DEFAULT_METHODS}); not with --detector")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    dm.add_argument(
        "--port", type=flag_type("port", Range(1, 65535, integer=True)), default=7860, help="port (default 7860)"
    )
    # The bank flags (corrclipv2) and every method's options (--sam3-model, --declip-mode...): each for its method
    # among --methods.
    add_model_args(dm, preset_overrides=False, masks=True, method=False, bank=True, options=True)
    add_detector_args(dm, required=False, model_flags=False)
    dm.set_defaults(func=run)


def _given(args, flags) -> list[str]:
    """The flags of ``(flag, dest, default)`` whose value is not the default."""
    return [flag for flag, dest, default in flags if getattr(args, dest) != default]


#: Flags of the segmentation page only (refused with --detector).
SEGMENTATION_FLAGS = (
    ("--methods", "methods", None),
    ("--vfm", "vfm", None),
    ("--vfm-checkpoint", "vfm_checkpoint", None),
    ("--mask-generator", "mask_generator", None),
    ("--mask-model", "mask_model", None),
    ("--precision", "precision", "auto"),
    ("--window-batch", "window_batch", 16),
    ("--text-cache", "text_cache", None),
    ("--bank", "bank", None),
    ("--bank-name", "bank_name", None),
    ("--bank-store", "bank_store", None),
    ("--aux-model", "aux_model", None),
    ("--aux-pretrained", "aux_pretrained", None),
    ("--aux-checkpoint", "aux_checkpoint", None),
)

#: Flags that name or configure the CLIP (refused when every method runs a model of its own).
CLIP_FLAGS = (
    ("--model", "model", None),
    ("--pretrained", "pretrained", None),
    ("--checkpoint", "checkpoint", None),
    ("--text-cache", "text_cache", None),
    ("--vfm", "vfm", None),
    ("--vfm-checkpoint", "vfm_checkpoint", None),
)

#: Flags of the detection page only (refused without --detector).
DETECTION_FLAGS = (
    ("--class-embeddings", "class_embeddings", None),
    ("--benchmark", "benchmark", "ov-coco"),
    ("--clip-head", "clip_head", "value"),
    ("--score-threshold", "score_threshold", None),
    ("--max-detections", "max_detections", None),
)


def _check_gradio() -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OvdenseError("the demo needs Gradio: pip install 'ovdense[demo]'") from None


def _serve(app, args) -> int:
    from ..errors import first_line

    print(f"ovdense demo: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise OvdenseError(f"cannot serve on {args.host}:{args.port}: {first_line(err)}") from None
    return 0


def for_method(args, method: str, clip: bool = True) -> argparse.Namespace:
    """The flags as ``ovdense segment --method METHOD`` would see them: --method set, the other methods' options
    dropped (each ``--METHOD-OPTION`` applies to its own method), and without ``clip`` no CLIP flags (a method with
    a model of its own beside CLIP methods: those flags are theirs)."""
    ns = argparse.Namespace(**vars(args))
    ns.method = method
    for dest in vars(args):
        if dest.startswith("option:") and dest.split(":")[1] != method:
            setattr(ns, dest, None)
    if not clip:
        for _, dest, _ in CLIP_FLAGS:
            setattr(ns, dest, None)
    return ns


def _check_method_flags(args, methods: list[str], specs: dict) -> None:
    """Every --METHOD-OPTION and bank flag for a method among --methods, each method's settings valid, and a CLIP
    flag only with a CLIP method (before anything loads)."""
    for dest, value in vars(args).items():
        if dest.startswith("option:") and value is not None and dest.split(":")[1] not in methods:
            _, method, option = dest.split(":")
            raise OvdenseError(f"{option_flag(method, option)} applies to {method}; it is not among --methods")
    check_bank_flags(args, any(spec.native_vfm for spec in specs.values()), "; it is not among --methods")
    own = [m for m, spec in specs.items() if spec.own_model]
    if own and len(own) == len(methods):
        clip_flags = _given(args, CLIP_FLAGS)
        if clip_flags:
            raise OvdenseError(
                f"{', '.join(clip_flags)}: {own[0]} runs its own model, not a CLIP (--{own[0]}-model); add a CLIP "
                "method to --methods to use one"
            )
    for method, spec in specs.items():
        preset = resolve_preset(for_method(args, method), None)  # a bad option value: one line, nothing loaded
        if spec.own_model:
            head_class(method).check(preset)


def run(args) -> int:
    if args.detector is not None:
        return run_detection(args)
    misplaced = _given(args, DETECTION_FLAGS)
    if misplaced:
        raise OvdenseError(f"{misplaced[0]} applies to the detection page: add --detector D.pth|D.safetensors")
    known = registered()
    text = DEFAULT_METHODS if args.methods is None else args.methods
    methods = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise OvdenseError(f"--methods: expected a comma list of {', '.join(known)}; got {text!r}")
    apply_max_pixels(args)
    specs = {m: known[m] for m in methods}
    needs_masks = [m for m, spec in specs.items() if spec.uses_masks]
    if needs_masks and not args.mask_generator:
        raise OvdenseError(f"{needs_masks[0]} needs class-agnostic masks of each upload: add --mask-generator sam")
    native = [m for m, spec in specs.items() if spec.native_vfm]
    windowed = [m for m, spec in specs.items() if spec.uses_vfm and not spec.native_vfm]
    if native and windowed:  # one --vfm per demo: a native-resolution VFM (RADIO...) or a per-window one (DINO...)
        raise OvdenseError(
            f"{native[0]} runs a native-resolution VFM and {windowed[0]} a per-window one; the demo loads one --vfm: "
            "start one demo for each"
        )
    if args.mask_generator and not needs_masks:
        raise OvdenseError("--mask-generator and --mask-model apply to corrclip; it is not among --methods")
    _check_method_flags(args, methods, specs)
    _check_gradio()
    from ..demo import DemoSession, build_app, random_weights_warning

    clip_methods = [m for m, spec in specs.items() if not spec.own_model]
    loaded = weights = vfm = support = None
    device = args.device
    if clip_methods:
        # The weights a method defaults to: the first CLIP method's; the VFM: the first VFM method's (its kind).
        loaded, weights = load_for_cli(for_method(args, clip_methods[0]))
        device = next(loaded.model.parameters()).device
        vfm_method = next((m for m in clip_methods if specs[m].uses_vfm), clip_methods[0])
        if args.vfm or args.vfm_checkpoint or specs[vfm_method].uses_vfm:
            vfm = load_vfm_for_cli(for_method(args, vfm_method), device)
        if native:  # the memory bank, opened and checked once, before anything is served
            support = open_bank_for_cli(for_method(args, native[0]), loaded, vfm)
    own_models = {}
    for method in (m for m, spec in specs.items() if spec.own_model):  # SAM 3: its own model, loaded as segment does
        own_models[method], _ = load_for_cli(for_method(args, method, clip=False))
    generator = None
    if args.mask_generator:
        from ..mask_generators import mask_generator

        kwargs = {"model": args.mask_model} if args.mask_model else {}
        generator = mask_generator(args.mask_generator, device=device, **kwargs)
    session = DemoSession(
        loaded, methods, precision=args.precision, window_batch=args.window_batch, vfm=vfm,
        mask_generator=generator, text_cache_dir=False if args.text_cache == "off" else args.text_cache,
        warning=random_weights_warning([loaded, vfm, *own_models.values()]), weights=weights,
        options={m: method_options(for_method(args, m)) for m in methods}, own_models=own_models, bank=support,
    )  # fmt: skip
    return _serve(build_app(session), args)


def run_detection(args) -> int:
    """The detection page: an F-ViT (--detector), its CLIP (--model, read from the detector when omitted), the text
    tower's weights (--pretrained/--checkpoint) or a class-embedding file."""
    from .common import check_detector_inputs, detector_for_cli

    misplaced = _given(args, SEGMENTATION_FLAGS) + [
        option_flag(*dest.split(":")[1:]) for dest, value in vars(args).items()
        if dest.startswith("option:") and value is not None
    ]  # fmt: skip
    if misplaced:
        raise OvdenseError(f"{misplaced[0]} applies to the segmentation page; with --detector the demo detects boxes")
    apply_max_pixels(args)
    check_detector_inputs(args)
    _check_gradio()
    from ..demo import DetectionSession, build_app

    det = detector_for_cli(args)
    if det.class_table is None and not (det.loaded is not None and det.loaded.has_text_weights):
        raise OvdenseError(
            "the detection page embeds the classes typed: pass the CLIP's weights for its text tower (--pretrained "
            "or --checkpoint) or an F-ViT class-embedding file (--class-embeddings)"
        )
    warning = None
    if det.loaded is not None and det.loaded.is_test_model:
        warning = (f"WARNING: {det.loaded.model_name}: RANDOM test weights; the boxes mean nothing "
                   "(for trying the page only).")  # fmt: skip
    session = DetectionSession(det, warning=warning, min_score=args.score_threshold)
    return _serve(build_app(session), args)
