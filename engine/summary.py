"""The end-of-run table (model, params, teacher, val/test accuracy, reference, time)."""

from __future__ import annotations


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _params(count: int) -> str:
    if count >= 1e6:
        return f"{count / 1e6:.2f}M"
    if count >= 1e3:
        return f"{count / 1e3:.1f}k"
    return str(count)


def summary_rows(summary: dict) -> list[dict]:
    rows = []
    for stage in summary["stages"]:
        teachers = stage.get("teachers") or []
        teacher_text = ", ".join(
            f"{t['stage']} ({_pct(t.get('test_acc'))})" if "stage" in t else "file" for t in teachers
        ) or "-"
        reference = stage.get("reference_test_acc")
        rows.append(
            {
                "stage": stage["stage"],
                "model": stage["model"],
                "params": _params(stage["params"]),
                "loss": stage.get("loss", ""),
                "teacher (test %)": teacher_text,
                "val %": _pct(stage["best_val_acc"]),
                "test %": _pct(stage["test_acc"]),
                "published %": "-" if reference is None else f"{reference:.2f}",
                "time": f"{stage['time_s']:.1f}s" + (" (reused)" if stage.get("skipped") else ""),
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no stages)"
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    line = "  ".join(h.ljust(widths[h]) for h in headers)
    rule = "  ".join("-" * widths[h] for h in headers)
    body = ["  ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join([line, rule, *body])


def format_summary(summary: dict) -> str:
    data = summary.get("dataset", {})
    head = (
        f"{summary['experiment']}: {data.get('name')} (train {data.get('train')}, val {data.get('val')}, "
        f"test {data.get('test')}), seed {summary['seed']}, {summary['device']}, {summary['time_s']:.1f}s"
    )
    note = "val % = best validation accuracy (chooses the checkpoint); test % = that checkpoint on the test split"
    return "\n".join([head, format_table(summary_rows(summary)), note])
