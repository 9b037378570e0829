"""The memory bank's files, index, reader and support logits (ovdense.bank), against banks written exactly as the
CorrCLIPv2 authors' builder writes them (memory_bank_builder/{manifest,pt_store,generate_vfm_embeddings}.py)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from ovdense.bank import index as bank_index  # noqa: E402
from ovdense.bank.layout import BankLayout, find_bank  # noqa: E402
from ovdense.bank.manifest import ImageEntry, append_images, read_manifest, region_count, region_values  # noqa: E402
from ovdense.bank.memory_bank import MemoryBank  # noqa: E402
from ovdense.bank.store import STORE_MODELS, read_store, write_store  # noqa: E402
from ovdense.bank.support import support_logits  # noqa: E402
from ovdense.cli import main  # noqa: E402
from ovdense.errors import InvalidArgumentError, OvdenseError  # noqa: E402

KEY_DIM = 64  # a multiple of the 32 PQ sub-vectors, small enough to train in a second
CLIP_DIM = 512  # the authors' metaclip_b / dfnclip_b width


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    # faiss' OpenMP threads spin on a busy 2-core machine: one thread is faster for these small banks.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def crafted_keys(n: int, d: int = KEY_DIM, seed: int = 0) -> np.ndarray:
    """fp16 [n, d] VFM-like keys: 40 clusters plus noise (un-normalised, as the authors store them)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((40, d))
    labels = rng.integers(0, 40, n)
    return (centers[labels] + 0.35 * rng.standard_normal((n, d))).astype(np.float16)


def authors_index(keys16: np.ndarray) -> faiss.Index:
    """The authors' update_faiss_cache on a new bank, call by call (generate_vfm_embeddings.py 240-285)."""
    vecs = keys16.astype(np.float32)
    vecs = vecs / (np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12)
    vecs = np.ascontiguousarray(vecs, dtype="float32")
    dim = vecs.shape[1]
    nlist = max(1, int(8 * np.sqrt(len(vecs))))
    ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, 32, 8)
    ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # only faiss' "too few points" print
    ivf.train(vecs)
    index = faiss.IndexIDMap2(ivf)
    index.add_with_ids(vecs, np.arange(len(vecs), dtype="int64"))
    return index


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """fp16 [n, d] L2-normalised rows (the authors store normalised CLIP region values)."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))
    return torch.nn.functional.normalize(x, dim=-1).half()


# 34 images of 5..14 regions: 320 regions, enough to train the authors' IVFPQ (256 rows at least).
COUNTS = [5 + (7 * i) % 10 for i in range(34)]
COUNTS[-1] += 320 - sum(COUNTS)


def write_authors_bank(root, name: str = "coco", counts=COUNTS) -> dict:
    """A bank as the authors' build.py leaves it: manifest + images.tsv (manifest.py's writes), fp16 .pt stores
    (pt_store.py's finalize: torch.save of torch.from_numpy of the fp16 array), VFM keys and their IDMap2(IVFPQ)."""
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "clip_embeddings").mkdir(exist_ok=True)
    (root / "vfm_embeddings").mkdir(exist_ok=True)
    next_id = 0
    with (
        open(root / "manifests" / f"{name}.manifest.txt", "a") as fm,
        open(root / "manifests" / f"{name}.images.tsv", "a") as fi,
    ):
        for i, n in enumerate(counts):
            stem = f"img{i:03d}"
            fi.write(f"{stem}\t{next_id}\t{n}\n")
            for idx in range(n):
                fm.write(f"{stem}#{idx}\n")
            next_id += n
    total = next_id
    stores = {}
    for seed, store in enumerate(("metaclip_b", "dfnclip_b")):
        data = unit_rows(total, CLIP_DIM, seed + 1)
        torch.save(torch.from_numpy(np.array(data.numpy())), root / "clip_embeddings" / f"{name}_{store}.pt")
        stores[store] = data
    keys = crafted_keys(total)
    torch.save(torch.from_numpy(keys), root / "vfm_embeddings" / f"{name}_radiov3.pt")
    faiss.write_index(authors_index(keys), str(root / "vfm_embeddings" / f"{name}_radiov3.faiss"))
    return {"total": total, "stores": stores, "keys": keys}


