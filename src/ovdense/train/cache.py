"""On-disk cache of teacher outputs, so the VFM and Stable Diffusion run once per image over all epochs.

The VFM features of an image and its Stable Diffusion attention chain do not depend on the epoch: the proxy
and SD inputs are plain resizes of the image, and the SD noise is seeded per call. The cache stores one
safetensors file per (teacher, image) under ``root/<namespace>/``, where the namespace names the teacher's
weights (a digest), the input size and the output kind, so a different teacher or size never reads stale
files. Values are stored in fp16 — the precision the references run their teachers in — and a batch always
uses the fp16-rounded values, whether just computed or read back, so a run gives the same numbers with a
cold or a warm cache.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

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

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, name: str) -> Path:
        return self.dir / (hashlib.sha256(name.encode()).hexdigest()[:32] + ".safetensors")

    def _load(self, name: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(name)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["value"]
        except Exception:  # noqa: BLE001 - a damaged entry (killed writer, full disk) is recomputed
            return None

    def _save(self, name: str, value: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(name)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({"value": value.contiguous()}, str(tmp), metadata={"name": name})
        tmp.replace(path)  # atomic: readers see the old state or the whole file

    def batch(self, names: Sequence[str], compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Values of a batch: read the cached ones, compute the rest with ``compute(missing positions)``.

        Args:
            names: B stable image names (the data source's ``name(i)``).
            compute: maps a list of batch positions to their values, a len x ... float tensor.

        Returns:
            B x ... float32, fp16-rounded values, on the device ``compute`` uses (CPU when all were cached).
        """
        values: list[torch.Tensor | None] = [self._load(n) for n in names]
        missing = [i for i, v in enumerate(values) if v is None]
        self.hits += len(names) - len(missing)
        self.misses += len(missing)
        device = None
        if missing:
            fresh = compute(missing)
            device = fresh.device
            for i, v in zip(missing, fresh, strict=True):
                half = v.detach().to("cpu", torch.float16)
                self._save(names[i], half)
                values[i] = half
        out = torch.stack([v.float() for v in values])
        return out.to(device) if device is not None else out
