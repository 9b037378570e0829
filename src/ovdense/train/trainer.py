"""One trainer for the distillation objectives: data, freezing, AdamW, warm-up + cosine, AMP, DDP, resume.

The loop follows DeCLIP's released ``main.py``/``train.py``: AdamW with two groups (no weight decay for
parameters with ndim < 2 or named bn/ln/bias/logit_scale), lr set per iteration (linear warm-up
``lr·(step+1)/warmup`` then cosine to 0 over all steps), fp16 AMP with a GradScaler on CUDA, no gradient
clipping, ``drop_last``; after each epoch the saved weights are ``α·student + (1−α)·teacher`` while training
continues from the plain student.

Outputs under ``out``: ``config.json``; ``checkpoints/epoch_<e>.safetensors`` (the ensembled open_clip state
dict, ready for ``Segmenter.from_pretrained(checkpoint=...)``); ``state/`` (the resume point: one unit,
published atomically and checked on load, :mod:`ovdense.train.state`); ``log.csv``; TensorBoard events under
``tb/``. Checkpoints and ``config.json`` are written whole or not at all (temp file, fsync, ``os.replace``).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import math
import os
import random
import secrets
import sys
import time
import warnings
from pathlib import Path

import torch

from ..distributed import init_distributed_from_env
from ..errors import OvdenseError, first_line
from ..fileio import check_output_dir, fsync_dir, write_atomic, write_atomic_durable
from ..precision import amp_dtype, autocast, check_precision
from .config import TrainConfig
from .state import (
    CURRENT_FILE,
    STATE_DIR,
    STATE_FILE,
    WEIGHTS_FILE,
    current_state,
    publish_state,
    read_state,
    tidy_state,
)

__all__ = ["EpochSampler", "Trainer", "cosine_lr", "ensemble_state", "param_groups", "progress_line"]


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    """DeCLIP/open_clip ``cosine_lr``: ``base·(step+1)/warmup`` for step < warmup, then a cosine to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    e, es = step - warmup, max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The reference's two AdamW groups over the trainable parameters (names as in ``model``)."""

    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


@torch.no_grad()
def ensemble_state(student: dict, teacher: dict, alpha: float) -> dict:
    """``alpha·student + (1−alpha)·teacher`` for every floating tensor (as the reference, frozen ones too)."""
    out = {}
    for k, v in student.items():
        out[k] = v * alpha + teacher[k] * (1.0 - alpha) if v.is_floating_point() else v.clone()
    return out


