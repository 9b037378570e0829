"""On-disk cache of teacher outputs, so the VFM and Stable Diffusion run once per image over all epochs.

The VFM features of an image and its Stable Diffusion attention chain do not depend on the epoch: the proxy
and SD inputs are plain resizes of the image, and the SD noise is seeded per call. The cache stores one
safetensors file per (teacher, image) under ``root/<namespace>/``, where the namespace names the teacher's
weights (a digest), the input size and the output kind, so a different teacher or size never reads stale
files. Within a namespace an image is keyed by its content (the SHA-256 of its encoded bytes, from the
dataset's ``sha256``), so two folders holding different pictures under the same file names never share
entries. Values are stored in fp16 — the precision the references run their teachers in — and a batch always
uses the fp16-rounded values, whether just computed or read back, so a run gives the same numbers with a
cold or a warm cache.

Every value of a namespace has one shape (the teachers take padded square inputs); it is recorded in each
entry's metadata and in ``spec.json``. An entry that cannot be read, or whose dtype or shape is not what the
teacher gives, is recomputed with a warning naming the image and the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import first_line
from ..fileio import write_atomic

__all__ = ["TeacherCache", "module_digest"]


def module_digest(module: torch.nn.Module, extra: str = "") -> str:
    """SHA-256 over a module's parameter and buffer names and values (identifies a teacher's weights)."""
    h = hashlib.sha256(extra.encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """Per-image teacher outputs in ``root/namespace``.

    Args:
        root: the cache folder (``--teacher-cache``).
        namespace: what the values are (teacher digest, input size, kind); one sub-folder each.
    """

    SPEC_FILE = "spec.json"

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        #: The per-image value shape (a tuple), from ``spec.json`` or the first computed value; None if unknown.
        self.shape: tuple[int, ...] | None = self._read_spec()
        # Without spec.json: the shape a first, fully cached batch agreed on (checks later batches meanwhile).
        self._guess: tuple[int, ...] | None = None

    def _path(self, name: str) -> Path:
        return self.dir / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".safetensors")

    def _read_spec(self) -> tuple[int, ...] | None:
        path = self.dir / self.SPEC_FILE
        if not path.is_file():
            return None
        try:
            spec = json.loads(path.read_text())
            if spec.get("dtype") != "float16":
                raise ValueError(f"dtype {spec.get('dtype')}")
            return tuple(int(x) for x in spec["shape"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            what = f"teacher cache {path} is unreadable ({err}); the next computed value replaces it"
            warnings.warn(what, stacklevel=4)
            return None

    def _learn_shape(self, shape: tuple[int, ...]) -> None:
        """Record the shape the teacher gives (it wins over a ``spec.json`` that says otherwise)."""
        if self.shape == shape:
            return
        if self.shape is not None:
            warnings.warn(
                f"teacher cache {self.dir}: {self.SPEC_FILE} says values are {list(self.shape)}, the teacher gives "
                f"{list(shape)}; entries of the old shape are recomputed",
                stacklevel=4,
            )
        self.shape = shape
        data = (json.dumps({"shape": list(shape), "dtype": "float16"}) + "\n").encode()
        write_atomic(self.dir / self.SPEC_FILE, lambda f: f.write(data))

    def _load(self, name: str, label: str) -> torch.Tensor | None:
        """The cached value of ``name``, or None: missing, or unreadable / not what was written (warned)."""
        from safetensors import safe_open

        path = self._path(name)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                value = f.get_tensor("value")
        except Exception as err:  # noqa: BLE001 - a damaged entry (killed writer, full disk) is recomputed
            self._warn(label, path, f"is unreadable ({first_line(err)})")
            return None
        if value.dtype != torch.float16:
            self._warn(label, path, f"holds {value.dtype}, not torch.float16")
            return None
        recorded = meta.get("shape")
        if recorded is not None and recorded != json.dumps(list(value.shape)):
            self._warn(label, path, f"holds shape {list(value.shape)} but its metadata says {recorded}")
            return None
        return value

    def _warn(self, label: str, path: Path, what: str) -> None:
        warnings.warn(f"teacher cache entry of {label} ({path}) {what}; recomputing it", stacklevel=4)

    def _save(self, name: str, value: torch.Tensor, label: str) -> None:
        from safetensors.torch import save

        meta = {"name": label, "key": name, "shape": json.dumps(list(value.shape)), "dtype": "float16"}
        data = save({"value": value.contiguous()}, metadata=meta)
        path = self._path(name)
        # Temp file + os.replace: readers (other ranks) see no entry or the whole entry. No fsync per entry
        # (write_atomic's): an entry a power cut damages is found unreadable and recomputed.
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def batch(
        self,
        names: Sequence[str],
        compute: Callable[[list[int]], torch.Tensor],
        labels: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Values of a batch: read the cached ones, compute the rest with ``compute(missing positions)``.

        Args:
            names: B cache keys, the images' content digests (hex of the dataset's ``sha256``).
            compute: maps a list of batch positions to their values, a len x ... float tensor.
            labels: B names for warnings (the images' file names); ``names`` when not given.

        Returns:
            B x ... float32, fp16-rounded values, on the device ``compute`` uses (CPU when all were cached).
        """
        labels = list(names) if labels is None else list(labels)
        values: list[torch.Tensor | None] = [self._load(n, lab) for n, lab in zip(names, labels, strict=True)]
        if self.shape is None and self._guess is None and all(v is not None for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) == 1:
                self._guess = shapes.pop()  # all cached and in agreement: the best guess until a value is computed
            else:
                values[0] = None  # cached values disagree: the teacher decides, one computed value is enough
        computed: set[int] = set()
        device = None
        while True:
            expected = self.shape if self.shape is not None else self._guess
            if expected is not None:
                for i, v in enumerate(values):
                    if v is not None and i not in computed and tuple(v.shape) != expected:
                        source = "the teacher gives" if self.shape is not None else "the other entries hold"
                        what = f"has shape {list(v.shape)}, {source} {list(expected)}"
                        self._warn(labels[i], self._path(names[i]), what)
                        values[i] = None
            missing = [i for i, v in enumerate(values) if v is None]
            if not missing:
                break
            fresh = compute(missing)
            device = fresh.device
            self._learn_shape(tuple(fresh.shape[1:]))
            for i, v in zip(missing, fresh, strict=True):
                half = v.detach().to("cpu", torch.float16)
                self._save(names[i], half, labels[i])
                values[i] = half
            computed.update(missing)
        self.misses += len(computed)
        self.hits += len(names) - len(computed)
        out = torch.stack([v.float() for v in values])
        return out.to(device) if device is not None else out
