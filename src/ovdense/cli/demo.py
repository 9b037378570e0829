"""``ovdense demo``: a web page (Gradio) to try methods on your images and click points for attention."""

from __future__ import annotations

import os
import sys

from ..errors import OvdenseError
from ..methods import methods as registered
from ..ranges import Range, flag_type
from .common import add_model_args, apply_max_pixels, load_for_cli, load_vfm_for_cli


def register(subparsers) -> None:
    dm = subparsers.add_parser("demo", help="a web page to try methods on your images and click points for attention")
    dm.add_argument("--methods", default="sclip,naclip,declip", help="comma list (default sclip,naclip,declip)")
    dm.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    dm.add_argument(
        "--port", type=flag_type("port", Range(1, 65535, integer=True)), default=7860, help="port (default 7860)"
    )
    add_model_args(dm, preset_overrides=False, masks=True, method=False)
    dm.set_defaults(func=run)


def run(args) -> int:
    from ..errors import first_line

    known = registered()
    methods = list(dict.fromkeys(m.strip() for m in args.methods.split(",") if m.strip()))
    unknown = [m for m in methods if m not in known]
    if not methods or unknown:
        raise OvdenseError(f"--methods: expected a comma list of {', '.join(known)}; got {args.methods!r}")
    apply_max_pixels(args)
    specs = {m: known[m] for m in methods}
    needs_masks = [m for m, spec in specs.items() if spec.uses_masks]
    if needs_masks and not args.mask_generator:
        raise OvdenseError(f"{needs_masks[0]} needs class-agnostic masks of each upload: add --mask-generator sam")
    if args.mask_generator and not needs_masks:
        raise OvdenseError("--mask-generator and --mask-model apply to corrclip; it is not among --methods")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise OvdenseError("the demo needs Gradio: pip install 'ovdense[demo]'") from None
    from ..demo import DemoSession, build_app

    args.method = methods[0]  # the weights and VFM a method defaults to: the first method's
    loaded, weights = load_for_cli(args)
    device = next(loaded.model.parameters()).device
    vfm = None
    if args.vfm or args.vfm_checkpoint or any(spec.uses_vfm for spec in specs.values()):
        vfm = load_vfm_for_cli(args, device)
    generator = None
    if args.mask_generator:
        from ..mask_generators import mask_generator

        kwargs = {"model": args.mask_model} if args.mask_model else {}
        generator = mask_generator(args.mask_generator, device=device, **kwargs)
    random = [name for name, is_test in ((loaded.model_name, loaded.is_test_model),
              (vfm.name if vfm else "", bool(vfm and vfm.is_test_model))) if is_test]  # fmt: skip
    warning = None
    if random:
        warning = (f"WARNING: {' and '.join(random)}: RANDOM test weights; the labels and maps mean nothing "
                   "(for trying the page only).")  # fmt: skip
    session = DemoSession(
        loaded, methods, precision=args.precision, window_batch=args.window_batch, vfm=vfm,
        mask_generator=generator, text_cache_dir=False if args.text_cache == "off" else args.text_cache,
        warning=warning, weights=weights,
    )  # fmt: skip
    app = build_app(session)
    print(f"ovdense demo: http://{args.host}:{args.port}/ (Ctrl-C stops it)", file=sys.stderr)
    try:
        app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, quiet=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise OvdenseError(f"cannot serve on {args.host}:{args.port}: {first_line(err)}") from None
    return 0
