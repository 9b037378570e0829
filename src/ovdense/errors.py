"""Errors a user can fix (bad paths, names, files); the CLI prints them as one line and exits 2."""


class OvdenseError(Exception):
    """A problem with the user's input, with a message that says what to do."""


class InvalidArgumentError(OvdenseError, ValueError):
    """A Python API argument with the wrong shape or values; the message names the argument."""
