"""Decode pictures as an image viewer shows them: H x W x 3 uint8 RGB, one set of rules for every reader.

Every place that turns a picture into pixels (the predictor, the benchmark and COCO-panoptic readers, the
distillation dataset) goes through :func:`decode_image` (files, bytes, PIL images) or :func:`as_rgb8_array`
(arrays). The rules (:func:`to_rgb8`):

- **8-bit** RGB, L, 1, P without transparency, CMYK, YCbCr, HSV, LAB: Pillow's ``convert("RGB")``, bit for bit
  (benchmark numbers do not move).
- **16-bit greyscale** (Pillow modes ``I;16``/``I;16B``/``I;16L``/``I;16N``, and ``I`` with values in 0..65535,
  which is how Pillow < 11 opens 16-bit PNGs and how it opens 16-bit PGMs): scaled to 8 bits as a viewer does,
  ``round(v * 255 / 65535)``, computed exactly as ``(v + 128) // 257`` (the two agree for every v: v / 257 is
  never a half-integer). Pillow's ``convert("RGB")`` would clip them at 255, a white picture. ``I`` values
  outside 0..65535 and float (``F``) images are refused: there is no single viewer rule for them.
- **16-bit colour** PNG/TIFF (48/64-bit RGB(A), 32-bit grey+alpha): Pillow opens them as 8-bit RGB(A) keeping
  only the high byte of each value (v >> 8, e.g. 129 -> 0 where a viewer shows 1) and, for a 16-bit ``tRNS``
  colour, compares 16-bit key values with the 8-bit pixels. These are decoded with OpenCV (imported only then)
  to their 16-bit values and scaled like 16-bit grey; the EXIF orientation is applied from Pillow's reading of
  the tags.
- **Transparency** (RGBA, LA, PA, RGBa, La, or a ``transparency`` entry on P/L/RGB/1/16-bit grey): composited
  over a **white** background, what a browser or viewer shows on a white page: per channel
  ``out = round(c * a / 255 + 255 * (1 - a / 255))`` = ``(c * a + 255 * (255 - a) + 127) // 255`` (exact: the
  quotient is never a half-integer). 16-bit colour and alpha are first scaled to 8 bits, then composited.
- **EXIF orientation** is applied when ``exif=True`` (``ImageOps.exif_transpose``), as cv2 and viewers do.
- Multi-frame files (GIF, TIFF, APNG): the first frame.

Size limit (decompression bombs): an image over :func:`get_max_pixels` pixels is refused with
:class:`ImageTooLargeError` after Pillow's lazy ``Image.open`` (header only) and before any pixel is decoded.
The limit defaults to Pillow's default ``Image.MAX_IMAGE_PIXELS`` (:data:`DEFAULT_MAX_PIXELS`, 89.5 MP), is set
by the environment variable ``OVDENSE_MAX_PIXELS`` (an integer, ``0`` = no limit) or by :func:`set_max_pixels`
(which wins over the variable). Pillow's own check is kept out of the way for images within our limit: its
``DecompressionBombWarning`` is ignored inside the decode (``warnings.catch_warnings``, which on Python < 3.14
swaps the process's warning filters while it runs), and when it raises ``DecompressionBombError`` (over twice
its limit) the image is opened again with ``Image.MAX_IMAGE_PIXELS`` lifted, under a lock and restored after;
other threads calling Pillow directly at that moment see no Pillow limit.

This module imports only numpy and Pillow at import time (the CLI must start fast).
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidArgumentError, OvdenseError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "ImageDecodeError",
    "ImageTooLargeError",
    "as_rgb8_array",
    "decode_image",
    "get_max_pixels",
    "set_max_pixels",
    "to_rgb8",
]

#: Pillow's default ``Image.MAX_IMAGE_PIXELS`` (``1024 ** 3 // 4 // 3`` = 89,478,485 px, about 89.5 MP).
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
#: Environment variable holding the pixel limit (an integer; 0 = no limit).
MAX_PIXELS_ENV = "OVDENSE_MAX_PIXELS"

_GREY16_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Pillow rawmodes of 16-bit-per-channel colour data it reduces to 8 bits by keeping the high byte
# ("BGR;16" and the like are packed 5-6-5 pixels, not 16-bit channels, hence the anchored names).
_WIDE_COLOUR_RAWMODE = re.compile(r"^(RGB|RGBA|RGBX|LA);16[BLN]$")
# What Pillow raises for corrupt, truncated or unsupported data, at open or at load.
_PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)

_override: int | None = None
_LIFT_LOCK = threading.Lock()


class ImageDecodeError(OvdenseError):
    """An image that cannot be decoded (missing, corrupt, truncated, unsupported, too large).

    Attributes:
        reason: the cause without the image's name (for callers that name the image themselves).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason

    def __reduce__(self):
        # pickles whole (multiprocessing hands errors between processes): message and reason
        return type(self), (str(self), self.reason)


