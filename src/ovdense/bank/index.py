"""The bank's retrieval index (FAISS): built, extended, written, read and searched as the authors do.

Authors (generate_vfm_embeddings.py ``update_faiss_cache``, corrclip_segmentor.py): keys L2-normalised in float32
(``x / (|x| + 1e-12)``), ``IndexIDMap2(IndexIVFPQ(IndexFlatIP(d), d, nlist, 32, 8))`` with nlist = int(8 sqrt(N)),
trained once on all N rows (the IVFPQ metric is faiss' default L2; only the coarse quantizer is IP); later builds
add the missing ids without retraining; search with nprobe = min(256, nlist). faiss is imported inside the functions.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..fileio import write_atomic_durable

__all__ = [
    "FAISS_MIN_POINTS",
    "MAX_NPROBE",
    "MIN_TRAIN_ROWS",
    "PQ_M",
    "PQ_NBITS",
    "TRAIN_SEED",
    "add_to_index",
    "build_index",
    "describe_index",
    "import_faiss",
    "index_ids",
    "index_nlist",
    "index_nprobe",
    "normalize_keys",
    "read_index",
    "search",
    "write_index",
]

#: Product-quantiser sub-vectors and bits per code (authors' FAISS_M, FAISS_NBITS).
PQ_M = 32
PQ_NBITS = 8
#: IVFPQ training needs 2**nbits = 256 rows (faiss' k-means of each PQ sub-quantiser refuses fewer points).
MIN_TRAIN_ROWS = 2**PQ_NBITS
#: The authors' nprobe cap (set on their GPU copy of the inner index).
MAX_NPROBE = 256
#: faiss' ClusteringParameters.min_points_per_centroid default: fewer training rows per centroid get its warning.
FAISS_MIN_POINTS = 39
#: Seed of the training sample (``train_size``); the authors' builder seeds with 42 too.
TRAIN_SEED = 42


def import_faiss():
    """The faiss module, or one line saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise OvdenseError("the memory bank needs faiss: install 'ovdense[bank]' (pip install faiss-cpu)") from None
    return faiss


def index_nlist(n: int) -> int:
    """The authors' number of IVF lists for ``n`` rows: ``max(1, int(8 * sqrt(n)))``."""
    return max(1, int(8 * math.sqrt(n)))


