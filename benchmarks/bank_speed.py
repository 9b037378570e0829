"""Memory-bank index cost: build time, query latency, size and recall of the authors' IVFPQ against exact search.

For each bank size N (synthetic 1024-d region keys, the width of C-RADIOv3-L), two indexes over the same keys:

- ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact (:func:`ovdense.bank.index.build_index` ``kind="flat"``);
- ``ivfpq``: the authors' ``IndexIDMap2(IndexIVFPQ(IndexFlatIP(1024), 1024, nlist = int(8 sqrt N), 32, 8))``, trained on
  all N keys, searched with nprobe = min(256, nlist) (:func:`ovdense.bank.index.search`).

Columns: build (train + add) in seconds, the index's size in memory (= its file), the latency of one image's query
(``--regions`` regions, K = 20, as inference asks once per image) and of a batch of 1000 regions, and recall@20 of
IVFPQ: the fraction of the exact top 20 that IVFPQ also returns, over 1000 held-out queries.

Keys: ``--clusters`` Gaussian clusters plus noise (un-normalised, as the keys are stored; the index normalises them);
queries are drawn the same way. Real keys are distributed otherwise: their recall may differ.

    python benchmarks/bank_speed.py [--sizes 10000 100000] [--threads 2] [--regions 32] [--train-size 100000]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

from ovdense.bank.index import build_index, describe_index, import_faiss, search

DIM = 1024
K = 20


def keys(n: int, clusters: int, seed: int) -> np.ndarray:
    """float32 [n, DIM] synthetic region keys (fp16-rounded, as a bank stores them)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(12345).standard_normal((clusters, DIM)).astype(np.float32)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):  # bounded temporaries
        stop = min(n, start + 100_000)
        labels = rng.integers(0, clusters, stop - start)
        out[start:stop] = centers[labels] + 0.6 * rng.standard_normal((stop - start, DIM), dtype=np.float32)
    return out.astype(np.float16).astype(np.float32)


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--threads", type=int, default=None, help="faiss OpenMP threads (default faiss')")
    parser.add_argument("--regions", type=int, default=32, help="regions of one image's query (default 32)")
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument(
        "--train-size", type=int, default=None, help="train IVFPQ on a sample of this many keys (default: all of them)"
    )
    args = parser.parse_args()

    def sample(kind: str) -> int | None:
        return args.train_size if kind == "ivfpq" else None

    faiss = import_faiss()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {cpu}")
    queries = keys(1000, args.clusters, seed=999)
    one_image = np.ascontiguousarray(queries[: args.regions])
    rows = []
    for n in args.sizes:
        data = keys(n, args.clusters, seed=n)
        ids = np.arange(n, dtype=np.int64)
        exact = None
        for kind in ("flat", "ivfpq"):
            build_s, index = timed(
                lambda kind=kind, data=data, ids=ids: build_index(data, ids, kind=kind, train_size=sample(kind))
            )
            size = faiss.serialize_index(index).nbytes
            image_s, _ = timed(lambda index=index: search(index, one_image, K), repeat=5)
            batch_s, found = timed(lambda index=index: search(index, queries, K), repeat=2)
            info = describe_index(index)
            if kind == "flat":
                exact, recall = found, 1.0
            else:
                recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, exact, strict=True)]))
            setting = "exact" if kind == "flat" else f"nlist {info['nlist']}, nprobe {info['nprobe']}"
            rows.append((n, kind, setting, build_s, size, image_s, batch_s, recall))
            print(f"  N={n} {kind}: built in {build_s:.1f} s", flush=True)
            del index
    print()
    print(f"| N | index | search | build (train + add) | size | one image ({args.regions} regions) | 1000 regions "
          "| recall@20 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for n, kind, setting, build_s, size, image_s, batch_s, recall in rows:
        print(f"| {n:,} | {kind} | {setting} | {build_s:.2f} s | {size / 2**20:.1f} MiB | {image_s * 1e3:.2f} ms "
              f"| {batch_s * 1e3:.0f} ms | {recall:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
