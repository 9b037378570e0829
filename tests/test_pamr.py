import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ovdense.pamr import pamr


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def slow_pamr(image, masks, iterations, dilations, std_per_dilation=False):
    """The formula pixel by pixel in float64 (NACLIP's pamr.py semantics, written from the paper + code).

    Per pixel and image channel, the unbiased std is taken over the 3 x 3 neighbourhoods of all dilations
    together (centre counted once per dilation); borders replicate; updates use the 8 neighbours only.
    """
    img = image[0].double().numpy()
    m = F.interpolate(masks.double(), size=image.shape[-2:], mode="bilinear", align_corners=True)[0].numpy()
    ch, h, w = img.shape
    offsets = [(dy * d, dx * d) for d in dilations for dy, dx in itertools.product((-1, 0, 1), repeat=2)]
    neighbours = [o for i, o in enumerate(offsets) if i % 9 != 4]

    def at(arr, y, x):
        return arr[:, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    aff = np.zeros((len(neighbours), h, w))
    for y in range(h):
        for x in range(w):
            window = np.stack([at(img, y + dy, x + dx) for dy, dx in offsets], axis=1)  # ch x 9*len(d)
            std = window.std(axis=1, ddof=1)
            logits = []
            for p, (dy, dx) in enumerate(neighbours):
                if std_per_dilation:  # the variant NACLIP does *not* use
                    std = window[:, 9 * (p // 8) : 9 * (p // 8 + 1)].std(axis=1, ddof=1)
                diff = np.abs(img[:, y, x] - at(img, y + dy, x + dx))
                logits.append(np.mean(-diff / (1e-8 + 0.1 * std)))
            logits = np.array(logits)
            e = np.exp(logits - logits.max())
            aff[:, y, x] = e / e.sum()
    for _ in range(iterations):
        new = np.zeros_like(m)
        for y in range(h):
            for x in range(w):
                for p, (dy, dx) in enumerate(neighbours):
                    new[:, y, x] += aff[p, y, x] * at(m, y + dy, x + dx)
        m = new
    return torch.from_numpy(m)[None]


def test_shape_and_dtype():
    out = pamr(rand(1, 3, 12, 10), rand(1, 4, 6, 5, seed=1), iterations=2, dilations=(1, 2))
    assert out.shape == (1, 4, 12, 10) and out.dtype == torch.float32
    out = pamr(rand(1, 3, 12, 10).half(), rand(1, 4, 12, 10, seed=1).half(), iterations=1, dilations=(1,))
    assert out.dtype == torch.float32


def test_zero_iterations_is_the_resized_masks():
    masks = rand(1, 3, 5, 4, seed=1)
    out = pamr(rand(1, 3, 11, 9), masks, iterations=0, dilations=(1, 2))
    expected = F.interpolate(masks, size=(11, 9), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_constant_image_averages_neighbours():
    masks = rand(1, 2, 8, 9, seed=3)
    image = torch.full((1, 3, 8, 9), 0.7)
    out = pamr(image, masks, iterations=1, dilations=(1, 3))
    padded = [F.pad(masks, [d] * 4, mode="replicate") for d in (1, 3)]
    shifted = [
        p[:, :, d + dy * d : d + dy * d + 8, d + dx * d : d + dx * d + 9]
        for d, p in zip((1, 3), padded, strict=True)
        for dy, dx in itertools.product((-1, 0, 1), repeat=2)
        if (dy, dx) != (0, 0)
    ]
    torch.testing.assert_close(out, torch.stack(shifted).mean(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dilations,iterations", [((1, 2), 3), ((1,), 2), ((2, 8), 2)])
def test_matches_pixel_loop(dilations, iterations):
    # dilation 8 on a 6 x 7 image reaches past every border: replicate padding throughout
    image = rand(1, 3, 6, 7, seed=4)
    masks = rand(1, 3, 4, 5, seed=5)
    out = pamr(image, masks, iterations=iterations, dilations=dilations)
    expected = slow_pamr(image, masks, iterations, dilations).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_std_spans_all_dilations():
    # NACLIP's std pools the neighbourhoods of all dilations; a per-dilation std gives other affinities.
    image = torch.zeros(1, 3, 6, 7)
    image[:, :, :, 3:] = 1.0
    image[:, 0, 2, 1] = 5.0
    masks = rand(1, 2, 6, 7, seed=6)
    out = pamr(image, masks, iterations=1, dilations=(1, 2))
    torch.testing.assert_close(out, slow_pamr(image, masks, 1, (1, 2)).float(), atol=1e-5, rtol=1e-5)
    per_dilation = slow_pamr(image, masks, 1, (1, 2), std_per_dilation=True).float()
    assert (out - per_dilation).abs().max() > 1e-2


def test_refinement_follows_edges():
    # two flat regions: a mask value spreads inside its region and not across the edge
    image = torch.zeros(1, 3, 10, 10)
    image[:, :, :, 5:] = 1.0
    image += 0.01 * rand(1, 3, 10, 10, seed=7)
    masks = torch.zeros(1, 1, 10, 10)
    masks[:, :, :, :5] = 1.0
    out = pamr(image, masks, iterations=10, dilations=(1, 2))
    assert out[0, 0, :, :5].min() > 0.95
    assert out[0, 0, :, 5:].max() < 0.05


def test_validation():
    with pytest.raises(ValueError):
        pamr(rand(3, 6, 7), rand(1, 2, 6, 7))
    with pytest.raises(ValueError):
        pamr(rand(1, 3, 6, 7), rand(1, 2, 6, 7), iterations=-1)
    with pytest.raises(ValueError):
        pamr(rand(1, 3, 6, 7), rand(1, 2, 6, 7), dilations=(0,))
    with pytest.raises(ValueError):
        pamr(rand(1, 3, 6, 7), rand(1, 2, 6, 7), dilations=())
