"""``ovdense demo``: a web page to try the methods on any image, and to see where a clicked point looks.

Upload an image (or pick an example), type classes in the usual ``"sky; person, person in shirt; tree"``
syntax, tick one or more methods: the overlays appear side by side with a legend and each class's share of the
image, and each method's label PNG and JSON can be downloaded. Click a point of the image: CLIP's attention in
the chosen block (a slider), each method's own last-block attention and the affinity of its dense features,
and, with a VFM, the VFM's attention and affinity (:mod:`ovdense.attention`).

:class:`DemoSession` holds the models and does the work (no Gradio in it, so it is tested directly);
:func:`build_app` lays out the Gradio page (extra ``[demo]``: ``pip install 'ovdense[demo]'``). One CLIP serves
every method; each method's :class:`~ovdense.predictor.Segmenter` keeps the image's features, so changing only
the classes reruns only the text side. A method with a model of its own (``sam3``) gets that model, loaded once,
and its own segmenter beside them; it draws no attention maps (the attention part shows the CLIP methods' maps, and
a demo of such methods alone has no CLIP and no attention part). CorrCLIPv2 takes a memory bank opened once
(``bank=``).

With ``--detector`` (``ovdense demo --detector fvit.pth ...``) the page is a **detection** page instead, and only
that: :class:`DetectionSession` holds an F-ViT :class:`~ovdense.detection.detector.Detector`; upload an image, type
classes, **Detect**: the boxes with their class and score over the image and a legend, a table of the detections
(class, score, box) and their JSON and overlay PNG to download. A slider sets the lowest score shown. The image
pass runs once per image; new classes rerun only the text side and the ensemble, and moving the slider only redraws.
(The segmentation methods take their CLIP from --model, the detector its tower; one page per run keeps --model
meaning one thing, so the segmentation flags are refused with --detector.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .errors import InvalidArgumentError, OvdenseError

if TYPE_CHECKING:
    from .detection.result import DetectionResult

__all__ = [
    "DETECTION_EXAMPLES",
    "EXAMPLES",
    "AttentionView",
    "DemoSession",
    "DetectionSession",
    "DetectionView",
    "MethodView",
    "build_app",
    "build_detection_app",
    "detection_examples",
    "detections_html",
    "example_images",
    "random_weights_warning",
    "read_upload",
]

#: Example images shipped with ovdense (``demo_examples/``, public domain or CC0; see its README) and classes.
EXAMPLES = (
    ("astronaut.jpg", "background; person, astronaut; flag; rocket"),
    ("coffee.jpg", "background; cup, coffee cup; saucer; spoon; table"),
    ("chelsea.jpg", "background; cat; floor"),
)


#: The same images with classes for the detection page (COCO names where COCO has the thing).
DETECTION_EXAMPLES = (
    ("astronaut.jpg", "person, astronaut; flag; rocket"),
    ("coffee.jpg", "cup, coffee cup; spoon; saucer; dining table"),
    ("chelsea.jpg", "cat; couch; bed"),
)


def example_images() -> list[tuple[str, str]]:
    """(path, classes) of the shipped examples."""
    folder = Path(__file__).parent / "demo_examples"
    return [(str(folder / name), classes) for name, classes in EXAMPLES]


def detection_examples(vocabulary: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(path, classes) of the shipped examples for the detection page.

    Args:
        vocabulary: the names a class-embedding file holds (None: any name, the text tower embeds it); each
            example keeps only those (a class none of whose names is in it is left out), so that every example runs.
    """
    from .classes import parse_class_string

    folder = Path(__file__).parent / "demo_examples"
    examples = []
    for name, classes in DETECTION_EXAMPLES:
        if vocabulary is not None:
            known = set(vocabulary)
            groups = [[n for n in group if n in known] for group in parse_class_string(classes)]
            classes = "; ".join(", ".join(group) for group in groups if group) or "; ".join(list(vocabulary)[:3])
        examples.append((str(folder / name), classes))
    return examples


def random_weights_warning(models: Sequence, meaning: str = "the labels and maps mean nothing") -> str | None:
    """The page's top line naming every model with RANDOM test weights (``is_test_model``): the CLIP, the VFM, a
    method's own model (SAM 3); None when there is none (``models`` may hold None for a model not loaded)."""
    random = [m for m in models if getattr(m, "is_test_model", False)]
    names = [getattr(m, "model_name", None) or getattr(m, "name", "") for m in random]
    if not names:
        return None
    return f"WARNING: {' and '.join(names)}: RANDOM test weights; {meaning} (for trying the page only)."


