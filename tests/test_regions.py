"""Segmenter.classify_regions: box, mask and crop features against the references' pipeline written out here."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import InterpolationMode

from ovdense import regions
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.heads import PassInputs
from ovdense.predictor import Segmenter
from ovdense.presets import get_preset
from ovdense.text import DETECTION_TEMPLATES, OPENAI_TEMPLATES, build_text_classifier

rng = np.random.default_rng(0)
IMAGE = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
CLASSES = [["cat"], ["dog", "puppy"], ["sky"], ["road"], ["tree"], ["person"]]
BOXES = np.array([[3.0, 4.0, 60.5, 80.0], [10.2, 0.0, 130.0, 33.7], [70.0, 40.0, 78.0, 47.5]])
SIZE = 160  # detection input side: 10 x 10 grid for the /16 test tower


def make(loaded, method="declip"):
    return Segmenter(loaded, get_preset(method), torch.device("cpu"), text_cache_dir=False)


def reference_input(image, size, mean, std):
    """CLIPSelf/DeCLIP ``ResizeLongest`` + ``ToTensor`` + ``Normalize``, written with torchvision's ops."""
    pil = Image.fromarray(image)
    scale = size / float(max(pil.height, pil.width))
    pil = TF.resize(pil, [round(pil.height * scale), round(pil.width * scale)], InterpolationMode.BICUBIC)
    pil = TF.pad(pil, [0, 0, size - pil.width, size - pil.height], fill=0)
    return TF.normalize(TF.to_tensor(pil), list(mean), list(std))[None], scale


def dense_map(seg, size):
    tower = seg.loaded.tower
    x, scale = reference_input(IMAGE, size, tower.preprocess.mean, tower.preprocess.std)
    with torch.no_grad():
        # The references pool EVA02 maps as they are and open_clip ViT maps token-normalised.
        inputs = PassInputs(seg.preset.pos_rule)
        return seg.head.encode_dense(tower, x, inputs, normalize=tower.region_tokens_normalized), scale


@pytest.mark.parametrize("method", ["declip", "sclip", "clip"])
@pytest.mark.parametrize("arch", ["vit", "eva"])
def test_box_features_are_roi_align_on_the_dense_map(tiny_vit, tiny_eva, method, arch):
    seg = make(tiny_vit if arch == "vit" else tiny_eva, method)
    seg.set_image(IMAGE)
    result = seg.classify_regions(CLASSES, boxes=BOXES, image_size=SIZE)
    fmap, scale = dense_map(seg, SIZE)
    assert fmap.shape[-2:] == (10, 10)
    # The reference: boxes * scale, / padded size (normalised), * feature size, then 1x1 aligned RoIAlign.
    normed = torch.tensor(BOXES, dtype=torch.float32) * scale / SIZE
    grid = normed * 10
    expected = F.normalize(roi_align(fmap, [grid], (1, 1), 1.0, -1, True)[:, :, 0, 0], dim=-1)
    assert result.source == "box" and len(result) == 3
    torch.testing.assert_close(result.features, expected, atol=1e-6, rtol=1e-5)
    # EVA02 (DeCLIP eva_vit_model.py) pools un-normalised tokens; open_clip ViTs (transformer.py) normalised ones.
    token_norms = fmap.norm(dim=1)
    if arch == "vit":
        torch.testing.assert_close(token_norms, torch.ones_like(token_norms))
    else:
        assert not torch.allclose(token_norms, torch.ones_like(token_norms))


