import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.inference import (
    assemble_cosine_maps,
    cosine_to_labels,
    encode_windows,
    mmseg_resize,
    patch_padding,
    slide_cosine_maps,
    sliding_windows,
)

PATCH = 8


def make_encoder(dim=6, seed=0, out_dtype=None):
    """Fake dense tower: average-pool by the patch, fixed random 1x1 projection, L2 norm."""
    weight = torch.randn(dim, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
    calls = []

    def encode(x):
        calls.append(x.shape[0])
        feats = F.normalize(F.conv2d(F.avg_pool2d(x, PATCH), weight), dim=1)
        return feats if out_dtype is None else feats.to(out_dtype)

    encode.calls = calls
    return encode


def text_embeddings(n=5, dim=6, seed=1):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def image(h, w, seed=2):
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def reference_slide(img, encode, text, crop, stride, out_size, pad_to_patch=0):
    """The references' algorithm: one window at a time, padded canvas sums (SCLIP / ClearCLIP)."""
    _, _, h_img, w_img = img.shape
    preds = img.new_zeros((1, text.shape[0], h_img, w_img))
    count = img.new_zeros((1, 1, h_img, w_img))
    h_grids = max(h_img - crop + stride - 1, 0) // stride + 1
    w_grids = max(w_img - crop + stride - 1, 0) // stride + 1
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride + crop, h_img)
            x2 = min(j * stride + crop, w_img)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            win = img[:, :, y1:y2, x1:x2]
            h, w = win.shape[-2:]
            pad = (0, 0, 0, 0)
            if pad_to_patch:
                lr = (pad_to_patch - w % pad_to_patch) % pad_to_patch
                tb = (pad_to_patch - h % pad_to_patch) % pad_to_patch
                pad = (lr // 2, lr - lr // 2, tb // 2, tb - tb // 2)
                win = F.pad(win, pad)
            feats = encode(win).float()
            logits = (feats.flatten(2).transpose(1, 2) @ text.T).transpose(1, 2)
            logits = logits.reshape(1, -1, *feats.shape[-2:])
            logits = F.interpolate(logits, size=win.shape[-2:], mode="bilinear")
            logits = logits[:, :, pad[2] : pad[2] + h, pad[0] : pad[0] + w]
            preds += F.pad(logits, (x1, w_img - x2, y1, h_img - y2))
            count[:, :, y1:y2, x1:x2] += 1
    assert (count == 0).sum() == 0
    return F.interpolate(preds / count, size=out_size, mode="bilinear")


# -- sliding_windows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,crop,stride",
    [
        (336, 500, 224, 112),
        (336, 448, 224, 112),
        (100, 100, 224, 112),
        (200, 500, 224, 112),
        (448, 597, 448, 224),
        (560, 1120, 224, 224),
        (37, 91, 16, 5),
        (17, 17, 16, 16),
        (1, 1, 3, 1),
        (50, 64, (20, 30), (7, 11)),
    ],
)
def test_sliding_windows_cover_every_pixel(h, w, crop, stride):
    windows = sliding_windows(h, w, crop, stride)
    count = np.zeros((h, w), int)
    crop_h, crop_w = crop if isinstance(crop, tuple) else (crop, crop)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop_h, h), min(crop_w, w))
        count[y1:y2, x1:x2] += 1
    assert count.min() >= 1


def test_sliding_windows_mmseg_grid():
    # h_grids = (336 - 224 + 111) // 112 + 1 = 2, w_grids = (500 - 224 + 111) // 112 + 1 = 4
    windows = sliding_windows(336, 500, 224, 112)
    assert len(windows) == 2 * 4
    # rows outer, columns inner; the last column is pulled back to end at the border
    assert windows == [
        (0, 224, 0, 224),
        (0, 224, 112, 336),
        (0, 224, 224, 448),
        (0, 224, 276, 500),
        (112, 336, 0, 224),
        (112, 336, 112, 336),
        (112, 336, 224, 448),
        (112, 336, 276, 500),
    ]
    # 337 rows need a third row of windows, pulled back to y1 = 113
    rows = sorted({(y1, y2) for y1, y2, _, _ in sliding_windows(337, 500, 224, 112)})
    assert rows == [(0, 224), (112, 336), (113, 337)]
    # ClearCLIP: 448 x 597, crop 448, stride 224 -> 1 x 2
    assert sliding_windows(448, 597, 448, 224) == [(0, 448, 0, 448), (0, 448, 149, 597)]
    # rectangular crop and stride
    assert sliding_windows(30, 50, (20, 30), (10, 15)) == [
        (0, 20, 0, 30),
        (0, 20, 15, 45),
        (0, 20, 20, 50),
        (10, 30, 0, 30),
        (10, 30, 15, 45),
        (10, 30, 20, 50),
    ]


