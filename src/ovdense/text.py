"""Text side of the SCLIP protocol: per-name embeddings averaged over the 80 OpenAI ImageNet templates.

For each class *name* every template is embedded, each template embedding is L2-normalised, the 80 are
averaged and the mean is re-normalised (as in SCLIP's ``clip_segmentor.py``). A class may have several
names (synonyms); the image side takes the softmax over all names and then the max over a class's names,
so :func:`build_text_classifier` returns one embedding per name plus a name -> class index.

Speed: all prompts (names x templates) run in large batches, and for causal towers that pool at the
end-of-text token the context is cut to the longest prompt in the batch, which is exact (see
:func:`_truncatable_text_tower`). Results are cached on disk as safetensors files keyed by the text
tower's weights, the names, the templates and the tokenizer context length.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, text_global_pool
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from tqdm.auto import tqdm

from .classes import parse_class_string, validate_classes
from .fileio import write_atomic

__all__ = [
    "DETECTION_TEMPLATES",
    "DetectionTemplate",
    "OPENAI_TEMPLATES",
    "TextClassifier",
    "build_text_classifier",
    "classifier_of",
    "default_cache_dir",
    "embeddings_digest",
    "encode_prompts",
    "flatten_classes",
    "text_embeddings",
    "text_tower_digest",
]

OPENAI_TEMPLATES: tuple = tuple(OPENAI_IMAGENET_TEMPLATES)
"""The 80 OpenAI ImageNet prompt templates (callables ``t(name) -> str``)."""

Template = Callable[[str], str] | str


def _article(name: str) -> str:
    return "an" if name[:1] in ("a", "e", "i", "o", "u") else "a"


def _prompt_name(name: str) -> str:
    # LVIS writes spaces as '_' and Objects365 alternatives as '/'.
    return name.replace("_", " ").replace("/", " or ").lower().rstrip(".")


@dataclass(frozen=True)
class DetectionTemplate:
    """A ViLD-style detection prompt: ``pattern`` with ``{article}`` and ``{}`` slots.

    ``t(name)`` fills the slot with the name lower-cased (``_`` -> space, ``/`` -> `` or ``, trailing dots
    dropped) and the article from the name's first letter, then prefixes ``"This is "`` when the prompt
    starts with ``a`` or ``the`` (as CLIPSelf's and DeCLIP's ``generate_text_embeddings.py``).
    """

    pattern: str

    def __call__(self, name: str) -> str:
        text = self.pattern.format(_prompt_name(name), article=_article(name))
        return "This is " + text if text.startswith(("a", "the")) else text

    @property
    def cache_key(self) -> str:
        # The prompt depends on the name beyond plain substitution, so the key names the rule too.
        return "detection:" + self.pattern


DETECTION_TEMPLATES: tuple[DetectionTemplate, ...] = tuple(
    DetectionTemplate(p)
    for p in (
        "There is {article} {} in the scene.",
        "There is the {} in the scene.",
        "a photo of {article} {} in the scene.",
        "a photo of the {} in the scene.",
        "a photo of one {} in the scene.",
        "itap of {article} {}.",
        "itap of my {}.",
        "itap of the {}.",
        "a photo of {article} {}.",
        "a photo of my {}.",
        "a photo of the {}.",
        "a photo of one {}.",
        "a photo of many {}.",
        "a good photo of {article} {}.",
        "a good photo of the {}.",
        "a bad photo of {article} {}.",
        "a bad photo of the {}.",
        "a photo of a nice {}.",
        "a photo of the nice {}.",
        "a photo of a cool {}.",
        "a photo of the cool {}.",
        "a photo of a weird {}.",
        "a photo of the weird {}.",
        "a photo of a small {}.",
        "a photo of the small {}.",
        "a photo of a large {}.",
        "a photo of the large {}.",
        "a photo of a clean {}.",
        "a photo of the clean {}.",
        "a photo of a dirty {}.",
        "a photo of the dirty {}.",
        "a bright photo of {article} {}.",
        "a bright photo of the {}.",
        "a dark photo of {article} {}.",
        "a dark photo of the {}.",
        "a photo of a hard to see {}.",
        "a photo of the hard to see {}.",
        "a low resolution photo of {article} {}.",
        "a low resolution photo of the {}.",
        "a cropped photo of {article} {}.",
        "a cropped photo of the {}.",
        "a close-up photo of {article} {}.",
        "a close-up photo of the {}.",
        "a jpeg corrupted photo of {article} {}.",
        "a jpeg corrupted photo of the {}.",
        "a blurry photo of {article} {}.",
        "a blurry photo of the {}.",
        "a pixelated photo of {article} {}.",
        "a pixelated photo of the {}.",
        "a black and white photo of the {}.",
        "a black and white photo of {article} {}.",
        "a plastic {}.",
        "the plastic {}.",
        "a toy {}.",
        "the toy {}.",
        "a plushie {}.",
        "the plushie {}.",
        "a cartoon {}.",
        "the cartoon {}.",
        "an embroidered {}.",
        "the embroidered {}.",
        "a painting of the {}.",
        "a painting of a {}.",
    )
)
"""The 63 ViLD templates of the region-classification protocol (CLIPSelf, DeCLIP, SCD)."""

# Bump when the cached quantity or its file layout changes, so old files are never reused.
_CACHE_VERSION = 3
_TRUNCATABLE_POOLS = ("argmax", "eos")
_PROGRESS_MIN_BATCHES = 5
_CLIP_TEXT_ATTRS = ("token_embedding", "positional_embedding", "transformer", "ln_final")


def flatten_classes(classes: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """Names in order and their class indices.

    Returns:
        ``(names, name_to_class)``: N names and an int64 tensor of shape (N,) with each name's class.
    """
    return _flatten(validate_classes(classes))


def _flatten(classes: list[list[str]]) -> tuple[list[str], torch.Tensor]:
    names = [name for names in classes for name in names]
    name_to_class = torch.tensor([ci for ci, names in enumerate(classes) for _ in names], dtype=torch.long)
    return names, name_to_class


# -- text tower access ------------------------------------------------------------------------------


@dataclass
class _CausalTextTower:
    """The modules of a loaded model's text tower, for a forward over a cut context."""

    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    text_projection: torch.nn.Module | torch.Tensor | None
    attn_mask: torch.Tensor
    pool_type: str
    eos_id: int | None


