"""How numbers, tables and progress look on the terminal, in one place.

Public (exported from :mod:`pyramidkd.engine`): the console logger prints the
final table with :func:`format_summary`, and the commands (``report``,
``models``, ``bench-models``, ``run --seeds``) format their tables with the same
helpers, so a parameter count reads ``292.6k`` everywhere.

Progress bars are drawn only on a terminal (a redirected log gets no ``\\r``
fragments) and are tracked, so that :func:`clear_progress_bars` can wipe them
before a message (``stopped: ...``, ``error: ...``) is printed.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Any, Collection, Mapping, Sequence, TextIO

from .records import RunSummary, StageResult

_SUFFIXES = ((1e15, "P", 2), (1e12, "T", 2), (1e9, "G", 2), (1e6, "M", 2), (1e3, "k", 1))


def format_count(value: int | float | None) -> str:
    """A parameter or MAC count, short: ``772``, ``292.6k``, ``3.96M``, ``1.20G``; ``-`` for None."""
    if value is None:
        return "-"
    for limit, suffix, decimals in _SUFFIXES:
        if abs(value) >= limit:
            return f"{value / limit:.{decimals}f}{suffix}"
    return str(value)


def format_bytes(count: float) -> str:
    """A size in bytes, decimal units: ``512 B``, ``61.6 MB``, ``24.0 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def percent(fraction: float | None) -> float | None:
    """A fraction (0.97) as percent (97.0); None stays None."""
    return None if fraction is None else 100.0 * fraction


def format_number(value: float | None, *, signed: bool = False) -> str:
    """Two decimals (``97.03``, ``+1.25`` when signed); ``-`` for None."""
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_percent(fraction: float | None) -> str:
    """A fraction as a percent with two decimals: ``0.9703`` -> ``97.03``; ``-`` for None."""
    return format_number(percent(fraction))


def format_table(rows: Sequence[Mapping[str, Any]], *, right: Collection[str] = ()) -> str:
    """A plain-text table: one header line from the first row's keys, a rule, one
    line per row; columns named in ``right`` are right-aligned (numbers)."""
    if not rows:
        return "(no rows)"
    headers = list(rows[0])
    cells = [[str(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(line[i]) for line in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if h in right else v.ljust(w) for h, v, w in zip(headers, values, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def format_markdown_table(rows: Sequence[Mapping[str, Any]], *, right: Collection[str] = ()) -> str:
    """The same rows as a markdown table (``|`` inside cells escaped)."""
    if not rows:
        return "(no rows)"
    headers = list(rows[0])

    def line(values) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"

    rule = "| " + " | ".join("---:" if h in right else "---" for h in headers) + " |"
    return "\n".join([line(headers), rule, *(line(row[h] for h in headers) for row in rows)])


# --- the end-of-run table -------------------------------------------------------


def _teachers(result: StageResult) -> str:
    names = [f"{t.stage} ({format_percent(t.test_acc)})" if t.stage is not None else "file" for t in result.teachers]
    return ", ".join(names) or "-"


def summary_rows(summary: RunSummary) -> list[dict[str, str]]:
    """One row per stage: model, params, loss, teacher, val/test accuracy, published, time."""
    return [
        {
            "stage": result.stage,
            "model": result.model,
            "params": format_count(result.num_parameters),
            "loss": result.loss,
            "teacher (test %)": _teachers(result),
            "val %": format_percent(result.best_val_acc),
            "test %": format_percent(result.test_acc),
            "published %": format_number(result.reference_test_acc),
            "time": f"{result.time_s:.1f}s" + (" (reused)" if result.skipped else ""),
        }
        for result in summary.stages
    ]


SUMMARY_NOTE = "val % = best validation accuracy (chooses the checkpoint); test % = that checkpoint on the test split"


def format_summary(summary: RunSummary) -> str:
    """The table the console logger prints when a run ends."""
    data = summary.dataset
    head = (
        f"{summary.experiment}: {data.name} (train {data.train}, val {data.val}, test {data.test}), "
        f"seed {summary.seed}, {summary.device}, {summary.time_s:.1f}s"
    )
    table = format_table(summary_rows(summary)) if summary.stages else "(no stages)"
    return "\n".join([head, table, SUMMARY_NOTE])


# --- progress bars ----------------------------------------------------------------

_open_bars: "weakref.WeakSet[Any]" = weakref.WeakSet()


def is_terminal(stream: TextIO | None) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def progress_bar(total: int, description: str, stream: TextIO | None = None):
    """A tqdm bar on ``stream`` (default: the current stderr) that clears itself when
    closed, or None when the stream is not a terminal: a redirected log then gets
    the plain per-epoch lines only, never ``\\r`` fragments."""
    stream = sys.stderr if stream is None else stream
    if not is_terminal(stream):
        return None
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, leave=False, file=stream, dynamic_ncols=True)
    _open_bars.add(bar)
    return bar


def above_progress_bars():
    """A context in which text written to the terminal goes above the open progress
    bars (they are cleared, then redrawn): for a warning logged mid-epoch."""
    if not _open_bars:
        return contextlib.nullcontext()
    from tqdm import tqdm

    return tqdm.external_write_mode(file=sys.stderr)


def clear_progress_bars() -> None:
    """Close every open progress bar, wiping its line, so that the next message
    starts on a clean line (the command line calls this before ``stopped: ...``)."""
    for bar in list(_open_bars):
        _open_bars.discard(bar)
        bar.close()
