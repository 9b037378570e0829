"""Support logits from retrieved neighbours (the authors' ``get_support_clip_logits``, corrclip_segmentor.py
255-270, before its scatter to pixels)."""

from __future__ import annotations

from ..errors import InvalidArgumentError, OvdenseError

__all__ = ["support_logits"]


def support_logits(ids, store, text, on_empty: str = "raise"):
    """Per region: the plain mean of the store rows of its valid neighbour ids, L2-normalised, dot the text.

    Args:
        ids: LongTensor [R, K] region ids from the index search; -1 (not found) is dropped.
        store: fp16 [N, D] CLIP value store (rows already unit length, as the authors store them).
        text: float [C, D] text embeddings of the store's CLIP (L2-normalised here).
        on_empty: a region whose K ids are all -1 (an empty bank, or IVF lists that hold nothing for the probed
            centroids): ``"raise"`` (default) one line; ``"nan"`` a NaN row, as the authors' mean over nothing.

    Returns:
        float32 [R, C] cosine logits.

    The mean is accumulated in float32 and rounded to fp16, as the authors' fp16 ``mean`` on CUDA (float
    accumulator, fp16 result); normalisation and the dot product then run in float32, where the authors stay in
    fp16 (differences of the order of fp16 rounding, ~1e-3).
    """
    import torch
    import torch.nn.functional as F

    if on_empty not in ("raise", "nan"):
        raise InvalidArgumentError(f"on_empty: expected 'raise' or 'nan', got {on_empty!r}")
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise InvalidArgumentError(f"ids: expected an integer [R, K] tensor, got {ids.dtype} {tuple(ids.shape)}")
    if store.dim() != 2 or text.dim() != 2 or store.shape[1] != text.shape[1]:
        raise InvalidArgumentError(
            f"store [N, D] and text [C, D] must share D, got {tuple(store.shape)} and {tuple(text.shape)}"
        )
    ids = ids.long()
    n = store.shape[0]
    if ids.numel() and (ids.min() < -1 or ids.max() >= n):
        bad = int(ids.min()) if ids.min() < -1 else int(ids.max())
        raise OvdenseError(
            f"support id {bad} is outside the store's rows 0..{n - 1} (a bank whose index and store disagree)"
        )
    valid = ids >= 0
    counts = valid.sum(1)
    empty = counts == 0
    if empty.any() and on_empty == "raise":
        raise OvdenseError(
            f"{int(empty.sum())} of {len(ids)} regions retrieved no neighbour (all ids -1): the bank is empty or the "
            "probed index lists hold nothing"
        )
    flat = ids[valid]  # only the rows asked for are read: a memory-mapped store stays on disk
    rows = store[flat].to(torch.float32)
    owner = torch.nonzero(valid, as_tuple=True)[0]
    sums = torch.zeros(len(ids), store.shape[1], dtype=torch.float32).index_add_(0, owner, rows)
    mean = (sums / counts.unsqueeze(1)).to(torch.float16).to(torch.float32)  # 0/0 -> NaN for an empty region
    values = F.normalize(mean, dim=-1)
    return values @ F.normalize(text.to(torch.float32), dim=-1).T
