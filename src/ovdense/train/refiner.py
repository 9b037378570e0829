"""SCD's Refiner (R-SCD): a light transformer that cleans the frozen CLIP's dense tokens.

Ours: docs/design.md "SCD and the Refiner (ours)".

The paper's method section is not available, so everything here is our design:

- **Input**: the frozen tower's value-path tokens of the last block (:func:`frozen_dense_tokens`), i.e. the tokens
  CLIPSelf's dense head (the ``maskclip`` head) feeds into the final norm and projection.
- **Module** (:class:`Refiner`): ``depth`` pre-norm timm transformer blocks at the tower's width, a final norm and a
  zero-initialised output projection, added back to the input tokens: at initialisation it is the identity, so
  training starts from CLIP's own tokens.
- **Self-supervision** (:func:`refiner_loss`): the refined tokens of the full image, pooled n x n over each grid
  cell, must match the frozen CLIP's dense tokens computed on the zoomed-in crop of that cell
  (:func:`zoomed_targets`) under an InfoNCE over all tokens of the batch
  (:func:`~ovdense.train.losses.token_infonce_loss`): the paper's premise that CLIP sees local regions well when
  they fill its input.
- **Checkpoints** (:func:`save_refiner`, :func:`load_refiner`): safetensors with the module's config and the CLIP
  it was trained on in the metadata; SCD runs reuse one trained Refiner frozen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torchvision.ops import roi_align

from ..backbones.base import DenseTower
from ..errors import OvdenseError
from ..heads import PassInputs
from ..methods import create_head
from .data import boxes_in_grid_units
from .losses import token_infonce_loss

__all__ = [
    "REFINER_FORMAT",
    "Refiner",
    "frozen_dense_tokens",
    "load_refiner",
    "refined_dense_map",
    "refiner_loss",
    "resized_crop_hw",
    "save_refiner",
    "valid_grid_boxes",
    "zoomed_targets",
]

#: The ``format`` entry of a Refiner checkpoint's metadata.
REFINER_FORMAT = "ovdense-refiner-1"


class Refiner(nn.Module):
    """A residual stack of pre-norm transformer blocks on dense CLIP tokens (ours).

    ``forward(x) = x + proj(norm(blocks(x)))``: ``depth`` timm :class:`~timm.models.vision_transformer.Block`
    (qkv bias, GELU MLP, no layer scale), a final LayerNorm and a linear output projection, all at the tower's
    width C. The output projection is zero-initialised, so a new Refiner returns its input unchanged (ours:
    training starts from CLIP's own tokens, and a Refiner that learnt nothing leaves SCD's target as plain
    SCD's). The final norm keeps the projection's input well scaled: the blocks work in CLIP's residual stream,
    whose token norms are large and uneven. Other weights get ViT's initialisation (truncated normal, std 0.02,
    zero biases; ours). No positional embedding: the frozen tokens already carry CLIP's.

    Args:
        width: the token width C (the tower's ``width``).
        num_heads: attention heads per block (C must be divisible by it).
        depth: number of blocks (docs/design.md "SCD and the Refiner (ours)": 2).
        mlp_ratio: MLP hidden width / C.
    """

    def __init__(self, width: int, num_heads: int, depth: int = 2, mlp_ratio: float = 4.0):
        super().__init__()
        if width < 1 or num_heads < 1 or width % num_heads:
            raise ValueError(f"width {width} must be a positive multiple of num_heads {num_heads}")
        if depth < 1:
            raise ValueError(f"depth: expected >= 1 blocks, got {depth}")
        self.width = int(width)
        self.num_heads = int(num_heads)
        self.depth = int(depth)
        self.mlp_ratio = float(mlp_ratio)
        #: Set by :func:`load_refiner` from the checkpoint: the CLIP it was trained on and the saved ``extra``.
        self.model_name: str | None = None
        self.extra: dict = {}
        self.blocks = nn.ModuleList(
            Block(self.width, self.num_heads, mlp_ratio=self.mlp_ratio, qkv_bias=True) for _ in range(self.depth)
        )
        self.norm = nn.LayerNorm(self.width)
        self.proj = nn.Linear(self.width, self.width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT's initialisation for the blocks, then a zero output projection (the identity map)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Refine B x N x C tokens; returns B x N x C."""
        if tokens.dim() != 3 or tokens.shape[-1] != self.width:
            raise ValueError(f"tokens: expected B x N x {self.width}, got shape {tuple(tokens.shape)}")
        h = tokens
        for block in self.blocks:
            h = block(h)
        return tokens + self.proj(self.norm(h))

    def extra_repr(self) -> str:
        return f"width={self.width}, num_heads={self.num_heads}, depth={self.depth}, mlp_ratio={self.mlp_ratio}"


# -- dense maps ---------------------------------------------------------------------------------------------------


def frozen_dense_tokens(tower: DenseTower, images: Tensor, pos_rule: str = "size") -> tuple[Tensor, tuple[int, int]]:
    """The frozen tower's tokens that the Refiner refines, without gradient (ours: CLIPSelf's dense path).

    The ``maskclip`` head's last block (MaskCLIP/CLIPSelf value path: ``x + out_proj(v)``, then the FFN with its
    residual) on the tokens entering the tower's last block, prefix tokens ([CLS], registers) dropped; the final
    norm and projection are not applied (:meth:`DenseTower.project` does that after the Refiner).

    Args:
        tower: the frozen CLIP image tower.
        images: B x 3 x H x W normalised images.
        pos_rule: positional-embedding resize rule (see :func:`ovdense.backbones.base.resize_patch_pos_embed`).

    Returns:
        ``(tokens, (h, w))``: tokens B x (h·w) x C (C = ``tower.width``), row-major over the h x w patch grid.
    """
    head = create_head("maskclip")
    with torch.no_grad():
        x, context = head.begin(tower, images, PassInputs(pos_rule))
        y = head.last_block(tower, x, context)
    h, w = context.grid
    return y[:, tower.num_prefix_tokens :], (int(h), int(w))


def refined_dense_map(
    refiner: Refiner, tower: DenseTower, images: Tensor, pos_rule: str = "size", normalize: bool = True
) -> Tensor:
    """The Refiner's dense map: frozen tokens -> Refiner -> the tower's final norm and projection.

    Gradient reaches the Refiner (through the tower's projection); the frozen tokens are computed without
    gradient, and the caller keeps the tower's parameters frozen.

    Args:
        refiner: the Refiner (trained or being trained).
        tower: the frozen CLIP image tower.
        images: B x 3 x H x W normalised images.
        pos_rule: positional-embedding resize rule.
        normalize: L2-normalise each projected token.

    Returns:
        B x D x h x w (D = ``tower.out_dim``).
    """
    tokens, (h, w) = frozen_dense_tokens(tower, images, pos_rule)
    y = tower.project(refiner(tokens))
    if normalize:
        y = F.normalize(y, dim=-1)
    return y.transpose(1, 2).reshape(y.shape[0], y.shape[2], h, w)


# -- zoomed-in targets --------------------------------------------------------------------------------------------


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """An int or an (a, b) pair as two positive ints."""
    a, b = (int(value), int(value)) if isinstance(value, (int, np.integer)) else (int(v) for v in value)
    if a < 1 or b < 1:
        raise ValueError(f"{name}: expected positive sizes, got {(a, b)}")
    return a, b


def resized_crop_hw(boxes_px: Tensor | np.ndarray, size: int | Sequence[int]) -> Tensor:
    """Each crop's resized (height, width) inside the tower's input, before the centred padding.

    Mirrors :func:`ovdense.regions.crop_inputs` (``ResizeMaxSize``) step by step, so callers can derive the
    ``crop_hw`` of :func:`zoomed_targets` from the crops' pixel boxes: Pillow's ``crop`` rounds the box corners
    with Python's ``round`` (ties to even), the crop is ``y1 - y0`` by ``x1 - x0`` pixels, ``s = min(H / h, W / w)``
    (= size / max(h, w) for a square input) and the resized crop is ``round(h·s) x round(w·s)``.

    Args:
        boxes_px: K x 4 XYXY boxes in original-image pixels (the boxes given to ``crop_inputs``).
        size: the tower's input side, or its (H, W).

    Returns:
        K x 2 int64 ``(height, width)`` of each resized crop, in input pixels.
    """
    size_h, size_w = _pair(size, "size")
    arr = boxes_px.detach().cpu().tolist() if isinstance(boxes_px, Tensor) else np.asarray(boxes_px).tolist()
    out = []
    for box in arr:
        if len(box) != 4:
            raise ValueError(f"boxes_px: expected K x 4 XYXY pixels, got a row of {len(box)} values")
        # float() first, as crop_inputs passes Python floats to Image.crop, which rounds them.
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        h, w = y1 - y0, x1 - x0
        if h < 1 or w < 1:
            raise ValueError(f"boxes_px: box {box} is empty after Pillow's rounding")
        scale = min(size_h / h, size_w / w)
        out.append((round(h * scale), round(w * scale)))
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 2)


