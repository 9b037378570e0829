"""The mmseg-style inference protocol of SCLIP / NACLIP / ClearCLIP / DeCLIP, as pure tensor functions.

The reference segmentors resize the image with mmcv's ``imrescale``, slide a window over the network-size
image one crop at a time, average the upsampled cosine maps of overlapping windows, upsample the average to
the original image size, and turn cosines into labels with a softmax over all class names followed by a max
over each class's names. This module reproduces those steps exactly; the one liberty taken is running
windows through the encoder in batches, which gives the same numbers because every window has the same size.

The work is split in two so that an image can be encoded once and segmented with many class lists:
:func:`encode_windows` runs the image tower, :func:`assemble_cosine_maps` applies text embeddings.
:func:`slide_cosine_maps` does both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "WindowFeatures",
    "assemble_cosine_maps",
    "assemble_features",
    "cosine_to_labels",
    "encode_windows",
    "mmseg_resize",
    "patch_padding",
    "slide_cosine_maps",
    "sliding_windows",
]

Window = tuple[int, int, int, int]

# Upsampled maps of one assembly chunk (windows x names x pixels) are capped at this many elements
# (256 MiB in float32) so that many classes and large crops cannot exhaust memory.
_MAX_CHUNK_ELEMENTS = 1 << 26


def mmseg_resize_size(height: int, width: int, long_side: int, short_side: int) -> tuple[int, int]:
    """The ``(height, width)`` :func:`mmseg_resize` gives an image, without resizing it.

    mmseg's rule (mmcv ``imrescale``): the factor ``f = min(L / long, S / short)`` with ``L``, ``S`` the larger and
    smaller of the two bounds (mmcv takes max/min of the scale tuple, so their order does not matter) and ``long``,
    ``short`` the image's sides; each side becomes ``int(x * f + 0.5)``. A side of 0 means the image is too
    elongated for the bounds.
    """
    big, small = max(long_side, short_side), min(long_side, short_side)
    f = min(big / max(height, width), small / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


def mmseg_resize(image: np.ndarray, long_side: int, short_side: int) -> np.ndarray:
    """Resize like mmseg's ``Resize(scale=(long_side, short_side), keep_ratio=True)`` (mmcv ``imrescale``).

    The scale factor is the largest that keeps the long side within ``long_side`` and the short side within
    ``short_side``; the new sizes round half up (``int(x * f + 0.5)``), and the uint8 array is resized by
    OpenCV's bilinear filter, as mmcv does.

    Args:
        image: H x W x 3 uint8 RGB (any channel order works: the filter is per channel).
        long_side: bound on the longer side after resizing.
        short_side: bound on the shorter side after resizing.

    Returns:
        H' x W' x 3 uint8.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if long_side <= 0 or short_side <= 0:
        raise ValueError(f"resize sides must be positive (got {long_side}, {short_side})")
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    new_h, new_w = mmseg_resize_size(h, w, long_side, short_side)
    if new_w <= 0 or new_h <= 0:
        raise ValueError(f"image of shape {image.shape} would be resized to {new_h} x {new_w}")
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name} must be an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _is_whole_image(crop) -> bool:
    if crop is None:
        return True
    if isinstance(crop, (tuple, list)):
        return all(c == 0 for c in crop)
    return crop == 0


def sliding_windows(
    height: int, width: int, crop: int | tuple[int, int] | None, stride: int | tuple[int, int] | None
) -> list[Window]:
    """The windows of mmseg's ``slide_inference``, rows outer and columns inner.

    Windows are ``min(crop, H) x min(crop, W)``; the last row and column are shifted back so that they end
    at the image border. With ``stride > crop`` the windows leave gaps (mmseg asserts on that later).

    Args:
        height, width: image size in pixels.
        crop: window size (``h, w`` or one int); ``0`` or ``None`` gives one window over the whole image.
        stride: step between windows (``h, w`` or one int); ignored for a whole-image window.

    Returns:
        list of ``(y1, y2, x1, x2)``, end-exclusive.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (got {height} x {width})")
    if _is_whole_image(crop):
        return [(0, height, 0, width)]
    crop_h, crop_w = _pair(crop, "crop")
    if crop_h <= 0 or crop_w <= 0:
        raise ValueError(f"crop must be positive or 0 for the whole image (got {crop!r})")
    if stride is None:
        raise ValueError("stride is required when crop > 0")
    stride_h, stride_w = _pair(stride, "stride")
    if stride_h <= 0 or stride_w <= 0:
        raise ValueError(f"stride must be positive (got {stride!r})")
    h_grids = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    w_grids = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride_h + crop_h, height)
            x2 = min(j * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


def patch_padding(height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
    """ClearCLIP's centred zero padding of a window to a multiple of the patch size.

    The odd pixel goes right / bottom.

    Returns:
        ``(left, right, top, bottom)``, the order ``F.pad`` takes for the last two dimensions.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be positive (got {patch_size})")
    left = right = top = bottom = 0
    if width % patch_size:
        lr = patch_size - width % patch_size
        left, right = lr // 2, lr - lr // 2
    if height % patch_size:
        tb = patch_size - height % patch_size
        top, bottom = tb // 2, tb - tb // 2
    return left, right, top, bottom


