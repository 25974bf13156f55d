"""Errors the user can fix.

Every error raised for bad input derives from :class:`UserError`; the CLI prints
it as a short message (exit 1) and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Iterable


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


class RecipeErrors(RecipeError):
    """Several independent errors of one file, reported together (``errors``, in
    the order found) so that one run of the command shows every fix to make."""

    def __init__(self, errors: list[UserError]):
        flat: list[UserError] = []
        for error in errors:
            flat += error.errors if isinstance(error, RecipeErrors) else [error]
        files = {error.file for error in flat}
        self.errors = flat
        super().__init__(f"{len(flat)} errors (fix them all, then run again)", file=files.pop() if len(files) == 1 else None)

    def __str__(self) -> str:
        lines = [f"{self.file}: {self.message}" if self.file else self.message]
        for number, error in enumerate(self.errors, 1):
            where = ": ".join(str(part) for part in (error.file if error.file != self.file else None, error.key) if part)
            lines.append(f"  {number}. {where + ': ' if where else ''}{error.message}")
            if error.fix:
                lines.append(f"     fix: {error.fix}")
        return "\n".join(lines)


def combined_error(errors: list[UserError]) -> UserError:
    """The one error itself (its message unchanged), or all of them as :class:`RecipeErrors`."""
    return errors[0] if len(errors) == 1 else RecipeErrors(errors)


def _tokens(name: str) -> list[str]:
    return [token for token in re.split(r"[^a-z0-9]+", name.lower()) if token]


def _word_overlap(words: list[str], other: list[str]) -> float:
    """Words shared (spelt alike, e.g. ``logit``/``logits``) over the words in either."""
    shared = sum(any(difflib.SequenceMatcher(None, w, o).ratio() >= 0.85 for o in other) for w in words)
    return shared / max(len(words) + len(other) - shared, 1)


def suggest(name: object, candidates: Iterable[str]) -> str | None:
    """The candidate ``name`` most likely meant: the same words run together
    (``review-kd`` -> ``reviewkd``), else the one sharing the most words
    (``hinton-kd`` -> ``kd``, not ``hint``), else the closest spelling (``temprature``)."""
    candidates = [str(c) for c in candidates]
    text = str(name)
    words = _tokens(text)
    for candidate in candidates:
        if "".join(_tokens(candidate)) == "".join(words) and words:
            return candidate
    scored = [(_word_overlap(words, _tokens(c)), difflib.SequenceMatcher(None, text, c).ratio(), c) for c in candidates]
    best = max((entry for entry in scored if entry[0] > 0), default=None)
    if best is not None:
        return best[2]
    close = difflib.get_close_matches(text, candidates, n=1)
    return close[0] if close else None


def did_you_mean(name: object, candidates: Iterable[str], template: str = "did you mean {!r}? ") -> str:
    """``"did you mean 'kd'? "`` (see :func:`suggest`), or ``""`` when nothing is close."""
    close = suggest(name, candidates)
    return template.format(close) if close is not None else ""


def source_checkout() -> str | None:
    """The source checkout this package runs from (an editable install), or ``None``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isdir(os.path.join(root, "engine")):
        return root
    return None


def install_hint(extra: str) -> str:
    """The command that installs the optional extra ``extra``: the checkout's own
    venv (``.venv/bin/pip install -e '.[ray]'``) when running from a source checkout,
    else the published package (``pip install 'pyramidkd[ray]'``)."""
    checkout = source_checkout()
    if checkout is None:
        return f"pip install 'pyramidkd[{extra}]'"
    pip = ".venv/bin/pip" if os.path.isdir(os.path.join(checkout, ".venv")) else "pip"
    return f"from the checkout {checkout}: {pip} install -e '.[{extra}]'"
