"""``ovdense train fvit``: CLIPSelf's F-ViT recipe on ovdense's trainer (resume, DDP, progress, logs, validation).

What a step computes (mmdet 2.28.1's two-stage detector as F-ViT configures it): the frozen tower's taps (no grad,
eval mode) -> simple pyramid -> FPN -> RPN losses (MaxIoU 0.7/0.3, 256 anchors, half positive; sigmoid CE + L1)
-> proposals as at test (per level top 2000, NMS 0.7, 1000 kept; detached) -> the ground-truth boxes prepended ->
MaxIoU 0.5, 512 RoIs, a quarter positive -> RoIAlign 7x7 -> box head -> cosine logits against the training
classes' text embeddings (background last) -> CE with class weights (novel 0: masked out of the softmax; background
0.6) + L1 on class-agnostic deltas. Only base-class boxes are in the data (:mod:`ovdense.detection.data`).
OV-LVIS (``--benchmark ov-lvis``) adds the mask branch: the sampled positives' RoIs -> RoIAlign 14x14 on P2-P5 ->
the FCN mask head -> per-pixel BCE against 28x28 targets cut from the instance masks (``loss_mask``, weight 1);
its RCNN assigner matches low-quality boxes, its class weights zero the 337 rare classes (background 0.9), and it
runs 48 epochs with the learning rate /10 after epochs 32 and 44.

The optimiser and schedule: AdamW (betas 0.9/0.999, weight decay on every parameter), the learning rate given for a
batch of 64 scaled by the real global batch (mmdet's ``auto_scale_lr``), linear warm-up from 0.001x over the first
steps, constant after (OV-COCO), gradient L2 norm clipped to 1.0; fp16 autocast with a dynamic loss scale starting
at 512 on CUDA (mmcv's ``Fp16OptimizerHook`` with ``loss_scale=512.`` on torch >= 1.6 keeps updating its scaler).
BatchNorm layers train on batch statistics, synchronised across processes under torchrun (SyncBN, as the authors).

Randomness that decides the samples (crops, flips, which anchors and RoIs are sampled) is a function of the seed,
the epoch and the image's index, so a resumed run, or one with another number of processes, draws the same.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from torch import nn

from ..errors import OvdenseError
from ..fileio import check_output_dir, write_atomic_durable
from ..precision import amp_dtype
from .state import CURRENT_FILE, STATE_DIR
from .trainer import Trainer

__all__ = ["FViTObjective", "FViTTrainModule", "FViTTrainer", "fvit_lr"]

#: The authors' batch the learning rate is given for (``auto_scale_lr.base_batch_size``).
BASE_BATCH = 64
WARMUP_RATIO = 0.001
#: Epochs (0-based counts) after which the learning rate drops by 10x (OV-COCO: never within 3 epochs).
LR_STEPS = {"ov-coco": (100,), "ov-lvis": (32, 44)}
#: ``--data`` per benchmark: the train annotation file under ``annotations/``, the folder image paths are relative
#: to (LVIS: the root, images named by ``coco_url`` as ``train2017/...`` or ``val2017/...``), the folder's name.
TRAIN_LAYOUT = {
    "ov-coco": ("instances_train2017.json", "train2017", "COCO 2017"),
    "ov-lvis": ("lvis_v1_train.json", ".", "LVIS v1 (annotations/ beside COCO's train2017/ and val2017/)"),
}


def fvit_lr(step: int, epoch: int, base_lr: float, warmup: int, steps: tuple[int, ...], gamma: float = 0.1) -> float:
    """mmdet's ``step`` policy with linear warm-up: ``base * gamma^(epochs passed of steps)``, and during the first
    ``warmup`` iterations ``regular * (1 - (1 - step / warmup) * (1 - 0.001))``."""
    regular = base_lr * gamma ** sum(epoch >= s for s in steps)
    if step >= warmup or warmup == 0:
        return regular
    k = (1 - step / warmup) * (1 - WARMUP_RATIO)
    return regular * (1 - k)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 31-bit seed for one image's target sampling in one epoch."""
    return zlib.crc32(f"fvit-targets/{seed}/{epoch}/{index}".encode()) & 0x7FFFFFFF


