"""Errors the user can fix.

Every error raised for bad input derives from :class:`UserError`; the CLI prints
it as a short message (exit 1) and shows a traceback only with ``--debug``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: names where (file, key), what is wrong, and how to fix it."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key
        self.fix = fix

    def __str__(self) -> str:
        where = ": ".join(str(part) for part in (self.file, self.key) if part)
        text = f"{where}: {self.message}" if where else self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class RecipeError(UserError):
    """A recipe (or a --set override) is malformed or inconsistent."""


class PluginError(UserError):
    """A plugin failed to load, or components clash."""


class RunDirectoryError(UserError):
    """The output directory cannot be used for this run."""


class CheckpointError(UserError):
    """A checkpoint or teacher file is missing, corrupt or does not fit."""


class DatasetError(UserError):
    """Dataset files are missing or unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code (or build objects beyond tensors and plain
    data) while loading: refused before any of it runs."""
