"""Nothing lost, nothing silent: crash-safe resume points, content-keyed teacher cache, progress lines, bad runs."""

import csv
import json
import os
import re
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ovdense.cli import main
from ovdense.errors import OvdenseError
from ovdense.train.cache import TeacherCache
from ovdense.train.config import TrainConfig
from ovdense.train.state import CURRENT_FILE, STATE_DIR, STATE_FILE, WEIGHTS_FILE, current_state
from ovdense.train.trainer import Trainer, progress_line

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def write_images(folder, n=4, seed=0, size=(40, 48)):
    """``n`` small structured JPEGs named img_00.jpg ...; another ``seed`` gives other pixels, same names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([xx * (4 + i), yy * 4, (xx + yy) * 2], -1) % 256
        img = np.clip(base + rng.integers(-40, 41, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img_{i:02d}.jpg")
    return folder


def config(data, out, **kw):
    base = dict(
        data=str(data), out=str(out), model="ovdense-test-eva02", vfm="test-dinov2", image_size=32,
        batch_size=2, workers=0, epochs=2, lr=1e-3, warmup_steps=1, log_every=1, max_split=2, max_boxes=2,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_same_tensors(a, b, what):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), what
    for key in ta:
        assert torch.equal(ta[key], tb[key]), (what, key)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("reliability") / "images")


@pytest.fixture
def no_tensorboard(monkeypatch):
    # TensorBoard writes from a background thread; without it, every write of a run is the main thread's.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


# -- crash at every write -----------------------------------------------------------------------------------------


class Crash(BaseException):
    """A simulated kill: a BaseException, so no ``except Exception`` handler of the code under test absorbs it."""


#: The calls through which a run changes what is on disk (pathlib's replace/rename/unlink go through these).
#: ``open``/``write`` are not among them: written data only counts once renamed into place. ``shutil.rmtree``
#: counts as one call (a crash inside it leaves a partial folder that nothing names, as one before it does).
PRIMITIVES = ((os, "fsync"), (os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (shutil, "rmtree"))
REMOVALS = ("unlink", "remove", "rmtree")


class CrashAt:
    """Patch :data:`PRIMITIVES` so that the ``n``-th call (main thread) raises :class:`Crash` instead of running.

    After the crash, removals are no-ops, as in a killed process whose cleanup handlers never run. ``n = 0``
    only counts.
    """

    def __init__(self, monkeypatch, n: int):
        self.n, self.calls, self.crashed, self.where, self.inside = n, 0, False, None, 0
        for module, name in PRIMITIVES:
            monkeypatch.setattr(module, name, self._wrap(name, getattr(module, name)))

    def _wrap(self, name, real):
        def call(*args, **kwargs):
            if self.crashed and name in REMOVALS:
                return None
            if not self.inside and threading.current_thread() is threading.main_thread():
                self.calls += 1
                if self.calls == self.n:
                    self.crashed, self.where = True, f"{name}{args[:1]}"
                    raise Crash(self.where)
            self.inside += name == "rmtree"
            try:
                return real(*args, **kwargs)
            finally:
                self.inside -= name == "rmtree"

        return call


@pytest.fixture
def fast_models(monkeypatch):
    """``load_model`` from memory: one real load, then copies (the crash test builds over a hundred trainers)."""
    import copy

    import ovdense.weights

    base = ovdense.weights.load_model("ovdense-test-eva02")

    def load(name, pretrained=None, checkpoint=None, device="cpu"):
        assert name == "ovdense-test-eva02" and checkpoint is None
        return copy.deepcopy(base, memo={id(base.tokenizer): base.tokenizer})

    monkeypatch.setattr(ovdense.weights, "load_model", load)


def test_a_crash_at_any_write_resumes_to_the_same_checkpoints(
    images, tmp_path, monkeypatch, no_tensorboard, fast_models
):
    # 2 epochs x 2 steps, resume points at step 2 (epoch end, after checkpoint 1), step 3 (mid-epoch) and
    # step 4 (after checkpoint 2): the first save, a save that replaces one, both kinds of resume.
    kw = dict(save_every=3)
    ref = tmp_path / "ref"
    with monkeypatch.context() as m:
        counter = CrashAt(m, 0)
        Trainer.from_config(config(images, ref, **kw)).fit()
    total = counter.calls
    assert total > 30  # every save goes through several steps
    ref_ckpts = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert ref_ckpts == ["epoch_1.safetensors", "epoch_2.safetensors"]
    ref_losses = [(r["step"], r["loss"]) for r in rows(ref / "log.csv")]
    assert [s for s, _ in ref_losses] == ["1", "2", "3", "4"]
    for n in range(1, total + 1):
        out = tmp_path / f"crash_{n}"
        with monkeypatch.context() as m:
            crash = CrashAt(m, n)
            with pytest.raises(Crash):
                Trainer.from_config(config(images, out, **kw)).fit()
        resumable = (out / STATE_DIR / CURRENT_FILE).is_file()
        Trainer.from_config(config(images, out, resume=str(out) if resumable else None, **kw)).fit()
        where = f"crash at call {n} of {total}: {crash.where}"
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ref_ckpts, where  # no temp files left
        for name in ref_ckpts:
            assert_same_tensors(ref / "checkpoints" / name, out / "checkpoints" / name, where)
        assert_same_tensors(current_state(ref) / WEIGHTS_FILE, current_state(out) / WEIGHTS_FILE, where)
        # One complete state folder and CURRENT: the leftovers of the crash are gone.
        left = sorted(p.name for p in (out / STATE_DIR).iterdir())
        assert len(left) == 2 and CURRENT_FILE in left, (where, left)
        assert [(r["step"], r["loss"]) for r in rows(out / "log.csv")] == ref_losses, where
        shutil.rmtree(out)


def test_the_state_is_one_folder_named_by_current(images, tmp_path, no_tensorboard):
    out = tmp_path / "run"
    trainer = Trainer.from_config(config(images, out, epochs=1, save_every=1))
    trainer.fit()
    folder = current_state(out)
    assert folder.parent == out / STATE_DIR and (out / STATE_DIR / CURRENT_FILE).read_text().strip() == folder.name
    assert current_state(out / STATE_DIR) == folder and current_state(folder) == folder
    meta = json.loads((folder / STATE_FILE).read_text())
    assert meta["step"] == 2 and meta["epoch"] == 1
    import hashlib

    assert meta["weights"]["sha256"] == hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == sorted([CURRENT_FILE, folder.name])


# -- damaged resume points ----------------------------------------------------------------------------------------


def one_error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ovdense:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_damaged_resume_points_are_refused_with_one_line(images, tmp_path, capsys, no_tensorboard):
    a, b = tmp_path / "a", tmp_path / "b"
    Trainer.from_config(config(images, a, epochs=1, max_steps=1)).fit()  # max_steps leaves a resume point
    Trainer.from_config(config(images, b, epochs=1, max_steps=1, lr=5e-3)).fit()
    folder = current_state(a)
    weights = folder / WEIGHTS_FILE
    argv = ["train", "declip", "--data", str(images), "--out", str(a), "--model", "ovdense-test-eva02",
            "--vfm", "test-dinov2", "--image-size", "32", "--batch-size", "2", "--workers", "0",
            "--max-split", "2", "--max-boxes", "2", "--resume", str(a)]  # fmt: skip
    original = weights.read_bytes()
    # Another run's weights (same model, same tensors, other values) beside this run's trainer_state.json.
    shutil.copyfile(current_state(b) / WEIGHTS_FILE, weights)
    line = one_error_line(capsys, argv)
    assert "damaged" in line and str(weights) in line, line
    # One flipped byte in the last tensor.
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    line = one_error_line(capsys, argv)
    assert "damaged" in line and str(weights) in line, line
    weights.write_bytes(original)
    # A torn trainer_state.json, a missing weights file, CURRENT naming a folder that is gone.
    meta = (folder / STATE_FILE).read_text()
    (folder / STATE_FILE).write_text(meta[: len(meta) // 2])
    with pytest.raises(OvdenseError, match=f"damaged: {re.escape(str(folder / STATE_FILE))} is unreadable"):
        Trainer.from_config(config(images, a, epochs=1, resume=str(a)))
    (folder / STATE_FILE).write_text(meta)
    weights.rename(tmp_path / "aside")
    with pytest.raises(OvdenseError, match=f"damaged: {re.escape(str(weights))} is missing"):
        Trainer.from_config(config(images, a, epochs=1, resume=str(a)))
    (tmp_path / "aside").rename(weights)
    (a / STATE_DIR / CURRENT_FILE).write_text("step-9-gone\n")
    with pytest.raises(OvdenseError, match="CURRENT names 'step-9-gone', which is missing"):
        Trainer.from_config(config(images, a, epochs=1, resume=str(a / STATE_DIR)))
    (a / STATE_DIR / CURRENT_FILE).write_text(folder.name + "\n")
    Trainer.from_config(config(images, a, epochs=1, resume=str(a)))  # intact again: resumes


def test_resume_without_a_resume_point_says_so(images, tmp_path):
    (tmp_path / "run" / STATE_DIR).mkdir(parents=True)
    with pytest.raises(OvdenseError, match="holds no resume point"):
        Trainer.from_config(config(images, tmp_path / "new", resume=str(tmp_path / "run")))


def test_the_legacy_state_layout_resumes_with_a_warning(images, tmp_path, no_tensorboard):
    out = tmp_path / "run"
    Trainer.from_config(config(images, out, epochs=1, max_steps=1)).fit()
    folder = current_state(out)
    meta = json.loads((folder / STATE_FILE).read_text())
    del meta["weights"]
    state = out / STATE_DIR
    (state / STATE_FILE).write_text(json.dumps(meta))
    shutil.move(folder / WEIGHTS_FILE, state / WEIGHTS_FILE)
    shutil.rmtree(folder)
    (state / CURRENT_FILE).unlink()
    with pytest.warns(UserWarning, match="cannot be checked"):
        trainer = Trainer.from_config(config(images, out, epochs=1, resume=str(out)))
    assert trainer.step == 1
    trainer.fit()
    assert sorted(p.name for p in state.iterdir()) == sorted([CURRENT_FILE, current_state(out).name])


# -- log.csv holds each step once ---------------------------------------------------------------------------------


def test_rows_logged_after_the_resume_point_are_dropped_on_resume(images, tmp_path, monkeypatch, no_tensorboard):
    ref, out = tmp_path / "ref", tmp_path / "run"
    Trainer.from_config(config(images, ref, save_every=1)).fit()
    real = Trainer._save_state_all

    def crash_at_step_3(self):
        if self.step == 3:
            raise Crash("killed after logging step 3, before its resume point")
        real(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_save_state_all", crash_at_step_3)
        with pytest.raises(Crash):
            Trainer.from_config(config(images, out, save_every=1)).fit()
    assert [r["step"] for r in rows(out / "log.csv")] == ["1", "2", "3"]
    with open(out / "val.csv", "w", newline="") as f:  # validation rows past the resume point go too
        f.write("step,epoch,val/box_things_top1\r\n2,1,10.0\r\n3,2,20.0\r\n")
    with pytest.warns(UserWarning, match="dropped 1 rows past step 2"):
        Trainer.from_config(config(images, out, save_every=1, resume=str(out))).fit()
    got = [(r["step"], r["loss"]) for r in rows(out / "log.csv")]
    assert got == [(r["step"], r["loss"]) for r in rows(ref / "log.csv")]
    assert [r["step"] for r in rows(out / "val.csv")] == ["2"]


def test_a_torn_last_log_row_is_dropped(images, tmp_path, no_tensorboard):
    out = tmp_path / "run"
    Trainer.from_config(config(images, out, epochs=1, max_steps=1)).fit()
    with open(out / "log.csv", "a", newline="") as f:
        f.write("2,1,0.001,0.5")  # killed mid-row: no line end
    Trainer.from_config(config(images, out, epochs=1, resume=str(out))).fit()
    assert [r["step"] for r in rows(out / "log.csv")] == ["1", "2"]
    assert all(None not in r.values() for r in rows(out / "log.csv"))


# -- teacher cache keyed by content -------------------------------------------------------------------------------


def test_teacher_cache_is_keyed_by_content_not_file_name(tmp_path, no_tensorboard):
    one = write_images(tmp_path / "one", seed=0)
    two = write_images(tmp_path / "two", seed=1)  # the same file names, other pictures
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    cache = tmp_path / "cache"
    kw = dict(epochs=1, teacher_cache=str(cache))
    first = Trainer.from_config(config(one, tmp_path / "a", **kw))
    first.fit()
    second = Trainer.from_config(config(two, tmp_path / "b", **kw))
    second.fit()
    vfm = second.objective.caches["vfm"]
    assert vfm.hits == 0 and vfm.misses == 4  # nothing of folder one was taken for folder two
    assert len(list(vfm.dir.glob("*.safetensors"))) == 8
    # A cache of its own (a run uses the fp16-rounded teacher values with any cache, cold or warm).
    Trainer.from_config(config(two, tmp_path / "c", epochs=1, teacher_cache=str(tmp_path / "own"))).fit()
    losses = {run: [r["loss"] for r in rows(tmp_path / run / "log.csv")] for run in "bc"}
    assert losses["b"] == losses["c"]
    # The same pictures under other names share the entries.
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for p in sorted(two.iterdir()):
        shutil.copyfile(p, renamed / f"other_{p.name}")
    third = Trainer.from_config(config(renamed, tmp_path / "d", **kw))
    third.fit()
    assert third.objective.caches["vfm"].hits == 4 and third.objective.caches["vfm"].misses == 0


def entries_by_image(folder):
    """``{image name: entry path}`` of a cache namespace, from each entry's metadata."""
    out = {}
    for p in folder.glob("*.safetensors"):
        with safe_open(str(p), framework="pt") as f:
            out[f.metadata()["name"]] = p
    return out


