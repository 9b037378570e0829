"""A run over many images keeps its promises: no output replaces an input or (unless asked) an existing file,
every image is checked against every limit the run meets before the first is processed, and an image that still
fails costs only its own outputs (one line, exit 1)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense.cli.outputs import window_size
from ovdense.errors import OvdenseError
from ovdense.fileio import check_outputs
from ovdense.inference import mmseg_resize, mmseg_resize_size

TINY = ["--model", "ovdense-test-vit", "--text-cache", "off"]
SEGMENT_FILES = ("_overlay.png", "_labels.png", ".json")


def cli(argv, tmp_path, inject: str | None = None) -> subprocess.CompletedProcess:
    """The real command line in a subprocess; ``inject``: Python run first (a fault the checks cannot foresee)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OVDENSE_CACHE": str(tmp_path / "cache")}
    code = (inject or "") + "\nimport sys\nfrom ovdense.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300
    )


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("ovdense: error:")]


def save(path: Path, height: int, width: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# -- the network size, computed without resizing ---------------------------------------------------------------


@pytest.mark.parametrize("bounds", [(2048, 336), (2048, 448), (336, 2048), (4096, 448), (64, 4)])
@pytest.mark.parametrize(
    "size", [(1, 1), (2, 10000), (10000, 2), (5000, 3), (3, 5000), (375, 500), (17, 1000), (7, 90), (448, 449)]
)
def test_network_size_is_mmseg_resize_shape(size, bounds):
    image = np.zeros((*size, 3), np.uint8)
    new = mmseg_resize_size(*size, *bounds)
    if min(new) < 1:
        with pytest.raises(ValueError, match="would be resized to"):
            mmseg_resize(image, *bounds)
    else:
        assert mmseg_resize(image, *bounds).shape[:2] == new


def test_window_size():
    assert window_size(2048, 1, 224) == (224, 1)
    assert window_size(2048, 1, 224, pad_multiple=16) == (224, 16)
    assert window_size(100, 30, 0) == (100, 30) and window_size(100, 30, 0, 56) == (112, 56)
    assert window_size(448, 597, 448, 56) == (448, 448)


# -- planned outputs against inputs and existing files (fileio.check_outputs) -------------------------------------


def test_check_outputs(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "a_overlay.png"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    new = tmp_path / "a.json"
    with pytest.raises(OvdenseError, match=r"a_overlay.png \(of .*a.png\) would replace the input .*a_overlay.png"):
        check_outputs({b: a, new: a}, [a, b], overwrite=True)  # never, even with overwrite
    check_outputs([new], [a, b])
    with pytest.raises(OvdenseError, match=r"a_overlay.png already exists \(1 of this run's 2 outputs\); pass --ov"):
        check_outputs([new, b], [a])
    check_outputs([new, b], [a], overwrite=True)
    (tmp_path / "x.json").write_bytes(b"x")
    with pytest.raises(OvdenseError, match=r"a_overlay.png already exists \(2 of this run's 3 outputs exist\)"):
        check_outputs([new, b, tmp_path / "x.json"], [a])
    # the same file under another name: a link to the input, a folder reached through a link
    link = tmp_path / "link.png"
    link.symlink_to(a)
    with pytest.raises(OvdenseError, match="would replace the input"):
        check_outputs([link], [a], overwrite=True)
    (tmp_path / "via").symlink_to(tmp_path)
    with pytest.raises(OvdenseError, match="would replace the input"):
        check_outputs([tmp_path / "via" / "a.png"], [a], overwrite=True)
    # an input not there yet (or a case-insensitive file system): compared by resolved path, case folded
    with pytest.raises(OvdenseError, match="would replace the input"):
        check_outputs([tmp_path / "C.JSON"], [tmp_path / "sub" / ".." / "c.json"])
    # two files that exist and differ only in case are two files where the file system says so
    upper = tmp_path / "A.PNG"
    upper.write_bytes(b"A")
    if not os.path.samefile(upper, a):
        check_outputs([upper], [a], overwrite=True)
    (tmp_path / "d.json").mkdir()
    with pytest.raises(OvdenseError, match="is an existing folder"):
        check_outputs([tmp_path / "d.json"], [], overwrite=True)
    with pytest.raises(OvdenseError, match="two outputs of this run are one file"):
        check_outputs([new, tmp_path / "A.json"], [])


def test_segment_never_writes_over_its_inputs(tmp_path):
    """The issue's run: ``segment a.png a_overlay.png --out <their folder>`` wrote a's overlay over the user's
    a_overlay.png, then segmented that overlay, exit 0. Now: refused before any work, also with --overwrite."""
    folder = tmp_path / "photos"
    folder.mkdir()
    save(folder / "a.png", 40, 60, seed=1)
    save(folder / "a_overlay.png", 30, 50, seed=2)
    (folder / "a.json").write_text('{"mine": true}\n')  # a file of the user's with an output's name
    before = snapshot(folder)
    for extra in ([], ["--overwrite"]):
        argv = ["segment", folder / "a.png", folder / "a_overlay.png", "--classes", "a; b", *TINY, "--out", folder]
        proc = cli([*argv, *extra], tmp_path)
        assert proc.returncode == 2, proc.stderr
        (line,) = error_lines(proc)
        assert f"the output {folder / 'a_overlay.png'} (of {folder / 'a.png'}) would replace the input" in line
        assert line.endswith("or rename the input") and "RANDOM" not in proc.stderr  # before any model loads
        assert snapshot(folder) == before  # the inputs' bytes, and nothing written


def test_segment_keeps_existing_outputs_unless_told(tmp_path):
    photo = save(tmp_path / "p.png", 40, 60)
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.json").write_text("an earlier result\n")
    argv = ["segment", photo, save(tmp_path / "q.png", 30, 50), "--classes", "a; b", *TINY, "--out", out]
    proc = cli(argv, tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc)
    assert line == f"ovdense: error: the output {out / 'p.json'} already exists (1 of this run's 6 outputs); pass " \
        "--overwrite to replace, or write to another --out"  # fmt: skip
    assert "RANDOM" not in proc.stderr and snapshot(out) == {"p.json": b"an earlier result\n"}
    proc = cli([*argv, "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(snapshot(out)) == sorted(f"{s}{x}" for s in "pq" for x in SEGMENT_FILES)
    assert json.loads((out / "p.json").read_text())["image"] == str(photo)


# -- every limit checked before the first image -------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, method, message",
    [
        ((2, 10000), [], r"10000 x 2 pixels \(width x height\) is too elongated for sclip: .* would make it 2048 x 0"),
        ((10000, 2), ["--method", "naclip"], r"2 x 10000 pixels .* too elongated for naclip: .* make it 0 x 2048"),
        ((5000, 3), [], r"becomes 1 x 2048 for sclip's network input, and its 224-pixel windows 1 x 224, smaller "
                        r"than the 16-pixel patches of ovdense-test-vit"),
    ],
)  # fmt: skip
def test_segment_checks_every_image_before_the_first(tmp_path, size, method, message):
    """The issue's run: a 10000 x 2 strip among eight images passed the checks and crashed with a traceback after
    seven were written. Now: one line naming it, exit 2, nothing written."""
    paths = [save(tmp_path / f"img{i}.png", 40 + i, 60, seed=i) for i in range(7)]
    paths.insert(5, save(tmp_path / "strip.png", *size))
    out = tmp_path / "out"
    proc = cli(["segment", *paths, "--classes", "a; b", *TINY, *method, "--out", out], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"ovdense: error: {tmp_path / 'strip.png'}: ")
    assert re.search(message, line), line
    assert not out.exists()


@pytest.mark.parametrize(
    "method, model, overrides",
    [
        ("sclip", "ovdense-test-vit", {}),
        ("sclip", "ovdense-test-vit", {"crop": 8, "stride": 8}),  # windows narrower than a patch, whatever the image
        ("clearclip", "ovdense-test-vit", {"crop": 8, "stride": 8}),  # ... unless padded to whole patches
        ("declip", "ovdense-test-eva02", {}),  # pads windows and resizes within 4096 x 448: the strips pass
        ("proxyclip", "ovdense-test-vit", {"vfm": "test-dinov2"}),  # pads windows to 56 pixels
    ],
)
def test_the_checks_refuse_exactly_what_the_network_refuses(method, model, overrides):
    from ovdense.cli.outputs import check_network_sizes, check_windows
    from ovdense.predictor import Segmenter

    seg = Segmenter.from_pretrained(model, method=method, text_cache_dir=False, **overrides)
    for size in [(1, 1), (2, 10000), (10000, 2), (5000, 3), (5000, 36), (5000, 40), (7, 90), (33, 47)]:
        try:
            check_network_sizes([Path("x.png")], [size], seg.preset)
            check_windows([Path("x.png")], [size], seg)
            refused = None
        except OvdenseError as err:
            refused = str(err)
        try:
            seg.set_image(np.zeros((*size, 3), np.uint8))
            seg.predict("a; b")
            seg.attention_maps([(0, 0)], classes="a; b")
            failed = None
        except (ValueError, RuntimeError) as err:
            failed = str(err)
        assert (refused is None) == (failed is None), (size, refused, failed)


# -- what no check can know: that image fails, the others are written --------------------------------------------

FAIL_ON_BAD = """
from ovdense.predictor import Segmenter
_set_image = Segmenter.set_image
def set_image(self, image, *args, **kwargs):
    if str(image).endswith("bad.png"):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)\\nsecond line")
    return _set_image(self, image, *args, **kwargs)
Segmenter.set_image = set_image
"""


def test_segment_a_failing_image_costs_only_its_outputs(tmp_path):
    paths = [save(tmp_path / name, 40, 60, seed=i) for i, name in enumerate(["a.png", "bad.png", "c.png"])]
    out = tmp_path / "out"
    proc = cli(["segment", *paths, "--classes", "a; b", *TINY, "--out", out], tmp_path, inject=FAIL_ON_BAD)
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc) == [
        f"ovdense: error: {paths[1]}: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB (simulated)",
        f"ovdense: error: 1 of 3 images failed (see above); the other 2 were written to {out}",
    ]
    assert f"wrote 2 overlay(s), label map(s) and JSON summaries to {out}" in proc.stderr
    assert sorted(snapshot(out)) == sorted(f"{s}{x}" for s in "ac" for x in SEGMENT_FILES)


# -- the same promises for ``attention`` ----------------------------------------------------------------------------

ATTENTION = ["--points", "0,0", "--layers", "1", *TINY]


def test_attention_checks_inputs_outputs_and_limits_first(tmp_path):
    a = save(tmp_path / "a.png", 40, 60)
    grid = save(tmp_path / "a_attention.png", 30, 50)  # the user's picture with the name of a's grid
    before = snapshot(tmp_path)
    proc = cli(["attention", a, grid, *ATTENTION, "--out", tmp_path, "--overwrite"], tmp_path)
    assert proc.returncode == 2 and snapshot(tmp_path) == before, proc.stderr
    (line,) = error_lines(proc)
    assert f"the output {grid} (of {a}) would replace the input {grid}" in line

    out = tmp_path / "out"
    out.mkdir()
    (out / "a_attention.json").write_text("old\n")
    (out / "a_head.npy").write_text("old\n")
    proc = cli(["attention", a, *ATTENTION, "--out", out], tmp_path)
    assert proc.returncode == 2, proc.stderr
    (line,) = error_lines(proc)
    assert f"{out / 'a_head.npy'} already exists (2 of this run's 5 outputs exist); pass --overwrite" in line
    proc = cli(["attention", a, *ATTENTION, "--out", out, "--overwrite"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(snapshot(out)) == sorted(f"a_{k}" for k in ("attention.png", "attention.json", "clip.npy",
                                                              "head.npy", "affinity.npy"))  # fmt: skip

    strip = save(tmp_path / "strip.png", 2, 10000)
    proc = cli(["attention", a, strip, *ATTENTION, "--out", tmp_path / "o2"], tmp_path)
    assert proc.returncode == 2 and not (tmp_path / "o2").exists(), proc.stderr
    (line,) = error_lines(proc)
    assert line.startswith(f"ovdense: error: {strip}: 10000 x 2 pixels (width x height) is too elongated")


def test_attention_a_failing_image_costs_only_its_outputs(tmp_path):
    paths = [save(tmp_path / name, 40, 60, seed=i) for i, name in enumerate(["bad.png", "b.png"])]
    out = tmp_path / "out"
    proc = cli(["attention", *paths, *ATTENTION, "--out", out], tmp_path, inject=FAIL_ON_BAD)
    assert proc.returncode == 1, proc.stderr
    assert error_lines(proc) == [
        f"ovdense: error: {paths[0]}: RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB (simulated)",
        f"ovdense: error: 1 of 2 images failed (see above); the other 1 were written to {out}",
    ]
    assert sorted(snapshot(out)) == sorted(f"b_{k}" for k in ("attention.png", "attention.json", "clip.npy",
                                                              "head.npy", "affinity.npy"))  # fmt: skip
