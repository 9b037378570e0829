"""``ovdense bank build``: build or extend a CorrCLIPv2 memory bank (:func:`ovdense.bank.build.build_bank`).

The command only parses the flags and calls ``build_bank``; rerunning it after a kill resumes, rerunning it after
adding images extends the bank. Under ``torchrun`` every process takes its share of each step. Exit status: 0 when
every store is finished and indexed, 1 when images failed (named on stderr; rerun to retry them), 2 for bad input.
"""

from __future__ import annotations

import os
import sys

from ..errors import OvdenseError
from ..ranges import COUNT, POSITIVE_INT, flag_type

__all__ = ["register", "run"]

_DESCRIPTION = (
    "Build a CorrCLIPv2 memory bank from a folder of images, in the authors' four steps and file formats: instance "
    "masks (a generator or --masks-dir), the region manifest, one CLIP value store per --clip (CorrCLIP v1 windows "
    "with DINO B/8, no merging, short side 448), the VFM keys and their FAISS index. Resumable at any kill (rerun the "
    "same command) and incremental (add images, rerun); under torchrun each process takes a share."
)


def register(subparsers) -> None:
    """Add ``build`` to ``ovdense bank``'s subcommands."""
    from ..mask_generators import MASK_GENERATORS
    from ..precision import PRECISIONS

    p = subparsers.add_parser("build", help="build or extend a memory bank from a folder of images",
                              description=_DESCRIPTION)  # fmt: skip
    p.add_argument("--images", required=True, help="the image folder (recursive: .png .jpg .jpeg .bmp .tiff)")
    p.add_argument("--root", default="memory_bank", help="the bank root, the authors' memory_bank/ (default that)")
    p.add_argument("--name", required=True, help="the bank name (every file carries it), e.g. coco")
    m = p.add_argument_group("step 1: masks (for images without one in ROOT/masks/NAME/MASK_NAME/)")
    m.add_argument(
        "--mask-generator",
        default=None,
        choices=tuple(MASK_GENERATORS),
        help="make them with transformers' SAM, SAM2, SAM 3 or EoMT at the authors' build settings ([masks] extra)",
    )
    m.add_argument(
        "--mask-model",
        default=None,
        help="hub id or folder of --mask-generator (default SAM ViT-H, SAM2-L, facebook/sam3, EoMT-L 640)",
    )
    m.add_argument("--masks-dir", default=None, help="or take them from a folder of pre-generated <stem>.npz files")
    m.add_argument(
        "--mask-name",
        default=None,
        help="the masks' folder name (default the generator's name; with --masks-dir the authors' entityseg)",
    )
    v = p.add_argument_group("step 3: CLIP values (one store per CLIP)")
    v.add_argument(
        "--clip",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the authors' stores: meta_b, meta_l, dfn_b, dfn_l (default meta_b dfn_b without --clip-model)",
    )
    v.add_argument("--clip-model", default=None, help="another open_clip model to make a store with (--store-name)")
    v.add_argument("--clip-pretrained", default=None, help="its open_clip pretrained tag")
    v.add_argument("--clip-checkpoint", default=None, help="its local weights file")
    v.add_argument("--store-name", default=None, help="the store name of --clip-model (clip_embeddings/NAME_STORE.pt)")
    v.add_argument("--values-vfm", default="dino-b8", help="the DINO of the values' correlations (default dino-b8)")
    v.add_argument("--values-vfm-checkpoint", default=None, help="its local weights file")
    v.add_argument(
        "--slide-short",
        type=flag_type("slide_short", POSITIVE_INT),
        default=448,
        help="resize short side of the values (the authors' 448)",
    )
    v.add_argument(
        "--slide-crop", type=flag_type("slide_crop", POSITIVE_INT), default=336, help="their window (336; stride 112)"
    )
    k = p.add_argument_group("step 4: VFM keys and the index")
    k.add_argument("--vfm", default="radiov3", help="the retrieval VFM (default radiov3; timm:NAME for any timm ViT)")
    k.add_argument("--vfm-checkpoint", default=None, help="its local weights (a RADIO folder, or a weights file)")
    k.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow RADIO's code from its Hugging Face repo to run (NVIDIA's non-commercial licence)",
    )
    k.add_argument("--index", default="ivfpq", choices=("ivfpq", "flat"), help="ivfpq (the authors') or exact flat")
    k.add_argument(
        "--train-size",
        type=flag_type("train_size", POSITIVE_INT),
        default=None,
        help="train a new IVFPQ index on a seeded sample of this many keys (default all, as the authors)",
    )
    k.add_argument("--faiss-gpu", action="store_true", help="train a new index on the GPU (needs a GPU build of faiss)")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    r.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp16 autocast on CUDA, fp32 on CPU")
    r.add_argument(
        "--workers", type=flag_type("workers", COUNT), default=2, help="image-decoding worker processes (default 2)"
    )
    r.add_argument(
        "--flush-every",
        type=flag_type("flush_every", POSITIVE_INT),
        default=64,
        help="commit the rows written every N images (and every minute): what a kill can cost (default 64)",
    )
    p.set_defaults(func=run)


