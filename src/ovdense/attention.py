"""Where a token looks: the maps of DeCLIP's Figure 1, for the [CLS] token and any points of an image.

For one image (the network-size input of a :class:`~ovdense.predictor.Segmenter`, in one pass, no windows):

- **CLIP attention**: softmax(s q kᵀ) of CLIP as trained, in every block (the last one too), averaged over
  heads. Deep blocks of CLIP put most of it on a few "proxy" tokens wherever the query sits.
- **head attention**: what the method's dense head applies in its last block instead (SCLIP's q-q + k-k,
  DeCLIP's, ProxyCLIP's VFM proxy, ... ; MaskCLIP's is the identity), averaged over heads.
- **affinity**: the cosine between the token's final dense feature and every other one (the window-assembled
  map of :meth:`~ovdense.predictor.Segmenter.dense_features`, resampled bilinearly to the head's grid when the
  windows' map has another size, so both maps of the method share one grid); for the [CLS] row, CLIP's image
  embedding.
- with a VFM (DINO / DINOv2), its last block's attention and the cosine affinity of its features. A VFM run once on
  the whole image at its own resolution (CorrCLIPv2's, :mod:`ovdense.vfm_native`) gives its affinity only, on its
  native grid: its attention would take another pass of its own (RADIO's hub code shows none).

:func:`attention_pass` runs the towers once and keeps every token's maps; :func:`maps_at` reads the rows of
given points. Maps are on each source's own grid; :mod:`ovdense.viz` draws them over the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError

__all__ = ["AttentionMaps", "AttentionPass", "attention_pass", "check_points", "maps_at", "on_grid", "token_at"]


@dataclass
class AttentionPass:
    """Every token's maps of one image (torch, float32, on the model's device).

    Attributes:
        clip: block number (1..num_blocks) -> L x L attention of CLIP as trained, averaged over heads; rows
            and columns are the ``num_prefix`` prefix tokens, then the ``grid`` row-major.
        grid: (h, w) of CLIP's patch grid; ``num_prefix``: its prefix tokens ([CLS], registers).
        embedding: D, CLIP's L2-normalised image embedding ([CLS] after the unchanged last block, projected).
        head: M x M attention of the dense head (None: the head records none), over ``head_prefix`` prefix
            tokens then ``head_grid`` row-major.
        vfm_attention: Nv x Nv last-block attention of the VFM, averaged over heads (None without a VFM or for a
            native-resolution VFM), over ``vfm_prefix`` prefix tokens then ``vfm_grid``; ``vfm_tokens``: Nv x C its
            L2-normalised final tokens (None without a VFM).
        input_size: (H, W) of the pass's input.
    """

    clip: dict[int, torch.Tensor]
    grid: tuple[int, int]
    num_prefix: int
    embedding: torch.Tensor
    head: torch.Tensor | None
    head_grid: tuple[int, int]
    head_prefix: int
    vfm_attention: torch.Tensor | None = None
    vfm_tokens: torch.Tensor | None = None
    vfm_grid: tuple[int, int] = (0, 0)
    vfm_prefix: int = 0
    input_size: tuple[int, int] = (0, 0)


@dataclass
class AttentionMaps:
    """The maps of the [CLS] token and P points (numpy float32). Row 0 is [CLS], row 1 + i point ``i``.

    Attributes:
        points: P x 2 float, the points' (x, y) in pixels of the original image.
        layers: the CLIP blocks of ``clip`` (1 = first).
        clip: (1 + P) x len(layers) x h x w, CLIP's attention in each of those blocks (patch columns; the
            attention paid to prefix tokens is not shown, so a row sums to at most 1).
        head: (1 + P) x h' x w', the method's last-block attention; the [CLS] row is NaN for heads whose output
            has no [CLS] (ProxyCLIP, CorrCLIP, SC-CLIP). None when the head records none.
        affinity: (1 + P) x h' x w', cosines in the final dense features ([CLS] row: the image embedding), on
            the head's grid.
        vfm_attention, vfm_affinity: (1 + P) x hv x wv, or None without a VFM. A native-resolution VFM
            (CorrCLIPv2's) has its affinity alone (``vfm_attention`` None, the [CLS] row of ``vfm_affinity`` NaN:
            its map has no prefix token).
        method: the head's name; ``vfm``: the VFM's name or None.
        image_size: (H0, W0) of the original image.
    """

    points: np.ndarray
    layers: tuple[int, ...]
    clip: np.ndarray
    head: np.ndarray | None
    affinity: np.ndarray
    vfm_attention: np.ndarray | None
    vfm_affinity: np.ndarray | None
    method: str
    vfm: str | None
    image_size: tuple[int, int]

    @property
    def row_names(self) -> list[str]:
        """``[CLS]`` then ``(x, y)`` of each point."""
        return ["[CLS]"] + [f"({x:g}, {y:g})" for x, y in self.points]

    def columns(self) -> list[tuple[str, np.ndarray]]:
        """(title, (1 + P) x h x w maps) per column of the picture: CLIP's blocks, the head, the affinity, the VFM."""
        cols = [(f"CLIP block {layer}", self.clip[:, i]) for i, layer in enumerate(self.layers)]
        if self.head is not None:
            cols.append((f"{self.method} attention", self.head))
        cols.append((f"{self.method} affinity", self.affinity))
        if self.vfm_attention is not None:
            cols.append((f"{self.vfm} attention", self.vfm_attention))
        if self.vfm_affinity is not None:
            cols.append((f"{self.vfm} affinity", self.vfm_affinity))
        return cols