@dataclass
class WindowFeatures:
    """Dense features of every sliding window of one image, before any text is applied.

    Attributes:
        features: num_windows x D x h' x w' L2-normalised features, in the encoder's dtype.
        windows: the ``(y1, y2, x1, x2)`` of each window, in mmseg order.
        image_size: ``(H, W)`` of the network input the windows tile.
        window_size: ``(h, w)`` of every window before padding.
        padding: ``(left, right, top, bottom)`` zero padding added to every window before encoding.
    """

    features: torch.Tensor
    windows: list[Window]
    image_size: tuple[int, int]
    window_size: tuple[int, int]
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)


def pad_maps(maps: torch.Tensor, padding: tuple[int, int, int, int], values: float | Sequence[float | None]):
    """Pad B x K x h x w maps by ``padding`` (left, right, top, bottom): map k with ``values[k]``, or by repeating
    its edge where that is None; one number pads every map with it."""
    if not isinstance(values, Sequence):
        return F.pad(maps, padding, value=values)
    if len(values) != maps.shape[1]:
        raise ValueError(f"{len(values)} padding values for {maps.shape[1]} maps")
    parts = []
    for k, value in enumerate(values):
        one = maps[:, k : k + 1]
        parts.append(F.pad(one, padding, mode="replicate") if value is None else F.pad(one, padding, value=value))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def encode_windows(
    image: torch.Tensor,
    encode_dense: Callable[[torch.Tensor], torch.Tensor],
    crop: int | tuple[int, int] | None,
    stride: int | tuple[int, int] | None,
    window_batch: int = 16,
    pad_to_patch: int = 0,
    progress: Callable[[int, int], None] | None = None,
    extra: torch.Tensor | None = None,
    extra_pad: float | Sequence[float | None] = 0.0,
) -> WindowFeatures:
    """Run the image tower over every sliding window, ``window_batch`` windows per call.

    Args:
        image: 1 x 3 x H x W normalised network input.
        encode_dense: maps B x 3 x h x w to B x D x h' x w' L2-normalised dense features; with ``extra``,
            called as ``encode_dense(batch, extra_batch)``.
        crop, stride: see :func:`sliding_windows`.
        window_batch: most windows per ``encode_dense`` call; bounds memory, does not change results.
        pad_to_patch: if > 0, zero-pad each window (centred) to a multiple of this patch size first.
        progress: called as ``progress(windows_done, windows_total)`` after each batch.
        extra: 1 x K x H x W maps cut into the same windows (region ids of CorrCLIP), padded with ``extra_pad``.
        extra_pad: the padding value of every extra map, or one per map, where None repeats the window's edge
            (replicate padding: CorrCLIPv2's pixel coordinates).

    Returns:
        :class:`WindowFeatures` holding num_windows x D x h' x w' features.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected a 1 x C x H x W image, got shape {tuple(image.shape)}")
    if window_batch < 1:
        raise ValueError(f"window_batch must be >= 1 (got {window_batch})")
    if pad_to_patch < 0:
        raise ValueError(f"pad_to_patch must be >= 0 (got {pad_to_patch})")
    height, width = image.shape[-2:]
    windows = sliding_windows(height, width, crop, stride)
    y1, y2, x1, x2 = windows[0]
    win_h, win_w = y2 - y1, x2 - x1
    padding = patch_padding(win_h, win_w, pad_to_patch) if pad_to_patch > 0 else (0, 0, 0, 0)

    chunks = []
    for start in range(0, len(windows), window_batch):
        chunk = windows[start : start + window_batch]
        batch = torch.cat([image[:, :, a:b, c:d] for a, b, c, d in chunk])
        if any(padding):
            batch = F.pad(batch, padding)
        if extra is None:
            feats = encode_dense(batch)
        else:
            extra_batch = torch.cat([extra[:, :, a:b, c:d] for a, b, c, d in chunk])
            if any(padding):
                extra_batch = pad_maps(extra_batch, padding, extra_pad)
            feats = encode_dense(batch, extra_batch)
        if feats.ndim != 4 or feats.shape[0] != batch.shape[0]:
            raise ValueError(
                f"encode_dense must return B x D x h' x w' with B={batch.shape[0]}, got {tuple(feats.shape)}"
            )
        chunks.append(feats)
        if progress is not None:
            progress(min(start + window_batch, len(windows)), len(windows))
    return WindowFeatures(
        features=torch.cat(chunks),
        windows=windows,
        image_size=(int(height), int(width)),
        window_size=(win_h, win_w),
        padding=padding,
    )


@torch.no_grad()
def assemble_cosine_maps(
    windows: WindowFeatures,
    text_embeddings: torch.Tensor,
    out_size: tuple[int, int],
    max_chunk_elements: int = _MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Average the windows' upsampled cosine maps over the image, then resize to the original size.

    Per window: cosines of features and text (no scale, no softmax), bilinear (``align_corners=False``) to
    the padded window size, padding cut off, summed into a canvas at the window's place; the canvas is
    divided by the per-pixel window count and resized bilinearly to ``out_size``. Windows are added in
    mmseg order so the sums round exactly as the references' loop does. Everything from the cosines on is
    float32, whatever the encoder's dtype.

    Args:
        windows: output of :func:`encode_windows` (num_windows x D x h' x w' features).
        text_embeddings: N x D L2-normalised name embeddings.
        out_size: ``(H0, W0)``, the original image size.
        max_chunk_elements: bound on windows x N x h x w upsampled values held at once.

    Returns:
        1 x N x H0 x W0 float32 cosine maps.
    """
    feats = windows.features
    if text_embeddings.ndim != 2 or text_embeddings.shape[1] != feats.shape[1]:
        raise ValueError(f"text embeddings must be N x {feats.shape[1]}, got shape {tuple(text_embeddings.shape)}")
    height, width = windows.image_size
    win_h, win_w = windows.window_size
    left, right, top, bottom = windows.padding
    padded = (win_h + top + bottom, win_w + left + right)
    n_names = text_embeddings.shape[0]
    text = text_embeddings.to(device=feats.device, dtype=torch.float32)

    canvas = torch.zeros((1, n_names, height, width), dtype=torch.float32, device=feats.device)
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=feats.device)
    chunk = max(1, max_chunk_elements // max(1, n_names * padded[0] * padded[1]))
    for start in range(0, len(windows.windows), chunk):
        block = feats[start : start + chunk].float()
        # One (h'w' x D) @ (D x N) product per window, the references' exact operation: a batched einsum
        # rounds differently with the batch size, which would make results depend on the chunking.
        cos = torch.stack([(f.flatten(1).T @ text.T).T.reshape(n_names, *f.shape[1:]) for f in block])
        maps = F.interpolate(cos, size=padded, mode="bilinear", align_corners=False)
        maps = maps[:, :, top : top + win_h, left : left + win_w]
        for k, (y1, y2, x1, x2) in enumerate(windows.windows[start : start + chunk]):
            canvas[:, :, y1:y2, x1:x2] += maps[k : k + 1]
            count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise ValueError("the sliding windows leave pixels uncovered (stride larger than crop?)")
    canvas = canvas / count
    return F.interpolate(canvas, size=tuple(out_size), mode="bilinear", align_corners=False)


@torch.no_grad()
def assemble_features(
    windows: WindowFeatures,
    out_size: tuple[int, int] | None = None,
    max_chunk_elements: int = _MAX_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """The windows' dense features assembled into one map of the image, the way the cosine maps are.

    Per window: features bilinear (``align_corners=False``) to the padded window size, padding cut off, summed
    into a canvas of the network input at the window's place; divided by the per-pixel window count and resized
    bilinearly to ``out_size``. Every step is linear, so ``einsum("dhw,nd->nhw", assemble_features(w, size),
    text)`` equals :func:`assemble_cosine_maps` ``(w, text, size)`` to float32 rounding. The averaged features
    are not unit vectors where windows overlap: normalise them for cosines between tokens.

    Args:
        windows: output of :func:`encode_windows` (num_windows x D x h' x w').
        out_size: ``(H', W')``; default the features' own resolution over the whole network input (its size
            times the features' cells per padded window pixel, e.g. H/16 x W/16 for a /16 tower).
        max_chunk_elements: bound on the channels x H x W canvas held at once (channels are done in chunks).

    Returns:
        D x H' x W' float32.
    """
    feats = windows.features
    height, width = windows.image_size
    win_h, win_w = windows.window_size
    left, right, top, bottom = windows.padding
    padded = (win_h + top + bottom, win_w + left + right)
    if out_size is None:
        out_size = (
            max(1, round(height * feats.shape[-2] / padded[0])),
            max(1, round(width * feats.shape[-1] / padded[1])),
        )
    channels = max(1, max_chunk_elements // max(1, height * width))
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=feats.device)
    for y1, y2, x1, x2 in windows.windows:
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):
        raise ValueError("the sliding windows leave pixels uncovered (stride larger than crop?)")
    parts = []
    for start in range(0, feats.shape[1], channels):
        canvas = torch.zeros((1, min(channels, feats.shape[1] - start), height, width), device=feats.device)
        for k, (y1, y2, x1, x2) in enumerate(windows.windows):
            f = F.interpolate(feats[k : k + 1, start : start + channels].float(), size=padded, mode="bilinear",
                              align_corners=False)  # fmt: skip
            canvas[:, :, y1:y2, x1:x2] += f[:, :, top : top + win_h, left : left + win_w]
        parts.append(F.interpolate(canvas / count, size=tuple(out_size), mode="bilinear", align_corners=False)[0])
    return torch.cat(parts)


@torch.no_grad()
def slide_cosine_maps(
    image: torch.Tensor,
    encode_dense: Callable[[torch.Tensor], torch.Tensor],
    text_embeddings: torch.Tensor,
    crop: int | tuple[int, int] | None,
    stride: int | tuple[int, int] | None,
    out_size: tuple[int, int],
    window_batch: int = 16,
    pad_to_patch: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Sliding-window cosine maps at the original image size (:func:`encode_windows` then assembly).

    Args:
        image: 1 x 3 x H x W normalised network input.
        encode_dense: maps B x 3 x h x w to B x D x h' x w' L2-normalised dense features.
        text_embeddings: N x D L2-normalised name embeddings.
        crop, stride: see :func:`sliding_windows`; ``crop=0`` runs the whole image at once.
        out_size: ``(H0, W0)``, the original image size.
        window_batch: most windows per ``encode_dense`` call.
        pad_to_patch: if > 0, zero-pad windows (centred) to a multiple of this patch size.
        progress: called as ``progress(windows_done, windows_total)``.

    Returns:
        1 x N x H0 x W0 float32 cosine maps.
    """
    feats = encode_windows(image, encode_dense, crop, stride, window_batch, pad_to_patch, progress)
    return assemble_cosine_maps(feats, text_embeddings, out_size)


@torch.no_grad()
def cosine_to_labels(
    cosine: torch.Tensor,
    name_to_class: torch.Tensor,
    logit_scale: float,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from cosine maps: softmax over all names, max over each class's names, then thresholds.

    Args:
        cosine: N x H x W cosines over all names.
        name_to_class: N int64, the class (0..C-1) of each name (C = max + 1).
        logit_scale: multiplies the cosines before the softmax.
        prob_thd: pixels whose best class probability is below it become class 0.
        area_thd: SCLIP's rule (VOC21): classes c >= 1 predicted on at most ``area_thd`` times the pixels
            predicted as any class >= 1 get probability 0 everywhere, so their pixels fall to their
            next-best class. Class 0 is never dropped. ``None`` turns it off.

    Returns:
        ``(labels, class_probs)``: H x W int64 and C x H x W float32 (after the area rule).
    """
    if cosine.ndim != 3:
        raise ValueError(f"expected N x H x W cosines, got shape {tuple(cosine.shape)}")
    n_names, height, width = cosine.shape
    name_to_class = name_to_class.to(device=cosine.device, dtype=torch.long)
    if name_to_class.shape != (n_names,):
        raise ValueError(f"name_to_class must have {n_names} entries, got shape {tuple(name_to_class.shape)}")
    if n_names == 0 or int(name_to_class.min()) < 0:
        raise ValueError("name_to_class must map at least one name, onto classes >= 0")
    n_classes = int(name_to_class.max()) + 1

    probs = (cosine.float() * logit_scale).softmax(0)
    # Probabilities are >= 0, so a zero start leaves the max over a class's names unchanged (the references
    # multiply by a one-hot name/class matrix and take the max, which is the same thing).
    index = name_to_class.view(n_names, 1, 1).expand(n_names, height, width)
    class_probs = probs.new_zeros((n_classes, height, width)).scatter_reduce(
        0, index, probs, reduce="amax", include_self=True
    )

    if area_thd is not None:
        pred = class_probs.argmax(0)
        area = torch.bincount(pred.flatten(), minlength=n_classes)[1:].to(torch.float32)
        # Compared in float32 with the float32-rounded threshold, as SCLIP does on its tensors, so the
        # a_c == thd * T boundary resolves the same way.
        bound = torch.tensor(area_thd, dtype=torch.float32, device=area.device) * area.sum()
        keep = (area > bound).to(class_probs.dtype)
        class_probs[1:] *= keep.view(-1, 1, 1)

    best = class_probs.max(0).values
    # argmax for the index: its tie rule (first maximum) is documented, and it is what the references call.
    labels = class_probs.argmax(0)
    labels[best < prob_thd] = 0
    return labels, class_probs
