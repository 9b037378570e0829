"""`ovdense bank build`: the authors' four steps (masks, manifest, CLIP values, VFM keys + index) on tiny random models,
resumable at any kill -9 (bit-equal to an uninterrupted build), incremental (the authors' append semantics), and
sharded over torchrun processes (two equal one)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ovdense.bank.build import ClipSpec, build_bank
from ovdense.bank.index import index_ids, read_index, search
from ovdense.bank.layout import BankLayout
from ovdense.bank.manifest import read_manifest
from ovdense.bank.pooling import region_means
from ovdense.bank.slots import SlotStore
from ovdense.bank.store import read_store, write_store
from ovdense.cli import main
from ovdense.errors import OvdenseError

NAME = "t"
CLIP = ClipSpec("tv", "ovdense-test-vit12")  # 12 blocks: CorrCLIP's spatial branch averages blocks 6-10
SETTINGS = dict(clips=[CLIP], values_vfm="test-dino", vfm="test-timm", slide_short=112, slide_crop=112, device="cpu")
ARGV = ["--name", NAME, "--clip-model", CLIP.model, "--store-name", CLIP.store, "--values-vfm", "test-dino",
        "--vfm", "test-timm", "--slide-short", "112", "--slide-crop", "112", "--device", "cpu", "--workers", "0",
        "--flush-every", "1"]  # fmt: skip
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
#: (height, width) of the images; im05 is square: short side 112 makes it one 112 x 112 window.
SIZES = [(60, 84), (72, 50), (58, 90), (66, 66), (88, 52), (70, 70), (54, 80), (80, 64), (62, 62), (76, 58),
         (52, 74), (68, 86)]  # fmt: skip


def grid_mask(h: int, w: int, seed: int) -> np.ndarray:
    """A 6 x 8 grid of regions with shuffled ids 0..47 (0 = the unsegmented cell): 47 regions."""
    ids = np.random.default_rng(seed).permutation(48).reshape(6, 8)
    return ids[np.minimum(np.arange(h) * 6 // h, 5)][:, np.minimum(np.arange(w) * 8 // w, 7)].astype(np.int32)


def write_images(folder: Path, masks: Path, indices) -> None:
    rng = np.random.default_rng(1)
    pixels = {i: rng.integers(0, 256, (*SIZES[i], 3), dtype=np.uint8) for i in range(len(SIZES))}
    for i in indices:
        sub = folder if i % 2 else folder / "sub"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(sub / f"im{i:02d}.png")
        masks.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(masks / f"im{i:02d}.npz", instance_mask=grid_mask(*SIZES[i], seed=i))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank_data")
    write_images(root / "images", root / "masks", range(12))
    # An image without any region (not registered, as the authors) and a second file of stem im03 (the first wins).
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / "blank.png")
    np.savez_compressed(root / "masks" / "blank.npz", instance_mask=np.zeros((40, 40), np.int32))
    (root / "images" / "sub" / "zz").mkdir()
    Image.fromarray(np.full((40, 40, 3), 9, np.uint8)).save(root / "images" / "sub" / "zz" / "im03.jpg")
    return root


def one_thread(fn):
    """Run ``fn`` as the command-line runs do (OMP_NUM_THREADS=1): bit-equal results need equal thread counts."""
    threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted build in this process."""
    root = tmp_path_factory.mktemp("reference") / "memory_bank"
    report = one_thread(
        lambda: build_bank(data / "images", root, NAME, masks_dir=data / "masks", progress=False, **SETTINGS)
    )
    return root, report


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ovdense", "bank", "build", *args]


