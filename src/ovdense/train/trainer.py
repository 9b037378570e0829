"""One trainer for the distillation objectives: data, freezing, AdamW, warm-up + cosine, AMP, DDP, resume.

The loop follows DeCLIP's released ``main.py``/``train.py``: AdamW with two groups (no weight decay for
parameters with ndim < 2 or named bn/ln/bias/logit_scale), lr set per iteration (linear warm-up
``lr·(step+1)/warmup`` then cosine to 0 over all steps), fp16 AMP with a GradScaler on CUDA, no gradient
clipping, ``drop_last``; after each epoch the saved weights are ``α·student + (1−α)·teacher`` while training
continues from the plain student.

Outputs under ``out``: ``config.json``; ``checkpoints/epoch_<e>.safetensors`` (the ensembled open_clip state
dict, ready for ``Segmenter.from_pretrained(checkpoint=...)``); ``state/`` (resume point: student and AdamW
moments as safetensors + ``trainer_state.json``); ``log.csv``; TensorBoard events under ``tb/``.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
import warnings
from pathlib import Path

import torch

from ..errors import OvdenseError
from ..fileio import write_json_atomic
from ..precision import amp_dtype, autocast, check_precision
from .config import TrainConfig

__all__ = ["EpochSampler", "Trainer", "cosine_lr", "ensemble_state", "param_groups"]

STATE_DIR = "state"
STATE_FILE = "trainer_state.json"


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
        from ..eval.runner import init_distributed_from_env
        from ..weights import load_model
        from .data import DistillDataset, open_source
        from .objectives import OBJECTIVES, build_objective
        from .teachers import ClipTeacher

        cfg = self.cfg
        if cfg.objective not in OBJECTIVES:
            raise OvdenseError(f"unknown objective {cfg.objective!r}; available: {', '.join(OBJECTIVES)}")
        if cfg.mode not in ("csa", "qq"):
            raise OvdenseError(f"unknown DeCLIP mode {cfg.mode!r}; expected csa or qq")
        if cfg.batch_size < 1 or cfg.accum_steps < 1 or cfg.epochs < 1:
            raise OvdenseError("batch size, accumulation steps and epochs must be >= 1")
        self.out = Path(cfg.out)
        source = open_source(cfg.data)  # an empty or missing data folder fails before any model loads
        self.dist = init_distributed_from_env(cfg.device)
        device = cfg.device
        if device is None and self.dist.world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{self.dist.local_rank}"
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.loaded = load_model(cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint, device=device)
        self.device = next(self.loaded.model.parameters()).device
        check_precision(cfg.precision, self.device)
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
        self.sampler = EpochSampler(len(self.dataset), cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        if self.sampler.batches_per_epoch < 1:
            raise OvdenseError(
                f"{cfg.data}: {len(self.dataset)} images are fewer than one batch of {cfg.batch_size} per process"
            )
        self.steps_per_epoch = self.sampler.batches_per_epoch // cfg.accum_steps
        if self.steps_per_epoch < 1:
            raise OvdenseError("fewer batches per epoch than --accum-steps")
        self.total_steps = self.steps_per_epoch * cfg.epochs
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
        if cfg.resume:
            self._resume(Path(cfg.resume))

    def _autocast(self):
        return autocast(self.cfg.precision, self.device)

    # -- state ------------------------------------------------------------------------------------
    def _named_trainable(self) -> dict[str, torch.nn.Parameter]:
        params = dict(self.trained.named_parameters())
        return {n: params[n] for n in self.trainable}

    def save_state(self) -> Path:
        """Write the resume point (student weights, AdamW moments, counters, RNG) under ``out/state``."""
        from safetensors.torch import save_file

        state_dir = self.out / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        named = self._named_trainable()
        tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in named.items()}
        for n, p in named.items():
            st = self.optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in st:
                    t = st[key]
                    t = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
                    tensors[f"adamw/{key}/{n}"] = t.detach().cpu().contiguous()
        tmp = state_dir / "weights.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(state_dir / "weights.safetensors")
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
        }
        write_json_atomic(meta, state_dir / STATE_FILE)
        return state_dir

    def _resume(self, path: Path) -> None:
        from safetensors.torch import load_file

        state_dir = path / STATE_DIR if (path / STATE_DIR).is_dir() else path
        meta_path, weights_path = state_dir / STATE_FILE, state_dir / "weights.safetensors"
        if not meta_path.is_file() or not weights_path.is_file():
            raise OvdenseError(f"cannot resume: {state_dir} has no {STATE_FILE} and weights.safetensors")
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(weights_path))
        except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise OvdenseError(f"cannot resume from {state_dir}: {str(err).splitlines()[0]}") from None
        same = meta.get("objective", "declip") == self.cfg.objective and meta.get("trainable") == self.trainable
        if meta.get("model") != self.cfg.model or not same:
            raise OvdenseError(
                f"cannot resume: {state_dir} is a run of another model or mode (--model {meta.get('model')}, "
                f"mode {meta.get('mode')}); this run uses --model {self.cfg.model}, mode {self.cfg.mode}"
            )
        named = self._named_trainable()
        with torch.no_grad():
            for n, p in named.items():
                src = tensors.get(f"param/{n}")
                if src is None or src.shape != p.shape:
                    raise OvdenseError(f"cannot resume: {weights_path} lacks a matching {n}")
                p.copy_(src)
                st = {}
                for key in ("exp_avg", "exp_avg_sq", "step"):
                    t = tensors.get(f"adamw/{key}/{n}")
                    if t is not None:
                        st[key] = t.to(p.device) if key != "step" else t.clone()
                if st:
                    self.optimizer.state[p] = st
        if self.scaler is not None and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.epoch = int(meta["step"]), int(meta["epoch"])
        self.batch_in_epoch, self.skipped = int(meta["batch_in_epoch"]), int(meta.get("skipped_images", 0))
        _set_rng_state(meta["rng"])

    def ensembled_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds, on the CPU: ``alpha·student + (1−alpha)·initial`` (alpha < 1)."""
        student = {k: v.detach().cpu() for k, v in self.loaded.model.state_dict().items()}
        if self.cfg.alpha >= 1.0:
            return student
        teacher = {k: v.detach().cpu() for k, v in self.clip_teacher.model.state_dict().items()}
        return ensemble_state(student, teacher, self.cfg.alpha)

    def save_checkpoint(self, epoch: int, state: dict[str, torch.Tensor] | None = None) -> Path:
        """The weights of ``epoch``: the ensembled open_clip state dict (``state``, else
        :meth:`ensembled_state`), or the Refiner (its own stage)."""
        from safetensors.torch import save_file

        if self.objective.exports == "refiner":
            from .refiner import save_refiner

            path = self.out / "checkpoints" / f"refiner_epoch_{epoch}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_refiner(path, self.trained, self.cfg.model)
            return path

        state = self.ensembled_state() if state is None else state
        path = self.out / "checkpoints" / f"epoch_{epoch}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"model": self.cfg.model})
        tmp.replace(path)
        return path

    # -- loop -------------------------------------------------------------------------------------
    def _loader(self):
        from torch.utils.data import DataLoader

        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            drop_last=True,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _micro_step(self, batch: dict) -> dict[str, torch.Tensor]:
        from .losses import weighted_total

        forward = self.ddp if self.ddp is not None else self.student
        with self._autocast():
            out = forward(batch["image"])
            terms = self.objective(batch, out)
        total = weighted_total(terms, self.objective.weights)
        loss = total / self.cfg.accum_steps
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        return {**{k: v.detach() for k, v in terms.items()}, "loss": total.detach()}

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self) -> Path | None:
        """Train to ``epochs`` (or ``max_steps``); returns the last ensembled checkpoint written, if any."""
        from tqdm import tqdm

        cfg = self.cfg
        main = self.dist.is_main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.json")
        logger = _Logger(self.out, enabled=main)
        self.student.train()
        last_ckpt = None
        stop = False
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            start = self.batch_in_epoch
            self.sampler.set_epoch(epoch, start)
            self.dataset.set_epoch(epoch)
            batches = self.steps_per_epoch * cfg.accum_steps
            bar = tqdm(
                total=batches, initial=start, desc=f"{cfg.objective} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                disable=not main or None,
            )  # fmt: skip
            tic = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            for batch in self._loader():
                if self.batch_in_epoch >= batches:
                    break
                if self.batch_in_epoch % cfg.accum_steps == 0:
                    lr = cosine_lr(self.step, cfg.lr, cfg.warmup_steps, self.total_steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                self.skipped += int(batch["skipped"].sum())
                values = self._micro_step(self._to_device(batch))
                self.batch_in_epoch += 1
                bar.update(1)
                if self.batch_in_epoch % cfg.accum_steps:
                    continue
                self._optimizer_step()
                self.step += 1
                toc = time.perf_counter()
                rate = cfg.batch_size * cfg.accum_steps * self.dist.world_size / max(toc - tic, 1e-9)
                tic = toc
                row = {k: float(v) for k, v in values.items()}
                bar.set_postfix({k: f"{v:.4f}" for k, v in row.items()})
                if self.step % cfg.log_every == 0 or self.step == 1:
                    logger.log(self.step, epoch + 1, self.optimizer.param_groups[0]["lr"], row, rate, self.skipped)
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self._save_state_all()
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stop = True
                    break
            bar.close()
            if stop and self.batch_in_epoch < batches:
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
            if cfg.val_data and clip:
                self._validate(state, epoch + 1, logger)
            if stop:
                break
        logger.close()
        if self.skipped and main:
            warnings.warn(f"{self.skipped} unreadable images were replaced by the next image", stacklevel=2)
        return last_ckpt

    def _save_state_all(self) -> None:
        if self.dist.is_main:
            self.save_state()
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
        preset = self.objective.validation_preset()
        seg = Segmenter(loaded, preset, self.device, text_cache_dir=None)
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
