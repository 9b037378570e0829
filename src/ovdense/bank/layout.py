"""Where a bank's files are: :class:`BankLayout` (the authors' ``memory_bank/`` layout) and :func:`find_bank`."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import OvdenseError

__all__ = ["BankLayout", "bank_names", "find_bank"]

MANIFESTS = "manifests"
CLIP_EMBEDDINGS = "clip_embeddings"
VFM_EMBEDDINGS = "vfm_embeddings"
MASKS = "masks"


def bank_names(root) -> list[str]:
    """The banks registered under ``root``: the names of ``manifests/*.manifest.txt`` and ``*.images.tsv``, sorted."""
    folder = Path(root) / MANIFESTS
    names = {p.name[: -len(".manifest.txt")] for p in folder.glob("*.manifest.txt")}
    names |= {p.name[: -len(".images.tsv")] for p in folder.glob("*.images.tsv")}
    return sorted(names)


class BankLayout:
    """The paths of bank ``name`` under ``root`` (nothing is created or checked here).

    Store and index files are named ``{name}_{suffix}``, so the files of a bank ``coco`` and of a bank ``coco_x`` in
    one root share a prefix; :meth:`stores` and :meth:`indexes` give each file to the longest registered bank name
    it starts with.
    """

    def __init__(self, root, name: str):
        if not name or any(c in name for c in "/\\\n\t") or name.startswith("."):
            raise OvdenseError(f"bank name {name!r} is not a valid file name part")
        self.root = Path(root)
        self.name = name

    def __repr__(self) -> str:
        return f"BankLayout({str(self.root)!r}, {self.name!r})"

    @property
    def manifest(self) -> Path:
        """``manifests/{name}.manifest.txt``: line i (0-based) = region id i, text ``{stem}#{idx}``."""
        return self.root / MANIFESTS / f"{self.name}.manifest.txt"

    @property
    def images_tsv(self) -> Path:
        """``manifests/{name}.images.tsv``: ``{stem}\\t{start_id}\\t{num_regions}`` per image."""
        return self.root / MANIFESTS / f"{self.name}.images.tsv"

    def masks_dir(self, mask_model: str) -> Path:
        """``masks/{name}/{mask_model}/``, holding ``{stem}.npz`` with key ``instance_mask``."""
        return self.root / MASKS / self.name / mask_model

    def store(self, store_name: str) -> Path:
        """``clip_embeddings/{name}_{store_name}.pt``: fp16 [N, D] CLIP region values."""
        return self.root / CLIP_EMBEDDINGS / f"{self.name}_{store_name}.pt"

    def keys(self, vfm_name: str) -> Path:
        """``vfm_embeddings/{name}_{vfm}.pt``: fp16 [N, Dk] VFM region keys (``vfm`` = :func:`file_part`)."""
        return self.root / VFM_EMBEDDINGS / f"{self.name}_{file_part(vfm_name)}.pt"

    def index(self, vfm_name: str) -> Path:
        """``vfm_embeddings/{name}_{vfm}.faiss``: the retrieval index over the keys (``vfm`` = :func:`file_part`)."""
        return self.root / VFM_EMBEDDINGS / f"{self.name}_{file_part(vfm_name)}.faiss"

    def _owned(self, folder: str, suffix: str) -> dict[str, Path]:
        """``{part: path}`` of the files ``folder/{name}_{part}{suffix}`` that belong to this bank."""
        others = [b for b in bank_names(self.root) if b != self.name and b.startswith(f"{self.name}_")]
        found: dict[str, Path] = {}
        for path in sorted((self.root / folder).glob(f"{self.name}_*{suffix}")):
            if not path.is_file() or any(path.name.startswith(f"{b}_") for b in others):
                continue  # a longer bank name owns it
            found[path.name[len(self.name) + 1 : -len(suffix)]] = path
        return found

    def stores(self) -> dict[str, Path]:
        """``{store_name: path}`` of the finished stores (``.pt``; a build's ``.f16.npy`` slots are not stores)."""
        return self._owned(CLIP_EMBEDDINGS, ".pt")

    def indexes(self) -> list[Path]:
        """The bank's ``.faiss`` files, sorted (the VFM name is :meth:`vfm_of`)."""
        return list(self._owned(VFM_EMBEDDINGS, ".faiss").values())

    def vfm_of(self, index_path) -> str:
        """The VFM name an index file carries: ``{name}_{vfm}.faiss`` -> ``vfm``."""
        stem = Path(index_path).name[: -len(".faiss")]
        return stem[len(self.name) + 1 :] if stem.startswith(f"{self.name}_") else stem


def file_part(name: str) -> str:
    """A VFM name as it stands in a file name: the authors' names unchanged (``radiov3``), anything outside
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``-`` (``timm:vit_large_patch16_224`` ->
    ``timm-vit_large_patch16_224``: no colon, which some file systems refuse)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)


def find_bank(root, name: str | None = None) -> BankLayout:
    """The bank under ``root`` (a ``memory_bank/`` folder, or a folder holding one): the only one, or ``name``.

    Raises:
        OvdenseError: ``root`` is not a folder, it holds no bank, it holds several and ``name`` is not given, or
            ``name`` is not one of them (the message lists those there are).
    """
    root = Path(root)
    if not root.is_dir():
        raise OvdenseError(f"bank folder {root} does not exist or is not a folder")
    if not (root / MANIFESTS).is_dir() and (root / "memory_bank" / MANIFESTS).is_dir():
        root = root / "memory_bank"  # the authors' repository root: their bank root is memory_bank/ in it
    names = bank_names(root)
    if not names:
        raise OvdenseError(f"no bank in {root}: no {MANIFESTS}/*.manifest.txt (build one with `ovdense bank build`)")
    if name is None:
        if len(names) > 1:
            raise OvdenseError(f"{root} holds {len(names)} banks ({', '.join(names)}); pick one with --name")
        return BankLayout(root, names[0])
    if name not in names:
        raise OvdenseError(f"no bank {name!r} in {root} (banks there: {', '.join(names)})")
    return BankLayout(root, name)
