"""Errors raised by slc."""


class FormatError(ValueError):
    """A stream or file is malformed: truncated, corrupt, or from an unknown version."""