class EpochSampler(torch.utils.data.Sampler):
    """Indices of one epoch for one process: a (seed, epoch)-seeded permutation, every world-th index from
    ``rank``, whole batches only, starting after ``start_batch`` batches (resume without re-reading data)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    @property
    def batches_per_epoch(self) -> int:
        return (self.n // self.world) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        mine = order[self.rank : (self.n // self.world) * self.world : self.world]
        usable = self.batches_per_epoch * self.batch_size
        return iter(mine[self.start_batch * self.batch_size : usable])

    def __len__(self) -> int:
        return max(self.batches_per_epoch - self.start_batch, 0) * self.batch_size


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "python": _jsonable(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _jsonable(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_jsonable(x) for x in obj]}
    if isinstance(obj, list):
        return [_jsonable(x) for x in obj]
    return obj


def _from_jsonable(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_jsonable(x) for x in obj["__tuple__"])
    if isinstance(obj, list):
        return [_from_jsonable(x) for x in obj]
    return obj


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    random.setstate(_from_jsonable(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def progress_line(
    step: int, total: int, epoch: int, epochs: int, values: dict[str, float], lr: float, rate: float
) -> str:
    """The plain progress line printed off a terminal, e.g.
    ``step 20/600 epoch 1/6 loss 0.4123 content 0.3000 context 0.1000 lr 1.0e-05 3.2 img/s``."""
    terms = {"loss": values["loss"], **{k: v for k, v in values.items() if k != "loss"}}
    text = " ".join(f"{k} {v:.4f}" for k, v in terms.items())
    return f"step {step}/{total} epoch {epoch}/{epochs} {text} lr {lr:.1e} {rate:.1f} img/s"


class _Progress:
    """A tqdm bar (step, loss terms, images/s) when stderr is a terminal; otherwise one plain line on stderr every
    ``log_every`` steps, so logs piped to files or CI hold no bar redraws."""

    def __init__(self, enabled: bool, total: int, initial: int, epochs: int, log_every: int, desc: str):
        self.enabled, self.total, self.epochs, self.log_every, self.desc = enabled, total, epochs, log_every, desc
        self.bar = None
        self.images = 0
        self.tic = time.perf_counter()
        if enabled and _stderr_is_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, step: int, epoch: int, values: dict[str, float], lr: float, rate: float, images: int) -> None:
        if not self.enabled:
            return
        self.images += images
        if self.bar is not None:
            self.bar.set_description(f"{self.desc} epoch {epoch}/{self.epochs}", refresh=False)
            self.bar.set_postfix({**{k: f"{v:.4f}" for k, v in values.items()}, "img/s": f"{rate:.1f}"}, refresh=False)
            self.bar.update(1)
            return
        if step % self.log_every == 0 or step == 1 or step == self.total:
            toc = time.perf_counter()
            mean_rate = self.images / max(toc - self.tic, 1e-9)  # over the steps since the last line
            self.images, self.tic = 0, toc
            line = progress_line(step, self.total, epoch, self.epochs, values, lr, mean_rate)
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class Trainer:
    """Runs one objective on one process or under torchrun (DDP).

    Build with :meth:`from_config`; :meth:`fit` trains and returns the path of the last checkpoint.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    # -- setup ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Trainer:
        self = cls(cfg)
        self._setup()
        return self

    def _setup(self) -> None:
        from .data import DistillDataset, open_source
        from .objectives import OBJECTIVES, build_objective
        from .teachers import ClipTeacher

        cfg = self.cfg
        if cfg.objective not in OBJECTIVES:
            raise OvdenseError(f"unknown objective {cfg.objective!r}; available: {', '.join(OBJECTIVES)}")
        if cfg.mode not in ("csa", "qq"):
            raise OvdenseError(f"unknown DeCLIP mode {cfg.mode!r}; expected csa or qq")
        # The numbers' ranges are TrainConfig's own checks (its fields' declarations).
        if not str(cfg.out):
            raise OvdenseError("no output folder given: pass --out RUN_DIR")
        self.out = Path(cfg.out)
        check_output_dir(self.out)  # before any model loads: a bad --out should not cost minutes
        if not cfg.resume and (self.out / STATE_DIR / CURRENT_FILE).is_file():
            # A run that can be continued is never overwritten silently (one that crashed before its first
            # resume point has nothing to continue: it starts again).
            raise OvdenseError(
                f"{self.out} holds a run that can be continued: pass --resume {self.out}, or write to another --out"
            )
        source = open_source(cfg.data)  # an empty or missing data folder fails before any model loads
        self.join_and_load()
        tower = self.loaded.tower
        self.clip_teacher = ClipTeacher(self.loaded.model)  # the initial weights: crop teacher, ensembling partner
        grid = cfg.image_size // tower.patch_size
        self.objective = build_objective(cfg, self.loaded, self.clip_teacher, self.device, source, grid)
        self.student = self.objective.student
        self.trained = self.objective.trained
        self.trainable = self.objective.trainable
        pre = tower.preprocess
        self.dataset = DistillDataset(
            source,
            student_size=cfg.image_size,
            crop_size=pre.image_size[0],
            clip_mean=pre.mean,
            clip_std=pre.std,
            max_split=cfg.max_split,
            max_boxes=cfg.max_boxes,
            seed=cfg.seed,
            **self.objective.data_inputs(grid),
        )
        # All images unreadable: one error now, before fit() creates the run folder.
        self.dataset.check_readable()
        self.plan_steps()
        betas, eps = cfg.adam_betas_eps()
        self.optimizer = torch.optim.AdamW(
            param_groups(self.trained, cfg.weight_decay), lr=cfg.lr, betas=betas, eps=eps
        )
        # fp16 needs loss scaling (DeCLIP's GradScaler); bf16 and fp32 do not.
        fp16 = amp_dtype(cfg.precision, self.device) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.ddp = None
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        self._saved_at: tuple[int, int] | None = None  # (epoch, batch) of the last resume point written
        if cfg.resume:
            self._resume(Path(cfg.resume))

    def join_and_load(self) -> None:
        """Join the torchrun group (each process on its own GPU), seed Python and torch, load the CLIP the config
        names (``self.loaded``, ``self.device``) and check the precision against that device."""
        from ..weights import load_model

        cfg = self.cfg
        self.dist = init_distributed_from_env(cfg.device)
        device = cfg.device
        if device is None and self.dist.world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{self.dist.local_rank}"
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.loaded = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, device=device)
        self.device = next(self.loaded.model.parameters()).device
        check_precision(cfg.precision, self.device)

    def plan_steps(self) -> None:
        """This process's sampler over ``self.dataset`` and the run's steps per epoch and in all.

        Raises:
            OvdenseError: fewer images than one batch per process, or fewer batches than ``accum_steps``.
        """
        cfg = self.cfg
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        if self.sampler.batches_per_epoch < 1:
            raise OvdenseError(
                f"{cfg.data}: {len(self.dataset)} images are fewer than one batch of {cfg.batch_size} per process"
            )
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise OvdenseError("fewer batches per epoch than --accum-steps")
        self.total_steps = self.steps_per_epoch * cfg.epochs

    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    # -- state ------------------------------------------------------------------------------------
    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.trained.named_parameters())
        return {n: params[n] for n in self.trainable}

    def save_state(self) -> Path:
        """Publish the resume point (student weights, AdamW moments, counters, RNG) as one unit under
        ``out/state`` (see the module doc); returns its folder."""
        from safetensors.torch import save

        named = self._named_trainable()
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
        tensors.update({f"buffer/{n}": b.detach().cpu().contiguous() for n, b in self.state_buffers().items()})
        for n, p in named.items():
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    t = st[key]
                    t = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
                    tensors[f"adamw/{key}/{n}"] = t.detach().cpu().contiguous()
        weights = save(tensors)
        meta = {
            "model": self.cfg.model,
            "objective": self.cfg.objective,
            "mode": self.cfg.mode,
            "trainable": self.trainable,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "skipped_images": self.skipped,
            "world_size": self.dist.world_size,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": _rng_state(),
            **self.state_meta(),
            "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights)},
        }
        return publish_state(self.out / STATE_DIR, weights, meta, label=str(self.step))

    def _resume(self, path: Path) -> None:
        folder = current_state(path)
        meta, tensors = read_state(folder)
        same = meta.get("objective", "declip") == self.cfg.objective and meta.get("trainable") == self.trainable
        if meta.get("model") != self.cfg.model or not same:
            raise OvdenseError(
                f"cannot resume: {folder} is a run of another model or mode (--model {meta.get('model')}, "
                f"mode {meta.get('mode')}); this run uses --model {self.cfg.model}, mode {self.cfg.mode}"
            )
        named = self._named_trainable()
        with torch.no_grad():
            for n, p in named.items():
                src = tensors.get(f"param/{n}")
                if src is None or src.shape != p.shape:
                    raise OvdenseError(f"cannot resume: {folder / WEIGHTS_FILE} lacks a matching {n}")
                p.copy_(src)
                st = {}
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    t = tensors.get(f"adamw/{key}/{n}")
                    if t is not None:
                        st[key] = t.to(p.device) if key != "step" else t.clone()
                if st:
                    self.optimizer.state[p] = st
        with torch.no_grad():
            for n, b in self.state_buffers().items():
                src = tensors.get(f"buffer/{n}")
                if src is None or src.shape != b.shape:
                    raise OvdenseError(f"cannot resume: {folder / WEIGHTS_FILE} lacks a matching buffer {n}")
                b.copy_(src)
        try:
            self.load_state_meta(meta)
            if self.scaler is not None and meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
            self.batch_in_epoch, self.skipped = int(meta["batch_in_epoch"]), int(meta.get("skipped_images", 0))
            _set_rng_state(meta["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            what = f"{type(err).__name__}: {first_line(err)}"
            raise OvdenseError(
                f"cannot resume: the resume point {folder} is damaged: {folder / STATE_FILE} is incomplete ({what})"
            ) from None
        self._saved_at = (self.epoch, self.batch_in_epoch)  # this point is on disk already

    # Hooks a trainer of another kind of model overrides (the F-ViT trainer does).
    def state_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers the resume point keeps besides the trainable parameters (BatchNorm statistics...): none here."""
        return {}

    def state_meta(self) -> dict:
        """Extra JSON-able entries of the resume point."""
        return {}

    def load_state_meta(self, meta: dict) -> None:
        """Read back what :meth:`state_meta` wrote."""

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (0-based): linear warm-up then cosine to 0."""
        return cosine_lr(step, self.cfg.lr, self.cfg.warmup_steps, self.total_steps)

    def logged_values(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a step logs: this process's terms (the distillation objectives log rank 0's)."""
        return values

    def forward_batch(self, forward, batch: dict):
        """The student's pass on a batch (what the objective scores)."""
        return forward(batch["image"])

    def ensembled_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds, on the CPU: ``alpha·student + (1−alpha)·initial`` (alpha < 1)."""
        student = {k: v.detach().cpu() for k, v in self.loaded.model.state_dict().items()}
        if self.cfg.alpha >= 1.0:
            return student
        teacher = {k: v.detach().cpu() for k, v in self.clip_teacher.model.state_dict().items()}
        return ensemble_state(student, teacher, self.cfg.alpha)

    def save_checkpoint(self, epoch: int, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The weights of ``epoch``: the ensembled open_clip state dict (``state``, else
        :meth:`ensembled_state`), or the Refiner (its own stage). Written whole or not at all, fsynced."""
        from safetensors.torch import save

        if self.objective.exports == "refiner":
            from .refiner import save_refiner

            path = self.out / "checkpoints" / f"refiner_epoch_{epoch}.safetensors"
            self._checkpoint_folder(path)
            save_refiner(path, self.trained, self.cfg.model)  # temp file, fsync, os.replace
            fsync_dir(path.parent)
            return path

        state = self.ensembled_state() if state is None else state
        path = self.out / "checkpoints" / f"epoch_{epoch}.safetensors"
        self._checkpoint_folder(path)
        data = save({k: v.contiguous() for k, v in state.items()}, metadata={"model": self.cfg.model})
        write_atomic_durable(path, lambda f: f.write(data))
        return path

    def _checkpoint_folder(self, path: Path) -> None:
        """Create ``checkpoints/`` durably and drop the temp files a crash left for ``path``."""
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True)
            fsync_dir(path.parent.parent)
        for stale in [*path.parent.glob(f".{path.name}.*.tmp"), path.with_suffix(".tmp")]:
            if stale.is_file():
                stale.unlink()

    # -- loop -------------------------------------------------------------------------------------
    def _loader(self):
        from torch.utils.data import DataLoader

        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            drop_last=True,
            collate_fn=getattr(self.dataset, "collate", None),
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _micro_step(self, batch: dict) -> dict[str, torch.Tensor]:
        from .losses import weighted_total

        forward = self.ddp if self.ddp is not None else self.student
        with self._autocast():
            out = self.forward_batch(forward, batch)
            terms = self.objective(batch, out)
        total = weighted_total(terms, self.objective.weights)
        loss = total / self.cfg.accum_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return self.logged_values({**{k: v.detach() for k, v in terms.items()}, "loss": total.detach()})

    #: Gradient clipping (max L2 norm over the trainable parameters), or None (DeCLIP clips nothing).
    grad_clip: float | None = None

    def _optimizer_step(self) -> None:
        if self.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self._named_trainable().values()), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self) -> Path | None:
        """Train to ``epochs`` (or ``max_steps``); returns the last ensembled checkpoint written, if any.

        ``log.csv`` and ``val.csv`` first lose any row past the starting step (logged after the resume point
        was saved, or by an earlier run in ``out``), so each step appears once.
        """
        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
        logger = _Logger(self.out, enabled=main)
        logger.truncate(self.step)
        if main:
            tidy_state(self.out / STATE_DIR)
        self.student.train()
        last_ckpt = None
        stop = False
        total = self.total_steps if cfg.max_steps is None else min(self.total_steps, cfg.max_steps)
        progress = _Progress(main, total, self.step, cfg.epochs, cfg.log_every, desc=cfg.objective)
        images_per_step = cfg.batch_size * cfg.accum_steps * self.dist.world_size
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            start = self.batch_in_epoch
            self.sampler.set_epoch(epoch, start)
            self.dataset.set_epoch(epoch)
            batches = self.steps_per_epoch * cfg.accum_steps
            tic = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            for batch in self._loader():
                if self.batch_in_epoch >= batches:
                    break
                if self.batch_in_epoch % cfg.accum_steps == 0:
                    lr = self.lr_at(self.step)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                self.skipped += int(batch["skipped"].sum())
                values = self._micro_step(self._to_device(batch))
                self.batch_in_epoch += 1
                if self.batch_in_epoch % cfg.accum_steps:
                    continue
                self._optimizer_step()
                self.step += 1
                toc = time.perf_counter()
                rate = images_per_step / max(toc - tic, 1e-9)
                tic = toc
                row = {k: float(v) for k, v in values.items()}
                lr = self.optimizer.param_groups[0]["lr"]
                progress.update(self.step, epoch + 1, row, lr, rate, images_per_step)
                if self.step % cfg.log_every == 0 or self.step == 1:
                    logger.log(self.step, epoch + 1, lr, row, rate, self.skipped)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save_state_all()
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stop = True
                    break
            if stop and self.batch_in_epoch < batches:
                if self._saved_at != (self.epoch, self.batch_in_epoch):
                    self._save_state_all()  # stopped by max_steps: the steps done so far can be resumed
                break
            # Epoch done: the ensembled checkpoint, then the resume point of the next epoch.
            self.batch_in_epoch = 0
            self.epoch = epoch + 1
            # One ensembled state for the checkpoint and the validation: they score the same weights.
            clip = self.objective.exports == "clip"
            state = self.ensembled_state() if clip and (main or cfg.val_data) else None
            if main:
                last_ckpt = self.save_checkpoint(epoch + 1, state)
            self._save_state_all()
            due = (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs
            if cfg.val_data and self.objective.exports != "refiner" and due:
                self._validate(state, epoch + 1, logger)
            if stop:
                break
        progress.close()
        logger.close()
        if self.skipped and main:
            warnings.warn(f"{self.skipped} unreadable images were replaced by the next image", stacklevel=2)
        return last_ckpt

    def _save_state_all(self) -> None:
        if self.dist.is_main:
            self.save_state()
        self._saved_at = (self.epoch, self.batch_in_epoch)
        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _validate(self, state: dict[str, torch.Tensor], epoch: int, logger) -> None:
        """Region classification on ``val_data`` with the ensembled weights (every rank takes part)."""
        from ..backbones import tower_for
        from ..eval.panoptic import CocoPanoptic
        from ..eval.regions import evaluate_regions
        from ..predictor import Segmenter

        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        model = copy.deepcopy(self.clip_teacher.model)
        model.load_state_dict(state)
        model.eval()
        loaded = copy.copy(self.loaded)
        loaded.model = model
        loaded.tower = tower_for(model)
        method, options = self.objective.validation_method()
        seg = Segmenter.from_model(loaded, method, text_cache_dir=None, **options)
        metrics, _ = evaluate_regions(
            seg,
            CocoPanoptic(self.cfg.val_data),
            image_size=self.cfg.val_image_size,
            limit=self.cfg.val_limit,
            num_workers=0,
            progress=False,
        )
        del model, seg
        figures = {
            f"val/{kind}_{group}_top1": metrics.results[kind][group]["top1"]
            for kind in ("box", "mask")
            for group in ("things", "stuff")
        }
        logger.log_values(self.step, epoch, figures)


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


class _Logger:
    """``log.csv`` rows and TensorBoard scalars (when tensorboard is installed), main process only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.csv_path = out / "log.csv"
        self.val_path = out / "val.csv"
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))
        except ImportError:
            warnings.warn("TensorBoard logs are off: pip install 'ovdense[train]' for them", stacklevel=3)

    def truncate(self, step: int) -> None:
        """Drop the rows past ``step`` (and torn ones) from ``log.csv`` and ``val.csv``, rewriting atomically."""
        if not self.enabled:
            return
        for path in (self.csv_path, self.val_path):
            if not path.is_file():
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            fields = reader.fieldnames or []
            rows = list(reader)
            if rows and not text.endswith("\n"):
                rows[-1] = {**rows[-1], "step": None}  # a crash mid-append: the last row is torn
            if "step" not in fields:
                aside = path.with_name(f"{path.name}.unreadable-{secrets.token_hex(3)}")
                os.replace(path, aside)
                warnings.warn(f"{path} has no step column; moved aside to {aside}", stacklevel=3)
                continue
            kept = [r for r in rows if None not in r.values() and _int_or_none(r["step"]) is not None]
            kept = [r for r in kept if _int_or_none(r["step"]) <= step]
            if len(kept) == len(rows):
                continue
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=fields)
            w.writeheader()
            w.writerows(kept)
            data = buf.getvalue().encode()
            write_atomic(path, lambda f, data=data: f.write(data))
            warnings.warn(
                f"{path}: dropped {len(rows) - len(kept)} rows past step {step} (logged after the resume point "
                "was saved, or by an earlier run in this folder); those steps are logged again",
                stacklevel=3,
            )

    def _append(self, path: Path, row: dict) -> None:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def log(self, step: int, epoch: int, lr: float, values: dict, rate: float, skipped: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch, "lr": lr, **values, "images_per_s": rate, "skipped_images": skipped}
        self._append(self.csv_path, row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, step)

    def log_values(self, step: int, epoch: int, values: dict) -> None:
        if not self.enabled:
            return
        self._append(self.val_path, {"step": step, "epoch": epoch, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        print(f"epoch {epoch} validation: " + ", ".join(f"{k[4:]} {v:.1f}" for k, v in values.items()))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
