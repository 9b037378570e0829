"""F-ViT end to end on a tiny random detector: weights in both layouts, the ensemble, the Detector, ``detect`` and
``eval-det`` on a COCO-format set the test writes, and their bad input."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import hub_server
from ovdense.cli import main
from ovdense.detection.benchmarks import fvit_config
from ovdense.detection.checkpoint import (
    from_mmdet_key,
    read_safetensors_metadata,
    save_mmdet,
    save_safetensors,
    to_mmdet_state,
)
from ovdense.detection.detector import Detector, prepare_image
from ovdense.detection.fvit import FViT, ensemble_scores
from ovdense.detection.text import write_class_embeddings
from ovdense.errors import OvdenseError
from ovdense.weights import load_model

hf_hub = hub_server.hf_hub  # the loopback hub fixture

TOWER = "ovdense-test-eva02"


def tiny_fvit(benchmark="ov-coco", seed=0, **overrides) -> FViT:
    """A random F-ViT on the tiny EVA02 test tower, with spread BatchNorm statistics and a moderate temperature so
    that scores spread over several classes."""
    loaded = load_model(TOWER)
    config = fvit_config(benchmark, loaded.tower, fpn_channels=32, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FViT(loaded.tower, config)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.1)
        for p in model.box_head.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
        model.train_embeddings.copy_(torch.nn.functional.normalize(torch.randn_like(model.train_embeddings), dim=0))
    if model.box_head.detect_temperature is not None:
        model.box_head.detect_temperature.data.fill_(5.0)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fvit")
    model = tiny_fvit()
    save_mmdet(model, d / "fvit.pth")
    save_safetensors(model, d / "fvit.safetensors", TOWER)
    names = ["person", "cat", "dog", "sofa", "kitten"]
    generator = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(32, len(names) + 1, generator=generator), dim=0)
    write_class_embeddings(d / "emb.pt", names, emb)
    rng = np.random.default_rng(0)
    for i, size in enumerate([(120, 160), (90, 70), (100, 100)]):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(d / f"img{i}.png")
    return d, model


def test_weights_round_trip_bit_identical_in_both_layouts(files):
    d, model = files
    reference = {k: v for k, v in model.state_dict().items()}
    for path in ("fvit.pth", "fvit.safetensors"):
        det = Detector.from_pretrained(d / path, model=TOWER, benchmark="ov-coco", device="cpu")
        loaded = det.model.state_dict()
        assert loaded.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(loaded[key], value), (path, key)
    meta = read_safetensors_metadata(d / "fvit.safetensors")
    assert meta["format"] == "ovdense-fvit" and meta["model"] == TOWER
    # The mmdet file is CLIPSelf's layout: a state_dict of tensors only, readable with weights_only=True.
    raw = torch.load(d / "fvit.pth", weights_only=True)
    assert set(raw) == {"meta", "state_dict"}


def test_mmdet_key_map_covers_the_spec_table(files):
    _, model = files
    lvis = tiny_fvit("ov-lvis")
    keys = set(to_mmdet_state(model)) | set(to_mmdet_state(lvis))
    expected = [
        r"backbone\.visual\.blocks\.0\.attn\.q_bias",
        r"backbone\.visual\.blocks\.0\.attn\.v_bias",
        r"backbone\.visual\.blocks\.0\.attn\.inner_attn_ln\.weight",
        r"backbone\.visual\.blocks\.0\.mlp\.(w1|w2|w3|ffn_ln)\.weight",
        r"backbone\.visual\.(patch_embed\.proj\.weight|cls_token|pos_embed|norm\.weight|head\.weight)",
        r"backbone\.interpolate1\.(0|1|3)\.weight",
        r"backbone\.interpolate1\.1\.running_var",
        r"backbone\.interpolate2\.0\.weight",
        r"neck\.lateral_convs\.[0-3]\.(conv|bn)\.weight",
        r"neck\.fpn_convs\.[0-3]\.(conv|bn)\.weight",
        r"rpn_head\.rpn_conv\.[01]\.conv\.(weight|bias)",
        r"rpn_head\.rpn_conv\.[01]\.bn\.weight",
        r"rpn_head\.rpn_(cls|reg)\.weight",
        r"roi_head\.bbox_head\.shared_convs\.[0-3]\.(conv|bn)\.weight",
        r"roi_head\.bbox_head\.shared_fcs\.[01]\.weight",
        r"roi_head\.bbox_head\.(cls_fcs|reg_fcs)\.0\.weight",
        r"roi_head\.bbox_head\.(fc_reg|fc_cls)\.weight",
        r"roi_head\.bbox_head\.detect_temperature",
        r"roi_head\.bbox_head\.all_embeddings",
        r"roi_head\.mask_head\.convs\.[0-3]\.(conv|bn)\.weight",
        r"roi_head\.mask_head\.(upsample|conv_logits)\.weight",
    ]
    for pattern in expected:
        assert any(re.fullmatch(pattern, k) for k in keys), pattern
    for key in keys:  # every mmdet key maps back (the tower goes to the CLIP loader)
        assert key.startswith("backbone.visual.") or from_mmdet_key(key) is not None, key
    assert not any("rope" in k for k in keys)  # EVA-CLIP's RoPE tables are recomputed, never stored


def test_ensemble_formula_on_crafted_probabilities():
    # softmax of log-probabilities gives the probabilities back exactly: craft p_det and p_clip directly.
    p_det = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    p_clip = torch.tensor([[0.1, 0.1, 0.7, 0.1], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    base = torch.tensor([True, False, False, True])  # class 0 base, 1-2 novel, background (last) base
    s = ensemble_scores(p_det.log(), p_clip.log(), base, alpha=0.1, beta=0.8)
    expected = torch.empty_like(p_det)
    for c in range(4):
        e = 0.1 if base[c] else 0.8
        expected[:, c] = p_det[:, c] ** (1 - e) * p_clip[:, c] ** e
    assert torch.allclose(s, expected, atol=1e-12)
    assert abs(float(s[0, 2]) - 0.2**0.2 * 0.7**0.8) < 1e-12  # written out: novel class 2 of box 0
    assert abs(float(s[0, 3]) - 0.1**0.9 * 0.1**0.1) < 1e-12  # background counted as base
    assert not torch.allclose(s.sum(dim=1), torch.ones(2, dtype=torch.float64))  # not renormalised
    both = ensemble_scores(p_det.log(), p_clip.log(), base, alpha=0.2, beta=0.9, all_classes=True)
    assert torch.allclose(both, p_det**0.8 * p_clip**0.2, atol=1e-12)


def test_prepare_image_follows_mmdet_resize_normalise_pad():
    import cv2

    image = (np.random.default_rng(3).random((50, 80, 3)) * 255).astype(np.uint8)
    prepared = prepare_image(image, 64)
    assert prepared.image_shape == (40, 64) and prepared.original_size == (50, 80)  # int(50 * 0.8 + 0.5) = 40
    assert prepared.tensor.shape == (3, 64, 64)
    resized = cv2.resize(image, (64, 40), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    expected = (resized[..., 0] - 123.675) / 58.395
    assert np.allclose(prepared.tensor[0, :40, :64].numpy(), expected, atol=1e-5)
    assert (prepared.tensor[:, 40:, :] == 0).all() and prepared.scale == (64 / 80, 40 / 50)


def test_detector_reuses_the_image_pass_across_class_lists(files, monkeypatch):
    d, _ = files
    det = Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=d / "emb.pt")
    calls = []
    original = det.model.image_features
    monkeypatch.setattr(det.model, "image_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    det.set_image(d / "img0.png")
    first = det.detect("person; cat; dog")
    second = det.detect(["sofa", "dog"])
    assert len(calls) == 1
    assert first.class_names == ["person", "cat", "dog"] and second.class_names == ["sofa", "dog"]
    for result in (first, second):
        assert result.boxes.shape == (len(result), 4) and result.image_size == (120, 160)
        assert (result.boxes[:, 2] >= result.boxes[:, 0]).all() and (result.boxes[:, 2] <= 160 + 1e-3).all()
        assert (result.scores > det.model.config.score_threshold).all()
    assert len(set(first.labels.tolist())) >= 2  # not degenerate: several classes detected
    # Same image through the batched path gives the same detections.
    batched = det.detect_batch([d / "img0.png", d / "img1.png"], "person; cat; dog")[0]
    assert np.allclose(batched.boxes, first.boxes, atol=1e-3) and np.allclose(batched.scores, first.scores, atol=1e-5)


def test_synonyms_take_the_best_name(files):
    d, _ = files
    det = Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=d / "emb.pt", score_threshold=0.0)
    det.set_image(d / "img0.png")
    regions = det.encode_images([d / "img0.png"])[0].regions
    names = ["cat", "kitten", "dog"]
    with torch.no_grad():
        scores = det.model.scores(regions, det.class_embeddings(names), det.base_mask(names))
    merged = det.detect("cat, kitten; dog")
    assert merged.class_names == ["cat", "dog"]
    best = torch.maximum(scores[:, 0], scores[:, 1])
    top = float(best.max())
    assert abs(top - float(max(s for s, lab in zip(merged.scores, merged.labels, strict=True) if lab == 0))) < 1e-5


def test_detect_cli_writes_overlays_and_json(files, tmp_path, capsys):
    d, _ = files
    out = tmp_path / "out"
    argv = ["detect", str(d / "img0.png"), str(d / "img1.png"), "--classes", "person; cat; dog"]
    argv += ["--detector", str(d / "fvit.pth"), "--model", TOWER, "--class-embeddings", str(d / "emb.pt")]
    code = main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["img0.json", "img0_boxes.png", "img1.json", "img1_boxes.png"]
    summary = json.loads((out / "img0.json").read_text())
    assert summary["class_names"] == ["person", "cat", "dog"] and summary["benchmark"] == "ov-coco"
    overlay = Image.open(out / "img0_boxes.png")
    assert overlay.size[1] == 120 and overlay.size[0] > 160  # the image, then the legend
    # A second run refuses to replace them; --overwrite does.
    assert main(argv + ["--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err
    assert main(argv + ["--out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--classes", ""], "class list is empty"),
        (["--classes", "cat", "--detector", "missing.pth"], "file not found"),
        (["--classes", "cat", "--model", "ovdense-test-vit"], "not an EVA02 model"),
        (["--classes", "unicorn"], "unicorn"),
        (["--classes", "cat", "--score-threshold", "1.5"], "--score-threshold"),
        (["--classes", "cat", "--max-detections", "0"], "--max-detections"),
    ],
)
def test_detect_bad_input_is_one_line(files, tmp_path, capsys, flags, message):
    d, _ = files
    argv = ["detect", str(d / "img0.png"), "--detector", str(d / "fvit.pth"), "--class-embeddings", str(d / "emb.pt")]
    argv += ["--out", str(tmp_path / "out"), "--model", TOWER]
    if "--detector" in flags:
        argv = [a for a in argv if a != str(d / "fvit.pth") and a != "--detector"]
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(argv + flags))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("ovdense: error:")]
    assert exc.value.code == 2 and len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_architecture_and_class_embedding_errors(files, tmp_path):
    d, _ = files
    with pytest.raises(OvdenseError, match="was built on ovdense-test-eva02"):
        Detector.from_pretrained(d / "fvit.safetensors", model="ovdense-test-vit")
    torch.save({"cat": torch.randn(32)}, tmp_path / "nobg.pt")
    with pytest.raises(OvdenseError, match="background"):
        Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=tmp_path / "nobg.pt")
    torch.save({"cat": torch.randn(48), "background": torch.randn(48)}, tmp_path / "wide.pt")
    with pytest.raises(OvdenseError, match="48"):
        det = Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=tmp_path / "wide.pt")
        det.class_embeddings(["cat"])
    torch.save({"state_dict": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(OvdenseError, match="not an F-ViT detector"):
        Detector.from_pretrained(tmp_path / "other.pth")


def write_coco(root, files_dir):
    """A COCO-format val set of the test's three images with OV-COCO categories (base and novel)."""
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    cats = {"person": 1, "cat": 17, "dog": 18, "couch": 63, "bicycle": 2}
    for i in range(3):
        im = Image.open(files_dir / f"img{i}.png")
        im.save(root / "val2017" / f"{i:012d}.jpg")
        images.append({"id": i + 1, "file_name": f"{i:012d}.jpg", "width": im.width, "height": im.height})
        for j, cid in enumerate([1, 17, 18]):
            box = [5.0 + 10 * j, 5.0 + 5 * i, 30.0, 25.0]
            annotations.append(
                {"id": len(annotations) + 1, "image_id": i + 1, "category_id": cid, "bbox": box, "area": 750.0,
                 "iscrowd": 0}
            )  # fmt: skip
    from ovdense.eval.detection import COCO_2017_CATEGORIES

    categories = [{"id": cid, "name": name, "supercategory": "x"} for cid, name in COCO_2017_CATEGORIES]
    assert all(c in {x["id"] for x in categories} for c in cats.values())
    gt = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    return gt


