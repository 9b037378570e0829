"""Training step throughput and peak memory: DeCLIP (released, SD teacher, teacher cache), SCD, the Refiner.

Real-size **random** models (speed only, never results): the student is open_clip's EVA02-B-16 at 560 px,
the VFM a DINOv2-B/14 with registers at 490 px, the Stable Diffusion teacher an SD 1.5-shaped UNet + VAE
(built from the architecture, random weights) at 512 px. Each configuration runs the trainer's own pieces
(``StudentForward``, ``DeclipObjective``, AdamW step) on the same synthetic images; the first step of each
is a warm-up and not timed. Rows "warm teacher cache" first fill the cache, then time
steps that read it. SCD and Refiner rows use the same student and data (their own objectives; the Refiner
trains only its two blocks on the frozen tower). Ratios are against the first row (the released recipe,
no cache) of the same run.
Peak memory: CUDA ``max_memory_allocated`` per row; on the CPU the process's peak RSS so far (it only grows).

    python benchmarks/train_speed.py [--steps 2] [--batch 2] [--threads 2] [--device cpu] [--no-sd]
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ovdense.backbones import tower_for
from ovdense.heads.declip import DeclipHead
from ovdense.train.cache import TeacherCache
from ovdense.train.config import TrainConfig
from ovdense.train.data import DistillDataset
from ovdense.train.losses import weighted_total
from ovdense.train.objectives import OBJECTIVES, DeclipObjective
from ovdense.train.student import StudentForward, freeze_for_distillation
from ovdense.train.teachers import ClipTeacher, SdTeacher
from ovdense.train.trainer import param_groups
from ovdense.vfm import Vfm


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_student(device):
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("EVA02-B-16").to(device)
    return model, tower_for(model)


def random_vfm(device) -> Vfm:
    import timm

    model = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, dynamic_img_size=True, num_classes=0)
    return Vfm(model.to(device).eval().requires_grad_(False), name="dinov2-b-reg", source="random (benchmark)")


def random_sd(device, dtype) -> SdTeacher:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        # SD 1.5's architecture (diffusers defaults + SD 1.5's cross-attention width and VAE).
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    prompt = torch.zeros(1, 77, 768)
    return SdTeacher(vae.to(device, dtype), unet.to(device, dtype), scheduler, prompt, source="random (benchmark)")


def write_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
    return folder


def run(label, cfg, student_model, tower, vfm, sd, images, device, steps, batch, cache_dir=None, warm=False):
    model = copy.deepcopy(student_model)
    tower = tower_for(model)
    clip_teacher = ClipTeacher(student_model)
    freeze_for_distillation(model, tower, cfg.mode)
    grid = cfg.image_size // tower.patch_size
    caches = None
    if cache_dir is not None:
        caches = {"vfm": TeacherCache(cache_dir, "vfm")}
        if sd is not None:
            caches["sd"] = TeacherCache(cache_dir, "sd")
    dataset = DistillDataset(
        str(images), student_size=cfg.image_size, crop_size=tower.preprocess.image_size[0],
        clip_mean=tower.preprocess.mean, clip_std=tower.preprocess.std, seed=0,
        proxies={"vfm": (vfm.proxy_size(grid), tuple(vfm.mean), tuple(vfm.std))},
        sd_size=cfg.sd_size if sd is not None else None,
    )  # fmt: skip
    trained = model
    if cfg.objective == "declip":
        objective = DeclipObjective(cfg, clip_teacher, vfm, sd, caches, dataset.source.name)
        student = StudentForward(model, tower, DeclipHead(cfg.mode), "size").train()
    else:  # the SCD and Refiner objectives build their own student pass from a loaded model
        loaded = SimpleNamespace(model=model, tower=tower)
        objective = OBJECTIVES[cfg.objective].create(cfg, loaded, clip_teacher, device, dataset.source, grid)
        student, trained = objective.student.train(), objective.trained
    betas, eps = cfg.adam_betas_eps()
    opt = torch.optim.AdamW(param_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=eps)
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=2, drop_last=True)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in loader]
    needed = steps + 1
    batches = (batches * needed)[:needed]

    def step(b):
        with amp:
            out = student(b["image"])
            terms = objective(b, out)
        loss = weighted_total(terms, objective.weights)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)

    if warm:  # fill the cache with every batch this run will time
        with torch.no_grad(), amp:
            for b in batches:
                objective(b, student(b["image"]))
    step(batches[0])  # warm-up, not timed
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return label, steps * batch / elapsed, peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--batch", type=int, default=2, help="images per step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-sd", action="store_true", help="skip the Stable Diffusion rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    student_model, tower = random_student(device)
    vfm = random_vfm(device)
    sd = None if args.no_sd else random_sd(device, torch.float16 if device.type == "cuda" else torch.float32)
    released = TrainConfig(image_size=560)
    extended = released.with_recipe("extended")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp) / "images", (args.steps + 1) * args.batch)
        common = dict(images=images, device=device, steps=args.steps, batch=args.batch)
        rows.append(run("released (DINOv2-B)", released, student_model, tower, vfm, None, **common))
        scd = TrainConfig(objective="scd", image_size=560)
        rows.append(run("SCD (RLA + SCD, frozen-CLIP target)", scd, student_model, tower, vfm, None, **common))
        refiner = TrainConfig(objective="refiner", image_size=560)
        rows.append(run("Refiner stage", refiner, student_model, tower, vfm, None, **common))
        rows.append(run("released, warm teacher cache", released, student_model, tower, vfm, None,
                        cache_dir=Path(tmp) / "c1", warm=True, **common))  # fmt: skip
        if sd is not None:
            rows.append(run("extended (+ SD teacher)", extended, student_model, tower, vfm, sd, **common))
            rows.append(run("extended, warm teacher cache", extended, student_model, tower, vfm, sd,
                            cache_dir=Path(tmp) / "c2", warm=True, **common))  # fmt: skip
    base = rows[0][1]
    print(f"\nDeCLIP training step, EVA02-B/16 student at 560 (random), DINOv2-B teacher at 490, batch {args.batch}, "
          f"{device}, {args.threads} threads\n")  # fmt: skip
    print("| configuration | images/s | vs released | peak memory MB |")
    print("|---|---|---|---|")
    for label, rate, mem in rows:
        print(f"| {label} | {rate:.3f} | {rate / base:.2f}x | {mem:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