class FViTTrainModule(nn.Module):
    """The F-ViT and its training losses: ``forward(batch)`` -> the four loss terms, and ``loss_mask`` when the model
    has a mask head (OV-LVIS; the batch then carries ``masks``) (see the module docstring).

    Args:
        fvit: the :class:`~ovdense.detection.fvit.FViT` (tower frozen).
        class_weight: (C+1,) CE weights of the training classes, background last.
        match_low_quality: the RCNN assigner's low-quality matching (off for OV-COCO, on for OV-LVIS).
    """

    def __init__(self, fvit, class_weight: torch.Tensor, match_low_quality: bool = False):
        super().__init__()
        self.fvit = fvit
        self.register_buffer("class_weight", class_weight.float())
        self.match_low_quality = match_low_quality

    def train(self, mode: bool = True):
        super().train(mode)
        self.fvit.train(mode)  # keeps the tower in eval mode
        return self

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        from ..detection.fvit import ImageFeatures
        from ..detection.postprocess import flatten_level, rpn_proposals
        from ..detection.roi import multilevel_roi_align
        from ..detection.targets import rcnn_loss, rcnn_targets, rpn_targets_and_loss
        from .objectives import regions_share

        fvit = self.fvit
        images = batch["images"]
        device = images.device
        shapes = [tuple(int(v) for v in s) for s in batch["image_shapes"]]
        gt_boxes = [b.to(device) for b in batch["boxes"]]
        gt_labels = [lab.to(device) for lab in batch["labels"]]
        generators = [torch.Generator().manual_seed(int(s)) for s in batch["sample_seed"]]

        maps = fvit.tower_maps(images, with_clip_map=False)[0]
        levels = fvit.pyramid([m.detach() for m in maps])
        fpn = list(fvit.fpn({str(i): level for i, level in enumerate(levels)}).values())
        features = ImageFeatures(fpn, None, shapes)
        logits, deltas = fvit.rpn(fpn)
        sizes = [tuple(level.shape[-2:]) for level in fpn]
        anchors = fvit.anchors.grid_anchors(sizes, device=device, dtype=torch.float32)
        flat = [[flatten_level(s[b], d[b]) for s, d in zip(logits, deltas, strict=True)] for b in range(len(shapes))]
        rpn_terms = rpn_targets_and_loss(
            torch.cat(anchors),
            [torch.cat([f[0] for f in per_image]) for per_image in flat],
            [torch.cat([f[1] for f in per_image]) for per_image in flat],
            gt_boxes,
            fvit.rpn_coder,
            generators,
        )
        cfg = fvit.config
        with torch.no_grad():
            proposals = [
                rpn_proposals(
                    [f[0].detach().float() for f in per_image],
                    [f[1].detach().float() for f in per_image],
                    anchors,
                    shape,
                    fvit.rpn_coder,
                    nms_pre=cfg.rpn_pre_nms,
                    max_per_img=cfg.rpn_post_nms,
                    iou_threshold=cfg.rpn_iou,
                )[:, :4]
                for per_image, shape in zip(flat, shapes, strict=True)
            ]
        targets = rcnn_targets(
            proposals,
            gt_boxes,
            gt_labels,
            cfg.num_train_classes,
            fvit.box_coder,
            generators,
            match_low_quality=self.match_low_quality,
        )
        roi_features = multilevel_roi_align(features.levels[:4], fvit.strides[:4], targets.rois, 7)
        det_embeddings, box_deltas = fvit.box_head(roi_features)
        cls_logits = det_embeddings @ fvit.train_embeddings.to(det_embeddings) * fvit.box_head.temperature
        rcnn_terms = rcnn_loss(cls_logits, box_deltas, targets, self.class_weight)
        # mmdet averages over each process's own samples; scaled so that the gradient DDP averages is the mean over
        # the global batch's samples, as one process would compute it (ours; 1 on a single process).
        rpn_share = regions_share(float(rpn_terms.pop("rpn_samples")))
        rcnn_share = regions_share(int(targets.rois.shape[0]))
        out = {
            "loss_rpn_cls": rpn_terms["loss_rpn_cls"] * rpn_share,
            "loss_rpn_bbox": rpn_terms["loss_rpn_bbox"] * rpn_share,
            "loss_cls": rcnn_terms["loss_cls"] * rcnn_share,
            "loss_bbox": rcnn_terms["loss_bbox"] * rcnn_share,
            "acc": rcnn_terms["acc"].detach(),
        }
        if fvit.mask_head is not None:
            out["loss_mask"] = self._mask_loss(features, targets, batch["masks"])
        return out

    def _mask_loss(self, features, targets, masks) -> torch.Tensor:
        """mmdet ``StandardRoIHead._mask_forward_train`` (no shared RoI extractor): the positives' RoIs (``pos_rois``,
        images in order) -> RoIAlign 14x14 on P2-P5 -> mask head -> BCE against :func:`rcnn_mask_targets` (28x28)
        averaged over the positives' pixels; scaled like the RCNN terms by this process's share of the positives
        (every process runs the head, also on 0 RoIs, so that DDP and SyncBN see the same modules)."""
        from ..detection.roi import multilevel_roi_align
        from ..detection.targets import mask_loss, rcnn_mask_targets
        from .objectives import regions_share

        fvit = self.fvit
        pos_rois = targets.pos_rois
        device = pos_rois.device
        mask_features = multilevel_roi_align(features.levels[:4], fvit.strides[:4], pos_rois, 14)
        logits = fvit.mask_head(mask_features)
        with torch.no_grad():
            mask_targets = rcnn_mask_targets(targets, [m.to(device) for m in masks], size=logits.shape[-1])
        return mask_loss(logits, mask_targets) * regions_share(int(pos_rois.shape[0]))