def valid_grid_boxes(crop_hw: Tensor, crop_size: int | Sequence[int], grid: int | Sequence[int]) -> Tensor:
    """The non-padded area of each centred-padded crop, in grid units of the crop's dense map.

    ``crop_inputs`` pads ``ph = H - h`` rows as ``ph // 2`` above and the rest below (columns likewise), so the
    crop covers pixels ``[pw // 2, pw // 2 + w) x [ph // 2, ph // 2 + h)``; dividing by the input size and
    multiplying by the grid gives RoIAlign's continuous coordinates (aligned=True: pixel edges, not centres).

    Args:
        crop_hw: K x 2 resized crop (height, width) in input pixels (:func:`resized_crop_hw`).
        crop_size: the crop input's side, or its (H, W).
        grid: the dense map's side, or its (h, w).

    Returns:
        K x 4 float32 XYXY in grid units.
    """
    size_h, size_w = _pair(crop_size, "crop_size")
    grid_h, grid_w = _pair(grid, "grid")
    if crop_hw.dim() != 2 or crop_hw.shape[1] != 2:
        raise ValueError(f"crop_hw: expected K x 2 (height, width), got shape {tuple(crop_hw.shape)}")
    hw = crop_hw.long()
    if ((hw < 1) | (hw[:, 0] > size_h)[:, None] | (hw[:, 1] > size_w)[:, None]).any():
        raise ValueError(f"crop_hw: every (height, width) must lie in 1..{(size_h, size_w)}")
    top = (size_h - hw[:, 0]) // 2
    left = (size_w - hw[:, 1]) // 2
    px = torch.stack([left, top, left + hw[:, 1], top + hw[:, 0]], dim=1).float()
    return px * px.new_tensor([grid_w / size_w, grid_h / size_h, grid_w / size_w, grid_h / size_h])


