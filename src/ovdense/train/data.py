"""Unlabeled training images for DeCLIP/CLIPSelf-style distillation: sources, grid crops, student and teacher inputs.

Reproduces DeCLIP's ``GridDistillDataset`` (``src/training/data.py``) and the ``open_clip`` transforms it uses:

- **Student input**: longest side resized (Pillow bicubic) to ``S``, black padding right/bottom to ``S x S``,
  ``ToTensor``, CLIP mean/std (:func:`ovdense.regions.detection_input`).
- **Proxy inputs** (VFM): the same ``ResizeLongest`` at the proxy's side with its own statistics (ImageNet for
  DINO/DINOv2/SAM). **SD input**: ``ResizeLongest`` to 512, values ``2x - 1`` (the black padding is -1).
- **Grid crops**: one ``(m, n)`` grid (m rows, n columns) drawn uniformly from :func:`grid_choices`, cells in
  row-major order (:func:`grid_boxes`), shuffled, the first ``max_boxes`` kept. Each cell is cut from the
  *original* image (Pillow rounds the corners) and fit into the CLIP tower's input by ``ResizeMaxSize``
  (:func:`ovdense.regions.crop_inputs`); the student's boxes are the same cells on the padded student input,
  normalised to [0, 1] by the padded side (the trainer multiplies by its grid size).

Randomness (ours): every sample draws from its own ``random.Random(f"{seed}-{epoch}-{index}")``, so a sample is
the same for any number of DataLoader workers, any process rank and any resume point. The reference draws from
the global ``random`` module inside each worker, which makes its grids depend on the worker layout.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import random
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import InvalidArgumentError, OvdenseError
from ..images import ImageDecodeError, decode_image
from ..regions import boxes_on_grid, crop_inputs, detection_input

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_SUFFIXES",
    "MIN_IMAGE_SIDE",
    "SD_MEAN",
    "SD_STD",
    "DistillDataset",
    "GridSampler",
    "ImageFolder",
    "ImageSource",
    "TarShards",
    "boxes_in_grid_units",
    "grid_boxes",
    "grid_choices",
    "open_source",
]

#: Statistics of the VFM proxy input (DeCLIP's ``proxy_transform``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``(x - 0.5) / 0.5`` is exactly ``2x - 1`` in float32 (both scale by a power of two): the SD VAE's [-1, 1].
SD_MEAN = (0.5, 0.5, 0.5)
SD_STD = (0.5, 0.5, 0.5)
#: File suffixes of :class:`ImageFolder` (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: Image extensions of a webdataset sample, in order of preference.
TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
#: The reference rejects images with a side below 10 pixels.
MIN_IMAGE_SIDE = 10
# Open shard files kept per process; thousands of shards would otherwise exhaust file descriptors.
_MAX_OPEN_SHARDS = 16


class ImageSource(Protocol):
    """What :class:`DistillDataset` reads: a fixed, ordered list of encoded images."""

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        ...

    def name(self, i: int) -> str:
        """A human-readable name of image ``i`` (for warnings)."""
        ...


# -- sources ------------------------------------------------------------------------------------------------------


def _has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def _sorted_files(root: Path, suffixes: Sequence[str]) -> list[str]:
    """Relative POSIX paths of the files under ``root`` (recursive) with one of ``suffixes``, sorted."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
    )


class ImageFolder:
    """Every image file under a folder, recursively, sorted by relative path.

    Args:
        root: the folder; files with a suffix in :data:`IMAGE_SUFFIXES` (any case) are images.

    Raises:
        OvdenseError: the folder is missing or holds no images.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise OvdenseError(f"image folder not found: {self.root}")
        files = _sorted_files(self.root, IMAGE_SUFFIXES)
        if not files:
            raise OvdenseError(f"no images ({' '.join(IMAGE_SUFFIXES)}) under {self.root}")
        # A numpy string array rather than a list of str: DataLoader workers touching Python objects would
        # copy the pages of a forked list (refcounts), growing memory with every worker on large folders.
        self._files = np.array(files)

    def __len__(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.root)!r}, {len(self)} images)"

    def read(self, i: int) -> bytes:
        return (self.root / str(self._files[i])).read_bytes()

    def name(self, i: int) -> str:
        return str(self._files[i])


def _split_key(member: str) -> tuple[str, str] | None:
    """webdataset's ``base_plus_ext``: ``dir/000001.seg.png`` -> ``("dir/000001", "seg.png")``."""
    head, _, base = member.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{head}/{stem}" if head else stem), ext


