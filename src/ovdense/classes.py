"""Class lists: ``"sky; person, person in shirt; tree"`` strings, class files, and their checks.

A class is one or more names (synonyms); the image side takes the softmax over all names and then the max
over a class's names. This module is plain Python (no torch), so the command line checks a class list before
any model loads.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from .errors import InvalidArgumentError

__all__ = [
    "class_list_key",
    "display_names",
    "normalise_classes",
    "parse_class_string",
    "read_class_file",
    "split_names",
    "validate_classes",
]


def validate_classes(classes: Sequence[Sequence[str]], where: str = "") -> list[list[str]]:
    """Check a list of name lists and strip the names.

    Raises:
        ValueError: an empty list, an empty class or name, a name twice in a class, or a class twice.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ValueError(f"{prefix}classes must be a list of name lists, got {type(classes).__name__}")
    if len(classes) == 0:
        raise ValueError(f"{prefix}the class list is empty")
    out: list[list[str]] = []
    seen: dict[str, int] = {}
    classes_seen: dict[frozenset, int] = {}
    for ci, names in enumerate(classes):
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ValueError(f"{prefix}class {ci} must be a list of names, got {type(names).__name__}")
        if len(names) == 0:
            raise ValueError(f"{prefix}class {ci} has no names")
        cleaned = []
        for name in names:
            if not isinstance(name, str):
                raise ValueError(f"{prefix}class {ci}: names must be strings, got {type(name).__name__}")
            name = name.strip()
            if not name:
                raise ValueError(f"{prefix}class {ci} has an empty name")
            if name in cleaned:
                raise ValueError(f"{prefix}duplicate name {name!r} in class {ci}")
            cleaned.append(name)
        key = frozenset(cleaned)
        if key in classes_seen:
            raise ValueError(f"{prefix}duplicate class {cleaned[0]!r} (classes {classes_seen[key]} and {ci})")
        classes_seen[key] = ci
        # A name may stand in two classes (SCLIP's COCO-Object lists 'bed' among the background words and
        # as a class): both entries take part in the softmax, and the earlier class wins the tie.
        if all(name in seen for name in cleaned):
            warnings.warn(
                f"{prefix}class {ci} ({cleaned[0]!r}) can never be predicted: each of its names also belongs "
                f"to an earlier class, which wins ties",
                stacklevel=3,
            )
        for name in cleaned:
            seen.setdefault(name, ci)
        out.append(cleaned)
    return out


def class_list_key(classes) -> tuple | None:
    """A hashable form of a class-list argument as given (None when it has none), so a list given again is
    neither parsed nor warned about again."""
    if isinstance(classes, str):
        return ("str", classes)
    try:
        return ("list", tuple(c if isinstance(c, str) else tuple(c) for c in classes))
    except TypeError:
        return None


def split_names(text: str) -> list[str]:
    """A class's names: ``text`` split at commas, except escaped ones (``\\,`` stays a comma inside the name)."""
    return [name.replace("\\,", ",") for name in re.split(r"(?<!\\),", text)]


def parse_class_string(text: str) -> list[list[str]]:
    """Parse a class string: ``"sky; person, person in shirt; tree"`` gives
    ``[["sky"], ["person", "person in shirt"], ["tree"]]``.

    ``;`` separates classes and ``,`` separates the names (synonyms) of one class; whitespace is stripped. A
    comma inside one name is written ``\\,`` (the authors' ADE-847 and Cityscapes prompts ``"building, edifice"``,
    ``"people, person"`` are single prompts).

    Raises:
        ValueError: empty list, an empty class or name, or a name that appears twice.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a class string, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("the class list is empty")
    classes = []
    for ci, chunk in enumerate(text.split(";")):
        if not chunk.strip():
            raise ValueError(f"class {ci} is empty in {text!r} (stray ';'?)")
        classes.append(split_names(chunk))
    return validate_classes(classes)


def read_class_file(path: str | os.PathLike) -> list[list[str]]:
    """Read a class file: one class per line, a class's names separated by commas (``\\,`` is a comma inside a
    name); blank lines ignored.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not UTF-8 text, no classes, an empty name, a name twice in a class, or a class twice (names
            the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Notepad's UTF-8) is not part of the first name
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{path}: the class file is not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: the class file has no classes")
    return validate_classes([split_names(line) for line in lines], where=str(path))


def normalise_classes(classes) -> list[list[str]]:
    """Accept ``"a; b, c"``, ``["a", "b, c"]`` or ``[["a"], ["b", "c"]]`` -> ``[["a"], ["b", "c"]]``.

    A string is a class string (``;`` between classes, ``,`` between names); in a list, a string item is
    one class whose names are separated by ``,``, and a list item is one class's names, taken verbatim.

    Raises:
        InvalidArgumentError: an empty list, an empty class or name, a duplicate name or class.
    """
    try:
        if isinstance(classes, str):
            return parse_class_string(classes)
        if classes is None:
            raise ValueError("the class list is empty")
        if not isinstance(classes, Sequence):
            raise ValueError(f"expected a class string or a list of classes, got {type(classes).__name__}")
        items = [split_names(c) if isinstance(c, str) else c for c in classes]
        return validate_classes(items)
    except ValueError as err:
        raise InvalidArgumentError(f"classes: {err}") from None


def display_names(classes: Sequence[Sequence[str]], background: int | None = None) -> list[str]:
    """One name per class to show: its first name; ``background`` for the background class, which is a list of
    background words ("sky, wall, tree, ...") whose first word would mislabel it."""
    names = [names[0] for names in classes]
    if background is not None:
        names[background] = "background"
    return names
