"""Exceptions whose messages are written for the person at the terminal.

Library code raises these; each CLI turns one into a single stderr line and exit code 1.
Warnings go through Python's warnings module as ItmWarning; each CLI prints them as one line.
"""
from __future__ import annotations


class ItmError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class UnknownModelError(ItmError):
    pass


class WeightsUnavailableError(ItmError):
    pass


class CheckpointError(ItmError):
    pass


class IndexNotFoundError(ItmError):
    pass


class IndexFormatError(ItmError):
    pass


class DiskFullError(ItmError):
    """A write failed for want of space; what was finished is kept, and the same command resumes once space is freed."""


class IndexDamagedError(ItmError):
    """A file the index names is missing or not what was written; the message names it and what to run."""


class IndexBusyError(ItmError):
    """Another build or compaction holds the index's writer lock, and the caller asked not to wait."""


class ModelMismatchError(ItmError):
    pass


class EmptyIndexError(ItmError):
    pass


class QueryError(ItmError):
    pass


class CorpusError(ItmError):
    pass


class NotInIndexError(ItmError):
    """A row id or path that the index does not hold (a server serves only what is in its index)."""


class TooLargeError(QueryError):
    """A query image over the server's size or pixel cap."""


class ServerError(ItmError):
    """A running itm-serve could not be reached, or did not answer as one does."""


class DecodeError(ItmError):
    """One corpus item cannot be used; the build skips it and records the reason."""


class ItmWarning(UserWarning):
    """Something works, but not as the user would want (e.g. much slower than another choice); says what to do."""


class ExportError(ItmError):
    """A model that cannot be run from exported graphs; the torch backend runs it."""
