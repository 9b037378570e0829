"""Errors a user can fix (bad paths, names, files); the CLI prints them as one line and exits 2."""


class OvdenseError(Exception):
    """A problem with the user's input, with a message that says what to do."""