def check_points(points, image_size: tuple[int, int]) -> np.ndarray:
    """Points as a P x 2 float array of (x, y) inside an image of ``image_size`` = (H, W).

    Raises:
        InvalidArgumentError: not pairs of finite numbers, or outside 0 <= x < W, 0 <= y < H.
    """
    try:
        arr = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.zeros((0, 2))
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"points: expected (x, y) pairs, got {points!r}") from None
    h, w = image_size
    for x, y in arr:
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x < w and 0 <= y < h):
            raise InvalidArgumentError(f"points: ({x:g}, {y:g}) is outside the {w} x {h} image")
    return arr


def token_at(point: Sequence[float], image_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) cell of an h x w grid spread over an H x W image that holds pixel (x, y)."""
    (x, y), (h0, w0), (h, w) = point, image_size, grid
    return min(h - 1, int((y + 0.5) * h / h0)), min(w - 1, int((x + 0.5) * w / w0))


def _rows(matrix: torch.Tensor, prefix: int, grid: tuple[int, int], cells: list[tuple[int, int]]) -> np.ndarray:
    """(1 + P) x h x w: the [CLS] row (NaN without prefix tokens) and each cell's row, patch columns only."""
    h, w = grid
    out = torch.full((1 + len(cells), h, w), float("nan"))
    if prefix:
        out[0] = matrix[0, prefix:].reshape(h, w).cpu()
    for i, (r, c) in enumerate(cells):
        out[1 + i] = matrix[prefix + r * w + c, prefix:].reshape(h, w).cpu()
    return out.numpy()


def _affinity(query_first: torch.Tensor, normalized: torch.Tensor, cells: list[tuple[int, int]]) -> np.ndarray:
    """(1 + P) x h x w cosines: ``query_first`` (D) and each cell's feature against C x h x w unit features."""
    queries = torch.stack([query_first] + [normalized[:, r, c] for r, c in cells])
    return torch.einsum("pc,chw->phw", queries.float(), normalized.float()).cpu().numpy()


def on_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """D x h x w features on an h' x w' grid spread over the same image (bilinear, cell centres aligned), float32;
    the features themselves when the grids agree."""
    features = features.float()
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]


def maps_at(
    result: AttentionPass,
    points: np.ndarray,
    image_size: tuple[int, int],
    dense: torch.Tensor,
    layers: Sequence[int],
    method: str,
    vfm_name: str | None = None,
) -> AttentionMaps:
    """The maps of the [CLS] token and of each point, read from a pass.

    Args:
        result: :func:`attention_pass` of the image.
        points: P x 2 (x, y) in pixels of the original image (:func:`check_points`).
        image_size: (H0, W0) of the original image (the pass's input is the same picture resized).
        dense: D x h x w final dense features (need not be unit vectors), on any grid over the image: the
            affinity is computed on the head's grid (:func:`on_grid`), so the head's attention and the affinity
            of one image share one grid.
        layers: CLIP blocks to keep (each in ``result.clip``).
        method, vfm_name: names for the columns.
    """
    cells = [token_at(p, image_size, result.grid) for p in points]
    clip = np.stack([_rows(result.clip[layer], result.num_prefix, result.grid, cells) for layer in layers], axis=1)
    head = None
    if result.head is not None:
        head_cells = [token_at(p, image_size, result.head_grid) for p in points]
        head = _rows(result.head, result.head_prefix, result.head_grid, head_cells)
    unit = F.normalize(on_grid(dense, result.head_grid), dim=0)
    dense_cells = [token_at(p, image_size, result.head_grid) for p in points]
    affinity = _affinity(result.embedding.to(unit.device), unit, dense_cells)
    vfm_attention = vfm_affinity = None
    if result.vfm_tokens is not None:
        vfm_cells = [token_at(p, image_size, result.vfm_grid) for p in points]
        if result.vfm_attention is not None:
            vfm_attention = _rows(result.vfm_attention, result.vfm_prefix, result.vfm_grid, vfm_cells)
        h, w = result.vfm_grid
        tokens = result.vfm_tokens
        patches = tokens[result.vfm_prefix :].T.reshape(-1, h, w)
        first = tokens[0] if result.vfm_prefix else torch.full_like(tokens[0], float("nan"))
        vfm_affinity = _affinity(first, patches, vfm_cells)
    return AttentionMaps(
        points=np.asarray(points, dtype=np.float64).reshape(-1, 2),
        layers=tuple(int(v) for v in layers),
        clip=clip.astype(np.float32),
        head=None if head is None else head.astype(np.float32),
        affinity=affinity.astype(np.float32),
        vfm_attention=None if vfm_attention is None else vfm_attention.astype(np.float32),
        vfm_affinity=None if vfm_affinity is None else vfm_affinity.astype(np.float32),
        method=method,
        vfm=vfm_name,
        image_size=(int(image_size[0]), int(image_size[1])),
    )