def test_sliding_windows_whole_image_and_small_image():
    assert sliding_windows(336, 500, 0, 112) == [(0, 336, 0, 500)]
    assert sliding_windows(336, 500, None, None) == [(0, 336, 0, 500)]
    assert sliding_windows(100, 150, 224, 112) == [(0, 100, 0, 150)]


@pytest.mark.parametrize(
    "args",
    [
        (0, 10, 4, 2),
        (10, 10, -1, 2),
        (10, 10, 4, 0),
        (10, 10, 4, -3),
        (10, 10, 4, None),
        (10, 10, (1, 2, 3), 1),
    ],
)
def test_sliding_windows_validation(args):
    with pytest.raises(ValueError):
        sliding_windows(*args)


# -- patch_padding -----------------------------------------------------------------------------------


def test_patch_padding():
    assert patch_padding(224, 224, 16) == (0, 0, 0, 0)
    assert patch_padding(224, 500, 16) == (6, 6, 0, 0)  # 500 % 16 = 4 -> 12 split evenly
    assert patch_padding(225, 231, 14) == (3, 4, 6, 7)  # odd pixel right / bottom
    assert patch_padding(1, 1, 8) == (3, 4, 3, 4)
    with pytest.raises(ValueError):
        patch_padding(10, 10, 0)


# -- mmseg_resize ------------------------------------------------------------------------------------


def test_mmseg_resize_voc_size():
    img = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    out = mmseg_resize(img, 2048, 336)
    assert out.shape == (336, 448, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(img, (448, 336), interpolation=cv2.INTER_LINEAR))
    # scale order does not matter (mmcv takes max / min of the pair)
    np.testing.assert_array_equal(mmseg_resize(img, 336, 2048), out)


def test_mmseg_resize_rounds_half_up():
    img = np.zeros((4, 5, 3), np.uint8)
    # f = min(100 / 5, 2 / 4) = 0.5: width 2.5 -> 3 (Python's round() would give 2)
    assert mmseg_resize(img, 100, 2).shape == (2, 3, 3)
    # f = min(2048 / 1000, 336 / 333): 1000 * f = 1009.009 -> 1009 (rounding, not ceil)
    img = np.zeros((333, 1000, 3), np.uint8)
    assert mmseg_resize(img, 2048, 336).shape == (336, 1009, 3)
    # the long side limits: f = min(600 / 1000, 336 / 100) = 0.6
    img = np.zeros((100, 1000, 3), np.uint8)
    assert mmseg_resize(img, 600, 336).shape == (60, 600, 3)
    # f = min(7 / 10, 7 / 7) = 0.7: width 7 * 0.7 = 4.9 -> 5 (truncation would give 4)
    img = np.zeros((10, 7, 3), np.uint8)
    assert mmseg_resize(img, 7, 7).shape == (7, 5, 3)


def test_mmseg_resize_upscales_and_validates():
    img = np.random.default_rng(1).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    out = mmseg_resize(img, 2048, 448)
    assert out.shape == (448, 672, 3)
    np.testing.assert_array_equal(out, cv2.resize(img, (672, 448), interpolation=cv2.INTER_LINEAR))
    with pytest.raises(ValueError):
        mmseg_resize(img.astype(np.float32), 2048, 448)
    with pytest.raises(ValueError):
        mmseg_resize(img[..., 0], 2048, 448)
    with pytest.raises(ValueError):
        mmseg_resize(np.zeros((2, 500, 3), np.uint8), 10, 10)  # f = 0.02: height would round to 0


# -- slide_cosine_maps -------------------------------------------------------------------------------


def test_slide_independent_of_window_batch():
    img, text, enc = image(72, 100), text_embeddings(), make_encoder()
    outs = [slide_cosine_maps(img, enc, text, 32, 16, (90, 125), window_batch=b) for b in (1, 3, 64)]
    assert outs[0].shape == (1, 5, 90, 125) and outs[0].dtype == torch.float32
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-6, rtol=0)