def _is_causal_mask(mask) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
        return False
    if not mask.is_floating_point():
        return False
    return bool(torch.equal(mask, torch.full_like(mask, float("-inf")).triu_(1)))


def _truncatable_text_tower(model) -> _CausalTextTower | None:
    """The text modules of ``model`` if cutting the context to the longest prompt is exact, else ``None``.

    Cutting is exact when the tower is causal and pools at a single token that the prompt itself
    determines (the end-of-text token: ``argmax`` of the ids for OpenAI/open_clip CLIP, or the first
    ``eos`` id): with a causal mask no token attends to later ones, so padding after that token never
    reaches the pooled feature, and slicing tokens ``[:, :L]``, ``positional_embedding[:L]`` and the mask
    ``[:L, :L]`` reproduces ``encode_text`` up to fp32 rounding.

    Anything else runs ``model.encode_text`` at full length: bidirectional towers (padding is attended
    to), an appended class token (CoCa, pooled at the last position), padding masks, ``first``/``last``
    pooling, HF text towers, and any subclass that overrides the forward (we cannot know what it does).
    """
    if isinstance(model, CLIP) and type(model).encode_text is CLIP.encode_text:
        # CLIP keeps the text modules on the model itself.
        holder, pool_type, eos_id = (
            model,
            getattr(model, "text_pool_type", "argmax"),
            getattr(model, "text_eos_id", None),
        )
    elif isinstance(model, CustomTextCLIP) and type(model).encode_text is CustomTextCLIP.encode_text:
        text = model.text
        if not (
            isinstance(text, TextTransformer)
            and type(text).forward is TextTransformer.forward
            and type(text)._embeds is TextTransformer._embeds
            and text.cls_emb is None
            and not text.use_pad_mask
            and not text.output_tokens
        ):
            return None
        holder, pool_type, eos_id = text, text.pool_type, getattr(text, "eos_id", None)
    else:
        return None
    tower = _CausalTextTower(
        token_embedding=holder.token_embedding,
        positional_embedding=holder.positional_embedding,
        transformer=holder.transformer,
        ln_final=holder.ln_final,
        text_projection=holder.text_projection,
        attn_mask=holder.attn_mask,
        pool_type=pool_type,
        eos_id=eos_id,
    )
    if tower.pool_type not in _TRUNCATABLE_POOLS or (tower.pool_type == "eos" and tower.eos_id is None):
        return None
    if not _is_causal_mask(tower.attn_mask):
        return None
    return tower


