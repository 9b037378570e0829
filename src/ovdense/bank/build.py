"""``build_bank``: the authors' four-step memory-bank builder (``memory_bank_builder/build.py``), resumable at any
kill -9, incremental, and sharded over torchrun processes.

1. **masks** (:mod:`ovdense.bank.mask_step`): every image of the folder without ``masks/{bank}/{mask}/{stem}.npz``
   gets one, from a generator or a folder of pre-generated files.
2. **manifest** (:mod:`ovdense.bank.manifest`): images with a mask that are not registered yet are appended, sorted by
   stem, each with ``region_count`` contiguous ids (an image with no region is not registered).
3. **values** (:mod:`ovdense.bank.values`): one fp16 store per CLIP, ``clip_embeddings/{bank}_{store}.pt``.
4. **keys + index** (:mod:`ovdense.bank.keys`): ``vfm_embeddings/{bank}_{vfm}.pt``, then the FAISS index over them:
   trained once when there is none, else only the new ids added (no retraining).

Every store is filled through a slot store (:mod:`ovdense.bank.slots`), so rerunning the same call after a kill
redoes nothing finished, and rerunning after adding images computes only the new rows. Under torchrun every process
takes ``work[rank::world]`` of each step; the manifest, the finalized stores and the index are written by rank 0
after a barrier. Differences from the authors' builder are listed in the README ("Memory banks").
"""

from __future__ import annotations

import gc
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

from ..errors import OvdenseError
from .layout import BankLayout

__all__ = ["CLIP_ALIASES", "ClipSpec", "build_bank", "resolve_clips"]

#: The authors' ``--clip`` names -> store names (``generate_clip_embeddings.py`` l.70-89).
CLIP_ALIASES = {"meta_b": "metaclip_b", "meta_l": "metaclip_l", "dfn_b": "dfnclip_b", "dfn_l": "dfnclip_l"}
#: The authors' default ``--clip meta_b dfn_b``: the main and the auxiliary (DMCE) stores of the B configuration.
DEFAULT_CLIPS = ("meta_b", "dfn_b")


class ClipSpec(NamedTuple):
    """A CLIP whose region values make one store.

    Attributes:
        store: the store name (``clip_embeddings/{bank}_{store}.pt``).
        model: open_clip architecture, ``hf-hub:org/repo`` or an ovdense test architecture.
        pretrained: open_clip pretrained tag (None with a checkpoint or for test architectures).
        checkpoint: a local weights file.
        width: D when known before loading (None: read from the loaded model).
    """

    store: str
    model: str
    pretrained: str | None = None
    checkpoint: str | None = None
    width: int | None = None


def resolve_clips(clips) -> list[ClipSpec]:
    """The stores to build: the authors' names (``meta_b`` ... or ``metaclip_b`` ...) or :class:`ClipSpec`.

    Raises:
        OvdenseError: an unknown name, or one store asked for twice.
    """
    from .store import STORE_MODELS

    specs: list[ClipSpec] = []
    for clip in clips:
        if isinstance(clip, ClipSpec):
            spec = clip
        elif isinstance(clip, tuple):
            spec = ClipSpec(*clip)
        else:
            store = CLIP_ALIASES.get(str(clip), str(clip))
            if store not in STORE_MODELS:
                names = ", ".join([*CLIP_ALIASES, *STORE_MODELS])
                raise OvdenseError(f"unknown --clip {clip!r}; expected one of {names} (or --clip-model for any other)")
            model = STORE_MODELS[store]
            spec = ClipSpec(store, model.model, model.pretrained, None, model.width)
        if not spec.store or any(c in spec.store for c in "/\\\n\t") or spec.store.startswith("."):
            raise OvdenseError(f"store name {spec.store!r} is not a valid file name part")
        if any(s.store == spec.store for s in specs):
            raise OvdenseError(f"the store {spec.store!r} is asked for twice")
        specs.append(spec)
    return specs