def test_eval_det_cli_writes_metrics_and_detections(files, tmp_path, capsys):
    d, model = files
    root = tmp_path / "coco"
    write_coco(root, d)
    from ovdense.eval.detection import COCO_2017_CATEGORIES

    names = [n for _, n in COCO_2017_CATEGORIES]
    emb = torch.nn.functional.normalize(torch.randn(32, 81, generator=torch.Generator().manual_seed(2)), dim=0)
    write_class_embeddings(tmp_path / "coco_emb.pt", names, emb)
    out = tmp_path / "eval"
    argv = ["eval-det", "--benchmark", "ov-coco", "--data-root", str(root), "--detector", str(d / "fvit.pth")]
    argv += ["--model", TOWER, "--class-embeddings", str(tmp_path / "coco_emb.pt"), "--out", str(out)]
    code = main(argv + ["--save-predictions", "--workers", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert {"metrics.json", "per_class.csv", "results.md", "detections.json"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_images"] == 3
    detections = json.loads((out / "detections.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {1, 2, 3}
    # The saved detections are the Detector's own, in original pixels and COCO ids of the 65 classes.
    det = Detector.from_pretrained(d / "fvit.pth", model=TOWER, class_embeddings=tmp_path / "coco_emb.pt")
    from ovdense.eval.detection import load_coco_annotations

    _, categories = load_coco_annotations(root / "annotations" / "instances_val2017.json", "ov-coco")
    direct = det.detect(list(categories.names), image=root / "val2017" / "000000000000.jpg")
    mine = [x for x in detections if x["image_id"] == 1]
    assert len(mine) == len(direct)
    top = max(mine, key=lambda x: x["score"])
    i = int(np.argmax(direct.scores))
    x1, y1, x2, y2 = direct.boxes[i].tolist()
    assert np.allclose(top["bbox"], [x1, y1, x2 - x1, y2 - y1], atol=1e-4)
    assert top["category_id"] == categories.ids[int(direct.labels[i])]


def test_eval_det_refuses_bad_annotations_before_loading(files, tmp_path, capsys):
    d, _ = files
    root = tmp_path / "coco"
    gt = write_coco(root, d)
    gt["annotations"][0]["bbox"] = [1.0, 1.0, 0.0, 5.0]
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(gt))
    argv = ["eval-det", "--data-root", str(root), "--detector", str(d / "fvit.pth"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.startswith("ovdense: error:")]) == 1 and "Traceback" not in err


def test_eval_det_under_torchrun_gives_the_same_numbers(files, tmp_path):
    import os
    import subprocess
    import sys

    d, _ = files
    root = tmp_path / "coco"
    write_coco(root, d)
    from ovdense.eval.detection import COCO_2017_CATEGORIES

    names = [n for _, n in COCO_2017_CATEGORIES]
    emb = torch.nn.functional.normalize(torch.randn(32, 81, generator=torch.Generator().manual_seed(2)), dim=0)
    write_class_embeddings(tmp_path / "coco_emb.pt", names, emb)
    argv = ["eval-det", "--benchmark", "ov-coco", "--data-root", str(root), "--detector", str(d / "fvit.safetensors"),
            "--class-embeddings", str(tmp_path / "coco_emb.pt"), "--save-predictions", "--workers", "0"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ovdense", *argv, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "ovdense", *argv, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    assert m1["num_images"] == m2["num_images"] == 3
    for key in ("novel_ap50", "base_ap50", "all_ap50"):
        assert m1[key] == m2[key], key
    d1, d2 = (json.loads((tmp_path / r / "detections.json").read_text()) for r in ("one", "two"))
    assert len(d1) == len(d2) and d1
    for a, b in zip(d1, d2, strict=True):
        assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
        assert np.allclose(a["bbox"], b["bbox"], atol=1e-4) and abs(a["score"] - b["score"]) < 1e-6


def test_a_patch_14_tower_pools_at_float_strides(monkeypatch):
    """An L/14-like tower: pyramid strides 3.5 ... 28 (P6 56); RoIs pooled at 1/3.5 ... 1/28, the CLIP map at 1/14."""
    import open_clip
    from timm.models.eva import Eva

    import ovdense.detection.roi as roi
    from ovdense.backbones import tower_for

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        clip = open_clip.create_model("ovdense-test-eva02")
        trunk = clip.visual.trunk
        clip.visual.trunk = Eva(
            img_size=224, patch_size=14, embed_dim=64, depth=3, num_heads=4, qkv_fused=False, mlp_ratio=4 * 2 / 3,
            swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
            global_pool="token", num_classes=trunk.head.out_features,
        )  # fmt: skip
        tower = tower_for(clip.eval())
        model = FViT(tower, fvit_config("ov-coco", tower, image_size=112, fpn_channels=32)).eval()
    assert tower.patch_size == 14 and model.config.image_size == 112
    assert model.strides == [3.5, 7.0, 14.0, 28.0, 56.0]
    scales = []
    real = roi.roi_align

    def spy(feature, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        size = output_size[0] if isinstance(output_size, tuple) else output_size
        scales.append((round(1 / spatial_scale, 6), tuple(feature.shape[-2:]), size, aligned, sampling_ratio))
        return real(feature, rois, output_size, spatial_scale, sampling_ratio, aligned)

    monkeypatch.setattr(roi, "roi_align", spy)
    with torch.no_grad():
        features = model.image_features(torch.randn(1, 3, 112, 112), [(112, 90)])
        assert [tuple(level.shape[-2:]) for level in features.levels] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
        assert tuple(features.clip_map.shape[-2:]) == (8, 8)
        regions = model.regions(features, model.propose(features))[0]
    used = {(s, shape) for s, shape, size, aligned, ratio in scales if size == 7 and aligned and ratio == 0}
    assert used <= {(3.5, (32, 32)), (7.0, (16, 16)), (14.0, (8, 8)), (28.0, (4, 4))} and used
    assert any(s == 14.0 and size == 1 and shape == (8, 8) for s, shape, size, _, _ in scales)  # the CLIP map
    assert regions.boxes.shape[1] == 4 and (regions.boxes[:, 2] <= 90 + 1e-4).all()  # clipped to the image
    anchors = model.anchors.grid_anchors([(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)])[0]
    assert torch.allclose(anchors[1], torch.tensor([-14.0, -14.0, 14.0, 14.0]))  # ratio 1 at (0, 0): side 3.5 x 8


def test_base_classes_of_each_split(tmp_path, files):
    d, _ = files
    save_safetensors(tiny_fvit("ov-lvis", image_size=96), tmp_path / "lvis.safetensors", TOWER)
    lvis = Detector.from_pretrained(tmp_path / "lvis.safetensors", benchmark="ov-lvis")
    # LVIS's rare classes are novel; its names are compared without underscores or case.
    assert lvis.base_mask(["aerosol can", "Air_Conditioner", "applesauce", "unicorn"]).tolist() == [
        True, True, False, False, True
    ]
    assert len(lvis.base_names) == 866
    coco = Detector.from_pretrained(d / "fvit.safetensors")
    assert coco.base_mask(["person", "cat", "dog", "couch", "car"]).tolist() == [
        True, False, False, False, True, True
    ]
    assert len(coco.base_names) == 48


def test_a_detector_from_the_hub_and_offline(files, hf_hub, monkeypatch):
    d, model = files
    hf_hub.add_file("org/fvit-tiny", "weights/fvit.safetensors", d / "fvit.safetensors")
    det = Detector.from_pretrained("hf-hub:org/fvit-tiny/weights/fvit.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(det.model.state_dict()[name], value), name
    # Offline: the cached file is used; an uncached one is one line, at once.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    Detector.from_pretrained("hf-hub:org/fvit-tiny/weights/fvit.safetensors")
    with pytest.raises(OvdenseError, match="not in the local cache and could not be downloaded"):
        Detector.from_pretrained("hf-hub:org/fvit-tiny/other.pth")
    with pytest.raises(OvdenseError, match="expected hf-hub:ORG/REPO/FILE"):
        Detector.from_pretrained("hf-hub:org/fvit-tiny")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(OvdenseError, match="cannot download detector"):
        Detector.from_pretrained("hf-hub:org/fvit-tiny/missing.pth")


def test_the_declip_clip_head_takes_declips_last_block(files):
    from ovdense.heads.declip import DeclipHead

    d, _ = files
    value = Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=d / "emb.pt")
    declip = Detector.from_pretrained(d / "fvit.safetensors", class_embeddings=d / "emb.pt", clip_head="declip")
    assert declip.settings["clip_head"] == "declip" and declip.settings["declip_mode"] == "qq"
    image = prepare_image(np.asarray(Image.open(d / "img0.png").convert("RGB")), 640).tensor[None]
    tower = declip.model.tower
    with torch.no_grad():
        _, clip_map = declip.model.tower_maps(image)
        x, _ = tower.tokens_before_last_block(image, "size")
        tokens = tower.project(DeclipHead(mode="qq").decoupled(tower, x)[0][:, 1:])  # not normalised (DeCLIP's)
        expected = tokens.transpose(1, 2).reshape(1, -1, 40, 40)
        assert torch.allclose(clip_map, expected, atol=1e-5)
        _, value_map = value.model.tower_maps(image)
    assert not torch.allclose(value_map, torch.nn.functional.normalize(expected, dim=1), atol=1e-3)
    assert torch.allclose(value_map.norm(dim=1), torch.ones(1, 40, 40), atol=1e-5)  # F-ViT's map: unit tokens
