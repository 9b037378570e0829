"""Model names, pretrained tags, the hub cache and local checkpoint files.

Every route ends in a real open_clip model (``CLIP`` or ``CustomTextCLIP``) with its tokenizer and
preprocessing: open_clip names with a tag (downloaded through the Hugging Face hub cache), ``hf-hub:``
repos, and local files: safetensors, open_clip ``.pt``/``.bin`` state dicts, OpenAI state dicts and
TorchScript archives, and EVA-CLIP-layout ``{'state_dict': ...}`` checkpoints such as DeCLIP's releases
(visual part through timm's EVA ``checkpoint_filter_fn``, ``text.*`` into open_clip's text tower).
Pickled files are only read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
import urllib.parse
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

from .backbones import DenseTower, is_test_model, register_test_models, tower_for
from .errors import OvdenseError, RandomWeightsWarning, cause_line, first_line

register_test_models()

_OFFLINE_HELP = (
    'On a machine with internet run `python -c "import open_clip; open_clip.create_model({args})"` and '
    "copy ~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), "
    "or pass a local weights file with --checkpoint / checkpoint="
)


@dataclass
class LoadedModel:
    """A loaded CLIP with what the dense pipeline needs.

    Attributes:
        model: open_clip ``CLIP`` / ``CustomTextCLIP`` in eval mode.
        tokenizer: its open_clip tokenizer.
        tower: dense access to the image tower.
        model_name: open_clip architecture name (or ``hf-hub:...``).
        source: where the weights came from (tag, repo or file; ``random`` for test archs).
        activation: ``quick_gelu`` / ``gelu`` for OpenAI-style ViTs, ``swiglu`` for EVA02.
        notes: things a user should know (e.g. the QuickGELU choice).
        has_text_weights: False when only an image tower was given (``load_model(visual_state=...)`` without
            weights): the text tower is then random and must not encode class names.
    """

    model: torch.nn.Module
    tokenizer: object
    tower: DenseTower
    model_name: str
    source: str
    activation: str
    is_test_model: bool = False
    notes: list[str] = field(default_factory=list)
    has_text_weights: bool = True


#: Test architectures already warned about in this process.
_WARNED_RANDOM: set[str] = set()


def list_models() -> list[str]:
    """Architectures with a dense head: open_clip ViTs, EVA02 towers and the tiny test archs."""
    names = []
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vision = cfg.get("vision_cfg", {})
        timm_name = vision.get("timm_model_name", "")
        if cfg.get("multimodal_cfg") or vision.get("attentional_pool"):
            continue
        if timm_name and not timm_name.startswith(("eva02", "ovdense_test_eva02")):
            continue
        if not timm_name and (isinstance(vision.get("layers"), (list, tuple)) or not vision.get("patch_size")):
            continue  # ResNets
        if vision.get("pos_embed_type", "learnable") != "learnable" or "hf_model_name" in cfg.get("text_cfg", {}):
            continue
        names.append(name)
    return names


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when present else CPU; a CUDA request without CUDA is an error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise OvdenseError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OvdenseError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OvdenseError(f"device {device!r} requested but MPS is not available on this machine")
    return dev


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/", 1)[-1].startswith("code/") for n in zf.namelist())


#: Pickle opcodes that push a string (the operands of STACK_GLOBAL).
_PICKLE_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def _pickled_globals(path: Path, max_pickles: int = 8) -> list[str] | None:
    """The classes and functions a raw pickle file names, read with :mod:`pickletools` (which only lists the
    opcodes: nothing is imported or run); None when the file is not a pickle stream.

    A legacy ``torch.save`` file is several pickles in a row, then raw storage bytes: the pickles are read until
    the first that does not parse.
    """
    import pickletools

    names: list[str] = []
    parsed = 0
    with open(path, "rb") as f:
        for _ in range(max_pickles):
            start = f.tell()
            strings: list[str] = []
            memo: dict[int, object] = {}
            last: object = None
            ops: list[str] = []
            try:
                for op, arg, _pos in pickletools.genops(f):
                    ops.append(op.name)
                    if op.name in _PICKLE_STRINGS:
                        last = arg.decode("latin-1") if isinstance(arg, bytes) else arg
                        strings.append(last)
                    elif op.name == "MEMOIZE":
                        memo[len(memo)] = last
                    elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                        memo[int(arg)] = last
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        last = memo.get(int(arg))
                        if isinstance(last, str):
                            strings.append(last)
                    elif op.name in ("GLOBAL", "INST"):
                        names.append(str(arg).replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    else:
                        last = None
            except Exception:  # not (or no longer) a pickle: raw storage bytes, or no pickle at all
                f.seek(start)
                break
            if not ops or (ops[0] != "PROTO" and not {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"} & set(ops)):
                break  # a lone STOP or a few stray bytes that happen to parse
            parsed += 1
    return names if parsed else None


def _refused_pickle(path: Path, torch_message: str) -> OvdenseError | None:
    """Our words for a pickle that ``torch.load(weights_only=True)`` refuses (None: the file is no pickle)."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    if found:  # torch.save's zip format holding an object: torch names it
        names = [found.group(1)]
    else:
        try:
            names = _pickled_globals(path)
        except OSError:
            names = None
        if names is None:
            return None
        # What torch's safe loader allows itself is torch's own and OrderedDict: name anything else.
        names = [n for n in names if not n.startswith(("torch.", "collections.OrderedDict"))]
    fix = "save its state dict of tensors, or convert it to safetensors"
    if names:
        return OvdenseError(
            f"checkpoint {path} is not a weights file that loads safely: it contains Python objects ({names[0]}); {fix}"
        )
    return OvdenseError(
        f"checkpoint {path} is not a weights file that loads safely: it is a Python pickle that torch's safe "
        f"loader (weights_only=True) refuses; {fix}"
    )