def _shard_paths(shards: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(shards, (str, Path)):
        text = str(shards)
        path = Path(shards)
        if path.is_dir():
            found = [path / p for p in _sorted_files(path, (".tar",))]
            if not found:
                raise OvdenseError(f"no .tar shards under {path}")
            return found
        if path.is_file():
            return [path]
        if _has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                raise OvdenseError(f"no tar shards match {text}")
            return found
        raise OvdenseError(f"tar shard not found: {text}")
    paths = [Path(p) for p in shards]
    if not paths:
        raise OvdenseError("no tar shards given")
    for p in paths:
        if not p.is_file():
            raise OvdenseError(f"tar shard not found: {p}")
    return paths


class TarShards:
    """Images inside webdataset-style ``.tar`` shards, indexed once for random access.

    Members are grouped into samples by key (the member path up to the first dot of its basename, as webdataset
    does); a sample's image is its first member with extension ``jpg``, ``jpeg``, ``png`` or ``webp`` (in that
    order of preference, any case); samples without one are ignored. Construction scans every shard's headers
    and records ``(shard, offset_data, size)``, so reading an image is one seek and one read. Shards must be
    uncompressed tars (offsets into a gzip stream are not seekable).

    File handles are opened lazily, per process: a handle inherited across ``fork`` shares its file offset with
    the parent and the other workers, so a worker never uses one it did not open itself.

    Args:
        shards: a list of shard paths (kept in order), a folder (its ``.tar`` files, recursively, sorted) or a
            glob pattern (matches sorted).

    Raises:
        OvdenseError: no shards, an unreadable or compressed shard, or no images in any shard.
    """

    def __init__(self, shards: str | Path | Sequence[str | Path]):
        paths = _shard_paths(shards)
        self.location = str(shards) if isinstance(shards, (str, Path)) else f"{len(paths)} shards"
        self._shards = np.array([str(p) for p in paths])
        shard_of: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        names: list[str] = []
        for s, path in enumerate(paths):
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                # "r:" refuses compressed tars instead of silently decompressing them on every read.
                with tarfile.open(path, "r:") as tf:
                    for member in tf:
                        if not member.isfile() or member.issparse():
                            continue
                        split = _split_key(member.name)
                        if split is None:
                            continue
                        key, ext = split
                        samples.setdefault(key, {}).setdefault(ext.lower(), member)
            except (tarfile.TarError, OSError) as err:
                raise OvdenseError(f"cannot index tar shard {path} (an uncompressed .tar?): {err}") from None
            for members in samples.values():
                for ext in TAR_IMAGE_EXTS:
                    if ext in members:
                        member = members[ext]
                        shard_of.append(s)
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
                        names.append(f"{path}:{member.name}")
                        break
        if not names:
            raise OvdenseError(f"no images ({'/'.join(TAR_IMAGE_EXTS)} members) in the tar shards {self.location}")
        self._shard_of = np.array(shard_of, dtype=np.int32)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._sizes = np.array(sizes, dtype=np.int64)
        self._names = np.array(names)
        self._handles: OrderedDict[int, io.BufferedReader] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        return f"TarShards({self.location!r}, {len(self._shards)} shards, {len(self)} images)"

    def __getstate__(self) -> dict:
        # Pickled into spawned workers: open handles do not travel.
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    def _handle(self, shard: int) -> io.BufferedReader:
        if self._pid != os.getpid():
            # Forked: drop the parent's handles without closing them (closing would not hurt the parent, but
            # using them would move the shared file offset under the other processes).
            self._handles = OrderedDict()
            self._pid = os.getpid()
        f = self._handles.get(shard)
        if f is None:
            f = open(str(self._shards[shard]), "rb")  # kept open: closed on eviction or close()
            self._handles[shard] = f
            if len(self._handles) > _MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return f

    def read(self, i: int) -> bytes:
        f = self._handle(int(self._shard_of[i]))
        size = int(self._sizes[i])
        f.seek(int(self._offsets[i]))
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"truncated tar member ({len(data)} of {size} bytes)")
        return data

    def name(self, i: int) -> str:
        return str(self._names[i])

    def close(self) -> None:
        """Close this process's open shard files."""
        while self._handles:
            self._handles.popitem()[1].close()


