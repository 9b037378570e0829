"""SAM 3 as an open-vocabulary semantic segmenter (``--method sam3``): every class name is a text concept prompt.

SAM 3 (Carion et al., "SAM 3: Segment Anything with Concepts", arXiv 2511.16719, Meta 2025) finds and segments every
instance of a concept given as a short noun phrase; its detector also has a semantic-segmentation head (one map per
prompt). This module runs it through transformers (``Sam3Model``, ``Sam3Processor``; transformers >= 5, the ``[sam3]``
extra) as a method of its own, not a CLIP dense head:

- :class:`Sam3Segmenter`: the interface of :class:`ovdense.Segmenter` that ``ovdense segment``, ``ovdense eval`` and
  :func:`ovdense.eval.runner.evaluate` use (``set_image``, ``predict(classes) -> SegmentationResult``,
  ``text_classifier``, ``preset``, ``head``, ``settings``, ``masks_dir``).
- :func:`load_sam3`: the model and its processor from the hub (``facebook/sam3``: gated, accept its licence on the hub
  first) or a folder saved with ``save_pretrained``.
- :class:`Sam3Head`: the method's registration and options (``--sam3-model``, ``--sam3-score``,
  ``--sam3-prompt-batch``).

Per image SAM 3's vision encoder runs once (at the first :meth:`Sam3Segmenter.predict`, kept for the image); the names
are then text prompts over those image features, ``prompt_batch`` of them per pass of the DETR encoder/decoder and mask
decoder, each name's map kept for the image (another class list reuses the names it shares). Every choice below is
ours (we found no semantic-segmentation protocol in SAM 3's released code):

- prompts: each name of a class verbatim (no templates), tokenized as ``Sam3Processor`` does (32 tokens, longer
  names cut);
- the score of a name at a pixel (option ``score``): ``semantic`` = the sigmoid of SAM 3's semantic-segmentation head
  (the map ``Sam3ImageProcessor.post_process_semantic_segmentation`` thresholds at 0.5); ``instances`` = the max over
  the decoder's queries of sigmoid(query logit) x sigmoid(presence logit) x sigmoid(mask logit) (the instance score
  of ``post_process_instance_segmentation`` times the instance's mask probability, no score threshold);
- the maps (the mask decoder's resolution, 288 x 288 for facebook/sam3, of the image squashed to the processor's
  square) bilinearly resized to the image (``align_corners=False``, as transformers' post-processing); a class's
  score = the max over its names;
- labels: argmax over classes; then, as the CLIP methods (:func:`ovdense.inference.cosine_to_labels`), SCLIP's
  ``area_thd`` when set and ``prob_thd``: pixels whose best class score is below it become class 0 (the background
  class, whose names are the background words). prob_thd 0.5 on VOC21, Context60 and COCO-Object (the threshold at
  which transformers binarises SAM 3's semantic map), 0 elsewhere. The scores are independent sigmoids, not a
  softmax: :attr:`SegmentationResult.probs` does not sum to 1 over classes;
- class names: the SCLIP-style benchmark files (``class_style`` sclip: background words and synonyms);
- precision ``auto``: bf16 autocast on CUDA (not the CLIP methods' fp16: SAM 2's notebooks run bf16 and fp16's range
  is narrower; not measured on SAM 3's weights), fp32 on the CPU.

SAM 3 resizes every image to its processor's square (1008 x 1008 for facebook/sam3) without keeping the aspect ratio,
so the CLIP pipeline's settings (``short_side``, ``long_side``, ``crop``, ``stride``, ``logit_scale``, PAMR, padding)
do not apply: they keep the registered values (:data:`FIXED_SETTINGS`) and an override is refused.

Memory per pass: ``prompt_batch`` copies of the mask decoder's pixel features (256 x 288 x 288 floats each for
facebook/sam3), and with ``score=instances`` also ``prompt_batch`` x 200 query masks; the per-name maps of an image
are kept at 288 x 288, and :meth:`Sam3Segmenter.predict` holds N names x H x W and C classes x H x W floats.

What SAM 3's authors report on semantic segmentation (paper, Table 1, as quoted by secondary summaries; not checked
against the paper itself): ADE-847 13.8 mIoU and PASCAL-Context-59 60.8 (APE-D: 9.2 and 58.5), and a Cityscapes
column whose value we did not find; how they turn concept prompts into one label map is not in their code.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .classes import class_list_key
from .errors import InvalidArgumentError, OvdenseError, cause_line
from .methods import check_options, get_method, head_class, register_method

__all__ = [
    "DEFAULT_SAM3_MODEL",
    "FIXED_SETTINGS",
    "LoadedSam3",
    "SCORES",
    "Sam3Head",
    "Sam3Prompts",
    "Sam3Segmenter",
    "load_sam3",
    "scores_to_labels",
]

#: SAM 3 in transformers' format (gated on the hub: accept the licence on its page, then log in).
DEFAULT_SAM3_MODEL = "facebook/sam3"
#: The per-pixel scores of a name (option ``score``).
SCORES = ("semantic", "instances")
#: Model types whose checkpoint holds SAM 3's detector: its own, and the image + video model (facebook/sam3).
SAM3_MODEL_TYPES = ("sam3", "sam3_video")
#: Preset settings of the CLIP pipeline SAM 3 does not use: they must keep the method's registered values.
FIXED_SETTINGS = (
    "short_side", "long_side", "crop", "stride", "logit_scale", "pamr", "pamr_iterations", "pamr_dilations",
    "pos_rule", "pad_to_patch", "pad_multiple", "vfm", "pretrained",
)  # fmt: skip

#: Text tokens per prompt (``Sam3Processor`` pads and its CLIP text encoder reads 32).
MAX_TOKENS = 32

_EXTRA = "SAM 3 needs transformers >= 5 with Sam3Model: pip install -U 'ovdense[sam3]'"
_OFFLINE_HELP = (
    "facebook/sam3 is gated: accept its licence on the hub, `hf auth login`, then on a machine with internet run "
    "`python -c \"from transformers import Sam3Model, Sam3Processor; Sam3Model.from_pretrained('{repo}'); "
    "Sam3Processor.from_pretrained('{repo}')\"` and copy ~/.cache/huggingface/hub here (or set HF_HUB_CACHE), or pass "
    "a local folder (the model and its processor saved with save_pretrained) as --sam3-model"
)


@register_method(
    "sam3",
    summary="SAM 3 (Meta 2025) as a semantic segmenter: every class name a text concept prompt, one image encoding "
    "per image; its own model, no CLIP (scores and thresholds ours)",
    defaults={"short_side": 1008, "long_side": 1008, "crop": 0},
    datasets={"voc21": {"prob_thd": 0.5}, "context60": {"prob_thd": 0.5}, "coco_object": {"prob_thd": 0.5}},
    model="facebook/sam3",
    order=110,
    ranges={"prompt_batch": {"low": 1}},
)
class Sam3Head:
    """The ``sam3`` method's options; :class:`Sam3Segmenter` runs it (what its pass needs is below).

    The ``model`` option is the preset's ``model`` setting (the registration's ``model``, as a CLIP method's weights):
    ``--sam3-model`` and ``model=`` set it.

    Args:
        model: SAM 3 hub id or save_pretrained folder (default facebook/sam3, gated on the hub).
        score: a name's per-pixel score: semantic (SAM 3's semantic head) or instances (max over its instances of
            score x mask probability).
        prompt_batch: text prompts per decoder pass over the image features (memory only; results do not depend on it).
    """

    needs_text = True
    uses_vfm = False
    uses_masks = False
    own_model = True

    def __init__(self, model: str = "facebook/sam3", score: Literal["semantic", "instances"] = "semantic",
                 prompt_batch: int = 16):  # fmt: skip
        # ``model`` is read from the preset (see above): the argument only declares the --sam3-model flag.
        if score not in SCORES:
            raise ValueError(f"method 'sam3' option 'score': expected one of {', '.join(SCORES)}, got {score!r}")
        self.score = score
        self.prompt_batch = int(prompt_batch)

    @staticmethod
    def load(preset, device=None) -> LoadedSam3:
        """The model of ``preset`` (its ``model`` setting) on ``device``: :func:`load_sam3`."""
        return load_sam3(DEFAULT_SAM3_MODEL if preset.model is None else preset.model, device=device)

    @staticmethod
    def check(preset) -> None:
        """Before anything loads: the preset's CLIP-pipeline settings are SAM 3's (:func:`check_preset`)."""
        check_preset(preset)

    @staticmethod
    def segmenter(loaded: LoadedSam3, preset, precision: str = "auto") -> Sam3Segmenter:
        """The segmenter of ``preset`` on a loaded model."""
        return Sam3Segmenter(loaded, preset, precision=precision)


@dataclass
class Sam3Tower:
    """What the command line's window check (``ovdense.cli.outputs.check_windows``) reads of a model: SAM 3's ViT
    patch size. With the registered 1008 x 1008 bound it refuses only images more elongated than 72:1 (stricter than
    needed: SAM 3 squashes every image to its square)."""

    patch_size: int


@dataclass
class LoadedSam3:
    """A loaded SAM 3, in the shape the command line reads a loaded CLIP (:class:`ovdense.weights.LoadedModel`).

    Attributes:
        model: transformers ``Sam3Model`` in eval mode.
        processor: its ``Sam3Processor`` (image processor and CLIP tokenizer).
        model_name: the hub id or folder it was asked for.
        source: where it came from (``hub facebook/sam3`` or the folder).
        activation: the vision backbone's activation (for the records).
        tower: SAM 3's ViT patch size (14).
        image_size: the side of the square every image is resized to (1008 for facebook/sam3).
    """

    model: object
    processor: object
    model_name: str
    source: str
    activation: str
    tower: Sam3Tower
    image_size: int
    is_test_model: bool = False
    notes: list[str] = field(default_factory=list)
    has_text_weights: bool = True


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise OvdenseError(_EXTRA) from None
    if not hasattr(transformers, "Sam3Model"):
        raise OvdenseError(f"transformers {transformers.__version__} has no Sam3Model; " + _EXTRA)
    return transformers


def load_sam3(model: str | Path = DEFAULT_SAM3_MODEL, device=None) -> LoadedSam3:
    """SAM 3's detector (``Sam3Model``) and processor, in eval mode and float32, on ``device``.

    Args:
        model: a hub id (``facebook/sam3``; its config is the image + video model, whose detector is loaded) or a
            folder with the model and its processor saved by ``save_pretrained`` (``config.json``, weights,
            ``processor_config.json``, tokenizer files).
        device: where it runs (None: CUDA when present, else CPU).

    Raises:
        OvdenseError: transformers without SAM 3, a missing folder, a hub id neither cached nor downloadable (in
            seconds), a checkpoint that is not SAM 3, weights missing from the checkpoint, or any loading error (one
            line each).
    """
    transformers = _import_transformers()
    from .weights import model_folder_or_hub, resolve_device

    dev = resolve_device(device)
    where, source, kw = model_folder_or_hub(model, "SAM 3", ["config.json"], "config.json", _OFFLINE_HELP)
    try:
        config = transformers.AutoConfig.from_pretrained(where, **kw)
        if config.model_type not in SAM3_MODEL_TYPES:
            raise OvdenseError(f"{source} is a {config.model_type!r} model; --method sam3 runs SAM 3 (Sam3Model)")
        net, info = transformers.Sam3Model.from_pretrained(where, output_loading_info=True, **kw)
        missing = list(info.get("missing_keys") or [])
        if missing:  # from_pretrained would fill them with random values: refuse instead
            raise OvdenseError(
                f"{source}: {len(missing)} weights of SAM 3's detector are missing from the checkpoint "
                f"(e.g. {missing[0]})"
            )
        processor = transformers.Sam3Processor.from_pretrained(where, **kw)
    except OvdenseError:
        raise
    except Exception as err:
        raise OvdenseError(f"cannot load SAM 3 from {source}: {cause_line(err)}") from None
    net = net.float().eval().to(dev)
    size = processor.image_processor.size
    vision = net.config.vision_config.backbone_config
    return LoadedSam3(
        model=net,
        processor=processor,
        model_name=str(model),
        source=source,
        activation=str(vision.hidden_act),
        tower=Sam3Tower(int(vision.patch_size)),
        image_size=int(size["height"]),
    )


@dataclass
class Sam3Prompts:
    """The text side of a class list: one prompt per name, encoded once.

    Attributes:
        class_names: the classes, each a list of names.
        names: the N names in order (a class's names together).
        name_to_class: int64 (N,) tensor, each name's class.
        features: N x L x D text features (``Sam3Model.get_text_features(...).pooler_output``), on the model's device.
        attention_mask: N x L (1 = token, 0 = padding).
    """

    class_names: list[list[str]]
    names: list[str]
    name_to_class: object
    features: object
    attention_mask: object

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)


def scores_to_labels(name_scores, name_to_class, prob_thd: float = 0.0, area_thd: float | None = None):
    """Labels from per-name scores in [0, 1]: max over each class's names, SCLIP's area rule, then ``prob_thd``.

    The steps of :func:`ovdense.inference.cosine_to_labels` after its softmax, on scores that are already
    probabilities (SAM 3's sigmoids).

    Args:
        name_scores: N x H x W float tensor.
        name_to_class: (N,) int64, each name's class (C = max + 1).
        prob_thd: pixels whose best class score is below it become class 0.
        area_thd: classes c >= 1 predicted on at most this fraction of the pixels predicted as any class >= 1 get score
            0 everywhere (their pixels fall to the next-best class); None: off.

    Returns:
        ``(labels, class_scores)``: H x W int64 and C x H x W float32.
    """
    import torch

    n_names, height, width = name_scores.shape
    name_to_class = name_to_class.to(device=name_scores.device, dtype=torch.long)
    n_classes = int(name_to_class.max()) + 1
    index = name_to_class.view(n_names, 1, 1).expand(n_names, height, width)
    # Scores are >= 0, so a zero start leaves the max over a class's names unchanged.
    class_scores = name_scores.new_zeros((n_classes, height, width), dtype=torch.float32).scatter_reduce(
        0, index, name_scores.float(), reduce="amax", include_self=True
    )
    if area_thd is not None:
        pred = class_scores.argmax(0)
        area = torch.bincount(pred.flatten(), minlength=n_classes)[1:].to(torch.float32)
        bound = torch.tensor(area_thd, dtype=torch.float32, device=area.device) * area.sum()
        class_scores[1:] *= (area > bound).to(class_scores.dtype).view(-1, 1, 1)
    labels = class_scores.argmax(0)
    labels[class_scores.max(0).values < prob_thd] = 0
    return labels, class_scores


class Sam3Segmenter:
    """Open-vocabulary semantic segmentation with SAM 3, one image encoding per image (see the module docstring).

    Example::

        seg = Sam3Segmenter.from_pretrained(dataset="voc21")  # facebook/sam3
        seg.set_image("photo.jpg")
        result = seg.predict("sky; person, man; tree")
        result.overlay().save("overlay.png")
    """

    #: Not a CLIP method: no region masks, no VFM, no mask generator (what the evaluation loop asks).
    masks_dir = None
    mask_generator = None
    vfm = None

    def __init__(self, loaded: LoadedSam3, preset, precision: str = "auto"):
        """A segmenter on a loaded model (:func:`load_sam3`) with the ``sam3`` preset
        (:func:`ovdense.presets.get_preset`).

        Raises:
            InvalidArgumentError: a preset of another method, an override of a setting SAM 3 does not use, a bad option
                or precision.
        """
        from .precision import check_precision

        self.head = check_preset(preset)
        self.loaded = loaded
        self.preset = preset
        self.device = next(loaded.model.parameters()).device
        check_precision(precision, self.device)
        self.precision = precision
        self._text: dict[tuple, Sam3Prompts] = {}
        self._image = None
        self._pixels = None  # 1 x 3 x S x S, the processor's input
        self._vision = None  # Sam3VisionEncoderOutput of the current image (computed on first use)
        self._name_maps: dict[str, object] = {}  # name -> h x w score map of the current image (mask resolution)

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path | None = None,
        dataset: str | None = None,
        device=None,
        precision: str = "auto",
        **options,
    ) -> Sam3Segmenter:
        """Load SAM 3 and the ``sam3`` settings (of ``dataset`` when given).

        Args:
            model: hub id or folder (default the preset's, :data:`DEFAULT_SAM3_MODEL`).
            dataset: use the method's settings for this benchmark (``prob_thd`` on VOC21, Context60, COCO-Object).
            device: ``cpu``, ``cuda``...; default CUDA when available.
            precision: ``auto`` (bf16 autocast on CUDA, fp32 on the CPU), ``fp32``, ``fp16`` (CUDA), ``bf16``.
            options: ``score``, ``prompt_batch`` and the preset settings that apply (``prob_thd``, ``area_thd``,
                ``class_style``).

        Raises:
            OvdenseError: a bad setting or option (before anything loads), or a model that cannot be loaded.
        """
        from .predictor import resolve_preset

        if model is not None:
            options["model"] = str(model)
        preset = resolve_preset("sam3", dataset, **options)
        check_preset(preset)
        return cls(Sam3Head.load(preset, device), preset, precision)

    @property
    def settings(self) -> dict:
        """Everything that decides this segmenter's output (JSON-serialisable), with the keys of
        :attr:`ovdense.Segmenter.settings` (None where they do not apply)."""
        return {
            "method": self.preset.method,
            "model": self.loaded.model_name,
            "pretrained": None,
            "checkpoint": None,
            "weights": self.loaded.source,
            "activation": self.loaded.activation,
            "chosen": None,
            "vfm": None,
            "masks_dir": None,
            "mask_generator": None,
            "device": str(self.device),
            "precision": self.precision,
            "window_batch": None,
            "preset": self.preset.to_dict(),
        }

    @property
    def image(self):
        """The current image as decoded (H x W x 3 uint8), or None before :meth:`set_image`."""
        return self._image

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "fp32" or (self.precision == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16  # auto on CUDA: bf16 (module docstring)
        return torch.autocast(self.device.type, dtype=dtype)

    def text_classifier(self, classes, templates=None) -> Sam3Prompts:
        """The (cached) text prompts of a class list: every name encoded once by SAM 3's text encoder.

        Args:
            classes: as :meth:`predict`.
            templates: must be None: SAM 3 takes the names verbatim.
        """
        from .classes import normalise_classes

        if templates is not None:
            raise InvalidArgumentError("templates: sam3 prompts each name verbatim (no templates)")
        raw = class_list_key(classes)
        if raw is not None and raw in self._text:
            return self._text[raw]
        parsed = normalise_classes(classes)
        key = ("classes", tuple(tuple(c) for c in parsed))
        if key not in self._text:
            self._text[key] = self._encode_text(parsed)
        if raw is not None:
            self._text[raw] = self._text[key]
        return self._text[key]

    @property
    def _batch(self) -> int:
        return self.head.prompt_batch

    def _encode_text(self, classes: list[list[str]]) -> Sam3Prompts:
        import torch

        names = [n for names in classes for n in names]
        name_to_class = torch.tensor([c for c, names in enumerate(classes) for _ in names], dtype=torch.long)
        tokenizer = self.loaded.processor.tokenizer
        long = [n for n, ids in zip(names, tokenizer(names)["input_ids"], strict=True) if len(ids) > MAX_TOKENS]
        if long:
            warnings.warn(
                f"{len(long)} class name(s) longer than SAM 3's {MAX_TOKENS} text tokens are cut, e.g. {long[0]!r}",
                UserWarning,
                stacklevel=3,
            )
        # Sam3Processor's text settings, with truncation instead of an error for a long name.
        tok = tokenizer(names, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        feats = []
        with torch.no_grad(), self._autocast():
            for start in range(0, len(names), 256):
                out = self.loaded.model.get_text_features(
                    input_ids=ids[start : start + 256], attention_mask=mask[start : start + 256]
                )
                feats.append(out.pooler_output)
        return Sam3Prompts(classes, names, name_to_class, torch.cat(feats), mask)

    def set_image(self, image, masks=None) -> None:
        """Decode an image and prepare SAM 3's input; the vision encoder runs at the first :meth:`predict`.

        Args:
            image: a path, a PIL image or an array (see :func:`ovdense.predictor.load_image`).
            masks: must be None (SAM 3 uses no region masks).

        Raises:
            OvdenseError: an unreadable image; masks given.
        """
        import numpy as np
        from PIL import Image

        from .predictor import load_image

        if masks is not None:
            raise InvalidArgumentError("masks: the sam3 method uses no region masks")
        img = load_image(image)
        processor = self.loaded.processor.image_processor
        pixels = processor(images=Image.fromarray(np.ascontiguousarray(img)), return_tensors="pt")["pixel_values"]
        self._image = img
        self._pixels = pixels.to(self.device)
        self._vision = None
        self._name_maps = {}

    def _vision_features(self):
        """SAM 3's image features of the current image: the one pass of its vision encoder per image."""
        if self._vision is None:
            import torch

            with torch.no_grad(), self._autocast():
                self._vision = self.loaded.model.get_vision_features(pixel_values=self._pixels)
        return self._vision

    def _expanded(self, vision, n: int):
        """The image features repeated for ``n`` prompts (views, no copy)."""
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        def grow(t):
            return t.expand(n, *t.shape[1:])

        return Sam3VisionEncoderOutput(
            last_hidden_state=grow(vision.last_hidden_state),
            fpn_hidden_states=tuple(grow(t) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(grow(t) for t in vision.fpn_position_encoding),
        )

    def _score_maps(self, prompts: Sam3Prompts, indices: list[int]):
        """P x h x w float32 scores of the names ``indices`` at the mask decoder's resolution."""
        import torch
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        vision = self._vision_features()
        with torch.no_grad(), self._autocast():
            out = self.loaded.model(
                vision_embeds=self._expanded(vision, len(indices)),
                text_embeds=BaseModelOutputWithPooling(pooler_output=prompts.features[indices]),
                attention_mask=prompts.attention_mask[indices],
            )
        if self.head.score == "semantic":
            return out.semantic_seg[:, 0].float().sigmoid()
        scores = out.pred_logits.float().sigmoid() * out.presence_logits.float().sigmoid()  # P x Q
        return (scores[:, :, None, None] * out.pred_masks.float().sigmoid()).amax(1)

    def name_scores(self, classes, size: tuple[int, int] | None = None):
        """The per-name score maps of the current image (see the module docstring).

        Args:
            classes: as :meth:`predict`.
            size: (H, W) to resize them to (bilinear); default the mask decoder's resolution.

        Returns:
            N x h x w float32 tensor, names in the class list's order.
        """
        import torch

        if self._image is None:
            raise OvdenseError("call set_image() before name_scores()")
        prompts = self.text_classifier(classes)
        todo = [i for i, n in enumerate(prompts.names) if n not in self._name_maps]
        todo = list({prompts.names[i]: i for i in todo}.values())  # a name twice in a list: one prompt
        for start in range(0, len(todo), self._batch):
            chunk = todo[start : start + self._batch]
            for i, m in zip(chunk, self._score_maps(prompts, chunk), strict=True):
                self._name_maps[prompts.names[i]] = m
        maps = torch.stack([self._name_maps[n] for n in prompts.names])
        if size is None:
            return maps
        return torch.nn.functional.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]

    def predict(self, classes):
        """Segment the current image.

        Args:
            classes: ``"sky; person, person in shirt; tree"``, a list of strings (names of one class separated by
                commas) or a list of name lists. With ``prob_thd > 0`` class 0 is the background: put background words
                first.

        Returns:
            a :class:`ovdense.predictor.SegmentationResult` at the original image size; its ``probs`` are the class
            scores (max over names of independent sigmoids).
        """
        from .predictor import SegmentationResult

        if self._image is None:
            raise OvdenseError("call set_image() before predict()")
        prompts = self.text_classifier(classes)
        p = self.preset
        scores = self.name_scores(classes, self._image.shape[:2])
        labels, class_scores = scores_to_labels(scores, prompts.name_to_class, p.prob_thd, p.area_thd)
        return SegmentationResult(
            labels=labels.cpu().numpy(),
            probs=class_scores.cpu().numpy(),
            class_names=prompts.class_names,
            image=self._image,
            settings=p.to_dict(),
            background=0 if p.prob_thd > 0 else None,
        )

    def __call__(self, image, classes):
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image)
        return self.predict(classes)


def check_preset(preset) -> Sam3Head:
    """A ``sam3`` preset whose CLIP-pipeline settings keep the registered values (:data:`FIXED_SETTINGS`) and whose
    options the head accepts.

    Returns:
        the :class:`Sam3Head` of its options.

    Raises:
        InvalidArgumentError: a preset of another method, the first setting changed, a bad option (one line).
    """
    from .presets import get_preset

    if preset.method != "sam3" or not get_method(preset.method).own_model:
        raise InvalidArgumentError(f"preset: expected the sam3 method's, got {preset.method!r}")
    reference = get_preset("sam3")
    for name in FIXED_SETTINGS:
        value, fixed = getattr(preset, name), getattr(reference, name)
        if value != fixed and not (isinstance(value, float) and math.isclose(value, fixed)):
            raise InvalidArgumentError(
                f"{name}: sam3 does not use it (SAM 3 resizes every image to its own square input, no windows); "
                f"leave it at {fixed}"
            )
    try:
        return head_class("sam3")(**check_options("sam3", preset.head_kwargs))
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None