def test_mask_features_are_the_masked_mean(tiny_eva):
    seg = make(tiny_eva)
    seg.set_image(IMAGE)
    masks = np.zeros((3, 90, 130), dtype=bool)
    masks[0, 10:60, 5:50] = True
    masks[1, 50:, :] = True
    masks[2, 0:3, 0:3] = True  # smaller than a grid cell
    # The references pool it to a zero vector (kept, so the benchmark's numbers are theirs), and we say so once.
    with pytest.warns(regions.RegionWarning, match=r"^masks: mask 2 falls between the cells of the 10 x 10 feature"):
        result = seg.classify_regions(CLASSES, masks=masks, image_size=SIZE)
    fmap, _ = dense_map(seg, SIZE)
    h, w = fmap.shape[-2:]
    tokens = fmap[0].flatten(1).T
    expected = []
    for m in masks:
        # Reference: ResizeLongest(grid) of the float mask, bicubic on the tensor (no antialias), pad, > 0.
        t = torch.from_numpy(m).float()[None]
        s = w / 130.0
        t = TF.resize(t, [round(90 * s), round(130 * s)], InterpolationMode.BICUBIC, antialias=False)
        t = F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]))[0] > 0
        inside = tokens[t.flatten()]
        expected.append(inside.mean(0) if len(inside) else torch.zeros(tokens.shape[1]))
    expected = F.normalize(torch.stack(expected), dim=-1)
    assert result.source == "mask"
    torch.testing.assert_close(result.features, expected, atol=1e-6, rtol=1e-5)
    assert masks_on_grid_count(masks[2], w) <= 1


def masks_on_grid_count(mask, grid):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", regions.RegionWarning)
        return int(regions.masks_on_grid(torch.from_numpy(mask)[None], grid).sum())


def test_empty_masks_are_refused_by_index(tiny_vit):
    seg = make(tiny_vit, "sclip")
    seg.set_image(IMAGE)
    masks = np.zeros((5, 90, 130), dtype=bool)
    masks[:, 10:60, 5:50] = True
    masks[3] = False
    with pytest.raises(InvalidArgumentError, match=r"^masks: mask 3 is empty \(no pixel set\)"):
        seg.classify_regions(CLASSES, masks=masks, image_size=SIZE)
    masks[1] = False
    with pytest.raises(InvalidArgumentError, match=r"^masks: masks 1, 3 are empty"):
        seg.classify_regions(CLASSES, masks=masks.astype(np.uint8), image_size=SIZE)
    assert len(seg.classify_regions(CLASSES, masks=np.zeros((0, 90, 130), bool), image_size=SIZE)) == 0


