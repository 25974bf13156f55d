"""The statistics of a sweep's results: mean ± sample std over seeds, and a paired
comparison of two sets of runs (same seeds) with a t-distribution confidence
interval and a paired t-test (scipy).

Conventions, chosen once for every table:

* ``std`` is the sample standard deviation (n - 1 in the denominator); with a
  single value it is undefined and reported as None (``-`` in tables), never 0.
* a comparison with fewer than two paired seeds has a mean difference only:
  ``std_diff``, ``ci95`` and ``p_value`` are None.
* differences that are all equal (e.g. two cells whose teacher stage is the same
  run for every seed) have no spread: the interval is the point, and the p-value
  is 1.0 when they are all zero and 0.0 otherwise (where scipy's t-test divides
  by zero).
"""

from __future__ import annotations

import math
import statistics
from typing import Mapping, Sequence

CONFIDENCE = 0.95


def mean_std(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "n", "values"}`` of the values that are there (None: no
    value for that seed); ``values`` is returned as given, in seed order."""
    present = [v for v in values if v is not None]
    return {
        "mean": statistics.fmean(present) if present else None,
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "n": len(present),
        "values": list(values),
    }


def paired_comparison(values: Mapping[int, float], baseline: Mapping[int, float]) -> dict:
    """``values`` minus ``baseline``, paired by seed (only the seeds both have, in
    the order of ``values``): ``{"seeds", "n", "mean_diff", "std_diff", "ci95",
    "p_value"}``, all differences in the unit of the values."""
    from scipy import stats

    seeds = [seed for seed in values if seed in baseline]
    ours = [values[seed] for seed in seeds]
    theirs = [baseline[seed] for seed in seeds]
    differences = [a - b for a, b in zip(ours, theirs)]
    n = len(differences)
    result = {"seeds": seeds, "n": n, "mean_diff": statistics.fmean(differences) if n else None,
              "std_diff": None, "ci95": None, "p_value": None}
    if n < 2:
        return result
    mean, std = result["mean_diff"], statistics.stdev(differences)
    result["std_diff"] = std
    if std == 0.0:
        result["ci95"] = [mean, mean]
        result["p_value"] = 1.0 if mean == 0.0 else 0.0
        return result
    margin = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * std / math.sqrt(n)
    result["ci95"] = [mean - margin, mean + margin]
    result["p_value"] = float(stats.ttest_rel(ours, theirs).pvalue)
    return result
