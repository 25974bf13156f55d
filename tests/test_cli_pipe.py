"""Output piped into a reader that has already gone (`| head`, `| true`) ends quietly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_pipe_gives_no_traceback():
    # `true` exits at once, so every write of the command meets a closed pipe.
    script = f"{sys.executable} -m pyramidkd validate {ROOT / 'recipes' / 'quickstart.toml'} | true; exit ${{PIPESTATUS[0]}}"
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert "BrokenPipeError" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0
