"""Pictures to look at after segmenting: colour overlays with a legend, and label PNGs.

All label maps are H x W integer arrays of class indices. Colours follow the PASCAL VOC colormap
(class 0 black, 1 dark red, 2 dark green, ...), the same one VOC label PNGs and ``imgviz`` use, so a
label PNG of up to 256 classes written here is a palette PNG that opens in any viewer with the usual VOC
colours. Label maps of more classes (ADE-847, PC-459, a long class list) are 16-bit greyscale PNGs whose
pixel value is the class index, like the 16-bit label TIFFs those benchmarks ship with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import OvdenseError
from .fileio import write_atomic
from .ranges import CELL_HEIGHT, FRACTION, check

__all__ = [
    "attention_grid",
    "attention_overlay",
    "blend",
    "class_areas",
    "colorize",
    "display_name",
    "heatmap",
    "label_image",
    "label_palette",
    "legend_font_size",
    "legend_panel",
    "legend_rows",
    "load_font",
    "overlay",
    "prediction_and_truth",
    "save_image_atomic",
    "with_panel",
    "save_label_png",
]

MAX_PALETTE = 256  # a P-mode PNG holds at most 256 colours
# The VOC formula interleaves 8 bits per channel, 3 index bits per step: every index below 2**24 gets its own colour.
MAX_COLOURS = 2**24
MAX_LABEL_VALUE = 65535  # the largest pixel value of a 16-bit label PNG
_PANEL_BG = (255, 255, 255)
_TEXT = (0, 0, 0)
# Swatch outline: grey with channels that are not multiples of 32, so it never equals a VOC colour.
_SWATCH_OUTLINE = (100, 100, 100)
_BOUNDARY = (255, 255, 255)
_MAX_NAME_CHARS = 48


class VizInputError(OvdenseError, ValueError):
    """Bad input to a viz function: a ``ValueError`` that the CLI also reports as a one-line user error."""


# --------------------------------------------------------------------------------------------- colours


def label_palette(num_classes: int = MAX_PALETTE) -> np.ndarray:
    """The PASCAL VOC colormap: ``num_classes`` x 3 uint8 RGB, row ``i`` the colour of class ``i``.

    Class 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0), 3 is (128, 128, 0), ... (bits of the class
    index interleaved into the high bits of R, G, B). The first 256 rows are the VOC palette of label PNGs;
    past them the same formula goes on (rows 0..2**24-1 are pairwise distinct), so 847 classes get 847
    colours. At most 2**24 classes.
    """
    num_classes = int(num_classes)
    if num_classes < 0 or num_classes > MAX_COLOURS:
        raise VizInputError(f"num_classes must be in 0..{MAX_COLOURS}, got {num_classes}")
    idx = np.arange(num_classes, dtype=np.uint32)  # 4 + 3 bytes a class: 2**24 classes stay near 120 MB
    cmap = np.zeros((num_classes, 3), dtype=np.uint8)
    for j in range(8):
        shift = 7 - j
        for channel in range(3):
            cmap[:, channel] |= (((idx >> (3 * j + channel)) & 1) << shift).astype(np.uint8)
    return cmap


def _as_palette(palette, what: str = "palette") -> np.ndarray:
    pal = np.asarray(palette)
    if pal.ndim != 2 or pal.shape[1] != 3:
        raise VizInputError(f"{what} must be N x 3 RGB, got shape {pal.shape}")
    if pal.shape[0] > MAX_COLOURS:
        raise VizInputError(f"{what} has {pal.shape[0]} colours; at most {MAX_COLOURS} are supported")
    if pal.size and (pal.min() < 0 or pal.max() > 255):
        raise VizInputError(f"{what} values must be in 0..255")
    return pal.astype(np.uint8)


def _as_labels(labels, what: str = "labels") -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise VizInputError(f"{what} must be an H x W array, got shape {lab.shape}")
    if lab.dtype.kind == "b":
        lab = lab.astype(np.int64)
    elif lab.dtype.kind not in "iu":
        raise VizInputError(f"{what} must hold integers, got dtype {lab.dtype}")
    return lab


def _check_range(lab: np.ndarray, n: int, what: str) -> None:
    if lab.size == 0:
        return
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= n:
        raise VizInputError(f"label values must be in 0..{n - 1} ({what}), got values in {lo}..{hi}")


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Colour a label map.

    Args:
        labels: H x W integer class indices.
        palette: N x 3 uint8 colours (default: the 256-colour VOC palette); every label must be < N.

    Returns:
        H x W x 3 uint8 RGB image with ``out[y, x] == palette[labels[y, x]]``.
    """
    lab = _as_labels(labels)
    pal = label_palette(MAX_PALETTE) if palette is None else _as_palette(palette)
    _check_range(lab, len(pal), f"the palette has {len(pal)} colours")
    return pal[lab]


