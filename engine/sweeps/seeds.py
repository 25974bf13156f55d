"""``pyramidkd run RECIPE --seeds 0,1,2``: a sweep of one cell (the recipe with its
``--set`` values) whose runs lie in ``DIR/seed-N``, run one at a time on this
machine by the local launcher. Its results are the sweep's (``results.json``,
``.csv``, ``.md``: mean ± std per stage, :mod:`.stats`); ``report DIR`` reads the
runs back with :func:`load_seed_runs`.
"""

from __future__ import annotations

import glob
import io
import os
import re
from typing import Sequence

from ..components import ComponentSpec
from ..errors import RunDirectoryError, UserError
from ..host import make_plugin_host
from ..recipe import format_key_path, load_recipe, parse_override
from ..records import SUMMARY_FILE, RunSummary, has_summary, load_summary
from ..rundir import default_output_dir
from .folder import SweepFolder
from .spec import SweepCell, SweepPlan, safe_id
from .sweep import SweepOutcome, check_cells, execute, finish, plan_runs

SEED_FOLDER = re.compile(r"seed-(-?\d+)\Z")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` as distinct integers; anything else is an error with an example."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds {text!r} is not a comma-separated list of integers", fix="e.g. --seeds 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} needs distinct integers", fix="e.g. --seeds 0,1,2")
    return seeds


def seed_folders(folder: str) -> dict[int, str]:
    """``seed-N`` sub-folders of a ``--seeds`` folder, by seed, in seed order."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), "seed-*")):
        match = SEED_FOLDER.match(os.path.basename(path))
        if match and os.path.isdir(path):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def seeds_plan(recipe_path: str, overrides: Sequence[str], seeds: Sequence[int], name: str) -> SweepPlan:
    """The one-cell sweep: the recipe with its ``--set`` values (the cell folder is
    the sweep folder itself), every seed, the local launcher with one worker."""
    values = {}
    for text in overrides:
        parts, value = parse_override(text)
        values[format_key_path(parts)] = value
    cell = SweepCell(safe_id(name), recipe_path, os.path.abspath(recipe_path), values, "")
    local = make_plugin_host().registry("launcher").get("local")
    return SweepPlan(name, recipe_path, list(seeds), [cell], [], ComponentSpec(local, local.Params(workers=1), "--seeds"))


def run_seeds(recipe_path: str, overrides: Sequence[str], seeds: Sequence[int], *, output: str | None = None,
              quiet: bool = False, force: bool = False, resume: bool = False, max_epochs: int | None = None) -> SweepOutcome:
    """Run (or continue) one run per seed in ``DIR/seed-N`` and write the results;
    ``outcome.results`` holds them, ``outcome.exit_code`` says how it ended."""
    name = load_recipe(recipe_path, list(overrides)).experiment.name
    folder = SweepFolder(output or default_output_dir(name))
    if resume and not os.path.isdir(folder.path):
        raise RunDirectoryError("there is no run to resume here", file=folder.path, fix="check --output, or drop --resume")
    plan = seeds_plan(recipe_path, overrides, seeds, name)
    runs = plan_runs(plan, folder, check_cells(plan, max_epochs))
    outcome = execute(plan, folder, runs, force=force, max_epochs=max_epochs, seeds_only=True,
                      stream=io.StringIO() if quiet else None)
    return finish(outcome)


def load_seed_runs(folder: str) -> tuple[dict[int, str], dict[int, RunSummary], list[str]]:
    """The finished runs of a ``--seeds`` folder: run folders and summaries by seed,
    and notes on the seed folders left out (no summary: unfinished)."""
    folders, summaries, notes = {}, {}, []
    for seed, path in seed_folders(folder).items():
        if not has_summary(path):
            notes.append(f"{os.path.basename(path)}: no {SUMMARY_FILE} (unfinished run): left out")
            continue
        folders[seed], summaries[seed] = path, load_summary(path)
    if not summaries:
        raise RunDirectoryError("holds seed-N folders but no finished run in them", file=folder,
                                fix="finish the runs: pyramidkd run RECIPE --seeds ... --output DIR --resume")
    return folders, summaries, notes