def test_damaged_and_wrong_shape_cache_entries_are_recomputed_with_a_warning(images, tmp_path, no_tensorboard):
    cache = tmp_path / "cache"
    kw = dict(epochs=1, teacher_cache=str(cache))
    Trainer.from_config(config(images, tmp_path / "cold", **kw)).fit()
    (ns,) = [p for p in cache.iterdir() if p.name.startswith("vfm-")]
    entries = entries_by_image(ns)
    assert sorted(entries) == [f"img_{i:02d}.jpg" for i in range(4)]
    entries["img_01.jpg"].write_bytes(b"\x00" * 40)  # a torn file
    # A well-formed entry of another shape, as another version or teacher could have left.
    save_file({"value": torch.zeros(3, 2, 2, dtype=torch.float16)}, str(entries["img_02.jpg"]), {"shape": "[3, 2, 2]"})
    warm = Trainer.from_config(config(images, tmp_path / "warm", **kw))
    with pytest.warns(UserWarning) as record:
        warm.fit()
    messages = [str(w.message) for w in record if "teacher cache" in str(w.message)]
    assert len(messages) == 2, messages
    assert any("img_01.jpg" in m and "unreadable" in m for m in messages), messages
    assert any("img_02.jpg" in m and "shape [3, 2, 2]" in m for m in messages), messages
    vfm = warm.objective.caches["vfm"]
    assert vfm.misses == 2 and vfm.hits == 2
    cold_losses = [r["loss"] for r in rows(tmp_path / "cold" / "log.csv")]
    assert [r["loss"] for r in rows(tmp_path / "warm" / "log.csv")] == cold_losses
    # The recomputed entries were written back: the next run reads everything, silently.
    again = Trainer.from_config(config(images, tmp_path / "again", **kw))
    again.fit()
    assert again.objective.caches["vfm"].hits == 4