def normalize_keys(keys) -> np.ndarray:
    """Keys as the index stores them: float32 [N, D] C-contiguous, each row divided by (its L2 norm + 1e-12)."""
    x = np.asarray(keys, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidArgumentError(f"keys: expected [N, D], got shape {tuple(x.shape)}")
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_ids(ids, n: int) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) != n:
        raise InvalidArgumentError(f"ids: expected [{n}] (one per key row), got shape {tuple(ids.shape)}")
    if n and not np.issubdtype(ids.dtype, np.integer):
        raise InvalidArgumentError(f"ids: expected integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if n and ids.min() < 0:
        raise InvalidArgumentError(f"ids: region ids are >= 0, got {int(ids.min())}")
    if len(np.unique(ids)) != n:
        raise InvalidArgumentError("ids: an id is given twice")
    return ids


def _inner(index):
    """The index an IDMap wraps (downcast), or the index itself."""
    faiss = import_faiss()
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else index


def build_index(keys, ids, kind: str = "ivfpq", train_size: int | None = None, gpu: int | None = None):
    """A new index over ``keys`` with ``ids``, trained once.

    Args:
        keys: float [N, D] region keys (any scale: they are L2-normalised here, :func:`normalize_keys`).
        ids: int [N] region ids (the store rows), unique.
        kind: ``"ivfpq"``: the authors' ``IndexIDMap2(IndexIVFPQ(IndexFlatIP(D), D, nlist, 32, 8))``, nlist =
            :func:`index_nlist` (N), D a multiple of 32. ``"flat"``: ``IndexIDMap2(IndexFlatIP(D))``, exact (ours,
            for banks too small to train). An ``"ivfpq"`` index over fewer than 256 rows is built flat, with a
            warning.
        train_size: train on a seeded random sample of that many rows instead of all N (ours, for 10^7-row banks;
            at least max(256, nlist)); the index still holds all N rows, and nlist still follows N.
        gpu: train the IVFPQ on this GPU as the authors do (``update_faiss_cache``: a GPU copy trained, copied
            back); on a faiss without GPUs, or when that fails, it trains on the CPU with a warning.

    Returns:
        the faiss index (``ntotal`` = N).
    """
    faiss = import_faiss()
    x = normalize_keys(keys)
    n, d = x.shape
    ids = _check_ids(ids, n)
    if n == 0:
        raise InvalidArgumentError("build_index: no keys (an empty bank has no index)")
    if kind not in ("ivfpq", "flat"):
        raise InvalidArgumentError(f"build_index: kind {kind!r} is not 'ivfpq' or 'flat'")
    if kind == "ivfpq" and n < MIN_TRAIN_ROWS:
        warnings.warn(
            f"the bank has {n} regions, fewer than the {MIN_TRAIN_ROWS} an IVFPQ index needs to train: building an "
            "exact flat index instead",
            stacklevel=2,
        )
        kind = "flat"
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        index.add_with_ids(x, ids)
        return index
    if d % PQ_M:
        raise InvalidArgumentError(f"build_index: the key width {d} is not a multiple of the PQ sub-vectors {PQ_M}")
    nlist = index_nlist(n)
    train = x
    if train_size is not None:
        need = max(MIN_TRAIN_ROWS, nlist)
        if train_size < need:
            raise InvalidArgumentError(f"build_index: train_size {train_size} is below max(256, nlist) = {need}")
        if train_size < n:
            rows = np.sort(np.random.default_rng(TRAIN_SEED).choice(n, size=train_size, replace=False))
            train = x[rows]
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, PQ_M, PQ_NBITS)
    if len(train) < FAISS_MIN_POINTS * max(nlist, 2**PQ_NBITS):
        warnings.warn(
            f"training the index on {len(train)} rows for {nlist} lists and {2**PQ_NBITS} PQ centroids (faiss "
            f"advises {FAISS_MIN_POINTS} rows per centroid): it works, with a lower recall than a larger bank's",
            stacklevel=2,
        )
    # faiss prints that advice once per k-means (33 lines on stderr); said once above, so its own copy is off. The
    # threshold only gates the message: the training itself is unchanged.
    ivf.cp.min_points_per_centroid = 1
    ivf.pq.cp.min_points_per_centroid = 1
    trained = None if gpu is None else _train_on_gpu(faiss, ivf, train, gpu)
    if trained is None:
        ivf.train(train)
    else:
        ivf = trained
    index = faiss.IndexIDMap2(ivf)
    index.add_with_ids(x, ids)
    return index


def _train_on_gpu(faiss, ivf, train: np.ndarray, device: int):
    """``ivf`` trained on a GPU copy and copied back to the CPU; None (with a warning) where that is not possible."""
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        warnings.warn("faiss GPU training: this faiss has no GPU (faiss-cpu); training on the CPU", stacklevel=3)
        return None
    try:
        resources = faiss.StandardGpuResources()
        copy = faiss.index_cpu_to_gpu(resources, device, ivf)
        copy.train(train)
        return faiss.index_gpu_to_cpu(copy)
    except Exception as err:  # noqa: BLE001 - the authors fall back to the CPU the same way
        warnings.warn(f"faiss GPU training failed ({first_line(err)}); training on the CPU", stacklevel=3)
        return None


def index_ids(index) -> np.ndarray:
    """The ids an IDMap index holds, int64 [ntotal], in insertion order."""
    faiss = import_faiss()
    if not hasattr(index, "id_map"):
        raise OvdenseError(f"the index is a {type(index).__name__}, not an IndexIDMap2 (no region ids)")
    return faiss.vector_to_array(index.id_map).astype(np.int64)


