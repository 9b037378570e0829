"""OV-LVIS instance masks: mmdet's paste arithmetic against a written-out bilinear sampling, the mask head's RoI
pooling, masks through ``Detector.detect`` on a tiny F-ViT saved in mmdet's layout, and RLE from ``ovdense detect``."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ovdense.cli import main
from ovdense.detection.checkpoint import save_mmdet, save_safetensors
from ovdense.detection.detector import Detector, prepare_image
from ovdense.detection.masks import paste_masks, scale_factor_tensor, to_input, to_original
from ovdense.detection.roi import multilevel_roi_align
from ovdense.detection.text import write_class_embeddings
from test_detection import TOWER, tiny_fvit

PATTERN = np.array(
    [
        [0.05, 0.95, 0.70, 0.30],
        [0.90, 0.20, 0.85, 0.10],
        [0.60, 0.75, 0.05, 0.99],
        [0.15, 0.40, 0.80, 0.65],
    ]
)


def bilinear_paste(pattern: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """mmdet's paste written out pixel by pixel in float64: each pixel centre of the box's extent
    ``[floor(x1) - 1, ceil(x2) + 1)`` (clipped to the image) maps to mask coordinates ``u = (c - x1) / w * n - 0.5``
    (``grid_sample(align_corners=False)``), sampled bilinearly with zeros outside the mask; 0 outside the extent."""
    x0, y0, x1, y1 = box
    ph, pw = pattern.shape
    out = np.zeros((height, width))

    def value(r, c):
        return pattern[r, c] if 0 <= r < ph and 0 <= c < pw else 0.0

    for i in range(max(math.floor(y0) - 1, 0), min(math.ceil(y1) + 1, height)):
        for j in range(max(math.floor(x0) - 1, 0), min(math.ceil(x1) + 1, width)):
            u = (j + 0.5 - x0) / (x1 - x0) * pw - 0.5
            v = (i + 0.5 - y0) / (y1 - y0) * ph - 0.5
            u0, v0 = math.floor(u), math.floor(v)
            fu, fv = u - u0, v - v0
            out[i, j] = (
                (1 - fv) * (1 - fu) * value(v0, u0)
                + (1 - fv) * fu * value(v0, u0 + 1)
                + fv * (1 - fu) * value(v0 + 1, u0)
                + fv * fu * value(v0 + 1, u0 + 1)
            )
    return out


@pytest.mark.parametrize(
    "box",
    [
        (2.3, 1.6, 9.1, 7.4),  # fractional, inside
        (7.5, 3.2, 12.0, 10.0),  # touches the right and bottom borders: the extent is clipped there
        (0.0, 0.0, 12.0, 10.0),  # the whole image
        (0.4, 0.0, 5.7, 4.2),  # touches the top border, starts within a pixel of the left one
    ],
)
def test_paste_masks_is_the_written_out_bilinear_sampling(box):
    height, width = 10, 12
    reference = bilinear_paste(PATTERN, box, height, width)
    probs = torch.tensor(PATTERN, dtype=torch.float32)[None]
    boxes = torch.tensor([box], dtype=torch.float32)
    sampled = paste_masks(probs, boxes, (height, width), threshold=None)[0].numpy()
    assert np.allclose(sampled, reference, atol=1e-6)
    assert np.abs(reference - 0.5).min() > 1e-4  # no pixel so close to the threshold that float32 could flip it
    mask = paste_masks(probs, boxes, (height, width))[0].numpy()
    assert mask.dtype == bool and mask.shape == (height, width)
    assert (mask == (reference >= 0.5)).all()
    # Pixels whose centre lies outside the box are False, although bilinear sampling leaks below 0.5 there.
    cy, cx = np.mgrid[0:height, 0:width] + 0.5
    outside = (cx < box[0]) | (cx > box[2]) | (cy < box[1]) | (cy > box[3])
    assert not mask[outside].any() and mask.any()
    if outside.any() and box == (2.3, 1.6, 9.1, 7.4):
        assert (sampled[outside] > 0).any()


def test_paste_masks_threshold_is_inclusive_and_chunking_changes_nothing():
    probs = torch.full((1, 4, 4), 0.5)
    assert paste_masks(probs, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), (8, 8))[0, 3, 3]  # 0.5 >= 0.5
    generator = torch.Generator().manual_seed(0)
    k, height, width = 30, 40, 56
    probs = torch.rand(k, 28, 28, generator=generator)
    xy = torch.rand(k, 2, generator=generator) * torch.tensor([width, height])
    wh = torch.rand(k, 2, generator=generator) * torch.tensor([width, height]) * 0.7 + 0.2
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    whole = paste_masks(probs, boxes, (height, width), threshold=None)
    one_by_one = paste_masks(probs, boxes, (height, width), threshold=None, max_chunk_pixels=1)
    assert torch.equal(whole, one_by_one)
    assert paste_masks(probs[:0], boxes[:0], (height, width)).shape == (0, height, width)


def test_box_rescaling_follows_mmdet():
    scale = scale_factor_tensor((0.8, 0.75))
    assert scale.dtype == torch.float32 and scale.tolist() == pytest.approx([0.8, 0.75, 0.8, 0.75])
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert torch.equal(to_input(boxes, scale), boxes * torch.tensor([0.8, 0.75, 0.8, 0.75]))
    assert torch.equal(to_original(to_input(boxes, scale), scale), boxes * scale / scale)


@pytest.fixture(scope="module")
def lvis(tmp_path_factory):
    d = tmp_path_factory.mktemp("fvit_lvis")
    model = tiny_fvit("ov-lvis", image_size=128)
    names = ["person", "cat", "dog", "sofa"]
    generator = torch.Generator().manual_seed(2)
    emb = torch.nn.functional.normalize(torch.randn(32, len(names) + 1, generator=generator), dim=0)
    write_class_embeddings(d / "emb.pt", names, emb)
    rng = np.random.default_rng(0)
    pixels = [(rng.random((*size, 3)) * 255).astype(np.uint8) for size in [(120, 160), (90, 70)]]
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(d / f"img{i}.png")
    # The random mask head's logits barely vary within a RoI: centre them on the test image's median logit, so that
    # masks are neither empty nor full.
    head = model.mask_head.logits
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 20)
        head.bias.zero_()
        features = model.image_features(prepare_image(pixels[0], 128).tensor[None], [(96, 128)])
        rois = torch.tensor([[0.0, 4.0, 4.0, 60.0, 50.0], [0.0, 30.0, 20.0, 120.0, 90.0], [0.0, 50, 10, 70, 30]])
        logits = model.mask_head(multilevel_roi_align(features.levels[:4], model.strides[:4], rois, 14))
        head.bias.fill_(-float(logits.median()))
    save_mmdet(model, d / "lvis.pth")
    save_safetensors(model, d / "lvis.safetensors", TOWER)
    return d, model


def test_mask_probs_pool_p2_p5_per_image(lvis):
    _, model = lvis
    images = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    boxes = [
        torch.tensor([[4.0, 4.0, 20.0, 30.0], [0.0, 0.0, 128.0, 128.0], [10.5, 60.2, 90.0, 100.0]]),
        torch.tensor([[30.0, 8.0, 60.0, 40.0]]),
    ]
    with torch.no_grad():
        features = model.image_features(images, [(128, 128), (100, 128)])
        probs = model.mask_probs(features, boxes)
        assert [p.shape for p in probs] == [(3, 28, 28), (1, 28, 28)]
        assert all(((p > 0) & (p < 1)).all() for p in probs)
        # The same as the head on 14 x 14 RoIAlign of P2-P5 (mmdet's level rule), sigmoid, one channel.
        rois = torch.cat([torch.zeros(3, 1), boxes[0]], dim=1)
        expected = model.mask_head(multilevel_roi_align(features.levels[:4], model.strides[:4], rois, 14)).sigmoid()
        assert torch.allclose(probs[0], expected[:, 0], atol=1e-6)
        # One image alone (what the Detector keeps) gives the same, and no boxes give none.
        alone = model.mask_probs(features.image(1), [boxes[1]])[0]
        assert torch.allclose(alone, probs[1], atol=1e-6)
        assert [p.shape for p in model.mask_probs(features, [boxes[0][:0], boxes[1][:0]])] == [(0, 28, 28)] * 2
    coco = tiny_fvit("ov-coco", image_size=128)
    with pytest.raises(ValueError, match="no mask head"):
        coco.mask_probs(features, boxes)


def test_detect_returns_masks_inside_their_boxes(lvis):
    d, model = lvis
    det = Detector.from_pretrained(
        d / "lvis.pth", model=TOWER, benchmark="ov-lvis", class_embeddings=d / "emb.pt", image_size=128
    )
    for key, value in model.state_dict().items():  # the mask head came through the mmdet layout
        if key.startswith("mask_head."):
            assert torch.equal(det.model.state_dict()[key], value), key
    det.set_image(d / "img0.png")
    assert det._current.features is not None and len(det._current.features.levels) == 4
    result = det.detect("person; cat; dog; sofa")
    k = len(result)
    assert k > 0 and result.masks.shape == (k, 120, 160) and result.masks.dtype == bool
    assert result.masks.any(axis=(1, 2)).sum() > k // 2  # most detections have a mask
    assert not result.masks.all(axis=(1, 2)).any()
    cy, cx = np.mgrid[0:120, 0:160] + 0.5
    for mask, box in zip(result.masks, result.boxes, strict=True):
        x1, y1, x2, y2 = box
        inside = (cx >= x1 - 1) & (cx <= x2 + 1) & (cy >= y1 - 1) & (cy <= y2 + 1)
        assert not (mask & ~inside).any()
    # mmdet's flow written out: RoIs = detections x scale_factor, pasted at those / scale_factor.
    scale = scale_factor_tensor(det._current.prepared.scale)
    rois = torch.tensor(result.boxes) * scale
    with torch.no_grad():
        probs = det.model.mask_probs(det._current.features, [rois])[0]
    assert np.array_equal(paste_masks(probs, rois / scale, (120, 160)).numpy(), result.masks)
    # masks=False skips them; boxes stay the same.
    boxes_only = det.detect("person; cat; dog; sofa", masks=False)
    assert boxes_only.masks is None and np.array_equal(boxes_only.boxes, result.boxes)
    # The batched path gives the same masks for the same image.
    batched = det.detect_batch([d / "img0.png", d / "img1.png"], "person; cat; dog; sofa")
    assert batched[1].masks.shape == (len(batched[1]), 90, 70)
    assert np.allclose(batched[0].boxes, result.boxes, atol=1e-3)
    assert (batched[0].masks != result.masks).mean() < 1e-3  # boxes equal to float noise: masks too, but a pixel
    # No detections: no masks, of the right shape.
    config = det.model.config
    det.model.config = config.with_(score_threshold=1.0)
    try:
        assert det.detect("cat").masks.shape == (0, 120, 160)
    finally:
        det.model.config = config
    # The transfer setting (no mask head) keeps no feature maps and gives no masks.
    coco = Detector.from_pretrained(
        d / "lvis.pth", model=TOWER, benchmark="coco", class_embeddings=d / "emb.pt", image_size=128
    )
    coco.set_image(d / "img0.png")
    assert coco._current.features is None and coco.detect("cat; dog").masks is None


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools decode, numpy 2
def test_detect_cli_writes_rle_that_decodes_to_the_masks(lvis, tmp_path, capsys):
    from pycocotools import mask as mask_utils

    d, _ = lvis
    out = tmp_path / "out"
    argv = ["detect", str(d / "img0.png"), "--classes", "person; cat; dog; sofa", "--benchmark", "ov-lvis"]
    argv += ["--detector", str(d / "lvis.safetensors"), "--class-embeddings", str(d / "emb.pt")]
    argv += ["--max-detections", "20", "--out", str(out)]
    code = main(argv)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "img0.json").read_text())
    detections = summary["detections"]
    assert 0 < len(detections) <= 20
    det = Detector.from_pretrained(
        d / "lvis.safetensors", benchmark="ov-lvis", class_embeddings=d / "emb.pt", max_detections=20
    )
    expected = det.detect("person; cat; dog; sofa", image=d / "img0.png")
    assert len(expected) == len(detections)
    for entry, mask in zip(detections, expected.masks, strict=True):
        rle = entry["mask_rle"]
        assert rle["size"] == [120, 160] and isinstance(rle["counts"], str)
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")})
        assert decoded.shape == (120, 160) and np.array_equal(decoded.astype(bool), mask)
    # The overlay blends the masks in: it differs from the boxes-only overlay inside some mask, off the boxes' lines.
    overlay = np.asarray(Image.open(out / "img0_boxes.png").convert("RGB"))[:120, :160]
    plain = np.asarray(expected.overlay(det.image, legend=False, mask_alpha=0.0))
    assert (overlay != plain).any(axis=2)[expected.masks.any(axis=0)].any()