def test_teacher_cache_shape_checks_without_a_teacher_run(tmp_path):
    calls = []

    def compute(pos, shape=(2, 3)):
        calls.append(list(pos))
        return torch.stack([torch.full(shape, float(i)) for i in pos])

    cache = TeacherCache(tmp_path, "ns")
    first = cache.batch(["k0", "k1", "k2"], compute, labels=["a.jpg", "b.jpg", "c.jpg"])
    assert first.shape == (3, 2, 3) and calls == [[0, 1, 2]]
    assert json.loads((cache.dir / "spec.json").read_text()) == {"shape": [2, 3], "dtype": "float16"}
    # A wrong-shape entry written the cache's own way (another namespace, the same key): spec.json catches it
    # even when every entry of the batch is cached.
    other = TeacherCache(tmp_path, "other")
    other.batch(["k1"], lambda pos: torch.zeros(len(pos), 5))
    (path,) = other.dir.glob("*.safetensors")
    shutil.copyfile(path, cache.dir / path.name)
    calls.clear()
    fresh = TeacherCache(tmp_path, "ns")
    with pytest.warns(UserWarning, match=r"b\.jpg .* has shape \[5\], the teacher gives \[2, 3\]"):
        values = fresh.batch(["k0", "k1", "k2"], compute, labels=["a.jpg", "b.jpg", "c.jpg"])
    assert calls == [[1]] and torch.equal(values, first) and (fresh.hits, fresh.misses) == (2, 1)
    # Without spec.json, cached values that disagree are settled by one computed value.
    shutil.copyfile(path, cache.dir / path.name)
    (cache.dir / "spec.json").unlink()
    calls.clear()
    blind = TeacherCache(tmp_path, "ns")
    with pytest.warns(UserWarning, match=r"b\.jpg"):
        values = blind.batch(["k0", "k1", "k2"], compute, labels=["a.jpg", "b.jpg", "c.jpg"])
    assert calls == [[0], [1]] and torch.equal(values, first)