def pass_input_size(size: tuple[int, int], multiple: int) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of ``multiple`` (at least one): whole patches for every tower."""
    return tuple(max(multiple, round(s / multiple) * multiple) for s in size)


@torch.no_grad()
def attention_pass(tower, head, images: torch.Tensor, inputs, vfm=None, native_features=None) -> AttentionPass:
    """Run CLIP as trained, the dense head, and the VFM once over one image; keep every token's maps.

    Args:
        tower: the :class:`~ovdense.backbones.base.DenseTower`.
        head: the :class:`~ovdense.heads.DenseHead`.
        images: 1 x 3 x H x W CLIP-normalised input, sides multiples of the patch sizes involved
            (:func:`pass_input_size`).
        inputs: the head's :class:`~ovdense.heads.PassInputs` (its VFM, text and 1 x H x W masks).
        vfm: the VFM whose own attention and affinity are shown (None: none shown).
        native_features: instead of ``vfm``, C x h x w (or 1 x C x h x w) features of a VFM run once on the whole
            image at its own resolution (:meth:`ovdense.vfm_native.DenseVfm.dense`): its affinity is shown on that
            grid, without attention.
    """
    if images.ndim != 4 or images.shape[0] != 1:
        raise InvalidArgumentError(f"images: expected 1 x 3 x H x W, got {tuple(images.shape)}")
    if vfm is not None and native_features is not None:
        raise InvalidArgumentError("attention_pass: give vfm or native_features, not both")
    x, context = tower.embed(images, inputs.pos_rule)
    clip = {}
    for index in range(tower.num_blocks):
        x, weights = tower.block_with_attention(index, x, context)
        clip[index + 1] = weights[0].float().mean(dim=0)
    embedding = F.normalize(tower.project(x)[0, 0].float(), dim=-1)
    _, ctx = head.run(tower, images, inputs, record_attention=True)
    recorded = ctx.head_attention
    result = AttentionPass(
        clip=clip,
        grid=tuple(context["grid"]),
        num_prefix=tower.num_prefix_tokens,
        embedding=embedding,
        head=None if recorded is None else recorded[0],
        head_grid=tuple(ctx.output_grid),
        head_prefix=tower.num_prefix_tokens if head.output_has_prefix else 0,
        input_size=(int(images.shape[-2]), int(images.shape[-1])),
    )
    if vfm is not None:
        from .heads.vfm_proxies import vfm_input

        pre = tower.preprocess
        view = vfm_input(images.float(), pre.mean, pre.std, vfm.mean, vfm.std)
        attention, grid = vfm.last_attention(view)
        tokens, _ = vfm.tokens(view)
        result.vfm_attention = attention[0]
        result.vfm_tokens = F.normalize(tokens[0], dim=-1)
        result.vfm_grid = tuple(grid)
        result.vfm_prefix = int(vfm.model.num_prefix_tokens)
    if native_features is not None:
        grid = native_features.float().reshape(-1, *native_features.shape[-2:])  # C x h x w
        result.vfm_tokens = F.normalize(grid.flatten(1).T, dim=-1)  # row-major cells, no prefix token
        result.vfm_grid = (int(grid.shape[-2]), int(grid.shape[-1]))
    return result


def lcm(*values: int) -> int:
    """Least common multiple of positive integers (the patch sizes a pass must divide)."""
    return math.lcm(*(int(v) for v in values if v))
