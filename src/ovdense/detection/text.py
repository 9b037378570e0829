"""F-ViT's text classifier: one CLIP text embedding per class name, plus a ``background`` one, as a D x (C+1) matrix.

The recipe is CLIPSelf's ``F-ViT/tools/clip_utils.py`` with ``dump_*_openclip_feature.py`` (method notes
``fvit.md`` section 4.3): each name is written into the 63 ViLD templates, every prompt is encoded and
L2-normalised, the 63 are averaged and the mean is L2-normalised again. ``background`` is just one more name run
through the same prompts. The detector's classifier takes the columns in class order with ``background`` last and
L2-normalises each column (``fvit_head.py``).

F-ViT ships its classifiers as ``.pt`` files: ``torch.save`` of a dict name -> float32 vector (e.g.
``coco_with_background_evaclip_vitb_16.pt``, 80 COCO names + ``background``, 512 wide). They are read here with
``torch.load(weights_only=True)`` only; ``.safetensors`` files holding the same dict are read too.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, OvdenseError, first_line
from ..fileio import write_atomic
from ..text import DETECTION_TEMPLATES, encode_prompts

__all__ = [
    "BACKGROUND",
    "FVIT_TEMPLATES",
    "fvit_class_embeddings",
    "fvit_prompts",
    "read_class_embeddings",
    "select_class_embeddings",
    "write_class_embeddings",
]

BACKGROUND = "background"
"""The name of F-ViT's extra last class (its embedding file holds it beside the class names)."""

# ovdense's DETECTION_TEMPLATES are the 63 patterns of clip_utils.py's ``multiple_templates``, string for string and in
# the same order, and a DetectionTemplate fills them by clip_utils' rule (name: '_' -> ' ', '/' -> ' or ', lower-cased,
# trailing dots dropped; article "an" when the raw name's first character is one of 'aeiou', case-sensitive, so
# "Apple" gets "a"; "This is " before prompts starting with "a" or "the"). So F-ViT reuses them.
FVIT_TEMPLATES = DETECTION_TEMPLATES
"""F-ViT's 63 ViLD prompt templates (the same objects as :data:`ovdense.text.DETECTION_TEMPLATES`)."""


def _check_name(name) -> str:
    if not isinstance(name, str):
        raise InvalidArgumentError(f"class names must be strings, got {type(name).__name__} {name!r}")
    if not name.strip():
        raise InvalidArgumentError("class names must not be empty")
    return name


def _check_names(names: Sequence[str], what: str = "names") -> list[str]:
    if isinstance(names, str):
        raise InvalidArgumentError(f"{what} must be a sequence of class names, not one string {names!r}")
    names = [_check_name(n) for n in names]
    if not names:
        raise InvalidArgumentError(f"{what} is empty: give at least one class name")
    seen: set[str] = set()
    for name in names:
        if name == BACKGROUND:
            raise InvalidArgumentError(
                f"{what} holds {BACKGROUND!r}: the detector adds it as its last class; drop it from the list"
            )
        if name in seen:
            raise InvalidArgumentError(f"{what} holds {name!r} twice")
        seen.add(name)
    return names


def fvit_prompts(name: str) -> list[str]:
    """The 63 prompts F-ViT embeds for ``name`` (``clip_utils.build_text_embedding_openclip``).

    ``"traffic_light"`` -> ``"There is a traffic light in the scene."``, ...; ``"apple"`` gets ``"an"``;
    ``"hair drier/blow dryer"`` -> ``"hair drier or blow dryer"``; prompts starting with ``a``/``the`` get
    ``"This is "`` in front (``"This is a photo of an apple."``).
    """
    _check_name(name)
    return [template(name) for template in FVIT_TEMPLATES]


