"""Errors a user can fix (bad paths, names, files); the CLI prints them as one line and exits 2."""


class OvdenseError(Exception):
    """A problem with the user's input, with a message that says what to do."""


class InvalidArgumentError(OvdenseError, ValueError):
    """A Python API argument with the wrong shape or values; the message names the argument."""


class RandomWeightsWarning(UserWarning):
    """A random test architecture was loaded: its outputs are meaningless (warned once per name and process)."""


def first_line(err: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error (or its type name), shortened at a word boundary to ``limit``
    characters, for quoting another library's error inside a one-line message."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    if len(line) <= limit:
        return line
    head = line[: limit + 1]
    cut = head.rsplit(" ", 1)[0].rstrip(" ,;:") if " " in head else ""
    return (cut if len(cut) > limit // 2 else line[:limit]) + " ..."


def cause_line(err: BaseException, limit: int = 200) -> str:
    """:func:`first_line` of the innermost ``__cause__`` (hub, timm and diffusers errors wrap the one that says
    what happened)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return first_line(err, limit)