def read_upload(path: str | Path | None) -> np.ndarray:
    """The uploaded file as the command line reads images (:func:`ovdense.images.decode_image`: EXIF, 16 bits,
    transparency, the pixel limit), its messages naming the file as uploaded (not the server's copy).

    Raises:
        OvdenseError: no file, not an image, damaged, over the pixel limit (one line).
    """
    from .images import decode_image

    if path is None:
        raise InvalidArgumentError("upload an image first (or pick an example)")
    return decode_image(path, what=Path(path).name)


@dataclass
class MethodView:
    """One method's segmentation of the image.

    Attributes:
        method: the method's name.
        overlay: the image with the labels blended in and a legend (PIL image).
        labels: H x W int64 class indices.
        legend: :func:`ovdense.viz.legend_rows` of the present classes (name, colour, pixels, percent).
        files: the label PNG and the JSON summary written for download.
    """

    method: str
    overlay: Image.Image
    labels: np.ndarray
    legend: list[dict]
    files: list[str]


@dataclass
class AttentionView:
    """One map of the clicked point over the image.

    Attributes:
        title: what it shows (``CLIP block 12 attention``, ``sclip affinity``...).
        picture: the map over the image, the point marked (PIL image at the image's size).
        peak: (x, y) image pixel at the centre of the map's largest cell (None: the map has no values).
    """

    title: str
    picture: Image.Image
    peak: tuple[float, float] | None


def _image_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def _peak(values: np.ndarray, image_size: tuple[int, int]) -> tuple[float, float] | None:
    if not np.isfinite(values).any():
        return None
    r, c = np.unravel_index(np.nanargmax(values), values.shape)
    (h0, w0), (h, w) = image_size, values.shape
    return (float((c + 0.5) * w0 / w), float((r + 0.5) * h0 / h))


