"""Errors the CLI turns into a one-line message and exit status 2."""


class UsageError(ValueError):
    """Bad command-line usage or input: the message says what and where."""
