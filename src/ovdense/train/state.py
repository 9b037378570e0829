"""The resume point of a training run: one unit, published atomically, checked on load.

``state/step-<n>-<token>/`` holds ``weights.safetensors`` (student and AdamW moments) and ``trainer_state.json``
(counters, RNG, the weights file's sha256), and ``state/CURRENT`` names the complete one. A save writes a
``tmp-`` folder, fsyncs both files and the folder, renames it, then replaces ``CURRENT`` atomically (temp file,
fsync, ``os.replace``, fsync of ``state/``); only then are older folders removed. A crash at any point leaves
``CURRENT`` naming a complete folder (the old or the new one) or, before the first save, no ``CURRENT`` at all;
leftovers are removed by the next save. Loading checks the digest, so weights swapped or damaged after the fact
are refused rather than resumed from.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import warnings
from pathlib import Path

import torch

from ..errors import OvdenseError, first_line
from ..fileio import fsync_dir, write_atomic_durable

__all__ = [
    "CURRENT_FILE",
    "STATE_DIR",
    "STATE_FILE",
    "WEIGHTS_FILE",
    "current_state",
    "publish_state",
    "read_state",
    "tidy_state",
]

#: The resume point's folder under the run folder.
STATE_DIR = "state"
#: Counters, RNG and the weights' digest, in each state folder.
STATE_FILE = "trainer_state.json"
#: Student weights and AdamW moments, in each state folder.
WEIGHTS_FILE = "weights.safetensors"
#: Under ``state/``: one line naming the complete state folder to resume from.
CURRENT_FILE = "CURRENT"
_STATE_PREFIX = "step-"
_TMP_PREFIX = "tmp-"
# Files of the one-folder layout of earlier versions (``state/weights.safetensors`` + ``state/trainer_state.json``).
_LEGACY_FILES = (WEIGHTS_FILE, STATE_FILE, WEIGHTS_FILE + ".tmp")


def _write_synced(path: Path, data: bytes) -> None:
    """A new file holding ``data``, fsynced (its name is made durable by the caller's fsync of the folder)."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _file_sha256(path: Path) -> tuple[str, int]:
    """``(hex sha256, size in bytes)`` of a file, read in 1 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def publish_state(state_dir: Path, weights: bytes, meta: dict, label: str) -> Path:
    """Write one complete state folder under ``state_dir`` and point ``CURRENT`` at it (see the module doc).

    Crash points: before the rename only a ``tmp-`` folder exists (ignored, removed by the next save); between
    the rename and the ``CURRENT`` replacement an unnamed complete folder exists (ignored, removed likewise);
    ``os.replace`` of ``CURRENT`` is atomic, and the old folder is removed only after ``CURRENT`` is durable.
    """
    if not state_dir.is_dir():
        state_dir.mkdir(parents=True)
        fsync_dir(state_dir.parent)
    token = secrets.token_hex(4)
    tmp = state_dir / f"{_TMP_PREFIX}{label}-{token}"
    tmp.mkdir()
    _write_synced(tmp / WEIGHTS_FILE, weights)
    _write_synced(tmp / STATE_FILE, (json.dumps(meta, indent=2) + "\n").encode())
    fsync_dir(tmp)
    final = state_dir / f"{_STATE_PREFIX}{label}-{token}"
    os.rename(tmp, final)
    fsync_dir(state_dir)
    write_atomic_durable(state_dir / CURRENT_FILE, lambda f: f.write((final.name + "\n").encode()))
    _remove_stale(state_dir, keep=final.name)
    return final


def _remove_stale(state_dir: Path, keep: str) -> None:
    """Remove the state folders other than ``keep``, unfinished ones, temp files and the legacy layout."""
    for entry in state_dir.iterdir():
        name = entry.name
        ours_dir = entry.is_dir() and name.startswith((_STATE_PREFIX, _TMP_PREFIX))
        ours_file = name in _LEGACY_FILES or (name.startswith(f".{CURRENT_FILE}.") and name.endswith(".tmp"))
        if name == keep or not (ours_dir or ours_file):
            continue
        try:
            if ours_dir:
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError as err:  # the new state is complete; a leftover only costs disk space
            warnings.warn(f"could not remove the old resume point {entry}: {err}", stacklevel=3)


def tidy_state(state_dir: Path) -> None:
    """Remove what a crash left beside the resume point ``CURRENT`` names (nothing when there is none)."""
    current = state_dir / CURRENT_FILE
    if not current.is_file():
        return
    name = current.read_text(errors="replace").strip()
    if not name or Path(name).name != name or not (state_dir / name).is_dir():
        return  # damaged: leave everything as it is for a look (a resume from here says what is wrong)
    fsync_dir(state_dir)  # CURRENT's last replacement is durable before anything it replaced goes
    _remove_stale(state_dir, keep=name)


def current_state(path: str | os.PathLike) -> Path:
    """The folder holding the resume point of a run.

    Args:
        path: the run folder (``--out``), its ``state/`` folder, or one state folder itself.

    Raises:
        OvdenseError: no resume point there, or ``CURRENT`` names a folder that is missing.
    """
    path = Path(path)
    state_dir = path / STATE_DIR if (path / STATE_DIR).is_dir() else path
    current = state_dir / CURRENT_FILE
    if current.is_file():
        try:
            name = current.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            raise OvdenseError(f"cannot resume: the resume point {state_dir} is damaged: {current}: {err}") from None
        folder = state_dir / name
        if not name or Path(name).name != name or not folder.is_dir():
            raise OvdenseError(
                f"cannot resume: the resume point {state_dir} is damaged: {current} names {name!r}, which is missing"
            )
        return folder
    if (state_dir / STATE_FILE).is_file() or (state_dir / WEIGHTS_FILE).is_file():
        return state_dir  # a state folder itself, or the legacy layout
    if not path.exists():
        raise OvdenseError(f"cannot resume: {path} not found")
    raise OvdenseError(
        f"cannot resume: {path} holds no resume point ({STATE_DIR}/{CURRENT_FILE}); start the run without --resume"
    )


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(trainer_state.json, tensors)`` of a state folder, the weights checked against the recorded sha256."""
    from safetensors.torch import load_file

    meta_path, weights_path = folder / STATE_FILE, folder / WEIGHTS_FILE

    def damaged(what: str) -> OvdenseError:
        return OvdenseError(f"cannot resume: the resume point {folder} is damaged: {what}")

    if not meta_path.is_file():
        raise damaged(f"{meta_path} is missing")
    if not weights_path.is_file():
        raise damaged(f"{weights_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise damaged(f"{meta_path} is unreadable ({first_line(err)})") from None
    record = meta.get("weights")
    if record is None:
        warnings.warn(
            f"{folder} was written by an earlier ovdense without a digest: its {WEIGHTS_FILE} cannot be checked "
            f"against {STATE_FILE}",
            stacklevel=3,
        )
    else:
        try:
            digest, size = _file_sha256(weights_path)
        except OSError as err:
            raise damaged(f"{weights_path} is unreadable ({first_line(err)})") from None
        if not isinstance(record, dict) or record.get("sha256") != digest or record.get("bytes") != size:
            raise damaged(f"{weights_path} does not match the sha256 recorded in {meta_path} (replaced or corrupted)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise damaged(f"{weights_path} is unreadable ({first_line(err)})") from None
    return meta, tensors