@pytest.fixture
def bank_root(tmp_path):
    root = tmp_path / "memory_bank"
    written = write_authors_bank(root)
    return root, written


def one_line_error(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


# ---------------------------------------------------------------- layout, manifest


def test_layout_paths_are_the_authors(tmp_path):
    layout = BankLayout(tmp_path, "coco")
    assert layout.manifest == tmp_path / "manifests" / "coco.manifest.txt"
    assert layout.images_tsv == tmp_path / "manifests" / "coco.images.tsv"
    assert layout.masks_dir("entityseg") == tmp_path / "masks" / "coco" / "entityseg"
    assert layout.store("metaclip_b") == tmp_path / "clip_embeddings" / "coco_metaclip_b.pt"
    assert layout.keys("radiov3") == tmp_path / "vfm_embeddings" / "coco_radiov3.pt"
    assert layout.index("radiov3") == tmp_path / "vfm_embeddings" / "coco_radiov3.faiss"
    assert STORE_MODELS["metaclip_l"].width == 768 and STORE_MODELS["dfnclip_l"].pretrained == "dfn2b"


def test_find_bank_and_file_ownership(bank_root, tmp_path):
    root, _ = bank_root
    assert find_bank(root).name == "coco"
    assert find_bank(tmp_path).root == root  # the authors' repository root: memory_bank/ inside it
    write_authors_bank(root, "coco_x", counts=[300])
    with pytest.raises(OvdenseError) as err:
        find_bank(root)
    assert "coco, coco_x" in one_line_error(err) and "--name" in str(err.value)
    coco, coco_x = find_bank(root, "coco"), find_bank(root, "coco_x")
    # coco_x_metaclip_b.pt starts with "coco_" too: it is coco_x's, not a store "x_metaclip_b" of coco
    assert sorted(coco.stores()) == ["dfnclip_b", "metaclip_b"]
    assert sorted(coco_x.stores()) == ["dfnclip_b", "metaclip_b"]
    assert [p.name for p in coco.indexes()] == ["coco_radiov3.faiss"]
    assert coco.vfm_of(coco.indexes()[0]) == "radiov3"
    with pytest.raises(OvdenseError) as err:
        find_bank(root, "lvis")
    assert "no bank 'lvis'" in one_line_error(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OvdenseError) as err:
        find_bank(tmp_path / "empty")
    assert "no bank" in one_line_error(err)


def test_read_manifest_of_the_authors_files(bank_root):
    root, written = bank_root
    images = read_manifest(BankLayout(root, "coco"))
    starts = np.concatenate([[0], np.cumsum(COUNTS)[:-1]])
    assert images == [ImageEntry(f"img{i:03d}", int(s), n) for i, (s, n) in enumerate(zip(starts, COUNTS, strict=True))]
    assert read_manifest(BankLayout(root, "none_yet")) == []


def test_manifest_disagreements_are_one_line(bank_root):
    root, _ = bank_root
    layout = BankLayout(root, "coco")
    lines = layout.manifest.read_text().splitlines()
    layout.manifest.write_text("\n".join([*lines[:12], "img999#0", *lines[13:]]) + "\n")
    with pytest.raises(OvdenseError) as err:
        read_manifest(layout)
    assert "line 13 is 'img999#0'" in one_line_error(err) and "region id 12" in str(err.value)
    layout.manifest.write_text("\n".join(lines[:100]) + "\n")
    with pytest.raises(OvdenseError) as err:
        read_manifest(layout)
    assert "has 100 lines" in one_line_error(err) and "320 regions" in str(err.value)
    tsv = layout.images_tsv.read_text().splitlines()
    layout.images_tsv.write_text("\n".join([tsv[0], tsv[0].replace("img000", "dup")]) + "\n")
    with pytest.raises(OvdenseError) as err:
        read_manifest(layout)
    assert ":2: image 'dup' starts at id 0, expected 5" in one_line_error(err)


def test_append_images_and_interrupted_appends(tmp_path, monkeypatch):
    layout = BankLayout(tmp_path, "bank")
    added = append_images(layout, [("b", 2), ("a", 0), ("c", 3)])
    assert added == [ImageEntry("b", 0, 2), ImageEntry("c", 2, 3)]  # 0 regions: not registered (authors' rule)
    assert layout.images_tsv.read_text() == "b\t0\t2\nc\t2\t3\n"
    assert layout.manifest.read_text() == "b#0\nb#1\nc#0\nc#1\nc#2\n"
    assert append_images(layout, [("d", 1)]) == [ImageEntry("d", 5, 1)]
    for bad in ([("c", 1)], [("e", 1), ("e", 2)], [("x\ty", 1)], [("f", -1)]):
        with pytest.raises(InvalidArgumentError):
            append_images(layout, bad)
    assert read_manifest(layout)[-1] == ImageEntry("d", 5, 1)
    before = (layout.manifest.read_text(), layout.images_tsv.read_text())

    # killed while the manifest is written (before its rename): nothing changed
    import ovdense.bank.manifest as manifest_module

    real = manifest_module.write_atomic_durable

    def dies_in(target):
        def fake(path, write):
            if path == target:
                raise KeyboardInterrupt  # write_atomic removes its temp file: the target is untouched
            real(path, write)

        return fake

    monkeypatch.setattr(manifest_module, "write_atomic_durable", dies_in(layout.manifest))
    with pytest.raises(KeyboardInterrupt):
        append_images(layout, [("e", 4)])
    assert (layout.manifest.read_text(), layout.images_tsv.read_text()) == before

    # killed between the two renames: the new manifest is there, the tsv (the commit) is not -> reads as before
    monkeypatch.setattr(manifest_module, "write_atomic_durable", dies_in(layout.images_tsv))
    with pytest.raises(KeyboardInterrupt):
        append_images(layout, [("e", 4)])
    assert layout.manifest.read_text() != before[0] and layout.images_tsv.read_text() == before[1]
    with pytest.warns(UserWarning, match="4 lines past the 6 regions"):
        assert read_manifest(layout) == [ImageEntry("b", 0, 2), ImageEntry("c", 2, 3), ImageEntry("d", 5, 1)]
    monkeypatch.setattr(manifest_module, "write_atomic_durable", real)
    with pytest.warns(UserWarning, match="interrupted append"):
        assert append_images(layout, [("f", 1)]) == [ImageEntry("f", 6, 1)]
    assert layout.manifest.read_text() == before[0] + "f#0\n"  # the remnant dropped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_manifest(layout)) == 4
    assert not [p for p in (tmp_path / "manifests").iterdir() if p.name.endswith(".tmp")]


def test_region_count_is_the_authors_rule():
    mask = np.array([[0, 3, 3], [7, 7, -1], [0, 0, 3]], dtype=np.int32)
    assert region_values(mask).tolist() == [-1, 3, 7]  # non-zero unique, ascending: EoMT's -1 counts (authors)
    assert region_count(mask) == 3
    assert region_count(np.zeros((4, 4), np.int64)) == 0
    stack = np.zeros((5, 4, 4), dtype=bool)
    assert region_count(stack) == 5 and region_values(stack).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(InvalidArgumentError):
        region_count(np.zeros((4,)))
    with pytest.raises(InvalidArgumentError):
        region_count(np.zeros((4, 4), np.float32))


# ---------------------------------------------------------------- stores


def test_store_round_trip_mmap_and_errors(bank_root, tmp_path):
    root, written = bank_root
    data = read_store(root / "clip_embeddings" / "coco_metaclip_b.pt")  # the authors' file
    assert data.dtype == torch.float16 and torch.equal(data, written["stores"]["metaclip_b"])
    base = unit_rows(1000, 64, 7)
    path = tmp_path / "view.pt"
    write_store(path, base[10:20])  # a view: only its 10 rows are written
    assert path.stat().st_size < 10 * 64 * 2 + 4096
    assert torch.equal(read_store(path), base[10:20]) and torch.equal(read_store(path, mmap=False), base[10:20])
    torch.save(base.float(), tmp_path / "f32.pt")
    torch.save(base[0], tmp_path / "1d.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for bad, words in (
        ("f32.pt", "torch.float32"),
        ("1d.pt", "shape (64,)"),
        ("junk.pt", "cannot be read"),
        ("no.pt", "not exist"),
    ):
        with pytest.raises(OvdenseError) as err:
            read_store(tmp_path / bad)
        assert words in one_line_error(err)
    with pytest.raises(InvalidArgumentError):
        write_store(tmp_path / "x.pt", base.float())


# ---------------------------------------------------------------- index


def test_build_index_is_the_authors_index_byte_for_byte():
    keys = crafted_keys(320)
    with pytest.warns(UserWarning, match="faiss advises 39 rows per centroid"):
        ours = bank_index.build_index(keys, np.arange(320))
    assert np.array_equal(faiss.serialize_index(ours), faiss.serialize_index(authors_index(keys)))
    desc = bank_index.describe_index(ours)
    assert desc["type"] == "IndexIDMap2(IndexIVFPQ)" and desc["metric"] == "L2"
    assert desc["nlist"] == bank_index.index_nlist(320) == int(8 * np.sqrt(320)) == 143
    assert desc["nprobe"] == 143 and (desc["pq_m"], desc["pq_nbits"]) == (32, 8)
    assert bank_index.index_nlist(0) == 1 and bank_index.index_nlist(2_800_000) == 13386


def test_flat_search_equals_brute_force():
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((200, 48)).astype(np.float32) * rng.uniform(0.5, 3, (200, 1)).astype(np.float32)
    ids = rng.permutation(1000)[:200]  # ids need not be 0..N-1: search returns them, not positions
    with pytest.warns(UserWarning, match="fewer than the 256"):
        index = bank_index.build_index(keys, ids)  # too small for IVFPQ: flat, said so
    assert bank_index.describe_index(index)["type"] == "IndexIDMap2(IndexFlatIP)"
    queries = rng.standard_normal((30, 48)).astype(np.float32)
    unit = keys / (np.linalg.norm(keys, axis=1, keepdims=True) + 1e-12)
    expected = ids[np.argsort(-(queries @ unit.T), axis=1)[:, :10]]
    np.testing.assert_array_equal(bank_index.search(index, queries, 10), expected)
    found = bank_index.search(index, queries[:2], 250)  # more than the bank holds: -1 kept
    assert (found[:, 200:] == -1).all() and (found[:, :200] >= 0).all()


def test_ivfpq_recall_with_the_authors_nprobe():
    """1200 clustered 64-d keys: nlist = 277, nprobe = min(256, nlist) = 256 probes most lists; recall@20 against
    exact inner-product search measured 0.974 (faiss-cpu 1.15.1), asserted above 0.95; the file's own nprobe = 1 gives
    0.20 (asserted below 0.5: the search does set nprobe)."""
    keys = crafted_keys(1200, seed=1)
    with pytest.warns(UserWarning, match="1200 rows for 277 lists"):
        index = bank_index.build_index(keys, np.arange(1200))
    assert bank_index.index_nprobe(index) == 256 < bank_index.describe_index(index)["nlist"] == 277
    unit = bank_index.normalize_keys(keys)
    rng = np.random.default_rng(5)
    queries = unit[rng.integers(0, 1200, 200)] + 0.1 * rng.standard_normal((200, KEY_DIM)).astype(np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    found = bank_index.search(index, queries, 20)
    exact = np.argsort(-(queries @ unit.T), axis=1)[:, :20]
    recall = np.mean([len(set(f) & set(e)) / 20 for f, e in zip(found, exact, strict=True)])
    assert recall > 0.95, recall
    inner = faiss.downcast_index(index.index)
    assert inner.nprobe == 1  # the search's nprobe was put back: a written file keeps faiss' default, as theirs
    _, default = index.search(queries, 20)
    assert np.mean([len(set(f) & set(e)) / 20 for f, e in zip(default, exact, strict=True)]) < 0.5


def test_add_to_index_adds_only_missing_ids_without_retraining(tmp_path):
    keys = crafted_keys(900, seed=2)
    with pytest.warns(UserWarning, match="faiss advises"):
        index = bank_index.build_index(keys[:600], np.arange(600))
    inner = faiss.downcast_index(index.index)
    centroids = inner.quantizer.reconstruct_n(0, inner.nlist).copy()
    codebooks = faiss.vector_to_array(inner.pq.centroids).copy()
    assert bank_index.add_to_index(index, keys, np.arange(900)) == 300
    assert bank_index.add_to_index(index, keys, np.arange(900)) == 0
    assert index.ntotal == 900 and np.array_equal(np.sort(bank_index.index_ids(index)), np.arange(900))
    assert np.array_equal(inner.quantizer.reconstruct_n(0, inner.nlist), centroids)
    assert np.array_equal(faiss.vector_to_array(inner.pq.centroids), codebooks)
    assert inner.nlist == bank_index.index_nlist(600)  # nlist of the first build, as the authors' extension
    # the authors' own extension path on the same rows gives the same index
    theirs = authors_index(keys[:600])
    vecs = bank_index.normalize_keys(keys[600:])
    theirs.add_with_ids(vecs, np.arange(600, 900, dtype="int64"))
    assert np.array_equal(faiss.serialize_index(index), faiss.serialize_index(theirs))
    path = tmp_path / "i.faiss"
    bank_index.write_index(index, path)
    assert np.array_equal(faiss.serialize_index(bank_index.read_index(path)), faiss.serialize_index(index))
    (tmp_path / "bad.faiss").write_bytes(b"\0" * 64)
    with pytest.raises(OvdenseError) as err:
        bank_index.read_index(tmp_path / "bad.faiss")
    assert "cannot be read by faiss" in one_line_error(err)
    with pytest.raises(InvalidArgumentError):
        bank_index.add_to_index(index, keys[:2, :32], [0, 1])


# ---------------------------------------------------------------- MemoryBank


def test_memory_bank_open_info_and_search(bank_root):
    root, written = bank_root
    bank = MemoryBank.open(root)
    assert len(bank.images) == 34 and bank.num_regions == written["total"] == 320
    assert bank.store_names == ["dfnclip_b", "metaclip_b"] and bank.vfm == "radiov3" and bank.key_dim == KEY_DIM
    assert torch.equal(bank.store("dfnclip_b"), written["stores"]["dfnclip_b"])
    bank.check(key_dim=KEY_DIM, store_dims={"metaclip_b": 512, "dfnclip_b": 512})
    info = bank.info()
    assert info["problems"] == [] and (info["images"], info["regions"]) == (34, 320)
    assert info["stores"]["metaclip_b"] | {"path": None, "bytes": None} == {
        "path": None, "rows": 320, "dim": 512, "dtype": "float16", "bytes": None
    }  # fmt: skip
    assert info["stores"]["metaclip_b"]["bytes"] == (root / "clip_embeddings" / "coco_metaclip_b.pt").stat().st_size
    assert {k: info["index"][k] for k in ("type", "vfm", "ntotal", "nlist", "nprobe", "dim")} == {
        "type": "IndexIDMap2(IndexIVFPQ)", "vfm": "radiov3", "ntotal": 320, "nlist": 143, "nprobe": 143, "dim": 64
    }  # fmt: skip
    queries = torch.from_numpy(bank_index.normalize_keys(written["keys"][:5]))
    found = bank.search(queries, k=20)
    assert found.dtype == torch.int64 and found.shape == (5, 20)
    assert torch.equal(found, torch.from_numpy(bank_index.search(authors_index(written["keys"]), queries.numpy(), 20)))
    assert found[:, 0].tolist() == [0, 1, 2, 3, 4]  # each key finds itself first


@pytest.mark.parametrize(
    "breakage, check_args, words",
    [
        ("short_store", {}, "store 'metaclip_b' has 319 rows but the manifest registers 320 regions"),
        ("wide", {"store_dims": {"metaclip_b": 768}}, "store 'metaclip_b' is 512 wide, expected 768"),
        ("none", {"key_dim": 1024}, "keys are 64 wide, expected 1024"),
        ("missing_store", {"store_dims": {"dfnclip_b": 512}}, "has no store 'dfnclip_b'"),
        ("no_stores", {}, "has no CLIP store"),
        ("two_indexes", {}, "has 2 indexes (VFMs dinov2, radiov3); pick one with vfm="),
        ("no_index", {}, "has no index"),
        ("grown_manifest", {}, "index coco_radiov3.faiss holds 320 keys but the manifest registers 323 regions"),
        ("short_keys", {}, "keys coco_radiov3.pt have 300 rows"),
    ],
)
def test_every_mismatch_is_one_line(bank_root, breakage, check_args, words):
    root, written = bank_root
    clip, vfm = root / "clip_embeddings", root / "vfm_embeddings"
    if breakage == "short_store":
        torch.save(written["stores"]["metaclip_b"][:319].clone(), clip / "coco_metaclip_b.pt")
    elif breakage == "missing_store":
        (clip / "coco_dfnclip_b.pt").unlink()
    elif breakage == "no_stores":
        for p in clip.iterdir():
            p.unlink()
    elif breakage == "two_indexes":
        (vfm / "coco_dinov2.faiss").write_bytes((vfm / "coco_radiov3.faiss").read_bytes())
    elif breakage == "no_index":
        (vfm / "coco_radiov3.faiss").unlink()
    elif breakage == "grown_manifest":
        append_images(BankLayout(root, "coco"), [("new", 3)])
    elif breakage == "short_keys":
        torch.save(torch.from_numpy(written["keys"][:300].copy()), vfm / "coco_radiov3.pt")
    bank = MemoryBank.open(root)
    problems = bank.problems(**check_args)
    assert any(words in p for p in problems), problems
    with pytest.raises(OvdenseError) as err:
        bank.check(**check_args)
    assert one_line_error(err).startswith(problems[0])
    if breakage == "two_indexes":
        MemoryBank.open(root, vfm="radiov3").check()  # naming one resolves it
        with pytest.raises(OvdenseError):
            bank.search(np.zeros((1, KEY_DIM), np.float32))


def test_empty_bank_is_one_line(tmp_path):
    root = tmp_path / "mb"
    (root / "manifests").mkdir(parents=True)
    (root / "manifests" / "e.manifest.txt").write_text("")
    (root / "manifests" / "e.images.tsv").write_text("")
    with pytest.raises(OvdenseError) as err:
        MemoryBank.open(root).check()
    assert "bank 'e' is empty" in one_line_error(err) and "(and 2 more" in str(err.value)  # no store, no index


# ---------------------------------------------------------------- CLI


def test_cli_bank_info(bank_root, capsys):
    root, _ = bank_root
    assert main(["bank", "info", str(root)]) == 0
    out = capsys.readouterr().out
    assert "bank coco in" in out and "images   34" in out and "regions  320" in out
    assert "store    metaclip_b: 320 x 512 float16" in out and "store    dfnclip_b: 320 x 512 float16" in out
    assert "index    radiov3: IndexIDMap2(IndexIVFPQ), 64-d keys, metric L2, nlist 143" in out
    assert "nprobe min(256, nlist) = 143, ntotal 320" in out and "agree" in out
    torch.save(torch.zeros(320, 768, dtype=torch.float16), root / "clip_embeddings" / "coco_dfnclip_b.pt")
    assert main(["bank", "info", str(root)]) == 2
    captured = capsys.readouterr()
    assert "store    dfnclip_b: 320 x 768" in captured.out
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("ovdense: error: store 'dfnclip_b' is 768 wide, expected 512")
    assert main(["bank", "info", str(root / "nothing")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_bank_is_not_imported_by_ovdense():
    code = "import sys, ovdense, ovdense.cli; sys.exit(any(m in sys.modules for m in ('faiss', 'ovdense.bank')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- support logits


def test_support_logits_against_numpy():
    store = unit_rows(50, 32, 11)
    text = torch.from_numpy(np.random.default_rng(12).standard_normal((7, 32)).astype(np.float32))
    ids = torch.tensor([[3, 17, 17, 40], [5, -1, 9, -1], [-1, -1, 49, -1], [0, 1, 2, 3]])
    got = support_logits(ids, store, text)
    s, t = store.numpy(), text.numpy()
    expected = []
    for row in ids.numpy():
        valid = row[row >= 0]  # -1 dropped; a repeated id counts twice, as the authors' mean over the K rows
        mean = s[valid].astype(np.float32).mean(0).astype(np.float16).astype(np.float32)
        value = mean / np.linalg.norm(mean)
        expected.append(value @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T)
    assert got.dtype == torch.float32 and got.shape == (4, 7)
    np.testing.assert_allclose(got.numpy(), np.stack(expected), rtol=0, atol=1e-6)
    # the authors' all-fp16 arithmetic (S:257-264) differs by fp16 rounding only
    theirs = torch.stack([store[[i for i in row.tolist() if i != -1]].mean(0) for row in ids])
    theirs = torch.nn.functional.normalize(theirs, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).half().T
    np.testing.assert_allclose(got.numpy(), theirs.float().numpy(), rtol=0, atol=2e-3)


def test_support_logits_empty_and_bad_ids():
    store, text = unit_rows(10, 8, 1), unit_rows(3, 8, 2).float()
    ids = torch.tensor([[1, 2], [-1, -1]])
    with pytest.raises(OvdenseError) as err:
        support_logits(ids, store, text)
    assert "1 of 2 regions retrieved no neighbour" in one_line_error(err)
    nan = support_logits(ids, store, text, on_empty="nan")
    assert torch.isnan(nan[1]).all() and torch.isfinite(nan[0]).all()
    with pytest.raises(OvdenseError) as err:
        support_logits(torch.tensor([[10]]), store, text)
    assert "outside the store's rows 0..9" in one_line_error(err)
    with pytest.raises(InvalidArgumentError):
        support_logits(torch.tensor([[1]]), store, unit_rows(3, 16, 2))


def test_vfm_names_become_safe_file_names(tmp_path):
    from ovdense.bank.layout import BankLayout, file_part

    assert file_part("radiov3") == "radiov3" and file_part("radiov2.5") == "radiov2.5"
    assert file_part("timm:vit_large_patch16_224") == "timm-vit_large_patch16_224"
    layout = BankLayout(tmp_path, "coco")
    assert layout.index("timm:vit_large_patch16_224").name == "coco_timm-vit_large_patch16_224.faiss"


def test_gpu_training_without_a_gpu_warns_and_trains_on_the_cpu():
    from ovdense.bank.index import build_index, search

    rng = np.random.default_rng(5)
    keys = rng.normal(size=(300, 64)).astype(np.float32)
    ids = np.arange(300)
    cpu = build_index(keys, ids)
    with pytest.warns(UserWarning, match="training on the CPU"):
        other = build_index(keys, ids, gpu=0)
    queries = keys[:10] / np.linalg.norm(keys[:10], axis=1, keepdims=True)
    np.testing.assert_array_equal(search(cpu, queries, 5), search(other, queries, 5))
