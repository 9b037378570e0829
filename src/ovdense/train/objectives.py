"""Training objectives: what a step computes from a batch, the student's pass and the teachers.

An objective declares the extra inputs it needs from the data (VFM proxy, Stable Diffusion input), and maps
``(batch, student output)`` to named loss terms; the trainer weights, sums and optimises them. DeCLIP is the
first objective; SCD plugs in the same way.
"""

from __future__ import annotations

import torch
from torchvision.ops import roi_align

from ..distributed import sum_over_processes
from ..heads import PassInputs
from ..methods import create_head
from . import losses as L
from .config import CHOICES, TrainConfig
from .data import boxes_in_grid_units
from .refiner import Refiner, load_refiner, refined_dense_map, refiner_loss, resized_crop_hw
from .student import StudentOutput

__all__ = [
    "OBJECTIVES",
    "DeclipObjective",
    "RefinerObjective",
    "ScdObjective",
    "build_objective",
    "regions_share",
]


def regions_share(local: int) -> float:
    """``world_size * local / global`` region count: scales a per-process mean over regions so that the
    gradient DDP averages equals the mean over all regions of the global batch (ours; the reference
    averages per-GPU means, which weights images by how many grid cells they drew)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1.0
    total = float(sum_over_processes(torch.tensor([float(local)]))[0])
    return dist.get_world_size() * local / total if total > 0 else 0.0


class DeclipObjective:
    """DeCLIP's decoupled distillation: content (CLIP crop [CLS] by RoIAlign) + context (VFM affinities).

    Args:
        cfg: the run's configuration (loss forms, temperatures, weights, N for RoI tokens).
        clip_teacher: a :class:`~ovdense.train.teachers.ClipTeacher` (frozen initial weights).
        vfm: a :class:`~ovdense.vfm.Vfm` (its :meth:`~ovdense.vfm.Vfm.features` are the context teacher).
        sd: a :class:`~ovdense.train.teachers.SdTeacher` for the SD-guided affinity, or None.
        caches: optional ``{"vfm": TeacherCache, "sd": TeacherCache}`` (see :mod:`ovdense.train.cache`), keyed
            by the batch's ``sha256`` (B x 32 uint8 digests of the images' bytes).
        name_of: maps a dataset index to the image's name, for the cache's warnings (optional).
    """

    name = "declip"
    #: What a checkpoint holds: the (ensembled) CLIP.
    exports = "clip"

    @classmethod
    def create(cls, cfg: TrainConfig, loaded, clip_teacher, device, source, grid: int) -> DeclipObjective:
        """Load the teachers, freeze the student and build its forward (the trainer's setup)."""
        from ..heads.declip import DeclipHead
        from ..presets import get_preset
        from ..vfm import load_vfm
        from .student import StudentForward, freeze_for_distillation
        from .teachers import load_sd

        vfm = load_vfm(cfg.vfm, checkpoint=cfg.vfm_checkpoint, device=device)
        sd = None
        if cfg.sd:
            sd = load_sd(cfg.sd_model, device=device, timestep=cfg.sd_timestep, layers=cfg.sd_layers, seed=cfg.seed)
        caches = _teacher_caches(cfg, vfm, sd, grid) if cfg.teacher_cache else None
        self = cls(cfg, clip_teacher, vfm, sd, caches, source.name)
        self.trainable = freeze_for_distillation(loaded.model, loaded.tower, cfg.mode, cfg.unlocked_blocks)
        self.trained = loaded.model
        self.student = StudentForward(loaded.model, loaded.tower, DeclipHead(cfg.mode), get_preset("declip").pos_rule)
        return self

    def validation_method(self) -> tuple[str, dict]:
        """The method (and its options) that reads the trained CLIP for validation: DeCLIP's head, this mode."""
        return "declip", {"mode": self.cfg.mode}

    def __init__(self, cfg: TrainConfig, clip_teacher, vfm, sd=None, caches: dict | None = None, name_of=None):
        if cfg.context_loss not in CHOICES["context_loss"]:
            raise ValueError(f"unknown context loss {cfg.context_loss!r}; expected l2 or kl")
        if cfg.content_loss not in CHOICES["content_loss"]:
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
        share = regions_share(int(valid.sum()))
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
        k = L.resize_tokens(out.k.float(), out.grid, vfm_grid) if cfg.mode == "csa" else None
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
        # Keyed by content: the same file name in another folder may hold another picture.
        keys = [bytes(d.tolist()).hex() for d in batch["sha256"].cpu()]
        labels = [self.name_of(int(i)) for i in batch["index"]] if self.name_of is not None else None
        return cache.batch(keys, lambda pos: run(batch[key][pos]), labels=labels)


def _teacher_caches(cfg: TrainConfig, vfm, sd, grid: int) -> dict:
    """One on-disk cache per teacher, namespaced by its weights, input size and settings."""
    from .cache import TeacherCache, module_digest

    vfm_key = module_digest(vfm.model, f"vfm|{vfm.proxy_size(grid)}")[:20]
    caches = {"vfm": TeacherCache(cfg.teacher_cache, f"vfm-{vfm_key}")}
    if sd is not None:
        settings = (cfg.sd_model, cfg.sd_size, cfg.sd_timestep, cfg.sd_layers, cfg.seed, vfm.proxy_size(grid))
        extra = "sd|" + "|".join(map(str, settings))
        sd_key = module_digest(torch.nn.ModuleList([sd.unet, sd.vae]), extra)[:20]
        caches["sd"] = TeacherCache(cfg.teacher_cache, f"sd-{sd_key}")
    return caches


class ScdObjective:
    """SCD: region-language alignment (CLIPSelf) that keeps CLIP's spatial correlations.

    Ours where unpublished: docs/design.md "SCD and the Refiner (ours)".

    - RLA: the student's value-path (``maskclip``) dense map, 1x1 RoIAlign on each grid cell, aligned to the
      frozen teacher's crop [CLS] by 1 − cos (the same grid crops as DeCLIP's content loss).
    - SCD (ours): :func:`~ovdense.train.losses.scd_loss` between the student's L2-normalised dense
      tokens and a target: the frozen CLIP's value-path tokens (SC-RLA) or, with ``--refiner``, the Refiner's
      tokens on the frozen CLIP (R-SC-RLA). ``--no-scd`` trains plain RLA; ``--no-refiner`` ignores
      ``--refiner``.
    - Freezing as DeCLIP's, except that the last block's FFN trains: the value-path head uses it (ours).

    Args:
        cfg: the run's configuration.
        clip_teacher: the frozen initial CLIP (crop teacher; its tower gives the SCD target).
        refiner: a trained :class:`~ovdense.train.refiner.Refiner`, or None.
    """

    name = "scd"
    exports = "clip"
    pos_rule = "size"

    @classmethod
    def create(cls, cfg: TrainConfig, loaded, clip_teacher, device, source, grid: int) -> ScdObjective:
        from .student import StudentForward, freeze_for_distillation

        refiner = None
        if cfg.refiner and not cfg.no_refiner and not cfg.no_scd:
            refiner = load_refiner(cfg.refiner, tower=loaded.tower, model_name=cfg.model, device=device)
        self = cls(cfg, clip_teacher, refiner)
        self.trainable = freeze_for_distillation(
            loaded.model, loaded.tower, "csa", cfg.unlocked_blocks, freeze_ffn=False
        )
        self.trained = loaded.model
        self.student = StudentForward(loaded.model, loaded.tower, create_head("maskclip"), self.pos_rule)
        return self

    def __init__(self, cfg: TrainConfig, clip_teacher, refiner=None):
        from ..backbones import tower_for

        self.cfg = cfg
        self.clip_teacher = clip_teacher
        self.refiner = refiner
        self.teacher_tower = tower_for(clip_teacher.model)
        self.target_head = create_head("maskclip")

    @property
    def weights(self) -> dict[str, float]:
        w = {"rla": 1.0}
        if not self.cfg.no_scd:
            w["scd"] = self.cfg.scd_weight
        return w

    def data_inputs(self, grid: int) -> dict:
        return {}

    def validation_method(self) -> tuple[str, dict]:
        """CLIPSelf's dense head, the value path, reads the SCD student."""
        return "maskclip", {}

    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """B x N x D L2-normalised SCD target: the frozen CLIP's value-path tokens, or the Refiner's."""
        with torch.no_grad():
            if self.refiner is not None:
                dense = refined_dense_map(self.refiner, self.teacher_tower, images, self.pos_rule, normalize=True)
            else:
                dense = self.target_head.encode_dense(
                    self.teacher_tower, images, PassInputs(self.pos_rule), normalize=True
                )
        return dense.flatten(2).transpose(1, 2).float()

    def __call__(self, batch: dict, out: StudentOutput) -> dict[str, torch.Tensor]:
        """``{"rla": ..., "scd": ...}`` for a batch (see :class:`DeclipObjective` for the batch keys)."""
        valid = batch["box_valid"]
        rois = boxes_in_grid_units(batch["boxes"].float(), valid, out.grid)
        share = regions_share(int(valid.sum()))
        with torch.no_grad():
            teacher_cls = self.clip_teacher.crop_embeddings(batch["crops"][valid])
        content = out.content.float()
        student_roi = roi_align(content, rois, (1, 1), 1.0, -1, True)[:, :, 0, 0]
        terms = {"rla": L.content_loss_roi(student_roi, teacher_cls) * share}
        if not self.cfg.no_scd:
            tokens = content.flatten(2).transpose(1, 2)
            terms["scd"] = L.scd_loss(tokens, self.target_tokens(batch["image"]), tau=self.cfg.scd_tau)
        return terms


class RefinerObjective:
    """The Refiner's own stage (ours, docs/design.md "SCD and the Refiner (ours)").

    The frozen CLIP stays as it is; a light transformer on its value-path tokens learns to make the full image's
    tokens match the frozen CLIP's tokens of zoomed-in crops at the same places
    (:func:`~ovdense.train.refiner.zoomed_targets`, InfoNCE over tokens)."""

    name = "refiner"
    exports = "refiner"
    pos_rule = "size"

    @classmethod
    def create(cls, cfg: TrainConfig, loaded, clip_teacher, device, source, grid: int) -> RefinerObjective:
        loaded.model.requires_grad_(False)
        refiner = Refiner(loaded.tower.width, loaded.tower.num_heads, depth=cfg.refiner_depth).to(device)
        self = cls(cfg, loaded.tower, refiner)
        self.trained = refiner
        self.trainable = [n for n, p in refiner.named_parameters() if p.requires_grad]
        self.student = _RefinerForward(refiner, loaded.tower, self.pos_rule)
        return self

    def __init__(self, cfg: TrainConfig, tower, refiner: Refiner | None = None):
        self.cfg = cfg
        self.tower = tower
        self.refiner = refiner

    @property
    def weights(self) -> dict[str, float]:
        return {"refiner": 1.0}

    def data_inputs(self, grid: int) -> dict:
        return {}

    def validation_method(self) -> tuple[str, dict]:  # pragma: no cover - the refiner stage has no CLIP to validate
        raise NotImplementedError

    def __call__(self, batch: dict, out: StudentOutput) -> dict[str, torch.Tensor]:
        """``{"refiner": ...}``: :func:`~ovdense.train.refiner.refiner_loss` on the student pass's refined map
        (``out.content``, which went through DDP), scaled by this process's share of the global batch's regions."""
        valid = batch["box_valid"]
        share = regions_share(int(valid.sum()))
        crop_size = self.tower.preprocess.image_size[0]
        crop_hw = resized_crop_hw(batch["pixel_boxes"][valid].cpu(), crop_size).to(out.content.device)
        loss = refiner_loss(
            self.refiner, self.tower, batch["image"], batch["boxes"], valid, batch["crops"], crop_hw,
            n=self.cfg.refiner_tokens, tau=self.cfg.refiner_tau, pos_rule=self.pos_rule, share=share, dense=out.content,
        )  # fmt: skip
        return {"refiner": loss}


class _RefinerForward(torch.nn.Module):
    """The Refiner's pass for DDP: frozen tokens -> Refiner -> projection, as a normalised dense map."""

    def __init__(self, refiner, tower, pos_rule: str):
        super().__init__()
        self.refiner = refiner
        object.__setattr__(self, "tower", tower)  # frozen and not trained: not a submodule
        self.pos_rule = pos_rule

    def forward(self, images: torch.Tensor) -> StudentOutput:
        dense = refined_dense_map(self.refiner, self.tower, images, self.pos_rule, normalize=True)
        return StudentOutput(content=dense, q=None, k=None, grid=tuple(dense.shape[-2:]))


OBJECTIVES = {"declip": DeclipObjective, "scd": ScdObjective, "refiner": RefinerObjective}


def build_objective(cfg: TrainConfig, loaded, clip_teacher, device, source, grid: int):
    """The objective ``cfg.objective`` with its teachers loaded, the model frozen and its student forward."""
    return OBJECTIVES[cfg.objective].create(cfg, loaded, clip_teacher, device, source, grid)