class DemoSession:
    """The demo's models and work: segment an image with several methods, and the maps of a clicked point.

    Args:
        loaded: the CLIP (:func:`ovdense.weights.load_model`), shared by every CLIP method; the towers run where it
            is. None when every method runs a model of its own (``sam3`` alone): the session then draws no attention
            maps.
        methods: method names (:func:`ovdense.list_methods`).
        precision, window_batch: as :class:`~ovdense.predictor.Segmenter`.
        vfm: an :class:`ovdense.vfm.Vfm`: the VFM of methods that use one (ProxyCLIP, CorrCLIP), and the VFM
            whose attention and affinity are shown beside CLIP's.
        mask_generator: class-agnostic masks for CorrCLIP (see :mod:`ovdense.mask_generators`).
        text_cache_dir: as :class:`~ovdense.predictor.Segmenter`.
        out_dir: where the downloadable files go (default: a new temporary folder).
        warning: a line shown at the top of the page (the random test model's; :func:`random_weights_warning`).
        weights: how ``loaded``'s weights were chosen (:class:`ovdense.weights.WeightsChoice`), for the settings.
        options: ``{method: {name: value}}``: a method's options and preset settings (as ``get_preset`` takes
            them), for methods among ``methods``.
        own_models: ``{method: model}`` for each method that runs a model of its own instead of a CLIP dense
            head (``sam3``: :meth:`ovdense.sam3.Sam3Head.load`), loaded once; its segmenter comes from its head
            class (``Sam3Head.segmenter``).
        bank: a memory bank's :class:`~ovdense.bank.retrieval.BankSupport`
            (:func:`ovdense.predictor.open_bank_support`), opened once, for the methods that retrieve from one
            (``corrclipv2``).

    Raises:
        InvalidArgumentError: no or unknown methods; a method without what it needs (a VFM, masks, its own model,
            a CLIP); options, own models or a bank that no method among ``methods`` takes (one line).
    """

    def __init__(
        self,
        loaded,
        methods: Sequence[str],
        precision: str = "auto",
        window_batch: int = 16,
        vfm=None,
        mask_generator=None,
        text_cache_dir=None,
        out_dir: str | Path | None = None,
        warning: str | None = None,
        weights=None,
        options: dict[str, dict] | None = None,
        own_models: dict | None = None,
        bank=None,
    ):
        from .methods import get_method, head_class
        from .predictor import Segmenter, resolve_preset

        if not methods:
            raise InvalidArgumentError("methods: give at least one method")
        methods = list(dict.fromkeys(methods))
        options, own_models = dict(options or {}), dict(own_models or {})
        for what, given in (("options", options), ("own_models", own_models)):
            stray = [m for m in given if m not in methods]
            if stray:
                raise InvalidArgumentError(f"{what}: {stray[0]} is not among the methods ({', '.join(methods)})")
        specs = {}
        for method in methods:
            try:
                specs[method] = get_method(method)
            except ValueError as err:
                raise InvalidArgumentError(str(err)) from None
        if bank is not None and not any(spec.native_vfm for spec in specs.values()):
            raise InvalidArgumentError(
                f"bank: only corrclipv2 retrieves from a memory bank; it is not among {', '.join(methods)}"
            )
        self.loaded = loaded
        self.vfm = vfm
        self.warning = warning
        self.segmenters: dict[str, Segmenter] = {}
        for method, spec in specs.items():
            if spec.own_model:  # SAM 3: its own model, its own segmenter (set_image / predict as Segmenter's)
                if method not in own_models:
                    raise InvalidArgumentError(f"{method} runs a model of its own: give it in own_models[{method!r}]")
                own, given = own_models[method], dict(options.get(method, {}))
                # The preset's ``model`` names the model given (the records say which SAM 3 ran, not the default).
                name = getattr(own, "model_name", None)
                if given.get("model") not in (None, name):
                    raise InvalidArgumentError(
                        f"options: {method} model {given['model']!r} is not the one given ({name})"
                    )
                if name:
                    given["model"] = name
                preset = resolve_preset(method, None, **given)
                self.segmenters[method] = head_class(method).segmenter(own, preset, precision)
                continue
            if method in own_models:
                raise InvalidArgumentError(f"own_models: {method} runs on the CLIP, not on a model of its own")
            if loaded is None:
                raise InvalidArgumentError(f"{method} runs on a CLIP: start the demo with one (--model)")
            if spec.uses_vfm and vfm is None:
                raise InvalidArgumentError(f"{method} needs a VFM: start the demo with --vfm (e.g. dino-b8)")
            if spec.uses_masks and mask_generator is None:
                raise InvalidArgumentError(f"{method} needs class-agnostic masks: start the demo with --mask-generator")
            self.segmenters[method] = Segmenter.from_model(
                loaded, method, precision=precision, window_batch=window_batch, text_cache_dir=text_cache_dir,
                vfm=vfm if spec.uses_vfm else None, mask_generator=mask_generator if spec.uses_masks else None,
                weights=weights, bank=bank if spec.native_vfm else None, **options.get(method, {}),
            )  # fmt: skip
        # The methods whose maps the attention page shows: those on the CLIP (a model of its own draws none).
        self.attention_methods = [m for m, spec in specs.items() if not spec.own_model]
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ovdense-demo-"))
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()  # one request at a time uses the models
        self._runs = 0

    @property
    def methods(self) -> list[str]:
        return list(self.segmenters)

    @property
    def num_blocks(self) -> int:
        """The CLIP's blocks (0 without a CLIP)."""
        return 0 if self.loaded is None else self.loaded.tower.num_blocks

    @property
    def has_attention(self) -> bool:
        """Whether a clicked point has maps: some method runs on the CLIP."""
        return bool(self.attention_methods)

    #: :func:`read_upload`.
    read_image = staticmethod(read_upload)

    def _check_methods(self, methods: Sequence[str]) -> list[str]:
        methods = [m for m in methods or () if m]
        if not methods:
            raise InvalidArgumentError("tick at least one method")
        unknown = [m for m in methods if m not in self.segmenters]
        if unknown:
            raise InvalidArgumentError(f"unknown method {unknown[0]!r}; this demo has {', '.join(self.methods)}")
        return methods

    def _set_image(self, method: str, image: np.ndarray) -> None:
        """Hand the image to the method's segmenter unless it already holds it (its features are kept)."""
        key = _image_key(image)
        if self._keys.get(method) != key:
            self.segmenters[method].set_image(image)
            self._keys[method] = key

    def segment(
        self,
        image: np.ndarray,
        classes: str,
        methods: Sequence[str],
        progress: Callable[[float, str], None] | None = None,
        prob_thd: float | None = None,
    ) -> list[MethodView]:
        """Segment ``image`` (H x W x 3 uint8) with ``classes`` by each method; write each one's label PNG and JSON.

        Args:
            prob_thd: the background threshold for every method (pixels whose best class probability is below
                it become class 0, drawn transparent); None keeps each method's own.

        Raises:
            OvdenseError: no image, bad classes, no or unknown methods, a threshold outside 0..1.
        """
        from .classes import normalise_classes
        from .fileio import write_group_atomic
        from .viz import label_image, legend_rows

        if image is None:
            raise InvalidArgumentError("upload an image first (or pick an example)")
        methods = self._check_methods(methods)
        if prob_thd is not None and not 0.0 <= float(prob_thd) <= 1.0:
            raise InvalidArgumentError(f"background threshold must be in 0..1, got {prob_thd}")
        try:
            parsed = normalise_classes(classes)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None
        views = []
        with self._lock:
            self._runs += 1
            folder = self.out_dir / f"run-{self._runs}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, method in enumerate(methods):
                if progress is not None:
                    progress(i / len(methods), f"{method}: image tower and text")
                self._set_image(method, image)
                seg = self.segmenters[method]
                if prob_thd is not None:  # a label-side setting: the image features stay valid
                    seg.preset = dataclasses.replace(seg.preset, prob_thd=float(prob_thd))
                result = seg.predict(parsed)
                rows = legend_rows(result.labels, result.display_names, result.background)
                label_path, json_path = folder / f"{method}_labels.png", folder / f"{method}.json"
                summary = {"method": method, "size": list(result.labels.shape), "classes": result.class_names,
                           "areas": result.areas(), "settings": result.settings}  # fmt: skip
                data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
                labels = label_image(result.labels, num_classes=len(result.class_names))  # 16-bit past 256 classes
                # The label PNG and its JSON appear together, as `ovdense segment` writes them.
                write_group_atomic(
                    {
                        label_path: lambda f, im=labels: im.save(f, format="PNG"),
                        json_path: lambda f, data=data: f.write(data),
                    }
                )
                files = [str(label_path), str(json_path)]
                views.append(MethodView(method, result.overlay(), result.labels, rows, files))
        if progress is not None:
            progress(1.0, "done")
        return views

    def attention(
        self, image: np.ndarray, point: Sequence[float], layer: int, classes: str, methods: Sequence[str]
    ) -> list[AttentionView]:
        """The maps of the clicked ``point`` (x, y pixels of ``image``): CLIP's attention in block ``layer``, each
        method's head attention and affinity, the VFM's attention and affinity. Methods with a model of their own
        (``sam3``) draw no maps and are skipped.

        Raises:
            OvdenseError: no image, a point outside it, a block out of range, no or unknown methods, only methods
                that draw no maps.
        """
        from .viz import attention_overlay

        if image is None:
            raise InvalidArgumentError("upload an image first (or pick an example)")
        picked = self._check_methods(methods)
        methods = [m for m in picked if m in self.attention_methods]
        if not methods:
            skipped = ", ".join(picked)
            if not self.attention_methods:
                raise InvalidArgumentError(f"{skipped} draws no attention maps (a model of its own, no CLIP)")
            raise InvalidArgumentError(
                f"{skipped} draws no attention maps: tick a CLIP method ({', '.join(self.attention_methods)})"
            )
        layer = int(layer)
        if not 1 <= layer <= self.num_blocks:
            raise InvalidArgumentError(f"block {layer}: the model has blocks 1..{self.num_blocks}")
        views: list[AttentionView] = []
        size = image.shape[:2]
        mark = (float(point[0]) + 0.5, float(point[1]) + 0.5)

        def add(title: str, values: np.ndarray) -> None:
            views.append(AttentionView(title, attention_overlay(image, values, mark), _peak(values, size)))

        with self._lock:
            for i, method in enumerate(methods):
                self._set_image(method, image)
                seg = self.segmenters[method]
                classes_arg = classes if seg.head.needs_text else None
                shown = self.vfm if i == 0 else None  # the VFM's maps once, with the first method
                maps = seg.attention_maps([point], layers=[layer], classes=classes_arg, vfm=shown)
                if i == 0:
                    add(f"CLIP block {layer} attention", maps.clip[1, 0])
                if maps.head is not None:
                    add(f"{method} attention", maps.head[1])
                add(f"{method} affinity", maps.affinity[1])
                if shown is not None:
                    if maps.vfm_attention is not None:  # a native-resolution VFM (corrclipv2's) has its affinity alone
                        add(f"{maps.vfm} attention", maps.vfm_attention[1])
                    add(f"{maps.vfm} affinity", maps.vfm_affinity[1])
        return views


