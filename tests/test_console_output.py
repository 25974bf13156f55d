"""The console logger: no progress bar (no `\\r`) when stderr is not a terminal;
on a terminal the bar is wiped before the stop message."""

from __future__ import annotations

import io
import re
import sys

from conftest import TINY_RECIPE
from pyramidkd.engine import clear_progress_bars, progress_bar

CONSOLE_RECIPE = 'loggers = ["console", "files"]\n' + TINY_RECIPE

# A local plugin module that presses Ctrl-C during the teacher's second step.
CTRL_C = """
import signal
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    if stage.id == "teacher" and epoch == 1 and step == 2:
        signal.raise_signal(signal.SIGINT)
"""


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as an interactive stderr does."""

    def isatty(self) -> bool:
        return True


def test_no_progress_bar_when_stderr_is_not_a_terminal(cli, write_recipe, tmp_path):
    result = cli("run", write_recipe(CONSOLE_RECIPE), "--output", tmp_path / "run")  # captured: not a terminal
    assert result.code == 0, result.err
    assert "\r" not in result.err and "\r" not in result.out
    epoch_lines = [line for line in result.out.splitlines() if re.match(r"\[(teacher|student)\] epoch \d/2 ", line)]
    assert len(epoch_lines) == 4  # one plain line per epoch instead
    assert "it/s" not in result.err


def test_progress_bar_only_on_a_terminal():
    assert progress_bar(10, "plain", stream=io.StringIO()) is None
    terminal = Terminal()
    bar = progress_bar(10, "stage 1/2", stream=terminal)
    assert bar is not None
    bar.update(3)
    bar.refresh()
    assert "stage 1/2" in terminal.getvalue()
    clear_progress_bars()
    assert terminal.getvalue().endswith("\r")  # the bar's line is wiped, the cursor at its start
    clear_progress_bars()  # nothing left to close


def test_the_stop_message_starts_on_a_clean_line(cli, write_recipe, tmp_path, monkeypatch):
    recipe = write_recipe(CONSOLE_RECIPE.replace('[experiment]\n', '[experiment]\nplugins = ["ctrl_c"]\n', 1))
    (tmp_path / "ctrl_c.py").write_text(CTRL_C)
    monkeypatch.delitem(sys.modules, "ctrl_c", raising=False)
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    result = cli("run", recipe, "--output", tmp_path / "run")
    text = terminal.getvalue()
    assert result.code == 130, text
    assert "it/s" in text  # a bar was drawn on the terminal...
    before, _, _ = text.partition("stopped: interrupted by SIGINT")
    assert _ and re.split(r"[\r\n]", before)[-1] == "", f"the stop message is glued to {before[-80:]!r}"  # ...and wiped first
    sys.modules.pop("ctrl_c", None)


def test_a_warning_mid_epoch_goes_above_the_bar(monkeypatch, capsys):
    import logging

    from pyramidkd.engine.cli import _configure_logging

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    _configure_logging()
    bar = progress_bar(10, "student 1/2")
    bar.update(4)
    bar.refresh()
    logging.getLogger("pyramidkd").warning("skipped a batch")
    clear_progress_bars()
    before, found, _ = terminal.getvalue().partition("pyramidkd: skipped a batch\n")
    assert found and re.split(r"[\r\n]", before)[-1] == "", f"the warning is glued to {before[-80:]!r}"
