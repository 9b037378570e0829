"""Sliding-window throughput: all windows of an image batched vs the references' one-window loop.

Both paths use the same model, head, image and text embeddings in the same run; the baseline is
``window_batch=1`` (how SCLIP / NACLIP / ClearCLIP / SC-CLIP / ResCLIP / ProxyCLIP / CorrCLIP loop over windows),
ours batches the windows (through CLIP and, for heads with a VFM, the VFM). Prints a markdown table of
windows/s, images/s and the ratios, on CPU and on CUDA when present, for a 12-block tiny test ViT (with the
tiny test DINO) and a real-size random ViT-B/16 (with a random DINO ViT-B/8), per method. Random weights:
speed only.

Any registered method runs (``--methods``): its inputs follow what its head declares (the text for
``needs_text``, the VFM for ``uses_vfm``, random rectangular regions for ``uses_masks``; for ``native_vfm`` the
same VFM's features of the whole image as its map and the windows' pixel coordinates), and its windows are padded
as its preset says (``pad_multiple``, ``pad_to_patch``).

For heads with a VFM the VFM's own time is measured too, in the same run: per window (one window at a time and
batched) for ProxyCLIP / CorrCLIP, once per image for ``native_vfm`` heads (CorrCLIPv2, whose timing includes that
pass: end-to-end). ``VFM share`` is its part of the one-window-at-a-time time, and ``bound`` the speed-up batching
could reach if everything but the batched VFM cost nothing (loop time / batched VFM time, Amdahl's law). The
native VFM standing in for C-RADIOv3-L is a random ViT-L/16 run at the image's size (RADIO's input rule), the tiny
test VFM for the tiny model.

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
from ovdense.heads.vfm_proxies import MERGED_REGION_ID, vfm_input
from ovdense.inference import assemble_cosine_maps, encode_windows, sliding_windows
from ovdense.methods import create_head, list_methods
from ovdense.presets import get_preset

#: The methods timed by default: the heads whose references loop over windows.
DEFAULT_METHODS = ("sclip", "scclip", "resclip", "proxyclip", "corrclip")


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


def build_dense_vfm(name: str, device: torch.device):
    """A random native-resolution VFM: a ViT-L/16 for ViT-B/16 (C-RADIOv3-L's size), ``test-timm`` for the tiny ViT."""
    import timm

    from ovdense.vfm_native import DenseVfm, load_dense_vfm

    if name.startswith("ovdense-test"):
        return load_dense_vfm("test-timm", device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model("vit_large_patch16_224", pretrained=False, dynamic_img_size=True, num_classes=0)
    cfg = model.pretrained_cfg
    return DenseVfm(
        model.to(device), "vit-l16", "timm", 16, model.num_features, tuple(cfg["mean"]), tuple(cfg["std"]),
        source="random (benchmark)",
    )  # fmt: skip


def random_regions(h: int, w: int, device: torch.device) -> torch.Tensor:
    """1 x 1 x H x W region ids: 12 random rectangles over an unsegmented 0."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(h, w)
    for k in range(1, 13):
        y, x = int(torch.randint(0, h - 20, (1,), generator=gen)), int(torch.randint(0, w - 20, (1,), generator=gen))
        ids[y : y + h // 3, x : x + w // 3] = k
    return ids.view(1, 1, h, w).to(device)


def window_inputs(head, tower, image, vfm, regions, dense_vfm=None, pixels=None):
    """What a pass of ``head`` needs besides the windows, from what the head declares.

    For a ``native_vfm`` head this runs ``dense_vfm`` over ``pixels`` (H x W x 3 uint8, the image as decoded):
    the per-image VFM pass, part of the head's time.

    Returns:
        ``(extra, extra_pad, inputs)``: the 1 x K x H x W maps cut like the windows (None: none), their padding,
        and ``inputs(maps)`` giving the :class:`PassInputs` of a batch of windows from its cut maps (None: none).
    """
    maps, pads, fixed = [], [], {}
    if head.uses_masks:
        maps.append(regions)
        pads.append(float(MERGED_REGION_ID))  # CorrCLIP pads the region ids with its merged-region offset
    if head.native_vfm:
        from ovdense.vfm_map import VfmImageMap

        grid, _ = dense_vfm.dense(pixels)  # once per image, at the image's own size
        fixed["vfm_map"] = VfmImageMap(grid, tuple(image.shape[-2:]))
        h, w = image.shape[-2:]
        rows = torch.arange(h, device=image.device, dtype=torch.float32)[:, None].expand(h, w)
        cols = torch.arange(w, device=image.device, dtype=torch.float32)[None, :].expand(h, w)
        maps.append(torch.stack([rows, cols])[None])
        pads += [None, None]  # a padded pixel repeats the window's edge
    elif head.uses_vfm:
        fixed["vfm"] = vfm

    def inputs(cut, text):
        masks = cut[:, 0].long() if head.uses_masks else None
        coords = cut[:, -2:].long() if head.native_vfm else None
        return PassInputs(text=text, masks=masks, pixel_coords=coords, **fixed)

    extra = torch.cat(maps, dim=1) if maps else None
    return extra, tuple(pads), inputs


def best_time(run, repeats: int, cuda: bool):
    """``(min seconds over repeats, last output)`` of ``run()`` after one warm-up call."""
    out = run()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times), out


def time_image(
    tower, head, image, text, crop, stride, pad, window_batch, repeats, autocast, vfm=None, regions=None,
    dense_vfm=None, pixels=None,
):  # fmt: skip
    def run():
        query = TextQuery(text, 40.0) if head.needs_text else None
        with torch.no_grad(), autocast():
            extra, extra_pad, inputs = window_inputs(head, tower, image, vfm, regions, dense_vfm, pixels)
            if extra is None:
                encode = lambda x: head.encode_dense(tower, x, inputs(None, query))  # noqa: E731
            else:
                encode = lambda x, cut: head.encode_dense(tower, x, inputs(cut, query))  # noqa: E731
            feats = encode_windows(image, encode, crop, stride, window_batch, pad, extra=extra, extra_pad=extra_pad)
            return assemble_cosine_maps(feats, text, image.shape[-2:])

    return best_time(run, repeats, image.is_cuda)


def time_vfm(head, tower, image, crop, stride, window_batch, repeats, autocast, vfm=None, dense_vfm=None, pixels=None):
    """Seconds of the head's VFM alone for one image (None: the head has none).

    ``native_vfm``: one pass over the whole image (the same whatever the window batch). Otherwise the VFM over every
    ``crop`` window, ``window_batch`` windows at a time, as the head runs it (its input made by ``vfm_input``).
    """
    if head.native_vfm:
        run = lambda: dense_vfm.dense(pixels)  # noqa: E731
    elif head.uses_vfm:
        boxes = sliding_windows(image.shape[-2], image.shape[-1], crop, stride)
        windows = torch.cat([image[..., y0:y1, x0:x1] for y0, y1, x0, x1 in boxes])
        pre = tower.preprocess
        view = vfm_input(windows.float(), pre.mean, pre.std, vfm.mean, vfm.std)

        def run():
            return [vfm.features(view[i : i + window_batch]) for i in range(0, len(view), window_batch)]
    else:
        return None
    with torch.no_grad(), autocast():
        return best_time(run, repeats, image.is_cuda)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--models", nargs="+", default=["ovdense-test-vit12", "ViT-B-16"])
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="registered dense heads")
    parser.add_argument("--size", type=int, nargs=2, default=(336, 448), metavar=("H", "W"))
    args = parser.parse_args()
    unknown = sorted(set(args.methods) - set(list_methods()))
    if unknown:
        parser.error(f"unknown methods {unknown}; registered: {', '.join(list_methods())}")
    heads = {m: create_head(m) for m in args.methods}
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
            vfm = build_vfm(name, device) if any(head.uses_vfm for head in heads.values()) else None
            native = any(head.native_vfm for head in heads.values())
            dense_vfm = build_dense_vfm(name, device) if native else None
            pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
            regions = random_regions(h, w, device)
            for method, precision in ((m, p) for m in args.methods for p in precisions):
                head = heads[method]
                preset = get_preset(method)
                pad = preset.pad_multiple or (tower.patch_size if preset.pad_to_patch else 0)
                extra = dict(vfm=vfm, regions=regions, dense_vfm=dense_vfm, pixels=pixels)
                if precision == "bf16":
                    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
                else:
                    autocast = contextlib.nullcontext
                timing = (tower, head, image, text, crop, stride, pad)
                t_loop, ref = time_image(*timing, 1, args.repeats, autocast, **extra)
                t_batch, out = time_image(*timing, n_windows, args.repeats, autocast, **extra)
                max_diff = (out - ref).abs().max().item()
                vfm_extra = dict(vfm=vfm, dense_vfm=dense_vfm, pixels=pixels)
                timed = (head, tower, image, crop, stride)
                if head.native_vfm:  # one pass per image whatever the window batch: timed once
                    vfm_times = [time_vfm(*timed, 1, args.repeats, autocast, **vfm_extra)] * 2
                else:
                    vfm_times = [time_vfm(*timed, b, args.repeats, autocast, **vfm_extra) for b in (1, n_windows)]
                rows.append((dev_name, name, method, precision, n_windows, t_loop, t_batch, max_diff, *vfm_times))
    print(f"\nimage {h}x{w}, crop {crop}, stride {stride}, {args.threads} CPU threads\n")
    # The cost of a method relative to sclip on the same device, model, precision and image (batched).
    sclip = {(dev, name, prec): row[6] for row in rows for dev, name, method, prec in [row[:4]] if method == "sclip"}
    print(
        "| device | model | method | precision | windows | loop win/s | batched win/s | loop img/s | batched img/s "
        "| speed-up | time vs sclip | VFM share (loop) | VFM speed-up | bound | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dev, name, method, prec, n, t_loop, t_batch, diff, vfm_loop, vfm_batch in rows:
        base = sclip.get((dev, name, prec))
        rel = f"{t_batch / base:.2f}x" if base else "-"
        if vfm_loop is None:
            vfm_cols = "- | - | -"
        else:  # bound: the speed-up if everything but the (batched) VFM cost nothing
            vfm_cols = f"{100 * vfm_loop / t_loop:.0f}% | {vfm_loop / vfm_batch:.2f}x | {t_loop / vfm_batch:.2f}x"
        print(
            f"| {dev} | {name} | {method} | {prec} | {n} | {n / t_loop:.1f} | {n / t_batch:.1f} | {1 / t_loop:.2f} | "
            f"{1 / t_batch:.2f} | {t_loop / t_batch:.2f}x | {rel} | {vfm_cols} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
