"""Losses of DeCLIP and SCD against direct, independently written computations on small random tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ovdense.train.losses import (
    CONTEXT_TAU,
    MINMAX_EPS,
    RCC_TAU,
    SCD_TAU,
    attention_chain,
    content_loss_roi,
    content_loss_tokens,
    context_loss_kl,
    context_loss_l2,
    cosine_affinity,
    minmax_rows,
    pool_roi_tokens,
    rcc_loss,
    resize_attention,
    resize_tokens,
    scd_loss,
    sd_guided_affinity,
    student_context_affinity,
    weighted_total,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _row_stochastic(b: int, n: int, seed: int) -> torch.Tensor:
    """B x N x N positive maps whose rows sum to 1."""
    a = torch.rand(b, n, n, generator=_gen(seed)) + 0.05
    return a / a.sum(-1, keepdim=True)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two 1-D vectors by explicit sums."""
    return float((a * b).sum() / (math.sqrt(float((a * a).sum())) * math.sqrt(float((b * b).sum()))))


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """n_out x n_in matrix of 1-D bilinear resizing, align_corners=False (PyTorch's rule, written out)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[i, i0] += 1.0 - lam
        m[i, i1] += lam
    return m


def _grid_matrix(src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """(H*W) x (h*w) matrix of 2-D bilinear resizing on row-major token grids."""
    return torch.kron(_bilinear_matrix(src[0], dst[0]), _bilinear_matrix(src[1], dst[1]))


# ----------------------------------------------------------------------------------------------------------------------
# Affinities
# ----------------------------------------------------------------------------------------------------------------------


def test_cosine_affinity_matches_explicit_dot_products():
    x = _randn(2, 5, 7, seed=1)
    s = cosine_affinity(x)
    assert s.shape == (2, 5, 5) and s.dtype == torch.float32
    for b in range(2):
        for m in range(5):
            for n in range(5):
                assert s[b, m, n].item() == pytest.approx(_cos(x[b, m].double(), x[b, n].double()), abs=1e-6)


def test_cosine_affinity_casts_half_to_fp32():
    x = _randn(1, 4, 3, seed=2).half()
    assert cosine_affinity(x).dtype == torch.float32


def test_student_context_affinity_qq_and_csa():
    q = _randn(2, 6, 8, seed=3)
    k = _randn(2, 6, 8, seed=4)
    qq = student_context_affinity(q)
    csa = student_context_affinity(q, k)
    s_k = torch.zeros(2, 6, 6, dtype=torch.float64)
    s_q = torch.zeros(2, 6, 6, dtype=torch.float64)
    for b in range(2):
        for m in range(6):
            for n in range(6):
                s_q[b, m, n] = _cos(q[b, m].double(), q[b, n].double())
                s_k[b, m, n] = _cos(k[b, m].double(), k[b, n].double())
    torch.testing.assert_close(qq.double(), s_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(csa.double(), (s_q + s_k) / 2, atol=1e-6, rtol=0)
    assert not torch.allclose(csa, qq, atol=1e-3)
    for s in (qq, csa):
        torch.testing.assert_close(s, s.transpose(1, 2))
        torch.testing.assert_close(torch.diagonal(s, dim1=1, dim2=2), torch.ones(2, 6))


def test_student_context_affinity_rejects_mismatched_k():
    with pytest.raises(ValueError, match="same shape"):
        student_context_affinity(_randn(1, 4, 3), _randn(1, 5, 3))


def test_resize_tokens_identity_returns_input():
    x = _randn(2, 6, 3, seed=5)
    assert resize_tokens(x, (2, 3), (2, 3)) is x


def test_resize_tokens_matches_separable_bilinear():
    b, c, src, dst = 2, 3, (2, 3), (5, 4)
    x = _randn(b, src[0] * src[1], c, seed=6, dtype=torch.float64)
    out = resize_tokens(x, src, dst)
    assert out.shape == (b, dst[0] * dst[1], c) and out.dtype == torch.float64
    # Token grid laid out row-major: resizing is (M_h kron M_w) applied to the token axis.
    expected = torch.einsum("pq,bqc->bpc", _grid_matrix(src, dst), x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_resize_tokens_hand_example():
    # 1 x 2 grid -> 1 x 4: source positions -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
    x = torch.tensor([[[0.0], [4.0]]])
    out = resize_tokens(x, (1, 2), (1, 4))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.0, 1.0, 3.0, 4.0]))


def test_resize_tokens_rejects_wrong_grid():
    with pytest.raises(ValueError, match="3 x 3 grid"):
        resize_tokens(_randn(1, 8, 2), (3, 3), (4, 4))


# ----------------------------------------------------------------------------------------------------------------------
# Context losses
# ----------------------------------------------------------------------------------------------------------------------


def test_context_loss_l2_equals_per_row_norm_loop():
    t = _randn(2, 5, 5, seed=7)
    s = _randn(2, 5, 5, seed=8)
    rows = [torch.linalg.norm((t[b, i] - s[b, i]).double()) for b in range(2) for i in range(5)]
    expected = sum(float(r) for r in rows) / len(rows)
    loss = context_loss_l2(t, s)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert context_loss_l2(t, t.clone()).item() == 0.0


def _kl_rows(t: torch.Tensor, s: torch.Tensor, tau: float) -> float:
    """Mean over rows of KL(softmax(t/tau) || softmax(s/tau)), one row at a time with F.kl_div."""
    t, s = t.double().reshape(-1, t.shape[-1]), s.double().reshape(-1, s.shape[-1])
    vals = []
    for i in range(t.shape[0]):
        p_t = torch.exp(t[i] / tau) / torch.exp(t[i] / tau).sum()
        log_p_s = s[i] / tau - torch.log(torch.exp(s[i] / tau).sum())
        vals.append(float(F.kl_div(log_p_s, p_t, reduction="sum")))
    return sum(vals) / len(vals)


def test_context_loss_kl_equals_manual_sum():
    t = cosine_affinity(_randn(2, 6, 4, seed=9))
    s = cosine_affinity(_randn(2, 6, 4, seed=10))
    loss = context_loss_kl(t, s)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(_kl_rows(t, s, CONTEXT_TAU), rel=1e-5)
    assert loss.item() > 0.0
    assert context_loss_kl(t, t.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_context_loss_kl_temperature_matters():
    t = cosine_affinity(_randn(1, 6, 4, seed=11))
    s = cosine_affinity(_randn(1, 6, 4, seed=12))
    sharp = context_loss_kl(t, s, tau=0.1).item()
    soft = context_loss_kl(t, s, tau=1.0).item()
    assert soft == pytest.approx(_kl_rows(t, s, 1.0), rel=1e-5)
    assert sharp == pytest.approx(_kl_rows(t, s, 0.1), rel=1e-5)
    # Not monotone in general (the unit diagonal dominates both rows at low tau), but it must change.
    assert abs(sharp - soft) > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# SD-guided affinity
# ----------------------------------------------------------------------------------------------------------------------


def test_attention_chain_is_row_stochastic_product():
    maps = [_row_stochastic(2, 5, seed) for seed in (13, 14, 15)]
    chain = attention_chain(maps)
    assert chain.shape == (2, 5, 5)
    torch.testing.assert_close(chain.sum(-1), torch.ones(2, 5), atol=1e-5, rtol=0)
    for b in range(2):
        expected = torch.linalg.multi_dot([m[b].double() for m in maps])
        torch.testing.assert_close(chain[b].double(), expected, atol=1e-6, rtol=0)
    # Order matters: left to right, not right to left.
    reverse = maps[2][0].double() @ maps[1][0].double() @ maps[0][0].double()
    assert not torch.allclose(chain[0].double(), reverse, atol=1e-4)


def test_attention_chain_single_and_empty():
    a = _row_stochastic(1, 4, 16)
    torch.testing.assert_close(attention_chain([a]), a)
    with pytest.raises(ValueError):
        attention_chain([])


@pytest.mark.parametrize(("src", "dst"), [((4, 4), (3, 3)), ((2, 3), (4, 5)), ((4, 2), (4, 2))])
def test_resize_attention_matches_bilinear_on_both_axes(src, dst):
    n = src[0] * src[1]
    attn = _row_stochastic(2, n, 17)
    out = resize_attention(attn, src, dst)
    big = dst[0] * dst[1]
    assert out.shape == (2, big, big) and out.dtype == torch.float32
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, big), atol=1e-5, rtol=0)
    m = _grid_matrix(src, dst)
    raw = m @ attn.double() @ m.T
    expected = raw / raw.sum(-1, keepdim=True)
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=0)


def test_resize_attention_identity_on_same_grid():
    attn = _row_stochastic(2, 6, 18)
    torch.testing.assert_close(resize_attention(attn, (2, 3), (2, 3)), attn, atol=1e-6, rtol=0)


def test_sd_guided_affinity_is_batched_product():
    chain = _row_stochastic(2, 5, 19)
    s_vfm = cosine_affinity(_randn(2, 5, 3, seed=20))
    out = sd_guided_affinity(chain, s_vfm)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                expected = sum(float(chain[b, i, k]) * float(s_vfm[b, k, j]) for k in range(5))
                assert out[b, i, j].item() == pytest.approx(expected, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Content losses
# ----------------------------------------------------------------------------------------------------------------------


def test_content_loss_roi_is_one_minus_mean_cosine_over_all_boxes():
    s = _randn(7, 5, seed=21) * 3.0
    t = _randn(7, 5, seed=22) * 0.5
    expected = 1.0 - sum(_cos(s[i].double(), t[i].double()) for i in range(7)) / 7
    loss = content_loss_roi(s, t)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert content_loss_roi(t * 4.0, t).item() == pytest.approx(0.0, abs=1e-6)


def test_pool_roi_tokens_equal_tokens_give_that_token():
    token = _randn(3, 4, seed=23)
    tokens = token[:, None, :].expand(3, 9, 4).clone()
    pooled = pool_roi_tokens(tokens, _randn(3, 4, seed=24))
    torch.testing.assert_close(pooled, token)


def test_pool_roi_tokens_hand_example():
    # Token 0 points along the teacher (cos 1), token 1 is orthogonal (cos 0): weights e/(e+1), 1/(e+1).
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    teacher = torch.tensor([[5.0, 0.0]])
    e = math.e
    expected = torch.tensor([[e / (e + 1), 2.0 / (e + 1)]])
    torch.testing.assert_close(pool_roi_tokens(tokens, teacher), expected)


def test_content_loss_tokens_matches_explicit_pooling():
    s = _randn(4, 9, 6, seed=25)
    t = _randn(4, 6, seed=26)
    total = 0.0
    for k in range(4):
        cos = torch.tensor([_cos(s[k, j].double(), t[k].double()) for j in range(9)], dtype=torch.float64)
        w = torch.exp(cos) / torch.exp(cos).sum()
        pooled = sum(w[j] * s[k, j].double() for j in range(9))
        total += _cos(pooled, t[k].double())
    loss = content_loss_tokens(s, t)
    assert loss.item() == pytest.approx(1.0 - total / 4, abs=1e-6)


def _cos_matrix(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    return torch.tensor([[_cos(x[i].double(), x[j].double()) for j in range(n)] for i in range(n)])


def test_rcc_loss_equals_manual_kl():
    s = _randn(3, 4, 6, seed=27)
    v = _randn(3, 4, 5, seed=28)
    per_region = [_kl_rows(_cos_matrix(v[k]), _cos_matrix(s[k]), RCC_TAU) for k in range(3)]
    loss = rcc_loss(s, v)
    assert loss.item() == pytest.approx(sum(per_region) / 3, rel=1e-5)
    assert loss.item() > 0


def test_rcc_loss_zero_for_rotated_tokens():
    v = _randn(3, 9, 6, seed=29, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(_randn(6, 6, seed=30, dtype=torch.float64))
    s = (v @ rotation) * 2.5  # a rotation and a scale keep every cosine
    assert rcc_loss(s, v).item() == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# SCD
# ----------------------------------------------------------------------------------------------------------------------


def _scd_direct(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    """SCD cross-entropy one row at a time, float64, no shared code with the implementation."""
    total, rows = 0.0, 0
    for b in range(s.shape[0]):
        n = s.shape[1]
        for i in range(n):
            ls = torch.tensor([_cos(s[b, i].double(), s[b, j].double()) for j in range(n)], dtype=torch.float64)
            lt = torch.tensor([_cos(t[b, i].double(), t[b, j].double()) for j in range(n)], dtype=torch.float64)
            ls = (ls - ls.min()) / (ls.max() - ls.min() + MINMAX_EPS)
            lt = (lt - lt.min()) / (lt.max() - lt.min() + MINMAX_EPS)
            p_t = torch.exp(lt / tau) / torch.exp(lt / tau).sum()
            p_s = torch.exp(ls / tau) / torch.exp(ls / tau).sum()
            total += float(-(p_t * torch.log(p_s)).sum())
            rows += 1
    return total / rows


def _entropy_of_target(t: torch.Tensor, tau: float) -> float:
    total, rows = 0.0, 0
    for b in range(t.shape[0]):
        lt = minmax_rows(_cos_matrix(t[b]).double())
        for i in range(t.shape[1]):
            p = torch.exp(lt[i] / tau) / torch.exp(lt[i] / tau).sum()
            total += float(-(p * torch.log(p)).sum())
            rows += 1
    return total / rows


def test_scd_loss_equals_direct_computation():
    s = _randn(2, 6, 5, seed=31)
    t = _randn(2, 6, 7, seed=32)
    loss = scd_loss(s, t)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    # KL = the cross-entropy of docs/design.md "SCD and the Refiner (ours)" minus the target's entropy
    # (a constant of the target)
    expected = _scd_direct(s, t, SCD_TAU) - _entropy_of_target(t, SCD_TAU)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
    expected = _scd_direct(s, t, 1.0) - _entropy_of_target(t, 1.0)
    assert scd_loss(s, t, tau=1.0).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_scd_loss_is_zero_when_correlations_agree():
    t = _randn(2, 6, 5, seed=33)
    s_other = _randn(2, 6, 5, seed=34)
    at_target = scd_loss(t.clone(), t).item()
    assert at_target == pytest.approx(0.0, abs=1e-6)
    assert at_target < scd_loss(s_other, t).item()
    # Correlations are what count: a rotated, rescaled copy of the target is at the minimum too.
    rotation, _ = torch.linalg.qr(_randn(5, 5, seed=35, dtype=torch.float64))
    assert scd_loss((t.double() @ rotation).float() * 3.0, t).item() == pytest.approx(at_target, abs=1e-6)


def test_minmax_rows_maps_to_unit_interval_and_ignores_positive_affine_changes():
    x = _randn(3, 4, 7, seed=36)
    y = minmax_rows(x)
    assert (y >= 0).all() and (y <= 1).all()
    torch.testing.assert_close(y.amin(-1), torch.zeros(3, 4))
    torch.testing.assert_close(y.amax(-1), torch.ones(3, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(minmax_rows(x * 2.5 + 7.0), y, atol=1e-5, rtol=0)
    # A constant row (all tokens alike) stays finite: all zeros instead of 0 / 0.
    const = minmax_rows(torch.full((2, 5), 0.3))
    assert torch.isfinite(const).all() and (const == 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------------------


def _aff(seed: int) -> torch.Tensor:
    return cosine_affinity(_randn(2, 5, 4, seed=seed))


GRAD_CASES = {
    "context_l2": (lambda s, t: context_loss_l2(t, s), lambda: _aff(40), lambda: _aff(41)),
    "context_kl": (lambda s, t: context_loss_kl(t, s), lambda: _aff(42), lambda: _aff(43)),
    "content_roi": (content_loss_roi, lambda: _randn(6, 4, seed=44), lambda: _randn(6, 4, seed=45)),
    "content_tokens": (content_loss_tokens, lambda: _randn(3, 9, 4, seed=46), lambda: _randn(3, 4, seed=47)),
    "pool_tokens": (
        lambda s, t: pool_roi_tokens(s, t).square().sum(),
        lambda: _randn(3, 9, 4, seed=48),
        lambda: _randn(3, 4, seed=49),
    ),
    "rcc": (rcc_loss, lambda: _randn(3, 9, 4, seed=50), lambda: _randn(3, 9, 6, seed=51)),
    "scd": (scd_loss, lambda: _randn(2, 6, 4, seed=52), lambda: _randn(2, 6, 8, seed=53)),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_teacher_gets_no_gradient_and_student_does(name):
    fn, make_student, make_teacher = GRAD_CASES[name]
    student = make_student().requires_grad_(True)
    teacher = make_teacher().requires_grad_(True)
    loss = fn(student, teacher)
    assert loss.dim() == 0
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_scd_gradient_flows_through_one_side_only():
    s0 = _randn(2, 6, 5, seed=54, dtype=torch.float64)
    t = _randn(2, 6, 7, seed=55, dtype=torch.float64)

    s = s0.clone().requires_grad_(True)
    scd_loss(s, t).backward()
    autograd = s.grad.double()

    def explicit(x: torch.Tensor, constant_second: bool) -> torch.Tensor:
        f = x / x.norm(dim=-1, keepdim=True)
        second = (s0 / s0.norm(dim=-1, keepdim=True)) if constant_second else f
        ft = t / t.norm(dim=-1, keepdim=True)
        ls = torch.einsum("bid,bjd->bij", f, second)
        lt = torch.einsum("bid,bjd->bij", ft, ft)
        ls = (ls - ls.min(-1, keepdim=True).values) / (
            ls.max(-1, keepdim=True).values - ls.min(-1, keepdim=True).values + MINMAX_EPS
        )
        lt = (lt - lt.min(-1, keepdim=True).values) / (
            lt.max(-1, keepdim=True).values - lt.min(-1, keepdim=True).values + MINMAX_EPS
        )
        p_t = torch.exp(lt / SCD_TAU)
        p_t = p_t / p_t.sum(-1, keepdim=True)
        log_p_s = ls / SCD_TAU - torch.log(torch.exp(ls / SCD_TAU).sum(-1, keepdim=True))
        return -(p_t * log_p_s).sum(-1).mean()

    x = s0.clone().requires_grad_(True)
    explicit(x, constant_second=True).backward()
    torch.testing.assert_close(autograd, x.grad, atol=1e-5, rtol=1e-4)

    both = s0.clone().requires_grad_(True)
    explicit(both, constant_second=False).backward()
    # Without the stop-gradient the gradient is different, so the check above can tell them apart.
    assert (autograd - both.grad).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Total
# ----------------------------------------------------------------------------------------------------------------------


def test_weighted_total_sums_present_terms():
    terms = {"content": torch.tensor(0.5), "context": torch.tensor(2.0)}
    weights = {"content": 1.0, "context": 0.1, "rcc": 3.0}
    total = weighted_total(terms, weights)
    assert total.item() == pytest.approx(0.5 * 1.0 + 2.0 * 0.1)


def test_weighted_total_keeps_the_graph():
    x = torch.tensor(3.0, requires_grad=True)
    weighted_total({"a": x * x, "b": x}, {"a": 0.5, "b": 2.0}).backward()
    assert x.grad.item() == pytest.approx(0.5 * 2 * 3.0 + 2.0)


def test_weighted_total_missing_weight_is_value_error():
    with pytest.raises(ValueError, match="scd"):
        weighted_total({"content": torch.tensor(1.0), "scd": torch.tensor(1.0)}, {"content": 1.0})
    with pytest.raises(ValueError):
        weighted_total({}, {"content": 1.0})