def test_masks_lost_on_the_grid_warn_once_naming_them(tiny_vit):
    seg = make(tiny_vit, "sclip")
    seg.set_image(IMAGE)
    masks = np.zeros((4, 90, 130), dtype=bool)
    masks[0, 10:60, 5:50] = True
    masks[1, 0:3, 0:3] = True  # a corner smaller than a cell of the 10 x 10 grid at SIZE
    masks[3, 0:2, 127:130] = True
    masks[2, 40:80, 60:120] = True
    assert masks_on_grid_count(masks[1], 10) == masks_on_grid_count(masks[3], 10) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = seg.classify_regions(CLASSES, masks=masks, image_size=SIZE)
    lost = [w for w in caught if issubclass(w.category, regions.RegionWarning)]
    assert len(lost) == 1 and str(lost[0].message).startswith("masks: masks 1, 3 fall between the cells"), lost
    assert "raise image_size" in str(lost[0].message)
    torch.testing.assert_close(result.probs[1], torch.full((len(CLASSES),), result.probs[1, 0].item()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", regions.RegionWarning)
        seg.classify_regions(CLASSES, masks=masks[1:2], image_size=64 * 16)  # at the default size it is a cell


def test_crop_features_run_the_vanilla_tower_on_enlarged_crops(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    enlarge = [1.5, 1.0, 1.5]
    result = seg.classify_regions(CLASSES, boxes=BOXES, pooling="crop", crop_enlarge=enlarge)
    tower = tiny_vit.tower
    pil = Image.fromarray(IMAGE)
    crops = []
    for (x0, y0, x1, y1), e in zip(BOXES, enlarge, strict=True):
        w, h = x1 - x0, y1 - y0
        cx, cy = x0 + w * 0.5, y0 + h * 0.5
        box = (max(cx - w * e / 2, 0), max(cy - h * e / 2, 0), min(cx + w * e / 2, 130), min(cy + h * e / 2, 90))
        crop = pil.crop(box)
        # ResizeMaxSize(224): longest side to 224, centred padding.
        s = 224 / float(max(crop.height, crop.width))
        size = (round(crop.height * s), round(crop.width * s))
        crop = TF.resize(crop, list(size), InterpolationMode.BICUBIC)
        ph, pw = 224 - size[0], 224 - size[1]
        crop = TF.pad(crop, [pw // 2, ph // 2, pw - pw // 2, ph - ph // 2], fill=0)
        crops.append(TF.normalize(TF.to_tensor(crop), list(tower.preprocess.mean), list(tower.preprocess.std)))
    with torch.no_grad():
        expected = F.normalize(tiny_vit.model.encode_image(torch.stack(crops)), dim=-1)
    assert result.source == "crop"
    torch.testing.assert_close(result.features, expected, atol=1e-6, rtol=1e-5)


def test_scores_probs_and_topk(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    result = seg.classify_regions(CLASSES, boxes=BOXES, image_size=SIZE, top_k=3)
    text = build_text_classifier(tiny_vit.model, tiny_vit.tokenizer, CLASSES, DETECTION_TEMPLATES, cache_dir=False)
    cos = result.features @ text.embeddings.T  # K x 7 names
    by_class = torch.stack([cos[:, 0], cos[:, 1:3].max(1).values, *cos[:, 3:].T], dim=1)
    torch.testing.assert_close(result.scores, by_class)
    name_probs = torch.softmax(cos * tiny_vit.model.logit_scale.exp(), dim=1)
    probs = torch.stack([name_probs[:, 0], name_probs[:, 1:3].max(1).values, *name_probs[:, 3:].T], dim=1)
    torch.testing.assert_close(result.probs, probs)
    assert result.topk_indices.shape == (3, 3)
    assert torch.equal(result.topk_indices, by_class.topk(3, dim=1).indices)
    torch.testing.assert_close(result.topk_scores, probs.gather(1, result.topk_indices))
    assert result.top_names[0][0] == CLASSES[int(result.labels[0])][0]
    record = result.to_records()[1]
    assert record["label"] == int(result.labels[1]) and len(record["top"]) == 3


def test_tower_runs_once_per_image_and_size(tiny_vit, monkeypatch):
    seg = make(tiny_vit)
    calls = []
    original = tiny_vit.tower.tokens_before_last_block
    monkeypatch.setattr(tiny_vit.tower, "tokens_before_last_block", lambda *a: calls.append(a[0].shape) or original(*a))
    seg.set_image(IMAGE)
    assert calls == []  # nothing runs until a result is asked for
    seg.classify_regions(CLASSES, boxes=BOXES, image_size=SIZE)
    seg.classify_regions(CLASSES, masks=np.ones((1, 90, 130), bool), image_size=SIZE)
    seg.classify_regions("cat; dog", boxes=BOXES[:1], image_size=SIZE)
    assert calls == [torch.Size([1, 3, SIZE, SIZE])]
    seg.classify_regions(CLASSES, boxes=BOXES, image_size=2 * SIZE)
    assert len(calls) == 2
    seg.set_image(IMAGE[:50])
    seg.classify_regions(CLASSES, boxes=[[0, 0, 10, 10]], image_size=SIZE)
    assert len(calls) == 3


def test_default_size_and_text(tiny_vit):
    seg = make(tiny_vit)
    assert seg.default_region_size == 64 * 16
    seg.set_image(IMAGE)
    seg.classify_regions(CLASSES, boxes=BOXES[:1], image_size=SIZE)
    # Regions use the detection templates by default, segmentation the OpenAI ones: two cached classifiers.
    keys = {k[1] for k in seg._text}
    assert keys == {tuple(DETECTION_TEMPLATES)}
    seg.predict(CLASSES)
    assert {k[1] for k in seg._text} == {tuple(DETECTION_TEMPLATES), tuple(OPENAI_TEMPLATES)}


def test_no_regions_is_not_an_error(tiny_vit):
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    for kwargs in (dict(boxes=np.zeros((0, 4))), dict(masks=np.zeros((0, 90, 130), bool)), dict(boxes=[])):
        result = seg.classify_regions(CLASSES, image_size=SIZE, **kwargs)
        assert len(result) == 0 and result.topk_indices.shape == (0, 5) and result.probs.shape == (0, 6)
    assert len(seg.classify_regions(CLASSES, boxes=[], pooling="crop")) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(boxes=[[10, 10, 5, 20]]), r"^boxes: box 0 .* x2 <= x1"),
        (dict(boxes=[[10, 10, 20, 10]]), r"^boxes: .*y2 <= y1"),
        (dict(boxes=[[0, 0, 10, 10], [-5, 0, 10, 10]]), r"^boxes: box 1 .* outside the 130 x 90 image"),
        (dict(boxes=[[0, 0, 140, 10]]), r"^boxes: .*outside"),
        (dict(boxes=[[0, 0, float("nan"), 10]]), r"^boxes: .*finite"),
        (dict(boxes=[1, 2, 3, 4]), r"^boxes: expected shape K x 4"),
        (dict(masks=np.zeros((2, 90, 120), bool)), r"^masks: expected K x 90 x 130"),
        (dict(masks=np.zeros((90, 130), bool)), r"^masks: .*leading axis"),
        (dict(masks=np.full((1, 90, 130), 0.5)), r"^masks: expected bool"),
        (dict(), r"^boxes, masks: give exactly one"),
        (dict(boxes=[[0, 0, 5, 5]], masks=np.zeros((1, 90, 130), bool)), r"^boxes, masks"),
        (dict(boxes=[[0, 0, 5, 5]], pooling="roi"), r"^pooling: expected one of"),
        (dict(masks=np.zeros((1, 90, 130), bool), pooling="crop"), r"^pooling: 'crop' classifies boxes"),
        (dict(boxes=[[0, 0, 5, 5]], top_k=0), r"^top_k"),
        (dict(boxes=[[0, 0, 5, 5]], image_size=8), r"^image_size"),
        (dict(boxes=[[0, 0, 5, 5]], pooling="crop", crop_enlarge=[1.5, 1.0]), r"^crop_enlarge"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(tiny_vit, kwargs, match):
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    with pytest.raises(ValueError, match=match) as info:
        seg.classify_regions(CLASSES, **kwargs)
    assert isinstance(info.value, InvalidArgumentError) and "\n" not in str(info.value)


def test_bad_classes_and_order_of_calls(tiny_vit):
    seg = make(tiny_vit)
    with pytest.raises(OvdenseError, match="set_image"):
        seg.classify_regions(CLASSES, boxes=[[0, 0, 5, 5]])
    seg.set_image(IMAGE)
    for classes in ([], "", "cat; ; dog", [["cat"], ["cat"]]):
        with pytest.raises(ValueError, match="^classes: "):
            seg.classify_regions(classes, boxes=[[0, 0, 5, 5]])


def test_boxes_just_past_the_border_are_accepted(tiny_vit):
    """Annotation corners can round past the image by a fraction of a pixel (COCO boxes do)."""
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    result = seg.classify_regions(CLASSES, boxes=[[-0.3, 0, 130.4, 90.2]], image_size=SIZE)
    assert len(result) == 1


def test_class_lists_are_taken_verbatim_from_lists(tiny_vit):
    """A list of name lists is not re-parsed: a name may hold ',' or ';'."""
    seg = make(tiny_vit)
    seg.set_image(IMAGE)
    result = seg.classify_regions([["salt, pepper"], ["a; b"]], boxes=BOXES[:1], image_size=SIZE)
    assert result.class_names == [["salt, pepper"], ["a; b"]]
    assert seg.classify_regions(["cat", "dog, puppy"], boxes=BOXES[:1], image_size=SIZE).class_names == [
        ["cat"],
        ["dog", "puppy"],
    ]


def test_detection_templates_follow_vild():
    assert len(DETECTION_TEMPLATES) == 63
    prompts = [t("apple") for t in DETECTION_TEMPLATES]
    assert prompts[0] == "There is an apple in the scene."
    assert prompts[2] == "This is a photo of an apple in the scene."
    assert "itap of an apple." in prompts and "This is an embroidered apple." in prompts
    assert DETECTION_TEMPLATES[8]("Traffic_light") == "This is a photo of a traffic light."
    assert DETECTION_TEMPLATES[8]("cup/mug.") == "This is a photo of a cup or mug."
    assert DETECTION_TEMPLATES[8]("wall-other-merged") == "This is a photo of a wall-other-merged."
    # The cache key names the rule, so a plain format string with the same text never collides.
    from ovdense.text import _template_string

    assert _template_string(DETECTION_TEMPLATES[8]) != "This is a photo of a {}."