class FViTObjective:
    """The trainer's view of F-ViT: the terms come out of the module's forward; every weight is 1 (mmdet's)."""

    name = "fvit"
    exports = "fvit"
    #: ``acc`` (the RCNN's accuracy in %, detached) is logged beside the losses and weighs nothing; ``loss_mask``
    #: (OV-LVIS) weighs 1 (``CrossEntropyLoss(use_mask=True, loss_weight=1.0)``).
    weights = {
        "loss_rpn_cls": 1.0,
        "loss_rpn_bbox": 1.0,
        "loss_cls": 1.0,
        "loss_bbox": 1.0,
        "loss_mask": 1.0,
        "acc": 0.0,
    }

    def __call__(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        return out  # the weighted total reads the four losses; ``acc`` (RCNN accuracy, %) is logged only


class FViTTrainer(Trainer):
    """:class:`~ovdense.train.trainer.Trainer` for the F-ViT detector: its data, model, optimiser and schedule;
    checkpoints are detectors (``checkpoints/epoch_N.safetensors``, loadable by ``Detector.from_pretrained``)."""

    grad_clip = 1.0

    def _setup(self) -> None:
        from ..detection.benchmarks import fvit_config
        from ..detection.data import DetectionTrainSet
        from ..detection.fvit import FViT
        from ..detection.targets import class_weights_ov_coco, class_weights_ov_lvis

        cfg = self.cfg
        lvis = cfg.benchmark == "ov-lvis"
        if cfg.benchmark not in TRAIN_LAYOUT:
            raise OvdenseError(f"train fvit --benchmark {cfg.benchmark}: choose one of {', '.join(TRAIN_LAYOUT)}")
        if lvis and cfg.val_data and not (Path(cfg.val_data) / "annotations" / "lvis_v1_val.json").is_file():
            raise OvdenseError(f"--val-data: {Path(cfg.val_data) / 'annotations' / 'lvis_v1_val.json'} not found")
        if not str(cfg.out):
            raise OvdenseError("no output folder given: pass --out RUN_DIR")
        self.out = Path(cfg.out)
        check_output_dir(self.out)
        if not cfg.resume and (self.out / STATE_DIR / CURRENT_FILE).is_file():
            raise OvdenseError(
                f"{self.out} holds a run that can be continued: pass --resume {self.out}, or write to another --out"
            )
        root = Path(cfg.data)
        ann_name, image_folder, what = TRAIN_LAYOUT[cfg.benchmark]
        ann = root / "annotations" / ann_name
        image_dir = root / image_folder
        if not ann.is_file():
            raise OvdenseError(f"annotation file not found: {ann} (--data is the {what} folder)")
        if not image_dir.is_dir():
            raise OvdenseError(f"image folder not found: {image_dir}")
        if cfg.class_embeddings is not None and not Path(cfg.class_embeddings).is_file():
            raise OvdenseError(f"--class-embeddings: file not found: {cfg.class_embeddings}")
        self.join_and_load()
        tower = self.loaded.tower
        overrides = {} if cfg.image_size is None else {"image_size": cfg.image_size}
        config = fvit_config(cfg.benchmark, tower, **overrides)
        self.dataset = DetectionTrainSet(ann, image_dir, cfg.benchmark, config.image_size, seed=cfg.seed)
        names = list(self.dataset.categories.names)
        base = {n for n, novel in zip(names, self.dataset.categories.novel, strict=True) if not novel}
        self.fvit = FViT(tower, config).to(self.device)
        self.fvit.train_embeddings.copy_(self._class_embeddings(names))
        self.fvit.box_head.fc_cls.requires_grad_(False)  # never used by F-ViT (the authors: find_unused_parameters)
        if lvis:  # CLIPSelf: [image_count > 0] of lvis_v1_train_cat_norare_info.json (rare: 0), background 0.9
            weights = class_weights_ov_lvis(self.dataset.image_counts, background=0.9)
        else:
            weights = class_weights_ov_coco(names, base)
        module = FViTTrainModule(self.fvit, weights, match_low_quality=lvis).to(self.device)
        if self.dist.world_size > 1:
            from .sync_batchnorm import convert_sync_batchnorm

            module = convert_sync_batchnorm(module, self.device)
        self.student = module
        self.trained = module
        self.trainable = [n for n, p in module.named_parameters() if p.requires_grad]
        self.objective = FViTObjective()
        self.plan_steps()
        global_batch = cfg.batch_size * cfg.accum_steps * self.dist.world_size
        self.base_lr = cfg.lr * global_batch / BASE_BATCH
        betas, eps = cfg.adam_betas_eps()
        params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.base_lr, betas=betas, eps=eps, weight_decay=cfg.weight_decay)
        fp16 = amp_dtype(cfg.precision, self.device) == torch.float16
        self.scaler = torch.amp.GradScaler("cuda", init_scale=512.0) if fp16 else None
        self.ddp = None
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.skipped = 0
        self._saved_at = None
        if cfg.resume:
            self._resume(Path(cfg.resume))

    def _class_embeddings(self, names: list[str]) -> torch.Tensor:
        from ..detection.text import fvit_class_embeddings, read_class_embeddings, select_class_embeddings

        width = self.fvit.config.fc_dim
        if self.cfg.class_embeddings is not None:
            table = read_class_embeddings(self.cfg.class_embeddings)
            return select_class_embeddings(table, names, width, str(self.cfg.class_embeddings)).to(self.device)
        return fvit_class_embeddings(self.loaded.model, self.loaded.tokenizer, names, device=self.device)

    # -- hooks of the shared loop ------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        epoch = step // max(self.steps_per_epoch, 1)
        return fvit_lr(step, epoch, self.base_lr, self.cfg.warmup_steps, LR_STEPS[self.cfg.benchmark])

    def forward_batch(self, forward, batch: dict):
        batch = dict(batch)
        batch["sample_seed"] = [sample_seed(self.cfg.seed, self.epoch, int(i)) for i in batch["index"]]
        return forward(batch)

    def logged_values(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global batch's terms: each process's terms are its share of the global mean (see the train module),
        so their mean over the processes is what one process with the whole batch would log."""
        if self.dist.world_size == 1:
            return values
        from ..distributed import sum_over_processes

        names = list(values)
        stacked = sum_over_processes(torch.stack([values[n].float().cpu() for n in names])) / self.dist.world_size
        return dict(zip(names, stacked, strict=True))

    def state_buffers(self) -> dict[str, torch.Tensor]:
        """BatchNorm statistics of the pyramid, FPN and heads (the tower's are frozen)."""
        kinds = ("running_mean", "running_var", "num_batches_tracked")
        return {
            n: b for n, b in self.trained.named_buffers() if not n.startswith("fvit.tower.") and n.endswith(kinds)
        }

    def ensembled_state(self) -> dict[str, torch.Tensor]:
        return {}

    def save_checkpoint(self, epoch: int, state=None) -> Path:
        """The detector after ``epoch``: ovdense F-ViT safetensors, written whole or not at all."""
        from safetensors.torch import save

        from ..detection.checkpoint import FORMAT, head_state, visual_state

        path = self.out / "checkpoints" / f"epoch_{epoch}.safetensors"
        self._checkpoint_folder(path)
        state = {**head_state(self.fvit), **visual_state(self.fvit)}
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}

        metadata = {
            "format": FORMAT,
            "model": self.cfg.model,
            "config": json.dumps(self.fvit.config.to_dict()),
            "benchmark": json.dumps(self.cfg.benchmark),
            "epoch": json.dumps(epoch),
        }
        data = save(tensors, metadata=metadata)
        write_atomic_durable(path, lambda f: f.write(data))
        return path

    def _validate(self, state, epoch: int, logger) -> None:
        """AP on ``val_data`` with the current detector: OV-COCO AP50 novel / base / all (a COCO 2017 folder), or
        OV-LVIS mask AP, AP_r, AP_c, AP_f (a folder with ``annotations/lvis_v1_val.json`` and ``val2017/``)."""
        from ..detection.detector import Detector
        from ..eval.detection_runner import evaluate_detector

        if self.dist.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        root = Path(self.cfg.val_data)
        if self.cfg.benchmark == "ov-lvis":
            from ..eval.lvis import load_lvis_annotations

            gt, categories = load_lvis_annotations(root / "annotations" / "lvis_v1_val.json")
        else:
            from ..eval.detection import load_coco_annotations

            gt, categories = load_coco_annotations(root / "annotations" / "instances_val2017.json", "ov-coco")
        # The classes' embeddings are the ones the detector trains with: no text pass per validation.
        columns = self.fvit.train_embeddings.detach().cpu().T
        table = dict(zip([*categories.names, "background"], columns, strict=True))
        settings = {"model": self.cfg.model, "class_embeddings": "the training classes'", **self.fvit.config.to_dict()}
        detector = Detector(self.fvit, self.loaded, self.cfg.benchmark, self.device, settings, class_table=table)
        try:
            metrics, _ = evaluate_detector(
                detector, gt, categories, root / "val2017", limit=self.cfg.val_limit, num_workers=0, progress=False,
                box_ap=False,
            )  # fmt: skip
        finally:
            self.student.train()
        if self.cfg.benchmark == "ov-lvis":
            values = {f"val/mask_{k}": metrics.summary[k] for k in ("AP", "APr", "APc", "APf")}
        else:
            values = {k: getattr(metrics, k.split("/")[1]) for k in ("val/novel_ap50", "val/base_ap50", "val/all_ap50")}
        logger.log_values(self.step, epoch, values)