class ImageTooLargeError(ImageDecodeError):
    """An image with more pixels than :func:`get_max_pixels` allows."""


# -- the pixel limit -----------------------------------------------------------------------------------------


def set_max_pixels(n: int | None) -> None:
    """Set the largest image (width x height pixels) this process decodes; ``0`` = no limit.

    ``None`` goes back to ``OVDENSE_MAX_PIXELS`` or the default. The setting is per process: DataLoader
    workers started with ``spawn`` see only the environment variable.

    Raises:
        InvalidArgumentError: ``n`` is not a whole number >= 0.
    """
    global _override
    if n is None:
        _override = None
        return
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidArgumentError(f"max_pixels: expected a whole number of pixels >= 0 (0 = no limit), got {n!r}")
    _override = int(n)


def get_max_pixels() -> int:
    """The pixel limit in force (0 = no limit): :func:`set_max_pixels`, else ``OVDENSE_MAX_PIXELS``, else 89.5 MP.

    Raises:
        OvdenseError: ``OVDENSE_MAX_PIXELS`` is not an integer >= 0.
    """
    if _override is not None:
        return _override
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise OvdenseError(f"{MAX_PIXELS_ENV}={text!r}: expected a whole number of pixels >= 0 (0 = no limit)")
    return value


def _amount(n: int) -> str:
    return f"{n / 1e6:.1f} MP" if n >= 100_000 else f"{n} pixel" + ("" if n == 1 else "s")


def _check_size(size: tuple[int, int], label: str) -> None:
    limit = get_max_pixels()
    w, h = size
    if limit and w * h > limit:
        reason = (
            f"{w} x {h} = {_amount(w * h)}, over the {_amount(limit)} limit; "
            f"raise it with --max-pixels or {MAX_PIXELS_ENV} (0 = no limit)"
        )
        raise ImageTooLargeError(f"{label} is {reason}", reason)


def _within_pillow_limits(fn: Callable[[], np.ndarray]) -> np.ndarray:
    """``fn()`` (an open + decode that checks our limit first) with Pillow's own bomb check out of the way."""
    try:
        with warnings.catch_warnings():
            # our limit is checked instead; a stray RuntimeWarning would say nothing the user can act on
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return fn()
    except Image.DecompressionBombError:
        pass
    # Pillow refuses over twice its limit before we see the size (at open, or for TIFF tiles and GIF frames at
    # load): again with its limit lifted; fn checks ours after the header-only open, before decoding.
    with _LIFT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return fn()
        finally:
            Image.MAX_IMAGE_PIXELS = saved


# -- decoding ------------------------------------------------------------------------------------------------


