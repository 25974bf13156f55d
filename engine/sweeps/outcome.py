"""What a sweep (and a search, which launches its trials the same way) ended
with: its results file, its exit code and, for stderr, what went wrong and what to do.
"""

from __future__ import annotations

import os
from typing import ClassVar

from .results import RESULTS_MD


class LaunchOutcome:
    """A base for attrs classes holding ``folder``, ``failed`` and ``interrupted``."""

    interrupted_note: ClassVar[str]  # what to do after Ctrl-C
    retry_note: ClassVar[str]  # what to do after failures

    folder: str
    failed: list
    interrupted: bool

    @property
    def results_file(self) -> str:
        return os.path.join(self.folder, RESULTS_MD)

    @property
    def exit_code(self) -> int:
        """0 when everything finished, 1 when something failed, 130 after Ctrl-C."""
        return 130 if self.interrupted else 1 if self.failed else 0

    def problems(self) -> str | None:
        """What went wrong and what to do (for stderr), or None."""
        if self.interrupted:
            return self.interrupted_note
        if not self.failed:
            return None
        return "\n".join([*self.failure_lines(), self.retry_note])

    def failure_lines(self) -> list[str]:
        raise NotImplementedError