# -- progress -----------------------------------------------------------------------------------------------------


def test_progress_line_format():
    values = {"content": 0.3, "context": 0.1, "loss": 0.41234}
    line = progress_line(20, 600, 1, 6, values, 1e-5, 3.21)
    assert line == "step 20/600 epoch 1/6 loss 0.4123 content 0.3000 context 0.1000 lr 1.0e-05 3.2 img/s"


LINE = re.compile(
    r"step (\d+)/4 epoch ([12])/2 loss \d+\.\d{4} content \d+\.\d{4} context \d+\.\d{4} lr \d\.\de-\d\d \d+\.\d img/s"
)


def test_off_a_terminal_progress_is_one_plain_line_every_log_every_steps(images, tmp_path, capfd, no_tensorboard):
    Trainer.from_config(config(images, tmp_path / "run", log_every=2)).fit()
    err = capfd.readouterr().err
    assert "\r" not in err and "it/s" not in err and "\x1b[" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert all(LINE.fullmatch(ln) for ln in lines), lines
    assert [int(LINE.fullmatch(ln).group(1)) for ln in lines] == [1, 2, 4]
    assert [int(LINE.fullmatch(ln).group(2)) for ln in lines] == [1, 1, 2]


def test_on_a_terminal_progress_is_a_bar(images, tmp_path, monkeypatch, no_tensorboard):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    Trainer.from_config(config(images, tmp_path / "run", epochs=1)).fit()
    text = term.getvalue()
    assert "\r" in text and "img/s" in text and "loss=" in text and "2/2" in text
    assert not any(ln.startswith("step ") for ln in text.replace("\r", "\n").splitlines())