# --------------------------------------------------------------------------------------------- overlay


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise VizInputError(f"image must be H x W x 3 RGB, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise VizInputError(f"image must be uint8, got dtype {arr.dtype}")
    return arr[:, :, :3]


def _boundary_mask(lab: np.ndarray) -> np.ndarray:
    """H x W bool: pixels whose right or lower neighbour has another label (1 px thin lines)."""
    edge = np.zeros(lab.shape, dtype=bool)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    return edge


def load_font(size: int):
    """Pillow's default font at ``size`` px (the fixed bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font
        return ImageFont.load_default()


def display_name(name: str) -> str:
    """A class name as a legend or tag shows it: one line, at most the legend's width in characters."""
    name = " ".join(str(name).split())  # no newlines or tabs in a legend row
    if len(name) > _MAX_NAME_CHARS:
        name = name[: _MAX_NAME_CHARS - 3] + "..."
    return name


def legend_font_size(image_height: int) -> int:
    """Legend and title text size for a picture ``image_height`` pixels tall: 1/32 of it, 12..128 px."""
    return int(np.clip(round(image_height / 32), 12, 128))


def legend_panel(entries: list[tuple[tuple[int, int, int] | None, str]], image_height: int) -> Image.Image:
    """A white panel listing (colour, name) rows; sizes scale with ``image_height``."""
    font_size = legend_font_size(image_height)
    font = load_font(font_size)
    swatch = max(8, round(font_size * 1.1))
    pad = max(4, round(font_size * 0.6))
    gap = max(4, round(font_size * 0.5))
    col_gap = max(8, round(font_size * 1.2))
    outline = 1 if swatch < 24 else max(1, swatch // 24)

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for _, text in entries]
    text_w = [b[2] - b[0] for b in boxes]
    text_h = max(max((b[3] - b[1] for b in boxes), default=0), font_size)
    row_h = max(swatch, text_h) + max(3, round(font_size * 0.4))

    # Several columns when a tall list would make the picture much taller than the image.
    rows_per_col = max(12, (image_height - 2 * pad) // row_h)
    ncols = -(-len(entries) // rows_per_col)
    nrows = -(-len(entries) // ncols)
    has_swatch = any(colour is not None for colour, _ in entries)
    lead = swatch + gap if has_swatch else 0
    col_w = [lead + max(text_w[c * nrows : (c + 1) * nrows]) for c in range(ncols)]
    width = 2 * pad + sum(col_w) + col_gap * (ncols - 1)
    height = 2 * pad + nrows * row_h

    panel = Image.new("RGB", (width, height), _PANEL_BG)
    draw = ImageDraw.Draw(panel)
    x0 = pad
    for c in range(ncols):
        for r, i in enumerate(range(c * nrows, min((c + 1) * nrows, len(entries)))):
            colour, text = entries[i]
            cy = pad + r * row_h + row_h // 2
            if colour is not None:
                top = cy - swatch // 2
                draw.rectangle(
                    (x0, top, x0 + swatch - 1, top + swatch - 1),
                    fill=colour,
                    outline=_SWATCH_OUTLINE,
                    width=outline,
                )
            left, t, _, b = boxes[i]
            draw.text((x0 + lead - left, cy - (t + b) / 2), text, fill=_TEXT, font=font)
        x0 += col_w[c] + col_gap
    return panel


def _check_names(class_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in class_names]
    if not names:
        raise VizInputError("class_names is empty")
    if len(names) > MAX_COLOURS:
        raise VizInputError(f"{len(names)} classes; at most {MAX_COLOURS} can be coloured")
    return names


def _check_background(background: int | None, n: int) -> int | None:
    if background is None:
        return None
    if isinstance(background, bool) or not isinstance(background, (int, np.integer)) or not 0 <= background < n:
        raise VizInputError(f"background must be a class index in 0..{n - 1} or None, got {background!r}")
    return int(background)


def blend(image, labels: np.ndarray, num_classes: int, alpha: float = 0.5, background: int | None = None) -> np.ndarray:
    """The image with each pixel's class colour blended in (no legend).

    Args:
        image: H x W x 3 uint8 RGB array (H x W grey and H x W x 4 are accepted too) or a PIL image.
        labels: H x W integer class indices; values outside 0..num_classes-1 (255 "void", -1) are unlabelled.
        num_classes: classes coloured with the VOC palette (:func:`label_palette`, any number).
        alpha: colour opacity in 0..1: ``rint(image.astype(float32) * (1 - alpha) + colour * alpha)``.
        background: a class drawn transparent (its pixels keep the image, as unlabelled ones do).

    Returns:
        H x W x 3 uint8.
    """
    rgb = _as_rgb(image)
    lab = _as_labels(labels)
    if lab.shape != rgb.shape[:2]:
        raise VizInputError(f"labels shape {lab.shape} does not match image size {rgb.shape[:2]}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise VizInputError("image is empty")
    alpha = float(check("alpha", alpha, FRACTION))
    n = int(num_classes)
    pal = label_palette(n)
    valid = (lab >= 0) & (lab < n)
    safe = np.where(valid, lab, 0).astype(np.intp)
    colours = pal[safe].astype(np.float32)
    out = np.rint(rgb.astype(np.float32) * np.float32(1.0 - alpha) + colours * np.float32(alpha)).astype(np.uint8)
    keep = ~valid if background is None else ~valid | (lab == background)
    if keep.any():
        out[keep] = rgb[keep]
    return out


def _percent(fraction: float) -> str:
    if 0 < fraction < 0.0005:
        return "<0.1%"
    return f"{100 * fraction:.1f}%"


def legend_rows(
    labels: np.ndarray, class_names: Sequence[str], background: int | None = None, only_present: bool = True
) -> list[dict]:
    """The rows of a legend, in class order: what :func:`overlay` draws and the demo lists.

    Args:
        labels: H x W (or any shape) integer class indices; values outside 0..n-1 are unlabelled.
        class_names: display name per class.
        background: the background class (named ``background``, no colour), or None.
        only_present: only classes that occur in ``labels``.

    Returns:
        ``[{"index", "name", "colour": (r, g, b) or None for the background, "pixels", "fraction",
        "percent": "42.1%"}]`` with plain Python types; ``fraction`` is pixels / all pixels of ``labels``.
    """
    names = _check_names(class_names)
    background = _check_background(background, len(names))
    lab = np.asarray(labels)
    pal = label_palette(len(names))
    counts = np.bincount(lab[(lab >= 0) & (lab < len(names))].astype(np.intp), minlength=len(names))
    rows = []
    for i in range(len(names)):
        if only_present and counts[i] == 0:
            continue
        fraction = int(counts[i]) / max(1, lab.size)
        rows.append(
            {
                "index": i,
                "name": "background" if i == background else names[i],
                "colour": None if i == background else tuple(int(v) for v in pal[i]),
                "pixels": int(counts[i]),
                "fraction": fraction,
                "percent": _percent(fraction),
            }
        )
    return rows


def _panel_entries(rows: list[dict], percentages: bool) -> list[tuple[tuple[int, int, int] | None, str]]:
    """(swatch colour, text) of each legend row; the background's swatch is empty (white, outlined)."""
    entries = [
        (row["colour"] or _PANEL_BG, display_name(row["name"]) + (f"  {row['percent']}" if percentages else ""))
        for row in rows
    ]
    return entries or [(None, "no classes")]


def with_panel(picture: Image.Image, panel: Image.Image) -> Image.Image:
    """``picture`` with ``panel`` on its right, on white."""
    w, h = picture.size
    canvas = Image.new("RGB", (w + panel.width, max(h, panel.height)), _PANEL_BG)
    canvas.paste(picture, (0, 0))
    canvas.paste(panel, (w, 0))
    return canvas


def overlay(
    image,
    labels: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    legend: bool = True,
    only_present: bool = True,
    *,
    boundaries: bool = False,
    background: int | None = None,
    percentages: bool = False,
) -> Image.Image:
    """The image with each pixel's class colour blended in, and a legend panel on the right.

    Args:
        image: H x W x 3 uint8 RGB array (H x W grey and H x W x 4 are accepted too) or a PIL image.
        labels: H x W integer class indices into ``class_names``. Values outside 0..n-1 (e.g. 255
            "void" or -1) are unlabelled: those pixels keep the image unchanged.
        class_names: display name of each class; class ``i`` gets VOC colour ``label_palette()[i]``.
        alpha: colour opacity in 0..1. Overlay pixels are
            ``rint(image.astype(float32) * (1 - alpha) + colour.astype(float32) * alpha)`` as uint8.
        legend: add a white panel to the right of the image listing classes with a colour swatch and
            their name; font and swatch size scale with the image height.
        only_present: list only the classes that occur in ``labels`` (in class order); "no classes"
            when none do (every pixel unlabelled). ``False`` lists every class.
        boundaries: draw 1 px white lines where the label changes (off by default).
        background: the background class (class 0 of a method with ``prob_thd``, a benchmark's background
            words): drawn transparent, named ``background`` in the legend with an empty swatch.
        percentages: each legend row ends with the class's share of all pixels (``42.1%``).

    Returns:
        RGB PIL image. Its top-left W x H region is the blended image; with a legend, the width is
        ``W + panel width`` and the height ``max(H, panel height)``, the rest filled white.
    """
    names = _check_names(class_names)
    background = _check_background(background, len(names))
    out = blend(image, labels, len(names), alpha, background)
    lab = _as_labels(labels)
    if boundaries:
        out[_boundary_mask(lab)] = _BOUNDARY
    picture = Image.fromarray(out)
    if not legend:
        return picture
    entries = _panel_entries(legend_rows(lab, names, background, only_present), percentages)
    return with_panel(picture, legend_panel(entries, lab.shape[0]))


def _titled(picture: np.ndarray, title: str, font_size: int) -> Image.Image:
    """A picture with a white strip above it holding ``title``."""
    font = load_font(font_size)
    strip = round(font_size * 1.6)
    canvas = Image.new("RGB", (picture.shape[1], picture.shape[0] + strip), _PANEL_BG)
    canvas.paste(Image.fromarray(picture), (0, strip))
    draw = ImageDraw.Draw(canvas)
    left, top, _, bottom = draw.textbbox((0, 0), title, font=font)
    draw.text((max(2, font_size // 3) - left, (strip - (top + bottom)) / 2), title, fill=_TEXT, font=font)
    return canvas


def prediction_and_truth(
    image,
    prediction: np.ndarray,
    truth: np.ndarray,
    class_names: Sequence[str],
    alpha: float = 0.5,
    *,
    background: int | None = None,
    ignore_index: int = 255,
) -> Image.Image:
    """The prediction and the ground truth side by side, titled, with one legend of the classes in either.

    Args:
        image: H x W x 3 uint8 RGB (or a PIL image).
        prediction, truth: H x W class indices into ``class_names``; ``ignore_index`` (and any value outside
            0..n-1) is unlabelled and keeps the image.
        class_names: display name per class.
        alpha, background: as :func:`overlay`.
        ignore_index: the ground truth's "not labelled" value (mmseg's 255).

    Returns:
        RGB PIL image: [prediction | ground truth | legend], each image panel W wide under a title strip.
    """
    names = _check_names(class_names)
    background = _check_background(background, len(names))
    pred, gt = _as_labels(prediction, "prediction"), _as_labels(truth, "truth")
    if pred.shape != gt.shape:
        raise VizInputError(f"prediction shape {pred.shape} differs from the ground truth's {gt.shape}")
    gt = np.where(gt == ignore_index, -1, gt)
    h, w = pred.shape
    font_size = legend_font_size(h)
    left = _titled(blend(image, pred, len(names), alpha, background), "prediction", font_size)
    right = _titled(blend(image, gt, len(names), alpha, background), "ground truth", font_size)
    gap = max(4, font_size // 2)
    pair = Image.new("RGB", (2 * w + gap, left.height), _PANEL_BG)
    pair.paste(left, (0, 0))
    pair.paste(right, (w + gap, 0))
    rows = legend_rows(np.concatenate([pred.reshape(-1), gt.reshape(-1)]), names, background)
    return with_panel(pair, legend_panel(_panel_entries(rows, percentages=False), left.height))


# --------------------------------------------------------------------------------------------- areas


def class_areas(labels: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """Pixel count per class that occurs in ``labels``, largest first (ties: lower index first).

    Args:
        labels: H x W integer class indices into ``class_names``; values outside 0..n-1 (e.g. 255
            "void") are unlabelled and not counted.
        class_names: display name per class.

    Returns:
        ``[{"index": int, "name": str, "pixels": int, "fraction": float}, ...]`` with plain Python
        types (JSON-ready); ``fraction`` is pixels / (H * W), so the fractions sum to 1 when every
        pixel is labelled.
    """
    lab = _as_labels(labels)
    n = len(class_names)
    valid = lab[(lab >= 0) & (lab < n)].astype(np.intp)
    counts = np.bincount(valid, minlength=n)
    total = int(lab.size)
    present = [i for i in range(n) if counts[i] > 0]
    present.sort(key=lambda i: (-int(counts[i]), i))
    return [
        {
            "index": int(i),
            "name": str(class_names[i]),
            "pixels": int(counts[i]),
            "fraction": int(counts[i]) / total,
        }
        for i in present
    ]


# --------------------------------------------------------------------------------------------- files


def save_image_atomic(img: Image.Image, path, format: str | None = None) -> None:
    """Write a PIL image atomically (temp file in the same folder, then ``os.replace``).

    The format comes from ``format``, else the file extension (``.png``, ``.jpg``, ...), else PNG.
    """
    if format is None:
        format = Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    write_atomic(path, lambda f: img.save(f, format=format))


def save_label_png(labels: np.ndarray, path, palette: np.ndarray | None = None, num_classes: int | None = None) -> None:
    """Write a label map as a PNG, atomically: a palette PNG like VOC ``SegmentationClass`` files, or a 16-bit
    greyscale PNG for more than 256 classes (the format rule is :func:`label_image`'s).

    Args:
        labels: H x W integer class indices (pixel value = class index).
        path: output file.
        palette: N x 3 uint8 colours of a palette PNG, N <= 256 and every label < N (default: the 256-colour
            VOC palette, so 255 "void" gets its usual cream colour).
        num_classes: the classes the map's benchmark or class list has: more than 256 writes a 16-bit PNG
            whatever values this map happens to hold, so every file of a run has one format.
    """
    img = label_image(labels, palette, num_classes)
    write_atomic(path, lambda f: img.save(f, format="PNG"))


def label_image(labels: np.ndarray, palette: np.ndarray | None = None, num_classes: int | None = None) -> Image.Image:
    """A label map as a PIL image whose pixel value is the class index (see :func:`save_label_png`).

    The format: a 16-bit greyscale image (mode ``"I;16"``) when ``num_classes`` is over 256, or when it is None,
    no ``palette`` is given and a label is over 255; else a P-mode (palette) image, as VOC label PNGs. A 16-bit
    PNG has no palette; its pixel value is the class index, 0..65535 (ADE-847's and PC-459's unlabelled 65535
    stays 65535), and it reads back with Pillow as uint16 (``np.asarray(Image.open(path))``).

    Args:
        labels: H x W integer class indices: 0..255 (and < the palette's length) for a palette image, 0..65535 for
            a 16-bit one; values past the class count (an ignore value such as 255 or 65535) are kept as they are.
        palette: N x 3 uint8 colours, N <= 256, of a palette image (default: the 256-colour VOC palette); not
            allowed with more than 256 classes.
        num_classes: the number of classes (decides the format, see above); None: decided by the labels.

    Returns:
        ``W x H`` PIL image, mode ``"P"`` or ``"I;16"``.
    """
    lab = _as_labels(labels)
    if lab.size == 0:
        raise VizInputError("labels are empty; a PNG needs at least 1 x 1 pixels")
    lo, hi = int(lab.min()), int(lab.max())
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
            raise VizInputError(f"num_classes must be an integer, got {num_classes!r}")
        if not 0 <= num_classes <= MAX_LABEL_VALUE + 1:
            raise VizInputError(f"num_classes must be in 0..{MAX_LABEL_VALUE + 1} for a label PNG, got {num_classes}")
        wide = num_classes > MAX_PALETTE
    else:
        wide = palette is None and hi > 255
    size = (lab.shape[1], lab.shape[0])
    if wide:
        if palette is not None:
            raise VizInputError(f"a 16-bit label PNG ({num_classes} classes) has no palette; pass palette=None")
        if lo < 0 or hi > MAX_LABEL_VALUE:
            raise VizInputError(f"label values must be in 0..{MAX_LABEL_VALUE} for a 16-bit PNG, got {lo}..{hi}")
        # Explicit little-endian bytes: "I;16" is little-endian in Pillow whatever the machine's byte order.
        return Image.frombytes("I;16", size, np.ascontiguousarray(lab, dtype="<u2").tobytes())
    pal = label_palette(MAX_PALETTE) if palette is None else _as_palette(palette)
    if len(pal) > MAX_PALETTE:
        raise VizInputError(f"palette has {len(pal)} colours; a palette PNG holds at most {MAX_PALETTE}")
    if lo < 0 or hi > 255:
        raise VizInputError(f"label values must be in 0..255 for a palette PNG, got {lo}..{hi}")
    _check_range(lab, len(pal), f"the palette has {len(pal)} colours")
    img = Image.frombytes("P", size, np.ascontiguousarray(lab, dtype=np.uint8).tobytes())
    img.putpalette(pal.reshape(-1).tolist(), rawmode="RGB")
    return img


# --------------------------------------------------------------------------------------------- attention


def heatmap(values: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """A map as colours: min..max of its finite values to the jet colormap, bilinear to ``size`` = (H, W).

    Args:
        values: h x w floats (NaN entries get the lowest colour).
        size: (H, W) of the picture.

    Returns:
        H x W x 3 uint8 RGB, or None when no value is finite (nothing to show).
    """
    import cv2

    v = np.asarray(values, dtype=np.float32)
    finite = np.isfinite(v)
    if not finite.any():
        return None
    lo, hi = float(v[finite].min()), float(v[finite].max())
    scaled = np.where(finite, (v - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
    big = cv2.resize(scaled.astype(np.float32), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    grey = np.clip(np.rint(big * 255), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)[:, :, ::-1].copy()


def attention_overlay(
    image, values: np.ndarray, point: Sequence[float] | None = None, alpha: float = 0.6, font_size: int = 14
) -> Image.Image:
    """One map over its image: :func:`heatmap` blended in, the point (if any) marked with a white ring.

    Args:
        image: H x W x 3 uint8 RGB (or a PIL image) at the size to draw.
        values: h x w map over the whole image (any grid).
        point: (x, y) in the pixels of ``image``.
        alpha: heatmap opacity.
        font_size: size of the ``n/a`` written on a map without finite values.

    Returns:
        H x W RGB PIL image.
    """
    base = _as_rgb(image)
    h, w = base.shape[:2]
    colours = heatmap(values, (h, w))
    if colours is None:
        cell = Image.fromarray((base * 0.3 + 180).astype(np.uint8))
        draw = ImageDraw.Draw(cell)
        font = load_font(font_size)
        left, top, right, bottom = draw.textbbox((0, 0), "n/a", font=font)
        draw.text(((w - (right - left)) / 2 - left, (h - (top + bottom)) / 2), "n/a", fill=_TEXT, font=font)
    else:
        mixed = base.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
        cell = Image.fromarray(np.rint(mixed).astype(np.uint8))
    if point is not None:
        ring = max(3, min(h, w) // 25)
        cx, cy = point
        draw = ImageDraw.Draw(cell)
        outer = ring + 1
        draw.ellipse((cx - outer, cy - outer, cx + outer, cy + outer), outline=(0, 0, 0), width=1)
        draw.ellipse((cx - ring, cy - ring, cx + ring, cy + ring), outline=(255, 255, 255), width=2)
    return cell


def attention_grid(image, maps, cell_height: int = 160, alpha: float = 0.6) -> Image.Image:
    """DeCLIP's Figure 1 as one picture: a row per token ([CLS], then each point), a column per map.

    Args:
        image: H0 x W0 x 3 uint8 RGB (or a PIL image), the image the maps belong to.
        maps: an :class:`ovdense.attention.AttentionMaps` (its ``columns()`` and ``row_names``).
        cell_height: height of each cell in pixels; the width follows the image's aspect ratio.
        alpha: heatmap opacity over the image.

    Returns:
        RGB PIL image: a title strip over ``len(columns)`` cells per row, the row names on the left. Each cell is
        the map scaled to its own min..max (jet: blue low, red high) over the image; a point's row marks the point
        with a white ring; a cell with no value (e.g. the [CLS] row of a head without [CLS]) says ``n/a``.
    """
    ch = check("cell_height", cell_height, CELL_HEIGHT)
    check("alpha", alpha, FRACTION)
    rgb = _as_rgb(image)
    h0, w0 = rgb.shape[:2]
    cw = max(1, round(w0 * ch / h0))
    base = np.asarray(Image.fromarray(rgb).resize((cw, ch), Image.BILINEAR))
    columns = maps.columns()
    rows = maps.row_names
    font_size = max(11, ch // 11)
    font = load_font(font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = max(4, font_size // 2)
    label_w = max(measure.textbbox((0, 0), r, font=font)[2] for r in rows) + 2 * pad
    title_h = round(font_size * 1.8)
    gap = 4
    width = label_w + len(columns) * (cw + gap)
    height = title_h + len(rows) * (ch + gap)
    canvas = Image.new("RGB", (width, height), _PANEL_BG)
    draw = ImageDraw.Draw(canvas)
    for j, (title, _) in enumerate(columns):
        x = label_w + j * (cw + gap)
        text = title
        while len(text) > 4 and measure.textbbox((0, 0), text, font=font)[2] > cw:
            text = text[:-4] + "..."
        left, top, right, bottom = measure.textbbox((0, 0), text, font=font)
        draw.text((x + (cw - (right - left)) / 2 - left, (title_h - (top + bottom)) / 2), text, fill=_TEXT, font=font)
    for i, name in enumerate(rows):
        y = title_h + i * (ch + gap)
        left, top, _, bottom = measure.textbbox((0, 0), name, font=font)
        draw.text((pad - left, y + (ch - (top + bottom)) / 2), name, fill=_TEXT, font=font)
        point = None
        if i > 0:
            px, py = maps.points[i - 1]
            point = ((px + 0.5) * cw / w0, (py + 0.5) * ch / h0)
        for j, (_, values) in enumerate(columns):
            cell = attention_overlay(base, values[i], point, alpha, font_size)
            canvas.paste(cell, (label_w + j * (cw + gap), y))
    return canvas
