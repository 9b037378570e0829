"""F-ViT detection throughput: ovdense's ``Detector`` against the same model run the reference's way.

The reference (CLIPSelf's ``test.py`` on mmdet) runs the whole detector for every image and every class list: a new
class list means a new config and a new pass over the images. ``Detector`` runs the image pass once per image
(tower, pyramid, FPN, RPN, RoI head) and answers each class list with a matrix product, the ensemble and NMS.

Rows, per architecture, in one run on the same random full-size model (speed only; random weights):

- ``reference``: one image at a time, the whole pass for each of ``--queries`` class lists;
- ``ours, batch 1``: ``set_image`` once, ``detect`` for each class list;
- ``ours, batch B``: ``encode_images`` of B images in one pass, then ``detect`` for each class list.

    python benchmarks/detect_speed.py [--archs EVA02-B-16 EVA02-L-14-336] [--images 2] [--queries 3] [--batch 2]
        [--threads 2] [--devices cpu cuda] [--precision fp32 fp16 bf16]

Sizes: 640 for B/16 and 896 for L/14 (the OV-COCO test sizes). On CUDA, fp16/bf16 run under autocast as the
reference's ``fp16`` configs do.
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import open_clip
import torch

from ovdense.backbones import tower_for
from ovdense.detection.benchmarks import fvit_config
from ovdense.detection.detector import Detector
from ovdense.detection.fvit import FViT

CLASS_LISTS = [
    ["person", "bicycle", "car", "dog", "cat", "couch", "cup", "knife"],
    ["tree", "window", "door", "sign", "lamp"],
    ["bird", "boat", "kite", "umbrella", "bench", "bus"],
]


def build(arch: str, device: torch.device) -> Detector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(arch).eval()
        tower = tower_for(model)
        config = fvit_config("ov-coco", tower)
        fvit = FViT(tower, config).eval()
        names = sorted({n for lst in CLASS_LISTS for n in lst}) + ["background"]
        table = {n: torch.nn.functional.normalize(torch.randn(config.fc_dim), dim=0) for n in names}
    settings = {"model": arch, "class_embeddings": "random (benchmark)", **config.to_dict()}
    return Detector(fvit, None, "ov-coco", device, settings, class_table=table)


def images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(480, 640), (427, 640), (640, 480), (500, 375)]
    return [(rng.random((*sizes[i % len(sizes)], 3)) * 255).astype(np.uint8) for i in range(n)]


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tic


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def run(arch: str, device: torch.device, precision: str, n_images: int, queries: int, batch: int, repeats: int):
    det = build(arch, device)
    pics = images(n_images)
    lists = CLASS_LISTS[:queries]

    def reference():
        for im in pics:
            for classes in lists:
                det.detect(classes, image=im)

    def ours_single():
        for im in pics:
            det.set_image(im)
            for classes in lists:
                det.detect(classes)

    def ours_batched():
        for start in range(0, len(pics), batch):
            for encoded in det.encode_images(pics[start : start + batch]):
                for classes in lists:
                    det.detect(classes, encoded=encoded)

    rows = {}
    with autocast(device, precision):
        reference()  # warm-up
        paths = (("reference", reference), ("ours, batch 1", ours_single), (f"ours, batch {batch}", ours_batched))
        for name, fn in paths:
            rows[name] = min(timed(fn, device) for _ in range(repeats))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", nargs="+", default=["EVA02-B-16"])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--queries", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    p.add_argument("--precision", nargs="+", default=["fp32"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("| arch | device | precision | path | s | images/s | class lists/s | vs reference |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for dev in args.devices:
            device = torch.device(dev)
            for precision in args.precision:
                if device.type == "cpu" and precision != "fp32":
                    continue
                rows = run(arch, device, precision, args.images, args.queries, args.batch, args.repeats)
                base = rows["reference"]
                for name, seconds in rows.items():
                    print(
                        f"| {arch} | {dev} | {precision} | {name} | {seconds:.2f} | {args.images / seconds:.2f} | "
                        f"{args.images * args.queries / seconds:.2f} | {base / seconds:.2f}x |"
                    )


if __name__ == "__main__":
    main()
