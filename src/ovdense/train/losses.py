"""Loss functions of DeCLIP (CVPR release and extended recipe) and SCD, as pure tensor functions.

Conventions shared by every loss here:

- Arguments named teacher / target / vfm are detached inside the loss (``.detach()``), so a caller
  cannot leak gradient into a frozen teacher even if it forgot ``torch.no_grad()``.
- Inputs are cast to fp32 (``.float()``) before any work: the trainer runs the towers under fp16 AMP,
  and softmaxes, norms and 1 - cos of half-precision values lose most of their signal.
- Every loss returns a 0-dim fp32 tensor.

Which parts come from released code and which are ours is said per function (see ``docs/design.md``,
sections "DeCLIP training", "Extended version (ours where unpublished)" and "SCD and the Refiner (ours)").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CONTEXT_TAU",
    "MINMAX_EPS",
    "RCC_TAU",
    "SCD_TAU",
    "attention_chain",
    "content_loss_roi",
    "content_loss_tokens",
    "context_loss_kl",
    "context_loss_l2",
    "cosine_affinity",
    "minmax_rows",
    "pool_roi_tokens",
    "rcc_loss",
    "resize_attention",
    "resize_tokens",
    "scd_loss",
    "sd_guided_affinity",
    "student_context_affinity",
    "token_infonce_loss",
    "weighted_total",
]

#: Temperature of the extended recipe's KL context loss (ours; the paper's value is not available).
CONTEXT_TAU = 0.2
#: Temperature of the region correlation constraint (ours).
RCC_TAU = 0.2
#: Temperature of SCD's row softmax (ours, per docs/design.md "SCD and the Refiner (ours)").
SCD_TAU = 0.2
#: Added to a row's (max - min) before SCD's min-max normalisation; see :func:`minmax_rows`.
MINMAX_EPS = 1e-6


def _check_dims(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(x.shape)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the same shape")


def _check_grid(name: str, n: int, grid: Sequence[int]) -> tuple[int, int]:
    h, w = (int(v) for v in grid)
    if h * w != n:
        raise ValueError(f"{name}: {n} tokens do not fill a {h} x {w} grid")
    return h, w


# --------------------------------------------------------------------------------------------------
# Affinities
# --------------------------------------------------------------------------------------------------


def cosine_affinity(features: Tensor) -> Tensor:
    """Cosine affinity of every token with every other token.

    Args:
        features: B x N x C tokens.

    Returns:
        B x N x N fp32 matrix, ``S[b, m, n] = cos(features[b, m], features[b, n])``.
    """
    _check_dims("features", features, 3, "B x N x C")
    f = F.normalize(features.float(), dim=-1)
    return torch.bmm(f, f.transpose(1, 2))


def student_context_affinity(q: Tensor, k: Tensor | None = None) -> Tensor:
    """The student's context affinity, DeCLIP's released ``get_student_context_similarity``.

    ``csa`` mode (``k`` given): ``(S_qq + S_kk) / 2``; single-feature modes (``qq``, and likewise ``kk``
    or ``vv`` by passing that feature as ``q``): ``S_qq``. Each feature is L2-normalised over C first.

    Args:
        q: B x N x C context features (heads concatenated, prefix tokens already dropped).
        k: B x N x C, or None for a single-feature mode.

    Returns:
        B x N x N fp32 affinity; symmetric with a unit diagonal.
    """
    s = cosine_affinity(q)
    if k is None:
        return s
    _check_same_shape("q", q, "k", k)
    return (s + cosine_affinity(k)) / 2.0


def resize_tokens(x: Tensor, grid: Sequence[int], size: Sequence[int]) -> Tensor:
    """Resize tokens laid out on a grid, as the released code does with the student's context features.

    Args:
        x: B x N x C tokens in row-major order on ``grid`` = (h, w), N = h * w.
        grid: (h, w).
        size: (H, W) target grid.

    Returns:
        B x (H * W) x C, bilinear (``align_corners=False``), in ``x``'s dtype; ``x`` itself when
        ``size == grid``.
    """
    _check_dims("x", x, 3, "B x N x C")
    b, n, c = x.shape
    h, w = _check_grid("x", n, grid)
    out_h, out_w = (int(v) for v in size)
    if (out_h, out_w) == (h, w):
        return x
    # Bilinear on fp16 is unsupported on some CPU builds and imprecise anyway: resize in fp32.
    grid_x = x.float().transpose(1, 2).reshape(b, c, h, w)
    resized = F.interpolate(grid_x, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# Context losses
# --------------------------------------------------------------------------------------------------


def context_loss_l2(s_teacher: Tensor, s_student: Tensor) -> Tensor:
    """DeCLIP's released context loss: ``(S_t - S_s).norm(p=2, dim=-1).mean()``.

    The L2 norm of each row's difference, averaged over the batch and the rows (not squared, not
    divided by N).

    Args:
        s_teacher: B x N x N teacher (VFM) affinity; detached here.
        s_student: B x N x N student affinity.

    Returns:
        0-dim fp32 loss.
    """
    _check_dims("s_student", s_student, 3, "B x N x N")
    _check_same_shape("s_teacher", s_teacher, "s_student", s_student)
    diff = s_teacher.detach().float() - s_student.float()
    return diff.norm(p=2, dim=-1).mean()


def _row_kl(logits_target: Tensor, logits_pred: Tensor, tau: float) -> Tensor:
    """Mean over all rows of KL(softmax(target / tau) || softmax(pred / tau)); ... x N inputs, fp32."""
    # log_softmax rather than log(softmax): sharp rows (tau = 0.2 on cosines) would underflow to log(0).
    log_p_t = F.log_softmax(logits_target / tau, dim=-1)
    log_p_s = F.log_softmax(logits_pred / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()


def context_loss_kl(s_teacher: Tensor, s_student: Tensor, tau: float = CONTEXT_TAU) -> Tensor:
    """Extended recipe's context loss (ours: the form and tau are our reading, no released code).

    Row-wise ``KL(P_t || P_s)`` with ``P = softmax(row / tau)`` over the last axis, summed over j and
    averaged over the batch and the rows.

    Args:
        s_teacher: B x N x N teacher (VFM, possibly SD-guided) affinity; detached here.
        s_student: B x N x N student affinity.
        tau: softmax temperature, default :data:`CONTEXT_TAU`.

    Returns:
        0-dim fp32 loss, >= 0, zero iff every row's distributions agree.
    """
    _check_dims("s_student", s_student, 3, "B x N x N")
    _check_same_shape("s_teacher", s_teacher, "s_student", s_student)
    return _row_kl(s_teacher.detach().float(), s_student.float(), tau)


# --------------------------------------------------------------------------------------------------
# SD-guided affinity (extended recipe)
# --------------------------------------------------------------------------------------------------


def attention_chain(maps: Sequence[Tensor]) -> Tensor:
    """Chain self-attention maps: ``A_1 @ A_2 @ ... @ A_L``, left to right.

    A product of row-stochastic matrices is row-stochastic, so the chain is again an attention map.
    Not a loss: nothing is detached (the maps come from a frozen UNet anyway).

    Args:
        maps: L >= 1 maps, each B x N x N with rows summing to 1 (all on one grid).

    Returns:
        B x N x N fp32 map.
    """
    if len(maps) == 0:
        raise ValueError("maps: expected at least one attention map")
    out = maps[0].float()
    _check_dims("maps[0]", out, 3, "B x N x N")
    for i, a in enumerate(maps[1:], start=1):
        _check_same_shape("maps[0]", out, f"maps[{i}]", a)
        out = torch.bmm(out, a.float())
    return out


def resize_attention(attn: Tensor, src_grid: Sequence[int], dst_grid: Sequence[int]) -> Tensor:
    """Bring an attention map to another token grid, keeping it row-stochastic (ours).

    docs/design.md "Extended version (ours where unpublished)": queries and keys resized bilinearly, rows
    re-normalised. Both axes are resized bilinearly (``align_corners=False``), then clamped at 0 and each row divided by
    its sum: resizing the key axis changes a row's mass (roughly by (H*W) / (h*w)), and the chain of
    :func:`attention_chain` needs rows that sum to 1.

    Args:
        attn: B x (h*w) x (h*w) map, queries on the rows, keys on the columns.
        src_grid: (h, w) of ``attn``.
        dst_grid: (H, W) wanted.

    Returns:
        B x (H*W) x (H*W) fp32 row-stochastic map.
    """
    _check_dims("attn", attn, 3, "B x N x N")
    b, nq, nk = attn.shape
    h, w = _check_grid("attn (queries)", nq, src_grid)
    _check_grid("attn (keys)", nk, src_grid)
    out_h, out_w = (int(v) for v in dst_grid)
    a = attn.float()
    if (out_h, out_w) != (h, w):
        # Keys: each query's row is an h x w image, the queries act as channels.
        a = F.interpolate(a.reshape(b, nq, h, w), size=(out_h, out_w), mode="bilinear", align_corners=False)
        a = a.reshape(b, nq, out_h * out_w)
        # Queries: each key's column is an h x w image, the (resized) keys act as channels.
        a = a.transpose(1, 2).reshape(b, out_h * out_w, h, w)
        a = F.interpolate(a, size=(out_h, out_w), mode="bilinear", align_corners=False)
        a = a.reshape(b, out_h * out_w, out_h * out_w).transpose(1, 2)
    # Bilinear weights are non-negative, so the clamp only removes round-off below zero; the floor on
    # the sum keeps an all-zero row (impossible for a softmax map) from dividing by zero.
    a = a.clamp_min(0.0)
    return a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def sd_guided_affinity(chain: Tensor, s_vfm: Tensor) -> Tensor:
    """SD-GSC's guided VFM affinity ``S_hat = A_hat @ S_vfm``.

    Each row of the result is an attention-weighted mean of VFM affinity rows, which spreads a token's
    affinity over the region Stable Diffusion groups it with. Not a loss: the result is the teacher of
    :func:`context_loss_kl`, which detaches it.

    Args:
        chain: B x N x N row-stochastic map (:func:`attention_chain`), on the VFM grid.
        s_vfm: B x N x N VFM cosine affinity.

    Returns:
        B x N x N fp32 matrix.
    """
    _check_dims("chain", chain, 3, "B x N x N")
    _check_same_shape("chain", chain, "s_vfm", s_vfm)
    return torch.bmm(chain.float(), s_vfm.float())


# --------------------------------------------------------------------------------------------------
# Content losses
# --------------------------------------------------------------------------------------------------


def content_loss_roi(student_roi: Tensor, teacher_cls: Tensor) -> Tensor:
    """DeCLIP's released content loss: ``1 - mean cos(student RoI feature, teacher crop [CLS])``.

    Args:
        student_roi: K x D student region features (1 x 1 RoIAlign on the un-normalised content map),
            all boxes of the batch stacked; L2-normalised here.
        teacher_cls: K x D teacher crop embeddings; detached and L2-normalised here.

    Returns:
        0-dim fp32 loss, mean over all K boxes of the batch (not per image first).
    """
    _check_dims("student_roi", student_roi, 2, "K x D")
    _check_same_shape("student_roi", student_roi, "teacher_cls", teacher_cls)
    if student_roi.shape[0] == 0:
        raise ValueError("student_roi: no boxes; the mean over zero boxes is undefined")
    s = F.normalize(student_roi.float(), dim=-1)
    t = F.normalize(teacher_cls.detach().float(), dim=-1)
    return 1.0 - (s * t).sum(dim=-1).mean()


def pool_roi_tokens(student_tokens: Tensor, teacher_cls: Tensor) -> Tensor:
    """Pool a region's N x N RoI tokens with weights from their agreement with the teacher (ours).

    ``w = softmax_t(cos(f_s_t, f_t))`` (no temperature), ``f_bar = sum_t w_t f_s_t``. Gradient reaches the
    student through both the tokens and the weights.

    Args:
        student_tokens: K x T x D tokens of an N x N RoIAlign (T = N^2), un-normalised.
        teacher_cls: K x D teacher crop embeddings; detached here.

    Returns:
        K x D fp32 pooled features (un-normalised).
    """
    _check_dims("student_tokens", student_tokens, 3, "K x T x D")
    _check_dims("teacher_cls", teacher_cls, 2, "K x D")
    k, _, d = student_tokens.shape
    if teacher_cls.shape != (k, d):
        raise ValueError(
            f"teacher_cls: expected {k} x {d} to match student_tokens {tuple(student_tokens.shape)}, "
            f"got {tuple(teacher_cls.shape)}"
        )
    tokens = student_tokens.float()
    t = F.normalize(teacher_cls.detach().float(), dim=-1)
    cos = torch.einsum("ktd,kd->kt", F.normalize(tokens, dim=-1), t)
    weights = cos.softmax(dim=-1)
    return torch.einsum("kt,ktd->kd", weights, tokens)


def content_loss_tokens(student_tokens: Tensor, teacher_cls: Tensor) -> Tensor:
    """Extended recipe's content loss on N x N RoI tokens (ours): ``1 - mean cos(f_bar, f_t)``.

    Args:
        student_tokens: K x T x D RoI tokens; ``f_bar`` from :func:`pool_roi_tokens`.
        teacher_cls: K x D teacher crop embeddings; detached here.

    Returns:
        0-dim fp32 loss, mean over all K regions of the batch.
    """
    pooled = pool_roi_tokens(student_tokens, teacher_cls)
    if pooled.shape[0] == 0:
        raise ValueError("student_tokens: no regions; the mean over zero regions is undefined")
    return 1.0 - F.cosine_similarity(pooled, teacher_cls.detach().float(), dim=-1).mean()


def rcc_loss(student_tokens: Tensor, vfm_tokens: Tensor, tau: float = RCC_TAU) -> Tensor:
    """Region correlation constraint (ours: defaults and exact form are our reading of the formula).

    Per region, ``R`` = T x T cosine matrix of its tokens, for the VFM and for the student; the loss is
    ``KL(softmax(R_vfm / tau) || softmax(R_student / tau))`` row-wise, summed over j, averaged over the
    regions and the rows. It keeps the student's tokens inside a region as differently related as the
    VFM's, so the content loss cannot collapse them onto one vector.

    Args:
        student_tokens: K x T x D student RoI tokens.
        vfm_tokens: K x T x C' VFM RoI tokens (RoIAlign on the VFM map, same N x N); detached here.
        tau: softmax temperature, default :data:`RCC_TAU`.

    Returns:
        0-dim fp32 loss.
    """
    _check_dims("student_tokens", student_tokens, 3, "K x T x D")
    _check_dims("vfm_tokens", vfm_tokens, 3, "K x T x C'")
    if student_tokens.shape[:2] != vfm_tokens.shape[:2]:
        raise ValueError(
            f"student_tokens {tuple(student_tokens.shape)} and vfm_tokens {tuple(vfm_tokens.shape)} "
            "must have the same regions and tokens (K x T)"
        )
    r_vfm = cosine_affinity(vfm_tokens.detach())
    r_student = cosine_affinity(student_tokens)
    return _row_kl(r_vfm, r_student, tau)


# --------------------------------------------------------------------------------------------------
# SCD
# --------------------------------------------------------------------------------------------------


def minmax_rows(x: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    """Map each row (last axis) to [0, 1]: ``(x - min) / (max - min + eps)``.

    ``eps`` keeps a constant row finite: all tokens equal (e.g. a padded, black area, or a collapsed
    student) gives max == min, and 0 / 0 would put NaN into the loss and the weights; with eps such a
    row becomes all zeros, i.e. a uniform softmax. 1e-6 is far below the spread of any informative row
    of cosines (range [-1, 1]), so it leaves those rows unchanged to fp32 precision.

    Args:
        x: ... x N logits.
        eps: added to the range.

    Returns:
        Same shape, each row in [0, 1).
    """
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo + eps)


def scd_loss(student_tokens: Tensor, target_tokens: Tensor, tau: float = SCD_TAU) -> Tensor:
    """Spatial correlation distillation (ours: the authors' code is not released).

    See docs/design.md "SCD and the Refiner (ours)".

    ``F_s`` = L2-normalised student tokens, ``F_t`` = L2-normalised target tokens (detached). Student
    logits ``L_s = F_s @ sg(F_s)^T``: one side stop-gradient, so each token is moved towards its
    targets' relations with the current (fixed) other tokens rather than dragging both ends. Target
    logits ``L_t = F_t @ F_t^T``. Each row is min-max normalised (:func:`minmax_rows`), then
    ``P_t = softmax(L_t' / tau)``, ``log P_s = log_softmax(L_s' / tau)``. The loss of the notes is the cross-entropy
    ``-sum_j P_t log P_s``; this returns ``KL(P_t || P_s)`` = that cross-entropy minus the entropy of
    ``P_t``, a constant of the target: the gradients are the same, and the value is 0 exactly when the
    student's correlations equal the target's. Averaged over the batch and the rows.

    Args:
        student_tokens: B x N x D student dense tokens.
        target_tokens: B x N x D' frozen teacher (or Refiner) dense tokens; detached here.
        tau: softmax temperature, default :data:`SCD_TAU`.

    Returns:
        0-dim fp32 loss.
    """
    _check_dims("student_tokens", student_tokens, 3, "B x N x D")
    _check_dims("target_tokens", target_tokens, 3, "B x N x D'")
    if student_tokens.shape[:2] != target_tokens.shape[:2]:
        raise ValueError(
            f"student_tokens {tuple(student_tokens.shape)} and target_tokens {tuple(target_tokens.shape)} "
            "must have the same batch and tokens (B x N)"
        )
    f_s = F.normalize(student_tokens.float(), dim=-1)
    f_t = F.normalize(target_tokens.detach().float(), dim=-1)
    logits_s = minmax_rows(torch.bmm(f_s, f_s.detach().transpose(1, 2)))
    logits_t = minmax_rows(torch.bmm(f_t, f_t.transpose(1, 2)))
    log_p_t = F.log_softmax(logits_t / tau, dim=-1)
    log_p_s = F.log_softmax(logits_s / tau, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------
# Total
# --------------------------------------------------------------------------------------------------


def weighted_total(terms: Mapping[str, Tensor], weights: Mapping[str, float]) -> Tensor:
    """``sum_name weights[name] * terms[name]`` over the terms present.

    Weights for absent terms are ignored (one weight table serves every objective); a term without a
    weight is an error rather than a silent weight of 0 or 1.

    Args:
        terms: name -> 0-dim loss.
        weights: name -> weight.

    Returns:
        0-dim tensor.
    """
    if not terms:
        raise ValueError("terms: expected at least one loss term")
    missing = [name for name in terms if name not in weights]
    if missing:
        raise ValueError(f"no weight for loss term(s) {missing}; known weights: {sorted(weights)}")
    (first, *rest) = terms.items()
    total = first[1] * float(weights[first[0]])
    for name, term in rest:
        total = total + term * float(weights[name])
    return total


# --------------------------------------------------------------------------------------------------
# Refiner (SCD's R-SCD)
# --------------------------------------------------------------------------------------------------


def token_infonce_loss(student: Tensor, target: Tensor, tau: float = 0.2) -> Tensor:
    """InfoNCE over region tokens, the Refiner's self-supervised loss.

    Ours, per docs/design.md "SCD and the Refiner (ours)".

    Both sides are flattened to M = K·T tokens and L2-normalised; ``logits = s @ t^T / tau`` (M x M) and the
    loss is the cross-entropy with the diagonal as positives: each student token must pick the target token of
    its own region and cell among all target tokens of the batch (the other cells of its region included, so
    the tokens inside a region must stay distinct). Mean over the M tokens.

    Args:
        student: K x T x D student tokens (the Refiner's RoI tokens).
        target: K x T x D target tokens (the frozen CLIP's zoomed-in crop tokens); detached here.
        tau: softmax temperature (docs/design.md "SCD and the Refiner (ours)": 0.2).

    Returns:
        0-dim fp32 loss, >= 0.
    """
    _check_dims("student", student, 3, "K x T x D")
    _check_same_shape("student", student, "target", target)
    if student.shape[0] * student.shape[1] == 0:
        raise ValueError("student: no tokens; the mean over zero tokens is undefined")
    s = F.normalize(student.float().flatten(0, 1), dim=-1)
    t = F.normalize(target.detach().float().flatten(0, 1), dim=-1)
    logits = s @ t.T / tau
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)