def open_source(path: str | Path | Sequence[str | Path]) -> ImageFolder | TarShards:
    """The image source at ``path``.

    A folder holding image files -> :class:`ImageFolder`; a folder holding only ``.tar`` files, a ``.tar`` file,
    a glob pattern or a list of shard paths -> :class:`TarShards`.

    Raises:
        OvdenseError: nothing there, or nothing usable.
    """
    if isinstance(path, (list, tuple)):
        return TarShards(path)
    text = str(path)
    if not text:
        # Path("") is the working directory: never train on it by accident.
        raise OvdenseError("no training data given: pass an image folder, a .tar shard or a glob of shards")
    p = Path(path)
    if p.is_dir():
        if any(q.suffix.lower() in IMAGE_SUFFIXES and q.is_file() for q in p.rglob("*")):
            return ImageFolder(p)
        if any(q.is_file() for q in p.rglob("*.tar")):
            return TarShards(p)
        raise OvdenseError(f"no images ({' '.join(IMAGE_SUFFIXES)}) or .tar shards under {p}")
    if p.is_file():
        if p.suffix.lower() == ".tar":
            return TarShards(p)
        raise OvdenseError(f"{p}: expected an image folder, a .tar shard or a glob of .tar shards")
    if _has_magic(text):
        return TarShards(text)
    raise OvdenseError(f"training data not found: {p}")


# -- grid crops ---------------------------------------------------------------------------------------------------


