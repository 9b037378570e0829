"""A built bank opened for reading: :class:`MemoryBank` (manifest, stores, the index, search, consistency checks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OvdenseError
from .index import describe_index, index_ids, read_index, search
from .layout import BankLayout, find_bank
from .manifest import ImageEntry, read_manifest, total_regions
from .store import STORE_MODELS, read_store

__all__ = ["MemoryBank"]


class MemoryBank:
    """One bank: its registered images, its CLIP value stores (fp16 [N, D], memory-mapped on first use) and its
    retrieval index over the VFM keys (read on first use).

    Opening reads and checks only the manifest; :meth:`check` (or :meth:`info`) checks that the stores and the index
    agree with it.
    """

    def __init__(self, layout: BankLayout, vfm: str | None = None):
        self.layout = layout
        self.images: list[ImageEntry] = read_manifest(layout)
        self.num_regions: int = total_regions(self.images)
        self._vfm = vfm
        self._stores: dict = {}
        self._index = None

    @classmethod
    def open(cls, root, name: str | None = None, vfm: str | None = None) -> MemoryBank:
        """Open bank ``name`` under ``root`` (the only one there when ``name`` is None; :func:`find_bank`).

        Args:
            vfm: which index to use when the bank has several (``vfm_embeddings/{name}_{vfm}.faiss``).
        """
        return cls(find_bank(root, name), vfm=vfm)

    def __repr__(self) -> str:
        where = f"{str(self.layout.root)!r}, {self.layout.name!r}"
        return f"MemoryBank({where}: {len(self.images)} images, {self.num_regions} regions)"

    @property
    def store_names(self) -> list[str]:
        """The names of the bank's finished stores (``clip_embeddings/{name}_{store}.pt``), sorted."""
        return sorted(self.layout.stores())

    def store(self, name: str):
        """Store ``name``: fp16 [N, D] CPU tensor, memory-mapped (rows read from disk when indexed), cached."""
        if name not in self._stores:
            path = self.layout.stores().get(name)
            if path is None:
                have = ", ".join(self.store_names) or "none"
                path = self.layout.store(name)
                raise OvdenseError(f"bank {self.layout.name!r} has no store {name!r} ({path}; stores: {have})")
            self._stores[name] = read_store(path, mmap=True)
        return self._stores[name]

    @property
    def index_path(self) -> Path:
        """The index file: ``{name}_{vfm}.faiss`` for the ``vfm`` asked for, else the bank's only one."""
        if self._vfm is not None:
            path = self.layout.index(self._vfm)
            if not path.is_file():
                raise OvdenseError(f"bank {self.layout.name!r} has no index for VFM {self._vfm!r} ({path})")
            return path
        found = self.layout.indexes()
        if not found:
            where = f"vfm_embeddings/{self.layout.name}_*.faiss in {self.layout.root}"
            raise OvdenseError(f"bank {self.layout.name!r} has no index (no {where})")
        if len(found) > 1:
            vfms = ", ".join(self.layout.vfm_of(p) for p in found)
            raise OvdenseError(
                f"bank {self.layout.name!r} has {len(found)} indexes (VFMs {vfms}); pick one with vfm= / --vfm"
            )
        return found[0]

    @property
    def vfm(self) -> str:
        """The VFM name the index file carries."""
        return self.layout.vfm_of(self.index_path)

    @property
    def index(self):
        """The bank's one faiss index (IndexIDMap2), read on first use."""
        if self._index is None:
            self._index = read_index(self.index_path)
        return self._index

    @property
    def key_dim(self) -> int:
        """The width Dk of the index keys (= of the retrieval queries)."""
        return int(self.index.d)

    def search(self, queries, k: int = 20):
        """The ``k`` nearest regions of each query (nprobe = min(256, nlist), as the authors).

        Args:
            queries: float [R, Dk] torch tensor or numpy array (the authors pass L2-normalised region means).

        Returns:
            LongTensor [R, k] of region ids (store rows), best first, -1 where fewer than k were found.
        """
        import torch

        if isinstance(queries, torch.Tensor):
            queries = queries.detach().to("cpu", torch.float32).numpy()
        return torch.from_numpy(search(self.index, np.asarray(queries, dtype=np.float32), k))

    def problems(self, key_dim: int | None = None, store_dims: dict[str, int] | None = None) -> list[str]:
        """Every disagreement between manifest, stores and index, one line each (empty: the bank is usable).

        Args:
            key_dim: the width the index keys must have (the VFM's), if known.
            store_dims: ``{store: width}`` the stores must exist with (the CLIPs' widths).
        """
        found: list[str] = []
        self._inspect(found, key_dim, store_dims)
        return found

    def check(self, key_dim: int | None = None, store_dims: dict[str, int] | None = None) -> None:
        """Raise the first of :meth:`problems` (and how many more there are) as one line.

        Raises:
            OvdenseError: empty bank, missing store, store / manifest / index row counts that disagree, a key or store
                width other than the one asked for, no index or several.
        """
        found = self.problems(key_dim, store_dims)
        if found:
            more = f" (and {len(found) - 1} more: see `ovdense bank info {self.layout.root}`)" if len(found) > 1 else ""
            raise OvdenseError(found[0] + more)

    def info(self, key_dim: int | None = None, store_dims: dict[str, int] | None = None) -> dict:
        """What the bank holds, for ``ovdense bank info`` and logs.

        ``store_dims`` defaults to the widths of :data:`STORE_MODELS` for the stores it names.

        Returns:
            ``{"root", "name", "images", "regions", "stores": {name: {"path", "rows", "dim", "dtype", "bytes"}},
            "index": {"path", "vfm", "bytes", "type", "dim", "ntotal", "metric", "nlist", "nprobe", "pq_m",
            "pq_nbits"} or None, "problems": [line, ...]}``.
        """
        if store_dims is None:
            store_dims = {s: STORE_MODELS[s].width for s in self.store_names if s in STORE_MODELS}
        found: list[str] = []
        stores, index = self._inspect(found, key_dim, store_dims)
        return {
            "root": str(self.layout.root),
            "name": self.layout.name,
            "images": len(self.images),
            "regions": self.num_regions,
            "stores": stores,
            "index": index,
            "problems": found,
        }

    def _inspect(self, found: list[str], key_dim, store_dims) -> tuple[dict, dict | None]:
        """Append the problems to ``found``; return the stores' and the index's descriptions."""
        n, name = self.num_regions, self.layout.name
        if not self.images:
            found.append(f"bank {name!r} is empty: {self.layout.images_tsv} registers no image")
        paths = self.layout.stores()
        if not paths:
            found.append(f"bank {name!r} has no CLIP store (no clip_embeddings/{name}_*.pt in {self.layout.root})")
        for wanted in store_dims or {}:
            if wanted not in paths:
                have = ", ".join(sorted(paths)) or "none"
                found.append(f"bank {name!r} has no store {wanted!r} ({self.layout.store(wanted)}; stores: {have})")
        stores: dict[str, dict] = {}
        for store_name, path in sorted(paths.items()):
            try:
                data = self.store(store_name)
            except OvdenseError as err:
                found.append(str(err))
                continue
            rows, dim = data.shape
            stores[store_name] = {
                "path": str(path),
                "rows": rows,
                "dim": dim,
                "dtype": str(data.dtype).replace("torch.", ""),
                "bytes": path.stat().st_size,
            }
            if rows != n:
                found.append(f"store {store_name!r} has {rows} rows but the manifest registers {n} regions ({path})")
            want = (store_dims or {}).get(store_name)
            if want is not None and dim != want:
                found.append(f"store {store_name!r} is {dim} wide, expected {want} ({path})")
        try:
            index = self.index
        except OvdenseError as err:
            found.append(str(err))
            return stores, None
        path = self.index_path
        desc = {"path": str(path), "vfm": self.layout.vfm_of(path), "bytes": path.stat().st_size}
        desc.update(describe_index(index))
        if desc["ntotal"] != n:
            found.append(f"index {path.name} holds {desc['ntotal']} keys but the manifest registers {n} regions")
        else:
            try:
                ids = index_ids(index)
            except OvdenseError as err:
                found.append(f"index {path.name}: {err}")
            else:
                if n and not np.array_equal(np.sort(ids), np.arange(n)):
                    span = f"{ids.min()}..{ids.max()}"
                    found.append(f"index {path.name} ids are not the region ids 0..{n - 1} (they span {span})")
        if key_dim is not None and desc["dim"] != key_dim:
            found.append(f"index {path.name} keys are {desc['dim']} wide, expected {key_dim}")
        keys = self.layout.keys(desc["vfm"])
        if keys.is_file():  # the VFM keys the index was built from (not needed to search): must match it too
            try:
                data = read_store(keys, mmap=True)
            except OvdenseError as err:
                found.append(str(err))
            else:
                if data.shape[0] != n:
                    found.append(f"keys {keys.name} have {data.shape[0]} rows but the manifest registers {n} regions")
                if data.shape[1] != desc["dim"]:
                    found.append(f"keys {keys.name} are {data.shape[1]} wide but the index {desc['dim']}")
        return stores, desc