def _config_width(model: str) -> int | None:
    """The joint embedding width of an open_clip architecture from its config (no weights loaded), else None."""
    import open_clip

    from .. import weights  # noqa: F401 - registers ovdense's test architectures with open_clip

    if model.startswith("hf-hub:"):
        return None
    config = open_clip.get_model_config(model)
    return int(config["embed_dim"]) if config and "embed_dim" in config else None


def _check_width(path: Path, width: int, what: str) -> None:
    """A finished store or build intermediate of another width is one error line, before any work."""
    import numpy as np

    from .store import read_store

    data = Path(str(path)[: -len(".pt")] + ".f16.npy")
    have = None
    if path.is_file():
        have = read_store(path, mmap=True).shape[1]
    elif data.is_file():
        try:
            arr = np.load(data, mmap_mode="r")
            have = arr.shape[1] if arr.ndim == 2 else None
        except (OSError, ValueError):
            have = None
    if have is not None and have != width:
        raise OvdenseError(
            f"{path if path.is_file() else data} holds {have}-d rows but {what} makes {width}-d ones (the bank was "
            "built with another model); build into another bank name"
        )


def _check_vfm_name(name: str, trust_remote_code: bool) -> None:
    """An unknown retrieval VFM, or RADIO without the remote-code opt-in, fails before any work."""
    from ..vfm_native import DENSE_VFM_MODELS, RADIO_MODELS, TEST_DENSE_VFM_MODELS, load_dense_vfm

    if name in RADIO_MODELS:
        if not trust_remote_code:
            load_dense_vfm(name, trust_remote_code=False)  # refuses at once with the licence line; loads nothing
        return
    if name in DENSE_VFM_MODELS or name in TEST_DENSE_VFM_MODELS:
        return
    if name.startswith("timm:"):
        import timm

        if timm.is_model(name[len("timm:") :]):
            return
    choices = [*RADIO_MODELS, *DENSE_VFM_MODELS, "timm:<timm model name>"]
    raise OvdenseError(
        f"unknown --vfm {name!r}; available: {', '.join(choices)} (test models: {', '.join(TEST_DENSE_VFM_MODELS)})"
    )


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _total(count: int) -> int:
    """``count`` summed over the torchrun processes."""
    import torch

    from ..distributed import sum_over_processes

    return int(sum_over_processes(torch.tensor([count], dtype=torch.int64))[0])


def _free(device) -> None:
    gc.collect()
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.empty_cache()


def _say(message: str, main: bool) -> None:
    if main:
        print(message, file=sys.stderr, flush=True)


def _failures(step: str, failed: list[tuple[str, str]], total: int, main: bool) -> None:
    """One warning per step with failures (rank 0): how many over all processes and the first few of its own (every
    process has named its first ones as they happened)."""
    if total and main:
        shown = "; ".join(f"{stem}: {reason}" for stem, reason in failed[:3])
        more = f" (this process: {shown})" if shown else ""
        warnings.warn(f"{step}: {total} images failed{more}; rerun the same command to retry them", stacklevel=3)


