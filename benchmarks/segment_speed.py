"""Sliding-window throughput: all windows of an image batched vs the references' one-window loop.

Both paths use the same model, head, image and text embeddings in the same run; the baseline is
``window_batch=1`` (how SCLIP / NACLIP / ClearCLIP / SC-CLIP / ResCLIP loop over windows), ours batches the
windows. Prints a markdown table of windows/s, images/s and the ratio, on CPU and on CUDA when present,
for a 12-block tiny test ViT and a real-size random ViT-B/16 (random weights: speed only), per method.

    python benchmarks/segment_speed.py [--repeats 3] [--threads 2] [--devices cpu cuda] [--methods sclip scclip]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import open_clip
import torch

from ovdense.backbones import tower_for
from ovdense.heads import TextQuery, create_head
from ovdense.inference import slide_cosine_maps, sliding_windows


def build(name: str, device: torch.device):
    from ovdense.backbones import register_test_models

    register_test_models()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, force_quick_gelu=name == "ViT-B-16")
    return tower_for(model.to(device).eval())


def time_image(tower, head, image, text, crop, stride, window_batch, repeats, autocast):
    def run():
        query = TextQuery(text, 40.0) if head.needs_text else None
        with torch.no_grad(), autocast():
            return slide_cosine_maps(
                image,
                lambda x: head.encode_dense(tower, x, text=query),
                text,
                crop,
                stride,
                image.shape[-2:],
                window_batch=window_batch,
            )

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
    parser.add_argument("--methods", nargs="+", default=["sclip", "scclip", "resclip"], help="dense heads")
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
            for method, precision in ((m, p) for m in args.methods for p in precisions):
                head = create_head(method)
                if precision == "bf16":
                    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
                else:
                    autocast = contextlib.nullcontext
                t_loop, ref = time_image(tower, head, image, text, crop, stride, 1, args.repeats, autocast)
                t_batch, out = time_image(tower, head, image, text, crop, stride, n_windows, args.repeats, autocast)
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