def test_slide_batches_windows():
    img, text, enc = image(72, 100), text_embeddings(), make_encoder()
    n = len(sliding_windows(72, 100, 32, 16))
    slide_cosine_maps(img, enc, text, 32, 16, (72, 100), window_batch=4)
    assert enc.calls == [4] * (n // 4) + ([n % 4] if n % 4 else [])


@pytest.mark.parametrize("crop,stride", [(32, 16), (40, 24), (24, 24), (64, 8)])
def test_slide_matches_one_window_loop(crop, stride):
    img, text, enc = image(64, 88), text_embeddings(), make_encoder()
    ours = slide_cosine_maps(img, enc, text, crop, stride, (50, 70), window_batch=5)
    ref = reference_slide(img, enc, text, crop, stride, (50, 70))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_slide_whole_image_when_crop_covers_it():
    img, text, enc = image(48, 64), text_embeddings(), make_encoder()
    feats = enc(img)
    direct = F.interpolate(torch.einsum("bdhw,nd->bnhw", feats, text), size=(48, 64), mode="bilinear")
    direct = F.interpolate(direct, size=(30, 41), mode="bilinear")
    for crop in (0, 64, 100, None):
        out = slide_cosine_maps(img, enc, text, crop, 32, (30, 41))
        torch.testing.assert_close(out, direct, atol=1e-6, rtol=0)


def test_slide_pad_to_patch():
    img, text, enc = image(60, 70), text_embeddings(), make_encoder()
    # 36 is not a multiple of the patch: windows are padded to 40 (2 px each side) and cut back
    feats = encode_windows(img, enc, 36, 20, window_batch=3, pad_to_patch=PATCH)
    assert feats.padding == (2, 2, 2, 2) and feats.window_size == (36, 36)
    assert feats.features.shape == (len(sliding_windows(60, 70, 36, 20)), 6, 5, 5)
    out = assemble_cosine_maps(feats, text, (45, 52))
    assert out.shape == (1, 5, 45, 52)
    ref = reference_slide(img, enc, text, 36, 20, (45, 52), pad_to_patch=PATCH)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # without padding the same crop gives something else (the patch grid moves)
    plain = slide_cosine_maps(img, enc, text, 36, 20, (45, 52))
    assert not torch.allclose(plain, out, atol=1e-3)


def test_slide_pad_to_patch_multiple_is_noop():
    img, text, enc = image(64, 80), text_embeddings(), make_encoder()
    a = slide_cosine_maps(img, enc, text, 32, 16, (64, 80), pad_to_patch=PATCH)
    b = slide_cosine_maps(img, enc, text, 32, 16, (64, 80))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_slide_low_precision_encoder_gives_float32():
    img, text = image(48, 64), text_embeddings()
    out = slide_cosine_maps(img, make_encoder(out_dtype=torch.bfloat16), text, 32, 16, (48, 64))
    ref = slide_cosine_maps(img, make_encoder(), text, 32, 16, (48, 64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)


def test_assemble_chunking_does_not_change_results():
    img, text, enc = image(72, 100), text_embeddings(), make_encoder()
    feats = encode_windows(img, enc, 32, 16)
    a = assemble_cosine_maps(feats, text, (72, 100))
    b = assemble_cosine_maps(feats, text, (72, 100), max_chunk_elements=1)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_slide_progress_and_errors():
    img, text, enc = image(48, 64), text_embeddings(), make_encoder()
    seen = []
    slide_cosine_maps(img, enc, text, 32, 16, (48, 64), window_batch=4, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(4, 6), (6, 6)]
    with pytest.raises(ValueError, match="uncovered"):
        slide_cosine_maps(img, enc, text, 16, 24, (48, 64))
    with pytest.raises(ValueError):
        slide_cosine_maps(img, enc, text_embeddings(dim=7), 32, 16, (48, 64))
    with pytest.raises(ValueError):
        slide_cosine_maps(img, enc, text, 32, 16, (48, 64), window_batch=0)
    with pytest.raises(ValueError):
        slide_cosine_maps(img[0], enc, text, 32, 16, (48, 64))


# -- cosine_to_labels --------------------------------------------------------------------------------


def test_softmax_over_names_then_max_per_class():
    # class 1 has two names; their summed probability beats class 0, their max does not
    cosine = torch.tensor([0.30, 0.28, 0.28]).view(3, 1, 1).repeat(1, 2, 2)
    name_to_class = torch.tensor([0, 1, 1])
    labels, probs = cosine_to_labels(cosine, name_to_class, logit_scale=10.0)
    assert probs.shape == (2, 2, 2) and labels.dtype == torch.int64
    p = torch.softmax(torch.tensor([3.0, 2.8, 2.8]), 0)
    torch.testing.assert_close(probs[:, 0, 0], torch.stack([p[0], p[1:].max()]))
    assert (labels == 0).all()
    # one name per class is the plain softmax
    labels, probs = cosine_to_labels(cosine, torch.tensor([0, 1, 2]), logit_scale=10.0)
    torch.testing.assert_close(probs[:, 0, 0], p)


def test_names_of_a_class_need_not_be_adjacent():
    cosine = torch.randn(5, 4, 6, generator=torch.Generator().manual_seed(0))
    name_to_class = torch.tensor([1, 0, 2, 1, 0])
    _, probs = cosine_to_labels(cosine, name_to_class, logit_scale=40)
    soft = (cosine * 40).softmax(0)
    expected = torch.stack([soft[name_to_class == c].max(0).values for c in range(3)])
    torch.testing.assert_close(probs, expected, atol=0, rtol=0)


def test_prob_thd_sends_unsure_pixels_to_class_0():
    cosine = torch.zeros(3, 1, 2)
    cosine[2, 0, 1] = 1.0  # confident class 2 at the second pixel, flat at the first
    labels, probs = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0, prob_thd=0.5)
    assert labels.tolist() == [[0, 2]]
    labels, _ = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0, prob_thd=0.0)
    assert labels[0, 1] == 2


