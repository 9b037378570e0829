"""F-ViT's settings per benchmark and tower, as CLIPSelf's configs set them (``F-ViT/configs/``).

=============  ========  ======  =====  =====  =========  ========  ====  ======
benchmark      tower     S       T_vlm  alpha  beta       score     NMS   dets
=============  ========  ======  =====  =====  =========  ========  ====  ======
ov-coco        B/16      640     75     0.1    0.8        0.01      0.4   100
ov-coco        L/14      896     75     0.1    0.8        0.01      0.4   100
ov-lvis        B/16      1024    50     0.1    0.6        0.0001    0.5   300
ov-lvis        L/14      896     50     0.1    0.4        0.0001    0.5   300
coco           L/14      896     120    0.2    (all)      0.0001    0.5   300
=============  ========  ======  =====  =====  =========  ========  ====  ======

``coco`` is the transfer setting: an OV-LVIS detector scored on COCO's 80 classes with a fixed detection temperature
of 50 and alpha on every class, without its mask head. Towers of other patch sizes take the B/16 row, towers
narrower than 256 an FPN of their own width (ours).
"""

from __future__ import annotations

from .fvit import FViTConfig, tap_indices

BENCHMARKS = ("ov-coco", "ov-lvis", "coco")

#: Training classes (the width of the dead ``fc_cls`` and of ``all_embeddings`` minus background).
TRAIN_CLASSES = {"ov-coco": 65, "ov-lvis": 1203, "coco": 1203}


def fvit_config(benchmark: str, tower, **overrides) -> FViTConfig:
    """The :class:`FViTConfig` CLIPSelf uses for ``benchmark`` on ``tower`` (its patch size and depth), with
    ``overrides`` on top.

    Raises:
        ValueError: an unknown benchmark.
    """
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown detection benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    large = tower.patch_size == 14
    settings: dict = {
        "taps": tap_indices(tower.num_blocks),
        # The authors' towers are 768 or 1024 wide; a narrower (test) tower keeps its own width (ours).
        "fpn_channels": min(256, tower.width),
        "fc_dim": tower.out_dim,
        "num_train_classes": TRAIN_CLASSES[benchmark],
    }
    if benchmark == "ov-coco":
        settings.update(image_size=896 if large else 640, vlm_temperature=75.0, alpha=0.1, beta=0.8)
    else:
        settings.update(score_threshold=0.0001, nms_iou=0.5, max_detections=300, rpn_norm=True)
        if benchmark == "ov-lvis":
            settings.update(
                image_size=896 if large else 1024, vlm_temperature=50.0, alpha=0.1, beta=0.4 if large else 0.6
            )
            settings.update(with_mask=True)
        else:
            settings.update(
                image_size=896, vlm_temperature=120.0, alpha=0.2, ensemble_all_classes=True, fixed_temperature=50.0
            )
    settings.update(overrides)
    return FViTConfig(**settings)
