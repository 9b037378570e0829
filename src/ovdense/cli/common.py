"""Flag groups and helpers that several commands share: the model flags, the preset overrides, the class
list, the image checks, loading the weights, the VFM and the segmenter the flags name.

Like the rest of the command line, this module imports torch, open_clip and timm only inside the helpers that
need them.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from ..errors import OvdenseError
from ..methods import check_method_inputs, get_method, head_class, list_methods, methods
from ..ranges import COUNT, POSITIVE_INT, Range, flag_type

__all__ = [
    "add_model_args",
    "apply_max_pixels",
    "check_inputs",
    "cuda_available",
    "load_for_cli",
    "load_vfm_for_cli",
    "method_options",
    "read_classes",
    "resolve_preset",
    "segmenter",
    "segmenter_options",
    "warn_test_model",
]

#: The preset settings the command line overrides, one flag each.
PRESET_FLAGS = ("short_side", "long_side", "crop", "stride", "logit_scale", "prob_thd", "area_thd", "pamr")


def add_model_args(
    p: argparse.ArgumentParser,
    preset_overrides: bool = True,
    masks: bool = False,
    method: bool = True,
    bank: bool | None = None,
    options: bool | None = None,
) -> None:
    """The "model" flag group, the method options generated from the registry (``--METHOD-OPTION``) and, with
    ``preset_overrides``, the flags overriding the method's settings. ``bank`` (the memory-bank flags) and
    ``options`` (the ``--METHOD-OPTION`` flags) default to ``method``; the demo (no --method) asks for them."""
    from ..precision import PRECISIONS

    bank = method if bank is None else bank
    options = method if options is None else options

    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="open_clip architecture or hf-hub:org/repo (default: the method's, else ViT-B-16; corrclip: "
        "ViT-B-16-quickgelu, MetaCLIP)",
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
            choices=list_methods(),
            help="dense head and its authors' settings (default sclip; see ovdense list-methods)",
        )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: fp16 autocast on CUDA (as the references), fp32 on the CPU",
    )
    g.add_argument(
        "--window-batch",
        type=flag_type("window_batch", POSITIVE_INT),
        default=16,
        help="sliding windows per forward pass (default 16)",
    )
    g.add_argument(
        "--text-cache", default=None, help="text-embedding cache dir ('off' disables; default $OVDENSE_CACHE/text)"
    )
    g.add_argument(
        "--vfm",
        default=None,
        help="VFM of proxyclip/corrclip (default dino-b8): dino-{s,b}{8,16}, dinov2-{s,b,l}[-reg], timm:NAME",
    )
    g.add_argument("--vfm-checkpoint", default=None, help="local weights file of the VFM (DINO/timm layout)")
    g.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a VFM run code from its hub repository (C-RADIO for corrclipv2: NVIDIA Source Code License-NC)",
    )
    if bank:
        b = p.add_argument_group("memory bank (corrclipv2)")
        b.add_argument("--bank", default=None, help="a memory_bank/ folder (the authors' layout; ovdense bank build)")
        b.add_argument("--bank-name", default=None, help="which bank of a folder holding several")
        b.add_argument("--bank-store", default=None, help="value store of the main CLIP (default: by its width)")
        b.add_argument(
            "--aux-model",
            default=None,
            help="auxiliary CLIP of the dfnclip_b store (default ViT-B-16-quickgelu + dfn2b, the authors'; none = off)",
        )
        b.add_argument("--aux-pretrained", default=None, help="its open_clip pretrained tag")
        b.add_argument("--aux-checkpoint", default=None, help="its local weights file")
    if masks and method:
        g.add_argument(
            "--masks-dir",
            default=None,
            help="corrclip's class-agnostic masks: <image stem>.npz files (instance_mask); for eval the folder "
            "holding voc/, context/, coco/, city/, ade/ (CorrCLIP's region_masks)",
        )
    if masks:
        from ..mask_generators import MASK_GENERATORS

        g.add_argument(
            "--mask-generator",
            default=None,
            choices=tuple(MASK_GENERATORS),
            help="corrclip: generate the masks with transformers' SAM, SAM2, SAM 3 (points) or EoMT (panoptic) instead "
            "(pip install 'ovdense[masks]')",
        )
        g.add_argument(
            "--mask-model",
            default=None,
            help="hub id or folder of --mask-generator (default facebook/sam-vit-base, facebook/sam2-hiera-large, "
            "facebook/sam3, tue-mps/coco_panoptic_eomt_large_640)",
        )
    g.add_argument(
        "--max-pixels",
        type=flag_type("max_pixels", COUNT),
        default=None,
        help="largest image to decode, in pixels (default Pillow's ~89.5 MP or $OVDENSE_MAX_PIXELS; 0 = no limit)",
    )
    if options:
        add_method_option_flags(p)
    if not preset_overrides:
        return
    from ..presets import setting_range

    o = p.add_argument_group("preset overrides (default: the method's published settings)")
    helps = {
        "short_side": "resize so the short side is at most this (mmseg rule)",
        "long_side": "... and the long side at most this",
        "crop": "window size in pixels, 0 = whole image",
        "stride": "window stride in pixels (at most --crop)",
        "logit_scale": "multiplies the cosine maps before the softmax",
        "prob_thd": "pixels below it become class 0 (background), 0..1",
        "area_thd": "drop classes predicted on at most this fraction of the foreground (SCLIP's VOC21 rule)",
    }
    for name, text in helps.items():
        flag = "--" + name.replace("_", "-")
        o.add_argument(flag, type=flag_type(name, setting_range(name)), default=None, help=text)
    o.add_argument("--pamr", default=None, choices=("on", "off"), help="PAMR refinement of the cosine maps (NACLIP)")


def option_flag(method: str, option: str) -> str:
    """The flag of a method's option: ``--declip-mode``, ``--resclip-temp-thd``."""
    return f"--{method}-{option}".replace("_", "-")


