"""SCD's Refiner on the tiny random CLIPs: identity start, frozen tokens, zoomed targets, loss, checkpoints."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.models.vision_transformer import Block
from torchvision.ops import roi_align

from ovdense.errors import OvdenseError
from ovdense.heads import PassInputs
from ovdense.methods import create_head
from ovdense.regions import crop_inputs
from ovdense.train.data import DistillDataset
from ovdense.train.losses import token_infonce_loss
from ovdense.train.refiner import (
    REFINER_FORMAT,
    Refiner,
    frozen_dense_tokens,
    load_refiner,
    refined_dense_map,
    refiner_loss,
    resized_crop_hw,
    save_refiner,
    valid_grid_boxes,
    zoomed_targets,
)
from ovdense.weights import load_model

MODELS = ("ovdense-test-vit", "ovdense-test-eva02")


@pytest.fixture(scope="module", params=MODELS)
def loaded(request):
    # Own copies, frozen as the Refiner's stage freezes them: the session fixtures are shared with other tests.
    m = load_model(request.param)
    m.model.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def vit():
    m = load_model("ovdense-test-vit")
    m.model.requires_grad_(False)
    return m


def _images(b: int = 2, h: int = 64, w: int = 48, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _refiner(tower, seed: int = 0, depth: int = 2) -> Refiner:
    torch.manual_seed(seed)
    return Refiner(tower.width, tower.num_heads, depth=depth)


def _perturb(refiner: Refiner, seed: int = 1) -> Refiner:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        refiner.proj.weight.copy_(torch.randn(refiner.proj.weight.shape, generator=g) * 0.05)
    return refiner


# -- module -------------------------------------------------------------------------------------------------------


def test_refiner_starts_as_the_identity():
    refiner = Refiner(64, 4, depth=3, mlp_ratio=2.0)
    assert (refiner.width, refiner.num_heads, refiner.depth, refiner.mlp_ratio) == (64, 4, 3, 2.0)
    assert len(refiner.blocks) == 3 and all(isinstance(b, Block) for b in refiner.blocks)
    assert sum(isinstance(m, Block) for m in refiner.modules()) == 3
    x = torch.randn(2, 12, 64) * 10
    assert torch.equal(refiner(x), x)
    _perturb(refiner)
    y = refiner(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() > 1e-3


def test_refiner_rejects_bad_config_and_tokens():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        Refiner(64, 5)
    with pytest.raises(ValueError, match="depth"):
        Refiner(64, 4, depth=0)
    with pytest.raises(ValueError, match="B x N x 64"):
        Refiner(64, 4)(torch.zeros(2, 3, 32))


# -- dense maps ---------------------------------------------------------------------------------------------------


def test_frozen_dense_tokens_are_maskclip_before_projection(loaded):
    tower = loaded.tower
    images = _images()
    tokens, grid = frozen_dense_tokens(tower, images, "size")
    assert grid == (4, 3)
    assert tokens.shape == (2, 12, tower.width)
    assert not tokens.requires_grad
    projected = tower.project(tokens)
    as_map = projected.transpose(1, 2).reshape(2, -1, *grid)
    ref = create_head("maskclip").encode_dense(tower, images, PassInputs("size"), normalize=False)
    torch.testing.assert_close(as_map, ref, rtol=1e-5, atol=1e-5)


def test_refined_dense_map_identity_and_gradient_flow(loaded):
    tower = loaded.tower
    images = _images(seed=1)
    refiner = _refiner(tower)
    dense = refined_dense_map(refiner, tower, images, "size", normalize=True)
    ref = create_head("maskclip").encode_dense(tower, images, PassInputs("size"), normalize=True)
    assert dense.shape == ref.shape == (2, tower.out_dim, 4, 3)
    torch.testing.assert_close(dense, ref, rtol=1e-5, atol=1e-5)

    raw = refined_dense_map(refiner, tower, images, "size", normalize=False)
    ref = create_head("maskclip").encode_dense(tower, images, PassInputs("size"), normalize=False)
    torch.testing.assert_close(raw, ref)

    # A target the identity does not already meet, so the loss has a gradient.
    target = torch.randn(dense.shape, generator=torch.Generator().manual_seed(2))
    (dense * target).sum().backward()
    assert all(p.grad is not None for p in refiner.parameters())
    # Only the zero-initialised projection gets a non-zero gradient at the start: the blocks sit behind it.
    assert refiner.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in tower.parameters())
    refiner.zero_grad()


# -- zoomed targets -----------------------------------------------------------------------------------------------


def test_resized_crop_hw_matches_crop_inputs():
    # A uniform, bright image: every pixel of the resized crop differs from the black padding.
    image = np.zeros((37, 53, 3), np.uint8)
    image[...] = (200, 120, 40)
    boxes = np.array(
        [
            [0.0, 0.0, 53.0, 37.0],
            [2.5, 3.5, 20.5, 9.5],  # ties round to even: 2, 4, 20, 10
            [10.4, 0.6, 13.7, 36.2],
            [0.0, 5.0, 53.0, 6.0],
            [7.3, 7.3, 29.9, 29.9],
        ],
        np.float32,
    )
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for size in (224, (64, 96)):
        hw = (size, size) if isinstance(size, int) else size
        crops = crop_inputs(image, boxes, hw, mean, std)
        pad = -torch.tensor(mean)[:, None, None] / torch.tensor(std)[:, None, None]
        filled = ((crops - pad).abs() > 1e-3).any(dim=1)  # K x H x W
        rows = filled.any(dim=2).sum(dim=1)
        cols = filled.any(dim=1).sum(dim=1)
        expected = torch.stack([rows, cols], dim=1)
        got = resized_crop_hw(torch.from_numpy(boxes), size)
        assert got.dtype == torch.int64
        assert torch.equal(got, expected)
        assert torch.equal(resized_crop_hw(boxes, size), expected)  # numpy input too
    # Pillow's rounding by hand for the tie box: 6 x 18 pixels -> 224 / 18 scale.
    assert resized_crop_hw(torch.tensor([[2.5, 3.5, 20.5, 9.5]]), 224).tolist() == [[round(6 * 224 / 18), 224]]
    # And the crop itself as Pillow makes it.
    assert Image.fromarray(image).crop((2.5, 3.5, 20.5, 9.5)).size == (18, 6)


def test_valid_grid_boxes_by_hand():
    hw = torch.tensor([[112, 224], [224, 224], [224, 101], [223, 224]])
    got = valid_grid_boxes(hw, 224, 14)
    want = torch.tensor(
        [
            [0.0, 3.5, 14.0, 10.5],
            [0.0, 0.0, 14.0, 14.0],
            [61 * 14 / 224, 0.0, 162 * 14 / 224, 14.0],  # pw = 123: 61 left, 62 right
            [0.0, 0.0, 14.0, 223 * 14 / 224],  # ph = 1: 0 above, 1 below
        ]
    )
    torch.testing.assert_close(got, want)
    # Non-square input and grid.
    torch.testing.assert_close(
        valid_grid_boxes(torch.tensor([[32, 96]]), (64, 96), (4, 6)), torch.tensor([[0.0, 1.0, 6.0, 3.0]])
    )
    with pytest.raises(ValueError, match="1\\.\\.\\(224, 224\\)"):
        valid_grid_boxes(torch.tensor([[0, 224]]), 224, 14)
    with pytest.raises(ValueError, match="K x 2"):
        valid_grid_boxes(torch.tensor([112, 224]), 224, 14)


def test_zoomed_targets_pool_the_valid_area(loaded):
    tower = loaded.tower
    crops = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    hw = torch.tensor([[224, 224], [112, 224], [224, 80]])
    dense = create_head("maskclip").encode_dense(tower, crops, PassInputs("size"), normalize=True)
    grid = dense.shape[-1]
    # n = grid on the full crop: one sample per bin at each token's centre, i.e. the tokens themselves.
    full = zoomed_targets(tower, crops[:1], hw[:1], grid)
    torch.testing.assert_close(full[0], dense[0].flatten(1).T, rtol=1e-5, atol=1e-5)

    n = 4
    targets = zoomed_targets(tower, crops, hw, n)
    assert targets.shape == (3, n * n, tower.out_dim)
    assert not targets.requires_grad
    torch.testing.assert_close(targets.norm(dim=-1), torch.ones(3, n * n))
    boxes = valid_grid_boxes(hw, 224, grid)
    for i in range(3):
        pooled = roi_align(dense[i : i + 1], [boxes[i : i + 1]], (n, n), 1.0, -1, True)
        torch.testing.assert_close(targets[i], F.normalize(pooled[0].flatten(1).T, dim=-1), rtol=1e-5, atol=1e-5)
    # The wide crop's targets come from its middle rows only: pooling the whole map would differ.
    whole = roi_align(dense[1:2], [torch.tensor([[0.0, 0.0, grid, grid]])], (n, n), 1.0, -1, True)
    assert not torch.allclose(targets[1], F.normalize(whole[0].flatten(1).T, dim=-1), atol=1e-3)

    assert zoomed_targets(tower, crops[:0], hw[:0], n).shape == (0, n * n, tower.out_dim)
    with pytest.raises(ValueError, match="crop_hw"):
        zoomed_targets(tower, crops, hw[:2], n)


# -- loss ---------------------------------------------------------------------------------------------------------


def test_token_infonce_loss_against_a_direct_computation():
    g = torch.Generator().manual_seed(4)
    k, t, d, tau = 3, 4, 8, 0.2
    student = torch.randn(k, t, d, generator=g, requires_grad=True)
    target = torch.randn(k, t, d, generator=g, requires_grad=True)
    loss = token_infonce_loss(student, target, tau=tau)

    s = [v / v.norm() for v in student.detach().reshape(-1, d)]
    tt = [v / v.norm() for v in target.detach().reshape(-1, d)]
    total = 0.0
    for i in range(k * t):
        logits = torch.stack([(s[i] * tt[j]).sum() / tau for j in range(k * t)])
        total += -torch.log_softmax(logits, dim=0)[i].item()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert math.isclose(loss.item(), total / (k * t), rel_tol=1e-5)

    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert target.grad is None

    # Well separated targets matched exactly: each row's positive wins by 1 / tau.
    eye = torch.eye(d)[:4].reshape(2, 2, d) * 3.0
    low = token_infonce_loss(eye, eye, tau=tau).item()
    assert low == pytest.approx(math.log(1 + 3 * math.exp(-1 / tau)), rel=1e-5)
    assert low < 0.05 < token_infonce_loss(student.detach(), target.detach(), tau=tau).item()

    with pytest.raises(ValueError, match="same shape"):
        token_infonce_loss(student, target[:, :2])
    with pytest.raises(ValueError, match="K x T x D"):
        token_infonce_loss(student[0], target[0])
    with pytest.raises(ValueError, match="no tokens"):
        token_infonce_loss(student[:0], target[:0])


def _batch(tmp_path, tower):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 80), (90, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    size = tower.preprocess.image_size[0]
    ds = DistillDataset(folder, student_size=64, crop_size=size, max_split=2, max_boxes=3)
    samples, crop_hw = [], []
    for i in range(len(ds)):
        sample = ds[i]
        w, h = Image.open(folder / f"{i}.png").size
        # The dataset's pixel boxes: its grid cells on the original image, drawn from the same generator.
        _, _, normed = ds.sampler.sample(ds.rng(i))
        hw = torch.zeros(ds.max_boxes, 2, dtype=torch.int64)
        hw[: len(normed)] = resized_crop_hw(normed * torch.tensor([w, h, w, h]), size)
        samples.append(sample)
        crop_hw.append(hw)
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("image", "boxes", "box_valid", "crops")}
    batch["crop_hw"] = torch.stack(crop_hw)
    assert batch["box_valid"].sum() >= 3
    return batch


def test_refiner_loss_trains_the_refiner_only(tmp_path, vit):
    tower = vit.tower
    batch = _batch(tmp_path, tower)
    refiner = _refiner(tower)
    before = {k: v.clone() for k, v in vit.model.state_dict().items()}
    args = (batch["image"], batch["boxes"], batch["box_valid"], batch["crops"])

    first = refiner_loss(refiner, tower, *args, batch["crop_hw"])
    valid_only = refiner_loss(refiner, tower, *args, batch["crop_hw"][batch["box_valid"]])
    assert first.dim() == 0 and torch.isfinite(first)
    torch.testing.assert_close(first, valid_only)

    opt = torch.optim.Adam(refiner.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = refiner_loss(refiner, tower, *args, batch["crop_hw"], n=4, tau=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = vit.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tower.parameters())


# -- checkpoints --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path, vit):
    tower = vit.tower
    refiner = _perturb(_refiner(tower, depth=3))
    path = tmp_path / "out" / "refiner.safetensors"
    save_refiner(path, refiner, "ovdense-test-vit", extra={"epochs": 2})
    assert sorted(p.name for p in path.parent.iterdir()) == ["refiner.safetensors"]  # no temp file left

    loaded = load_refiner(path, tower=tower, model_name="ovdense-test-vit")
    assert (loaded.width, loaded.num_heads, loaded.depth, loaded.mlp_ratio) == (64, 4, 3, 4.0)
    assert loaded.model_name == "ovdense-test-vit" and loaded.extra == {"epochs": 2}
    assert not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    own, back = refiner.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    refiner.eval()
    images = _images(seed=5)
    assert torch.equal(refined_dense_map(loaded, tower, images), refined_dense_map(refiner, tower, images))
    # Neither tower nor name: no check.
    assert load_refiner(path).depth == 3

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == REFINER_FORMAT


def _one_line_error(match: str, *args, **kwargs) -> None:
    with pytest.raises(OvdenseError, match=match) as info:
        load_refiner(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_load_refiner_errors(tmp_path, vit):
    tower = vit.tower
    good = tmp_path / "refiner.safetensors"
    save_refiner(good, _refiner(tower), "ovdense-test-vit")

    _one_line_error("not found", tmp_path / "missing.safetensors")

    clip = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in vit.model.state_dict().items()}, str(clip), metadata={"model": "x"})
    _one_line_error("not an ovdense refiner checkpoint", clip)

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:100])
    _one_line_error("cannot read refiner checkpoint", corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    _one_line_error("cannot read refiner checkpoint", garbage)

    _one_line_error("trained on ovdense-test-vit, not ovdense-test-eva02", good, model_name="ovdense-test-eva02")
    _one_line_error("width 64", good, tower=types.SimpleNamespace(width=32))

    # Right format, wrong tensors (a refiner of another depth under this one's metadata).
    from safetensors.torch import save

    other = {k: v.contiguous() for k, v in Refiner(64, 4, depth=1).state_dict().items()}
    meta = {"format": REFINER_FORMAT, "model": "m", "width": "64", "num_heads": "4", "depth": "2", "mlp_ratio": "4.0"}
    mismatched = tmp_path / "mismatched.safetensors"
    mismatched.write_bytes(save(other, metadata=meta))
    _one_line_error("does not fit", mismatched)
    bad_meta = tmp_path / "bad_meta.safetensors"
    bad_meta.write_bytes(save(other, metadata={**meta, "width": "wide"}))
    _one_line_error("bad metadata", bad_meta)


def test_zoomed_targets_do_not_depend_on_the_chunk_size():
    from ovdense.train.refiner import zoomed_targets

    tower = load_model("ovdense-test-vit").tower
    crops = torch.randn(5, 3, 224, 224)
    hw = torch.tensor([[224, 224], [112, 224], [224, 100], [224, 224], [60, 224]])
    a = zoomed_targets(tower, crops, hw, 2)
    b = zoomed_targets(tower, crops, hw, 2, chunk=2)
    torch.testing.assert_close(a, b)
