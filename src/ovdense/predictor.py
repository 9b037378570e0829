"""``Segmenter``: set an image once, segment it with any class list many times (as SAM's predictor)."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import OvdenseError
from .heads import DenseHead, create_head
from .inference import WindowFeatures, assemble_cosine_maps, cosine_to_labels, encode_windows, mmseg_resize
from .pamr import pamr
from .presets import Preset, get_preset
from .text import OPENAI_TEMPLATES, TextClassifier, build_text_classifier, parse_class_string
from .weights import LoadedModel, load_model

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def load_image(image) -> np.ndarray:
    """An image as H x W x 3 uint8 RGB from a path, a PIL image or an array.

    Raises:
        OvdenseError: missing or unreadable file, or an array of the wrong shape.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise OvdenseError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                # mmseg decodes with cv2, which applies the EXIF orientation; so do we.
                return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise OvdenseError(f"cannot read image {path}: {str(err).splitlines()[0]}") from None
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise OvdenseError(f"expected an H x W x 3 image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise OvdenseError(f"expected a uint8 image array, got {arr.dtype}")
    return np.ascontiguousarray(arr[..., :3])


def pixel_stats(values) -> list[float]:
    """Mean or std of [0, 1] pixels as the references' mmseg configs write them: x 255, 3 decimals.

    SCLIP, NACLIP and ClearCLIP normalise 0-255 pixels with ``mean=[122.771, 116.746, 104.094]``,
    ``std=[68.501, 66.632, 70.323]``, OpenAI's statistics rounded so; the exact values move a few pixels
    of a prediction, so the rounded ones are used for every tower.
    """
    return [round(255.0 * v, 3) for v in values]


def normalise_classes(classes) -> list[list[str]]:
    """Accept ``"a; b, c"``, ``["a", "b, c"]`` or ``[["a"], ["b", "c"]]`` -> ``[["a"], ["b", "c"]]``."""
    if isinstance(classes, str):
        return parse_class_string(classes)
    items = list(classes)
    if not items:
        raise OvdenseError("the class list is empty")
    text = "; ".join(", ".join(c) if isinstance(c, (list, tuple)) else str(c) for c in items)
    return parse_class_string(text)


@dataclass
class SegmentationResult:
    """The segmentation of one image.

    Attributes:
        labels: H x W int64 class indices into ``class_names``.
        logits: C x H x W class probabilities (softmax over all names, max over each class's names,
            after area_thd), at the original image size.
        class_names: the classes, each a list of names (the first one is shown).
        image: the H x W x 3 uint8 input.
        settings: the resolved preset.
    """

    labels: np.ndarray
    logits: torch.Tensor
    class_names: list[list[str]]
    image: np.ndarray
    settings: dict = field(default_factory=dict)

    @property
    def display_names(self) -> list[str]:
        return [names[0] for names in self.class_names]

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The image with the labels blended in and a legend of the classes present (PIL image)."""
        from .viz import overlay

        return overlay(self.image, self.labels, self.display_names, alpha=alpha, legend=legend)

    def areas(self) -> list[dict]:
        """Pixel count and fraction per present class, largest first."""
        from .viz import class_areas

        return class_areas(self.labels, self.display_names)


class Segmenter:
    """Open-vocabulary semantic segmentation with a training-free dense head.

    Example::

        seg = Segmenter.from_pretrained("ViT-B-16", pretrained="openai", method="sclip")
        seg.set_image("photo.jpg")
        result = seg.predict("sky; person, person in shirt; tree")
        result.overlay().save("overlay.png")
    """

    def __init__(
        self,
        loaded: LoadedModel,
        preset: Preset,
        device: torch.device,
        precision: str = "auto",
        window_batch: int = 16,
        text_cache_dir=None,
        templates=OPENAI_TEMPLATES,
    ):
        if precision not in PRECISIONS:
            raise OvdenseError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if window_batch < 1:
            raise OvdenseError("window_batch must be >= 1")
        if precision == "fp16" and device.type == "cpu":
            raise OvdenseError("fp16 autocast needs a GPU; on the CPU use --precision bf16 or fp32")
        self.loaded = loaded
        self.preset = preset
        self.device = device
        self.precision = precision
        self.window_batch = window_batch
        self.text_cache_dir = text_cache_dir
        self.templates = templates
        self.head: DenseHead = create_head(preset.head, **preset.head_kwargs)
        tower = loaded.tower
        self._mean, self._std = (
            torch.tensor(pixel_stats(v), device=device).view(1, 3, 1, 1)
            for v in (tower.preprocess.mean, tower.preprocess.std)
        )
        self._text: dict[tuple, TextClassifier] = {}
        self._image: np.ndarray | None = None
        self._input: torch.Tensor | None = None
        self._features: WindowFeatures | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        method: str = "sclip",
        dataset: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        window_batch: int = 16,
        text_cache_dir=None,
        **preset_overrides,
    ) -> Segmenter:
        """Load weights and a method preset.

        Args:
            model_name: open_clip architecture, ``hf-hub:org/repo`` or a test arch.
            pretrained: open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...).
            checkpoint: a local weights file (see :func:`ovdense.weights.load_model`).
            method: ``sclip``, ``naclip``, ``clearclip``, ``declip``, ``maskclip`` or ``clip``.
            dataset: use the method's settings for this benchmark (e.g. ``voc21``).
            device: ``cpu``, ``cuda``...; default CUDA when available.
            precision: ``auto`` (fp16 autocast on CUDA as the references, fp32 on CPU), ``fp32``, ``fp16``,
                ``bf16``.
            window_batch: sliding windows per forward pass (bounds memory).
            text_cache_dir: where text embeddings are cached (``False`` disables).
            preset_overrides: any :class:`ovdense.presets.Preset` field (``crop=448``, ``prob_thd=0.3``...).
        """
        try:
            preset = get_preset(method, dataset, **preset_overrides)
        except ValueError as err:
            raise OvdenseError(str(err)) from None
        loaded = load_model(model_name, pretrained=pretrained, checkpoint=checkpoint, device=device)
        device = next(loaded.model.parameters()).device
        return cls(loaded, preset, device, precision, window_batch, text_cache_dir)

    # -- image side -------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32" or (self.precision == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        # 'auto' on CUDA is fp16, the precision all references run the image tower in.
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.head.encode_dense(self.loaded.tower, images, self.preset.pos_rule)

    @torch.no_grad()
    def set_image(self, image) -> None:
        """Resize (mmseg rule), normalise and run the image tower over every sliding window once.

        Args:
            image: a path, a PIL image or an H x W x 3 uint8 RGB array.
        """
        img = load_image(image)
        p = self.preset
        resized = mmseg_resize(img, p.long_side, p.short_side)
        x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float()
        x = (x - self._mean) / self._std
        self._image = img
        self._input = x
        pad = self.loaded.tower.patch_size if p.pad_to_patch else 0
        self._features = encode_windows(x, self._encode, p.crop, p.stride, self.window_batch, pad)

    def text_classifier(self, classes) -> TextClassifier:
        """The (cached) text embeddings of a class list: N names x D."""
        parsed = normalise_classes(classes)
        key = tuple(tuple(c) for c in parsed)
        if key not in self._text:
            with warnings.catch_warnings():  # normalise_classes has already warned about this class list
                warnings.simplefilter("ignore", UserWarning)
                self._text[key] = build_text_classifier(
                    self.loaded.model,
                    self.loaded.tokenizer,
                    parsed,
                    templates=self.templates,
                    cache_dir=self.text_cache_dir,
                    device=self.device,
                )
        return self._text[key]

    @torch.no_grad()
    def predict(self, classes) -> SegmentationResult:
        """Segment the current image.

        Args:
            classes: ``"sky; person, person in shirt; tree"``, a list of strings (names of one class
                separated by commas) or a list of name lists. With ``prob_thd > 0`` class 0 is the
                background: put background words first.

        Returns:
            a :class:`SegmentationResult` at the original image size.
        """
        if self._features is None:
            raise OvdenseError("call set_image() before predict()")
        text = self.text_classifier(classes)
        p = self.preset
        h0, w0 = self._image.shape[:2]
        cosine = assemble_cosine_maps(self._features, text.embeddings.to(self.device), (h0, w0))
        if p.pamr:
            guide = torch.nn.functional.interpolate(self._input, size=(h0, w0), mode="bilinear", align_corners=False)
            cosine = pamr(guide, cosine, iterations=p.pamr_iterations, dilations=p.pamr_dilations)
        labels, class_probs = cosine_to_labels(
            cosine[0], text.name_to_class.to(self.device), p.logit_scale, p.prob_thd, p.area_thd
        )
        return SegmentationResult(
            labels=labels.cpu().numpy(),
            logits=class_probs.cpu(),
            class_names=text.class_names,
            image=self._image,
            settings=p.to_dict(),
        )

    def __call__(self, image, classes) -> SegmentationResult:
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image)
        return self.predict(classes)
