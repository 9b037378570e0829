"""Step 4 of a bank build: the VFM key of every region (the authors' ``generate_vfm_embeddings.py``, l.76-139).

Per image (EXIF applied): the VFM's dense map of the whole image (:func:`ovdense.vfm_native.load_dense_vfm`'s
``dense``, the same preprocessing as inference) bilinear to its ``ref_size`` (the original size for RADIO / DINOv2 /
DINOv3), L2-normalised per pixel, the mask nearest-resized to ``ref_size`` where the sizes differ (PE), and key =
the **mean of the normalised features over the region's pixels, not normalised again**, stored in fp16. The index
normalises the keys itself (:func:`ovdense.bank.index.build_index`); inference's queries use the same recipe at the
resized image's size (spec quirk 6).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import OvdenseError
from .pooling import region_means, resize_mask

__all__ = ["KeyExtractor"]


class KeyExtractor:
    """The VFM key of every region of an image (module docstring).

    Args:
        vfm: a dense VFM (:func:`ovdense.vfm_native.load_dense_vfm`): ``dense(image) -> (1 x C x h x w, (H, W))``,
            ``dim``, ``name``.
    """

    def __init__(self, vfm):
        self.vfm = vfm

    @property
    def dim(self) -> int:
        """Dk, the VFM's feature width."""
        return int(self.vfm.dim)

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The keys of the image's regions.

        Args:
            image: H x W x 3 uint8 RGB (EXIF applied).
            mask: int [H, W] or bool [R, H, W] at the image's size.

        Returns:
            R x Dk float32 (means of unit vectors: norms at most 1), R = the regions of the mask at ``ref_size``
            in idx order (a region that vanishes in the resize is missing, as in the authors' code).
        """
        if tuple(mask.shape[-2:]) != tuple(image.shape[:2]):
            raise OvdenseError(
                f"mask is {mask.shape[-2]} x {mask.shape[-1]}, the image {image.shape[0]} x {image.shape[1]} "
                "(masks are made at the EXIF-corrected original size)"
            )
        feats, ref_size = self.vfm.dense(image)
        feats = torch.as_tensor(feats)
        if feats.ndim != 4 or feats.shape[0] != 1 or feats.shape[1] != self.dim:
            shape = tuple(feats.shape)
            raise OvdenseError(f"VFM {self.vfm.name}: dense() gave {shape}, expected 1 x {self.dim} x h x w")
        return region_means(feats, resize_mask(mask, tuple(ref_size)), normalize_pixels=True)