def zoomed_targets(
    tower: DenseTower, crops: Tensor, crop_hw: Tensor, n: int, pos_rule: str = "size", chunk: int = 64
) -> Tensor:
    """The frozen CLIP's dense tokens of each zoomed-in crop, pooled n x n over its non-padded area (ours).

    Dense map of the ``maskclip`` head (CLIPSelf's dense head), projected and L2-normalised per token, as the
    Refiner's map is; ``roi_align(map, valid box, (n, n), 1.0, -1, aligned=True)`` over the area the crop's
    pixels fill (:func:`valid_grid_boxes`), so the black padding of elongated crops never enters a target; the
    pooled tokens are L2-normalised again. Computed without gradient.

    Args:
        tower: the frozen CLIP image tower.
        crops: K x 3 x H x W normalised crops (the dataset's ``crops[box_valid]``, centred zero padding).
        crop_hw: K x 2 resized crop (height, width) in input pixels before padding (:func:`resized_crop_hw`).
        n: tokens per side of each target.
        pos_rule: positional-embedding resize rule (the crops are at the tower's input size, where both rules
            keep the original table).
        chunk: crops per tower pass (bounds memory on large towers; the result does not depend on it).

    Returns:
        K x n² x D fp32 L2-normalised targets, row-major over the n x n cells.
    """
    if crops.dim() != 4:
        raise ValueError(f"crops: expected K x 3 x H x W, got shape {tuple(crops.shape)}")
    k = crops.shape[0]
    if crop_hw.shape != (k, 2):
        raise ValueError(f"crop_hw: expected {k} x 2 for {k} crops, got shape {tuple(crop_hw.shape)}")
    if k == 0:
        return torch.zeros(0, n * n, tower.out_dim, device=crops.device)
    head = create_head("maskclip")
    with torch.no_grad():
        dense = torch.cat(
            [
                head.encode_dense(tower, crops[i : i + chunk], PassInputs(pos_rule), normalize=True).float()
                for i in range(0, k, chunk)
            ]
        )
        boxes = valid_grid_boxes(crop_hw.cpu(), tuple(crops.shape[-2:]), tuple(dense.shape[-2:])).to(dense.device)
        # One box per crop: RoIAlign's K x 5 form, the first column the crop's index in the batch.
        index = torch.arange(k, device=dense.device, dtype=boxes.dtype)[:, None]
        pooled = roi_align(dense, torch.cat([index, boxes], dim=1), (n, n), 1.0, -1, True)
        return F.normalize(pooled.flatten(2).transpose(1, 2), dim=-1)


