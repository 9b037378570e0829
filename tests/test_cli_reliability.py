"""The command line's promises: it starts at once, describes every flag, checks --out and class lists before
any model loads, never lets two inputs share output names, keeps each image's files together on Ctrl-C, and
keeps stderr to one line per error or warning."""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from ovdense.cli import build_parser, main
from ovdense.eval.specs import DATASETS
from ovdense.fileio import check_output_dir, unique_stems, write_group_atomic

VOC = imgviz.data.voc()["rgb"]
TINY = ["--model", "ovdense-test-vit", "--text-cache", "off"]
HEAVY = ("torch", "open_clip", "timm", "cv2", "torchvision")


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ovdense: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "cafe.jpg"
    Image.fromarray(VOC).save(path, quality=95)
    return path


# -- start-up -------------------------------------------------------------------------------------------------


def test_import_and_light_commands_load_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "import ovdense, ovdense.cli\n"
        "from ovdense.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    main(['list-methods'])\n"
        "    for argv in (['--help'], ['--version'], ['segment', '--help'], ['train', 'declip', '--help'],\n"
        "                 ['segment', 'x.jpg', '--method', 'nope', '--out', 'o']):\n"
        "        with contextlib.suppress(SystemExit), contextlib.redirect_stderr(io.StringIO()):\n"
        "            main(argv)\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_lazy_public_names_still_resolve():
    import ovdense

    assert ovdense.Segmenter.__name__ == "Segmenter" and callable(ovdense.list_models)
    assert {"Segmenter", "SegmentationResult", "list_models", "list_methods"} <= set(dir(ovdense))
    with pytest.raises(AttributeError):
        ovdense.no_such_name  # noqa: B018


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, (*prefix, name))


def test_help_describes_every_flag_and_closed_sets_are_choices():
    commands = dict(_subparsers(build_parser()))
    assert ("train", "declip") in commands and ("convert", "coco-stuff") in commands
    for path, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help.strip(), (path, action.option_strings or action.dest)
    closed = {"--method", "--dataset", "--recipe", "--precision", "--declip-mode", "--mode"}
    for path, parser in commands.items():
        for action in parser._actions:
            if closed & set(action.option_strings):
                assert action.choices, (path, action.option_strings)
    train = commands[("train", "declip")]
    lr = next(a for a in train._actions if "--lr" in a.option_strings)
    assert "(default: 1e-05)" in lr.help


def test_unknown_choice_is_an_argument_error(capsys):
    # One line as every other error (not argparse's usage block): the choices, and where the help is.
    with pytest.raises(SystemExit) as info:
        main(["segment", "x.jpg", "--classes", "a", "--method", "segformer", "--out", "o"])
    assert info.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("ovdense: error: --method: invalid choice: 'segformer' (choose from 'sclip', 'naclip', ")
    assert "'maskclip', 'sam3')" in line and line.endswith("; see ovdense segment --help")


# -- --out and early checks -----------------------------------------------------------------------------------


