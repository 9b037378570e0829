"""``ovdense eval`` throughput on a synthetic VOC-sized set: batched windows vs one window at a time.

Both runs use the same model (a real-size random ViT-B/16 by default: speed only), the same synthetic
VOC21 set (375 x 500 images in the VOCdevkit layout), the same text embeddings (built once, cached, and
not timed) and the full evaluation loop (decode in DataLoader workers, sliding window, labels, streamed
metric). The baseline is ``window_batch=1``, the references' loop. Prints images/s, the ratio, and peak
memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS so far, which only grows).

    python benchmarks/eval_speed.py [--images 8] [--model ViT-B-16] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from eval_fixtures import make_dataset  # noqa: E402
from ovdense.eval.datasets import get_dataset  # noqa: E402
from ovdense.eval.runner import evaluate  # noqa: E402
from ovdense.predictor import Segmenter  # noqa: E402
from ovdense.presets import get_preset  # noqa: E402
from ovdense.weights import LoadedModel, tower_for  # noqa: E402


def random_model(name: str, device: torch.device) -> LoadedModel:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(name, force_quick_gelu=True).to(device).eval()
    return LoadedModel(model, open_clip.get_tokenizer(name), tower_for(model), name, "random", "quick_gelu")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = random_model(args.model, device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset("voc21", Path(tmp) / "data", n=args.images, size=(375, 500), seed=0)
        dataset = get_dataset("voc21", Path(tmp) / "data")
        preset = get_preset("sclip", "voc21")
        for label, window_batch in (("one window at a time", 1), ("batched windows", 16)):
            seg = Segmenter(loaded, preset, device, window_batch=window_batch, text_cache_dir=Path(tmp) / "cache")
            seg.text_classifier(dataset.class_names("sclip"))  # built (or read from cache) outside the timing
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            metrics = evaluate(seg, dataset, num_workers=args.workers, progress=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            rows.append((label, elapsed, peak_memory_mb(device), metrics.miou))
    base = rows[0][1]
    print(f"\n{args.images} VOC-sized images (375x500), sclip/voc21 preset, {args.model} (random), {device}, "
          f"{args.threads} threads\n")  # fmt: skip
    print("| pipeline | seconds | images/s | speed-up | peak memory MB | mIoU |")
    print("|---|---|---|---|---|---|")
    for label, elapsed, mem, miou in rows:
        speed = f"{args.images / elapsed:.2f} | {base / elapsed:.2f}x"
        print(f"| {label} | {elapsed:.1f} | {speed} | {mem:.0f} | {miou:.2f} |")


if __name__ == "__main__":
    main()