def refiner_loss(
    refiner: Refiner,
    tower: DenseTower,
    images: Tensor,
    boxes: Tensor,
    box_valid: Tensor,
    crops: Tensor,
    crop_hw: Tensor,
    n: int = 4,
    tau: float = 0.2,
    pos_rule: str = "size",
    share: float = 1.0,
    dense: Tensor | None = None,
) -> Tensor:
    """The Refiner's self-supervised objective (ours, docs/design.md "SCD and the Refiner (ours)").

    The refined, L2-normalised map of each full image is pooled ``roi_align(..., (n, n), 1.0, -1, True)`` over
    each valid box; each pooled token must pick the frozen CLIP's token of the same cell of the same box's
    zoomed-in crop (:func:`zoomed_targets`) among all K·n² target tokens of the batch
    (:func:`~ovdense.train.losses.token_infonce_loss`).

    Args:
        refiner: the Refiner being trained.
        tower: the frozen CLIP image tower (parameters frozen by the caller).
        images: B x 3 x S x S normalised student inputs (the dataset's ``image``).
        boxes: B x M x 4 XYXY boxes normalised to the padded input (the dataset's ``boxes``).
        box_valid: B x M bool.
        crops: B x M x 3 x c x c teacher crops (the dataset's ``crops``).
        crop_hw: the resized crop sizes (:func:`resized_crop_hw`), either B x M x 2 (the layout of ``boxes``) or
            K x 2 for the valid boxes only, in ``crops[box_valid]`` order.
        n: tokens per box side.
        tau: InfoNCE temperature.
        pos_rule: positional-embedding resize rule.
        share: factor on the loss; under DDP, this process's share of the global batch's regions
            (:func:`~ovdense.train.objectives.regions_share`), so that the averaged gradient is the mean over all
            regions. 1 for a single process.
        dense: the refined, L2-normalised B x D x h x w map of ``images`` when the caller has already computed it
            (the trainer's pass through DDP, :func:`refined_dense_map` with ``normalize=True``); ``refiner`` is
            then not called. ``None``: computed here.

    Returns:
        0-dim fp32 loss.
    """
    if crop_hw.dim() == 3:
        crop_hw = crop_hw[box_valid.to(crop_hw.device)]
    if dense is None:
        dense = refined_dense_map(refiner, tower, images, pos_rule, normalize=True)
    dense = dense.float()
    rois = boxes_in_grid_units(boxes.float().to(dense.device), box_valid.to(dense.device), tuple(dense.shape[-2:]))
    # Boxes come out image by image, each image's valid boxes in order: the order of crops[box_valid].
    student = roi_align(dense, rois, (n, n), 1.0, -1, True).flatten(2).transpose(1, 2)
    targets = zoomed_targets(tower, crops[box_valid.to(crops.device)], crop_hw, n, pos_rule)
    return token_infonce_loss(student, targets.to(student.device), tau=tau) * share


