"""Text-classifier build time: the references' loop vs ovdense's batched, context-cut, cached encoder.

Baseline (SCLIP ``clip_segmentor.py``): for each name, the 80 templates at the full 77-token context,
``encode_text``, normalise, mean, normalise. Ours: all names x templates in batches of 256, each batch
cut to its longest tokenised prompt, then the same reduction; and a second build served from the disk
cache. Same model, same run; the largest difference between the two embeddings is printed too.
Real-size random towers: speed only.

    python benchmarks/text_speed.py [--names 16] [--threads 2] [--models ovdense-test-vit ViT-B-16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from ovdense.classes import read_class_file
from ovdense.text import OPENAI_TEMPLATES, build_text_classifier, flatten_classes

# VOC21's 56 names (background words, classes, synonyms) from the example class file.
VOC_NAMES = flatten_classes(read_class_file(Path(__file__).parent.parent / "examples" / "voc21_classes.txt"))[0]


@torch.no_grad()
def reference_loop(model, tokenizer, names):
    feats = []
    for name in names:
        emb = F.normalize(model.encode_text(tokenizer([t(name) for t in OPENAI_TEMPLATES])), dim=-1)
        feats.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(feats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=16, help="how many of VOC21's 56 names (all: 56)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["ovdense-test-vit", "ViT-B-16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = VOC_NAMES[: args.names]
    classes = [[n] for n in names]
    rows = []
    for model_name in args.models:
        import ovdense.weights  # noqa: F401  (registers the test archs)

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(model_name).eval()
        tokenizer = open_clip.get_tokenizer(model_name)
        start = time.perf_counter()
        ref = reference_loop(model, tokenizer, names)
        t_ref = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            ours = build_text_classifier(model, tokenizer, classes, cache_dir=cache)
            t_ours = time.perf_counter() - start
            start = time.perf_counter()
            build_text_classifier(model, tokenizer, classes, cache_dir=cache)
            t_cached = time.perf_counter() - start
        diff = (ours.embeddings - ref).abs().max().item()
        rows.append((model_name, t_ref, t_ours, t_cached, diff))
    n = len(names) * len(OPENAI_TEMPLATES)
    print(f"\n{len(names)} names x {len(OPENAI_TEMPLATES)} templates = {n} prompts, {args.threads} threads\n")
    print("| model | reference loop s | ovdense s | cached s | speed-up | speed-up cached | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for model_name, t_ref, t_ours, t_cached, diff in rows:
        print(
            f"| {model_name} | {t_ref:.2f} | {t_ours:.2f} | {t_cached:.3f} | {t_ref / t_ours:.1f}x | "
            f"{t_ref / t_cached:.0f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