# -- runs that cannot start ---------------------------------------------------------------------------------------


def test_all_unreadable_data_fails_before_the_run_folder_exists(tmp_path, capsys):
    data = tmp_path / "bad"
    data.mkdir()
    for i in range(4):
        (data / f"img_{i}.jpg").write_bytes(b"not a jpeg, number %d" % i)
    out = tmp_path / "run"
    with pytest.raises(OvdenseError, match="none of the 4 images"):
        Trainer.from_config(config(data, out))
    assert not out.exists()
    argv = ["train", "declip", "--data", str(data), "--out", str(out), "--model", "ovdense-test-eva02",
            "--vfm", "test-dinov2", "--image-size", "32", "--workers", "0"]  # fmt: skip
    line = one_error_line(capsys, argv)
    assert "could be read" in line and not out.exists()


def test_an_unusable_out_fails_before_any_model_loads(images, tmp_path, monkeypatch):
    import ovdense.weights

    def no_model(*a, **k):
        raise AssertionError("a model loaded before --out was checked")

    monkeypatch.setattr(ovdense.weights, "load_model", no_model)
    somefile = tmp_path / "somefile"
    somefile.write_text("x")
    with pytest.raises(OvdenseError, match="is not a folder"):
        Trainer.from_config(config(images, somefile))
    with pytest.raises(OvdenseError, match="is a file"):  # fails for root too: no folder can be made there
        Trainer.from_config(config(images, somefile / "run"))
    assert somefile.read_text() == "x"
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(OvdenseError, match="cannot be written"):
                Trainer.from_config(config(images, locked / "run"))
        finally:
            locked.chmod(0o700)


def test_a_run_that_can_be_continued_is_not_overwritten(images, tmp_path, no_tensorboard):
    out = tmp_path / "run"
    Trainer.from_config(config(images, out, epochs=1)).fit()
    before = {p: p.read_bytes() for p in sorted((out / "checkpoints").iterdir())}
    with pytest.raises(OvdenseError, match=f"{out} holds a run that can be continued: pass --resume {out}"):
        Trainer.from_config(config(images, out, epochs=1))
    assert {p: p.read_bytes() for p in sorted((out / "checkpoints").iterdir())} == before
