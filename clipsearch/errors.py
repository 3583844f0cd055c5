"""Typed exceptions: each carries a message and a hint that says what to do next."""

from __future__ import annotations


class ClipsearchError(Exception):
    """Base class for every error clipsearch reports to a user (never shown with a traceback)."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class ConfigError(ClipsearchError):
    """A setting has a bad value, or the config file cannot be read."""

    exit_code = 2


class WeightsUnavailableError(ClipsearchError):
    """Model weights cannot be found locally nor downloaded."""


class UnknownModelError(ClipsearchError):
    """The model name or pretrained tag is not known to open_clip."""

    exit_code = 2


class ModelMismatchError(ClipsearchError):
    """The library holds vectors from a different model than the one requested."""

    exit_code = 2


class LibraryBusyError(ClipsearchError):
    """Another process holds the library's write lock."""

    exit_code = 3


class LibraryError(ClipsearchError):
    """The library cannot be opened (newer schema, unwritable folder, full disk...)."""


class EmptyLibraryError(ClipsearchError):
    """A search was asked of a library with no indexed images."""


class QueryError(ClipsearchError):
    """A search query is empty or malformed, or names an image that cannot be used."""

    exit_code = 2


class ImageDecodeError(ClipsearchError):
    """One file could not be read as an image; `reason` is short and stored in the catalog."""

    def __init__(self, reason: str, path: str | None = None, hint: str | None = None):
        super().__init__(f"{path}: {reason}" if path else reason, hint)
        self.reason = reason
        self.path = path
