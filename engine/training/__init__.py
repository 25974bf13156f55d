"""The training runtime: one stage's loop and the pieces it is made of.

Kept light on purpose (nothing here imports the loop), so that planning can use
:mod:`.checkpoints` without an import cycle:

* :mod:`.checkpoints` — the checkpoint file (save, load, the model dict) and the
  training state a ``last`` checkpoint holds (:func:`~.checkpoints.last_checkpoint`,
  :func:`~.checkpoints.restore_state`); :mod:`.safe_load` reads files as data only;
* :mod:`.models` — building models, rebuilding them from checkpoints, copying weights;
* :mod:`.rng`, :mod:`.taps`, :mod:`.optim`, :mod:`.evaluate` — seeding and RNG state,
  tap recording, optimiser and scheduler factories, evaluation under autocast (the
  batches come from :mod:`pyramidkd.engine.data`);
* :mod:`.state` — everything a stage trains on, built in one place;
  :mod:`.progress` — where it stands;
* :mod:`.loop` — the stage runner (epochs, steps, saves, hooks);
* :mod:`.fingerprint`, :mod:`.reuse` — what a stage *is*, and which stages a run
  reuses, recomputes or resumes;
* :mod:`.stops` — signals, the stop message and the resume command.
"""

from .stops import RunInterrupted, StopFlag, TrainingError

__all__ = ["RunInterrupted", "StopFlag", "TrainingError"]