def _commands_with_out(photo, tmp_path):
    return {
        "segment": ["segment", str(photo), "--classes", "a; b", *TINY],
        "eval": ["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "nowhere"), *TINY],
        "eval-regions": ["eval-regions", "--data-root", str(tmp_path / "nowhere"), "--model", "ovdense-test-eva02"],
    }


@pytest.mark.parametrize("command", ["segment", "eval", "eval-regions"])
def test_out_that_is_a_file_fails_first(command, photo, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    argv = _commands_with_out(photo, tmp_path)[command]
    for out, expected in ((blocker, "exists and is not a folder"), (blocker / "run", "is a file")):
        code, _, err = run([*argv, "--out", str(out)], capsys)
        line = one_error_line(err)
        assert code == 2 and "--out" in line and expected in line, line
        assert "RANDOM" not in err  # refused before any model loaded
    assert blocker.read_text() == "a file, not a folder"


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    # As root permission bits do not stop a write, so the refusal of the file system is simulated.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(Exception, match=r"--out .*out cannot be written \(Permission denied"):
        check_output_dir(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_checks_its_output_folder_before_work(tmp_path, capsys, monkeypatch):
    from test_convert import _png

    _png([[0, 255]], tmp_path / "coco_stuff164k/annotations/val2017/000000000139.png")

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, _, err = run(["convert", "coco-stuff", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and "Read-only file system" in one_error_line(err)
    assert not list((tmp_path / "coco_stuff164k/annotations/val2017").glob("*TrainIds*"))


def test_too_many_classes_fail_before_the_model_loads(photo, tmp_path, capsys):
    classes = "; ".join(f"class {i}" for i in range(65537))  # 16-bit label PNGs hold 65536 (0..65535)
    code, _, err = run(["segment", str(photo), "--classes", classes, *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "65537 classes" in one_error_line(err) and "RANDOM" not in err
    assert not (tmp_path / "o").exists()


def test_image_over_the_pixel_limit_is_one_line_before_the_model_loads(photo, tmp_path, capsys, monkeypatch):
    from ovdense.images import MAX_PIXELS_ENV

    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # restored after the test: the CLI sets it for its workers
    argv = ["segment", str(photo), "--classes", "a; b", *TINY, "--max-pixels", "100000", "--out", str(tmp_path / "o")]
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "500 x 375 = 0.2 MP, over the 0.1 MP limit" in line and "--max-pixels" in line, line
    assert "RANDOM" not in err and not (tmp_path / "o").exists()
    code, _, err = run([*argv[:-4], "--max-pixels", "187500", "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err  # exactly at the limit is allowed


def test_eval_all_names_every_missing_dataset(tmp_path, capsys):
    code, _, err = run(["eval", "--all", "--data-root", str(tmp_path), *TINY, "--out", str(tmp_path / "r")], capsys)
    line = one_error_line(err)
    assert code == 2 and f"{len(DATASETS)} of {len(DATASETS)} datasets cannot be read" in line
    for name in DATASETS:
        assert DATASETS[name].title in line, name
    assert not (tmp_path / "r").exists()


def test_eval_regions_without_images_is_an_error(tmp_path, capsys):
    from panoptic_fixtures import make_panoptic

    fx = make_panoptic(tmp_path / "coco")
    data = json.loads(fx.ann_file.read_text())
    data["images"], data["annotations"] = [], []
    fx.ann_file.write_text(json.dumps(data))
    argv = ["eval-regions", "--data-root", str(fx.data_root), "--model", "ovdense-test-eva02"]
    argv += ["--out", str(tmp_path / "r")]
    code, _, err = run(argv, capsys)
    assert code == 2 and "list no images" in one_error_line(err)


# -- output names and complete sets ---------------------------------------------------------------------------


def test_unique_stems():
    cases = {
        ("d1/x.jpg", "d2/x.jpg"): ["d1_x", "d2_x"],
        ("d/x.jpg", "d/x.png", "e/x.jpg"): ["d_x_jpg", "d_x_png", "e_x"],
        ("a/b/x.jpg", "c/b/x.jpg", "y.jpg"): ["a_b_x", "c_b_x", "y"],
        ("p/X.jpg", "q/x.jpg"): ["p_X", "q_x"],  # case-insensitive file systems
        ("s.jpg", "s.jpg"): ["s_jpg", "s_jpg_2"],
    }
    for paths, expected in cases.items():
        assert unique_stems([Path(p) for p in paths]) == expected, paths


def test_same_file_names_in_two_folders_write_two_sets(tmp_path, capsys):
    for folder, crop in (("d1", VOC[:200, :300]), ("d2", VOC[100:, 150:])):
        (tmp_path / folder).mkdir()
        Image.fromarray(crop).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    argv = ["segment", str(tmp_path / "d1" / "x.png"), str(tmp_path / "d2" / "x.png"), "--classes", "a; b"]
    code, _, err = run([*argv, *TINY, "--out", str(out)], capsys)
    assert code == 0, err
    assert "share file names" in err and "d1_x" in err and "d2_x" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{suffix}" for s in ("d1_x", "d2_x") for suffix in ("_overlay.png", "_labels.png", ".json")
    )
    assert Image.open(out / "d1_x_labels.png").size == (300, 200)
    assert Image.open(out / "d2_x_labels.png").size == (350, 275)
    assert json.loads((out / "d2_x.json").read_text())["image"] == str(tmp_path / "d2" / "x.png")


def test_write_group_is_all_or_nothing(tmp_path, monkeypatch):
    targets = [tmp_path / n for n in ("a.png", "b.png", "c.json")]

    def interrupted_write(f):  # Ctrl-C while the files are still being written: nothing appears
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        f.write(b"never")

    with pytest.raises(KeyboardInterrupt):
        write_group_atomic({targets[0]: lambda f: f.write(b"1"), targets[1]: interrupted_write})
    assert list(tmp_path.iterdir()) == []

    renames = []
    real_replace = os.replace

    def replace_then_interrupt(src, dst):  # Ctrl-C between two renames: held until all three are done
        real_replace(src, dst)
        renames.append(dst)
        if len(renames) == 1:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    monkeypatch.setattr(os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_group_atomic({t: (lambda f, t=t: f.write(t.name.encode())) for t in targets})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.json"]
    assert (tmp_path / "c.json").read_bytes() == b"c.json"


def test_sigint_during_segment_leaves_only_complete_sets(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(120):
        path = images / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OVDENSE_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "ovdense", "segment", *paths, "--classes", "a; b; c", *TINY, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(p.suffix == ".json" for p in out.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "ovdense: interrupted" in err and "Traceback" not in err
    names = [p.name for p in out.iterdir()]
    assert not [n for n in names if n.endswith(".tmp")]
    stems = {n.split("_")[0].split(".")[0] for n in names}
    assert 0 < len(stems) < len(paths)
    for stem in stems:
        assert {f"{stem}_overlay.png", f"{stem}_labels.png", f"{stem}.json"} <= set(names), stem
    assert len(names) == 3 * len(stems)


# -- one line on stderr -----------------------------------------------------------------------------------


def test_warnings_are_one_line(photo, tmp_path, capsys):
    classes = "sky, bed, wall; person; bed"  # 'bed' is in class 0 too: class 2 can never be predicted
    code, _, err = run(["segment", str(photo), "--classes", classes, *TINY, "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if "can never be predicted" in ln]
    assert len(warning) == 1 and warning[0].startswith("ovdense: warning: class 2 ('bed')"), err
    assert "warnings.warn" not in err and "UserWarning" not in err


class TrainingConfig:  # a Python object pickled next to the weights, as training scripts often do
    lr = 0.1


def test_pickled_objects_are_refused_in_our_words(photo, tmp_path, capsys):
    import torch

    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2), "config": TrainingConfig()}, path)
    argv = ["segment", str(photo), "--classes", "a; b", *TINY, "--checkpoint", str(path), "--out", str(tmp_path / "o")]
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "not a weights file that loads safely: it contains Python objects" in line
    assert "test_cli_reliability.TrainingConfig" in line and "safetensors" in line
    assert "weights_only" not in err


def test_torchscript_archive_loads_without_deprecation_noise(tmp_path, capsys, recwarn):
    import torch

    from ovdense.weights import read_checkpoint

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "model.pt"
    scripted.save(str(path))
    recwarn.clear()
    state, fmt = read_checkpoint(path)
    assert fmt == "openai-jit" and set(state) == {"weight", "bias"}
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