def assert_same_bank(a: Path, b: Path) -> None:
    """Stores bit-equal, manifest equal, index search results equal, no intermediate left."""
    la, lb = BankLayout(a, NAME), BankLayout(b, NAME)
    assert la.manifest.read_bytes() == lb.manifest.read_bytes()
    assert la.images_tsv.read_bytes() == lb.images_tsv.read_bytes()
    for path in (la.store(CLIP.store), la.keys("test-timm")):
        other = b / path.relative_to(a)
        assert torch.equal(read_store(path, mmap=False), read_store(other, mmap=False)), path.name
    keys = read_store(la.keys("test-timm")).float().numpy()
    queries = np.concatenate([keys, np.random.default_rng(0).standard_normal((50, keys.shape[1]))]).astype(np.float32)
    ia, ib = read_index(la.index("test-timm")), read_index(lb.index("test-timm"))
    np.testing.assert_array_equal(index_ids(ia), index_ids(ib))
    np.testing.assert_array_equal(search(ia, queries, 20), search(ib, queries, 20))
    left = [p.name for p in b.rglob("*") if p.name.endswith((".f16.npy", ".done.npy", ".tmp"))]
    assert not left, left


# ---------------------------------------------------------------- what the bank holds


def test_manifest_values_and_keys_follow_the_authors_formulas(data, reference):
    from ovdense.bank.values import ValueExtractor
    from ovdense.heads import PassInputs
    from ovdense.inference import mmseg_resize
    from ovdense.predictor import pixel_stats
    from ovdense.vfm import load_vfm
    from ovdense.vfm_native import load_dense_vfm
    from ovdense.weights import load_model

    root, report = reference
    layout = BankLayout(root, NAME)
    entries = read_manifest(layout)
    # Sorted by stem; 47 regions each (the non-zero ids); the blank image is not registered; im03 is the .png.
    assert [e.stem for e in entries] == [f"im{i:02d}" for i in range(12)]
    assert all(e.count == 47 for e in entries) and entries[5].start == 5 * 47
    assert report["manifest"] == {"images": 12, "regions": 564, "added_images": 12, "added_regions": 564,
                                  "no_region": 1}  # fmt: skip
    assert report["complete"] and report["failed"] == 0 and report["index"]["trained"]
    # --masks-dir files are copied as they are, into the authors' default folder.
    assert (layout.masks_dir("entityseg") / "im03.npz").read_bytes() == (data / "masks" / "im03.npz").read_bytes()

    # Values of im05 (70 x 70 -> one 112 x 112 window) by hand: un-normalised projected features of CorrCLIP's pass
    # without merging, bilinear to 112 then to 70 x 70, mean over each non-zero region, L2-normalised.
    image = np.array(Image.open(data / "images" / "im05.png"))
    mask = grid_mask(70, 70, seed=5)
    store = read_store(layout.store(CLIP.store), mmap=False)[entries[5].start : entries[5].start + 47].float()
    loaded, dino = load_model(CLIP.model), load_vfm("test-dino")
    extractor = ValueExtractor(loaded, dino, short_side=112, crop=112)
    mean, std = (torch.tensor(pixel_stats(v)).view(1, 3, 1, 1) for v in (loaded.tower.preprocess.mean,
                                                                          loaded.tower.preprocess.std))  # fmt: skip
    x = (torch.from_numpy(mmseg_resize(image, 2048, 112)).permute(2, 0, 1)[None].float() - mean) / std
    ids = F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(112, 112), mode="nearest")[:, 0].long()

    def by_hand(merge: bool, normalize: bool) -> torch.Tensor:
        extractor.head.merges_regions = merge
        with torch.no_grad():
            feats = extractor.head.encode_dense(loaded.tower, x, PassInputs("sclip", vfm=dino, masks=ids),
                                                normalize=normalize)  # fmt: skip
            up = F.interpolate(F.interpolate(feats, size=(112, 112), mode="bilinear"), size=(70, 70), mode="bilinear")
        rows = [up[0][:, torch.from_numpy(mask == v)].mean(1) for v in range(1, 48)]
        return F.normalize(torch.stack(rows), dim=-1)

    torch.testing.assert_close(store, by_hand(False, False), atol=2e-3, rtol=0)  # fp16 storage
    assert not torch.allclose(store, by_hand(False, True), atol=2e-2)  # normalised per pixel: another bank
    assert not torch.allclose(store, by_hand(True, False), atol=2e-2)  # v1's merge on: another bank

    # Keys: the VFM map bilinear to ref_size, normalised per pixel, averaged per region, not normalised again.
    vfm = load_dense_vfm("test-timm", device="cpu")
    feats, ref = vfm.dense(image)
    assert tuple(ref) == (70, 70)
    up = F.normalize(F.interpolate(feats, size=tuple(ref), mode="bilinear"), dim=1)[0]
    want = torch.stack([up[:, torch.from_numpy(mask == v)].mean(1) for v in range(1, 48)])
    keys = read_store(layout.keys("test-timm"), mmap=False)[entries[5].start : entries[5].start + 47].float()
    torch.testing.assert_close(keys, want, atol=1e-3, rtol=0)
    assert float(keys.norm(dim=1).min()) < 0.95  # means of unit vectors, kept un-normalised as the authors
    # The index holds every id once, IVFPQ with the authors' nlist, over the normalised keys.
    index = read_index(layout.index("test-timm"))
    assert sorted(index_ids(index)) == list(range(564))
    assert faiss.downcast_index(index.index).nlist == int(8 * np.sqrt(564))