def _pool_positions(tower: _CausalTextTower, tokens: torch.Tensor) -> torch.Tensor:
    # Mirrors text_global_pool: argmax/first-eos return the first match, so it stays inside any cut >= pos+1.
    if tower.pool_type == "argmax":
        return tokens.argmax(dim=-1)
    return (tokens == tower.eos_id).int().argmax(dim=-1)


def _encode_truncated(tower: _CausalTextTower, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``encode_text`` of ``tokens`` with the context cut to ``length`` (same ops, same order)."""
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    x = text_global_pool(x, tokens, tower.pool_type, eos_token_id=tower.eos_id)
    proj = tower.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model):
    # Per-module flags: a model in eval with a submodule left in train mode comes back exactly as it was.
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def encode_prompts(
    model,
    tokenizer,
    prompts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Projected text features of ``prompts``, as ``model.encode_text(tokenizer(prompts))`` but faster.

    Prompts run ``batch_size`` at a time. For causal towers pooled at the end-of-text token the prompts
    are grouped by length and each batch's context is cut to its longest prompt (exact, see
    :func:`_truncatable_text_tower`); other towers run ``encode_text`` at full length.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP`` (anything with ``encode_text``).
        tokenizer: its tokenizer (``list[str] -> LongTensor P x context_length``).
        prompts: P strings.
        batch_size: prompts per forward pass.
        device: where to run; default the model's device.

    Returns:
        P x D float32 tensor of un-normalised features on ``device``, in the order of ``prompts``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = list(prompts)
    device = torch.device(device) if device is not None else _model_device(model)
    if not prompts:
        raise ValueError("no prompts to encode")
    tokens = tokenizer(prompts)
    tower = _truncatable_text_tower(model)
    n = tokens.shape[0]
    if tower is not None:
        pos = _pool_positions(tower, tokens)
        # Grouping prompts of similar length keeps the per-batch cut short for every batch.
        order = torch.argsort(pos, stable=True)
    else:
        pos = None
        order = torch.arange(n)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    out: torch.Tensor | None = None
    show = None if len(batches) >= _PROGRESS_MIN_BATCHES else True
    with torch.no_grad(), _eval_mode(model):
        for idx in tqdm(batches, desc="text prompts", unit="batch", disable=show, leave=False):
            tok = tokens[idx].to(device)
            if tower is not None:
                feats = _encode_truncated(tower, tok, int(pos[idx].max()) + 1)
            else:
                feats = model.encode_text(tok)
            feats = feats.float()
            if out is None:
                out = torch.empty(n, feats.shape[-1], dtype=torch.float32, device=feats.device)
            out[idx.to(feats.device)] = feats
    return out


# -- cache ------------------------------------------------------------------------------------------


def _text_tower_tensors(model) -> list[tuple[str, torch.Tensor]]:
    text = getattr(model, "text", None)
    if isinstance(text, torch.nn.Module):
        named = list(text.named_parameters()) + list(text.named_buffers())
    elif all(hasattr(model, a) for a in _CLIP_TEXT_ATTRS):
        named = []
        for prefix in ("token_embedding", "transformer", "ln_final"):
            module = getattr(model, prefix)
            named += [(f"{prefix}.{n}", t) for n, t in module.named_parameters()]
            named += [(f"{prefix}.{n}", t) for n, t in module.named_buffers()]
        for attr in ("positional_embedding", "attn_mask"):
            if isinstance(getattr(model, attr, None), torch.Tensor):
                named.append((attr, getattr(model, attr)))
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, torch.nn.Module):
            named += [(f"text_projection.{n}", t) for n, t in proj.named_parameters()]
        elif isinstance(proj, torch.Tensor):
            named.append(("text_projection", proj))
    else:
        # Unknown layout: the whole model is a safe (if slower, over-specific) key.
        named = list(model.named_parameters()) + list(model.named_buffers())
    return named


def text_tower_digest(model) -> str:
    """sha256 (hex) over the text tower's parameters and buffers: names, dtypes, shapes and bytes.

    Only the text tower counts (``CLIP``: token embedding, positional embedding, transformer, final LN,
    projection and causal mask; ``CustomTextCLIP``: ``model.text``), so models that share a text tower
    share cached embeddings. Its pooling settings are included too. Runs on CPU (about 0.2 s per 100 MB
    of weights).
    """
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    text = getattr(model, "text", None)
    settings = (("pool_type", text), ("eos_id", text), ("text_pool_type", model), ("text_eos_id", model))
    for attr, owner in settings:
        if owner is not None and hasattr(owner, attr):
            h.update(f"|{attr}={getattr(owner, attr)!r}".encode())
    for name, tensor in _text_tower_tensors(model):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # A uint8 view hashes any dtype (bf16 included) without a copy or a per-element loop.
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$OVDENSE_CACHE/text``, or ``~/.cache/ovdense/text`` when ``OVDENSE_CACHE`` is unset."""
    root = os.environ.get("OVDENSE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "ovdense") / "text"


def _template_string(template: Template) -> str:
    key = getattr(template, "cache_key", None)
    if key is not None:
        return key
    return template if isinstance(template, str) else template("{}")


def _fill(template: Template, name: str) -> str:
    return template.format(name) if isinstance(template, str) else template(name)


def _cache_key(digest: str, name: str, template_strings: list[str], context_length) -> str:
    payload = {
        "version": _CACHE_VERSION,
        "text_tower": digest,
        "name": name,
        "templates": template_strings,
        "context_length": context_length,
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def embeddings_digest(embeddings: torch.Tensor) -> str:
    """sha256 (hex) of a float32 N x D tensor's shape and bytes: stored with a cache file, checked on read."""
    t = embeddings.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _load_cached(path: Path, n_names: int) -> torch.Tensor | None:
    """The cached N x D embeddings at ``path``; None (with a warning) for a file that is unreadable or whose
    values do not match the digest written with them, so it is recomputed and rewritten."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("digest")
            emb = f.get_tensor("embeddings")
        if emb.ndim != 2 or emb.shape[0] != n_names or emb.dtype != torch.float32:
            raise ValueError(f"unexpected embeddings {tuple(emb.shape)} {emb.dtype}")
        if stored is None:
            raise ValueError("no digest recorded")
        if embeddings_digest(emb) != stored:
            raise ValueError("its values do not match the digest written with them")
    except Exception as err:  # noqa: BLE001 - any unreadable or altered cache file is recomputed
        warnings.warn(f"text-embedding cache file {path} is damaged ({err}); recomputing it", stacklevel=4)
        return None
    return emb


def _save_cached(path: Path, embeddings: torch.Tensor, names: list[str]) -> None:
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"names": json.dumps(names), "digest": embeddings_digest(embeddings)}
    data = save({"embeddings": embeddings.contiguous()}, metadata=metadata)
    # Atomic: concurrent readers see the old file or the complete new one, never a part.
    write_atomic(path, lambda f: f.write(data))


#: Cache folders found unwritable in this process: warned about once, then used read-only.
_UNWRITABLE_CACHES: set[Path] = set()


def _resolve_cache_root(cache_dir) -> Path | None:
    if cache_dir is False:
        return None
    return default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)


def text_embeddings(
    model,
    tokenizer,
    names: Sequence[str],
    templates: Sequence[Template] = OPENAI_TEMPLATES,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Template-averaged embeddings of ``names``, cached on disk per name.

    Per name: embed each template prompt, L2-normalise each, average over templates, re-normalise.

    Each name has its own cache file per (text tower, templates, context length), so a new class list only
    computes the names not seen before. A file carries a digest of its values; one that does not match is
    recomputed with a warning. A cache folder that cannot be written is warned about once per process and the
    run goes on without writing to it.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP``.
        tokenizer: its tokenizer.
        names: N names (no checks: see :func:`ovdense.classes.validate_classes`).
        templates: callables ``t(name) -> str`` (or ``"... {} ..."`` format strings).
        batch_size: prompts per forward pass.
        cache_dir: cache directory; ``None`` means :func:`default_cache_dir`, ``False`` disables caching.
        device: where to run the text tower; default the model's device.

    Returns:
        N x D float32 on the CPU, rows L2-normalised.
    """
    names = list(names)
    templates = list(templates)
    if not templates:
        raise ValueError("no templates")
    root = _resolve_cache_root(cache_dir)
    found: dict[str, torch.Tensor] = {}
    paths: dict[str, Path] = {}
    if root is not None:
        template_strings = [_template_string(t) for t in templates]
        context_length = getattr(tokenizer, "context_length", None)
        digest = text_tower_digest(model)
        for name in dict.fromkeys(names):
            paths[name] = root / f"{_cache_key(digest, name, template_strings, context_length)}.safetensors"
            cached = _load_cached(paths[name], 1)
            if cached is not None:
                found[name] = cached[0]
    missing = [name for name in dict.fromkeys(names) if name not in found]
    if missing:
        prompts = [_fill(t, name) for name in missing for t in templates]
        feats = encode_prompts(model, tokenizer, prompts, batch_size=batch_size, device=device)
        feats = F.normalize(feats.view(len(missing), len(templates), -1), dim=-1)
        fresh = F.normalize(feats.mean(dim=1), dim=-1).cpu()
        for name, emb in zip(missing, fresh, strict=True):
            found[name] = emb
        if paths and root not in _UNWRITABLE_CACHES:
            try:
                for name, emb in zip(missing, fresh, strict=True):
                    _save_cached(paths[name], emb[None].clone(), [name])
            except OSError as err:
                _UNWRITABLE_CACHES.add(root)
                reason = err.strerror or str(err)
                warnings.warn(
                    f"text-embedding cache {root} cannot be written ({reason}); running without it "
                    "(set --text-cache / OVDENSE_CACHE to a writable folder, or 'off')",
                    stacklevel=3,
                )
    return torch.stack([found[name] for name in names])


# -- classifier -------------------------------------------------------------------------------------


@dataclass
class TextClassifier:
    """Per-name text embeddings of a class list.

    Attributes:
        embeddings: N x D float32 on CPU, each row L2-normalised (N = total number of names).
        name_to_class: int64 (N,), the class index of each name.
        class_names: the classes, each a list of its names (in the order of ``embeddings`` when flattened).
    """

    embeddings: torch.Tensor
    name_to_class: torch.Tensor
    class_names: list[list[str]]

    @property
    def num_classes(self) -> int:
        """Number of classes C (``name_to_class`` values are in ``[0, C)``)."""
        return len(self.class_names)


def build_text_classifier(
    model,
    tokenizer,
    classes: Sequence[Sequence[str]] | str,
    templates: Sequence[Template] = OPENAI_TEMPLATES,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str | torch.device | None = None,
) -> TextClassifier:
    """Template-averaged text embeddings of every name of a class list, cached on disk.

    Args:
        model: an open_clip ``CLIP``/``CustomTextCLIP``.
        tokenizer: its tokenizer.
        classes: list of C classes, each a list of names, or a class string (``"sky; person, man"``).
        templates: callables ``t(name) -> str`` (or ``"... {} ..."`` format strings); default the 80
            OpenAI ImageNet templates.
        batch_size: prompts per forward pass.
        cache_dir: cache directory; ``None`` means :func:`default_cache_dir`, ``False`` disables caching.
        device: where to run the text tower; default the model's device.

    Returns:
        a :class:`TextClassifier` with N x D embeddings (N names over all classes), see :func:`text_embeddings`.
    """
    classes = parse_class_string(classes) if isinstance(classes, str) else validate_classes(classes)
    return classifier_of(model, tokenizer, classes, templates, batch_size, cache_dir, device)


def classifier_of(
    model,
    tokenizer,
    classes: list[list[str]],
    templates: Sequence[Template] = OPENAI_TEMPLATES,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None | bool = None,
    device: str | torch.device | None = None,
) -> TextClassifier:
    """:func:`build_text_classifier` for a class list already checked by :func:`ovdense.classes.validate_classes`
    (so its warnings are given once)."""
    names, name_to_class = _flatten(classes)
    embeddings = text_embeddings(model, tokenizer, names, templates, batch_size, cache_dir, device)
    return TextClassifier(embeddings, name_to_class, classes)
