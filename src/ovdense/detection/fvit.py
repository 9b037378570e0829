"""F-ViT (CLIPSelf, Wu et al. 2024): a Faster R-CNN on a frozen CLIP image tower, built from torchvision parts.

What runs, in order (CLIPSelf ``F-ViT/models/evaclip_vit.py``, ``fvit_head.py``, ``fvit.py`` on mmdet 2.28.1):

1. the frozen tower (no grad, always eval mode) with its blocks tapped after the configured indices; the last block
   runs on its **value path** (``y = x + attn_out(v)``, ``z = y + ffn(y)``), which feeds both the coarsest pyramid
   level and the dense CLIP map ``normalize(project(z))``;
2. a simple pyramid (ConvT-BN-GELU-ConvT / ConvT / identity / max-pool) at strides p/4, p/2, p, 2p (3.5 ... 28 for
   /14 towers), torchvision's FPN with BatchNorm and a max-pooled P6;
3. an RPN (two 3x3 convs), proposals per mmdet's rules (:mod:`.postprocess`);
4. RoIAlign 7x7 on P2-P5 by mmdet's level rule, four conv-BN-ReLU, two FCs, a class branch ending in a ReLU and an
   L2 norm, a cosine classifier against the class text embeddings (background last) with a learned temperature,
   class-agnostic box deltas;
5. at test, the F-VLM ensemble with the CLIP map pooled 1x1 on the same proposals:
   ``s = p_det^(1-a) p_vlm^a`` on base classes and background, ``p_det^(1-b) p_vlm^b`` on novel ones.

The tower is any ovdense :class:`~ovdense.backbones.base.DenseTower` (EVA02 as the authors, open_clip ViTs too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..backbones.base import DenseTower, Taps
from .anchors import AnchorGenerator
from .box_coder import DeltaXYWHCoder
from .postprocess import flatten_level, multiclass_nms, rpn_proposals
from .roi import multilevel_roi_align, roi_align_single

#: F-ViT's pixel normalisation: ImageNet's constants on 0-255 RGB, although the tower is a CLIP (quirk 1).
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

CLIP_HEADS = ("value", "declip")


@dataclass(frozen=True)
class FViTConfig:
    """Everything that shapes an F-ViT besides the tower's own architecture.

    Attributes:
        image_size: S; test images are resized so the long side is S and padded to S x S.
        taps: 0-based indices of the blocks whose outputs feed pyramid levels 0-3; the last one must be the last
            block (run on its value path).
        fpn_channels: FPN width.
        fc_dim: the box head's FC width, equal to the CLIP embedding width (the classifier's input).
        num_train_classes: classes of the training set; sizes the dead ``fc_cls`` layer the checkpoints carry.
        rpn_norm: BatchNorm in the RPN convs (OV-LVIS's ``CustomRPNHead``).
        with_mask: the class-agnostic FCN mask head (OV-LVIS).
        vlm_temperature, alpha, beta: the ensemble's T_vlm, base/background and novel exponents.
        ensemble_all_classes: the transfer heads' rule: alpha on every class (beta unused).
        fixed_temperature: 0 learns ``detect_temperature`` (init 50); otherwise the transfer heads' fixed T_det.
        rpn_pre_nms, rpn_post_nms, rpn_iou: proposal selection per level / per image / NMS IoU.
        score_threshold, nms_iou, max_detections: the RCNN test rule.
        clip_head: how the CLIP region features are computed: ``value`` (F-ViT's value path, as the released
            F-ViT) or ``declip`` (DeCLIP's q-q attention with no residual and no FFN; ours, see the README).
        declip_mode: DeCLIP's attention for ``clip_head="declip"``: ``qq`` or ``csa``.
    """

    image_size: int = 640
    taps: tuple[int, ...] = (3, 5, 7, 11)
    fpn_channels: int = 256
    fc_dim: int = 512
    num_train_classes: int = 65
    rpn_norm: bool = False
    with_mask: bool = False
    vlm_temperature: float = 75.0
    alpha: float = 0.1
    beta: float = 0.8
    ensemble_all_classes: bool = False
    fixed_temperature: float = 0.0
    rpn_pre_nms: int = 2000
    rpn_post_nms: int = 1000
    rpn_iou: float = 0.7
    score_threshold: float = 0.01
    nms_iou: float = 0.4
    max_detections: int = 100
    clip_head: str = "value"
    declip_mode: str = "qq"

    def __post_init__(self):
        if len(self.taps) != 4:
            raise ValueError(f"F-ViT taps four blocks; got {self.taps}")
        if self.clip_head not in CLIP_HEADS:
            raise ValueError(f"unknown clip_head {self.clip_head!r}; expected one of {CLIP_HEADS}")

    def to_dict(self) -> dict:
        out = asdict(self)
        out["taps"] = list(self.taps)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> FViTConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown F-ViT settings {unknown}")
        data = dict(data)
        if "taps" in data:
            data["taps"] = tuple(data["taps"])
        return cls(**data)

    def with_(self, **changes) -> FViTConfig:
        return replace(self, **changes)


def conv_bn_relu(cin: int, cout: int, norm: bool, relu: bool = True) -> nn.Sequential:
    """mmcv ConvModule(3x3, padding 1): the conv has a bias only without a norm (its ``bias="auto"``)."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not norm)]
    if norm:
        layers.append(nn.BatchNorm2d(cout))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SimplePyramid(nn.Module):
    """Four tapped ViT maps (each B x C x h x w) -> strides p/4, p/2, p, 2p (``interpolate1-4`` of F-ViT)."""

    def __init__(self, width: int):
        super().__init__()
        self.level0 = nn.Sequential(
            nn.ConvTranspose2d(width, width, 2, stride=2),
            nn.BatchNorm2d(width),
            nn.GELU(),
            nn.ConvTranspose2d(width, width, 2, stride=2),
        )
        self.level1 = nn.Sequential(nn.ConvTranspose2d(width, width, 2, stride=2))
        self.level3 = nn.MaxPool2d(2, stride=2)

    def forward(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.level0(maps[0]), self.level1(maps[1]), maps[2], self.level3(maps[3])]


class RPNHead(nn.Module):
    """Two 3x3 convs (+BN on OV-LVIS) with ReLU, then per-anchor objectness (A) and deltas (4A), shared by levels."""

    def __init__(self, channels: int, num_anchors: int, norm: bool):
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(channels, channels, norm), conv_bn_relu(channels, channels, norm))
        self.cls = nn.Conv2d(channels, num_anchors, 1)
        self.reg = nn.Conv2d(channels, 4 * num_anchors, 1)

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per level: objectness logits B x A x H x W and deltas B x 4A x H x W."""
        scores, deltas = [], []
        for x in levels:
            x = self.convs(x)
            scores.append(self.cls(x))
            deltas.append(self.reg(x))
        return scores, deltas


class BoxHead(nn.Module):
    """F-ViT's ``FViTBBoxHead``: 4 conv-BN-ReLU, 2 FC-ReLU, a class branch (FC-ReLU -> L2 norm) scored by cosine
    against the class embeddings times a learned temperature, and class-agnostic deltas.

    ``fc_cls`` is built because the checkpoints carry it; F-ViT never calls it.
    """

    def __init__(self, channels: int, fc_dim: int, num_train_classes: int, fixed_temperature: float, roi_size: int = 7):
        super().__init__()
        self.shared_convs = nn.Sequential(*[conv_bn_relu(channels, channels, norm=True) for _ in range(4)])
        self.shared_fcs = nn.ModuleList([nn.Linear(channels * roi_size * roi_size, fc_dim), nn.Linear(fc_dim, fc_dim)])
        self.cls_fc = nn.Linear(fc_dim, fc_dim)
        self.reg_fc = nn.Linear(fc_dim, fc_dim)
        self.fc_reg = nn.Linear(fc_dim, 4)
        self.fc_cls = nn.Linear(fc_dim, num_train_classes + 1)
        self.fixed_temperature = fixed_temperature
        if fixed_temperature:
            self.register_parameter("detect_temperature", None)
        else:
            self.detect_temperature = nn.Parameter(torch.tensor(50.0))

    @property
    def temperature(self) -> torch.Tensor | float:
        return self.fixed_temperature if self.detect_temperature is None else self.detect_temperature

    def forward(self, roi_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K x C x 7 x 7 RoI features -> (K x D unit class embeddings, K x 4 deltas)."""
        x = self.shared_convs(roi_features).flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        # The class branch keeps its ReLU before the norm (F-ViT's "FIXME: should discard the last relu").
        x_cls = F.relu(self.cls_fc(x))
        x_cls = x_cls / x_cls.norm(dim=-1, keepdim=True)
        deltas = self.fc_reg(F.relu(self.reg_fc(x)))
        return x_cls, deltas


class MaskHead(nn.Module):
    """mmdet ``FCNMaskHead`` as OV-LVIS configures it: 4 conv-BN-ReLU, ConvT(2, 2)-ReLU, 1x1 to one channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.convs = nn.Sequential(*[conv_bn_relu(channels, channels, norm=True) for _ in range(4)])
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.logits = nn.Conv2d(channels, 1, 1)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        """K x C x 14 x 14 -> K x 1 x 28 x 28 mask logits."""
        return self.logits(F.relu(self.upsample(self.convs(roi_features))))


@dataclass
class ImageFeatures:
    """What one pass of the tower and the pyramid gives, reused for every class list.

    Attributes:
        levels: FPN outputs P2-P6, each B x fpn_channels x H_l x W_l.
        clip_map: B x D x h x w dense CLIP features (unit norm per location for ``clip_head="value"``).
        image_shapes: per image the (H, W) of the resized image before padding (boxes are clipped to it).
    """

    levels: list[torch.Tensor]
    clip_map: torch.Tensor
    image_shapes: list[tuple[int, int]]

    def image(self, index: int, num_levels: int = 4) -> ImageFeatures:
        """Image ``index`` alone with its first ``num_levels`` FPN levels (P2-P5 by default: what
        :meth:`FViT.mask_probs` pools). Slices are views: they keep the batch's tensors of those levels alive."""
        return ImageFeatures(
            [level[index : index + 1] for level in self.levels[:num_levels]],
            self.clip_map[index : index + 1],
            [self.image_shapes[index]],
        )


@dataclass
class RegionOutputs:
    """Class-independent per-proposal outputs of one image.

    Attributes:
        proposals: K x 4 RPN proposals (input pixels).
        boxes: K x 4 regressed boxes (input pixels, clipped to the image).
        det_embeddings: K x D unit class-branch embeddings.
        clip_embeddings: K x D unit CLIP region embeddings pooled on the proposals.
    """

    proposals: torch.Tensor
    boxes: torch.Tensor
    det_embeddings: torch.Tensor
    clip_embeddings: torch.Tensor


def ensemble_scores(
    det_logits: torch.Tensor,
    clip_logits: torch.Tensor,
    base: torch.Tensor,
    alpha: float,
    beta: float,
    all_classes: bool = False,
) -> torch.Tensor:
    """The F-VLM geometric mean of the two softmaxes over C+1 columns (background last, counted as base).

    Args:
        det_logits: K x (C+1) ``T_det cos(x, t)``.
        clip_logits: K x (C+1) ``T_vlm cos(v, t)``.
        base: (C+1,) bool, True on base classes and on the background column.
        alpha: exponent of the CLIP probability on base columns (every column with ``all_classes``).
        beta: exponent on novel columns.

    Returns:
        K x (C+1) scores, not renormalised (F-ViT thresholds them as they are).
    """
    p_det = det_logits.softmax(dim=-1)
    p_clip = clip_logits.softmax(dim=-1)
    if all_classes:
        return p_det ** (1 - alpha) * p_clip**alpha
    base = base.to(p_det.device)
    exponent = torch.where(base, torch.tensor(alpha, dtype=p_det.dtype), torch.tensor(beta, dtype=p_det.dtype))
    return p_det ** (1 - exponent) * p_clip**exponent


class FViT(nn.Module):
    """F-ViT on a frozen dense tower. See the module docstring for the flow.

    Args:
        tower: the CLIP image tower (frozen here: no gradients, kept in eval mode).
        config: :class:`FViTConfig`.
    """

    def __init__(self, tower: DenseTower, config: FViTConfig):
        super().__init__()
        last = tower.num_blocks - 1
        taps = list(config.taps)
        if taps[-1] != last or sorted(taps) != taps or taps[0] < 0 or taps[2] >= last:
            raise ValueError(
                f"F-ViT taps {taps} do not fit a {tower.num_blocks}-block tower: three earlier blocks in order, then "
                f"the last block ({last})"
            )
        if config.fc_dim != tower.out_dim:
            raise ValueError(f"F-ViT's box head width {config.fc_dim} is not the tower's embedding {tower.out_dim}")
        self.config = config
        self.tower = tower
        for p in self.tower.parameters():
            p.requires_grad_(False)
        width, patch = tower.width, tower.patch_size
        self.strides = [patch / 4, patch / 2, float(patch), 2.0 * patch, 4.0 * patch]
        self.pyramid = SimplePyramid(width)
        self.fpn = FeaturePyramidNetwork(
            [width] * 4, config.fpn_channels, extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d
        )
        self.anchors = AnchorGenerator(self.strides)
        self.rpn = RPNHead(config.fpn_channels, self.anchors.num_anchors, config.rpn_norm)
        self.box_head = BoxHead(config.fpn_channels, config.fc_dim, config.num_train_classes, config.fixed_temperature)
        self.mask_head = MaskHead(config.fpn_channels) if config.with_mask else None
        self.rpn_coder = DeltaXYWHCoder(stds=(1.0, 1.0, 1.0, 1.0))
        self.box_coder = DeltaXYWHCoder(stds=(0.1, 0.1, 0.2, 0.2))
        # The training classes' embeddings (D x (C+1), background last) as F-ViT's checkpoints carry them.
        self.register_buffer("train_embeddings", torch.zeros(config.fc_dim, config.num_train_classes + 1))
        self.init_weights()

    def init_weights(self) -> None:
        """mmdet's initialisation of the trainable parts (training from scratch only; checkpoints overwrite it)."""
        for m in list(self.fpn.modules()):
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.rpn.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for fc in [*self.box_head.shared_fcs, self.box_head.cls_fc, self.box_head.reg_fc]:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.box_head.fc_cls.weight, std=0.01)
        nn.init.zeros_(self.box_head.fc_cls.bias)
        nn.init.normal_(self.box_head.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.box_head.fc_reg.bias)

    def train(self, mode: bool = True) -> FViT:
        """Train the pyramid, FPN and heads (BatchNorm on batch statistics) while the tower stays in eval mode."""
        super().train(mode)
        self.tower.eval()
        return self

    # ---- the tower ----------------------------------------------------------------------------------------------
    def tower_maps(
        self, images: torch.Tensor, with_clip_map: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """B x 3 x S x S normalised images -> the four tapped maps (B x C x h x w each) and the CLIP map B x D x h x w
        (None without ``with_clip_map``: training does not use it, as F-ViT's backbone skips it in train mode).

        Runs without gradients: the tower is frozen, so nothing upstream of the pyramid needs a graph.
        """
        tower, cfg = self.tower, self.config
        with torch.no_grad():
            early = tuple(i + 1 for i in cfg.taps[:-1])  # Taps count blocks from 1: the state after block i + 1
            x, context = tower.tokens_before_last_block(images, "size", Taps(states=early))
            h, w = context["grid"]
            q, k, v = tower.qkv(tower.norm1(x))
            y = x + tower.attn_out(v)
            z = y + tower.ffn(y)
            prefix = tower.num_prefix_tokens
            states = [context["states"][i] for i in early] + [z]
            maps = [s[:, prefix:].transpose(1, 2).reshape(s.shape[0], s.shape[2], h, w) for s in states]
            if not with_clip_map:
                return maps, None
            if cfg.clip_head == "value":
                dense = F.normalize(tower.project(z[:, prefix:]), dim=-1)
            else:
                dense = tower.project(self._declip_tokens(x)[:, prefix:])
            clip_map = dense.transpose(1, 2).reshape(dense.shape[0], dense.shape[2], h, w)
        return maps, clip_map

    def _declip_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """DeCLIP's last block (q-q or csa attention, no residual, no FFN): B x L x C -> B x L x C."""
        from ..heads.declip import DeclipHead

        return DeclipHead(mode=self.config.declip_mode).decoupled(self.tower, x)[0]

    def image_features(self, images: torch.Tensor, image_shapes: Sequence[tuple[int, int]]) -> ImageFeatures:
        """B x 3 x S x S normalised, padded images -> :class:`ImageFeatures`."""
        maps, clip_map = self.tower_maps(images)
        levels = self.pyramid([m.detach() for m in maps])
        fpn = self.fpn({str(i): level for i, level in enumerate(levels)})
        return ImageFeatures(list(fpn.values()), clip_map, [tuple(s) for s in image_shapes])

    # ---- proposals and regions --------------------------------------------------------------------------------
    def propose(self, features: ImageFeatures) -> list[torch.Tensor]:
        """RPN proposals per image: K x 5 (x1, y1, x2, y2, objectness) in input pixels, at most ``rpn_post_nms``."""
        cfg = self.config
        logits, deltas = self.rpn(features.levels)
        sizes = [tuple(level.shape[-2:]) for level in features.levels]
        anchors = self.anchors.grid_anchors(sizes, device=logits[0].device, dtype=torch.float32)
        out = []
        for b, shape in enumerate(features.image_shapes):
            flat = [flatten_level(s[b], d[b]) for s, d in zip(logits, deltas, strict=True)]
            out.append(
                rpn_proposals(
                    [f[0].float() for f in flat],
                    [f[1].float() for f in flat],
                    anchors,
                    shape,
                    self.rpn_coder,
                    nms_pre=cfg.rpn_pre_nms,
                    max_per_img=cfg.rpn_post_nms,
                    iou_threshold=cfg.rpn_iou,
                )
            )
        return out

    def regions(self, features: ImageFeatures, proposals: Sequence[torch.Tensor]) -> list[RegionOutputs]:
        """The class-independent outputs of every proposal, per image (see :class:`RegionOutputs`)."""
        rois = rois_from_boxes([p[:, :4] for p in proposals])
        roi_features = multilevel_roi_align(features.levels[:4], self.strides[:4], rois, 7)
        det_embeddings, deltas = self.box_head(roi_features)
        clip = roi_align_single(features.clip_map.float(), rois, float(self.tower.patch_size), 1)[..., 0, 0]
        clip = F.normalize(clip, dim=-1)
        out, start = [], 0
        for p, shape in zip(proposals, features.image_shapes, strict=True):
            n = p.shape[0]
            boxes = self.box_coder.decode(p[:, :4], deltas[start : start + n].float(), max_shape=shape)
            out.append(RegionOutputs(p[:, :4], boxes, det_embeddings[start : start + n], clip[start : start + n]))
            start += n
        return out

    def mask_probs(self, features: ImageFeatures, boxes_per_image: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Class-agnostic mask probabilities of given boxes: mmdet ``_mask_forward`` at test (14 x 14 RoIAlign on
        P2-P5 by the level rule, the FCN mask head, then the sigmoid of ``get_seg_masks``).

        Args:
            features: the images' :class:`ImageFeatures` (only P2-P5 are read).
            boxes_per_image: per image K_i x 4 boxes in network-input pixels (for F-ViT's test: the final
                detections multiplied back by ``scale_factor``, :func:`ovdense.detection.masks.to_input`).

        Returns:
            per image K_i x 28 x 28 float32 probabilities.

        Raises:
            ValueError: the model has no mask head (``with_mask=False``).
        """
        if self.mask_head is None:
            raise ValueError("this F-ViT has no mask head (with_mask=False)")
        counts = [int(b.shape[0]) for b in boxes_per_image]
        device = features.levels[0].device
        if sum(counts) == 0:
            return [torch.zeros(0, 28, 28, device=device) for _ in counts]
        rois = rois_from_boxes([b.to(device=device, dtype=torch.float32) for b in boxes_per_image])
        roi_features = multilevel_roi_align(features.levels[:4], self.strides[:4], rois, 14)
        probs = self.mask_head(roi_features).float().sigmoid()[:, 0]
        return list(probs.split(counts))

    def scores(self, region: RegionOutputs, class_embeddings: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Ensemble scores K x (C+1) of one image's regions for D x (C+1) unit class embeddings (background last)."""
        cfg = self.config
        emb = class_embeddings.to(region.det_embeddings)
        det_logits = region.det_embeddings @ emb * self.box_head.temperature
        clip_logits = region.clip_embeddings.to(emb) @ emb * cfg.vlm_temperature
        return ensemble_scores(det_logits, clip_logits, base, cfg.alpha, cfg.beta, cfg.ensemble_all_classes)

    def detections(
        self,
        region: RegionOutputs,
        class_embeddings: torch.Tensor,
        base: torch.Tensor,
        owner: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final detections of one image in input pixels: (K x 5 boxes + score, K labels), F-ViT's test rule.

        Args:
            region: the image's :class:`RegionOutputs`.
            class_embeddings: D x (N+1) unit embeddings, background last.
            base: (N+1,) bool, see :func:`ensemble_scores`.
            owner: (N,) class index of each name when classes have synonyms: a class's score is the best of its
                names' (ours); labels then index classes.
        """
        cfg = self.config
        if region.boxes.shape[0] == 0:
            return region.boxes.new_zeros(0, 5), torch.zeros(0, dtype=torch.long, device=region.boxes.device)
        scores = self.scores(region, class_embeddings, base).float()
        if owner is not None:
            owner = owner.to(scores.device)
            num_classes = int(owner.max()) + 1
            best = scores.new_zeros(scores.shape[0], num_classes)
            best = best.scatter_reduce(1, owner.expand(scores.shape[0], -1), scores[:, :-1], "amax", include_self=False)
            scores = torch.cat([best, scores[:, -1:]], dim=1)
        return multiclass_nms(region.boxes, scores, cfg.score_threshold, cfg.nms_iou, cfg.max_detections)


def rois_from_boxes(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image K_i x 4 boxes -> sum(K_i) x 5 RoIs (image index, x1, y1, x2, y2), mmdet's ``bbox2roi``."""
    rois = [torch.cat([b.new_full((b.shape[0], 1), float(i)), b[:, :4]], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(rois, dim=0) if rois else torch.zeros(0, 5)


def tap_indices(num_blocks: int) -> tuple[int, int, int, int]:
    """F-ViT's taps for a tower depth: (3, 5, 7, 11) for 12 blocks, (6, 10, 14, 23) for 24 (the authors' configs).

    Other depths take the L/14 fractions of the depth (ours; the authors configure only 12 and 24); shallow test
    towers may tap one block twice.
    """
    if num_blocks == 12:
        return (3, 5, 7, 11)
    if num_blocks == 24:
        return (6, 10, 14, 23)
    if num_blocks < 2:
        raise ValueError("F-ViT needs a tower of at least 2 blocks")
    taps = [max(0, min(num_blocks - 2, math.ceil(f * num_blocks) - 1)) for f in (7 / 24, 11 / 24, 15 / 24)]
    return (*taps, num_blocks - 1)