def build_bank(
    images,
    root,
    name: str,
    *,
    mask_generator=None,
    masks_dir=None,
    mask_name: str | None = None,
    mask_model: str | None = None,
    clips=DEFAULT_CLIPS,
    values_vfm: str = "dino-b8",
    values_vfm_checkpoint=None,
    vfm: str = "radiov3",
    vfm_checkpoint=None,
    trust_remote_code: bool = False,
    slide_short: int = 448,
    slide_crop: int = 336,
    index: str = "ivfpq",
    train_size: int | None = None,
    faiss_gpu: bool = False,
    device=None,
    precision: str = "auto",
    window_batch: int = 16,
    workers: int = 0,
    flush_every: int = 64,
    progress: bool = True,
) -> dict:
    """Build or extend bank ``name`` under ``root`` from the images under ``images`` (module docstring).

    Args:
        images: the image folder (recursive; .png, .jpg, .jpeg, .bmp, .tiff; one image per file stem).
        root: the bank root (the authors' ``memory_bank/``); created if needed.
        name: the bank name (every file carries it).
        mask_generator: masks for images without one: ``sam`` / ``sam2`` (transformers, the authors' build
            settings) or a callable ``image -> int [H, W]``.
        masks_dir: or a folder of pre-generated ``{stem}.npz`` (``instance_mask``) files, copied into the bank.
        mask_name: the bank's mask folder ``masks/{name}/{mask_name}`` (default the generator's name, else the
            authors' ``entityseg``).
        mask_model: the hub id or folder of a named generator (default its build checkpoint).
        clips: the value stores: the authors' ``meta_b``, ``meta_l``, ``dfn_b``, ``dfn_l`` (or the store names
            ``metaclip_b`` ...) and :class:`ClipSpec` for any other open_clip model; default the authors' pair.
        values_vfm, values_vfm_checkpoint: the DINO of CorrCLIP v1's correlations in the values (``dino-b8``).
        vfm, vfm_checkpoint: the retrieval VFM of the keys (:func:`ovdense.vfm_native.load_dense_vfm`; ``radiov3``).
        trust_remote_code: allow RADIO's hub code to run (RADIO names refuse without it).
        slide_short, slide_crop: the values' resize short side and window (the authors' 448 and 336).
        index: ``ivfpq`` (the authors'; under 256 regions built flat, with a warning) or ``flat`` (exact).
        train_size: train a new IVFPQ index on a seeded sample of this many keys (default all, as the authors).
        faiss_gpu: train a new index on the GPU when faiss has GPU support (else on the CPU, with a warning).
        device: where the models run (None: CUDA when present; under torchrun each process its local GPU).
        precision: ``auto`` (fp16 autocast on CUDA), ``fp32``, ``bf16``, ``fp16``.
        window_batch: sliding windows per forward pass of the values (memory only).
        workers: DataLoader workers decoding images (0: in the main process).
        flush_every: commit written rows every this many images (and at least every minute).
        progress: tqdm bars (images/s, ETA) on rank 0.

    Returns:
        what each step did, summed over processes: ``{"masks": {"existing", "made", "failed"}, "manifest": {"images",
        "regions", "added_images", "added_regions", "no_region"}, "values": {store: {...}}, "keys": {...},
        "index": {...}, "failed": images that failed in any step, "complete": every store finalized and indexed (rank 0;
        None in the other processes, which do not wait for the index)}``.

    Raises:
        OvdenseError: bad input, before any work where it can be seen (an empty folder, an unknown --clip or --vfm,
            RADIO without the opt-in, a bank or intermediate of another width, an inconsistent manifest), and a
            mask whose region count no longer matches the manifest.
    """
    import torch

    from ..distributed import init_distributed_from_env
    from ..precision import check_precision
    from ..weights import resolve_device
    from .index import import_faiss
    from .manifest import read_manifest
    from .mask_step import MaskSource
    from .scan import scan_images

    # -- every check that needs no model ---------------------------------------------------------------------------
    if index not in ("ivfpq", "flat"):
        raise OvdenseError(f"unknown index kind {index!r}; expected ivfpq or flat")
    if train_size is not None and (isinstance(train_size, bool) or int(train_size) < 1):
        raise OvdenseError(f"train_size must be a positive integer, got {train_size!r}")
    import_faiss()  # the index step needs it: fail now, not after hours of extraction
    layout = BankLayout(root, name)
    scan = scan_images(images)
    source = None
    if mask_generator is not None or masks_dir is not None:
        source = MaskSource(mask_generator, masks_dir, mask_model)
    mask_name = mask_name or (source.default_name if source is not None else "entityseg")
    if not mask_name or any(c in mask_name for c in "/\\\n\t"):
        raise OvdenseError(f"mask name {mask_name!r} is not a valid folder name")
    specs = resolve_clips(clips)
    for spec in specs:
        width = spec.width if spec.width is not None else _config_width(spec.model)
        if width is not None:
            _check_width(layout.store(spec.store), width, f"{spec.model}")
    _check_vfm_name(vfm, trust_remote_code)

    info = init_distributed_from_env(device)
    main = info.is_main
    if info.world_size > 1 and torch.cuda.is_available() and str(device or "cuda") == "cuda":
        device = f"cuda:{info.local_rank}"  # one GPU per process (a plain "cuda" would put them all on the first)
    dev = resolve_device(device)
    check_precision(precision, dev)
    if source is not None:
        source.device = dev
    read_manifest(layout)  # an inconsistent manifest is one line now
    others = [p for p in layout.indexes() if layout.vfm_of(p) != vfm]
    if others and main:
        warnings.warn(
            f"bank {name!r} already has an index of VFM {layout.vfm_of(others[0])}: a {vfm} index is added beside it "
            "(opening the bank then needs vfm=)",
            stacklevel=2,
        )
    if scan.duplicates and main:
        path, kept = scan.duplicates[0]
        warnings.warn(
            f"{len(scan.duplicates)} images share a file stem with an earlier one (e.g. {path} and {kept}): a bank "
            "names files by stem, so only the first of each is used",
            stacklevel=2,
        )
    report: dict = {"failed": 0}
    mask_folder = layout.masks_dir(mask_name)
    if main:
        _remove_stale_temps(layout, mask_folder)
    _barrier()

    # -- 1. masks ------------------------------------------------------------------------------------------------
    from .mask_step import make_masks, missing_masks

    missing = missing_masks(scan.images, mask_folder)
    _barrier()  # every process has the same list before any writes a mask
    made = make_masks(scan.images, mask_folder, missing, source, info.rank, info.world_size, progress)
    _barrier()
    failed = _total(len(made["failed"]))
    report["masks"] = {"folder": str(mask_folder), "existing": made["existing"], "made": _total(made["made"]),
                       "failed": failed}  # fmt: skip
    report["failed"] += failed
    _failures("masks", made["failed"], failed, main)

    # -- 2. manifest (rank 0) --------------------------------------------------------------------------------------
    if main:
        report["manifest"] = _register(layout, scan.images, mask_folder, made["counts"], progress)
    _barrier()
    entries = read_manifest(layout)
    from .manifest import total_regions

    n = total_regions(entries)
    if not main:
        report["manifest"] = {"images": len(entries), "regions": n}
    if n == 0:
        raise OvdenseError(
            f"bank {name!r} has no region: no image under {images} has a mask with a non-zero value"
            + (f" ({report['failed']} images failed)" if report["failed"] else "")
        )

    common = dict(rank=info.rank, world=info.world_size, workers=workers, flush_every=flush_every, progress=progress)

    # -- 3. values -------------------------------------------------------------------------------------------------
    report["values"] = {}
    shared = {"dino": None}  # one DINO for every store's values
    for spec in specs:
        extractor_of = _value_extractor(spec, values_vfm, values_vfm_checkpoint, dev, precision, slide_short,
                                        slide_crop, window_batch, shared)  # fmt: skip
        result, extractor = _fill_step(layout.store(spec.store), spec.width, extractor_of, entries, scan.images,
                                       mask_folder, main, f"values {spec.store}", common)  # fmt: skip
        report["values"][spec.store] = result
        report["failed"] += result["failed"]
        del extractor
        _free(dev)
    shared.clear()
    _free(dev)

    # -- 4. keys + index -------------------------------------------------------------------------------------------
    def key_extractor():
        from ..vfm_native import load_dense_vfm
        from .keys import KeyExtractor

        return KeyExtractor(load_dense_vfm(vfm, checkpoint=vfm_checkpoint, device=dev,
                                           trust_remote_code=trust_remote_code))  # fmt: skip

    keys_path = layout.keys(vfm)
    result, extractor = _fill_step(keys_path, None, key_extractor, entries, scan.images, mask_folder, main,
                                   f"keys {vfm}", common)  # fmt: skip
    del extractor
    _free(dev)
    report["keys"] = result
    report["failed"] += result["failed"]
    report["index"] = None
    if main and result["finalized"]:
        report["index"] = _sync_index(layout, vfm, index, train_size, faiss_gpu, dev)
    # Only rank 0 finalizes and indexes (after the last barrier; the others do not wait for the index to train).
    complete = all(r["finalized"] for r in report["values"].values()) and result["finalized"] and report["index"]
    report["complete"] = bool(complete) if main else None
    return report