@dataclass
class DetectionView:
    """The detections of one image as the detection page shows them.

    Attributes:
        overlay: the image with the boxes scoring at least ``min_score`` (tag ``"name 0.87"``, class colour) and a
            legend of the drawn classes with their counts (:meth:`DetectionResult.overlay
            <ovdense.detection.result.DetectionResult.overlay>`).
        result: every detection the detector kept (its score threshold and detection limit), in its order.
        rows: the drawn detections, best first, as the JSON lists them: ``{"label", "class_name", "score",
            "box_xyxy"}`` (original pixels).
        min_score: the lowest score drawn.
        files: the overlay PNG and the JSON (the drawn detections) written for download.
    """

    overlay: Image.Image
    result: DetectionResult
    rows: list[dict]
    min_score: float
    files: list[str]


class DetectionSession:
    """The detection page's work: an F-ViT's boxes for any classes (no Gradio in it, so it is tested directly).

    The image pass (:meth:`Detector.set_image <ovdense.detection.detector.Detector.set_image>`) runs once per
    image; new classes rerun the text side, the ensemble and NMS; a new ``min_score`` only redraws.

    Args:
        detector: a loaded :class:`~ovdense.detection.detector.Detector`.
        out_dir: where the downloadable files go (default: a new temporary folder).
        warning: a line shown at the top of the page (the random test model's).
        min_score: the slider's starting value, the lowest score drawn (default: 0.3, or the detector's own
            threshold when that is higher).
    """

    def __init__(self, detector, out_dir: str | Path | None = None, warning: str | None = None,
                 min_score: float | None = None):  # fmt: skip
        self.detector = detector
        self.warning = warning
        if min_score is None:
            min_score = max(0.3, self.score_threshold)
        self.min_score = self._check_min_score(min_score)
        self.out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="ovdense-demo-"))
        self._key: str | None = None  # the image the detector holds
        self._last: tuple | None = None  # ((image key, classes), result) of the last detection
        self._lock = threading.Lock()  # one request at a time uses the detector
        self._runs = 0

    #: :func:`read_upload`.
    read_image = staticmethod(read_upload)

    @property
    def score_threshold(self) -> float:
        """The detector's own threshold: it keeps no detection scoring below it."""
        return float(self.detector.model.config.score_threshold)

    @property
    def vocabulary(self) -> list[str] | None:
        """The class names of the class-embedding file (``background`` left out); None: the text tower embeds any."""
        table = self.detector.class_table
        return None if table is None else [name for name in table if name != "background"]

    def examples(self) -> list[tuple[str, str]]:
        """:func:`detection_examples` for this detector's vocabulary."""
        return detection_examples(self.vocabulary)

    @staticmethod
    def _check_min_score(min_score) -> float:
        try:
            value = float(min_score)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"min score must be a number in 0..1, got {min_score!r}") from None
        if not 0.0 <= value <= 1.0:  # also refuses nan
            raise InvalidArgumentError(f"min score must be in 0..1, got {min_score}")
        return value

    def _set_image(self, image: np.ndarray) -> str:
        """Hand the image to the detector unless it already holds it (its image pass is kept)."""
        key = _image_key(image)
        if self._key != key:
            self._key = None  # a failed pass leaves no stale image behind
            self.detector.set_image(image)
            self._key = key
        return key

    def detect(self, image: np.ndarray, classes: str, min_score: float | None = None,
               name: str | None = None) -> DetectionView:  # fmt: skip
        """Detect ``classes`` (``"person; dog, puppy; sofa"``) in ``image`` (H x W x 3 uint8); draw those scoring at
        least ``min_score`` (default the session's) and write the overlay PNG and the JSON of those.

        Args:
            name: the image's file name, for the JSON and the files' names.

        Raises:
            OvdenseError: no image, bad classes (empty, duplicates, a name missing from the class-embedding file), a
                score outside 0..1 (one line).
        """
        from .classes import normalise_classes
        from .detection.result import DetectionResult
        from .fileio import write_group_atomic

        if image is None:
            raise InvalidArgumentError("upload an image first (or pick an example)")
        min_score = self.min_score if min_score is None else self._check_min_score(min_score)
        try:
            parsed = normalise_classes(classes)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from None
        with self._lock:
            key = (self._set_image(image), tuple(tuple(group) for group in parsed))
            if self._last is not None and self._last[0] == key:
                result = self._last[1]
            else:
                result = self.detector.detect(parsed)
                self._last = (key, result)
            keep = result.shown(min_score)
            drawn = DetectionResult(result.boxes[keep], result.scores[keep], result.labels[keep],
                                    result.class_names, result.image_size)  # fmt: skip
            overlay = result.overlay(image, min_score)
            settings = self.detector.settings
            summary = {
                "image": name,
                "detector": settings.get("detector"),
                "model": settings.get("model"),
                "benchmark": self.detector.benchmark,
                "score_threshold": self.score_threshold,
                "min_score": min_score,
                **drawn.to_json(),
            }
            self._runs += 1
            folder = self.out_dir / f"run-{self._runs}"
            folder.mkdir(parents=True, exist_ok=True)
            stem = Path(name).stem if name else "image"
            overlay_path, json_path = folder / f"{stem}_boxes.png", folder / f"{stem}.json"
            data = (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
            # The overlay and its JSON appear together, as `ovdense detect` writes them.
            write_group_atomic(
                {
                    overlay_path: lambda f: overlay.save(f, format="PNG"),
                    json_path: lambda f: f.write(data),
                }
            )
        return DetectionView(overlay, result, summary["detections"], min_score, [str(overlay_path), str(json_path)])


# -------------------------------------------------------------------------------------------------- page


def legend_html(views: Sequence[MethodView]) -> str:
    """Each method's legend as an HTML table: swatch, class, share of the image (``data-*`` for scripts)."""
    parts = ['<div class="ovdense-legends">']
    for view in views:
        method = html.escape(view.method)
        parts.append(f'<table class="ovdense-legend" data-method="{method}"><caption>{method}</caption>')
        for row in view.legend:
            colour = row["colour"]
            swatch = "transparent" if colour is None else "rgb({}, {}, {})".format(*colour)
            parts.append(
                f'<tr class="legend-entry" data-method="{method}" data-name="{html.escape(row["name"])}" '
                f'data-percent="{100 * row["fraction"]:.4f}">'
                f'<td><span style="display:inline-block;width:1em;height:1em;border:1px solid #666;'
                f'background:{swatch}"></span></td><td>{html.escape(row["name"])}</td>'
                f'<td class="percent">{row["percent"]}</td></tr>'
            )
        parts.append("</table>")
    parts.append("</div>")
    return "".join(parts)


def _page_error(message):
    """The one-line message in the page (Gradio renders it as HTML: a file name is text), and no traceback in the
    server log: it is the user's input, not a fault of the server."""
    import gradio as gr

    return gr.Error(html.escape(" ".join(str(message).split())), print_exception=False)


def _hand_over_as_uploaded(component) -> None:
    """Let the image component hand the uploaded file's path over as it is. Gradio's own check opens it with
    Pillow and, for a file that is no image (or one over Pillow's bomb limit), fails before our handler, with
    bare "Error" badges and a traceback in the server log; :func:`read_upload` reads it instead and says what is
    wrong, in one line on the page. (An instance attribute: a ``gr.Image`` subclass would make Gradio write a
    ``.pyi`` stub next to this module.)"""
    own = component.preprocess

    def preprocess(payload):
        try:
            with warnings.catch_warnings():  # Pillow's DecompressionBombWarning: read_upload decides
                warnings.simplefilter("ignore")
                return own(payload)
        except Exception:
            path = getattr(payload, "path", None)
            if path is None:
                raise _page_error("cannot read the uploaded file; upload an image (JPEG, PNG, ...)") from None
            return str(path)

    component.preprocess = preprocess


def _read_for_page(session, path) -> np.ndarray:
    """``session.read_image(path)``, its message on the page."""
    try:
        return session.read_image(path)
    except OvdenseError as err:
        raise _page_error(err) from None


def build_app(session: DemoSession | DetectionSession, default_methods: Sequence[str] | None = None):
    """The Gradio page of a :class:`DemoSession` (a ``gradio.Blocks``; call ``.launch()``), or of a
    :class:`DetectionSession` (:func:`build_detection_app`)."""
    if isinstance(session, DetectionSession):
        return build_detection_app(session)
    import gradio as gr

    methods = session.methods
    chosen = list(default_methods) if default_methods else methods[:2]
    examples = example_images()

    page_error = _page_error
    hand_over_as_uploaded = _hand_over_as_uploaded

    def read(path):
        return _read_for_page(session, path)

    def on_segment(path, classes, picked, threshold, progress=gr.Progress()):  # noqa: B008 (Gradio's progress idiom)
        image = read(path)
        try:
            views = session.segment(
                image, classes, picked, progress=lambda f, d: progress(f, desc=d), prob_thd=threshold
            )
        except OvdenseError as err:
            raise page_error(err) from None
        gallery = [(v.overlay, v.method) for v in views]
        files = [f for v in views for f in v.files]
        return gallery, legend_html(views), files

    def on_attention(path, point, layer, classes, picked):
        image = read(path)
        try:
            views = session.attention(image, point, layer, classes, picked)
        except OvdenseError as err:
            raise page_error(err) from None
        gallery = [(v.picture, v.title) for v in views]
        lines = [f"point ({point[0]:g}, {point[1]:g})"] + [
            f'<li class="peak" data-title="{html.escape(v.title)}" data-x="{v.peak[0]:.1f}" data-y="{v.peak[1]:.1f}">'
            f"{html.escape(v.title)}: peak at ({v.peak[0]:.0f}, {v.peak[1]:.0f})</li>"
            for v in views
            if v.peak is not None
        ]
        return gallery, f'<div id="ovdense-peaks"><b>{lines[0]}</b><ul>{"".join(lines[1:])}</ul></div>'

    def on_click(path, layer, classes, picked, evt: gr.SelectData):
        point = (float(evt.index[0]), float(evt.index[1]))
        return (*on_attention(path, point, layer, classes, picked), point)

    # Gradio finds the event argument by its annotation, which this module's postponed annotations leave a string.
    on_click.__annotations__["evt"] = gr.SelectData

    def on_layer(path, point, layer, classes, picked):
        if point is None:
            return gr.skip(), gr.skip()
        return on_attention(path, point, layer, classes, picked)

    # Methods with a model of their own (SAM 3) draw no attention maps; without a CLIP the page has no attention part.
    no_maps = [m for m in methods if m not in session.attention_methods]
    if not session.has_attention:
        click = ""
    elif no_maps:
        click = (f" Then click a point of the image to see where it looks ({', '.join(no_maps)}: a model of its own, "
                 "no attention maps).")  # fmt: skip
    else:
        click = " Then click a point of the image to see where it looks."
    with gr.Blocks(title="ovdense demo") as app:
        gr.Markdown(
            "# ovdense: label every pixel with any words\n"
            "Upload an image, type classes (`;` between classes, `,` between names of one class; put background words "
            "first and raise the background threshold to leave unsure pixels unlabelled), tick methods, **Segment**."
            + click
        )
        if session.warning:
            gr.HTML(f'<div id="model-warning" style="color:#b00;font-weight:bold">{html.escape(session.warning)}</div>')
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: the file as uploaded, decoded as the command line decodes it (read_image).
                label = "image (click a point: attention below)" if session.has_attention else "image"
                image = gr.Image(type="filepath", image_mode=None, label=label, elem_id="image",
                                 sources=["upload", "clipboard"])  # fmt: skip
                hand_over_as_uploaded(image)
                classes = gr.Textbox(label="classes", value=EXAMPLES[0][1], elem_id="classes")
                picked = gr.CheckboxGroup(methods, value=chosen, label="methods", elem_id="methods")
                threshold = gr.Slider(
                    0, 1, value=0, step=0.05, elem_id="threshold",
                    label="background threshold: pixels less sure than this become the first class (transparent)",
                )  # fmt: skip
                run = gr.Button("Segment", variant="primary", elem_id="run")
                gr.Examples([[p, c] for p, c in examples], inputs=[image, classes], label="examples")
            with gr.Column(scale=2):
                overlays = gr.Gallery(label="overlays", elem_id="overlays", columns=max(1, len(chosen)),
                                      format="png", interactive=False, object_fit="contain")  # fmt: skip
                legend = gr.HTML(elem_id="legend")
                files = gr.File(label="label PNGs and JSON", file_count="multiple", elem_id="downloads",
                                interactive=False)  # fmt: skip
        run.click(on_segment, [image, classes, picked, threshold], [overlays, legend, files])
        classes.submit(on_segment, [image, classes, picked, threshold], [overlays, legend, files])
        if not session.has_attention:  # one line in place of the controls, which would have nothing to show
            gr.Markdown(
                f"No attention maps: {', '.join(no_maps)} runs a model of its own, not a CLIP (start the demo with a "
                f"CLIP method too, e.g. `--methods sclip,{no_maps[0]}`, to click a point for attention).",
                elem_id="attention-note",
            )
            return app
        layer = gr.Slider(1, session.num_blocks, value=session.num_blocks, step=1, label="CLIP block",
                          elem_id="layer")  # fmt: skip
        peaks = gr.HTML(elem_id="peaks")
        attention = gr.Gallery(label="attention and affinity of the clicked point", elem_id="attention", columns=4,
                               format="png", interactive=False, object_fit="contain")  # fmt: skip
        point = gr.State(None)
        image.select(on_click, [image, layer, classes, picked], [attention, peaks, point])
        layer.change(on_layer, [image, point, layer, classes, picked], [attention, peaks])
    return app


# -------------------------------------------------------------------------------------------------- detection page


def detections_html(view: DetectionView) -> str:
    """The drawn detections as an HTML table, best first: swatch, class, score, box (``data-*`` for scripts), under
    a line saying how many of the detector's detections are drawn."""
    from .detection.result import detection_colours

    result = view.result
    shown, total = len(view.rows), len(result)
    if shown:
        line = f"{shown} of {total} detections scoring at least {view.min_score:.2f}"
    elif total:
        best = float(result.scores.max())
        line = f"no detection scores {view.min_score:.2f} or more (the best {best:.2f}): lower the slider"
    else:
        line = "no detections"
    parts = [f'<div id="ovdense-detections"><p class="summary" data-shown="{shown}" data-total="{total}">'
             f"{html.escape(line)}</p>"]  # fmt: skip
    if shown:
        colours = detection_colours(len(result.class_names))
        parts.append('<div style="max-height:36em;overflow-y:auto"><table class="ovdense-detections"><tr><th></th>'
                     "<th>class</th><th>score</th><th>box x1, y1, x2, y2</th></tr>")  # fmt: skip
        for row in view.rows:
            name = html.escape(row["class_name"])
            box = ", ".join(f"{v:.1f}" for v in row["box_xyxy"])
            swatch = "rgb({}, {}, {})".format(*(int(c) for c in colours[row["label"]]))
            parts.append(
                f'<tr class="detection" data-class="{name}" data-score="{row["score"]}" data-box="{box}">'
                f'<td><span style="display:inline-block;width:1em;height:1em;border:1px solid #666;'
                f'background:{swatch}"></span></td><td>{name}</td><td>{row["score"]:.3f}</td><td>{box}</td></tr>'
            )
        parts.append("</table></div>")
    parts.append("</div>")
    return "".join(parts)


def _vocabulary_note(session: DetectionSession, limit: int = 30) -> str:
    vocabulary = session.vocabulary
    if vocabulary is None:
        return "`;` between classes, `,` between names of one class; any words (the CLIP's text tower embeds them)"
    source = Path(str(session.detector.settings.get("class_embeddings"))).name
    names = ", ".join(vocabulary[:limit]) + (", ..." if len(vocabulary) > limit else "")
    return f"only names of {source} ({len(vocabulary)}): {names}"


def build_detection_app(session: DetectionSession):
    """The Gradio detection page of a :class:`DetectionSession` (a ``gradio.Blocks``; call ``.launch()``)."""
    import gradio as gr

    examples = session.examples()
    settings = session.detector.settings

    def on_detect(path, classes, min_score):
        image = _read_for_page(session, path)
        try:
            view = session.detect(image, classes, min_score, name=Path(path).name)
        except OvdenseError as err:
            raise _page_error(err) from None
        return view.overlay, detections_html(view), view.files, True

    def on_min_score(path, classes, min_score, detected):
        if not detected or path is None:  # nothing shown yet: the slider only sets the next run's score
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return on_detect(path, classes, min_score)

    with gr.Blocks(title="ovdense demo: detection") as app:
        gr.Markdown(
            "# ovdense: find any class in an image\n"
            "Upload an image, type classes (`;` between classes, `,` between names of one class), **Detect**. "
            "The image is encoded once: new classes take a moment, and the slider (the lowest score drawn) redraws "
            "at once."
        )
        if session.warning:
            gr.HTML(f'<div id="model-warning" style="color:#b00;font-weight:bold">{html.escape(session.warning)}</div>')
        detector = Path(str(settings.get("detector"))).name
        gr.HTML(
            f'<div id="detector-info">F-ViT {html.escape(detector)} on {html.escape(str(settings.get("model")))}, '
            f"{html.escape(session.detector.benchmark)} settings; it keeps at most {settings.get('max_detections')} "
            f"detections scoring above {session.score_threshold:g}</div>"
        )
        with gr.Row():
            with gr.Column(scale=1):
                # image_mode=None: the file as uploaded, decoded as the command line decodes it (read_upload).
                image = gr.Image(type="filepath", image_mode=None, label="image", elem_id="image",
                                 sources=["upload", "clipboard"])  # fmt: skip
                _hand_over_as_uploaded(image)
                classes = gr.Textbox(label="classes", value=examples[0][1], elem_id="classes",
                                     info=_vocabulary_note(session))  # fmt: skip
                min_score = gr.Slider(0, 1, value=session.min_score, step=0.01, elem_id="min-score",
                                      label="min score shown")  # fmt: skip
                run = gr.Button("Detect", variant="primary", elem_id="run")
                gr.Examples([[p, c] for p, c in examples], inputs=[image, classes], label="examples")
            with gr.Column(scale=2):
                boxes = gr.Image(type="pil", format="png", label="detections", elem_id="boxes", interactive=False)
                files = gr.File(label="overlay PNG and JSON", file_count="multiple", elem_id="downloads",
                                interactive=False)  # fmt: skip
                table = gr.HTML(elem_id="detections")
        detected = gr.State(False)
        outputs = [boxes, table, files, detected]
        run.click(on_detect, [image, classes, min_score], outputs)
        classes.submit(on_detect, [image, classes, min_score], outputs)
        min_score.change(on_min_score, [image, classes, min_score, detected], outputs, trigger_mode="always_last")
    return app
