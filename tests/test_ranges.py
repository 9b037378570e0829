"""Declared ranges: every number the command line takes is checked from its declaration while the flags are parsed,
with the same words as the Python API; nonsense never reaches a model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ovdense.cli import build_parser, main
from ovdense.cli.common import numeric_flags
from ovdense.errors import InvalidArgumentError
from ovdense.presets import POS_RULES, get_preset
from ovdense.ranges import FRACTION, POSITIVE, POSITIVE_INT, Range, check
from ovdense.train.config import TrainConfig

README = Path(__file__).resolve().parents[1] / "README.md"
#: What a user may type by mistake: not numbers, infinities, negatives, zero, fractions, huge values.
HOSTILE = ("nan", "inf", "-inf", "-1", "0", "0.5", "2", "1e9", "70000")
PARSER = build_parser()
FLAGS = numeric_flags(PARSER)
FIRST = {}  # one command per flag: the checks are the same declaration everywhere
for command, flag, _ in FLAGS:
    FIRST.setdefault(flag, command)


def action_of(flag: str):
    return next(a for a in _actions(FIRST[flag]) if flag in a.option_strings)


def rejected(flag: str, text: str) -> bool:
    """Whether the flag's declared range refuses ``text``."""
    action = action_of(flag)
    try:
        action.type(text)
    except Exception:  # noqa: BLE001 - argparse turns any failure of a type into the flag's error
        return True
    return False


def _actions(command: str):
    parser = PARSER
    for word in command.split():
        parser = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[
            word
        ]
    return parser._actions


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def test_range_semantics():
    assert Range(0, 1).describe() == "a finite number in [0, 1]" and FRACTION.contains(1) and not FRACTION.contains(2)
    assert POSITIVE.describe() == "a finite number > 0" and not POSITIVE.contains(0) and POSITIVE.contains(1e-9)
    assert Range(0, 1, high_open=True).describe() == "a finite number in [0, 1)"
    assert POSITIVE_INT.describe() == "an integer >= 1" and not POSITIVE_INT.contains(1.5)
    for bad in (math.nan, math.inf, -math.inf, True, "1", None):
        assert not Range().contains(bad)
    assert check("n", 3.0, POSITIVE_INT) == 3 and isinstance(check("n", 3.0, POSITIVE_INT), int)
    with pytest.raises(InvalidArgumentError, match=r"^crop must be an integer >= 0, got -1$"):
        check("crop", -1, Range(0, integer=True))


def test_every_number_on_the_command_line_has_a_declared_range():
    undeclared = []

    def walk(parser, prefix=()):
        for action in parser._actions:
            if hasattr(action, "choices") and isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    walk(sub, (*prefix, name))
            elif action.type in (int, float):
                undeclared.append((" ".join(prefix), action.option_strings))

    walk(PARSER)
    assert not undeclared
    assert len({flag for _, flag, _ in FLAGS}) >= 65  # the preset, method, runtime and training numbers


@pytest.mark.parametrize("flag", sorted(FIRST))
def test_nonsense_values_stop_at_the_flag_in_one_line(flag, capsys):
    """While the flags are parsed: before any command runs (how long that takes is ``benchmarks/startup.py``'s
    row "argument error (a range)"; no timing here, the suite must pass on a loaded machine)."""
    values = [v for v in HOSTILE if rejected(flag, v)]
    assert {"nan", "inf", "-inf"} <= set(values), flag  # never a non-finite number
    nargs = action_of(flag).nargs
    for value in values:
        if nargs is None:
            words = [f"{flag}={value}"]  # "-inf" alone would read as a flag
        elif value.startswith("-") and not value[1:].isdigit():
            continue  # several values after one flag: argparse reads "-inf" as a flag, no user can type it
        else:
            words = [flag, *["0.5"] * (nargs - 1), value]
        code, err = run([*FIRST[flag].split(), *words], capsys)
        assert code == 2 and "Traceback" not in err
        line = err.strip().splitlines()[-1]
        assert flag in line and " must be " in line and ", got " in line, line


def test_argument_errors_import_no_torch_and_leave_nothing(tmp_path):
    code = (
        "import sys\nfrom ovdense.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "print(rc, 'torch' in sys.modules)"
    )
    out = tmp_path / "out"
    for argv in (["segment", "x.jpg", "--logit-scale", "nan", "--out", str(out)], ["eval", "--workers", "-1"],
                 ["train", "scd", "--data", "d", "--out", str(out), "--lr", "-0.1"]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert proc.stdout.split() == ["2", "False"], proc.stderr
    assert not out.exists()


def test_python_and_the_command_line_say_the_same(capsys):
    cases = [
        (["segment", "x.jpg", "--crop", "-1"], lambda: get_preset("sclip", crop=-1)),
        (["segment", "x.jpg", "--prob-thd", "2"], lambda: get_preset("sclip", prob_thd=2.0)),
        (["segment", "x.jpg", "--resclip-temp-thd", "7"], lambda: get_preset("resclip", temp_thd=7.0)),
        (["train", "declip", "--lr", "0"], lambda: TrainConfig(lr=0.0)),
        (["train", "declip", "--betas", "0.9", "1"], lambda: TrainConfig(betas=(0.9, 1.0))),
    ]
    for argv, python in cases:
        _, err = run(argv, capsys)
        with pytest.raises(InvalidArgumentError) as info:
            python()
        assert str(info.value) in err.strip().splitlines()[-1], (argv, str(info.value), err)


def test_the_windows_must_cover_the_image_before_any_model_loads(tmp_path, capsys):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    argv = ["segment", str(image), "--classes", "a; b", "--crop", "64", "--stride", "500", "--out", str(tmp_path / "o")]
    code, err = run(argv, capsys)
    assert code == 2 and "RANDOM" not in err and not (tmp_path / "o").exists()
    assert err.strip() == (
        "ovdense: error: stride must be at most crop (64), got 500: the windows would leave pixels uncovered"
    )
    with pytest.raises(InvalidArgumentError, match="the windows would leave pixels uncovered"):
        get_preset("sclip", crop=64, stride=500)
    assert get_preset("naclip", "voc21", stride=500).crop == 0  # one whole-image pass: no window to leave gaps


def test_preset_rules_and_the_towers_agree():
    from ovdense.backbones.base import POS_EMBED_RULES

    assert POS_RULES == POS_EMBED_RULES
    with pytest.raises(InvalidArgumentError, match="pos_rule must be one of sclip, size, got 'bilinear'"):
        get_preset("sclip", pos_rule="bilinear")


def test_the_readme_lists_every_declared_range():
    rows: dict[tuple[str, str], list[str]] = {}
    for command, flag, words in FLAGS:
        rows.setdefault((flag, words), []).append(command)
    text = README.read_text(encoding="utf-8")
    for (flag, words), commands in rows.items():
        assert f"| `{flag}` | {', '.join(dict.fromkeys(commands))} | {words} |" in text, flag