def _remove_stale_temps(layout: BankLayout, mask_folder: Path) -> None:
    """The temp files a killed build left (``.{file}.{12 hex}.tmp`` beside a file of this bank: :mod:`ovdense.fileio`'s
    atomic writes and the slot stores'), removed before any process writes (one builder per bank at a time)."""
    import contextlib
    import os
    import re

    from .layout import bank_names

    own = re.escape(layout.name)
    longer = tuple(f".{b}_" for b in bank_names(layout.root) if b != layout.name and b.startswith(f"{layout.name}_"))
    places = [
        (layout.manifest.parent, rf"\.{own}\.(manifest\.txt|images\.tsv)"),
        (layout.store("x").parent, rf"\.{own}_.+"),
        (layout.keys("x").parent, rf"\.{own}_.+"),
        (mask_folder, r"\..+\.npz"),
    ]
    for folder, name in places:
        pattern = re.compile(name + r"\.[0-9a-f]{12}\.tmp")
        if folder.is_dir():
            for path in folder.iterdir():
                if pattern.fullmatch(path.name) and not path.name.startswith(longer or ("\0",)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)


def _register(layout: BankLayout, images: dict[str, Path], mask_folder: Path, counts: dict[str, int],
              progress: bool) -> dict:  # fmt: skip
    """Step 2 (one process): append the new images with a mask, sorted by stem, as the authors' build_or_extend."""
    from concurrent.futures import ThreadPoolExecutor

    from .manifest import append_images, read_manifest, region_count, total_regions
    from .mask_step import read_bank_mask

    old = read_manifest(layout)
    known = {e.stem for e in old}
    new = sorted(stem for stem in images if stem not in known and (mask_folder / f"{stem}.npz").is_file())

    def count(stem: str) -> int:
        if stem in counts:  # made by this process in step 1: counted then
            return counts[stem]
        return region_count(read_bank_mask(mask_folder / f"{stem}.npz"))

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=4) as pool:  # decompression releases the GIL; map keeps the order
        counted = tqdm(pool.map(count, new), total=len(new), desc="manifest", unit="img", disable=not progress,
                       dynamic_ncols=True)  # fmt: skip
        entries = list(zip(new, counted, strict=True))
    added = append_images(layout, entries)
    empty = [stem for stem, c in entries if c == 0]
    if empty:
        warnings.warn(
            f"{len(empty)} images have no region in their mask (e.g. {empty[0]}): not registered, as the authors' "
            "builder",
            stacklevel=3,
        )
    now = read_manifest(layout)
    return {
        "images": len(now),
        "regions": total_regions(now),
        "added_images": len(added),
        "added_regions": sum(e.count for e in added),
        "no_region": len(empty),
    }