def grid_choices(max_split: int = 6) -> list[tuple[int, int]]:
    """The reference's grids ``(m rows, n columns)``: m in 1..max_split, n in ``(m + 1) // 2 .. min(2m, max_split)``."""
    return [(m, n) for m in range(1, max_split + 1) for n in range((m + 1) // 2, min(2 * m, max_split) + 1)]


def grid_boxes(m: int, n: int) -> torch.Tensor:
    """The cells of an m x n grid over the unit square, row-major, as the reference builds them.

    Returns:
        (m·n) x 4 float32 XYXY in [0, 1]; cell ``r·n + c`` is row r, column c.
    """
    grid_x, grid_y = torch.meshgrid(torch.linspace(0, 1, n + 1), torch.linspace(0, 1, m + 1), indexing="xy")
    x0y0 = torch.stack([grid_x[:m, :n], grid_y[:m, :n]], dim=-1)
    x1y1 = torch.stack([grid_x[1:, 1:], grid_y[1:, 1:]], dim=-1)
    return torch.cat([x0y0, x1y1], dim=-1).view(-1, 4)


def boxes_in_grid_units(boxes: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int]) -> list[torch.Tensor]:
    """Per image, its valid boxes (normalised to the padded input) in grid units, as RoIAlign takes them.

    The inverse of the dataset's normalisation: :class:`DistillDataset`'s ``boxes`` are its grid cells on the
    padded student input divided by the padded side; a map of h x w cells over that input scales them back.

    Args:
        boxes: B x K x 4 XYXY in [0, 1] of the padded input.
        valid: B x K bool.
        grid: (h, w) of the map.

    Returns:
        B tensors of shape K_b x 4.
    """
    h, w = grid
    scale = boxes.new_tensor([w, h, w, h])
    return [b[v] * scale for b, v in zip(boxes, valid, strict=True)]


class GridSampler:
    """Draws one grid per image and keeps up to ``max_boxes`` of its cells in random order.

    Args:
        max_split: the largest number of rows or columns (DeCLIP: 6).
        max_boxes: cells kept per image (DeCLIP: 20).
    """

    def __init__(self, max_split: int = 6, max_boxes: int = 20):
        if max_split < 1:
            raise InvalidArgumentError(f"max_split: expected >= 1, got {max_split}")
        if max_boxes < 1:
            raise InvalidArgumentError(f"max_boxes: expected >= 1, got {max_boxes}")
        self.max_split = max_split
        self.max_boxes = max_boxes
        self.choices = grid_choices(max_split)
        self._templates = {c: grid_boxes(*c) for c in self.choices}

    def sample(self, rng: random.Random) -> tuple[int, int, torch.Tensor]:
        """``(m, n, boxes)``: boxes is K x 4 float32 XYXY normalised to the image, K = min(m·n, max_boxes).

        Draws in the reference's order: ``rng.choice(choices)``, then ``rng.shuffle`` of the cell indices.
        """
        m, n = rng.choice(self.choices)
        indices = list(range(m * n))
        rng.shuffle(indices)
        return m, n, self._templates[(m, n)][indices[: self.max_boxes]]


# -- dataset ------------------------------------------------------------------------------------------------------


class _BadImage(Exception):
    pass


def _decode(data: bytes) -> np.ndarray:
    """Encoded bytes -> H x W x 3 uint8 RGB, as the reference opens images (no EXIF transpose).

    :func:`ovdense.images.decode_image` rules (8-bit images exactly as Pillow's ``convert("RGB")``, 16-bit
    ones scaled, transparency over white, the pixel limit). The reference converts to RGB after resizing;
    converting first is identical for RGB and greyscale images (the only modes in COCO) and keeps one decoded
    array for every input.

    Raises:
        _BadImage: unreadable, not an image, over the pixel limit, or a side under :data:`MIN_IMAGE_SIDE` px.
    """
    try:
        image = decode_image(data, exif=False)
    except ImageDecodeError as err:
        # the dataset names the file in its warning; the reason alone avoids saying "image" twice
        raise _BadImage(err.reason) from None
    h, w = image.shape[:2]
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        raise _BadImage(f"too small ({w} x {h}; at least {MIN_IMAGE_SIDE} px a side)")
    return image


def _check_stats(name: str, values) -> tuple[float, float, float]:
    v = tuple(float(x) for x in values)
    if len(v) != 3:
        raise InvalidArgumentError(f"{name}: expected 3 per-channel values, got {len(v)}")
    return v  # type: ignore[return-value]


class DistillDataset(torch.utils.data.Dataset):
    """Map-style dataset of distillation samples (DeCLIP's ``GridDistillDataset``).

    Args:
        source: an :class:`ImageSource`, or a path given to :func:`open_source`.
        student_size: the student input's padded side S (DeCLIP: 560).
        crop_size: the CLIP tower's input side c for the teacher crops (224 for B/16, 336 for L/14-336).
        clip_mean, clip_std: the CLIP tower's statistics, [0, 1] units.
        proxies: ``{name: (size, mean, std)}`` extra ``ResizeLongest`` inputs, e.g. the VFM's
            ``{"vfm": (490, IMAGENET_MEAN, IMAGENET_STD)}``; each is returned as ``proxy_<name>``.
        sd_size: the side of the Stable Diffusion input, or None for none.
        max_split, max_boxes: see :class:`GridSampler`.
        seed: the base seed of every sample's random generator.

    ``dataset[i]`` is a dict:

    - ``image``: 3 x S x S float32, the normalised student input.
    - ``boxes``: max_boxes x 4 float32 XYXY cells on the padded student input, in [0, 1] of S (zeros past K).
    - ``box_valid``: (max_boxes,) bool, the first K = min(m·n, max_boxes) True.
    - ``crops``: max_boxes x 3 x c x c float32 teacher crops (zeros where invalid).
    - ``pixel_boxes``: max_boxes x 4 float32 the crops' boxes in original-image pixels (zeros past K).
    - ``grid``: (2,) int64 ``(m, n)``, the grid drawn.
    - ``proxy_<name>``: 3 x P x P float32 per configured proxy; ``sd``: 3 x H x H in [-1, 1] when configured.
    - ``index``: the source index of the image used; ``skipped``: unreadable images passed over to reach it.
    - ``sha256``: (32,) uint8, the SHA-256 of the used image's encoded bytes (the teacher cache's key: the
      picture's content, not its file name).

    An unreadable, corrupt or too small image (a side under :data:`MIN_IMAGE_SIDE` px) is reported once per file
    with ``warnings.warn`` and replaced by the next readable one, ``(i + 1) % len``, ``(i + 2) % len``, ...; the
    grid still comes from the generator of ``i``. The reference picks a random replacement instead.
    """

    def __init__(
        self,
        source: ImageSource | str | Path,
        student_size: int = 560,
        crop_size: int = 224,
        clip_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
        clip_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711),
        proxies: dict[str, tuple[int, Sequence[float], Sequence[float]]] | None = None,
        sd_size: int | None = None,
        max_split: int = 6,
        max_boxes: int = 20,
        seed: int = 0,
    ):
        self.source = open_source(source) if isinstance(source, (str, Path)) else source
        if len(self.source) == 0:
            raise OvdenseError(f"no images in {self.source!r}")
        for name, value in (("student_size", student_size), ("crop_size", crop_size), ("sd_size", sd_size)):
            if value is not None and int(value) < 1:
                raise InvalidArgumentError(f"{name}: expected a positive size, got {value}")
        self.student_size = int(student_size)
        self.crop_size = int(crop_size)
        self.clip_mean = _check_stats("clip_mean", clip_mean)
        self.clip_std = _check_stats("clip_std", clip_std)
        self.proxies: dict[str, tuple[int, tuple, tuple]] = {}
        for name, spec in (proxies or {}).items():
            try:
                size, mean, std = spec
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"proxies[{name!r}]: expected (size, mean, std)") from None
            if int(size) < 1:
                raise InvalidArgumentError(f"proxies[{name!r}]: expected a positive size, got {size}")
            mean = _check_stats(f"proxies[{name!r}] mean", mean)
            self.proxies[name] = (int(size), mean, _check_stats(f"proxies[{name!r}] std", std))
        self.sd_size = None if sd_size is None else int(sd_size)
        self.sampler = GridSampler(max_split, max_boxes)
        self.max_boxes = max_boxes
        self.seed = int(seed)
        self.epoch = 0
        # Per process (each worker has its copy): files already reported, so each warns once and is not
        # decoded again.
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's grids (call before building the epoch's DataLoader)."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> random.Random:
        """The generator of sample ``index`` at the current epoch (str seeds hash with SHA-512: stable)."""
        return random.Random(f"{self.seed}-{self.epoch}-{index}")

    def _load(self, index: int) -> tuple[np.ndarray, int, int, bytes]:
        """``(image, used index, skipped, sha256 of its bytes)``: the first readable image at or after ``index``."""
        n = len(self.source)
        for skipped in range(n):
            j = (index + skipped) % n
            if j in self._bad:
                continue
            try:
                data = self.source.read(j)
                return _decode(data), j, skipped, hashlib.sha256(data).digest()
            except (_BadImage, OSError) as err:
                self._bad.add(j)
                warnings.warn(
                    f"skipping unreadable image {self.source.name(j)}: {err}; using the next image", stacklevel=3
                )
        raise OvdenseError(f"none of the {n} images of {self.source!r} could be read")

    def check_readable(self) -> None:
        """Raise :class:`~ovdense.errors.OvdenseError` (one line) unless some image decodes.

        Decodes from the first image on until one reads (unreadable ones warn, as in training), so a source
        whose every image is bad fails before a run starts; one readable image is enough, the others are
        replaced by it.
        """
        self._load(0)

    def sample(self, image: np.ndarray, rng: random.Random) -> dict[str, torch.Tensor]:
        """The tensors of one decoded image (H x W x 3 uint8) with the draws of ``rng``."""
        h, w = image.shape[:2]
        size = self.student_size
        x, scale = detection_input(image, size, self.clip_mean, self.clip_std)
        m, n, normed = self.sampler.sample(rng)
        # float32 x int64 -> float32, the reference's op; pixels of the original image.
        pixel = normed * torch.tensor([w, h, w, h])
        k = pixel.shape[0]
        boxes = torch.zeros(self.max_boxes, 4)
        boxes[:k] = boxes_on_grid(pixel, scale, (size, size), (1, 1))  # x 1: normalised to the padded input
        valid = torch.zeros(self.max_boxes, dtype=torch.bool)
        valid[:k] = True
        c = self.crop_size
        crops = torch.zeros(self.max_boxes, 3, c, c)
        crops[:k] = crop_inputs(image, pixel.numpy(), (c, c), self.clip_mean, self.clip_std)
        pixel_boxes = torch.zeros(self.max_boxes, 4)
        pixel_boxes[:k] = pixel
        out = {"image": x[0], "boxes": boxes, "box_valid": valid, "crops": crops, "grid": torch.tensor([m, n])}
        out["pixel_boxes"] = pixel_boxes
        for name, (p, mean, std) in self.proxies.items():
            out[f"proxy_{name}"] = detection_input(image, p, mean, std)[0][0]
        if self.sd_size is not None:
            out["sd"] = detection_input(image, self.sd_size, SD_MEAN, SD_STD)[0][0]
        return out

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        image, used, skipped, digest = self._load(index)
        out = self.sample(image, self.rng(index))
        out["index"] = used
        out["skipped"] = skipped
        # bytearray: frombuffer wants a writable buffer; 32 bytes that collate to B x 32 in a DataLoader.
        out["sha256"] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
        return out