def decode_image(source, *, exif: bool = True, what: str | None = None) -> np.ndarray:
    """Decode a picture as a viewer shows it (the module docstring has the rules).

    Args:
        source: a path (``str`` or ``os.PathLike``), encoded bytes (``bytes``, ``bytearray``, ``memoryview``),
            or an open PIL image (not closed; best not yet loaded, so 16-bit colour keeps its low bytes).
        exif: apply the EXIF orientation (viewers, cv2 and mmseg do); ``False`` keeps the stored pixel layout.
        what: how messages name the image; default the path for a path, nothing for bytes or a PIL image.

    Returns:
        H x W x 3 uint8 RGB array, C-contiguous, writable, owning its data.

    Raises:
        ImageDecodeError (an OvdenseError): missing file, not an image, corrupt or truncated data, an
            unsupported mode (float, 32-bit integers outside 0..65535).
        ImageTooLargeError (an ImageDecodeError): more than :func:`get_max_pixels` pixels.
        InvalidArgumentError: ``source`` of another type.
    """
    if isinstance(source, Image.Image):
        label = _label(what)
        im = source
        return _guard(lambda: _within_pillow_limits(lambda: _decode_open(im, exif, label, None)), label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        label = _label(what)

        def run() -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:
                return _decode_open(im, exif, label, lambda: data)

        return _guard(lambda: _within_pillow_limits(run), label)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = _label(what if what is not None else str(path))
        if not path.exists():
            raise ImageDecodeError(f"image not found: {path}", "not found")
        if not path.is_file():
            raise ImageDecodeError(f"cannot read {label}: not a file", "not a file")

        def run() -> np.ndarray:
            with Image.open(path) as im:
                return _decode_open(im, exif, label, path.read_bytes)

        return _guard(lambda: _within_pillow_limits(run), label)
    raise InvalidArgumentError(f"image: expected a path, bytes or a PIL image, got {type(source).__name__}")


def to_rgb8(im: Image.Image, *, what: str | None = None) -> np.ndarray:
    """The pixels of a PIL image under this module's rules, without EXIF orientation or the size limit.

    A 16-bit colour image must not have been loaded yet (its file is re-read for the 16-bit values); once
    Pillow has loaded it, only the high bytes are left and those are what is converted.

    Returns:
        H x W x 3 uint8 RGB array, C-contiguous, writable, owning its data.

    Raises:
        ImageDecodeError: an unsupported mode (``F``, ``I`` outside 0..65535, a mode Pillow cannot convert).
    """
    label = _label(what)
    return _guard(lambda: _to_rgb8(im, label, None), label)


def as_rgb8_array(arr) -> np.ndarray:
    """An image array as H x W x 3 uint8 RGB under the same rules as files.

    Accepted: H x W (grey), H x W x 1, H x W x 2 (grey + alpha), H x W x 3 (RGB), H x W x 4 (RGBA), channels in
    RGB order (convert cv2's BGR first), of dtype uint8, uint16 (scaled ``(v + 128) // 257``, alpha too, before
    compositing) or bool (False -> 0, True -> 255, as Pillow's 1-bit images). Alpha is composited over white
    (``(c * a + 255 * (255 - a) + 127) // 255``).

    Returns:
        H x W x 3 uint8 RGB array, C-contiguous, writable, a new array (never a view of ``arr``).

    Raises:
        InvalidArgumentError: another shape, an empty image, float or other dtypes.
    """
    a = np.asarray(arr)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * np.uint8(255)
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2:
        a = _scale16(a)
    elif a.dtype.kind == "f":
        raise InvalidArgumentError(
            f"image: float arrays are not supported (got {a.dtype}); convert to uint8, "
            "e.g. np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8) for values in 0..1"
        )
    elif a.dtype != np.uint8:
        raise InvalidArgumentError(f"image: expected a uint8, uint16 or bool array, got {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise InvalidArgumentError(
            f"image: expected an H x W, H x W x 3 (RGB) or H x W x 4 (RGBA) array, got shape {np.shape(arr)}"
        )
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InvalidArgumentError(f"image: the array is empty (shape {np.shape(arr)})")
    if a.shape[2] in (2, 4):
        a = _over_white(a[:, :, :-1], a[:, :, -1:])
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    # np.array copies (copy=True): the result never aliases the caller's array
    return np.array(a, dtype=np.uint8, order="C")


def _label(what: str | None) -> str:
    return f"image {what}" if what else "image"


def _guard(fn: Callable[[], np.ndarray], label: str) -> np.ndarray:
    """``fn()`` with Pillow's and the OS's errors as one-line :class:`ImageDecodeError`."""
    try:
        return fn()
    except OvdenseError:
        raise  # ours already say what to do (InvalidArgumentError is a ValueError: not re-wrapped)
    except UnidentifiedImageError:
        # Pillow's message names a file object or buffer, which says nothing more
        raise ImageDecodeError(
            f"cannot read {label}: not a recognised image format", "not a recognised image format"
        ) from None
    except FileNotFoundError:
        raise ImageDecodeError(f"{label} not found", "not found") from None
    except _PIL_ERRORS as err:
        text = str(err).strip()
        reason = text.splitlines()[0] if text else type(err).__name__
        raise ImageDecodeError(f"cannot read {label}: {reason}", reason) from None


def _decode_open(im: Image.Image, exif: bool, label: str, raw: Callable[[], bytes] | None) -> np.ndarray:
    # the size first: the open only read the header, nothing is decoded yet
    _check_size(im.size, label)
    if _is_wide_colour(im):
        arr = _decode16(im, label, raw)
        if exif:
            arr = _orient(arr, im.getexif().get(0x0112, 1))
        return as_rgb8_array(arr)
    if exif:
        im = ImageOps.exif_transpose(im)
    return _to_rgb8(im, label, raw)


def _to_rgb8(im: Image.Image, label: str, raw: Callable[[], bytes] | None) -> np.ndarray:
    mode = im.mode
    if _is_wide_colour(im):
        return as_rgb8_array(_decode16(im, label, raw))
    if mode in _GREY16_MODES or mode == "I":
        return _grey16(im, label)
    if mode == "F":
        reason = "float (mode F) images are not supported; convert the image to 8 or 16 bits"
        raise ImageDecodeError(f"cannot read {label}: {reason}", reason)
    try:
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = np.asarray(im.convert("RGBA"))
            return np.ascontiguousarray(_over_white(rgba[:, :, :3], rgba[:, :, 3:]))
        return np.array(im.convert("RGB"))
    except ValueError as err:  # Pillow's "conversion from X to Y not supported"
        reason = f"mode {mode} cannot be converted to RGB ({err})"
        raise ImageDecodeError(f"cannot read {label}: {reason}", reason) from None


def _grey16(im: Image.Image, label: str) -> np.ndarray:
    v = np.asarray(im)
    if im.mode == "I" and v.size:
        lo, hi = int(v.min()), int(v.max())
        if lo < 0 or hi > 65535:
            reason = (
                f"32-bit integer (mode I) values {lo}..{hi} are outside 0..65535, the 16-bit range this reads; "
                "convert the image to 8 or 16 bits"
            )
            raise ImageDecodeError(f"cannot read {label}: {reason}", reason)
    grey = _scale16(v)[:, :, None]
    key = im.info.get("transparency")
    if isinstance(key, int):
        # a tRNS grey key: that exact 16-bit value is transparent (Pillow's convert("RGBA") ignores it here)
        alpha = np.where(v == key, 0, 255).astype(np.uint8)[:, :, None]
        grey = _over_white(grey, alpha)
    return np.ascontiguousarray(np.repeat(grey, 3, axis=2))


def _scale16(v: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 as ``round(v * 255 / 65535)``, exactly ``(v + 128) // 257``."""
    return ((v.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _over_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """uint8 colour (H x W x C) over white with uint8 alpha (H x W x 1): round(c a / 255 + 255 (1 - a / 255))."""
    c = colour.astype(np.uint32)
    a = alpha.astype(np.uint32)
    return ((c * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _is_wide_colour(im: Image.Image) -> bool:
    # Only an image not yet loaded still says (in its tile) that the file holds 16-bit channels.
    tile = getattr(im, "tile", None)
    if not tile or im.mode not in ("RGB", "RGBA"):
        return False
    args = tile[0][3]
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and bool(_WIDE_COLOUR_RAWMODE.match(rawmode))


def _decode16(im: Image.Image, label: str, raw: Callable[[], bytes] | None) -> np.ndarray:
    """The 16-bit values of a 16-bit colour image: H x W x 3 or x 4 (RGB(A) order), uint16."""
    import cv2  # only for 16-bit colour files: Pillow cannot give their low bytes

    if raw is not None:
        data = raw()
    else:
        fp = getattr(im, "fp", None)
        if fp is None or getattr(fp, "closed", False):
            reason = "a 16-bit colour image whose file is no longer open; pass its path or bytes"
            raise ImageDecodeError(f"cannot read {label}: {reason}", reason)
        fp.seek(0)
        data = fp.read()
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        reason = "OpenCV could not decode its 16-bit colour data"
        raise ImageDecodeError(f"cannot read {label}: {reason}", reason)
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[:, :, ::-1]  # cv2's BGR
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, [2, 1, 0, 3]]  # cv2's BGRA
    return arr


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to an H x W (x C) array, as ``ImageOps.exif_transpose`` does."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return arr[:, ::-1]
    if orientation == 3:  # ROTATE_180
        return arr[::-1, ::-1]
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return arr[::-1]
    if orientation == 5:  # TRANSPOSE
        return arr.swapaxes(0, 1)
    if orientation == 6:  # ROTATE_270 (90 degrees clockwise)
        return np.rot90(arr, -1)
    if orientation == 7:  # TRANSVERSE
        return arr[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:  # ROTATE_90 (counter-clockwise)
        return np.rot90(arr, 1)
    return arr
