"""One image's VFM feature map at the network input's resolution, evaluated only where it is needed (CorrCLIPv2).

CorrCLIPv2 (``CorrCLIPv2/corrclip_segmentor.py``, zdk258/CorrCLIP at 103bc18, S:157-219 and S:135-138) runs its VFM
once per image, then

1. resizes the VFM grid G (C x g_h x g_w) bilinearly to the resized image (H x W) and L2-normalises every pixel:
   V̂ (C x H x W);
2. for the retrieval queries, averages V̂ over each region of the resized mask and normalises the means;
3. for each sliding window, crops V̂ like the image, pads it by replicating its edge where the window is padded,
   resizes it bilinearly (no antialias) to the correlation grid and normalises every cell.

Materialising V̂ costs C·H·W floats (1024 x 448 x 672 x 4 bytes = 1.2 GB for one ADE image), so this module keeps G
and evaluates V̂ through the two interpolation matrices of the resize, ``V̂ = normalise(U_y G U_xᵀ)``, only at the
pixels a step reads: a band of rows at a time for the region means, and for a window only the rows and columns its
downsampling samples (two per output cell). Bilinear resizing with ``align_corners=False`` is separable, so the
matrices are exactly what ``F.interpolate`` computes (they are built by interpolating an identity); the results
equal the authors' to float32 rounding (they work in fp16 on the GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["VfmImageMap", "linear_resize_matrix"]

#: Bound on the C x rows x W values of V̂ held at once by :meth:`VfmImageMap.region_means`.
_MAX_BAND_ELEMENTS = 1 << 25


def linear_resize_matrix(in_size: int, out_size: int, device=None) -> Tensor:
    """The out_size x in_size matrix of 1-D linear resizing as ``F.interpolate(mode="bilinear",
    align_corners=False)`` does it along one axis (no antialias): ``resize(v) = M @ v``."""
    eye = torch.eye(in_size, device=device, dtype=torch.float32)[None]  # 1 x in (channels) x in (length)
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T.contiguous()


class VfmImageMap:
    """V̂ = the image's VFM grid resized bilinearly to the network input and L2-normalised per pixel, lazily.

    Args:
        grid: C x g_h x g_w (or 1 x C x g_h x g_w) VFM features of the image.
        size: ``(H, W)`` of the network input (the resized image) V̂ covers.
    """

    def __init__(self, grid: Tensor, size: tuple[int, int]):
        if grid.ndim == 4:
            if grid.shape[0] != 1:
                raise ValueError(f"expected one image's grid, got shape {tuple(grid.shape)}")
            grid = grid[0]
        if grid.ndim != 3:
            raise ValueError(f"expected a C x h x w grid, got shape {tuple(grid.shape)}")
        self.grid = grid.float()
        self.size = (int(size[0]), int(size[1]))
        self.rows = linear_resize_matrix(grid.shape[1], self.size[0], grid.device)  # H x g_h
        self.cols = linear_resize_matrix(grid.shape[2], self.size[1], grid.device)  # W x g_w

    @property
    def dim(self) -> int:
        """C, the VFM's feature width."""
        return self.grid.shape[0]

    def at(self, rows: Tensor, cols: Tensor) -> Tensor:
        """V̂ at the crossings of ``rows`` (r pixel rows) and ``cols`` (c pixel columns): C x r x c, unit vectors."""
        half = torch.einsum("rh,chw->crw", self.rows[rows], self.grid)
        return F.normalize(torch.einsum("crw,sw->crs", half, self.cols[cols]), dim=0)

    def region_means(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean of V̂ over each region of ``ids`` (the retrieval queries before normalisation, S:165-175).

        Args:
            ids: H x W integer region ids at the network input's size.

        Returns:
            ``(values, index, means)``: R region ids ascending (those present), H x W each pixel's region (0..R-1)
            and R x C float32 means.
        """
        if tuple(ids.shape) != self.size:
            raise ValueError(f"region ids are {tuple(ids.shape)}, the map covers {self.size}")
        values, index = torch.unique(ids, return_inverse=True)
        sums = self.grid.new_zeros((len(values), self.dim))
        band = max(1, _MAX_BAND_ELEMENTS // max(1, self.dim * self.size[1]))
        all_cols = torch.arange(self.size[1], device=self.grid.device)
        for top in range(0, self.size[0], band):
            rows = torch.arange(top, min(top + band, self.size[0]), device=self.grid.device)
            feats = self.at(rows, all_cols)  # C x r x W
            sums.index_add_(0, index[rows].reshape(-1), feats.flatten(1).T)
        counts = torch.bincount(index.reshape(-1), minlength=len(values)).to(sums.dtype)
        return values, index, sums / counts[:, None]

    def window_features(self, coords: Tensor, out_size: tuple[int, int]) -> Tensor:
        """Each window's crop of V̂ resized to ``out_size`` and normalised per cell (S:135-138, 214-219).

        Args:
            coords: B x 2 x P x Q, the network-input pixel (row, column) each pixel of the padded windows shows;
                padding repeats the window's edge pixel, which is the authors' replicate padding of V̂.
            out_size: ``(f_h, f_w)``, the correlation grid.

        Returns:
            B x (f_h·f_w) x C float32 unit vectors.
        """
        if coords.ndim != 4 or coords.shape[1] != 2:
            raise ValueError(f"expected B x 2 x P x Q pixel coordinates, got shape {tuple(coords.shape)}")
        padded_h, padded_w = coords.shape[-2:]
        down_rows = linear_resize_matrix(padded_h, out_size[0], coords.device)  # f_h x P
        down_cols = linear_resize_matrix(padded_w, out_size[1], coords.device)  # f_w x Q
        # Only the window pixels a downsampled cell reads (at most two per cell and axis) are evaluated.
        need_r = torch.nonzero(down_rows.abs().sum(0)).flatten()
        need_c = torch.nonzero(down_cols.abs().sum(0)).flatten()
        out = []
        for window in coords.long():
            crossed = self.at(window[0, need_r, 0], window[1, 0, need_c])  # C x r x c
            tall = torch.einsum("fr,crs->cfs", down_rows[:, need_r], crossed)
            small = torch.einsum("cfs,gs->cfg", tall, down_cols[:, need_c])
            out.append(F.normalize(small.flatten(1).T, dim=-1))
        return torch.stack(out)