def test_region_means_upsample_in_chunks_as_one_map():
    torch.manual_seed(0)
    feats = torch.randn(1, 7, 5, 6)
    mask = np.random.default_rng(0).integers(-1, 4, (23, 17))  # -1 is a region too (EoMT's unsegmented rest)
    for normalize in (False, True):
        up = F.interpolate(feats, size=(23, 17), mode="bilinear")
        up = F.normalize(up, dim=1) if normalize else up
        want = torch.stack([up[0][:, torch.from_numpy(mask == v)].mean(1) for v in (-1, 1, 2, 3)])
        for budget in (1 << 26, 2 * 23 * 17, 1):  # all channels at once, two at a time, one at a time
            torch.testing.assert_close(region_means(feats, mask, normalize, budget), want, atol=1e-6, rtol=0)
    stack = np.random.default_rng(1).random((3, 23, 17)) > 0.5  # a bool stack: one region per channel
    up = F.normalize(F.interpolate(feats, size=(23, 17), mode="bilinear"), dim=1)
    want = torch.stack([up[0][:, torch.from_numpy(m)].mean(1) for m in stack])
    torch.testing.assert_close(region_means(feats, stack, True), want, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- slot stores


def test_slot_store_commits_rows_only_after_their_values_and_survives_every_crash_state(tmp_path):
    final = tmp_path / "s_x.pt"
    store = SlotStore(final, 6, 4)
    assert store.prepare() == {"rows": 6, "done": 0, "imported": 0}
    store.open_for_write()
    store.write(0, np.ones((2, 4)))
    assert not store.done_mask().any()  # written, not flushed: not done (a kill now redoes those rows)
    assert store.flush() == 2
    np.testing.assert_array_equal(store.done_mask(), [1, 1, 0, 0, 0, 0])
    store.write(2, np.full((4, 4), 2.0))
    store.close()
    assert store.finalize() and not store.data_path.exists() and not store.done_path.exists()
    rows = read_store(final, mmap=False)
    assert rows.shape == (6, 4) and rows[0, 0] == 1 and rows[5, 0] == 2

    # The bank grew: the .pt is imported as the prefix, only the new rows are to do.
    grown = SlotStore(final, 9, 4)
    assert grown.prepare() == {"rows": 9, "done": 6, "imported": 6}
    np.testing.assert_array_equal(np.load(grown.data_path)[:6], rows.numpy())
    # A kill between the two renames of a create leaves values without flags: dropped, the import redone.
    os.unlink(grown.done_path)
    assert grown.prepare()["imported"] == 6
    # Grown again before finishing (the manifest grew mid-build): values copied row for row, flags extended.
    grown.open_for_write()
    grown.write(6, np.full((1, 4), 3.0))
    grown.close()
    bigger = SlotStore(final, 11, 4)
    assert bigger.prepare() == {"rows": 11, "done": 7, "imported": 0}
    assert np.load(bigger.data_path)[6, 0] == 3
    # Killed between growing the values and the flags: the flags are extended with False.
    old_done = np.load(bigger.done_path)[:7].copy()
    np.save(bigger.done_path, old_done)
    assert SlotStore(final, 11, 4).prepare()["done"] == 7
    # A finalize killed before its clean-up: intermediates beside a .pt of their own length, all done.
    bigger.open_for_write()
    bigger.write(7, np.zeros((4, 4)))
    bigger.close()
    write_store(final, torch.from_numpy(np.load(bigger.data_path)))
    assert SlotStore(final, 11, 4).prepare() == {"rows": 11, "done": 11, "imported": 0}
    assert not bigger.data_path.exists() and SlotStore(final, 11, 4).up_to_date()
    # Flags without values (the authors' finalize removes the values first) are stale.
    np.save(bigger.done_path, np.ones(11, bool))
    assert SlotStore(final, 12, 4).prepare() == {"rows": 12, "done": 11, "imported": 11}
    write_store(tmp_path / "w_x.pt", torch.zeros(3, 8).half())
    with pytest.raises(OvdenseError, match="8-d rows but this build makes 4-d"):
        SlotStore(tmp_path / "w_x.pt", 5, 4).prepare()


# ---------------------------------------------------------------- kill -9, extension, torchrun


def run_until(argv: list[str], ready, what: str) -> None:
    """Start the command, SIGKILL it as soon as ``ready()`` holds; it must not have finished on its own."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"{what}: finished before the kill point\n{err.decode()[-2000:]}"


def done_rows(path: Path) -> int:
    try:
        return int(np.count_nonzero(np.load(path, mmap_mode="r")))
    except (OSError, ValueError):
        return 0


def test_killed_at_every_step_equals_an_uninterrupted_build(data, reference, tmp_path):
    root = tmp_path / "memory_bank"
    layout = BankLayout(root, NAME)
    argv = cli("--images", str(data / "images"), "--root", str(root), "--masks-dir", str(data / "masks"), *ARGV)
    masks = layout.masks_dir("entityseg")
    values = SlotStore(layout.store(CLIP.store), 0, 1)
    keys = SlotStore(layout.keys("test-timm"), 0, 1)
    run_until(argv, lambda: len(list(masks.glob("*.npz"))) >= 3, "masks")
    run_until(argv, lambda: done_rows(values.done_path) >= 3 * 47, "values")
    assert not values.final.exists() and 0 < done_rows(values.done_path) < 564
    run_until(argv, lambda: done_rows(keys.done_path) >= 3 * 47, "keys")
    assert values.final.exists() and not keys.final.exists() and done_rows(keys.done_path) < 564
    build = lambda: build_bank(data / "images", root, NAME, masks_dir=data / "masks", progress=False, **SETTINGS)  # noqa: E731
    resumed = one_thread(build)  # the rerun (in this process: the kills are what needed the command line)
    assert resumed["complete"] and resumed["values"][CLIP.store]["computed_images"] == 0  # finished before the kill
    assert 0 < resumed["keys"]["computed_images"] < 12  # only the images the killed run had not committed
    assert_same_bank(reference[0], root)
    again = one_thread(build)
    assert again["values"][CLIP.store]["computed_images"] == again["keys"]["computed_images"] == 0  # nothing to redo
    assert again["index"]["added"] == 0 and again["manifest"]["added_images"] == 0


def test_extending_appends_ids_keeps_old_rows_and_never_retrains(data, reference, tmp_path):
    images, root = tmp_path / "images", tmp_path / "memory_bank"
    layout = BankLayout(root, NAME)
    shutil.copytree(data / "images", images, ignore=shutil.ignore_patterns("im0[4-7].png"))  # 8 of the 12 first
    first = one_thread(lambda: build_bank(images, root, NAME, masks_dir=data / "masks", progress=False, **SETTINGS))
    assert first["manifest"]["regions"] == 8 * 47 and first["index"]["trained"]
    before = {p: read_store(p, mmap=False) for p in (layout.store(CLIP.store), layout.keys("test-timm"))}
    old_manifest = layout.manifest.read_text()
    authors = read_index(layout.index("test-timm"))  # the authors' update: the old index + add_with_ids(new)
    for i in range(4, 8):
        shutil.copy(next(data.joinpath("images").rglob(f"im{i:02d}.png")), images)
    second = one_thread(lambda: build_bank(images, root, NAME, masks_dir=data / "masks", progress=False, **SETTINGS))
    assert second["index"] == {"path": str(layout.index("test-timm")), "trained": False, "added": 4 * 47,
                               "ntotal": 12 * 47}  # fmt: skip
    assert second["values"][CLIP.store]["imported"] == 8 * 47 and second["keys"]["computed_images"] == 4
    entries = read_manifest(layout)
    assert [e.stem for e in entries[8:]] == ["im04", "im05", "im06", "im07"]  # appended, sorted by stem
    assert layout.manifest.read_text().startswith(old_manifest)
    ref = {e.stem: e for e in read_manifest(BankLayout(reference[0], NAME))}
    for path, old in before.items():
        now = read_store(path, mmap=False)
        assert torch.equal(now[: len(old)], old)  # old rows untouched
        full = read_store(reference[0] / path.relative_to(root), mmap=False)
        for e in entries:  # every image's rows are what a build from scratch gives it, under its new ids
            assert torch.equal(now[e.start : e.start + e.count], full[ref[e.stem].start : ref[e.stem].start + e.count])
    index = read_index(layout.index("test-timm"))
    ivf, ivf0 = faiss.downcast_index(index.index), faiss.downcast_index(authors.index)
    quantizer, quantizer0 = (faiss.downcast_index(i.quantizer) for i in (ivf, ivf0))
    np.testing.assert_array_equal(faiss.vector_to_array(quantizer.codes), faiss.vector_to_array(quantizer0.codes))
    np.testing.assert_array_equal(faiss.vector_to_array(ivf.pq.centroids), faiss.vector_to_array(ivf0.pq.centroids))
    keys = read_store(layout.keys("test-timm")).float().numpy()
    new = keys[8 * 47 :] / (np.linalg.norm(keys[8 * 47 :], axis=1, keepdims=True) + 1e-12)
    authors.add_with_ids(np.ascontiguousarray(new, dtype=np.float32), np.arange(8 * 47, 12 * 47, dtype=np.int64))
    np.testing.assert_array_equal(index_ids(index), index_ids(authors))
    np.testing.assert_array_equal(search(index, keys, 20), search(authors, keys, 20))


def test_torchrun_two_processes_equal_one(data, reference, tmp_path):
    root = tmp_path / "memory_bank"
    argv = ["--images", str(data / "images"), "--root", str(root), "--masks-dir", str(data / "masks"), *ARGV]
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ovdense",
         "bank", "build", *argv],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert "(process 1 of 2)" in two.stderr and "index     trained and filled, 564 ids" in two.stderr
    assert_same_bank(reference[0], root)


# ---------------------------------------------------------------- failures and bad input


def test_generator_failures_are_counted_named_and_retried(data, tmp_path):
    images, root = tmp_path / "images", tmp_path / "memory_bank"
    write_images(images, tmp_path / "unused", [0, 1, 2])

    def generator(image):
        if image.shape[:2] == SIZES[1]:
            raise RuntimeError("the generator broke")
        return grid_mask(*image.shape[:2], seed=7)

    with pytest.warns(UserWarning, match=r"masks: 1 images failed .*im01: the generator broke"):
        report = one_thread(lambda: build_bank(images, root, NAME, mask_generator=generator, progress=False,
                                               **{**SETTINGS, "index": "flat"}))  # fmt: skip
    layout = BankLayout(root, NAME)
    assert report["masks"]["failed"] == 1 and report["failed"] == 1 and report["complete"]
    assert [e.stem for e in read_manifest(layout)] == ["im00", "im02"]
    saved = np.load(layout.masks_dir("custom") / "im00.npz")["instance_mask"]
    np.testing.assert_array_equal(saved, grid_mask(*SIZES[0], seed=7))
    report = one_thread(lambda: build_bank(images, root, NAME, mask_generator=lambda im: grid_mask(*im.shape[:2], 7),
                                           progress=False, **{**SETTINGS, "index": "flat"}))  # fmt: skip
    assert report["failed"] == 0 and [e.stem for e in read_manifest(layout)] == ["im00", "im02", "im01"]
    assert report["index"]["added"] == 47 and read_index(layout.index("test-timm")).ntotal == 3 * 47


def test_a_mask_changed_after_registration_stops_the_build(data, tmp_path):
    images, root = tmp_path / "images", tmp_path / "memory_bank"
    write_images(images, tmp_path / "masks", [0, 1])
    layout = BankLayout(root, NAME)
    kwargs = dict(masks_dir=tmp_path / "masks", progress=False, **{**SETTINGS, "index": "flat"})
    one_thread(lambda: build_bank(images, root, NAME, **kwargs))
    layout.store(CLIP.store).unlink()  # its rows are to do again
    np.savez_compressed(layout.masks_dir("entityseg") / "im01.npz", instance_mask=np.ones((72, 50), np.int32))
    with pytest.raises(OvdenseError, match=r"im01.npz has 1 regions but the manifest registers 47 for im01"):
        one_thread(lambda: build_bank(images, root, NAME, **kwargs))


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--clip", "meta_x"], "unknown --clip 'meta_x'"),
        (["--vfm", "radiov3", "--clip", "meta_b"], "--trust-remote-code"),
        (["--vfm", "nope"], "unknown --vfm 'nope'"),
        (["--clip-model", "ovdense-test-vit12"], "--clip-model needs --store-name"),
        (["--store-name", "x"], "go with --clip-model"),
        (["--masks-dir", "MASKS", "--mask-generator", "sam"], "not both"),
    ],
)
def test_bad_input_is_one_line_before_any_work(data, tmp_path, capsys, extra, words):
    root = tmp_path / "memory_bank"
    extra = [str(data / "masks") if e == "MASKS" else e for e in extra]
    base = ["bank", "build", "--images", str(data / "images"), "--root", str(root), "--name", NAME]
    code = main([*base, *(extra if "--vfm" in extra else ["--vfm", "test-timm", *extra])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and words in err[-1] and err[-1].startswith("ovdense: error:"), err
    assert not root.exists()


def test_empty_folder_and_a_bank_of_another_width_are_one_line(data, tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no image here")
    root = tmp_path / "memory_bank"
    code = main(["bank", "build", "--images", str(tmp_path / "empty"), "--root", str(root), "--name", NAME])
    assert code == 2 and "no images under" in capsys.readouterr().err and not root.exists()
    layout = BankLayout(root, NAME)
    layout.store(CLIP.store).parent.mkdir(parents=True)
    write_store(layout.store(CLIP.store), torch.zeros(10, 48).half())  # made by a 48-d CLIP
    code = main(["bank", "build", "--images", str(data / "images"), "--root", str(root), "--masks-dir",
                 str(data / "masks"), *ARGV])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "holds 48-d rows but ovdense-test-vit12 makes 32-d ones" in err, err
    assert not (root / "masks").exists()  # before any work
