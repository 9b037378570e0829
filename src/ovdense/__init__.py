"""ovdense: dense open-vocabulary perception with CLIP.

>>> from ovdense import Segmenter
>>> seg = Segmenter.from_pretrained("ViT-B-16", pretrained="openai", method="sclip")  # doctest: +SKIP
>>> seg.set_image("photo.jpg")  # doctest: +SKIP
>>> seg.predict("sky; person, person in shirt; tree").overlay().save("overlay.png")  # doctest: +SKIP
"""

from .errors import OvdenseError
from .predictor import SegmentationResult, Segmenter
from .presets import list_methods
from .weights import list_models

__version__ = "0.1.0"

__all__ = ["OvdenseError", "SegmentationResult", "Segmenter", "list_methods", "list_models"]