def _area_case(n_small, n_big, n_bg):
    """1 x (n_bg + n_big + n_small) strip: background, then class 1, then class 2 whose runner-up is 1."""
    n = n_bg + n_big + n_small
    cosine = torch.zeros(3, 1, n)
    cosine[0, 0, :n_bg] = 1.0
    cosine[1, 0, n_bg : n_bg + n_big] = 1.0
    cosine[2, 0, n_bg + n_big :] = 1.0
    cosine[1, 0, n_bg + n_big :] = 0.9  # runner-up of the small class is class 1, not background
    return cosine


def test_area_thd_drops_small_class_to_next_best():
    # a_2 = 4, T = 36 + 4 = 40 foreground pixels: 4 <= 0.1 * 40, dropped (boundary case)
    cosine = _area_case(n_small=4, n_big=36, n_bg=60)
    labels, probs = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0, area_thd=0.1)
    assert (probs[2] == 0).all()
    assert labels[0, 96:].tolist() == [1] * 4
    assert labels[0, :60].eq(0).all() and labels[0, 60:96].eq(1).all()
    # without the rule those pixels are class 2
    labels, _ = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0)
    assert labels[0, 96:].tolist() == [2] * 4


def test_area_thd_counts_foreground_pixels_only():
    # a_2 = 5 > 0.1 * 41 = 4.1 is kept, though it is < 0.1 * 101 image pixels
    cosine = _area_case(n_small=5, n_big=36, n_bg=60)
    labels, probs = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0, area_thd=0.1)
    assert labels[0, 96:].tolist() == [2] * 5
    assert (probs[2] > 0).any()


def test_area_thd_never_drops_background_and_combines_with_prob_thd():
    # background is tiny but stays; class 2 is dropped, its pixels go to class 1 then the prob threshold
    cosine = _area_case(n_small=2, n_big=50, n_bg=1)
    labels, probs = cosine_to_labels(cosine, torch.arange(3), logit_scale=10.0, area_thd=0.1, prob_thd=0.5)
    assert labels[0, 0] == 0 and (probs[0] > 0).all()
    # runner-up class 1 has probability e^9 / (1 + e^9 + e^10) < 0.5 on the dropped pixels
    assert labels[0, 51:].tolist() == [0, 0]


def test_cosine_to_labels_validation():
    with pytest.raises(ValueError):
        cosine_to_labels(torch.zeros(3, 4), torch.arange(3), 40)
    with pytest.raises(ValueError):
        cosine_to_labels(torch.zeros(3, 2, 2), torch.arange(4), 40)
    with pytest.raises(ValueError):
        cosine_to_labels(torch.zeros(3, 2, 2), torch.tensor([0, -1, 1]), 40)
