"""Online class-agnostic masks for CorrCLIP: transformers' SAM / SAM2 automatic mask generation.

- :class:`SamMaskGenerator`: an image (H x W x 3 uint8 RGB) -> a region map (H x W int64), from
  transformers' ``mask-generation`` pipeline, painted as CorrCLIP paints SAM's masks
  (:func:`ovdense.masks.paint_regions`: ascending area, ids 1..K, larger masks over smaller, 0 unsegmented).
- :func:`mask_generator`: the generator of a name (``sam``, ``sam2``; the CLI's ``--mask-generator``).

CorrCLIP's published numbers use its pre-generated masks (read with :func:`ovdense.masks.read_region_map`);
this module makes masks for images that have none. transformers is the ``[masks]`` extra and is imported only
inside :class:`SamMaskGenerator`; importing this module loads neither transformers nor torch, so the command
line can check a generator name before any model loads.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np

from .errors import InvalidArgumentError, OvdenseError, cause_line
from .masks import paint_regions

__all__ = ["DEFAULT_SAM2_MODEL", "DEFAULT_SAM_MODEL", "MASK_GENERATORS", "SamMaskGenerator", "mask_generator"]

#: SAM ViT-B in transformers' format (the smallest SAM; ~94 M parameters).
DEFAULT_SAM_MODEL = "facebook/sam-vit-base"
#: CorrCLIP's online generator is SAM2 Hiera-L (``sam2_hiera_large.pt``); this is its transformers repo.
DEFAULT_SAM2_MODEL = "facebook/sam2-hiera-large"
#: Generator name -> its default checkpoint (hub id). Both names build a :class:`SamMaskGenerator`.
MASK_GENERATORS = {"sam": DEFAULT_SAM_MODEL, "sam2": DEFAULT_SAM2_MODEL}
#: The transformers model types the generator runs (the pipeline also lists SAM-HQ, EdgeTAM and SAM3-tracker:
#: untested here, so refused rather than run silently).
SAM_MODEL_TYPES = ("sam", "sam2")

_MASKS_EXTRA = "the online mask generator needs the masks extra: pip install 'ovdense[masks]'"
_OFFLINE_HELP = (
    "On a machine with internet run `python -c \"from transformers import pipeline; pipeline('mask-generation', "
    "model='{repo}')\"` and copy ~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), or pass a local "
    "folder (the model and its processor saved with save_pretrained) as the generator's model"
)


def _import_transformers():
    try:
        import transformers
    except ImportError:
        raise OvdenseError(_MASKS_EXTRA) from None
    return transformers


@functools.lru_cache(maxsize=1)
def _pipeline_class():
    """transformers' ``MaskGenerationPipeline`` with a ``multimask_output`` switch.

    The pipeline always runs the model with its default ``multimask_output=True`` (three masks per point,
    SAM's own automatic generator); CorrCLIP's SAM2 generator asks for one mask per point. The pipeline hands
    every key of a preprocessed chunk it does not consume to the model's forward, so the switch rides there.
    """
    from transformers.pipelines.mask_generation import MaskGenerationPipeline

    class OneOrThreeMasksPipeline(MaskGenerationPipeline):
        multimask_output = True

        def preprocess(self, image, *args, **kwargs):
            for chunk in super().preprocess(image, *args, **kwargs):
                chunk["multimask_output"] = self.multimask_output
                yield chunk

    return OneOrThreeMasksPipeline


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise InvalidArgumentError(f"{name}: expected a value in [0, 1], got {value}")
    return value


def _check_count(name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise InvalidArgumentError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


class SamMaskGenerator:
    """Class-agnostic region maps from SAM or SAM2 automatic mask generation (transformers' pipeline).

    A grid of ``points_per_side`` x ``points_per_side`` point prompts over the whole image (no crop layers),
    masks filtered by predicted IoU and stability, duplicates removed by box NMS (``box_nms_thresh``), then
    painted by :func:`ovdense.masks.paint_regions`.

    The defaults are CorrCLIP's online SAM2 settings (``SAM2AutomaticMaskGenerator(points_per_side=8,
    pred_iou_thresh=0.4, stability_score_thresh=0.4, multimask_output=False)`` in zdk258/CorrCLIP
    ``CorrCLIPv1/corrclip_segmentor.py``; its Colab demo uses 16 points). CorrCLIP's paper numbers use its
    published pre-generated masks (SAM2, 32 points per side) instead, read with
    :func:`ovdense.masks.read_region_map`. Differences from CorrCLIP's online run: the default checkpoint is
    SAM ViT-B (``facebook/sam-vit-base``; :data:`DEFAULT_SAM2_MODEL` is CorrCLIP's SAM2 Hiera-L), and the model
    runs in float32 (CorrCLIP: fp16 autocast).

    SAM and SAM2 checkpoints both work: transformers' pipeline runs both (checked with transformers 5.24; an
    older transformers without SAM2 gets a one-line error for a SAM2 checkpoint); the model type is read from
    the checkpoint's config.

    Args:
        model: a hub id (``facebook/sam-vit-base``, ``facebook/sam2-hiera-large``, ...) or a local folder with
            the model and its processor saved by ``save_pretrained`` (``config.json``, weights,
            ``processor_config.json`` or ``preprocessor_config.json``).
        points_per_side: the point grid's side (the pipeline's ``points_per_crop``); CorrCLIP online: 8.
        pred_iou_thresh: keep masks whose predicted IoU is above this (0: no filter); CorrCLIP: 0.4.
        stability_score_thresh: keep masks whose stability score is above this (0: no filter; a score is at
            most 1, so 1 keeps none); CorrCLIP: 0.4.
        points_per_batch: point prompts per decoder pass (memory only; the masks do not depend on it).
        box_nms_thresh: masks whose boxes overlap more than this IoU are duplicates (the better score stays);
            0.7 is both SAM2's and the pipeline's default (its ``crops_nms_thresh``); 1.0 keeps every mask.
        multimask_output: three masks per point (SAM's own generator) or one (CorrCLIP's SAM2 setting;
            default). With one, SAM2 still swaps in a better of its three masks when the first is unstable.
        device: where the model runs (None: CUDA when present, else CPU).

    Raises:
        OvdenseError: transformers missing (the ``[masks]`` extra), a missing folder, a hub id neither cached
            nor downloadable (in seconds), a checkpoint that is not SAM / SAM2, or any loading error (one line).
        InvalidArgumentError: a threshold outside [0, 1] or a non-positive count.
    """

    def __init__(
        self,
        model: str = DEFAULT_SAM_MODEL,
        points_per_side: int = 8,
        pred_iou_thresh: float = 0.4,
        stability_score_thresh: float = 0.4,
        points_per_batch: int = 64,
        box_nms_thresh: float = 0.7,
        multimask_output: bool = False,
        device=None,
    ):
        self.points_per_side = _check_count("points_per_side", points_per_side)
        self.pred_iou_thresh = _check_fraction("pred_iou_thresh", pred_iou_thresh)
        self.stability_score_thresh = _check_fraction("stability_score_thresh", stability_score_thresh)
        self.points_per_batch = _check_count("points_per_batch", points_per_batch)
        self.box_nms_thresh = _check_fraction("box_nms_thresh", box_nms_thresh)
        self.multimask_output = bool(multimask_output)
        transformers = _import_transformers()
        from .weights import resolve_device

        dev = resolve_device(device)
        from .weights import model_folder_or_hub

        where, source, kw = model_folder_or_hub(
            model, "the mask generator", ["config.json"], "config.json", _OFFLINE_HELP
        )
        try:
            config = transformers.AutoConfig.from_pretrained(where, **kw)
            model_type = config.model_type
            if model_type not in SAM_MODEL_TYPES:
                raise OvdenseError(
                    f"{source} is a {model_type!r} model; the mask generator runs {', '.join(SAM_MODEL_TYPES)}"
                )
            sam = transformers.AutoModelForMaskGeneration.from_pretrained(where, config=config, **kw)
            image_processor = transformers.AutoImageProcessor.from_pretrained(where, **kw)
            # float32 on every device: the masks then depend on the weights alone, not on the device's fp16 path.
            sam = sam.float().eval()
            self.pipeline = transformers.pipeline(
                "mask-generation",
                model=sam,
                image_processor=image_processor,
                device=dev,
                pipeline_class=_pipeline_class(),
            )
        except OvdenseError:
            raise
        except Exception as err:
            reason = cause_line(err)
            if "sam2" in reason and importlib.util.find_spec("transformers.models.sam2") is None:
                raise OvdenseError(
                    f"{source} is a SAM2 checkpoint, which transformers {transformers.__version__} cannot run: "
                    "pip install -U transformers"
                ) from None
            raise OvdenseError(f"cannot load the mask generator from {source}: {reason}") from None
        self.pipeline.multimask_output = self.multimask_output
        self.model = str(model)
        self.model_type = model_type
        self.source = source
        self.device = dev

    @property
    def settings(self) -> dict:
        """What decides the masks, for a results' settings JSON."""
        return {
            "generator": self.model_type,
            "model": self.model,
            "points_per_side": self.points_per_side,
            "pred_iou_thresh": self.pred_iou_thresh,
            "stability_score_thresh": self.stability_score_thresh,
            "box_nms_thresh": self.box_nms_thresh,
            "multimask_output": self.multimask_output,
        }

    @property
    def name(self) -> str:
        """One line naming the generator and its settings, e.g. ``sam(model=facebook/sam-vit-base,
        points_per_side=8, pred_iou_thresh=0.4, stability_score_thresh=0.4, box_nms_thresh=0.7,
        multimask_output=False)``."""
        settings = self.settings
        kind = settings.pop("generator")
        return f"{kind}({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def __repr__(self) -> str:
        return f"SamMaskGenerator({self.name})"

    def masks(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The generator's masks before painting.

        Args:
            image: H x W x 3 uint8 RGB.

        Returns:
            (masks, scores): K x H x W bool in the pipeline's order (NMS survivors, best score first), and
            K float32 predicted IoUs; K may be 0.

        Raises:
            InvalidArgumentError: not an H x W x 3 uint8 array.
            OvdenseError: the processor gave masks of another size than the image (a misconfigured folder).
        """
        from PIL import Image

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
            raise InvalidArgumentError(f"image: expected H x W x 3 RGB, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise InvalidArgumentError(f"image: expected uint8 RGB, got {image.dtype}")
        height, width = image.shape[:2]
        out = self.pipeline(
            Image.fromarray(np.ascontiguousarray(image)),
            points_per_crop=self.points_per_side,
            pred_iou_thresh=self.pred_iou_thresh,
            stability_score_thresh=self.stability_score_thresh,
            points_per_batch=self.points_per_batch,
            crops_nms_thresh=self.box_nms_thresh,
        )
        masks = [np.asarray(m, dtype=bool) for m in out["masks"]]
        for m in masks:
            if m.shape != (height, width):
                raise OvdenseError(
                    f"mask generator {self.source} returned {m.shape[0]} x {m.shape[1]} masks for a "
                    f"{height} x {width} image; check its processor config"
                )
        scores = np.asarray(out["scores"], dtype=np.float32).reshape(-1)
        stacked = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return stacked, scores

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The region map of an image, painted as CorrCLIP paints SAM's masks.

        Args:
            image: H x W x 3 uint8 RGB.

        Returns:
            H x W int64: masks in ascending area get ids 1..K, a larger mask over a smaller one where they
            overlap (ties keep the generator's order), 0 where no mask falls; all zeros without masks.
        """
        masks, _ = self.masks(image)
        if len(masks) == 0:
            return np.zeros(masks.shape[1:], dtype=np.int64)
        return paint_regions(masks)


def mask_generator(name: str, **kwargs) -> SamMaskGenerator:
    """The online mask generator of a name.

    Args:
        name: ``sam`` (default checkpoint :data:`DEFAULT_SAM_MODEL`) or ``sam2`` (:data:`DEFAULT_SAM2_MODEL`,
            CorrCLIP's SAM2 Hiera-L).
        **kwargs: :class:`SamMaskGenerator`'s arguments (``model=`` replaces the default checkpoint).

    Raises:
        OvdenseError: an unknown name (the message lists the names), or what :class:`SamMaskGenerator` raises.
    """
    key = str(name).strip().lower()
    if key not in MASK_GENERATORS:
        raise OvdenseError(f"unknown mask generator {name!r}; available: {', '.join(MASK_GENERATORS)}")
    kwargs.setdefault("model", MASK_GENERATORS[key])
    return SamMaskGenerator(**kwargs)