def add_method_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per option of every registered method (its head's keyword arguments), each for that method only."""
    g = p.add_argument_group("method options (each applies to its own --method; default: the method's settings)")
    for name, spec in methods().items():
        for option in spec.options.values():
            text = f"{name}: {option.help or option.name}".rstrip(".") + f" (default {option.default})"
            kwargs = {"choices": option.choices} if option.choices is not None else {"metavar": option.kind.upper()}
            g.add_argument(
                option_flag(name, option.name),
                dest=f"option:{name}:{option.name}",
                type=option_type(name, option),
                default=None,
                help=text,
                **kwargs,
            )


def option_type(method: str, option):
    """An argparse ``type=``: the flag's text as the option's value, checked by its declaration (type, range)."""

    def parse(text: str):
        try:
            return option.parse(text, method)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = option.name
    if option.kind in ("int", "float", "ints", "floats"):  # the declaration, for the table of ranges
        parse.range = replace(option.range or Range(), integer=option.kind in ("int", "ints"))
    return parse


def method_options(args) -> dict:
    """The ``--METHOD-OPTION`` values given; one for another method than --method is an error."""
    given = {}
    for dest, value in vars(args).items():
        if not dest.startswith("option:") or value is None:
            continue
        _, method, option = dest.split(":")
        if method != args.method:
            raise OvdenseError(f"{option_flag(method, option)} applies to --method {method}, not {args.method}")
        given[option] = value
    return given


def preset_overrides(args) -> dict:
    """The preset settings the flags override (None: the method's own)."""
    overrides = {name: getattr(args, name, None) for name in PRESET_FLAGS}
    if overrides["pamr"] is not None:
        overrides["pamr"] = overrides["pamr"] == "on"
    return overrides


def resolve_preset(args, dataset: str | None):
    """The method's preset for ``dataset`` with the flags' overrides; a bad combination is one error line."""
    from ..presets import get_preset

    try:
        return get_preset(args.method, dataset, **preset_overrides(args), **method_options(args))
    except ValueError as err:
        raise OvdenseError(str(err)) from None


def check_inputs(args, images=(), dataset: str | None = None, any_vfm: bool = False) -> None:
    """The VFM and mask flags against what the method's head uses, and every image's mask file, before any model
    loads (``any_vfm``: --vfm is valid with every method, as in ``attention``)."""
    check_own_model(args, dataset)
    check_method_inputs(
        args.method, vfm=args.vfm, vfm_checkpoint=args.vfm_checkpoint, masks_dir=getattr(args, "masks_dir", None),
        mask_generator=getattr(args, "mask_generator", None), mask_model=getattr(args, "mask_model", None),
        images=images, dataset=dataset, any_vfm=any_vfm, masks_required=True,
    )  # fmt: skip
    check_bank_flags(args, get_method(args.method).native_vfm, f", not {args.method}")


def check_bank_flags(args, retrieves: bool, without: str) -> None:
    """The memory-bank flags before anything loads: only where a method retrieves (``retrieves``; ``without`` ends the
    refusal's line, naming what was asked instead), --bank a folder, the other bank flags only with --bank."""
    given = [f"--{n.replace('_', '-')}" for n in bank_options(args) if n != "trust_remote_code"]
    if given and not retrieves:
        raise OvdenseError(f"{', '.join(given)}: only corrclipv2 retrieves from a memory bank{without}")
    if getattr(args, "bank", None) is not None and not Path(args.bank).is_dir():
        raise OvdenseError(f"--bank: {args.bank} is not a folder (a memory_bank/ folder: ovdense bank build)")
    if given and getattr(args, "bank", None) is None:
        raise OvdenseError(f"{', '.join(given)}: give the memory bank with --bank")


#: The commands that run a method with a model of its own (SAM 3): they need only set_image / predict.
OWN_MODEL_COMMANDS = ("segment", "eval")


def check_own_model(args, dataset: str | None = None) -> None:
    """For a method that runs its own model instead of a CLIP dense head (sam3): no CLIP flags, a command that only
    segments, and its preset's settings (before anything loads)."""
    spec = get_method(args.method)
    if not spec.own_model:
        return
    flags = ("--model", "--pretrained", "--checkpoint", "--text-cache")
    given = [f for f in flags if getattr(args, f[2:].replace("-", "_"), None) is not None]
    if given:
        raise OvdenseError(
            f"{', '.join(given)}: --method {args.method} runs its own model, not a CLIP (--{args.method}-model)"
        )
    if getattr(args, "command", None) not in OWN_MODEL_COMMANDS:
        raise OvdenseError(f"--method {args.method} runs with ovdense {' and ovdense '.join(OWN_MODEL_COMMANDS)} only")
    head_class(args.method).check(resolve_preset(args, dataset))


def read_classes(args) -> list[list[str]]:
    """The class list of --classes or --classes-file, checked before any model loads."""
    from ..classes import parse_class_string, read_class_file
    from ..errors import first_line

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


def apply_max_pixels(args) -> None:
    """Check --max-pixels and make it the decoding limit of this run."""
    if getattr(args, "max_pixels", None) is None:
        return
    from ..images import MAX_PIXELS_ENV

    # Through the environment, so DataLoader workers (forked or spawned) decode under the same limit.
    os.environ[MAX_PIXELS_ENV] = str(args.max_pixels)


def warn_test_model(name: str) -> None:
    """The banner for a random test architecture (its predictions mean nothing)."""
    bar = "!" * 78
    print(
        f"{bar}\nWARNING: {name} is a RANDOM test architecture. Its predictions are meaningless;\n"
        f"use it for tests and smoke runs only.\n{bar}",
        file=sys.stderr,
    )


def load_for_cli(args, verbose: bool = True):
    """Load the weights the flags name, or the method's default (said in a note); say so loudly for test archs,
    and pass on the loader's notes.

    Returns:
        ``(loaded, weights)``: the :class:`~ovdense.weights.LoadedModel` and the
        :class:`~ovdense.weights.WeightsChoice` it was loaded from.
    """
    from ..weights import load_model, resolve_weights

    spec = get_method(args.method)
    if spec.own_model:  # not a CLIP: the method loads its own model (sam3); no weights choice
        return head_class(args.method).load(resolve_preset(args, None), device=args.device), None
    weights = resolve_weights(args.model, args.pretrained, args.checkpoint, spec.model, spec.pretrained)
    loaded = load_model(weights.model, pretrained=weights.pretrained, checkpoint=weights.checkpoint, device=args.device)
    if verbose:
        if weights.chosen:
            print(f"note: {args.method}: using the {weights.chosen}", file=sys.stderr)
        if loaded.is_test_model:
            warn_test_model(weights.model)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return loaded, weights


def load_vfm_for_cli(args, device, verbose: bool = True):
    """The VFM of --vfm (else the method's) on ``device``; the banner for a random test VFM."""
    spec = get_method(args.method)
    if spec.native_vfm:  # CorrCLIPv2: once per image at its own resolution
        from ..vfm_native import load_dense_vfm

        vfm = load_dense_vfm(args.vfm or spec.vfm, checkpoint=args.vfm_checkpoint, device=device,
                             trust_remote_code=bool(getattr(args, "trust_remote_code", False)))  # fmt: skip
    else:
        from ..vfm import load_vfm

        vfm = load_vfm(args.vfm or spec.vfm, checkpoint=args.vfm_checkpoint, device=device)
    if verbose and getattr(vfm, "is_test_model", False):
        warn_test_model(f"the VFM {vfm.name}")
    return vfm


def bank_options(args) -> dict:
    """The memory-bank and remote-code keyword arguments of the flags (only those given, so other methods see none)."""
    names = ("bank", "bank_name", "bank_store", "aux_model", "aux_pretrained", "aux_checkpoint")
    options = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if getattr(args, "trust_remote_code", False):
        options["trust_remote_code"] = True
    return options


def segmenter_options(args, vfm=None) -> dict:
    """The keyword arguments of :meth:`ovdense.Segmenter.from_model` the flags name (``vfm``: a loaded VFM to use
    instead of --vfm's name). --vfm goes to a method that uses a VFM; ``attention`` shows it beside any other."""
    uses_vfm = get_method(args.method).uses_vfm
    return dict(
        precision=args.precision,
        window_batch=args.window_batch,
        text_cache_dir=False if args.text_cache == "off" else args.text_cache,
        vfm=(vfm if vfm is not None else args.vfm) if uses_vfm else None,
        vfm_checkpoint=args.vfm_checkpoint if uses_vfm else None,
        masks_dir=getattr(args, "masks_dir", None),
        mask_generator=getattr(args, "mask_generator", None),
        mask_model=getattr(args, "mask_model", None),
        **bank_options(args),
        **preset_overrides(args),
        **method_options(args),
    )


def segmenter(args, loaded, weights, dataset: str | None = None, vfm=None, verbose: bool = True, support=None):
    """The :class:`ovdense.Segmenter` the flags name, on weights :func:`load_for_cli` loaded: what
    ``Segmenter.from_pretrained`` builds from the same arguments (``support``: a memory bank opened once for
    several benchmarks, see :func:`open_bank_for_cli`)."""
    from ..predictor import Segmenter

    spec = get_method(args.method)
    if spec.own_model:  # sam3: its own segmenter on the model load_for_cli loaded
        return head_class(args.method).segmenter(loaded, resolve_preset(args, dataset), args.precision)
    if spec.uses_vfm and vfm is None:
        vfm = load_vfm_for_cli(args, next(loaded.model.parameters()).device, verbose)
    options = segmenter_options(args, vfm)
    if support is not None:
        options = {k: v for k, v in options.items() if not k.startswith(("bank", "aux_"))} | {"bank": support}
    return Segmenter.from_model(loaded, args.method, dataset, weights=weights, **options)


def open_bank_for_cli(args, loaded, vfm):
    """The --bank of ``corrclipv2`` opened and checked once (None without --bank)."""
    if getattr(args, "bank", None) is None:
        return None
    from ..predictor import open_bank_support

    num_support = method_options(args).get("num_support") or 20
    return open_bank_support(
        args.bank, args.bank_name, args.bank_store, args.aux_model, args.aux_pretrained, args.aux_checkpoint, loaded,
        vfm, num_support=num_support, device=next(loaded.model.parameters()).device,
    )  # fmt: skip


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def numeric_flags(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """Every number a command line takes, with its declared range: ``(command, flag, range in words)`` rows,
    subcommands in order (the README's table of ranges is this list)."""
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                rows += numeric_flags(sub, (*prefix, name))
        elif getattr(action.type, "range", None) is not None and action.option_strings:
            rows.append((" ".join(prefix), action.option_strings[0], action.type.range.describe()))
    return rows


def add_detector_args(p: argparse.ArgumentParser, required: bool = True, model_flags: bool = True) -> None:
    """The "detector" flag group of ``detect``, ``eval-det`` and the demo's detection mode.

    Args:
        required: --detector must be given.
        model_flags: also --model, --pretrained, --checkpoint, --device and --max-pixels; False where
            :func:`add_model_args` already defines them (the demo), whose --model then names the detector's CLIP.
    """
    from ..ranges import FRACTION, POSITIVE_INT

    if model_flags:
        g = p.add_argument_group("detector")
    else:
        g = p.add_argument_group(
            "detector",
            "with --detector the page detects boxes (F-ViT); --model is then the CLIP of the detector's tower "
            "(default: read from the detector), --pretrained/--checkpoint the CLIP weights of its text tower; the "
            "page's min-score slider starts at --score-threshold (default 0.3, or the detector's threshold if higher)",
        )
    g.add_argument(
        "--detector",
        required=required,
        default=None,
        help="F-ViT weights: CLIPSelf's mmdet .pth or an ovdense .safetensors (ovdense train fvit), a file or "
        "hf-hub:ORG/REPO/FILE",
    )
    if model_flags:
        g.add_argument(
            "--model",
            default=None,
            help="the CLIP of the detector's tower (EVA02-B-16, EVA02-L-14-336...; default: read from the detector)",
        )
        g.add_argument(
            "--pretrained", default=None, help="open_clip tag of the CLIP whose text tower embeds class names"
        )
        g.add_argument("--checkpoint", default=None, help="... or a local CLIP weights file for the text tower")
    g.add_argument(
        "--class-embeddings",
        default=None,
        help="F-ViT class-embedding file (.pt: name -> vector, with 'background') instead of the text tower",
    )
    g.add_argument(
        "--benchmark",
        default="ov-coco",
        choices=("ov-coco", "ov-lvis", "coco"),
        help="test settings and base classes of the detector (default ov-coco)",
    )
    g.add_argument(
        "--clip-head",
        default="value",
        choices=("value", "declip"),
        help="CLIP region features: F-ViT's value path (default) or DeCLIP's q-q last block (ours)",
    )
    if model_flags:
        g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--score-threshold",
        type=flag_type("score_threshold", FRACTION),
        default=None,
        help="keep detections scoring above this, 0..1 (default the benchmark's: 0.01 OV-COCO, 0.0001 OV-LVIS)",
    )
    g.add_argument(
        "--max-detections",
        type=flag_type("max_detections", POSITIVE_INT),
        default=None,
        help="detections kept per image (default the benchmark's: 100 OV-COCO, 300 OV-LVIS)",
    )
    if model_flags:
        g.add_argument(
            "--max-pixels",
            type=flag_type("max_pixels", COUNT),
            default=None,
            help="largest image to decode, in pixels (default Pillow's ~89.5 MP or $OVDENSE_MAX_PIXELS; 0 = no limit)",
        )


def check_detector_inputs(args) -> None:
    """The detector's files exist, before anything loads."""
    from pathlib import Path

    for flag, value in (("--detector", args.detector), ("--class-embeddings", args.class_embeddings)):
        if flag == "--detector" and value is not None and str(value).startswith("hf-hub:"):
            continue  # a hub file: fetched (or found in the cache) when the detector loads
        if value is not None and not Path(value).is_file():
            raise OvdenseError(f"{flag}: file not found: {value}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise OvdenseError(f"--checkpoint: file not found: {args.checkpoint}")


def detector_for_cli(args, verbose: bool = True):
    """Load the :class:`~ovdense.detection.detector.Detector` the flags name."""
    from ..detection.detector import Detector

    overrides = {}
    if args.score_threshold is not None:
        overrides["score_threshold"] = args.score_threshold
    if args.max_detections is not None:
        overrides["max_detections"] = args.max_detections
    det = Detector.from_pretrained(
        args.detector,
        model=args.model,
        pretrained=args.pretrained,
        checkpoint=args.checkpoint,
        benchmark=args.benchmark,
        class_embeddings=args.class_embeddings,
        device=args.device,
        clip_head=args.clip_head,
        **overrides,
    )
    if verbose and det.loaded is not None:
        if det.loaded.is_test_model:
            warn_test_model(det.loaded.model_name)
        for note in det.loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return det
