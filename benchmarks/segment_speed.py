"""Sliding-window throughput: all windows of an image batched vs the references' one-window loop.

Both paths use the same model, head, image and text embeddings in the same run; the baseline is
``window_batch=1`` (how SCLIP / NACLIP / ClearCLIP / SC-CLIP / ResCLIP / ProxyCLIP / CorrCLIP loop over windows),
ours batches the windows (through CLIP and, for ProxyCLIP/CorrCLIP, the VFM). Prints a markdown table of
windows/s, images/s and the ratios, on CPU and on CUDA when present, for a 12-block tiny test ViT (with the
tiny test DINO) and a real-size random ViT-B/16 (with a random DINO ViT-B/8), per method. Random weights:
speed only. CorrCLIP gets random rectangular regions as its masks.

    python benchmarks/segment_speed.py [--repeats 3] [--threads 2] [--devices cpu cuda] [--methods sclip corrclip]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import open_clip
import torch

from ovdense.backbones import tower_for
from ovdense.heads import PassInputs, TextQuery
from ovdense.inference import assemble_cosine_maps, encode_windows, sliding_windows
from ovdense.methods import create_head


def build(name: str, device: torch.device):
    from ovdense.backbones import register_test_models

    register_test_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, force_quick_gelu=name == "ViT-B-16")
    return tower_for(model.to(device).eval())


def build_vfm(name: str, device: torch.device):
    """A random VFM: DINO ViT-B/8's architecture for ViT-B/16, the tiny test DINO for the tiny ViT."""
    import timm

    from ovdense.vfm import Vfm, load_vfm

    if name.startswith("ovdense-test"):
        return load_vfm("test-dino", device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_base_patch8_224.dino", pretrained=False, dynamic_img_size=True, num_classes=0)
    return Vfm(model.to(device), name="dino-b8", source="random (benchmark)")


def random_regions(h: int, w: int, device: torch.device) -> torch.Tensor:
    """1 x 1 x H x W region ids: 12 random rectangles over an unsegmented 0."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(h, w)
    for k in range(1, 13):
        y, x = int(torch.randint(0, h - 20, (1,), generator=gen)), int(torch.randint(0, w - 20, (1,), generator=gen))
        ids[y : y + h // 3, x : x + w // 3] = k
    return ids.view(1, 1, h, w).to(device)


def time_image(tower, head, image, text, crop, stride, window_batch, repeats, autocast, vfm=None, regions=None):
    def run():
        query = TextQuery(text, 40.0) if head.needs_text else None
        with torch.no_grad(), autocast():
            if regions is None:
                encode = lambda x: head.encode_dense(tower, x, PassInputs(text=query, vfm=vfm))  # noqa: E731
            else:
                encode = lambda x, ids: head.encode_dense(tower, x, PassInputs(vfm=vfm, masks=ids[:, 0].long()))  # noqa: E731
            pad = 56 if head.uses_vfm else 0  # ProxyCLIP's and CorrCLIP's padding (none at 224)
            feats = encode_windows(image, encode, crop, stride, window_batch, pad, extra=regions, extra_pad=10000)
            return assemble_cosine_maps(feats, text, image.shape[-2:])

    run()  # warm-up
    if image.is_cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        if image.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["ovdense-test-vit12", "ViT-B-16"])
    parser.add_argument(
        "--methods", nargs="+", default=["sclip", "scclip", "resclip", "proxyclip", "corrclip"], help="dense heads"
    )
    parser.add_argument("--size", type=int, nargs=2, default=(336, 448), metavar=("H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    crop, stride = 224, 112
    h, w = args.size
    n_windows = len(sliding_windows(h, w, crop, stride))
    rows = []
    for dev_name in args.devices:
        if dev_name == "cuda" and not torch.cuda.is_available():
            continue
        device = torch.device(dev_name)
        for name in args.models:
            tower = build(name, device)
            gen = torch.Generator().manual_seed(0)
            image = torch.randn(1, 3, h, w, generator=gen).to(device)
            text = torch.nn.functional.normalize(torch.randn(21, tower.out_dim, generator=gen), dim=-1).to(device)
            precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
            vfm = build_vfm(name, device) if {"proxyclip", "corrclip"} & set(args.methods) else None
            regions = random_regions(h, w, device)
            for method, precision in ((m, p) for m in args.methods for p in precisions):
                head = create_head(method)
                extra = dict(vfm=vfm if head.uses_vfm else None, regions=regions if head.uses_masks else None)
                if precision == "bf16":
                    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
                else:
                    autocast = contextlib.nullcontext
                t_loop, ref = time_image(tower, head, image, text, crop, stride, 1, args.repeats, autocast, **extra)
                t_batch, out = time_image(
                    tower, head, image, text, crop, stride, n_windows, args.repeats, autocast, **extra
                )
                max_diff = (out - ref).abs().max().item()
                rows.append((dev_name, name, method, precision, n_windows, t_loop, t_batch, max_diff))
    print(f"\nimage {h}x{w}, crop {crop}, stride {stride}, {args.threads} CPU threads\n")
    # The cost of a method relative to sclip on the same device, model, precision and image (batched).
    sclip = {(dev, name, prec): t for dev, name, method, prec, _, _, t, _ in rows if method == "sclip"}
    print(
        "| device | model | method | precision | windows | loop win/s | batched win/s | loop img/s | batched img/s "
        "| speed-up | time vs sclip | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dev, name, method, prec, n, t_loop, t_batch, diff in rows:
        base = sclip.get((dev, name, prec))
        rel = f"{t_batch / base:.2f}x" if base else "-"
        print(
            f"| {dev} | {name} | {method} | {prec} | {n} | {n / t_loop:.1f} | {n / t_batch:.1f} | {1 / t_loop:.2f} | "
            f"{1 / t_batch:.2f} | {t_loop / t_batch:.2f}x | {rel} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