def _unreadable(path: Path, err: Exception) -> OvdenseError:
    """Our one line for a weights file a reader refused with ``err``."""
    if isinstance(err, pickle.UnpicklingError):
        # torch's message explains how to load the file unsafely; we never do, so say what the file holds.
        refused = _refused_pickle(path, str(err))
        if refused is not None:
            return refused
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    if path.suffix == ".safetensors" or head.startswith(b"PK"):  # safetensors, or a zip archive (torch.save, JIT)
        reason = first_line(err)
    elif head[:1] == b"\x80":  # a pickle stream (a legacy torch.save file) that ends early or is damaged
        reason = f"a damaged or truncated pickle ({first_line(err)})"
    else:
        reason = "not a PyTorch weights file (neither torch.save's zip archive nor a pickle)"
    return OvdenseError(f"cannot read checkpoint {path}: {reason}")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Read a weights file into a flat state dict.

    Pickled files are read with ``torch.load(weights_only=True)`` only; a pickle it refuses (Python objects, a
    raw ``pickle.dumps`` file, anything beyond tensors and plain containers) is refused in our words, never loaded
    otherwise. torch's own warnings while reading (such as its note on pickle protocols) are not shown.

    Returns:
        (state_dict, format) with format ``safetensors``, ``openai-jit`` or ``torch``.

    Raises:
        OvdenseError: missing, unreadable or corrupt file, a pickle that does not load safely, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise OvdenseError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu"), "safetensors"
        if _is_torchscript_archive(path):
            # OpenAI's releases are TorchScript archives: open_clip reads them with torch.jit.load too. torch
            # deprecates TorchScript with a FutureWarning that says nothing to a user loading weights.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            for key in ("input_resolution", "context_length", "vocab_size"):
                sd.pop(key, None)
            return dict(sd), "openai-jit"
        with warnings.catch_warnings(record=True):  # torch's notes on the file (pickle protocol...): not ours
            warnings.simplefilter("always")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except OvdenseError:
        raise
    except Exception as err:  # every reader raises its own type for a corrupt file
        raise _unreadable(path, err) from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OvdenseError(f"cannot read checkpoint {path}: it holds no state dict of tensors")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj, "torch"


def _summarise_mismatch(err: Exception | None, missing, unexpected, label: str) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if err is not None and not parts:
        lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
        parts.append(lines[0].rstrip(".") if lines else first_line(err))
    return f"checkpoint does not fit {label}: " + "; ".join(parts)


