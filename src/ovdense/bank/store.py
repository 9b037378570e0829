"""The bank's CLIP value stores: ``torch.save`` of one CPU fp16 [N, D] tensor, row i = region id i (authors' format).

:data:`STORE_MODELS` names the CLIP that made each of the authors' stores; its text tower must classify that store.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..fileio import write_atomic_durable

__all__ = ["STORE_MODELS", "StoreModel", "read_store", "write_store"]


class StoreModel(NamedTuple):
    """The open_clip model and pretrained tag of a store's CLIP, and its embedding width D."""

    model: str
    pretrained: str
    width: int


#: The authors' store names (generate_clip_embeddings.py ``clip_name``) -> their CLIP. The DFN stores are made with
#: ``hf-hub:apple/DFN2B-CLIP-ViT-{B-16,L-14}``, which open_clip's tag table names ``ViT-*-quickgelu`` + ``dfn2b``.
STORE_MODELS: dict[str, StoreModel] = {
    "metaclip_b": StoreModel("ViT-B-16-quickgelu", "metaclip_fullcc", 512),
    "metaclip_l": StoreModel("ViT-L-14-quickgelu", "metaclip_fullcc", 768),
    "dfnclip_b": StoreModel("ViT-B-16-quickgelu", "dfn2b", 512),
    "dfnclip_l": StoreModel("ViT-L-14-quickgelu", "dfn2b", 768),
}


def read_store(path, mmap: bool = True):
    """Load a store: fp16 [N, D] CPU tensor.

    With ``mmap`` the file is memory-mapped (torch.load ``mmap=True``): rows are read from disk when indexed, so a
    3 GB store costs no RAM up front. Always ``weights_only`` (a store holds a tensor, never code).

    Raises:
        OvdenseError: the file is missing, not a torch file, or not a 2-D fp16 tensor.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"store {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, pickle's UnpicklingError, EOFError... on a bad file
        raise OvdenseError(f"store {path} cannot be read: {first_line(err)}") from None
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        what = f"shape {tuple(data.shape)}" if isinstance(data, torch.Tensor) else type(data).__name__
        raise OvdenseError(f"store {path} holds {what}, expected one [N, D] tensor")
    if data.dtype != torch.float16:
        raise OvdenseError(f"store {path} is {data.dtype}, expected torch.float16")
    return data


def write_store(path, tensor) -> None:
    """Write ``tensor`` (fp16 [N, D]) as a store, atomically: the file is the old one or the whole new one.

    The tensor is saved as a contiguous CPU tensor that owns its storage, so a view never drags its base into the
    file, in torch.save's default format (the authors' ``PtSlotWriter.finalize`` and ``PTTensorDataset`` read it).

    Raises:
        InvalidArgumentError: not a 2-D fp16 tensor.
    """
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype != torch.float16:
        what = f"{tensor.dtype} {tuple(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise InvalidArgumentError(f"write_store: expected an fp16 [N, D] tensor, got {what}")
    data = tensor.detach().to("cpu").contiguous()
    if data.storage_offset() or data.untyped_storage().nbytes() != data.numel() * data.element_size():
        data = data.clone()  # a view: torch.save would write its whole base storage
    write_atomic_durable(path, lambda f: torch.save(data, f))
