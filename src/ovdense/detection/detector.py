"""``Detector``: open-vocabulary detection with F-ViT, built like the ``Segmenter``.

    det = Detector.from_pretrained("fvit_b16_ovcoco.pth", model="EVA02-B-16", pretrained="merged2b_s8b_b131k")
    det.set_image("street.jpg")
    result = det.detect("person; bicycle; traffic light")
    result.overlay(image).save("boxes.png")

The image pass (tower, pyramid, FPN, RPN, RoI head) runs once per image; every class list after that costs a
matrix product, the ensemble and NMS.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import OvdenseError
from .benchmarks import BENCHMARKS, fvit_config
from .checkpoint import FORMAT, is_mmdet_layout, read_safetensors_metadata, split_mmdet_state
from .fvit import FViT, FViTConfig, ImageFeatures, RegionOutputs
from .masks import paste_masks, scale_factor_tensor, to_input, to_original
from .result import DetectionResult

log = logging.getLogger(__name__)

#: EVA02 towers by (width, depth, patch size): the architecture a CLIPSelf checkpoint's ``backbone.visual`` is.
_EVA_ARCHS = {(768, 12, 16): "EVA02-B-16", (1024, 24, 14): "EVA02-L-14-336", (1024, 24, 16): "EVA02-L-14"}

#: mmdet keys a checkpoint may hold that this F-ViT does not read, by why.
_IGNORABLE = ("mask_head.", "box_head.detect_temperature")


@dataclass(frozen=True)
class PreparedImage:
    """An image as F-ViT's test pipeline feeds it (``Resize(keep_ratio)``, ``Normalize``, ``Pad(square)``).

    Attributes:
        tensor: 3 x S x S float32, ImageNet-normalised RGB, zero padded at the bottom and right.
        image_shape: (h', w') of the resized image inside the padding; boxes are clipped to it.
        scale: (w'/w, h'/h), what boxes are divided by to return to the original pixels.
        original_size: (H, W) of the input.
    """

    tensor: torch.Tensor
    image_shape: tuple[int, int]
    scale: tuple[float, float]
    original_size: tuple[int, int]


def prepare_image(image: np.ndarray, size: int) -> PreparedImage:
    """mmdet's test pipeline on an H x W x 3 uint8 RGB array: the long side to ``size`` with OpenCV's bilinear
    resize on the uint8 pixels (mmcv's sizes, :func:`~ovdense.detection.data.rescale_size`), ImageNet
    normalisation on 0-255 and zero padding to ``size`` x ``size`` (:func:`~ovdense.detection.data.normalise_and_pad`,
    shared with training)."""
    import cv2

    from .data import normalise_and_pad, rescale_size

    h, w = image.shape[:2]
    new_w, new_h = rescale_size(w, h, (size, size))
    resized = cv2.resize(np.ascontiguousarray(image), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    tensor = normalise_and_pad(resized, size)
    return PreparedImage(tensor, (new_h, new_w), (new_w / w, new_h / h), (h, w))


@dataclass
class EncodedImage:
    """One image after the detector's class-independent pass (:meth:`Detector.encode_images`).

    Attributes:
        image: H x W x 3 uint8 RGB as given.
        prepared: the network input and its geometry.
        regions: per-proposal boxes and embeddings.
        features: with a mask head only, the image's FPN levels P2-P5 (and CLIP map), which the masks of the final,
            class-dependent detections are pooled from after NMS; None otherwise. P2-P5 cost
            ``fpn_channels * (S / stride_P2)^2 * 4 * 4/3`` bytes (fp32): about 85 MB for OV-LVIS B/16 at S = 1024
            and L/14 at S = 896 (P2 is 256 x 256 either way), plus 8-13 MB of CLIP map, held as long as the encoded
            image is (views into the batch: an image of a batch keeps the batch's maps).
    """

    image: np.ndarray
    prepared: PreparedImage
    regions: RegionOutputs
    features: ImageFeatures | None = None


def infer_architecture(visual: dict[str, torch.Tensor]) -> str | None:
    """The EVA02 architecture of an EVA-CLIP ``visual.*`` state (None when it is not one of F-ViT's)."""
    blocks = {int(k.split(".")[2]) for k in visual if k.startswith("visual.blocks.")}
    proj = visual.get("visual.patch_embed.proj.weight")
    if not blocks or proj is None:
        return None
    return _EVA_ARCHS.get((proj.shape[0], max(blocks) + 1, proj.shape[-1]))


def _describe_visual(visual: dict[str, torch.Tensor]) -> str:
    blocks = {int(k.split(".")[2]) for k in visual if k.startswith("visual.blocks.")}
    proj = visual.get("visual.patch_embed.proj.weight")
    if proj is None or not blocks:
        return "an unrecognised tower"
    return f"a {proj.shape[0]}-wide, {max(blocks) + 1}-block, patch-{proj.shape[-1]} tower"


@dataclass
class _Loaded:
    head: dict[str, torch.Tensor]
    visual: dict[str, torch.Tensor]
    model_name: str | None
    config: dict | None
    layout: str
    unused: list[str]


#: How a detector on the Hugging Face hub is named: ``hf-hub:ORG/REPO/FILE`` (the file's path inside the repo).
HUB_PREFIX = "hf-hub:"


def resolve_detector(detector: str | Path) -> Path:
    """A local detector file, or ``hf-hub:ORG/REPO/FILE`` fetched into (or found in) the hub cache.

    Offline (``HF_HUB_OFFLINE`` or the hub out of reach) a cached file is used; an uncached one is an error in
    seconds, not after the hub client's retries.

    Raises:
        OvdenseError: a malformed hub name, a file neither cached nor downloadable, or a download that fails.
    """
    text = str(detector)
    if not text.startswith(HUB_PREFIX):
        return Path(detector)
    parts = text[len(HUB_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise OvdenseError(f"detector {text}: expected {HUB_PREFIX}ORG/REPO/FILE (e.g. hf-hub:org/fvit/fvit.pth)")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    from ..errors import cause_line
    from ..weights import hub_reachable

    cached = try_to_load_from_cache(repo, filename)
    reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else hub_reachable(constants.ENDPOINT)
    if reason:
        if isinstance(cached, str):
            return Path(cached)
        raise OvdenseError(
            f"detector {text} is not in the local cache and could not be downloaded ({reason}); download it on a "
            "machine with internet (or copy ~/.cache/huggingface/hub here), or pass a local file"
        )
    try:
        return Path(hf_hub_download(repo, filename))
    except Exception as err:  # the hub client raises one type per failure (repo, file, network)
        raise OvdenseError(f"cannot download detector {text}: {cause_line(err)}") from None


def read_detector(path: str | Path) -> _Loaded:
    """Read an F-ViT file: CLIPSelf's mmdet checkpoint or ovdense's safetensors.

    Raises:
        OvdenseError: a missing or unreadable file, a pickle that does not load with ``weights_only=True``, or a
            file that is not an F-ViT detector.
    """
    from ..weights import read_checkpoint

    path = Path(path)
    metadata = read_safetensors_metadata(path) if path.suffix == ".safetensors" and path.is_file() else None
    state, _ = read_checkpoint(path)
    if metadata is not None and metadata.get("format") == FORMAT:
        import json

        visual = {k: v for k, v in state.items() if k.startswith("visual.")}
        head = {k: v for k, v in state.items() if not k.startswith("visual.")}
        return _Loaded(head, visual, metadata.get("model"), json.loads(metadata["config"]), "ovdense", [])
    if not is_mmdet_layout(state):
        raise OvdenseError(
            f"{path} is not an F-ViT detector (no roi_head.bbox_head.* weights, no ovdense F-ViT metadata)"
        )
    head, visual, unused = split_mmdet_state(state)
    if not visual:
        raise OvdenseError(f"{path} holds no frozen tower (backbone.visual.*): not a CLIPSelf F-ViT checkpoint")
    return _Loaded(head, visual, None, None, "mmdet", unused)


def _load_head(model: FViT, head: dict[str, torch.Tensor], label: str) -> None:
    """Load everything but the tower strictly; keys this F-ViT has no use for (a mask head on the transfer
    setting, a learned temperature where it is fixed) are logged, any other mismatch is an error."""
    from ..errors import first_line

    own = {k for k in model.state_dict() if not k.startswith("tower.")}
    ignored = [k for k in head if k not in own and k.startswith(_IGNORABLE)]
    state = {k: v for k, v in head.items() if k not in ignored}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if not parts:
        try:
            model.load_state_dict(state, strict=False)
        except RuntimeError as err:
            lines = [ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln]
            parts.append(lines[0].rstrip(".") if lines else first_line(err))
    if parts:
        raise OvdenseError(f"{label} does not fit this F-ViT: " + "; ".join(parts))
    if ignored:
        log.info("%s: not used by this F-ViT: %s", label, ", ".join(sorted(ignored)))


def class_key(name: str) -> str:
    """How class names are compared with a split's: LVIS writes ``aerosol_can`` where a user types "aerosol can"."""
    return " ".join(name.replace("_", " ").lower().split())


#: The training split's base classes per benchmark (``ovdense/eval/classes``): OV-COCO's 48, OV-LVIS's 866 common and
#: frequent classes (CLIPSelf's ``mscoco_seen_classes.json`` / ``lvis_v1_seen_classes.json``).
_BASE_FILES = {"ov-coco": "ov_coco_base.txt", "ov-lvis": "ov_lvis_base.txt"}


def _base_names(benchmark: str) -> frozenset[str]:
    """The base (seen) class names of a benchmark's training split (:func:`class_key` form); every other name is
    scored as novel."""
    from importlib import resources

    if benchmark not in _BASE_FILES:
        return frozenset()
    text = resources.files("ovdense.eval").joinpath(f"classes/{_BASE_FILES[benchmark]}").read_text(encoding="utf-8")
    return frozenset(class_key(line) for line in text.splitlines() if line.strip())


class Detector:
    """Open-vocabulary detection with an F-ViT (see :mod:`ovdense.detection.fvit`).

    Build it with :meth:`from_pretrained`. ``settings`` holds everything resolved.
    """

    def __init__(self, model: FViT, loaded, benchmark: str, device: torch.device, settings: dict, class_table=None):
        self.model = model.to(device).eval()
        self.loaded = loaded
        self.benchmark = benchmark
        self.device = device
        self.settings = settings
        self.class_table = class_table
        self.base_names = _base_names(benchmark)
        self._current: EncodedImage | None = None
        self._embedding_cache: dict[tuple[str, ...], torch.Tensor] = {}

    @classmethod
    def from_pretrained(
        cls,
        detector: str | Path,
        model: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        benchmark: str = "ov-coco",
        class_embeddings: str | Path | None = None,
        device: str | torch.device | None = "cpu",
        clip_head: str = "value",
        declip_mode: str = "qq",
        **overrides,
    ) -> Detector:
        """Load an F-ViT.

        Args:
            detector: CLIPSelf's mmdet ``.pth`` or an ovdense ``.safetensors`` detector: a local file or
                ``hf-hub:ORG/REPO/FILE`` (:func:`resolve_detector`).
            model: the CLIP architecture (EVA02-B-16, EVA02-L-14-336, ...); read from the detector when omitted.
            pretrained, checkpoint: CLIP weights for the **text** tower (class names); the image tower is always
                the detector's own frozen copy. Without them, class names come from ``class_embeddings``.
            benchmark: ``ov-coco``, ``ov-lvis`` or ``coco`` (transfer): the test settings and which classes count
                as base in the ensemble.
            class_embeddings: an F-ViT ``.pt`` class-embedding file (name -> vector, with ``background``).
            device: where to run.
            clip_head: ``value`` (F-ViT) or ``declip`` (DeCLIP's last block for the CLIP region scores; ours).
            declip_mode: ``qq`` or ``csa`` with ``clip_head="declip"``.
            overrides: :class:`FViTConfig` fields (``score_threshold``, ``nms_iou``, ``alpha`` ...).

        Raises:
            OvdenseError: a file that is not an F-ViT, a tower that does not fit ``model``, bad settings.
        """
        from ..weights import load_model, resolve_device

        if benchmark not in BENCHMARKS:
            raise OvdenseError(f"unknown detection benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
        dev = resolve_device(device)
        class_table = None
        if class_embeddings is not None:
            from .text import read_class_embeddings

            class_table = read_class_embeddings(class_embeddings)
            if "background" not in class_table:
                raise OvdenseError(
                    f"class embeddings {class_embeddings} hold no 'background' entry (F-ViT's classifier needs one)"
                )
        label = f"detector {detector}"
        got = read_detector(resolve_detector(detector))
        if got.layout == "mmdet":
            inferred = infer_architecture(got.visual)
            if model is None:
                if inferred is None:
                    raise OvdenseError(
                        f"{label} holds {_describe_visual(got.visual)}, not one of F-ViT's EVA02 towers; pass --model"
                    )
                model = inferred
            elif inferred is not None and inferred != model and not model.startswith("ovdense-test"):
                described = _describe_visual(got.visual)
                raise OvdenseError(f"{label} was built on {inferred} ({described}); --model is {model}")
        else:
            if model is not None and got.model_name is not None and model != got.model_name:
                raise OvdenseError(f"{label} was built on {got.model_name}; --model is {model}")
            model = model or got.model_name
        loaded = load_model(
            model, pretrained=pretrained, checkpoint=checkpoint, device="cpu", visual_state=got.visual,
            visual_label=label,
        )
        settings = dict(got.config or {})
        settings.pop("extra", None)
        test_keys = (
            "vlm_temperature", "alpha", "beta", "ensemble_all_classes", "score_threshold", "nms_iou",
            "max_detections",
        )
        base = fvit_config(benchmark, loaded.tower).to_dict()
        if got.layout == "mmdet":
            settings = base
            settings["num_train_classes"] = int(got.head["box_head.fc_cls.weight"].shape[0]) - 1
            settings["rpn_norm"] = any(k.startswith("rpn.convs.0.1.") for k in got.head)
            settings["fc_dim"] = int(got.head["box_head.shared_fcs.1.weight"].shape[0])
            settings["fpn_channels"] = int(got.head["fpn.inner_blocks.0.0.weight"].shape[0])
            if benchmark == "coco":
                settings["with_mask"] = False
        else:  # an ovdense detector keeps the input size it was trained at; the test rule is the benchmark's
            settings.update({k: base[k] for k in test_keys})
        settings.update(clip_head=clip_head, declip_mode=declip_mode)
        try:
            settings.update(overrides)
            config = FViTConfig.from_dict(settings)
            fvit = FViT(loaded.tower, config)
        except (TypeError, ValueError) as err:
            raise OvdenseError(f"{label}: {err}") from None
        _load_head(fvit, got.head, label)
        if class_table is not None:
            width = int(next(iter(class_table.values())).shape[0])
            if width != config.fc_dim:
                raise OvdenseError(
                    f"class embeddings {class_embeddings} hold {width}-wide embeddings; the detector's classifier is "
                    f"{config.fc_dim}-wide (the file was made with another CLIP)"
                )
        summary = {
            "detector": str(detector),
            "layout": got.layout,
            "model": model,
            "benchmark": benchmark,
            "text": loaded.source if loaded.has_text_weights else None,
            "class_embeddings": None if class_embeddings is None else str(class_embeddings),
            **config.to_dict(),
        }
        return cls(fvit, loaded, benchmark, dev, summary, class_table)

    # ---- classes ------------------------------------------------------------------------------------------------
    def class_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """D x (len(names) + 1) unit embeddings of ``names`` then background, from the class-embedding file when
        one was given, else from the CLIP's text tower (F-ViT's prompts, see :mod:`.text`).

        Raises:
            OvdenseError: a name missing from the file, or no source of text embeddings.
        """
        key = tuple(names)
        if key in self._embedding_cache:
            return self._embedding_cache[key]
        from .text import fvit_class_embeddings, select_class_embeddings

        width = self.model.config.fc_dim
        if self.class_table is not None:
            emb = select_class_embeddings(self.class_table, names, width, self.settings["class_embeddings"])
        elif self.loaded is not None and self.loaded.has_text_weights:
            emb = fvit_class_embeddings(self.loaded.model, self.loaded.tokenizer, names, device=self.device)
        else:
            raise OvdenseError(
                "no text embeddings for the class names: pass the CLIP's weights (pretrained=/--pretrained or "
                "checkpoint=/--checkpoint) for its text tower, or an F-ViT .pt file as "
                "class_embeddings=/--class-embeddings"
            )
        if len(self._embedding_cache) > 16:
            self._embedding_cache.clear()
        self._embedding_cache[key] = emb
        return emb

    def base_mask(self, names: Sequence[str]) -> torch.Tensor:
        """(C+1,) bool: True for the classes the detector was trained on (scored with alpha) and background.

        A name counts as base when it is one of the training benchmark's base classes (OV-COCO's 48, OV-LVIS's 866;
        compared as :func:`class_key`); every other name is novel (beta). With the transfer setting every class takes
        alpha.
        """
        mask = [class_key(name) in self.base_names for name in names] + [True]
        return torch.tensor(mask, dtype=torch.bool)

    # ---- images -------------------------------------------------------------------------------------------------
    @property
    def image(self) -> np.ndarray | None:
        """The current image (H x W x 3 uint8 RGB), or None before :meth:`set_image`."""
        return None if self._current is None else self._current.image

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> list[EncodedImage]:
        """The class-independent image pass (tower, pyramid, FPN, RPN, RoI head) of several images in one batch.

        Every image is resized to the same S x S input, so any sizes batch together. Hand the results to
        :meth:`detect` (``encoded=``) for any number of class lists. With a mask head (OV-LVIS) each result also
        keeps its P2-P5 feature maps for the masks (see :class:`EncodedImage`).
        """
        from ..predictor import load_image

        rgbs = [load_image(im) for im in images]
        prepared = [prepare_image(rgb, self.model.config.image_size) for rgb in rgbs]
        tensors = torch.stack([p.tensor for p in prepared]).to(self.device)
        features = self.model.image_features(tensors, [p.image_shape for p in prepared])
        regions = self.model.regions(features, self.model.propose(features))
        keep = self.model.mask_head is not None
        kept = [features.image(b) if keep else None for b in range(len(prepared))]
        return [EncodedImage(*parts) for parts in zip(rgbs, prepared, regions, kept, strict=True)]

    def set_image(self, image) -> None:
        """Run the image pass once; :meth:`detect` reuses it for any classes."""
        self._current = self.encode_images([image])[0]

    @torch.no_grad()
    def detect(
        self, classes, image=None, encoded: EncodedImage | None = None, *, masks: bool = True
    ) -> DetectionResult:
        """Detect ``classes`` ("cat; dog, puppy; sofa", a list of names or of synonym lists) in the current image,
        in ``image`` (which becomes the current one) or in an ``encoded`` one (:meth:`encode_images`).

        A class with synonyms takes, per box, the best of its names' ensemble scores (ours: F-ViT has one name per
        class).

        With a mask head (OV-LVIS) and ``masks=True`` the result holds K x H x W bool ``masks`` of the original
        image, mmdet's test flow (:mod:`.masks`): the detections times ``scale_factor`` are the RoIs, the mask
        head's probabilities are pasted at those boxes divided by ``scale_factor`` and thresholded at 0.5.
        ``masks=False`` skips them (boxes only).
        """
        if image is not None:
            self.set_image(image)
        current = encoded if encoded is not None else self._current
        if current is None:
            raise OvdenseError("no image: call set_image(image) first or pass image=")
        features = current.features if masks and self.model.mask_head is not None else None
        return self._detect_prepared(current.prepared, current.regions, classes, features)

    def detect_batch(self, images: Sequence, classes, *, masks: bool = True) -> list[DetectionResult]:
        """Detect ``classes`` in several images with one batched image pass."""
        return [self.detect(classes, encoded=e, masks=masks) for e in self.encode_images(images)]

    def _detect_prepared(
        self, prepared: PreparedImage, regions: RegionOutputs, classes, features: ImageFeatures | None = None
    ) -> DetectionResult:
        from ..classes import display_names, normalise_classes

        try:
            groups = normalise_classes(classes)
        except ValueError as err:
            raise OvdenseError(str(err)) from None
        names = [n for g in groups for n in g]
        owner = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        emb = self.class_embeddings(names)
        base = self.base_mask(names)
        dets, labels = self.model.detections(regions, emb, base, owner=owner if len(names) > len(groups) else None)
        # mmdet divides by its float32 scale factors (rescale=True at test).
        scale_factor = scale_factor_tensor(prepared.scale)
        boxes = to_original(dets[:, :4].cpu(), scale_factor)
        masks = None
        if features is not None:
            # mmdet's simple_test_mask: the RoIs are the rescaled detections times scale_factor; get_seg_masks
            # pastes at those divided by scale_factor again (float32 round trips, followed as they are).
            input_boxes = to_input(boxes, scale_factor)
            probs = self.model.mask_probs(features, [input_boxes.to(self.device)])[0]
            paste_boxes = to_original(input_boxes, scale_factor)
            masks = paste_masks(probs, paste_boxes, prepared.original_size, out_device="cpu").numpy()
        return DetectionResult(
            boxes=boxes.numpy(),
            scores=dets[:, 4].cpu().float().numpy(),
            labels=labels.cpu().numpy().astype(np.int64),
            class_names=display_names(groups),
            image_size=prepared.original_size,
            masks=masks,
        )