def load_strict(module: torch.nn.Module, state_dict: dict, label: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise OvdenseError(_summarise_mismatch(None, missing, unexpected, label))
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        raise OvdenseError(_summarise_mismatch(err, [], [], label)) from None


def _is_eva_clip_layout(state_dict: dict) -> bool:
    return any(k.startswith(("visual.blocks.", "visual.pos_embed")) for k in state_dict)


def load_state_into(model, state_dict: dict, model_name: str, allow_missing_text: bool = False) -> str:
    """Load a flat state dict (any supported layout) into an open_clip model, strictly.

    Returns the detected layout (``eva-clip`` or ``open_clip``).
    """
    if _is_eva_clip_layout(state_dict):
        trunk = getattr(model.visual, "trunk", None)
        if trunk is None:
            raise OvdenseError(f"checkpoint is an EVA-CLIP (EVA02) checkpoint; {model_name} is not an EVA02 model")
        from timm.models.eva import checkpoint_filter_fn

        visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
        # The filter renames EVA-CLIP keys (q_bias, inner_attn_ln, w1/w2/w3...) to timm's; it only
        # resamples position tables when their size differs, which load_strict then reports anyway.
        try:
            converted = checkpoint_filter_fn(visual, trunk)
        except Exception as err:
            raise OvdenseError(f"checkpoint does not fit {model_name}: {err}") from None
        load_strict(trunk, converted, f"{model_name} (image tower)")
        text = {k[len("text.") :]: v for k, v in state_dict.items() if k.startswith("text.")}
        if text:
            load_strict(model.text, text, f"{model_name} (text tower)")
        elif not allow_missing_text:
            raise OvdenseError(
                "checkpoint holds no text tower (text.*); also pass the base weights' tag "
                "(e.g. --pretrained merged2b_s8b_b131k) to take the text tower from them"
            )
        if "logit_scale" in state_dict:
            model.logit_scale.data.copy_(state_dict["logit_scale"].reshape(model.logit_scale.shape))
        return "eva-clip"
    sd = dict(state_dict)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = open_clip.model.convert_to_custom_text_state_dict(sd)
    if "logit_scale" in sd and model.logit_scale.ndim != sd["logit_scale"].ndim:
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    load_strict(model, sd, model_name)
    return "open_clip"


def _activation(model, model_cfg_quick: bool) -> str:
    if hasattr(model.visual, "trunk"):
        return "swiglu"
    return "quick_gelu" if model_cfg_quick else "gelu"


def _hub_failure(err: Exception, name: str, tag: str | None) -> OvdenseError:
    """``tag`` None: an ``hf-hub:`` repo (no pretrained= in the suggested command)."""
    first = cause_line(err)
    args = f"'{name}', pretrained='{tag}'" if tag else f"'{name}'"
    return OvdenseError(
        f"weights for {name} ({tag or 'hub repo'}) are not in the local cache and could not be downloaded "
        f"({first}). " + _OFFLINE_HELP.format(args=args)
    )


class _DropOpenClipRootLogs(logging.Filter):
    """open_clip reports on the root logger; ovdense turns the same events into its own errors and notes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "open_clip" not in record.pathname


@contextlib.contextmanager
def _quiet_open_clip():
    root = logging.getLogger()
    quiet = _DropOpenClipRootLogs()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _create_seeded(model_name: str, quick_gelu: bool):
    """An architecture with seed-0 random weights: a test arch, or the shell a checkpoint fills.

    open_clip warns that the model is random; here that is intended (test archs get the CLI's own loud
    warning, checkpoints overwrite every weight strictly), so the warning is dropped.
    """
    with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return open_clip.create_model(model_name, force_quick_gelu=quick_gelu, device="cpu")


def hub_reachable(url: str, timeout: float = 5.0) -> str | None:
    """None if a TCP connection to the URL's host opens, else the reason (DNS failure, refused...)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return f"{parts.hostname}:{port} unreachable: {err.strerror or err}"


_DEFAULT_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _unreachable_reason(repo_id: str, files: Sequence[str]) -> str | None:
    """None when the hub client can answer at once: one of ``files`` of ``repo_id`` is in the hub cache, or
    offline mode is on (the client then fails without retries); else why the hub host is out of reach, if
    it is."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in files):
        return None
    return hub_reachable(constants.ENDPOINT)


def _check_tag_available(model_name: str, tag: str) -> None:
    """Fail in seconds, not after the hub client's minute of retries, when weights can't be had.

    Weights already in the hub cache (or offline mode, where the client fails at once) pass; otherwise
    the download host must accept a connection.
    """
    cfg = get_pretrained_cfg(model_name, tag)
    hub_id = cfg.get("hf_hub", "")
    if hub_id:
        # open_clip's convention: 'org/repo/file' names a file, 'org/repo/' the default weight files.
        repo_id, filename = os.path.split(hub_id)
        reason = _unreachable_reason(repo_id, [filename] if filename else _DEFAULT_WEIGHT_FILES)
    elif cfg.get("url"):
        reason = hub_reachable(cfg["url"])
    else:
        return
    if reason:
        args = f"'{model_name}', pretrained='{tag}'"
        raise OvdenseError(
            f"weights for {model_name} ({tag}) are not in the local cache and could not be downloaded "
            f"({reason}). " + _OFFLINE_HELP.format(args=args)
        )


def _check_hub_repo_available(model_name: str) -> None:
    """:func:`_check_tag_available` for an ``hf-hub:org/repo`` name: its config and weights cached, or the
    hub reachable."""
    from huggingface_hub import try_to_load_from_cache

    repo_id = model_name[len("hf-hub:") :]
    if isinstance(try_to_load_from_cache(repo_id, "open_clip_config.json"), str):
        reason = _unreachable_reason(repo_id, _DEFAULT_WEIGHT_FILES)
    else:
        reason = _unreachable_reason(repo_id, ["open_clip_config.json"])
    if reason:
        raise OvdenseError(
            f"weights for {model_name} (hub repo) are not in the local cache and could not be downloaded "
            f"({reason}). " + _OFFLINE_HELP.format(args=f"'{model_name}'")
        )


#: The CLIP a method gets when neither it nor the caller names one: OpenAI's ViT-B/16, as every reference.
DEFAULT_MODEL = "ViT-B-16"


@dataclass(frozen=True)
class WeightsChoice:
    """The weights a caller's arguments resolve to (:func:`resolve_weights`).

    Attributes:
        model: the open_clip architecture, ``hf-hub:`` name or test arch.
        pretrained: the open_clip tag, or None (a file, a hub repo or a test arch carries the weights).
        checkpoint: a local weights file, or None.
        chosen: what was chosen for the caller, in words (None: everything was given).
    """

    model: str
    pretrained: str | None
    checkpoint: str | None
    chosen: str | None = None


def resolve_weights(
    model: str | None = None,
    pretrained: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    default_model: str | None = None,
    default_pretrained: str | None = None,
) -> WeightsChoice:
    """Fill in what the caller left out: the default architecture (``default_model``, e.g. a method's own, else
    :data:`DEFAULT_MODEL`) with its tag, and, for an architecture given without weights, its ``openai`` tag
    where it has one, else its first tag.

    Raises:
        OvdenseError: an unknown architecture (the message lists where to look).
    """
    chosen = []
    if model is None:
        model = default_model or DEFAULT_MODEL
        if default_pretrained and pretrained is None and checkpoint is None:
            pretrained = default_pretrained
        chosen.append(f"model {model}" + (f" ({pretrained})" if pretrained else ""))
    if pretrained is None and checkpoint is None and not model.startswith("hf-hub:") and not is_test_model(model):
        if model not in open_clip.list_models():
            raise OvdenseError(f"unknown model {model!r}; run `ovdense list-models` to see the choices")
        tags = open_clip.list_pretrained_tags_by_model(model)
        if tags:
            pretrained = "openai" if "openai" in tags else tags[0]
            chosen.append(f"pretrained tag {pretrained} of {model}")
    return WeightsChoice(
        model, pretrained, None if checkpoint is None else str(checkpoint), "; ".join(chosen) or None
    )


def load_model(
    model_name: str,
    pretrained: str | None = None,
    checkpoint: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    visual_state: dict[str, torch.Tensor] | None = None,
    visual_label: str = "the image tower",
) -> LoadedModel:
    """Load a CLIP for dense inference.

    Args:
        model_name: an open_clip architecture (see :func:`list_models`), ``hf-hub:org/repo``, or a test arch
            (``ovdense-test-vit``, ``ovdense-test-eva02``; random weights).
        pretrained: an open_clip pretrained tag (e.g. ``openai``), or a weights file path.
        checkpoint: a weights file (safetensors, open_clip/OpenAI state dict, OpenAI TorchScript archive,
            EVA-CLIP layout). With ``pretrained`` too, the tag's weights load first and the file overrides
            them (for checkpoints holding only the image tower).
        device: where to put the model; CUDA requested without CUDA is an error.
        visual_state: an image tower (``visual.*`` keys, open_clip or EVA-CLIP names) that replaces the one of
            the weights, strictly (a detector's frozen tower). Without ``pretrained``/``checkpoint`` it is the only
            weights: the text tower stays random and ``has_text_weights`` is False.
        visual_label: how messages name ``visual_state``'s source.

    Raises:
        OvdenseError: with a one-line, actionable message.
    """
    dev = resolve_device(device)
    if pretrained and Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") and checkpoint is None:
        checkpoint, pretrained = pretrained, None
    notes: list[str] = []
    hub = model_name.startswith("hf-hub:")
    if not hub and model_name not in open_clip.list_models():
        raise OvdenseError(f"unknown model {model_name!r}; run `ovdense list-models` to see the choices")
    if not hub and model_name not in list_models():
        raise OvdenseError(f"model {model_name!r} has no dense head in ovdense (only ViT and EVA02 towers)")
    test_arch = is_test_model(model_name)
    if test_arch and pretrained:
        raise OvdenseError(f"{model_name} is a random test architecture; it has no pretrained tag")
    cfg_quick = bool((open_clip.get_model_config(model_name) or {}).get("quick_gelu", False)) if not hub else False

    if hub:
        if pretrained:
            raise OvdenseError("an hf-hub: model carries its own weights; drop --pretrained")
        _check_hub_repo_available(model_name)
        try:
            # Without require_pretrained open_clip only logs a warning when the repo's weights file cannot be
            # had, and returns a randomly initialised model.
            with _quiet_open_clip():
                model = open_clip.create_model(model_name, device="cpu", require_pretrained=True)
        except Exception as err:
            raise _hub_failure(err, model_name, None) from None
        source = model_name
        cfg_quick = any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())
    elif pretrained:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise OvdenseError(
                f"unknown pretrained tag {pretrained!r} for {model_name}; available: {', '.join(tags) or 'none'}"
            )
        tag_quick = bool(get_pretrained_cfg(model_name, pretrained).get("quick_gelu", False))
        if tag_quick and not cfg_quick:
            # open_clip builds GELU for 'ViT-B-16' even with OpenAI weights, which silently changes features.
            notes.append(f"{model_name}/{pretrained} was trained with QuickGELU; using QuickGELU")
        cfg_quick = cfg_quick or tag_quick
        _check_tag_available(model_name, pretrained)
        try:
            with _quiet_open_clip():
                model = open_clip.create_model(
                    model_name, pretrained=pretrained, force_quick_gelu=cfg_quick, device="cpu"
                )
        except Exception as err:
            raise _hub_failure(err, model_name, pretrained) from None
        source = f"{model_name}/{pretrained}"
    else:
        model = None
        source = "random (test architecture)" if test_arch else None

    if checkpoint is not None:
        has_base_weights = model is not None  # a tag or hub repo loaded first; the file overrides it
        state_dict, fmt = read_checkpoint(checkpoint)
        if fmt == "openai-jit" and not cfg_quick:
            notes.append("OpenAI TorchScript archive: using QuickGELU")
            cfg_quick = True
            model = None
        if model is None:
            model = _create_seeded(model_name, cfg_quick)
        layout = load_state_into(model, state_dict, model_name, allow_missing_text=has_base_weights)
        source = f"{checkpoint} ({fmt}, {layout} layout)"
        if layout == "open_clip" and not cfg_quick and not hasattr(model.visual, "trunk"):
            notes.append(f"activation GELU (from the name {model_name}); OpenAI weights need {model_name}-quickgelu")
    elif model is None and visual_state is not None:
        model = _create_seeded(model_name, cfg_quick)
        source = visual_label
    elif model is None:
        if not test_arch:
            some_tags = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)[:4])
            raise OvdenseError(
                f"no weights given for {model_name}: pass pretrained= a tag ({some_tags}...) or checkpoint= a file"
            )
        model = _create_seeded(model_name, cfg_quick)

    has_text_weights = True
    if visual_state is not None:
        has_text_weights = test_arch or checkpoint is not None or source != visual_label
        _load_visual(model, visual_state, model_name, visual_label)
    if test_arch and model_name not in _WARNED_RANDOM:
        _WARNED_RANDOM.add(model_name)
        warnings.warn(
            f"{model_name} is a RANDOM test architecture: its predictions are meaningless (tests and smoke runs only)",
            RandomWeightsWarning,
            stacklevel=2,
        )
    model = model.to(dev).eval()
    logging.getLogger(__name__).debug("loaded %s from %s", model_name, source)
    try:
        tower = tower_for(model)
    except ValueError as err:
        raise OvdenseError(str(err)) from None
    return LoadedModel(
        model=model,
        tokenizer=open_clip.get_tokenizer(model_name),
        tower=tower,
        model_name=model_name,
        source=source,
        activation=_activation(model, cfg_quick),
        is_test_model=test_arch,
        notes=notes,
        has_text_weights=has_text_weights,
    )


def _load_visual(model, visual_state: dict, model_name: str, label: str) -> None:
    """Replace ``model``'s image tower by ``visual_state`` (``visual.*`` keys), strictly."""
    if _is_eva_clip_layout(visual_state):
        trunk = getattr(model.visual, "trunk", None)
        if trunk is None:
            raise OvdenseError(f"{label} holds an EVA-CLIP (EVA02) tower; {model_name} is not an EVA02 model")
        from timm.models.eva import checkpoint_filter_fn

        try:
            converted = checkpoint_filter_fn(dict(visual_state), trunk)
        except Exception as err:
            raise OvdenseError(f"{label} does not fit {model_name}: {first_line(err)}") from None
        load_strict(trunk, converted, f"{model_name} (image tower of {label})")
        return
    own = {k[len("visual.") :]: v for k, v in visual_state.items() if k.startswith("visual.")}
    load_strict(model.visual, own, f"{model_name} (image tower of {label})")


def model_folder_or_hub(
    model: str | os.PathLike, what: str, entries: Sequence[str], marker: str, offline_help: str
) -> tuple[str, str, dict]:
    """Where a transformers/diffusers model comes from: a local ``save_pretrained`` folder or a hub id.

    A folder must hold ``entries`` (files or sub-folders). A hub id must be in the hub cache (its ``marker`` file)
    or the hub must accept a connection: otherwise the answer comes in seconds, not after the hub client's minute
    of retries; with the hub out of reach and the model cached, it loads from the cache only.

    Args:
        model: a folder or ``org/name``.
        what: how messages name the model (``"Stable Diffusion"``, ``"the mask generator"``).
        entries: what a folder of it holds.
        marker: a file of the hub repo that shows it is cached (``"unet/config.json"``).
        offline_help: the advice appended when it can't be had, with ``{repo}`` for the id.

    Returns:
        ``(where, source, from_pretrained_kwargs)``: the path or id to load, a label for the logs, and
        ``{"local_files_only": True}`` or ``{}``.

    Raises:
        OvdenseError: a folder without ``entries``, a file, a missing folder, or an id neither cached nor reachable.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    text = str(model)
    local = Path(text).expanduser()
    if local.is_dir():
        missing = [e for e in entries if not (local / e).exists()]
        if missing:
            raise OvdenseError(f"{local} is not a folder of {what} (no {', '.join(missing)})")
        return str(local), str(local), {}
    if local.is_file():
        raise OvdenseError(f"{local} is a file; {what} needs a folder (save_pretrained) or a hub id")
    if text.startswith((".", "/", "~")) or text.count("/") != 1 or "\\" in text:
        raise OvdenseError(f"{what} folder not found: {local}")
    cached = isinstance(try_to_load_from_cache(text, marker), str)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_reachable(constants.ENDPOINT)
    if reason and not cached:
        raise OvdenseError(
            f"{what} {text} is not in the local cache and could not be downloaded ({reason}). "
            + offline_help.format(repo=text)
        )
    return text, f"hub {text}", {"local_files_only": True} if reason else {}