def fvit_class_embeddings(
    model,
    tokenizer,
    names: Sequence[str],
    background: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """F-ViT's classifier from a CLIP text tower: D x (C+1), columns in the order of ``names``, then ``background``.

    Per name: every prompt of :func:`fvit_prompts` is encoded (fp32, no grad, via :func:`ovdense.text.encode_prompts`)
    and L2-normalised, the prompts are averaged and the mean L2-normalised, as ``dump_*_openclip_feature.py``.

    Args:
        model: an open_clip model with a text tower (``encode_text``).
        tokenizer: its tokenizer.
        names: the C class names (raw, as in the dataset: ``"traffic_light"``, ``"hair drier/blow dryer"``).
        background: append the ``background`` column (F-ViT's layout); ``False`` gives D x C.
        device: where to run the text tower; default the model's device.
        batch_size: prompts per forward pass.

    Returns:
        float32 D x (C+1) (or D x C) on ``device``, each column of unit length.
    """
    names = _check_names(names)
    if background:
        names = [*names, BACKGROUND]
    prompts = [p for name in names for p in fvit_prompts(name)]
    feats = encode_prompts(model, tokenizer, prompts, batch_size=batch_size, device=device)
    feats = F.normalize(feats.float(), dim=-1).view(len(names), len(FVIT_TEMPLATES), -1)
    return F.normalize(feats.mean(dim=1), dim=-1).T.contiguous()


# -- files ------------------------------------------------------------------------------------------------------


def _refused(path: Path, err: Exception) -> OvdenseError:
    """One line for a file torch.load (weights_only) or safetensors cannot read."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if path.suffix != ".safetensors" and not head.startswith(b"PK") and head[:1] != b"\x80":
        return OvdenseError(
            f"cannot read class-embedding file {path}: not a torch.save file (neither a zip archive nor a pickle)"
        )
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"Python objects ({found.group(1)})" if found else "a pickle"
        return OvdenseError(
            f"class-embedding file {path} holds {what} that torch's safe loader (weights_only=True) refuses; "
            "save a plain dict of name -> tensor"
        )
    return OvdenseError(f"cannot read class-embedding file {path}: {first_line(err)}")


def read_class_embeddings(path) -> dict[str, torch.Tensor]:
    """Read an F-ViT class-embedding file: ``torch.save`` (or safetensors) of a dict name -> 1-D float vector.

    ``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)`` only, never by unpickling objects.

    Returns:
        ``{name: float32 vector}`` in the file's order, every vector of one width, on the CPU.

    Raises:
        OvdenseError: one line naming the file: missing or unreadable, Python objects a safe load refuses, not a
            dict of 1-D float tensors of one width, non-finite values, or empty.
    """
    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"class-embedding file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            with warnings.catch_warnings():  # torch's notes on the file's pickle protocol are not ours to show
                warnings.simplefilter("ignore")
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # every reader raises its own type for a corrupt file
        raise _refused(path, err) from None
    not_dict = f"class-embedding file {path} is not a dict of class name -> 1-D float tensor"
    if not isinstance(obj, dict):
        raise OvdenseError(f"{not_dict} (it holds a {type(obj).__name__})")
    if not obj:
        raise OvdenseError(f"class-embedding file {path} is empty: it holds no class embeddings")
    table: dict[str, torch.Tensor] = {}
    width = None
    for name, vector in obj.items():
        if not isinstance(name, str):
            raise OvdenseError(f"{not_dict} (key {name!r} is a {type(name).__name__})")
        if not isinstance(vector, torch.Tensor):
            raise OvdenseError(f"{not_dict} ({name!r} holds a {type(vector).__name__})")
        if vector.ndim != 1 or not vector.is_floating_point() or vector.numel() == 0:
            raise OvdenseError(f"{not_dict} ({name!r} is a {vector.dtype} tensor of shape {tuple(vector.shape)})")
        if width is None:
            width = vector.numel()
        elif vector.numel() != width:
            raise OvdenseError(
                f"class-embedding file {path} mixes widths: {name!r} is {vector.numel()} wide, the first entry {width}"
            )
        vector = vector.detach().to(torch.float32).clone()
        if not torch.isfinite(vector).all():
            raise OvdenseError(f"class-embedding file {path}: {name!r} holds non-finite values")
        table[name] = vector
    return table


def select_class_embeddings(
    table: dict[str, torch.Tensor], names: Sequence[str], width: int | None, path_label: str
) -> torch.Tensor:
    """The detector's classifier from a name -> vector table: D x (C+1), ``names`` in order, then ``background``.

    Columns are L2-normalised (``F.normalize(stack(...).T, dim=0)``, as ``fvit_head.py``).

    Args:
        table: from :func:`read_class_embeddings`.
        names: the C class names, looked up exactly (F-ViT looks names up as they are written in its class lists).
        width: the detector's classifier width (its CLIP embed dim); ``None`` accepts any.
        path_label: the file the table came from, for messages.

    Raises:
        OvdenseError: one line: no ``background`` entry, a class name the table lacks, or the wrong width.
    """
    names = _check_names(names, "the class names")
    if not table:
        raise OvdenseError(f"{path_label} holds no class embeddings")
    if BACKGROUND not in table:
        raise OvdenseError(
            f"{path_label} has no {BACKGROUND!r} entry; F-ViT's classifier needs one (write the file with "
            "background=True)"
        )
    missing = [n for n in names if n not in table]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise OvdenseError(
            f"{path_label} has no embedding for class {missing[0]!r}{more} (it holds {len(table) - 1} class names "
            f"and {BACKGROUND!r}); names must match the file exactly"
        )
    columns = [table[n] for n in [*names, BACKGROUND]]
    widths = {int(c.numel()) for c in columns}
    if len(widths) != 1 or any(c.ndim != 1 for c in columns):
        raise OvdenseError(f"{path_label} holds embeddings of different shapes; expected 1-D vectors of one width")
    have = widths.pop()
    if width is not None and have != int(width):
        raise OvdenseError(
            f"{path_label} holds {have}-wide embeddings; the detector's classifier is {int(width)}-wide "
            "(the file was made with another CLIP)"
        )
    return F.normalize(torch.stack([c.detach().to(torch.float32).cpu() for c in columns]).T, dim=0).contiguous()


def write_class_embeddings(path, names: Sequence[str], embeddings: torch.Tensor) -> None:
    """Write a D x (C+1) classifier as F-ViT's file: ``torch.save`` of ``{name: vector, ..., "background": vector}``.

    The file appears whole or not at all (:func:`ovdense.fileio.write_atomic`); vectors are float32 on the CPU.

    Raises:
        InvalidArgumentError: ``embeddings`` is not D x (len(names) + 1), or the names are empty or repeated.
    """
    names = _check_names(names)
    if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 2 or not embeddings.is_floating_point():
        what = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise InvalidArgumentError(f"embeddings must be a D x (C+1) float tensor, got {what}")
    if embeddings.shape[1] != len(names) + 1:
        raise InvalidArgumentError(
            f"embeddings has {embeddings.shape[1]} columns; {len(names)} names need {len(names) + 1} "
            f"(the classes, then {BACKGROUND!r})"
        )
    rows = embeddings.detach().to(device="cpu", dtype=torch.float32).T.contiguous()
    data = {name: rows[i].clone() for i, name in enumerate([*names, BACKGROUND])}
    write_atomic(path, lambda f: torch.save(data, f))