# -- checkpoints --------------------------------------------------------------------------------------------------


def save_refiner(path: str | Path, refiner: Refiner, model_name: str, extra: dict | None = None) -> None:
    """Write a Refiner as safetensors, atomically (a temp file beside ``path``, then ``os.replace``).

    The metadata holds ``format`` (:data:`REFINER_FORMAT`), ``model`` (the CLIP the Refiner was trained on),
    ``width``, ``num_heads``, ``depth``, ``mlp_ratio`` and ``extra`` (``extra`` as JSON, e.g. training settings).
    """
    from safetensors.torch import save

    from ..fileio import write_atomic

    meta = {
        "format": REFINER_FORMAT,
        "model": str(model_name),
        "width": str(refiner.width),
        "num_heads": str(refiner.num_heads),
        "depth": str(refiner.depth),
        "mlp_ratio": repr(refiner.mlp_ratio),
        "extra": json.dumps(extra or {}, sort_keys=True),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in refiner.state_dict().items()}
    data = save(tensors, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(data))


def load_refiner(
    path: str | Path, tower: DenseTower | None = None, model_name: str | None = None, device: str | torch.device = "cpu"
) -> Refiner:
    """Rebuild a Refiner from :func:`save_refiner`'s file, frozen and in eval mode.

    Args:
        path: the ``.safetensors`` file.
        tower: when given, the Refiner's width must equal ``tower.width``.
        model_name: when given, the Refiner must have been trained on this CLIP.
        device: where to put it.

    Returns:
        The Refiner (``requires_grad`` False everywhere), with ``model_name`` and ``extra`` attributes from the
        metadata.

    Raises:
        OvdenseError: a missing, corrupt or non-Refiner file, or a Refiner made for another model or width.
    """
    from safetensors import safe_open

    from ..weights import load_strict

    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"refiner checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own types (and OSError) for a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OvdenseError(f"cannot read refiner checkpoint {path}: {first}") from None
    if meta.get("format") != REFINER_FORMAT:
        raise OvdenseError(
            f"{path} is not an ovdense refiner checkpoint (format {meta.get('format')!r}, expected {REFINER_FORMAT!r})"
        )
    try:
        trained_on = meta["model"]
        config = {
            "width": int(meta["width"]),
            "num_heads": int(meta["num_heads"]),
            "depth": int(meta["depth"]),
            "mlp_ratio": float(meta["mlp_ratio"]),
        }
        extra = json.loads(meta.get("extra", "{}"))
        refiner = Refiner(**config)
    except (KeyError, ValueError, TypeError) as err:
        raise OvdenseError(f"corrupt refiner checkpoint {path}: bad metadata ({err})") from None
    if model_name is not None and trained_on != model_name:
        raise OvdenseError(f"refiner {path} was trained on {trained_on}, not {model_name}; train one for {model_name}")
    if tower is not None and config["width"] != tower.width:
        raise OvdenseError(
            f"refiner {path} has width {config['width']} ({trained_on}) but the tower has width {tower.width}"
        )
    load_strict(refiner, state, f"a refiner of {config}")
    refiner.model_name = trained_on
    refiner.extra = extra
    refiner.requires_grad_(False)
    return refiner.to(device).eval()
