"""The Optuna side of a search: the study (stored in SQLite in the search folder
by default, so running the command again continues it), its sampler and pruner,
and the trials of the next batch: first those a killed search left RUNNING
(resumed with their own values and run folders, so each trial counts once),
then new ones asked from the sampler.
"""

from __future__ import annotations

import logging
import os
from ..errors import UserError, install_hint
from .spec import Parameter, SearchPlan
from .trials import TrialWork, trial_folder

INSTALL_FIX = f"{install_hint('search')}, or pip install optuna"
STUDY_FILE = "study.db"

log = logging.getLogger("pyramidkd.search")


def import_optuna():
    """The ``optuna`` module (quiet: the search prints its own lines), or a
    :class:`UserError` naming the fix."""
    try:
        import optuna
    except ImportError as error:
        raise UserError(f"pyramidkd search needs the optuna package, which cannot be imported ({error})", fix=INSTALL_FIX) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(plan: SearchPlan, folder: str) -> str:
    """``[search] storage``, or the SQLite file ``study.db`` in the search folder."""
    return plan.section.storage or f"sqlite:///{os.path.join(folder, STUDY_FILE)}"


def distribution(parameter: Parameter):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if parameter.kind == "choice":
        return CategoricalDistribution(list(parameter.choices))
    if parameter.kind == "int":
        return IntDistribution(parameter.low, parameter.high, log=parameter.log, step=parameter.step or 1)
    return FloatDistribution(parameter.low, parameter.high, log=parameter.log, step=parameter.step)


def grid_size(plan: SearchPlan) -> int:
    size = 1
    for parameter in plan.space:
        size *= len(parameter.grid_values())
    return size


def make_sampler(plan: SearchPlan, target: int, trials_so_far: int):
    """The sampler, seeded with ``seed`` plus the trials already in the study: a
    continued search draws new values rather than repeating the first ones, and
    the same history gives the same draws."""
    import optuna

    seed = plan.section.seed + trials_so_far
    if plan.section.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if plan.section.sampler == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid_values() for p in plan.space}, seed=seed)
    # Random trials first, then TPE: Optuna's 10, fewer for a short search.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, target // 2)), constant_liar=True)


def make_pruner(plan: SearchPlan):
    import optuna

    if plan.section.pruner == "none":
        return optuna.pruners.NopPruner()
    # Steps are 1-based epochs: the first warmup_epochs are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=plan.section.startup_trials, n_warmup_steps=plan.section.warmup_epochs + 1)


def open_study(plan: SearchPlan, storage: str, target: int):
    """Create the study, or load it to continue (its trials stay)."""
    optuna = import_optuna()
    try:
        existing = optuna.load_study(study_name=plan.name, storage=storage)
        count = len(existing.get_trials(deepcopy=False))
    except KeyError:  # no such study yet
        count = 0
    except Exception as error:  # noqa: BLE001 - a bad URL, an unreachable server: say which and how to fix
        raise UserError(f"cannot open the study storage {storage!r}: {type(error).__name__}: {error}", file=plan.file,
                        key="search.storage", fix="give a reachable storage URL (sqlite:///PATH, postgresql://...), or leave it out") from None
    return optuna.create_study(storage=storage, study_name=plan.name, direction=plan.section.direction,
                               sampler=make_sampler(plan, target, count), pruner=make_pruner(plan), load_if_exists=True)


def counted_trials(study) -> list:
    """The trials that count towards ``trials`` (all but those waiting in the queue)."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]


def next_batch(study, plan: SearchPlan, target: int, parallel: int) -> list[TrialWork]:
    """Up to ``parallel`` trials to run now: orphaned RUNNING ones first (the folder
    lock guarantees no other search runs them), then new ones while the study holds
    fewer than ``target``."""
    import optuna
    from optuna.trial import TrialState

    work = []
    for frozen in [t for t in counted_trials(study) if t.state == TrialState.RUNNING][:parallel]:
        if any(p.key not in frozen.params for p in plan.space):  # killed while it was being asked: fail it, ask anew
            study.tell(frozen.number, state=TrialState.FAIL)
            log.info("search: trial %d was cut off while being created: marked failed", frozen.number)
            continue
        values = {p.key: p.tidy(frozen.params[p.key]) for p in plan.space}
        trial = optuna.trial.Trial(study, frozen._trial_id)
        work.append(TrialWork(trial, values, trial_folder(frozen.number), plan.seeds, reported=set(frozen.intermediate_values),
                              resumed=True))
    room = min(parallel - len(work), target - len(counted_trials(study)))
    distributions = {p.key: distribution(p) for p in plan.space}
    for _ in range(max(0, room)):
        trial = study.ask(distributions)
        values = {p.key: p.tidy(trial.params[p.key]) for p in plan.space}
        work.append(TrialWork(trial, values, trial_folder(trial.number), plan.seeds))
    return work

