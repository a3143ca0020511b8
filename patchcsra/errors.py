"""Errors raised by patchcsra.

Every error is a one-line message that names the offending file, argument or model and says
what to do instead. The CLI prints ``str(err)`` and exits non-zero; the Python API raises.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["PatchCSRAError", "SourceError", "TrustError", "HeadNotFoundError", "OutputError", "ExportError",
           "DatasetError", "DataMismatchError"]


class PatchCSRAError(ValueError):
    """Base class of every error patchcsra raises on bad input.

    ``param``: the argument the message is about (``lams``, ``img_size`` ...), when there is one; the message
    then starts with ``param=``, and the CLI shows its flag there instead (``--lams``).
    """

    def __init__(self, message: str = "", *, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.param = param


class SourceError(PatchCSRAError):
    """A model source (spec, file, architecture, weights) cannot be loaded."""


class TrustError(SourceError):
    """A file would run code when loaded and the caller did not say it trusts it."""


class HeadNotFoundError(PatchCSRAError):
    """No adapter could split the model into features and a pooling classifier head."""


class OutputError(PatchCSRAError):
    """An output cannot be written: it exists (and ``force`` was not given), or its folder is missing."""


class ExportError(OutputError):
    """A patched model could not be written in the requested format."""


class DatasetError(PatchCSRAError):
    """A dataset cannot be read: missing root, unknown format, empty split, bad label file, bad images."""


class DataMismatchError(DatasetError):
    """The dataset's classes do not fit the model's outputs (count or names); pass a class map."""
