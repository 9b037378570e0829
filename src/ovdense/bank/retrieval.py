"""A memory bank as CorrCLIPv2 queries it at inference (``corrclip_segmentor.py`` S:104-121, 165-181, 246-270).

Per image, each region's query (its mean normalised VFM feature, normalised) retrieves the ids of its K nearest
bank regions in one batched index search; the rows of those ids in the main CLIP's value store are averaged,
normalised and classified against the main CLIP's text embeddings, and, with an auxiliary CLIP (DMCE), the same
ids' rows of the auxiliary store against the auxiliary CLIP's own text embeddings; the two cosine rows are
averaged. :class:`BankSupport` holds the bank, the stores it reads and the auxiliary CLIP's text tower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .memory_bank import MemoryBank
from .support import support_logits

__all__ = ["AUTHORS_AUX_STORE", "BankSupport", "main_store_for"]

#: The auxiliary store of the authors' banks: DFN2B-CLIP ViT-B/16 values.
AUTHORS_AUX_STORE = "dfnclip_b"


def main_store_for(bank: MemoryBank, width: int, exclude: str | None = None) -> str:
    """The store of ``bank`` whose values a main CLIP of output ``width`` reads: the only store of that width
    (besides ``exclude``), else the only one that is not an authors' auxiliary store (``dfnclip_*``), else the
    authors' ``metaclip_b`` (512) / ``metaclip_l`` (768) among several.

    Raises:
        InvalidArgumentError: no store of that width, or several with none of the authors' names.
    """
    widths = {name: bank.store(name).shape[1] for name in bank.store_names if name != exclude}
    fitting = [name for name, w in widths.items() if w == width]
    if len(fitting) == 1:
        return fitting[0]
    not_aux = [name for name in fitting if not name.startswith("dfnclip")]  # the authors' auxiliary stores
    if len(not_aux) == 1:
        return not_aux[0]
    authors = {512: "metaclip_b", 768: "metaclip_l"}.get(width)
    if authors in fitting:
        return authors
    have = ", ".join(f"{n} ({w}-d)" for n, w in widths.items()) or "none"
    if not fitting:
        raise InvalidArgumentError(f"bank: no value store fits the CLIP's {width}-d features (stores: {have})")
    raise InvalidArgumentError(
        f"bank: several {width}-d value stores ({', '.join(fitting)}); pick one with --bank-store"
    )


class BankSupport:
    """The retrieved support of CorrCLIPv2 (module docstring).

    Args:
        bank: the opened :class:`~ovdense.bank.memory_bank.MemoryBank`.
        main_store: the store of the main CLIP's values.
        aux_store: the store of the auxiliary CLIP's values (None: no DMCE, the authors' ``use_aux_model=False``).
        aux_model: the auxiliary CLIP (:func:`ovdense.weights.load_model`); only its text tower runs.
        num_support: K, neighbours per region.
    """

    def __init__(self, bank: MemoryBank, main_store: str, aux_store: str | None = None, aux_model=None,
                 num_support: int = 20):  # fmt: skip
        if (aux_store is None) != (aux_model is None):
            raise InvalidArgumentError("bank: an auxiliary store needs its CLIP and the other way round")
        self.bank, self.main_store, self.aux_store, self.aux_model = bank, main_store, aux_store, aux_model
        self.num_support = int(num_support)
        self._aux_text: dict[tuple, Tensor] = {}

    @classmethod
    def open(cls, path: str | Path, name: str | None = None, **kwargs) -> BankSupport:
        """:class:`BankSupport` of the bank at ``path`` (a ``memory_bank/`` folder; ``name`` picks one of
        several banks); ``main_store`` defaults per :func:`main_store_for` when ``main_width`` is given."""
        bank = MemoryBank.open(path, name)
        width = kwargs.pop("main_width", None)
        if kwargs.get("main_store") is None:
            kwargs["main_store"] = main_store_for(bank, width, exclude=kwargs.get("aux_store"))
        return cls(bank, **kwargs)

    def check(self, key_dim: int, main_dim: int, aux_dim: int | None = None) -> None:
        """One-line errors before any image: the index's key width against the VFM's, the stores' widths against
        the CLIPs', row counts of stores, manifest and index."""
        dims = {self.main_store: main_dim}
        if self.aux_store is not None:
            dims[self.aux_store] = aux_dim
        self.bank.check(key_dim=key_dim, store_dims=dims)

    @property
    def settings(self) -> dict:
        """What decides the support (JSON-serialisable)."""
        return {
            "bank": str(self.bank.layout.root),
            "bank_name": self.bank.layout.name,
            "main_store": self.main_store,
            "aux_store": self.aux_store,
            "aux_model": None if self.aux_model is None else self.aux_model.model_name,
            "num_support": self.num_support,
        }

    def neighbours(self, queries: Tensor) -> Tensor:
        """R x K bank row ids (−1 where the probed lists held fewer) of R x D_k normalised queries: one search."""
        return self.bank.search(queries.float().cpu().numpy(), k=self.num_support)

    def region_logits(self, ids: Tensor, main_text: Tensor, aux_text: Tensor | None = None) -> Tensor:
        """R x N support cosines: the main store's, averaged with the auxiliary store's when there is one.

        Args:
            ids: R x K neighbour ids (−1 ignored).
            main_text: N x D main CLIP name embeddings.
            aux_text: N x D' auxiliary CLIP name embeddings (needed with an auxiliary store).
        """
        ids = torch.as_tensor(ids)
        logits = support_logits(ids, self.bank.store(self.main_store), main_text.float().cpu())
        if self.aux_store is not None:
            if aux_text is None:
                raise ValueError("the auxiliary store needs the auxiliary CLIP's text embeddings")
            aux = support_logits(ids, self.bank.store(self.aux_store), aux_text.float().cpu())
            logits = (logits + aux) * 0.5
        return logits