def _clips(args) -> list:
    from ..bank.build import DEFAULT_CLIPS, ClipSpec

    extra = (args.clip_pretrained, args.clip_checkpoint, args.store_name)
    if args.clip_model is None:
        if any(v is not None for v in extra):
            raise OvdenseError("--clip-pretrained, --clip-checkpoint and --store-name go with --clip-model")
        return list(args.clip or DEFAULT_CLIPS)
    if args.store_name is None:
        raise OvdenseError("--clip-model needs --store-name (its store is clip_embeddings/NAME_STORE.pt)")
    custom = ClipSpec(args.store_name, args.clip_model, args.clip_pretrained, args.clip_checkpoint)
    return [*(args.clip or []), custom]


def _banners(args, clips) -> None:
    """The RANDOM-weights banner for each test architecture the build would load."""
    from ..backbones import is_test_model
    from ..bank.build import ClipSpec
    from .common import warn_test_model

    for clip in clips:
        if isinstance(clip, ClipSpec) and is_test_model(clip.model):
            warn_test_model(clip.model)
    for vfm in (args.values_vfm, args.vfm):
        if vfm.startswith("test-"):
            warn_test_model(f"the VFM {vfm}")


def _summary(report: dict) -> list[str]:
    masks = report["masks"]
    man = report["manifest"]
    lines = [
        f"masks     {masks['made']} made, {masks['existing']} already there, {masks['failed']} failed "
        f"({masks['folder']})",
        f"manifest  {man['images']} images, {man['regions']} regions (+{man.get('added_images', 0)} images, "
        f"+{man.get('added_regions', 0)} regions)",
    ]
    for name, step in [*((f"values {s}", r) for s, r in report["values"].items()), ("keys", report["keys"])]:
        state = "done" if step["finalized"] else "NOT finished"
        lines.append(
            f"{name:<9} {step['computed_rows']} rows computed over {step['computed_images']} images, "
            f"{step['imported']} imported, {step['failed']} failed: {state}"
        )
    index = report.get("index")
    if index:
        what = "trained and filled" if index["trained"] else f"{index['added']} ids added (no retraining)"
        lines.append(f"index     {what}, {index['ntotal']} ids ({index['path']})")
    else:
        lines.append("index     not updated (the keys are not finished)")
    return lines


def run(args) -> int:
    from ..bank.build import build_bank

    clips = _clips(args)
    if args.mask_model is not None and args.mask_generator is None:
        raise OvdenseError("--mask-model goes with --mask-generator")
    if args.mask_generator is not None and args.masks_dir is not None:
        raise OvdenseError("give --mask-generator or --masks-dir, not both")
    if os.environ.get("RANK", "0") == "0":  # torchrun: one banner
        _banners(args, clips)
    report = build_bank(
        args.images, args.root, args.name, mask_generator=args.mask_generator, masks_dir=args.masks_dir,
        mask_name=args.mask_name, mask_model=args.mask_model, clips=clips, values_vfm=args.values_vfm,
        values_vfm_checkpoint=args.values_vfm_checkpoint, vfm=args.vfm, vfm_checkpoint=args.vfm_checkpoint,
        trust_remote_code=args.trust_remote_code, slide_short=args.slide_short, slide_crop=args.slide_crop,
        index=args.index, train_size=args.train_size, faiss_gpu=args.faiss_gpu, device=args.device,
        precision=args.precision, workers=args.workers, flush_every=args.flush_every, progress=True,
    )  # fmt: skip
    from ..distributed import dist_info

    main = dist_info().is_main
    if main:
        print("\n".join(_summary(report)), file=sys.stderr)
    if report["failed"] or (main and not report["complete"]):
        if main:
            print(
                f"ovdense: {report['failed']} images failed; the bank is not complete: rerun the same command to "
                "retry them",
                file=sys.stderr,
            )
        return 1
    return 0
