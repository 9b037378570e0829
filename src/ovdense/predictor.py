"""``Segmenter``: set an image once, segment it with any class list many times (as SAM's predictor)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import ranges, regions
from .classes import class_list_key, display_names, normalise_classes
from .errors import InvalidArgumentError, OvdenseError
from .heads import DenseHead, PassInputs, TextQuery
from .heads.vfm_proxies import MERGED_REGION_ID, resize_region_ids
from .images import as_rgb8_array, decode_image
from .inference import WindowFeatures, assemble_cosine_maps, cosine_to_labels, encode_windows, mmseg_resize
from .masks import as_region_map, read_region_map, region_map_for, vote
from .methods import check_method_inputs, create_head, get_method
from .pamr import pamr
from .precision import autocast, check_precision
from .presets import Preset, get_preset
from .ranges import POSITIVE_INT
from .regions import RegionResult
from .text import DETECTION_TEMPLATES, OPENAI_TEMPLATES, TextClassifier, classifier_of
from .weights import LoadedModel, WeightsChoice, load_model, resolve_weights


def load_image(image) -> np.ndarray:
    """An image as H x W x 3 uint8 RGB, as a viewer shows it (see :mod:`ovdense.images`).

    Args:
        image: a path, encoded bytes, a PIL image (EXIF orientation applied to both) or an array
            (H x W grey, H x W x 3 RGB, H x W x 4 RGBA; uint8, uint16 or bool).

    Raises:
        OvdenseError: missing or unreadable file, an image over the pixel limit, or an unsupported array.
    """
    if isinstance(image, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        return decode_image(image)
    return as_rgb8_array(image)


def resolve_preset(method: str, dataset: str | None = None, **options) -> Preset:
    """:func:`ovdense.presets.get_preset`, its errors as :class:`InvalidArgumentError` (the Python API's)."""
    try:
        return get_preset(method, dataset, **options)
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None


def check_vfm_kind(method: str, vfm, native: bool) -> None:
    """Refuse, in one line, a loaded VFM of the other kind than the method runs: CorrCLIPv2 runs a
    native-resolution :class:`~ovdense.vfm_native.DenseVfm` once per image, ProxyCLIP / CorrCLIP a
    :class:`~ovdense.vfm.Vfm` per window."""
    from .vfm_native import DenseVfm

    if native and not isinstance(vfm, DenseVfm):
        raise InvalidArgumentError(
            f"{method} runs its VFM once per image at the image's resolution (ovdense.vfm_native.load_dense_vfm: "
            f"radiov3, dinov2, timm:NAME...), not the per-window VFM {getattr(vfm, 'name', vfm)!r}"
        )
    if not native and isinstance(vfm, DenseVfm):
        raise InvalidArgumentError(
            f"{method} runs its VFM on every window (ovdense.vfm.load_vfm: dino-b8, dinov2-b...), not the "
            f"native-resolution {vfm.name!r} of corrclipv2"
        )


def check_arguments(
    method: str, dataset, vfm, vfm_checkpoint, masks_dir, mask_generator, mask_model, options: dict
) -> Preset:
    """Every check of a segmenter's arguments that needs no weights: the preset (settings, options and their
    ranges), the inputs against what the method's head uses, the options' values as the head judges them.

    Returns:
        the resolved :class:`~ovdense.presets.Preset`.

    Raises:
        InvalidArgumentError: the first problem, in one line.
    """
    preset = resolve_preset(method, dataset, **options)
    check_method_inputs(
        method, vfm=vfm, vfm_checkpoint=vfm_checkpoint, masks_dir=masks_dir, mask_generator=mask_generator,
        mask_model=mask_model,
    )  # fmt: skip
    build_head(preset)
    return preset


def build_head(preset: Preset) -> DenseHead:
    """The preset's head with its options; a value the head refuses is an :class:`InvalidArgumentError`."""
    try:
        return create_head(preset.method, **preset.head_kwargs)
    except ValueError as err:
        raise InvalidArgumentError(str(err)) from None


def pixel_stats(values) -> list[float]:
    """Mean or std of [0, 1] pixels as the references' mmseg configs write them: x 255, 3 decimals.

    SCLIP, NACLIP and ClearCLIP normalise 0-255 pixels with ``mean=[122.771, 116.746, 104.094]``,
    ``std=[68.501, 66.632, 70.323]``, OpenAI's statistics rounded so; the exact values move a few pixels
    of a prediction, so the rounded ones are used for every tower.
    """
    return [round(255.0 * v, 3) for v in values]


@dataclass
class SegmentationResult:
    """The segmentation of one image.

    Attributes:
        labels: H x W int64 numpy array of class indices into ``class_names``.
        probs: C x H x W float32 numpy array of class probabilities (softmax over all names, max over each
            class's names, after area_thd), at the original image size.
        class_names: the classes, each a list of names (the first one is shown).
        image: the H x W x 3 uint8 input.
        settings: the resolved preset.
        background: the index of the background class (0 when the method's ``prob_thd`` sends unsure pixels
            to class 0, i.e. class 0 holds background words), else None.
    """

    labels: np.ndarray
    probs: np.ndarray
    class_names: list[list[str]]
    image: np.ndarray
    settings: dict = field(default_factory=dict)
    background: int | None = None

    @property
    def display_names(self) -> list[str]:
        """One name per class: its first name, ``background`` for the background class."""
        return display_names(self.class_names, self.background)

    def overlay(self, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The image with the labels blended in (the background class transparent) and a legend of the classes
        present with their share of the pixels (PIL image)."""
        from .viz import overlay

        return overlay(
            self.image, self.labels, self.display_names, alpha=alpha, legend=legend,
            background=self.background, percentages=True,
        )  # fmt: skip

    def areas(self) -> list[dict]:
        """Pixel count and fraction per present class, largest first."""
        from .viz import class_areas

        return class_areas(self.labels, self.display_names)


#: The auxiliary CLIP of the authors' banks (their ``hf-hub:apple/DFN2B-CLIP-ViT-B-16``, the same weights).
AUX_MODEL, AUX_PRETRAINED = "ViT-B-16-quickgelu", "dfn2b"


def clip_width(loaded: LoadedModel) -> int:
    """D, the width of a CLIP's image and text embeddings."""
    visual = loaded.model.visual
    width = getattr(visual, "output_dim", None)
    if width is None:
        width = loaded.model.text_projection.shape[-1]
    return int(width)


def open_bank_support(bank, bank_name, bank_store, aux_model, aux_pretrained, aux_checkpoint, loaded, vfm,
                      num_support: int = 20, device=None):  # fmt: skip
    """CorrCLIPv2's :class:`~ovdense.bank.retrieval.BankSupport` of a bank folder, checked against the main CLIP,
    the VFM and the auxiliary CLIP (which it loads) before any image (one-line errors)."""
    from .bank.memory_bank import MemoryBank
    from .bank.retrieval import AUTHORS_AUX_STORE, BankSupport, main_store_for

    # The bank's folder and its main store first: a wrong bank says so before the auxiliary CLIP loads.
    opened = MemoryBank.open(bank, bank_name)
    aux_store = None if aux_model == "none" else AUTHORS_AUX_STORE
    main_store = bank_store or main_store_for(opened, clip_width(loaded), exclude=aux_store)
    aux_loaded = None
    if aux_store is not None:
        choice = resolve_weights(aux_model, aux_pretrained, aux_checkpoint, AUX_MODEL, AUX_PRETRAINED)
        aux_loaded = load_model(choice.model, pretrained=choice.pretrained, checkpoint=choice.checkpoint, device=device)
    support = BankSupport(opened, main_store, aux_store, aux_loaded, num_support=num_support)
    support.check(key_dim=vfm.dim, main_dim=clip_width(loaded),
                  aux_dim=None if aux_loaded is None else clip_width(aux_loaded))  # fmt: skip
    return support


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
        vfm=None,
        masks_dir: str | Path | None = None,
        mask_generator=None,
        weights: WeightsChoice | None = None,
        support=None,
    ):
        """Low-level: :meth:`from_pretrained` and :meth:`from_model` resolve these from names and check them.

        Args:
            loaded: the CLIP (:func:`ovdense.weights.load_model`).
            preset: the method's settings (:func:`ovdense.presets.get_preset`).
            device: where the towers run.
            precision, window_batch, text_cache_dir: see :meth:`from_pretrained`.
            templates: prompt templates of :meth:`predict`.
            vfm: an :class:`ovdense.vfm.Vfm`, for methods whose head uses one (ProxyCLIP, CorrCLIP).
            masks_dir: for methods that use class-agnostic masks (CorrCLIP): a folder of CorrCLIP-style
                ``<image stem>.npz`` files read by :meth:`set_image` for images given as paths.
            mask_generator: for the same methods: a callable ``image (H x W x 3 uint8) -> H x W region ids``
                (e.g. :class:`ovdense.mask_generators.SamMaskGenerator`), used when no masks are given.
            weights: how the CLIP's weights were chosen (recorded in :attr:`settings`).
            support: for CorrCLIPv2: a :class:`ovdense.bank.retrieval.BankSupport` (the memory bank it retrieves
                from); None runs the method without a bank.
        """
        check_precision(precision, device)
        ranges.check("window_batch", window_batch, POSITIVE_INT)
        method = preset.method
        spec = get_method(method)
        if spec.uses_vfm and vfm is None:
            raise InvalidArgumentError(
                f"vfm: the {method} head needs a vision foundation model (e.g. load_vfm({preset.vfm!r}))"
            )
        check_method_inputs(method, vfm=vfm, masks_dir=masks_dir, mask_generator=mask_generator)
        head = build_head(preset)
        try:
            head.taps(loaded.tower)  # a head that reads given blocks says here if the tower lacks them
        except ValueError as err:
            raise InvalidArgumentError(f"{method}: {err}") from None
        if support is not None and not spec.native_vfm:
            raise InvalidArgumentError(f"bank: the {method} head retrieves nothing (a memory bank is CorrCLIPv2's)")
        self.vfm = vfm
        self.support = support
        self.masks_dir = None if masks_dir is None else Path(masks_dir)
        self.mask_generator = mask_generator
        self.loaded = loaded
        self.preset = preset
        self.device = device
        self.precision = precision
        self.window_batch = window_batch
        self.text_cache_dir = text_cache_dir
        self.templates = templates
        self.head: DenseHead = head
        self.weights = weights or WeightsChoice(loaded.model_name, None, None)
        tower = loaded.tower
        self._mean, self._std = (
            torch.tensor(pixel_stats(v), device=device).view(1, 3, 1, 1)
            for v in (tower.preprocess.mean, tower.preprocess.std)
        )
        self._text: dict[tuple, TextClassifier] = {}
        self._image: np.ndarray | None = None
        self._input: torch.Tensor | None = None
        # Window features per text classifier (key None: heads whose features do not depend on the text).
        self._features: dict[int | None, WindowFeatures] = {}
        self._region_maps: dict[int, tuple[torch.Tensor, float]] = {}
        self._regions: np.ndarray | None = None  # H x W region ids at the image's size (CorrCLIP)
        self._attention: dict[tuple, object] = {}  # AttentionPass per (text classifier id, VFM id)
        self._dense: dict[int | None, torch.Tensor] = {}  # dense_features() at its own size, per text (as _features)
        self._vfm_map = None  # the image's VfmImageMap (heads with native_vfm)
        self._input_ids: torch.Tensor | None = None  # 1 x H x W region ids at the network input's size
        self._neighbours: tuple[torch.Tensor, torch.Tensor] | None = None  # (pixel -> region index, R x K bank ids)
        self._support: dict[int, torch.Tensor] = {}  # 1 x N x H x W support cosines per text classifier
        self._aux_text: dict[int, torch.Tensor] = {}  # the auxiliary CLIP's name embeddings per text classifier

    @classmethod
    def from_pretrained(
        cls,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        method: str = "sclip",
        dataset: str | None = None,
        device: str | torch.device | None = None,
        precision: str = "auto",
        window_batch: int = 16,
        text_cache_dir=None,
        vfm=None,
        vfm_checkpoint: str | Path | None = None,
        masks_dir: str | Path | None = None,
        mask_generator=None,
        mask_model: str | None = None,
        trust_remote_code: bool = False,
        bank=None,
        bank_name: str | None = None,
        bank_store: str | None = None,
        aux_model: str | None = None,
        aux_pretrained: str | None = None,
        aux_checkpoint: str | Path | None = None,
        **options,
    ) -> Segmenter:
        """Load weights and a method preset.

        Every argument is checked before the weights load.

        Args:
            model_name: open_clip architecture, ``hf-hub:org/repo`` or a test arch; default the method's own
                (CorrCLIP: MetaCLIP ``ViT-B-16-quickgelu``), else ``ViT-B-16``. :attr:`settings` and a log line
                (logger ``ovdense.predictor``) say what was chosen.
            pretrained: open_clip pretrained tag (``openai``, ``laion2b_s34b_b88k``, ...); default, without a
                ``checkpoint``: the method's tag, else ``openai`` where the architecture has it, else its first.
            checkpoint: a local weights file (see :func:`ovdense.weights.load_model`).
            method: one of :func:`ovdense.list_methods` (``sclip``, ``naclip``, ``declip``...).
            dataset: use the method's settings for this benchmark (e.g. ``voc21``).
            device: ``cpu``, ``cuda``...; default CUDA when available.
            precision: ``auto`` (fp16 autocast on CUDA as the references, fp32 on CPU), ``fp32``, ``fp16``,
                ``bf16``.
            window_batch: sliding windows per forward pass (bounds memory).
            text_cache_dir: where text embeddings are cached (``False`` disables).
            vfm: the vision foundation model of a method that uses one: a name (default the method's, ``dino-b8``
                for ProxyCLIP and CorrCLIP; see :func:`ovdense.vfm.load_vfm`) or a loaded :class:`ovdense.vfm.Vfm`.
            vfm_checkpoint: a local weights file for it.
            masks_dir, mask_generator: region masks of CorrCLIP: a folder of ``<image stem>.npz`` files, or a
                generator: a name (``sam``, ``sam2``: transformers' automatic masks, extra ``[masks]``) or a
                callable (see :class:`Segmenter`).
            mask_model: the hub id or folder of a named ``mask_generator`` (default its own).
            trust_remote_code: run a VFM whose code lives in its hub repository (C-RADIO for ``corrclipv2``);
                off unless asked for.
            bank: CorrCLIPv2's memory bank: a ``memory_bank/`` folder (the authors' layout) or a
                :class:`ovdense.bank.retrieval.BankSupport`; None runs ``corrclipv2`` without one.
            bank_name: which bank of a folder holding several.
            bank_store: the value store of the main CLIP (default: the only one of its width, else the authors'
                ``metaclip_b`` / ``metaclip_l``).
            aux_model, aux_pretrained, aux_checkpoint: the auxiliary CLIP of the bank's ``dfnclip_b`` store
                (default the authors' DFN2B-CLIP ViT-B/16: ``ViT-B-16-quickgelu`` + ``dfn2b``); ``aux_model="none"``
                uses the main store alone.
            options: the method's options (``mode="qq"`` for ``declip``) and any
                :class:`ovdense.presets.Preset` setting (``crop=448``, ``prob_thd=0.3``...).

        Raises:
            OvdenseError: unknown method, dataset, setting or option, inputs the method does not use or lacks
                (checked before the weights load), or weights that cannot be loaded.
        """
        preset = check_arguments(method, dataset, vfm, vfm_checkpoint, masks_dir, mask_generator, mask_model, options)
        weights = resolve_weights(model_name, pretrained, checkpoint, preset.model, preset.pretrained)
        if weights.chosen:
            logging.getLogger(__name__).info("%s: chose the %s", method, weights.chosen)
        loaded = load_model(weights.model, pretrained=weights.pretrained, checkpoint=weights.checkpoint, device=device)
        return cls.from_model(
            loaded, method, dataset, precision=precision, window_batch=window_batch, text_cache_dir=text_cache_dir,
            vfm=vfm, vfm_checkpoint=vfm_checkpoint, masks_dir=masks_dir, mask_generator=mask_generator,
            mask_model=mask_model, weights=weights, trust_remote_code=trust_remote_code, bank=bank,
            bank_name=bank_name, bank_store=bank_store, aux_model=aux_model, aux_pretrained=aux_pretrained,
            aux_checkpoint=aux_checkpoint, **options,
        )  # fmt: skip

    @classmethod
    def from_model(
        cls,
        loaded: LoadedModel,
        method: str = "sclip",
        dataset: str | None = None,
        *,
        precision: str = "auto",
        window_batch: int = 16,
        text_cache_dir=None,
        vfm=None,
        vfm_checkpoint: str | Path | None = None,
        masks_dir: str | Path | None = None,
        mask_generator=None,
        mask_model: str | None = None,
        templates=OPENAI_TEMPLATES,
        weights: WeightsChoice | None = None,
        trust_remote_code: bool = False,
        bank=None,
        bank_name: str | None = None,
        bank_store: str | None = None,
        aux_model: str | None = None,
        aux_pretrained: str | None = None,
        aux_checkpoint: str | Path | None = None,
        **options,
    ) -> Segmenter:
        """A segmenter on a CLIP already loaded (one CLIP for several methods, as the demo and the trainer's
        validation use it); it runs where the CLIP is.

        Args:
            loaded: from :func:`ovdense.weights.load_model`.
            templates: prompt templates of :meth:`predict` (default the 80 OpenAI ImageNet templates).
            weights: how ``loaded``'s weights were chosen (recorded in :attr:`settings`).
            The others: as :meth:`from_pretrained`; a named VFM or mask generator is loaded on ``loaded``'s device.

        Raises:
            OvdenseError: as :meth:`from_pretrained`.
        """
        preset = check_arguments(method, dataset, vfm, vfm_checkpoint, masks_dir, mask_generator, mask_model, options)
        device = next(loaded.model.parameters()).device
        spec = get_method(method)
        if bank is not None and not spec.native_vfm:
            raise InvalidArgumentError(f"bank: the {method} head retrieves nothing (a memory bank is CorrCLIPv2's)")
        if spec.uses_vfm and (vfm is None or isinstance(vfm, (str, Path))):
            if spec.native_vfm:
                from .vfm_native import load_dense_vfm

                vfm = load_dense_vfm(vfm or preset.vfm, checkpoint=vfm_checkpoint, device=device,
                                     trust_remote_code=trust_remote_code)  # fmt: skip
            else:
                from .vfm import load_vfm

                vfm = load_vfm(vfm or preset.vfm, checkpoint=vfm_checkpoint, device=device)
        if spec.uses_vfm:
            check_vfm_kind(method, vfm, spec.native_vfm)
        support = bank
        if isinstance(bank, (str, Path)):
            support = open_bank_support(
                bank, bank_name, bank_store, aux_model, aux_pretrained, aux_checkpoint, loaded, vfm,
                num_support=int(preset.head_kwargs.get("num_support", 20)), device=device,
            )  # fmt: skip
        if isinstance(mask_generator, str):
            from .mask_generators import mask_generator as named_generator

            kwargs = {"model": mask_model} if mask_model else {}
            mask_generator = named_generator(mask_generator, device=device, **kwargs)
        return cls(
            loaded, preset, device, precision, window_batch, text_cache_dir, templates, vfm=vfm,
            masks_dir=masks_dir, mask_generator=mask_generator, weights=weights, support=support,
        )  # fmt: skip

    @property
    def settings(self) -> dict:
        """Everything that decides this segmenter's output, resolved (JSON-serialisable): the weights (and what
        was chosen for the caller), the VFM, the masks source, precision, window batch and the preset."""
        generator = self.mask_generator
        return {
            "method": self.preset.method,
            "model": self.loaded.model_name,
            "pretrained": self.weights.pretrained,
            "checkpoint": self.weights.checkpoint,
            "weights": self.loaded.source,
            "activation": self.loaded.activation,
            "chosen": self.weights.chosen,
            "vfm": None if self.vfm is None else self.vfm.name,
            "bank": None if self.support is None else self.support.settings,
            "masks_dir": None if self.masks_dir is None else str(self.masks_dir),
            "mask_generator": None if generator is None else getattr(generator, "name", type(generator).__name__),
            "device": str(self.device),
            "precision": self.precision,
            "window_batch": self.window_batch,
            "preset": self.preset.to_dict(),
        }

    # -- image side -------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _encode(self, images: torch.Tensor, text: TextQuery | None = None, masks=None, coords=None) -> torch.Tensor:
        if self.head.native_vfm:
            inputs = PassInputs(
                self.preset.pos_rule, text=text, masks=masks, vfm_map=self._vfm_map, pixel_coords=coords
            )
        else:
            inputs = PassInputs(self.preset.pos_rule, text=text, vfm=self.vfm, masks=masks)
        with self._autocast():
            return self.head.encode_dense(self.loaded.tower, images, inputs)

    @torch.no_grad()
    def set_image(self, image, masks=None) -> None:
        """Decode, resize (mmseg rule) and normalise an image; the image tower runs on first use.

        The first :meth:`predict` runs the tower over every sliding window, the first
        :meth:`classify_regions` over the detection-size input; later calls reuse those features.

        Args:
            image: a path, a PIL image or an array (see :func:`load_image`).
            masks: for methods that use class-agnostic masks (CorrCLIP): the image's H x W region ids (the
                smallest id = unsegmented, see :mod:`ovdense.masks`). Without them they come from
                ``masks_dir`` (images given as paths) or the ``mask_generator``.

        Raises:
            OvdenseError: an unreadable image; masks of the wrong size, or none where the method needs them.
        """
        img = load_image(image)
        regions = None
        if masks is not None:
            if not self.head.uses_masks:
                raise InvalidArgumentError(f"masks: the {self.preset.method} head uses no region masks")
            regions = as_region_map(masks, img.shape[:2])
        elif self.head.uses_masks:
            regions = self._find_regions(image, img)
        p = self.preset
        resized = mmseg_resize(img, p.long_side, p.short_side)
        x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None].float()
        self._image = img
        self._input = (x - self._mean) / self._std
        self._regions = regions
        self._features = {}
        self._region_maps = {}
        self._attention = {}
        self._dense = {}
        self._input_ids = None
        if regions is not None:
            # The region ids follow the image: nearest to the network input (CorrCLIP's rule).
            self._input_ids = resize_region_ids(torch.from_numpy(regions).to(self.device)[None], tuple(x.shape[-2:]))
        self._vfm_map, self._neighbours, self._support = None, None, {}
        if self.head.native_vfm:
            from .vfm_map import VfmImageMap

            # Once per image on the decoded image at its own size (the authors re-read the file without EXIF
            # rotation; ours is the image as decoded, EXIF applied, the same for every usual benchmark image).
            grid, _ = self.vfm.dense(img)
            self._vfm_map = VfmImageMap(grid.to(self.device), tuple(x.shape[-2:]))

    @property
    def image(self) -> np.ndarray | None:
        """The current image as decoded (H x W x 3 uint8), or None before :meth:`set_image`."""
        return self._image

    def _find_regions(self, image, img: np.ndarray) -> np.ndarray:
        if self.masks_dir is not None and isinstance(image, (str, Path)):
            return read_region_map(region_map_for(self.masks_dir, image), img.shape[:2])
        if self.mask_generator is not None:
            return as_region_map(self.mask_generator(img), img.shape[:2], "mask_generator output")
        raise OvdenseError(
            f"the {self.preset.method} method needs class-agnostic masks: pass set_image(image, masks=...), a "
            "masks_dir of <image stem>.npz files (--masks-dir) or a mask_generator (--mask-generator sam)"
        )

    def _window_features(self, text: TextClassifier | None) -> WindowFeatures:
        """The windows' dense features; for heads that segment inside their pass (ResCLIP), those of ``text``
        (the classifiers live as long as the segmenter, so their ids are stable keys)."""
        key = id(text) if self.head.needs_text else None
        if key not in self._features:
            p = self.preset
            pad = p.pad_multiple or (self.loaded.tower.patch_size if p.pad_to_patch else 0)
            query = TextQuery(text.embeddings.to(self.device), p.logit_scale) if self.head.needs_text else None
            extra, extra_pad = None, float(MERGED_REGION_ID)
            if self._input_ids is not None:
                # Cropped and padded like each window (CorrCLIP pads them with its merged-region offset, 10000).
                extra = self._input_ids[:, None].float()
            if self._vfm_map is not None:
                # CorrCLIPv2 reads its VFM map at each window pixel's place; padding repeats the edge pixel.
                extra = torch.cat([extra, self._pixel_coords()[None]], dim=1)
                extra_pad = (float(MERGED_REGION_ID), None, None)

            def encode(x, maps=None):
                ids = None if maps is None else maps[:, 0].long()
                coords = None if maps is None or maps.shape[1] < 3 else maps[:, 1:].long()
                return self._encode(x, query, ids, coords)

            self._features[key] = encode_windows(
                self._input, encode, p.crop, p.stride, self.window_batch, pad, extra=extra, extra_pad=extra_pad
            )
        return self._features[key]

    def text_classifier(self, classes, templates=None) -> TextClassifier:
        """The (cached) text embeddings of a class list: N names x D.

        Args:
            classes: see :meth:`predict`.
            templates: prompt templates; default the segmenter's (the 80 OpenAI ImageNet templates).
        """
        templates = tuple(self.templates if templates is None else templates)
        raw = class_list_key(classes)
        if raw is not None and (raw, templates) in self._text:  # the same input again: checked (and warned) once
            return self._text[raw, templates]
        parsed = normalise_classes(classes)
        key = (tuple(tuple(c) for c in parsed), templates)
        if key not in self._text:
            self._text[key] = classifier_of(
                self.loaded.model,
                self.loaded.tokenizer,
                parsed,
                templates=templates,
                cache_dir=self.text_cache_dir,
                device=self.device,
            )
        if raw is not None:
            self._text[raw, templates] = self._text[key]
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
        if self._image is None:
            raise OvdenseError("call set_image() before predict()")
        text = self.text_classifier(classes)
        p = self.preset
        h0, w0 = self._image.shape[:2]
        if self.support is None:
            cosine = assemble_cosine_maps(self._window_features(text), text.embeddings.to(self.device), (h0, w0))
        else:
            # CorrCLIPv2's fusion, at the network input's size before the one resize to the original size.
            size = tuple(self._input.shape[-2:])
            own = assemble_cosine_maps(self._window_features(text), text.embeddings.to(self.device), size)
            weight = self.head.support_weight
            fused = own * (1 - weight) + self._support_cosines(text) * weight
            cosine = torch.nn.functional.interpolate(fused, size=(h0, w0), mode="bilinear", align_corners=False)
        if p.pamr:
            guide = torch.nn.functional.interpolate(self._input, size=(h0, w0), mode="bilinear", align_corners=False)
            cosine = pamr(guide, cosine, iterations=p.pamr_iterations, dilations=p.pamr_dilations)
        labels, class_probs = cosine_to_labels(
            cosine[0], text.name_to_class.to(self.device), p.logit_scale, p.prob_thd, p.area_thd
        )
        labels = labels.cpu().numpy()
        if self._regions is not None:
            labels = vote(labels, self._regions)  # CorrCLIP's map correction, on the original masks
        return SegmentationResult(
            labels=labels,
            probs=class_probs.float().cpu().numpy(),
            class_names=text.class_names,
            image=self._image,
            settings=p.to_dict(),
            background=0 if p.prob_thd > 0 else None,
        )

    # -- memory bank (CorrCLIPv2) ------------------------------------------------------------------
    def _support_cosines(self, text: TextClassifier) -> torch.Tensor:
        """1 x N x H x W: each pixel of the network input takes its region's support cosines (every region, the
        unsegmented one too, retrieves; one batched search per image)."""
        if id(text) not in self._support:
            if self._neighbours is None:
                _, index, means = self._vfm_map.region_means(self._input_ids[0])
                queries = torch.nn.functional.normalize(means, dim=-1)
                self._neighbours = (index, self.support.neighbours(queries))
            index, ids = self._neighbours
            aux = None
            if self.support.aux_store is not None:
                aux = self.auxiliary_text(text)
            logits = self.support.region_logits(ids, text.embeddings, aux).to(self.device)  # R x N
            self._support[id(text)] = logits.T[:, index][None]
        return self._support[id(text)]

    def auxiliary_text(self, text: TextClassifier) -> torch.Tensor:
        """N x D' name embeddings of ``text``'s classes by the bank's auxiliary CLIP (same names and templates)."""
        if id(text) not in self._aux_text:
            aux = self.support.aux_model
            self._aux_text[id(text)] = classifier_of(
                aux.model, aux.tokenizer, text.class_names, templates=self.templates, cache_dir=self.text_cache_dir,
                device=self.device,
            ).embeddings  # fmt: skip
        return self._aux_text[id(text)]

    # -- dense features and attention ---------------------------------------------------------------
    def _text_query(self, classes, what: str) -> tuple[TextClassifier | None, TextQuery | None]:
        if not self.head.needs_text:
            return None, None
        if classes is None:
            raise InvalidArgumentError(
                f"classes: the {self.preset.method} head segments inside its pass, so {what} needs the class list"
            )
        text = self.text_classifier(classes)
        return text, TextQuery(text.embeddings.to(self.device), self.preset.logit_scale)

    @torch.no_grad()
    def encode_dense(self, images: torch.Tensor, classes=None, masks=None) -> torch.Tensor:
        """The method's dense features of a batch of network inputs (no sliding windows).

        Args:
            images: B x 3 x H x W, normalised as :meth:`set_image` normalises (the references' x255 statistics:
                ``(pixels_0_255 - mean) / std``); sides should be multiples of the patch size.
            classes: the class list, for heads that segment inside their pass (ResCLIP).
            masks: B x H x W integer region ids, for heads that use masks (CorrCLIP).

        Returns:
            B x D x h x w float32 L2-normalised features (h x w the tower's grid, or the VFM's for ProxyCLIP and
            CorrCLIP).
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = getattr(images, "shape", type(images).__name__)
            raise InvalidArgumentError(f"images: expected a B x 3 x H x W tensor, got {shape}")
        if self.head.uses_masks and masks is None:
            raise InvalidArgumentError(f"masks: the {self.preset.method} head needs region ids of each image")
        if masks is not None:
            masks = torch.as_tensor(masks, device=self.device).long()
        _, query = self._text_query(classes, "encode_dense")
        return self._encode(images.to(self.device, torch.float32), query, masks).float()

    @torch.no_grad()
    def dense_features(self, classes=None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The current image's dense features: the sliding windows' maps assembled as :meth:`predict` does.

        Args:
            classes: the class list, for heads whose features depend on it (ResCLIP).
            size: (h, w) of the map; default the features' own resolution over the network-size image (e.g.
                H/16 x W/16). At the original image size, the cosines with the text embeddings are the cosine maps
                :meth:`predict` uses before PAMR (:func:`ovdense.inference.assemble_features`).

        Returns:
            D x h x w float32 (averages of unit vectors where windows overlap: normalise for cosines). The map at
            the default size is kept for the image and returned again: clone it before changing it in place.
        """
        from .inference import assemble_features

        if self._image is None:
            raise OvdenseError("call set_image() before dense_features()")
        text, _ = self._text_query(classes, "dense_features")
        if size is not None:
            return assemble_features(self._window_features(text), size)
        key = id(text) if text is not None else None
        if key not in self._dense:  # kept for the image: every attention_maps call reads it
            self._dense[key] = assemble_features(self._window_features(text))
        return self._dense[key]

    def _pixel_coords(self) -> torch.Tensor:
        """2 x H x W float32: the (row, column) of each pixel of the network input, the coordinates CorrCLIPv2's
        passes read the image's VFM map at (:meth:`ovdense.vfm_map.VfmImageMap.window_features`)."""
        height, width = self._input.shape[-2:]
        rows = torch.arange(height, device=self.device, dtype=torch.float32)[:, None].expand(height, width)
        cols = torch.arange(width, device=self.device, dtype=torch.float32)[None, :].expand(height, width)
        return torch.stack([rows, cols])

    @staticmethod
    def _is_native_vfm(vfm) -> bool:
        """Whether ``vfm`` runs once per whole image at its own resolution (a DenseVfm) rather than on a pass."""
        from .vfm_native import DenseVfm

        return isinstance(vfm, DenseVfm)

    @torch.no_grad()
    def attention_maps(self, points=(), layers: Sequence[int] | None = None, classes=None, vfm=None):
        """Where the [CLS] token and each point look (DeCLIP's Figure 1), on the current image.

        The towers run once over the whole network-size image (sides rounded to whole patches), cached until the
        next :meth:`set_image`; the affinity comes from :meth:`dense_features`. See :mod:`ovdense.attention`.

        CorrCLIPv2 (a head whose VFM runs once per image): its pass reads the image's VFM map, as the windows do, at
        the network-input pixel each pass pixel shows (nearest, the rule of its region masks); its VFM column is
        the affinity of the VFM's native grid alone (no attention; the [CLS] row NaN). A memory bank
        (``support``) is ignored: the maps show the head's own pass, before any fusion with retrieved regions.

        Args:
            points: (x, y) pixels of the original image, e.g. ``[(120, 80), (300, 200)]``.
            layers: CLIP blocks to show (1 = first); default all.
            classes: the class list, for heads that segment inside their pass (ResCLIP).
            vfm: an :class:`ovdense.vfm.Vfm` whose attention and affinity to add, or an
                :class:`ovdense.vfm_native.DenseVfm` whose native-grid affinity to add (default the method's own
                VFM, if it has one).

        Returns:
            :class:`ovdense.attention.AttentionMaps`: for rows [CLS] + points, CLIP's attention per layer
            ((1 + P) x len(layers) x h x w), the head's attention, the dense affinity, and the VFM's maps.
        """
        from .attention import attention_pass, check_points, lcm, maps_at, pass_input_size

        if self._image is None:
            raise OvdenseError("call set_image() before attention_maps()")
        tower = self.loaded.tower
        layers = tuple(range(1, tower.num_blocks + 1)) if layers is None else tuple(layers)
        bad = [v for v in layers if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= tower.num_blocks]
        if bad or not layers:
            raise InvalidArgumentError(f"layers: expected blocks in 1..{tower.num_blocks}, got {list(layers)}")
        pts = check_points(points, self._image.shape[:2])
        text, query = self._text_query(classes, "attention_maps")
        vfm = self.vfm if vfm is None else vfm
        key = (id(text), id(vfm))
        if key not in self._attention:
            p = self.preset
            # A native VFM never sees the pass, so its patch need not divide it.
            on_pass = [v.patch_size for v in (vfm, self.vfm) if v is not None and not self._is_native_vfm(v)]
            size = pass_input_size(tuple(self._input.shape[-2:]), lcm(tower.patch_size, p.pad_multiple, *on_pass))
            x = torch.nn.functional.interpolate(self._input, size=size, mode="bilinear", align_corners=False)
            if self.head.native_vfm:
                # As in the windows, the ids and the VFM map are read at network-input pixels: each pass pixel takes
                # the (nearest) one it shows, so its region id and its VFM feature come from the same pixel.
                coords = resize_region_ids(self._pixel_coords(), size)[None]  # rows, cols as a batch of 2 maps
                masks = resize_region_ids(self._input_ids, size)
                inputs = PassInputs(p.pos_rule, text=query, masks=masks, vfm_map=self._vfm_map, pixel_coords=coords)
            else:
                masks = None
                if self._regions is not None:
                    masks = resize_region_ids(torch.from_numpy(self._regions).to(self.device)[None], size)
                inputs = PassInputs(p.pos_rule, text=query, vfm=self.vfm, masks=masks)
            shown, native = vfm, None
            if vfm is not None and self._is_native_vfm(vfm):  # shown by its native map (the image's, if its own)
                own = vfm is self.vfm and self._vfm_map is not None
                native = self._vfm_map.grid if own else vfm.dense(self._image)[0]
                shown = None
            with self._autocast():
                self._attention[key] = attention_pass(tower, self.head, x, inputs, vfm=shown, native_features=native)
        dense = self.dense_features(classes)
        return maps_at(
            self._attention[key], pts, self._image.shape[:2], dense, layers, self.preset.method,
            None if vfm is None else vfm.name,
        )  # fmt: skip

    # -- regions ----------------------------------------------------------------------------------
    @property
    def default_region_size(self) -> int:
        """Detection input side: 64 patches (1024 for /16 towers, 896 for /14, as CLIPSelf's tests)."""
        return 64 * self.loaded.tower.patch_size

    @property
    def logit_scale(self) -> float:
        """The model's own temperature (``exp(logit_scale)``, 100 for CLIP), used for region probabilities."""
        value = getattr(self.loaded.model, "logit_scale", None)
        return float(value.detach().exp()) if isinstance(value, torch.Tensor) else 100.0

    def _region_map(self, size: int) -> tuple[torch.Tensor, float]:
        """The 1 x D x h x w dense map of the detection-size input (token-normalised only where the references
        normalise, see :attr:`DenseTower.region_tokens_normalized`), and the resize scale."""
        if size not in self._region_maps:
            # Region classification follows open_clip's transforms: the exact statistics on [0, 1] pixels.
            tower = self.loaded.tower
            x, scale = regions.detection_input(self._image, size, tower.preprocess.mean, tower.preprocess.std)
            inputs = PassInputs(self.preset.pos_rule, vfm=self.vfm)
            with self._autocast():
                normalize = tower.region_tokens_normalized
                dense = self.head.encode_dense(tower, x.to(self.device), inputs, normalize=normalize)
            self._region_maps[size] = (dense.float(), scale)
        return self._region_maps[size]

    def _crop_features(self, boxes: np.ndarray, enlarge: np.ndarray, batch: int = 32) -> torch.Tensor:
        pre = self.loaded.tower.preprocess
        size = pre.image_size
        cut = regions.crop_boxes(boxes, enlarge, self._image.shape[:2])
        feats = []
        for start in range(0, len(cut), batch):
            x = regions.crop_inputs(self._image, cut[start : start + batch], size, pre.mean, pre.std)
            with self._autocast():
                feats.append(self.loaded.model.encode_image(x.to(self.device)).float())
        return torch.cat(feats) if feats else torch.zeros(0, self.loaded.model.visual.output_dim, device=self.device)

    @torch.no_grad()
    def classify_regions(
        self,
        classes,
        boxes=None,
        masks=None,
        pooling: str = "dense",
        top_k: int = 5,
        image_size: int | None = None,
        crop_enlarge: float | Sequence[float] = 1.5,
        templates=DETECTION_TEMPLATES,
    ) -> RegionResult:
        """Name regions of the current image: boxes or masks, one batched pass for all of them.

        Features come from the method's dense head run once on the detection-size input (longest side
        resized to ``image_size``, padded right/bottom): RoIAlign (1x1, aligned) for boxes, mask pooling
        for masks (see :mod:`ovdense.regions`). ``pooling="crop"`` is the crop baseline instead: each box,
        enlarged ``crop_enlarge`` times about its centre, through the vanilla tower.

        Args:
            classes: as for :meth:`predict` (one class per region label; synonyms allowed).
            boxes: K x 4 XYXY boxes in image pixels (array, list or tensor).
            masks: K x H x W bool masks at the image's size.
            pooling: ``"dense"`` or ``"crop"`` (boxes only).
            top_k: how many classes to rank per region.
            image_size: detection input side; default :attr:`default_region_size`.
            crop_enlarge: one factor or K factors for ``pooling="crop"`` (the benchmark: 1.5 for things,
                1.0 for stuff).
            templates: prompt templates; default the 63 ViLD detection templates of the benchmark.

        Returns:
            a :class:`~ovdense.regions.RegionResult` over the K regions (K = 0 is fine).

        Raises:
            InvalidArgumentError: bad classes, boxes, masks or options (the message names the argument).
        """
        if self._image is None:
            raise OvdenseError("call set_image() before classify_regions()")
        if (boxes is None) == (masks is None):
            raise InvalidArgumentError("boxes, masks: give exactly one of them")
        if pooling not in regions.POOLINGS:
            raise InvalidArgumentError(f"pooling: expected one of {regions.POOLINGS}, got {pooling!r}")
        if pooling == "crop" and masks is not None:
            raise InvalidArgumentError("pooling: 'crop' classifies boxes; pass boxes, or pooling='dense' for masks")
        if not isinstance(top_k, int) or top_k < 1:
            raise InvalidArgumentError(f"top_k: expected an integer >= 1, got {top_k!r}")
        if (self.head.needs_text or self.head.uses_masks) and pooling == "dense":
            raise InvalidArgumentError(
                f"pooling: the {self.preset.method} head needs the class list or masks inside its pass, so it has no "
                "dense map of regions; "
                "use pooling='crop' or a method such as sclip or declip"
            )
        size = self.default_region_size if image_size is None else image_size
        if not isinstance(size, int) or size < self.loaded.tower.patch_size:
            raise InvalidArgumentError(f"image_size: expected an integer >= the patch size, got {image_size!r}")
        text = self.text_classifier(classes, templates)
        hw = self._image.shape[:2]
        if boxes is not None:
            arr = regions.check_boxes(boxes, hw)
            if pooling == "crop":
                enlarge = regions.as_enlarge(crop_enlarge, len(arr))
                if enlarge.shape != (len(arr),) or not (enlarge > 0).all():
                    raise InvalidArgumentError("crop_enlarge: expected one positive factor or one per box")
                feats, source = self._crop_features(arr, enlarge), "crop"
            else:
                dense, scale = self._region_map(size)
                grid_boxes = regions.boxes_on_grid(torch.from_numpy(arr).float(), scale, (size, size), dense.shape[-2:])
                feats, source = regions.roi_features(dense, grid_boxes), "box"
        else:
            mask_t = regions.check_masks(masks, hw)
            dense, _ = self._region_map(size)
            grid_masks = regions.masks_on_grid(mask_t, dense.shape[-1])
            feats, source = regions.mask_features(dense, grid_masks), "mask"
        feats = torch.nn.functional.normalize(feats, dim=-1)
        scores, probs = regions.classify_features(
            feats, text.embeddings, text.name_to_class, text.num_classes, self.logit_scale
        )
        topk_indices, topk_scores = regions.rank(scores, probs, top_k)
        return RegionResult(
            scores=scores.cpu(),
            probs=probs.cpu(),
            topk_indices=topk_indices,
            topk_scores=topk_scores,
            features=feats.cpu(),
            class_names=text.class_names,
            source=source,
        )

    def __call__(self, image, classes) -> SegmentationResult:
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image)
        return self.predict(classes)
