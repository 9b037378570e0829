"""Files written whole or not at all (a temp file beside the target, then ``os.replace``), output folders and
planned output files checked before work starts (:func:`check_outputs`: never an input, never an existing file
unless asked), and output file names that never collide."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path


def write_atomic(path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then ``os.replace`` it into place.

    The temp file is created with mode 0o666 minus the umask, like a normal new file; it is removed if
    anything fails, so ``path`` is either the old file or the complete new one.
    """
    path = Path(path)
    parent = path.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json_atomic(obj, path) -> None:
    """Write ``obj`` as indented JSON (UTF-8, trailing newline) atomically."""
    data = (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    write_atomic(path, lambda f: f.write(data))


def check_output_dir(path, flag: str = "--out") -> Path:
    """Check, before any work starts, that ``path`` is (or can become) a folder this process can write into.

    Nothing is created: the nearest existing folder on the way is probed by creating and removing a temp
    file in it, which also catches read-only file systems (where permission bits say nothing, e.g. as root).

    Raises:
        OvdenseError: ``path`` (or a parent) exists and is not a folder, or cannot be written.
    """
    from .errors import OvdenseError

    path = Path(path)
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "exists and is not a folder" if probe == path else f"cannot be created: {probe} is a file"
        raise OvdenseError(f"{flag} {path} {what}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".ovdense-write-test-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise OvdenseError(f"{flag} {path} cannot be written ({err.strerror or err}: {probe})") from None
    return path


def _identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of an existing file (symlinks followed), what ``os.path.samefile`` compares; else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _path_key(path: Path) -> str:
    """The resolved path (symlinks followed), case-folded: equal for two spellings of one file on a
    case-insensitive file system (and, conservatively, for two names differing only in case elsewhere)."""
    return os.path.normcase(os.path.realpath(path)).casefold()


def check_outputs(outputs, inputs=(), overwrite: bool = False, overwrite_flag: str = "--overwrite") -> None:
    """Check, before any work starts, the files a run plans to write against the files it reads and those already
    there.

    Refused, whatever ``overwrite`` says: an output that is one of the ``inputs`` (it would be replaced, then
    perhaps read back damaged), an output that is an existing folder, two outputs that are one file. Without
    ``overwrite``, also any output that already exists (a file, or a link, even a dangling one): the message names
    the first and says how many there are. Paths are compared as the file system does: with
    ``os.path.samefile``'s identity (device and inode, symlinks followed) where both files exist, else by
    resolved paths with case folded (case-insensitive file systems), which may refuse two names that differ only in
    case on a case-sensitive one.

    Args:
        outputs: the paths the run will write; or ``{path: source}``, naming in the message the input each output
            is written for.
        inputs: the paths the run reads (images, class lists, weights...); ones that do not exist are compared
            by path only.
        overwrite: whether existing outputs may be replaced.
        overwrite_flag: the flag to name in the message (the command line's ``--overwrite``).

    Raises:
        OvdenseError: one line naming the output (and the input it would replace).
    """
    from .errors import OvdenseError

    sources = {Path(p): s for p, s in outputs.items()} if isinstance(outputs, Mapping) else {}
    outputs = [Path(p) for p in outputs]
    by_identity: dict[tuple[int, int], Path] = {}
    by_key: dict[str, tuple[Path, bool]] = {}  # resolved, case-folded path -> (input, whether it exists)
    for path in map(Path, inputs):
        ident = _identity(path)
        if ident is not None:
            by_identity.setdefault(ident, path)
        by_key.setdefault(_path_key(path), (path, ident is not None))
    seen: dict[str, Path] = {}
    existing: list[Path] = []
    for path in outputs:
        key = _path_key(path)
        if key in seen:
            raise OvdenseError(f"two outputs of this run are one file: {seen[key]} and {path}")
        seen[key] = path
        ident = _identity(path)
        replaced = by_identity.get(ident) if ident is not None else None
        if replaced is None:
            candidate, candidate_exists = by_key.get(key, (None, False))
            if ident is None or not candidate_exists:  # where both exist, their identity alone decides
                replaced = candidate
        if replaced is not None:
            of = f" (of {sources[path]})" if sources.get(path) is not None else ""
            raise OvdenseError(
                f"the output {path}{of} would replace the input {replaced}; write the outputs to another folder "
                "(--out) or rename the input"
            )
        if os.path.lexists(path):
            if path.is_dir():
                raise OvdenseError(f"the output {path} is an existing folder; move it or write to another --out")
            existing.append(path)
    if existing and not overwrite:
        count = f"{len(existing)} of this run's {len(outputs)} outputs"
        count += " exist" if len(existing) > 1 else ""
        raise OvdenseError(
            f"the output {existing[0]} already exists ({count}); pass {overwrite_flag} to replace, or write to another "
            "--out"
        )


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, so a group of renames completes or never starts.

    Outside the main thread (where signal handlers cannot be set) the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            raise KeyboardInterrupt


def write_group_atomic(files: dict) -> None:
    """Write several files so that they appear together or not at all (as far as one process can tell).

    Args:
        files: ``{path: write}``, each ``write(file_object)`` as for :func:`write_atomic`.

    Every file is written to a temp file beside its target first; the renames then run with Ctrl-C held
    (:func:`interrupts_deferred`). A failure before the renames leaves none of the targets changed.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in files.items():
            path = Path(path)
            tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
            with open(tmp, "xb") as f:
                staged.append((tmp, path))
                write(f)
                f.flush()
                os.fsync(f.fileno())
        with interrupts_deferred():
            for tmp, path in staged:
                os.replace(tmp, path)
            staged = []
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def fsync_dir(path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable: ``fsync`` on the folder.

    A renamed file's data is on disk after ``os.fsync`` of the file, but its new name only after the folder's
    own fsync. Windows cannot open a folder for this and journals names itself: a no-op there.
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_durable(path, write) -> None:
    """:func:`write_atomic`, then :func:`fsync_dir` of the parent, so the new file survives a power cut too."""
    write_atomic(path, write)
    fsync_dir(Path(path).parent)


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names, one per input, that never collide (compared without case, as some file systems do).

    A file's stem where it is unique; else, for files in different folders, the stem prefixed by as many
    parent folders as it takes (``d1/x.jpg``, ``d2/x.jpg`` -> ``d1_x``, ``d2_x``); for files in one folder, the
    extension (``x.jpg``, ``x.png`` -> ``x_jpg``, ``x_png``); for the same file twice, a counter.
    """
    full = [Path(os.path.abspath(p)) for p in paths]
    depth = [0] * len(full)
    with_suffix = [False] * len(full)

    def name(i: int) -> str:
        folders = full[i].parent.parts[1:]  # without the root
        prefix = list(folders[len(folders) - depth[i] :]) if depth[i] else []
        return "_".join([*prefix, full[i].name.replace(".", "_") if with_suffix[i] else full[i].stem])

    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(full)):
            groups.setdefault(name(i).casefold(), []).append(i)
        clashes = [g for g in groups.values() if len(g) > 1]
        if not clashes:
            return [name(i) for i in range(len(full))]
        grown = False
        for group in clashes:
            can_grow = [i for i in group if depth[i] < len(full[i].parent.parts) - 1]
            if len({full[i].parent for i in group}) > 1 and can_grow:
                for i in can_grow:
                    depth[i] += 1
                grown = True
            elif not all(with_suffix[i] for i in group):
                for i in group:
                    with_suffix[i] = True
                grown = True
        if not grown:
            break
    names: list[str] = []
    seen: set[str] = set()
    for i in range(len(full)):
        candidate, n = name(i), 1
        while candidate.casefold() in seen:
            n += 1
            candidate = f"{name(i)}_{n}"
        seen.add(candidate.casefold())
        names.append(candidate)
    return names
