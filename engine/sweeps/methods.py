"""Methods: a recipe's ``[[stages]]`` entry with every stage its scheme planned
(a Pyramid chain is one entry of ten stages). A comparison of methods reads the
entry's final stage for its accuracy and the sum over its stages for its cost:
training MACs (``StageResult.train_macs``: the student's forward and backward
passes plus the teachers' forward passes, every training image of every epoch)
and wall time.
"""

from __future__ import annotations

from ..records import RunSummary
from .stats import mean_std


def aggregate_methods(summaries: dict[int, RunSummary]) -> dict[str, dict]:
    """Per entry id (in run order): its stages, its final stage, and over the seeds
    the entry's total training MACs and time (None for a seed whose run lacks a
    stage or predates cost records)."""
    entries: dict[str, list[str]] = {}
    for summary in summaries.values():
        for result in summary.stages:
            stages = entries.setdefault(result.entry or result.stage, [])
            if result.stage not in stages:
                stages.append(result.stage)
    methods = {}
    for entry, stage_ids in entries.items():
        costs, times = [], []
        for summary in summaries.values():
            results = [summary.stage(stage_id) for stage_id in stage_ids]
            complete = all(r is not None for r in results)
            costs.append(sum(r.train_macs for r in results) if complete and all(r.train_macs is not None for r in results) else None)
            times.append(sum(r.time_s for r in results) if complete else None)
        epochs = [summary.stage(s).epochs for summary in summaries.values() for s in stage_ids if summary.stage(s)]
        methods[entry] = {"stages": stage_ids, "final_stage": stage_ids[-1], "epochs": sum(epochs) // max(1, len(summaries)),
                          "train_macs": mean_std(costs), "time_s": mean_std(times)}
    return methods


def has_chains(results: dict) -> bool:
    """Whether any method of the sweep has more than one stage (then a table by method says more)."""
    return any(len(method["stages"]) > 1 for cell in results["cells"] for method in (cell.get("methods") or {}).values())
