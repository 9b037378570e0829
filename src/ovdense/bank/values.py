"""Step 3 of a bank build: the CLIP values of every region (the authors' ``generate_clip_embeddings.py``).

Per image (their ``FeatureExtractor.extract_from_paths``, l.186-299), with ovdense's CorrCLIP v1 machinery:

1. The image (EXIF applied) resized with mmseg's rule to short side ``short_side`` = 448 (long side at most 2048),
   normalised with the CLIP statistics (:func:`ovdense.predictor.pixel_stats`); its mask nearest-resized alike.
2. CorrCLIP v1's sliding windows (:func:`ovdense.inference.encode_windows`: crop 336, stride 112, each window
   zero-padded to a multiple of 56, its region ids padded with 10000) through :class:`ovdense.heads.corrclip.
   CorrclipHead` with DINO ViT-B/8 q+k correlations and **region merging off** (v2's ``encode_image``), projected
   features **not normalised** per pixel (``encode_dense(normalize=False)``).
3. The windows' features bilinear to each padded window, cut, summed and divided by the window count
   (:func:`ovdense.inference.assemble_features` at the resized image's size), then bilinear to the original size,
   and averaged over each region's pixels there (:func:`ovdense.bank.pooling.region_means`); value =
   L2-normalise(mean), stored in fp16. Regions: the mask's non-zero values ascending (a 3-D bool stack: its
   channels, the pass seeing them painted in order, later channels on top, as the authors do).

Differences from the authors' code that change rounding only: their CLIP runs with fp16 weights where ovdense's
runs under fp16 autocast (CUDA; fp32 on the CPU), and they accumulate the windows and the region mean in fp16
where this sums in float32. The retrieval VFM plays no part here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import OvdenseError
from ..heads import PassInputs
from ..heads.vfm_proxies import MERGED_REGION_ID, resize_region_ids
from ..inference import assemble_features, encode_windows, mmseg_resize
from ..precision import autocast
from .pooling import region_means

__all__ = ["VALUE_SETTINGS", "ValueExtractor", "painted_ids"]

#: The authors' window settings for the values (``--slide_short 448 --slide_crop 336``, stride 112).
VALUE_SETTINGS = {"short_side": 448, "long_side": 2048, "crop": 336, "stride": 112}


def painted_ids(mask: np.ndarray) -> np.ndarray:
    """The int [H, W] region ids the CorrCLIP pass sees: the mask itself, or a bool [R, H, W] stack painted in
    channel order with ids 1..R (later channels over earlier ones), as the authors paint it (l.214-222)."""
    if mask.ndim == 2:
        return mask.astype(np.int64, copy=False)
    ids = np.zeros(mask.shape[1:], dtype=np.int64)
    for k, channel in enumerate(mask, start=1):
        ids[channel] = k
    return ids


class ValueExtractor:
    """The CLIP value of every region of an image (module docstring).

    Args:
        loaded: the CLIP (:func:`ovdense.weights.load_model`), on ``device``.
        vfm: the DINO of the correlations (:func:`ovdense.vfm.load_vfm`, ``dino-b8``), on ``device``.
        precision: ``auto`` (fp16 autocast on CUDA), ``fp32``, ``bf16``, ``fp16``.
        short_side, crop, stride: the authors' ``--slide_short``, ``--slide_crop`` and their fixed stride.
        window_batch: windows per forward pass (memory only).

    Raises:
        OvdenseError: ovdense's CorrCLIP head cannot switch its region merging off.
    """

    def __init__(
        self,
        loaded,
        vfm,
        precision: str = "auto",
        short_side: int = 448,
        crop: int = 336,
        stride: int = 112,
        window_batch: int = 16,
    ):
        from ..predictor import build_head, pixel_stats, resolve_preset

        self.preset = resolve_preset("corrclip", short_side=short_side, crop=crop, stride=stride)
        head = build_head(self.preset)
        if not hasattr(head, "merges_regions"):
            raise OvdenseError("this ovdense's CorrCLIP head cannot switch its region merging off (merges_regions)")
        head.merges_regions = False  # v2's encode_image: the DBSCAN merge is commented out (spec quirk 4)
        try:
            head.taps(loaded.tower)
        except ValueError as err:
            raise OvdenseError(f"{loaded.model_name}: {err}") from None
        self.head = head
        self.loaded, self.vfm = loaded, vfm
        self.device = next(loaded.model.parameters()).device
        self.precision = precision
        self.window_batch = window_batch
        pre = loaded.tower.preprocess
        self._mean, self._std = (
            torch.tensor(pixel_stats(v), device=self.device).view(1, 3, 1, 1) for v in (pre.mean, pre.std)
        )

    @property
    def dim(self) -> int:
        """D, the CLIP's joint embedding width."""
        return int(self.loaded.model.visual.output_dim)

    def _encode(self, windows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        inputs = PassInputs(self.preset.pos_rule, vfm=self.vfm, masks=ids[:, 0].long())
        with autocast(self.precision, self.device):
            return self.head.encode_dense(self.loaded.tower, windows, inputs, normalize=False)

    @torch.no_grad()
    def dense(self, image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The assembled, un-normalised per-pixel CLIP features of the resized image.

        Args:
            image: H x W x 3 uint8 RGB (EXIF applied).
            mask: int [H, W] or bool [R, H, W] at the image's size.

        Returns:
            1 x D x H' x W' float32, H' x W' the resized image (short side 448).
        """
        p = self.preset
        resized = mmseg_resize(image, p.long_side, p.short_side)
        x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float()
        x = (x - self._mean) / self._std
        ids = torch.from_numpy(painted_ids(mask)).to(self.device)[None]
        extra = resize_region_ids(ids, tuple(x.shape[-2:]))[:, None].float()
        windows = encode_windows(
            x, self._encode, p.crop, p.stride, self.window_batch, p.pad_multiple, extra=extra,
            extra_pad=float(MERGED_REGION_ID),
        )  # fmt: skip
        return assemble_features(windows, tuple(x.shape[-2:]))[None]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
        """The values of the image's regions.

        Args:
            image: H x W x 3 uint8 RGB.
            mask: int [H, W] or bool [R, H, W] at the image's size.

        Returns:
            R x D float32 unit rows (cast to fp16 by the store), R = the mask's regions in idx order.

        Raises:
            OvdenseError: the mask is not of the image's size.
        """
        if tuple(mask.shape[-2:]) != tuple(image.shape[:2]):
            raise OvdenseError(
                f"mask is {mask.shape[-2]} x {mask.shape[-1]}, the image {image.shape[0]} x {image.shape[1]} "
                "(masks are made at the EXIF-corrected original size)"
            )
        means = region_means(self.dense(image, mask), mask, normalize_pixels=False)
        return F.normalize(means, dim=-1)
