"""Online class-agnostic masks for CorrCLIP: transformers' SAM / SAM2 / SAM 3 automatic masks and EoMT panoptic
segments.

- :class:`SamMaskGenerator`: an image (H x W x 3 uint8 RGB) -> a region map (H x W int64), from
  transformers' ``mask-generation`` pipeline (SAM, SAM2, SAM 3's tracker), painted as CorrCLIP paints SAM's masks
  (:func:`ovdense.masks.paint_regions`: ascending area, ids 1..K, larger masks over smaller, 0 unsegmented).
- :class:`EomtMaskGenerator`: the same from EoMT's COCO-panoptic segments (CorrCLIPv2's ``eomt`` generator):
  0 unsegmented, segments 1..n.
- :func:`mask_generator`: the generator of a name (``sam``, ``sam2``, ``sam3``, ``eomt``; the CLI's
  ``--mask-generator``).

Every generator returns ids in one convention, the one of :mod:`ovdense.masks`: the smallest id (0) is the
unsegmented rest, every other id one region (EoMT with ``authors_ids=True`` excepted). CorrCLIP's vote skips the
smallest id of a map, CorrCLIPv2's retrieval takes every id as a region and its memory-bank builder registers the
non-zero ids (see :class:`EomtMaskGenerator` for what that means for EoMT, whose own ids differ).

The images come as ovdense decodes them (EXIF orientation applied), so the masks fit the image the segmenter sees;
CorrCLIPv2's generators read the file without EXIF at inference and with it when building a bank (MG:54-58).

CorrCLIP's published numbers use its pre-generated masks (read with :func:`ovdense.masks.read_region_map`);
this module makes masks for images that have none. transformers is the ``[masks]`` extra (the sam3 generator needs
transformers >= 5, eomt one that has EoMT, mid-2025 on) and is imported only inside the generators; importing this
module loads neither transformers nor torch, so the command line can check a generator name before any model loads.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np

from .errors import InvalidArgumentError, OvdenseError, cause_line
from .masks import paint_regions

__all__ = [
    "COCO_PANOPTIC_STUFF",
    "DEFAULT_EOMT_MODEL",
    "DEFAULT_SAM2_MODEL",
    "DEFAULT_SAM3_MODEL",
    "DEFAULT_SAM_MODEL",
    "EomtMaskGenerator",
    "MASK_GENERATORS",
    "SamMaskGenerator",
    "mask_generator",
]

#: SAM ViT-B in transformers' format (the smallest SAM; ~94 M parameters).
DEFAULT_SAM_MODEL = "facebook/sam-vit-base"
#: CorrCLIP's online generator is SAM2 Hiera-L (``sam2_hiera_large.pt``); this is its transformers repo.
DEFAULT_SAM2_MODEL = "facebook/sam2-hiera-large"
#: SAM 3 (gated on the hub); its tracker (SAM2-style point prompts) makes the automatic masks.
DEFAULT_SAM3_MODEL = "facebook/sam3"
#: CorrCLIPv2's EoMT: DINOv2-L EoMT, 200 queries, COCO panoptic at 640 px (MG:107-116), in transformers' format.
DEFAULT_EOMT_MODEL = "tue-mps/coco_panoptic_eomt_large_640"
#: Generator name -> its default checkpoint (hub id). ``eomt`` builds an :class:`EomtMaskGenerator`, the others a
#: :class:`SamMaskGenerator`.
MASK_GENERATORS = {
    "sam": DEFAULT_SAM_MODEL,
    "sam2": DEFAULT_SAM2_MODEL,
    "sam3": DEFAULT_SAM3_MODEL,
    "eomt": DEFAULT_EOMT_MODEL,
}
#: The transformers model types :class:`SamMaskGenerator` runs -> the generator's name (the pipeline also lists
#: SAM-HQ and EdgeTAM: untested here, so refused rather than run silently). ``sam3_video`` is facebook/sam3's
#: config (image detector + tracker), whose tracker transformers loads for mask generation.
SAM_MODEL_TYPES = {"sam": "sam", "sam2": "sam2", "sam3_tracker": "sam3", "sam3_video": "sam3"}
#: COCO panoptic's stuff classes in the 133-class order (EoMT's config ``stuff_classes: [80, ..., 132]``): the
#: segments of one stuff class are one region.
COCO_PANOPTIC_STUFF = tuple(range(80, 133))

_MASKS_EXTRA = "the online mask generator needs the masks extra: pip install 'ovdense[masks]'"
_OFFLINE_HELP = (
    "On a machine with internet run `python -c \"from transformers import pipeline; pipeline('mask-generation', "
    "model='{repo}')\"` and copy ~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), or pass a local "
    "folder (the model and its processor saved with save_pretrained) as the generator's model"
)
_EOMT_OFFLINE_HELP = (
    'On a machine with internet run `python -c "from transformers import AutoModelForUniversalSegmentation as M, '
    "AutoImageProcessor as P; M.from_pretrained('{repo}'); P.from_pretrained('{repo}')\"` and copy "
    "~/.cache/huggingface/hub to this machine (or set HF_HUB_CACHE), or pass a local folder (the model and its "
    "processor saved with save_pretrained) as the generator's model"
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
    """Class-agnostic region maps from SAM, SAM2 or SAM 3 automatic mask generation (transformers' pipeline).

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

    SAM 3 (``sam3``, ours): CorrCLIPv2 has no SAM 3 generator. SAM 3's point-promptable part is its tracker
    (``Sam3TrackerModel``, "an updated SAM2 with the same API"), which transformers' pipeline runs as SAM2's automatic
    mask generator: the closest to SAM/SAM2's automatic masks, with the same settings and painting. Its concept
    prompts (a generic noun such as "object") would make a detector of that noun instead. facebook/sam3's config is the
    image + video model (``sam3_video``), whose tracker transformers loads for mask generation; its weights must all be
    in the checkpoint (a missing one is an error, not a random value). Not run on facebook/sam3 here (gated): checked
    on random tiny SAM 3 trackers.

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
        expect: ``sam``, ``sam2`` or ``sam3``: the checkpoint must be of that kind (the generator a user named).

    Raises:
        OvdenseError: transformers missing (the ``[masks]`` extra), a missing folder, a hub id neither cached
            nor downloadable (in seconds), a checkpoint that is not SAM / SAM2 / SAM 3, or any loading error (one line).
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
        expect: str | None = None,
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
            if expect is not None and SAM_MODEL_TYPES[model_type] != expect:
                raise OvdenseError(f"{source} is a {SAM_MODEL_TYPES[model_type]} checkpoint, not {expect}")
            sam, info = transformers.AutoModelForMaskGeneration.from_pretrained(
                where, config=config, output_loading_info=True, **kw
            )
            missing = list(info.get("missing_keys") or [])
            if missing and SAM_MODEL_TYPES[model_type] == "sam3":  # a tracker read from the video model's keys
                raise OvdenseError(
                    f"{source}: {len(missing)} weights of SAM 3's tracker are missing from the checkpoint "
                    f"(e.g. {missing[0]})"
                )
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
            for arch, module in (("sam2", "sam2"), ("sam3", "sam3_tracker")):
                if arch in reason and importlib.util.find_spec(f"transformers.models.{module}") is None:
                    raise OvdenseError(
                        f"{source} is a {arch.upper()} checkpoint, which transformers {transformers.__version__} "
                        "cannot run: pip install -U transformers"
                    ) from None
            raise OvdenseError(f"cannot load the mask generator from {source}: {reason}") from None
        self.pipeline.multimask_output = self.multimask_output
        self.model = str(model)
        self.model_type = model_type
        self.kind = SAM_MODEL_TYPES[model_type]
        self.source = source
        self.device = dev

    @property
    def settings(self) -> dict:
        """What decides the masks, for a results' settings JSON."""
        return {
            "generator": self.kind,
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

        image = _check_image(image)
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


class EomtMaskGenerator:
    """Class-agnostic region maps from EoMT's panoptic segmentation (CorrCLIPv2's ``eomt`` generator, MG:107-138).

    transformers' ``EomtForUniversalSegmentation`` and ``post_process_panoptic_segmentation`` with the authors'
    settings: queries whose best class (not "no object") scores above ``threshold`` = 0.8, masks binarised at
    ``mask_threshold`` = 0.5, a query kept when its argmax area over its own mask area passes ``overlap_threshold`` =
    0.8, the segments of one stuff class merged into one (COCO panoptic's stuff classes 80..132, the authors' config),
    masked attention off (the authors build EoMT with ``masked_attn_enabled=False``; here ``attn_mask_probs`` = 0).
    The image is resized so its longer side is 640 and padded to 640 x 640 (the authors' rule), and the logits come
    back to the image size bilinearly.

    Ids: the authors' map has -1 = unsegmented and segments 0..n-1 (the panoptic segment channel, MG:138). Here it
    is shifted by one: 0 = unsegmented, segments 1..n, the convention of the other generators and of
    :mod:`ovdense.masks` (the smallest id is the unsegmented rest). A shift keeps the order of the ids, so
    CorrCLIP's vote (which skips the smallest id: the unsegmented rest, or segment 0 when every pixel is covered) and
    CorrCLIPv2's per-image retrieval (every id a region) are unchanged. A memory bank built from these maps with the
    builder's rule (regions = non-zero ids, MF:41-42) keeps the n segments and drops the unsegmented rest, whereas
    the authors' EoMT banks drop segment 0 and keep the unsegmented rest as a region (spec quirk 10);
    ``authors_ids=True`` returns the authors' ids, which reproduces that.

    Differences from the authors' run (ours): float32 (they use fp16 autocast), transformers' resize (torchvision
    bilinear; theirs: PIL bilinear, sizes rounded the same way up to a pixel), and the overlap test: transformers
    keeps a segment when the ratio is > 0.8, the authors when it is >= 0.8 (only an exact 0.8 differs).

    Args:
        model: a hub id (``tue-mps/coco_panoptic_eomt_large_640``) or a folder with the model and its image processor
            saved by ``save_pretrained``.
        threshold, mask_threshold, overlap_threshold: as above (each in [0, 1]).
        stuff_classes: class ids whose segments are merged; default COCO panoptic's 80..132 for a 133-class model,
            none for another (with a warning: name them).
        authors_ids: return the authors' ids (-1 = unsegmented, segments 0..n-1) instead of 0 / 1..n.
        device: where the model runs (None: CUDA when present, else CPU).

    Raises:
        OvdenseError: transformers without EoMT, a missing folder, a hub id neither cached nor downloadable (in
            seconds), a checkpoint that is not EoMT, or any loading error (one line).
        InvalidArgumentError: a threshold outside [0, 1].
    """

    def __init__(
        self,
        model: str = DEFAULT_EOMT_MODEL,
        threshold: float = 0.8,
        mask_threshold: float = 0.5,
        overlap_threshold: float = 0.8,
        stuff_classes=None,
        authors_ids: bool = False,
        device=None,
    ):
        import warnings

        self.threshold = _check_fraction("threshold", threshold)
        self.mask_threshold = _check_fraction("mask_threshold", mask_threshold)
        self.overlap_threshold = _check_fraction("overlap_threshold", overlap_threshold)
        self.authors_ids = bool(authors_ids)
        transformers = _import_transformers()
        if not hasattr(transformers, "EomtForUniversalSegmentation"):
            raise OvdenseError(
                f"transformers {transformers.__version__} has no EoMT (EomtForUniversalSegmentation): "
                "pip install -U transformers"
            )
        from .weights import model_folder_or_hub, resolve_device

        dev = resolve_device(device)
        where, source, kw = model_folder_or_hub(
            model, "the mask generator", ["config.json"], "config.json", _EOMT_OFFLINE_HELP
        )
        try:
            config = transformers.AutoConfig.from_pretrained(where, **kw)
            if config.model_type != "eomt":
                raise OvdenseError(f"{source} is a {config.model_type!r} model; the eomt generator runs EoMT")
            net = transformers.EomtForUniversalSegmentation.from_pretrained(where, config=config, **kw)
            processor = transformers.AutoImageProcessor.from_pretrained(where, **kw)
        except OvdenseError:
            raise
        except Exception as err:
            raise OvdenseError(f"cannot load the mask generator from {source}: {cause_line(err)}") from None
        net = net.float().eval().to(dev)
        # Masked attention off at inference, as the authors' get_eomt(masked_attn_enabled=False): with every
        # probability 0 the blocks attend everywhere and the intermediate predictions are skipped.
        net.attn_mask_probs.zero_()
        num_labels = int(config.num_labels)
        if stuff_classes is None:
            if num_labels == len(COCO_PANOPTIC_STUFF) + 80:
                stuff_classes = COCO_PANOPTIC_STUFF
            else:
                warnings.warn(
                    f"{source} has {num_labels} classes, not COCO panoptic's 133: no stuff class is merged "
                    "(pass stuff_classes)",
                    UserWarning,
                    stacklevel=2,
                )
                stuff_classes = ()
        self.stuff_classes = tuple(int(c) for c in stuff_classes)
        self.model = str(model)
        self.source = source
        self.device = dev
        self.net = net
        self.processor = processor
        self.kind = "eomt"

    @property
    def settings(self) -> dict:
        """What decides the masks, for a results' settings JSON."""
        return {
            "generator": "eomt",
            "model": self.model,
            "threshold": self.threshold,
            "mask_threshold": self.mask_threshold,
            "overlap_threshold": self.overlap_threshold,
            "stuff_classes": "coco_panoptic" if self.stuff_classes == COCO_PANOPTIC_STUFF else list(self.stuff_classes),
            "authors_ids": self.authors_ids,
        }

    @property
    def name(self) -> str:
        """One line naming the generator and its settings, e.g. ``eomt(model=tue-mps/..., threshold=0.8, ...)``."""
        settings = self.settings
        kind = settings.pop("generator")
        return f"{kind}({', '.join(f'{k}={v}' for k, v in settings.items())})"

    def __repr__(self) -> str:
        return f"EomtMaskGenerator({self.name})"

    def panoptic(self, image: np.ndarray) -> dict:
        """transformers' panoptic result of an image: ``segmentation`` (H x W int64, -1 = none, segments 0..n-1)
        and ``segments_info`` (per segment: ``id``, ``label_id``, ``score``).

        Raises:
            InvalidArgumentError: not an H x W x 3 uint8 array.
        """
        import torch

        image = _check_image(image)
        height, width = image.shape[:2]
        from PIL import Image

        inputs = self.processor(images=Image.fromarray(np.ascontiguousarray(image)), do_pad=True, return_tensors="pt")
        with torch.no_grad():
            outputs = self.net(pixel_values=inputs["pixel_values"].to(self.device))
        result = self.processor.post_process_panoptic_segmentation(
            outputs,
            target_sizes=[(height, width)],
            threshold=self.threshold,
            mask_threshold=self.mask_threshold,
            overlap_mask_area_threshold=self.overlap_threshold,
            stuff_classes=list(self.stuff_classes),
        )[0]
        segmentation = torch.as_tensor(result["segmentation"]).to(torch.int64).cpu().numpy()
        return {"segmentation": segmentation, "segments_info": result["segments_info"]}

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The region map of an image.

        Args:
            image: H x W x 3 uint8 RGB.

        Returns:
            H x W int64: 0 where no segment falls, segments 1..n in the order of their queries (stuff segments of
            one class merged); with ``authors_ids`` -1 and 0..n-1.
        """
        segmentation = self.panoptic(image)["segmentation"]
        return segmentation if self.authors_ids else segmentation + 1


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise InvalidArgumentError(f"image: expected H x W x 3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise InvalidArgumentError(f"image: expected uint8 RGB, got {image.dtype}")
    return image


def mask_generator(name: str, **kwargs) -> SamMaskGenerator | EomtMaskGenerator:
    """The online mask generator of a name.

    Args:
        name: ``sam`` (default checkpoint :data:`DEFAULT_SAM_MODEL`), ``sam2`` (:data:`DEFAULT_SAM2_MODEL`,
            CorrCLIP's SAM2 Hiera-L), ``sam3`` (:data:`DEFAULT_SAM3_MODEL`, its tracker's point grid) or ``eomt``
            (:data:`DEFAULT_EOMT_MODEL`, CorrCLIPv2's EoMT).
        **kwargs: the arguments of :class:`SamMaskGenerator` or :class:`EomtMaskGenerator` (``model=`` replaces the
            default checkpoint, which must be of the named kind).

    Raises:
        OvdenseError: an unknown name (the message lists the names), a checkpoint of another kind, or what the
            generator raises.
    """
    key = str(name).strip().lower()
    if key not in MASK_GENERATORS:
        raise OvdenseError(f"unknown mask generator {name!r}; available: {', '.join(MASK_GENERATORS)}")
    kwargs.setdefault("model", MASK_GENERATORS[key])
    if key == "eomt":
        return EomtMaskGenerator(**kwargs)
    return SamMaskGenerator(**kwargs, expect=key)