def _value_extractor(spec: ClipSpec, values_vfm, values_vfm_checkpoint, dev, precision, short, crop, window_batch,
                     shared: dict):  # fmt: skip
    """A loader of the value extractor of one store (models loaded only when the store has work)."""

    def load():
        from ..vfm import load_vfm
        from ..weights import load_model
        from .values import ValueExtractor

        loaded = load_model(spec.model, pretrained=spec.pretrained, checkpoint=spec.checkpoint, device=dev)
        if shared.get("dino") is None:
            shared["dino"] = load_vfm(values_vfm, checkpoint=values_vfm_checkpoint, device=dev)
        return ValueExtractor(
            loaded, shared["dino"], precision=precision, short_side=short, crop=crop, window_batch=window_batch
        )

    return load


def _fill_step(final: Path, width, load, entries, images, mask_folder, main: bool, what: str, common: dict):
    """Prepare one store (rank 0), fill it in every process, finalize it (rank 0).

    Returns:
        ``({"rows", "imported", "computed_images", "computed_rows", "failed", "finalized"}, the extractor or None)``.
    """
    from .fill import fill_store, work_list
    from .manifest import total_regions
    from .slots import SlotStore

    # Whether rows are missing is read from the files alone: nothing is loaded for a finished store.
    probe = SlotStore(final, total_regions(entries), width or 1)
    pending = not (probe.final.is_file() and not probe.data_path.exists() and _rows(final) == probe.n)
    _barrier()
    if not pending:
        return {"rows": probe.n, "imported": 0, "computed_images": 0, "computed_rows": 0, "failed": 0,
                "finalized": True}, None  # fmt: skip
    extractor = load()
    if width is not None and extractor.dim != width:
        raise OvdenseError(f"{what}: the model gives {extractor.dim}-d rows, expected {width}")
    _check_width(final, extractor.dim, what)
    store = SlotStore(final, probe.n, extractor.dim)
    prepared = store.prepare() if main else None
    _barrier()
    work, missing = work_list(entries, store.done_mask(), images)
    _barrier()  # every process has the same work before any commits a row
    if missing:
        raise OvdenseError(
            f"{what}: {len(missing)} registered images with missing rows are not under the image folder (e.g. "
            f"{missing[0]}); give the folder they were registered from"
        )
    _say(f"{what}: {len(work)} images to do ({probe.n} rows)", main)
    result = fill_store(store, extractor, work, mask_folder, desc=what, **common)
    _barrier()
    failed = _total(len(result["failed"]))
    _failures(what, result["failed"], failed, main)
    finalized = store.finalize() if main else False
    return {
        "rows": probe.n,
        "imported": prepared["imported"] if prepared else 0,
        "computed_images": _total(result["images"]),
        "computed_rows": _total(result["rows"]),
        "failed": failed,
        "finalized": finalized if main else None,
    }, extractor