def add_to_index(index, keys, ids) -> int:
    """Add the rows whose id is not in the index yet (normalised as :func:`build_index`), never retraining.

    Args:
        index: an IndexIDMap2 over a trained index.
        keys: float [N, D]; ids: int [N] (unique), row i of keys has id ids[i].

    Returns:
        how many rows were added.
    """
    x = normalize_keys(keys)
    ids = _check_ids(ids, len(x))
    have = index_ids(index)
    if x.shape[1] != index.d:
        raise InvalidArgumentError(f"add_to_index: keys are {x.shape[1]} wide, the index {index.d}")
    if not index.is_trained:
        raise OvdenseError("add_to_index: the index is not trained (build it with build_index)")
    new = ~np.isin(ids, have)
    if new.any():
        index.add_with_ids(np.ascontiguousarray(x[new]), np.ascontiguousarray(ids[new]))
    return int(new.sum())


def write_index(index, path) -> None:
    """Write the index with faiss' own format, atomically (the old file or the whole new one, never half)."""
    faiss = import_faiss()
    data = faiss.serialize_index(index)  # uint8 array: written through our temp file + rename
    write_atomic_durable(path, lambda f: f.write(memoryview(data)))


def read_index(path):
    """Read an index file (ours or the authors').

    Raises:
        OvdenseError: the file is missing or faiss cannot read it.
    """
    faiss = import_faiss()
    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"index {path} does not exist")
    try:
        return faiss.read_index(str(path))
    except Exception as err:  # faiss raises RuntimeError with a C++ stack in the message
        raise OvdenseError(f"index {path} cannot be read by faiss: {first_line(err)}") from None


def index_nprobe(index) -> int | None:
    """The nprobe the authors search with: min(256, nlist) for an IVF index, None for an exact one."""
    inner = _inner(index)
    return min(MAX_NPROBE, inner.nlist) if hasattr(inner, "nlist") else None


def search(index, queries, k: int) -> np.ndarray:
    """The ids of the ``k`` nearest keys of each query.

    Args:
        index: an IndexIDMap2 (IVF or flat inside).
        queries: float32 [R, D] (the authors pass L2-normalised region means).
        k: neighbours per query.

    Returns:
        int64 [R, k] region ids, best first; -1 where the probed lists hold fewer than k rows.

    nprobe = min(256, nlist) is set on the inner IVF index for the search, as the authors set it on their GPU copy,
    and put back afterwards (the file keeps faiss' default, as theirs).
    """
    import_faiss()
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if q.ndim != 2 or q.shape[1] != index.d:
        raise InvalidArgumentError(f"queries: expected [R, {index.d}], got shape {tuple(q.shape)}")
    if k < 1:
        raise InvalidArgumentError(f"k: expected >= 1, got {k}")
    inner = _inner(index)
    nprobe = index_nprobe(index)
    old = inner.nprobe if nprobe is not None else None
    try:
        if nprobe is not None:
            inner.nprobe = nprobe
        _, found = index.search(q, k)
    finally:
        if old is not None:
            inner.nprobe = old
    return found.astype(np.int64, copy=False)


def describe_index(index) -> dict:
    """What the index is: ``{"type", "dim", "ntotal", "metric", "nlist", "nprobe", "pq_m", "pq_nbits"}`` (IVF fields
    None for a flat index)."""
    faiss = import_faiss()
    inner = _inner(index)
    wrapper = type(index).__name__
    kind = type(inner).__name__ if inner is not index else ""
    metric = {faiss.METRIC_L2: "L2", faiss.METRIC_INNER_PRODUCT: "IP"}.get(inner.metric_type, str(inner.metric_type))
    pq = getattr(inner, "pq", None)
    return {
        "type": f"{wrapper}({kind})" if kind else wrapper,
        "dim": int(index.d),
        "ntotal": int(index.ntotal),
        "metric": metric,
        "nlist": int(inner.nlist) if hasattr(inner, "nlist") else None,
        "nprobe": index_nprobe(index),
        "pq_m": int(pq.M) if pq is not None else None,
        "pq_nbits": int(pq.nbits) if pq is not None else None,
    }
