"""Slot stores: the authors' resumable row files behind every store a bank build writes (``PtSlotWriter``).

While a store ``{BASE}.pt`` is being built its rows live in two ``np.lib.format`` memmaps beside it (the authors'
files, so a build interrupted here resumes in their code and the other way round):

- ``{BASE}.f16.npy``: fp16 [N, D], row i = region id i;
- ``{BASE}.done.npy``: bool [N], whether row i has been written.

Every process of a build opens both and writes the rows of its own images (disjoint rows: no lock). When every
row is done, :meth:`SlotStore.finalize` writes ``{BASE}.pt`` (``torch.save`` of the fp16 tensor, atomically) and
removes the two files. A finished ``{BASE}.pt`` whose bank has since grown is imported as the prefix of new
intermediates (its rows marked done): an extension computes only the new rows.

Crash safety (kill -9 or a power cut at any instruction), beyond the authors' files:

- A row is marked done only after its values are flushed to the file (:meth:`SlotStore.flush`: values ``msync``
  first, then the done flags, then those ``msync``), so a done row always holds its final values; rows written but
  not yet marked are simply computed again.
- The two files are created (or grown) as temp files renamed into place, values first: values without done flags
  hold nothing committed and are dropped, done flags shorter than the values are extended with False (the values
  file was grown from the old one, row for row), done flags without values are stale and dropped.
- Intermediates beside a ``.pt`` of their own length with every row done are what a finalize killed before its
  clean-up left; they are removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import numpy as np

from ..errors import OvdenseError
from ..fileio import fsync_dir

__all__ = ["SlotStore"]

#: Rows copied at a time when a store is imported or grown (bounds RAM: 64 Ki rows x 1024 fp16 = 128 MiB).
_COPY_ROWS = 1 << 16


def _temp_beside(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file (mapped, not read)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise OvdenseError(f"{path} is not a readable .npy file ({err}); delete it to start this store again") from None
    return tuple(arr.shape), arr.dtype


class SlotStore:
    """The resumable intermediates of one fp16 [N, D] store (module docstring).

    Args:
        final: the store's ``.pt`` path (``clip_embeddings/{bank}_{store}.pt``, ``vfm_embeddings/{bank}_{vfm}.pt``).
        n: the rows the store must hold (the manifest's region count).
        dim: its width D.
    """

    def __init__(self, final, n: int, dim: int):
        self.final = Path(final)
        if self.final.suffix != ".pt":
            raise ValueError(f"a store path ends in .pt, got {self.final}")
        base = str(self.final)[: -len(".pt")]
        self.data_path = Path(base + ".f16.npy")
        self.done_path = Path(base + ".done.npy")
        self.n, self.dim = int(n), int(dim)
        self._data: np.memmap | None = None
        self._done: np.memmap | None = None
        self._pending: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        return f"SlotStore({str(self.final)!r}, n={self.n}, dim={self.dim})"

    # -- the main process: create, resume, grow, import -----------------------------------------------------------
    def final_rows(self) -> int | None:
        """Rows of the finished ``.pt`` (None when there is none), checked against this store's width and length.

        Raises:
            OvdenseError: the ``.pt`` has another width (built with another model) or more rows than the manifest.
        """
        if not self.final.is_file():
            return None
        from .store import read_store

        rows, dim = read_store(self.final, mmap=True).shape
        if dim != self.dim:
            raise OvdenseError(
                f"{self.final} holds {dim}-d rows but this build makes {self.dim}-d ones (built with another model); "
                "build into another bank name or move the file away"
            )
        if rows > self.n:
            raise OvdenseError(
                f"{self.final} holds {rows} rows but the manifest registers {self.n} regions (the manifest only grows; "
                "was it replaced?)"
            )
        return int(rows)

    def up_to_date(self) -> bool:
        """Whether the finished ``.pt`` already holds all ``n`` rows and no intermediates are left."""
        return self.final_rows() == self.n and not self.data_path.exists() and not self.done_path.exists()

    def prepare(self) -> dict:
        """Bring the intermediates to ``n`` rows (one process only, before the writers open them).

        Returns:
            ``{"rows": n, "done": rows already done, "imported": rows taken from the finished .pt}``.

        Raises:
            OvdenseError: a ``.pt`` or intermediate of another width, or longer than the manifest.
        """
        final_rows = self.final_rows()
        self._remove_temps()
        has_data, has_done = self.data_path.exists(), self.done_path.exists()
        if has_done and not has_data:  # a finalize killed between its two removals, or flags never committed
            self._remove(self.done_path)
            has_done = False
        if has_data and not has_done:  # values created but their flags never committed: nothing in them counts
            self._remove(self.data_path)
            has_data = False
        if has_data:
            (rows, dim), dtype = self._check_data()
            done_rows = self._check_done(rows)
            if final_rows == rows and done_rows == rows and bool(np.load(self.done_path, mmap_mode="r").all()):
                # A finalize that wrote the .pt and was killed before removing its intermediates.
                self._remove(self.done_path)
                self._remove(self.data_path)
                has_data = False
        imported = 0
        if not has_data:
            if final_rows == self.n:
                return {"rows": self.n, "done": self.n, "imported": 0}
            imported = final_rows or 0
            self._create(imported)
        else:
            rows = self._check_data()[0][0]
            if rows > self.n:
                raise OvdenseError(
                    f"{self.data_path} has {rows} rows but the manifest registers {self.n} regions (the manifest only "
                    "grows; was it replaced?); delete the .f16.npy and .done.npy files to start this store again"
                )
            if rows < self.n:
                self._grow_data(rows)
            if self._check_done(self.n) < self.n:
                self._grow_done()
        done = int(np.count_nonzero(np.load(self.done_path, mmap_mode="r")))
        return {"rows": self.n, "done": done, "imported": imported}

    def _check_data(self) -> tuple[tuple[int, int], np.dtype]:
        shape, dtype = _header(self.data_path)
        if len(shape) != 2 or dtype != np.float16 or shape[1] != self.dim:
            raise OvdenseError(
                f"{self.data_path} is {dtype} {shape}, expected fp16 [rows, {self.dim}] (built with another model?); "
                "delete the .f16.npy and .done.npy files to start this store again"
            )
        return shape, dtype  # type: ignore[return-value]

    def _check_done(self, data_rows: int) -> int:
        shape, dtype = _header(self.done_path)
        if len(shape) != 1 or dtype != np.bool_ or shape[0] > data_rows:
            raise OvdenseError(
                f"{self.done_path} is {dtype} {shape}, expected bool [{data_rows}]; delete the .f16.npy and "
                ".done.npy files to start this store again"
            )
        return int(shape[0])

    def _remove(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fsync_dir(path.parent)

    def _remove_temps(self) -> None:
        """Temp files of a create or grow that a kill interrupted (ours only: ``.{name}.{hex}.tmp``)."""
        for path in (self.data_path, self.done_path):
            for tmp in path.parent.glob(f".{path.name}.*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _write_new(self, path: Path, dtype, shape: tuple[int, ...], fill) -> None:
        """A ``.npy`` of ``shape`` written as a temp file, ``fill(memmap)``, flushed, fsynced, then renamed."""
        tmp = _temp_beside(path)
        try:
            arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
            fill(arr)
            arr.flush()
            del arr
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)

    def _create(self, imported: int) -> None:
        """New intermediates of ``n`` rows, the finished ``.pt``'s first ``imported`` rows copied in and done."""
        self.data_path.parent.mkdir(parents=True, exist_ok=True)

        def fill_data(arr):
            if imported:
                from .store import read_store

                seed = read_store(self.final, mmap=True)
                for start in range(0, imported, _COPY_ROWS):
                    stop = min(imported, start + _COPY_ROWS)
                    arr[start:stop] = seed[start:stop].numpy()

        def fill_done(arr):
            arr[:imported] = True

        self._write_new(self.data_path, np.float16, (self.n, self.dim), fill_data)  # values first: see the docstring
        self._write_new(self.done_path, np.bool_, (self.n,), fill_done)

    def _grow_data(self, rows: int) -> None:
        """The values file grown to ``n`` rows, its ``rows`` rows copied (the manifest grew during a build)."""
        old = np.load(self.data_path, mmap_mode="r")

        def fill(arr):
            for start in range(0, rows, _COPY_ROWS):
                arr[start : min(rows, start + _COPY_ROWS)] = old[start : min(rows, start + _COPY_ROWS)]

        self._write_new(self.data_path, np.float16, (self.n, self.dim), fill)

    def _grow_done(self) -> None:
        old = np.array(np.load(self.done_path, mmap_mode="r"))

        def fill(arr):
            arr[: len(old)] = old

        self._write_new(self.done_path, np.bool_, (self.n,), fill)

    def done_mask(self) -> np.ndarray:
        """bool [n]: the rows already written (all True when the ``.pt`` is up to date)."""
        if not self.done_path.exists() and self.final_rows() == self.n:
            return np.ones(self.n, dtype=bool)
        return np.array(np.load(self.done_path, mmap_mode="r"))

    # -- every process: write --------------------------------------------------------------------------------------
    def open_for_write(self) -> None:
        """Map both files for writing (after :meth:`prepare` ran in one process)."""
        self._data = np.load(self.data_path, mmap_mode="r+")
        self._done = np.load(self.done_path, mmap_mode="r+")
        if self._data.shape != (self.n, self.dim) or self._done.shape != (self.n,):
            raise OvdenseError(f"{self.data_path}: the intermediates are not [{self.n}, {self.dim}]; prepare() first")

    def write(self, start: int, rows) -> None:
        """Write rows ``start .. start + len(rows) - 1`` (one image's regions); done once :meth:`flush` ran.

        Args:
            start: the image's first region id.
            rows: [k, D] array or tensor (cast to fp16).
        """
        if self._data is None:
            raise RuntimeError("open_for_write() first")
        arr = rows.detach().cpu().numpy() if hasattr(rows, "detach") else np.asarray(rows)
        if arr.ndim != 2 or arr.shape[1] != self.dim or start < 0 or start + len(arr) > self.n:
            raise ValueError(f"rows {start}..{start + len(arr)} of shape {arr.shape} do not fit [{self.n}, {self.dim}]")
        self._data[start : start + len(arr)] = arr.astype(np.float16, copy=False)
        self._pending.append((start, start + len(arr)))

    def flush(self) -> int:
        """Commit the rows written since the last flush: values to disk first, then their done flags.

        Returns:
            how many rows were committed.
        """
        if self._data is None or not self._pending:
            return 0
        self._data.flush()
        committed = 0
        for start, stop in self._pending:
            self._done[start:stop] = True
            committed += stop - start
        self._done.flush()
        self._pending = []
        return committed

    def close(self) -> None:
        """Flush and unmap."""
        self.flush()
        self._data = self._done = None

    # -- the main process: finish -----------------------------------------------------------------------------------
    def finalize(self) -> bool:
        """Write the ``.pt`` and remove the intermediates when every row is done (else leave everything).

        Returns:
            whether the ``.pt`` now holds all ``n`` rows.
        """
        if not self.data_path.exists():
            return self.final_rows() == self.n
        done = np.load(self.done_path, mmap_mode="r")
        if len(done) != self.n or not bool(done.all()):
            return False
        del done
        import torch

        from .store import write_store

        # Copy-on-write mapping: writable for torch, the file untouched; write_store makes the one in-RAM copy.
        data = np.load(self.data_path, mmap_mode="c")
        write_store(self.final, torch.from_numpy(data))
        del data
        # Flags first: values without flags are dropped by prepare(), flags without values too.
        self._remove(self.done_path)
        self._remove(self.data_path)
        return True