def _rows(path: Path) -> int:
    from .store import read_store

    return int(read_store(path, mmap=True).shape[0])


def _sync_index(layout: BankLayout, vfm: str, kind: str, train_size, faiss_gpu: bool, dev) -> dict:
    """The index over the finished keys: built when there is none, else the ids it lacks added (no retraining)."""
    import numpy as np
    import torch

    from .index import add_to_index, build_index, index_ids, read_index, write_index
    from .store import read_store

    keys = read_store(layout.keys(vfm), mmap=True)
    n = len(keys)
    path = layout.index(vfm)
    if path.is_file():
        found = read_index(path)
        have = index_ids(found)
        if len(have) and int(have.max()) >= n:
            raise OvdenseError(f"{path} holds region id {int(have.max())} but the bank has {n} regions")
        new = np.setdiff1d(np.arange(n, dtype=np.int64), have)
        added = 0
        for start in range(0, len(new), 1 << 20):  # bounded float32 copies of the keys
            ids = new[start : start + (1 << 20)]
            added += add_to_index(found, keys[torch.from_numpy(ids)].float().numpy(), ids)
        if added:
            write_index(found, path)
        return {"path": str(path), "trained": False, "added": added, "ntotal": int(found.ntotal)}
    ids = np.arange(n, dtype=np.int64)
    data = keys.float().numpy()
    gpu = ((dev.index or 0) if dev.type == "cuda" else 0) if faiss_gpu else None
    built = build_index(data, ids, kind=kind, train_size=train_size, gpu=gpu)
    write_index(built, path)
    return {"path": str(path), "trained": True, "added": n, "ntotal": int(built.ntotal)}
