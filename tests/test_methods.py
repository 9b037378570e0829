"""The method registry: registrations read from source equal those the decorators make, and the rules they obey."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from ovdense.heads.declip import MODES
from ovdense.methods import (
    OptionSpec,
    builtin_methods,
    check_method_inputs,
    get_method,
    head_class,
    list_methods,
    read_registrations,
    register_method,
)
from ovdense.presets import get_preset
from ovdense.ranges import Range

BUILT_IN = ["sclip", "naclip", "clearclip", "declip", "scclip", "resclip", "proxyclip", "corrclip", "clip", "maskclip"]


def test_every_built_in_method_is_registered_once_beside_its_head():
    assert [n for n in list_methods() if n in BUILT_IN] == BUILT_IN
    for name in BUILT_IN:
        spec = get_method(name)
        module, cls = spec.head.split(":")
        assert module == f"ovdense.heads.{name}" and head_class(name).__name__ == cls and head_class(name).name == name


def test_source_registrations_equal_the_executed_ones():
    """What the command line reads without importing torch is what the heads' decorators register."""
    for name in BUILT_IN:
        # Importing the module runs its decorator, which raises where it differs from the source reading.
        assert head_class(name).name == name and get_method(name) == builtin_methods()[name]


def test_reading_the_registry_imports_no_torch():
    code = (
        "import sys; from ovdense.methods import methods, get_method; m = methods(); "
        "assert get_method('declip').options['mode'].choices == ('csa', 'qq'); "
        "from ovdense.presets import get_preset; get_preset('resclip', 'voc21'); "
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'numpy', 'open_clip', 'timm')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_options_come_from_the_heads_signature_and_docstring():
    declip = get_method("declip").options["mode"]
    assert declip.default == "csa" and declip.choices == MODES and "q-q + k-k" in declip.help
    resclip = get_method("resclip").options
    blocks = resclip["rcs_blocks"]
    assert blocks == OptionSpec("rcs_blocks", (6, 7, 8, 9), "tuple[int, ...]", blocks.help, Range(1))
    assert blocks.kind == "ints"
    assert resclip["rcs_tau"].help == resclip["rcs_lambda"].help != ""  # "rcs_tau, rcs_lambda: ..." in Args
    assert resclip["delete_same_entity"].parse("off", "resclip") is False
    assert resclip["pamr_dilations"].parse("4,8", "resclip") == (4, 8)
    with pytest.raises(ValueError, match=r"temp_thd \(resclip\) must be a finite number in \[0, 1\], got 'high'"):
        resclip["temp_thd"].parse("high", "resclip")


def test_presets_resolve_as_the_authors_configs():
    assert get_preset("clip", "voc21").area_thd is None and get_preset("clip", "voc21").logit_scale == 65.0
    assert get_preset("sclip", "voc21").area_thd == 0.1
    corr = get_preset("corrclip", "cityscapes")
    assert (corr.short_side, corr.crop, corr.stride, corr.vfm) == (448, 224, 112, "dino-b8")
    assert (corr.model, corr.pretrained) == ("ViT-B-16-quickgelu", "metaclip_fullcc")
    res = get_preset("resclip", "voc20")
    assert res.crop == 0 and res.head_kwargs == {"temp_thd": 0.10, "rcs_lambda": 0.6, "sfr_tau": 2.1, "sfr_lambda": 0.6}
    assert get_preset("resclip", "voc20", temp_thd=0.3).head_kwargs["temp_thd"] == 0.3
    with pytest.raises(ValueError, match="method 'sclip' has no setting or option 'mode'"):
        get_preset("sclip", mode="qq")


def test_registration_rules(tmp_path):
    with pytest.raises(ValueError, match="already registered by ovdense.heads.sclip"):

        @register_method("sclip", summary="another")
        class Clash:
            pass

    with pytest.raises(ValueError, match="needs summary="):

        @register_method("nosummary")
        class NoSummary:
            pass

    with pytest.raises(TypeError, match="annotation 'list' is not one the registry reads"):

        @register_method("badoption", summary="x")
        class BadOption:
            def __init__(self, blocks: list = ()):  # noqa: B006
                pass

    bad = tmp_path / "bad.py"
    bad.write_text(
        textwrap.dedent("""
        SETTINGS = {"crop": 0}

        @register_method("bad", summary="x", defaults=SETTINGS)
        class Bad:
            pass
    """)
    )
    with pytest.raises(ValueError, match="bad.py: Bad: register_method's arguments must be literals"):
        read_registrations(bad, "somewhere.bad")


def test_method_inputs_are_checked_before_any_weights(tmp_path):
    with pytest.raises(ValueError, match="vfm: the sclip head uses no vision foundation model"):
        check_method_inputs("sclip", vfm="dino-b8")
    check_method_inputs("sclip", vfm="dino-b8", any_vfm=True)
    with pytest.raises(ValueError, match="apply to corrclip, corrclipv2, not sclip"):
        check_method_inputs("sclip", mask_generator="sam")
    with pytest.raises(ValueError, match="corrclip needs class-agnostic masks"):
        check_method_inputs("corrclip", masks_required=True)
    check_method_inputs("corrclip")  # in Python the masks may come with set_image
    with pytest.raises(ValueError, match="not both"):
        check_method_inputs("corrclip", masks_dir=tmp_path, mask_generator="sam")
    with pytest.raises(ValueError, match="unknown generator 'sam9'"):
        check_method_inputs("corrclip", mask_generator="sam9")
    with pytest.raises(ValueError, match="is not a folder"):
        check_method_inputs("corrclip", masks_dir=tmp_path / "missing")
