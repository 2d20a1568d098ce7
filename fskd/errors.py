"""Errors that tell the user what was wrong and with which values.

Every error a user can cause derives from :class:`FskdError`; the CLI prints its message and
exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class FskdError(Exception):
    """Base class for user-facing errors."""


class ConfigError(FskdError, ValueError):
    """An option or configuration value is invalid."""


class RegistryError(FskdError, KeyError):
    """An unknown name was asked of a registry."""

    def __str__(self) -> str:  # KeyError quotes its message; we do not want that
        return str(self.args[0]) if self.args else ""


class DatasetError(FskdError):
    """A dataset root, file or class is missing, empty or unreadable."""


class EncoderError(FskdError):
    """An encoder spec cannot be built (unknown family, missing weights, no network)."""


class StoreError(FskdError):
    """A feature store is missing, incompatible or damaged."""


class EvaluationError(FskdError):
    """An evaluation protocol cannot run on the given data (too few samples, ...)."""


class StateError(FskdError):
    """A method state directory is missing, incompatible, or from another store."""


class OutputError(FskdError):
    """An output path (--out, --report, --store) cannot or may not be written.

    ``result`` carries a finished result whose report could not be written, so the CLI can
    print it before the error."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result


class Interrupted(FskdError):
    """The user stopped a long job (Ctrl-C). The message says what was kept and how to resume;
    the CLI exits with 130, the shell's status for SIGINT."""

    exit_code = 130
