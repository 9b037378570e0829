"""Training objectives: what a step computes from a batch, the student's pass and the teachers.

An objective declares the extra inputs it needs from the data (VFM proxy, Stable Diffusion input), and maps
``(batch, student output)`` to named loss terms; the trainer weights, sums and optimises them. DeCLIP is the
first objective; SCD plugs in the same way.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align

from . import losses as L
from .config import TrainConfig
from .student import StudentOutput

__all__ = ["DeclipObjective", "boxes_in_grid_units", "regions_share"]


def boxes_in_grid_units(boxes: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Per image, its valid boxes (normalised to the padded input) in grid units, as RoIAlign takes them.

    Args:
        boxes: B x K x 4 XYXY in [0, 1] of the padded input.
        valid: B x K bool.
        grid: (h, w) of the map.

    Returns:
        B tensors of shape K_b x 4.
    """
    h, w = grid
    scale = boxes.new_tensor([w, h, w, h])
    return [b[v] * scale for b, v in zip(boxes, valid, strict=True)]


def regions_share(local: int, device: torch.device) -> float:
    """``world_size * local / global`` region count: scales a per-process mean over regions so that the
    gradient DDP averages equals the mean over all regions of the global batch (ours; the reference
    averages per-GPU means, which weights images by how many grid cells they drew)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    t = torch.tensor([float(local)], device=device)
    dist.all_reduce(t)
    total = float(t.item())
    return dist.get_world_size() * local / total if total > 0 else 0.0


class DeclipObjective:
    """DeCLIP's decoupled distillation: content (CLIP crop [CLS] by RoIAlign) + context (VFM affinities).

    Args:
        cfg: the run's configuration (loss forms, temperatures, weights, N for RoI tokens).
        clip_teacher: a :class:`~ovdense.train.teachers.ClipTeacher` (frozen initial weights).
        vfm: a :class:`~ovdense.train.teachers.VfmTeacher`.
        sd: a :class:`~ovdense.train.teachers.SdTeacher` for the SD-guided affinity, or None.
        caches: optional ``{"vfm": TeacherCache, "sd": TeacherCache}`` (see :mod:`ovdense.train.cache`).
        name_of: maps a dataset index to the image's stable name (the cache key); needed with ``caches``.
    """

    name = "declip"

    def __init__(self, cfg: TrainConfig, clip_teacher, vfm, sd=None, caches: dict | None = None, name_of=None):
        if cfg.context_loss not in ("l2", "kl"):
            raise ValueError(f"unknown context loss {cfg.context_loss!r}; expected l2 or kl")
        if cfg.content_loss not in ("roi", "tokens"):
            raise ValueError(f"unknown content loss {cfg.content_loss!r}; expected roi or tokens")
        if cfg.rcc_weight > 0 and cfg.content_loss != "tokens":
            raise ValueError("the region correlation constraint needs --content-loss tokens")
        self.cfg = cfg
        self.clip_teacher = clip_teacher
        self.vfm = vfm
        self.sd = sd
        self.caches = caches or {}
        self.name_of = name_of

    @property
    def weights(self) -> dict[str, float]:
        w = {"content": self.cfg.content_weight, "context": self.cfg.context_weight}
        if self.cfg.rcc_weight > 0:
            w["rcc"] = self.cfg.rcc_weight
        return w

    def data_inputs(self, grid: int) -> dict:
        """Extra inputs for :class:`~ovdense.train.data.DistillDataset` at a student grid of ``grid``."""
        proxies = {"vfm": (self.vfm.proxy_size(grid), tuple(self.vfm.mean), tuple(self.vfm.std))}
        return {"proxies": proxies, "sd_size": self.cfg.sd_size if self.sd is not None else None}

    def __call__(self, batch: dict, out: StudentOutput) -> dict[str, torch.Tensor]:
        """Loss terms of one batch.

        Args:
            batch: ``image`` B x 3 x S x S, ``boxes`` B x K x 4, ``box_valid`` B x K, ``crops``
                B x K x 3 x c x c, ``proxy_vfm`` B x 3 x P x P, and ``sd`` B x 3 x H x W with the SD teacher.
            out: the student's pass over ``batch["image"]``.

        Returns:
            ``{"content": ..., "context": ...[, "rcc": ...]}`` un-weighted 0-dim tensors.
        """
        cfg = self.cfg
        valid = batch["box_valid"]
        rois = boxes_in_grid_units(batch["boxes"].float(), valid, out.grid)
        n_local = int(valid.sum())
        share = regions_share(n_local, out.content.device)
        device = out.content.device
        with torch.no_grad():
            teacher_cls = self.clip_teacher.crop_embeddings(batch["crops"][valid])
            vfm_map = self._teacher("vfm", batch, lambda x: self.vfm.features(x), "proxy_vfm").to(device)
        vfm_grid = tuple(vfm_map.shape[-2:])
        vfm_tokens = vfm_map.flatten(2).transpose(1, 2)
        with torch.no_grad():
            s_teacher = L.cosine_affinity(vfm_tokens)
            if self.sd is not None:
                chain = self._teacher("sd", batch, lambda x: self.sd.attention_chain(x, vfm_grid), "sd").to(device)
                s_teacher = L.sd_guided_affinity(chain, s_teacher)

        terms: dict[str, torch.Tensor] = {}
        content = out.content.float()
        if cfg.content_loss == "roi":
            student_roi = roi_align(content, rois, (1, 1), 1.0, -1, True)[:, :, 0, 0]
            terms["content"] = L.content_loss_roi(student_roi, teacher_cls) * share
        else:
            n = cfg.roi_tokens
            tokens = roi_align(content, rois, (n, n), 1.0, -1, True).flatten(2).transpose(1, 2)  # K x n² x D
            terms["content"] = L.content_loss_tokens(tokens, teacher_cls) * share
            if cfg.rcc_weight > 0:
                vfm_rois = boxes_in_grid_units(batch["boxes"].float(), valid, vfm_grid)
                vfm_region = roi_align(vfm_map.float(), vfm_rois, (n, n), 1.0, -1, True).flatten(2).transpose(1, 2)
                terms["rcc"] = L.rcc_loss(tokens, vfm_region, tau=cfg.rcc_tau) * share

        q = L.resize_tokens(out.q.float(), out.grid, vfm_grid)
        k = L.resize_tokens(out.k.float(), out.grid, vfm_grid) if self.head_mode == "csa" else None
        s_student = L.student_context_affinity(q, k)
        if cfg.context_loss == "l2":
            terms["context"] = L.context_loss_l2(s_teacher, s_student)
        else:
            terms["context"] = L.context_loss_kl(s_teacher, s_student, tau=cfg.context_tau)
        return terms

    def _teacher(self, kind: str, batch: dict, run, key: str) -> torch.Tensor:
        """``run(batch[key])``, through the on-disk cache of ``kind`` when there is one."""
        cache = self.caches.get(kind)
        if cache is None:
            return run(batch[key])
        names = [self.name_of(int(i)) for i in batch["index"]]
        return cache.batch(names, lambda pos: run(batch[key][pos]))

    @property
    def head_mode(self) -> str:
        return self.cfg.mode
