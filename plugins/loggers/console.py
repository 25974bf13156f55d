"""``console``: a progress bar per epoch, one line per epoch, the final table.

With ``--quiet`` only the final table is printed.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from pyramidkd.engine import Logger, hookimpl
from pyramidkd.engine.summary import format_summary


class ConsoleLogger(Logger):
    """Progress bars and per-epoch lines on the terminal."""

    name = "console"

    def __init__(self, params=None):
        super().__init__(params)
        self.bar = None

    def _print(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    @hookimpl
    def pyramidkd_run_start(self, run):
        if not run.quiet:
            stages = ", ".join(stage.id for stage in run.stages)
            self._print(f"run {run.recipe.experiment.name!r} -> {run.directory.path} on {run.device}; stages: {stages}")

    @hookimpl
    def pyramidkd_stage_start(self, run, stage):
        if not run.quiet:
            teachers = f", teacher {', '.join(getattr(t, 'stage_id', getattr(t, 'path', '?')) for t in stage.teachers)}" if stage.teachers else ""
            self._print(f"[{stage.id}] {stage.model.name}, loss {stage.loss.name}{teachers}, {stage.train.epochs} epochs")

    @hookimpl
    def pyramidkd_batch_end(self, run, stage, epoch, step, num_steps, loss):
        if run.quiet:
            return
        if self.bar is None:
            self.bar = tqdm(total=num_steps, desc=f"{stage.id} {epoch}/{stage.train.epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)
        self.bar.update(1)
        if step % 10 == 0 or step == num_steps:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    @hookimpl
    def pyramidkd_epoch_end(self, run, stage, epoch, metrics):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if run.quiet:
            return
        m = metrics
        self._print(
            f"[{stage.id}] epoch {epoch}/{m['epochs']}  loss {m['train_loss']:.4f}  train {100 * m['train_acc']:.1f}%  "
            f"val {100 * m['val_acc']:.1f}% (best {100 * m['best_val_acc']:.1f}% @{m['best_epoch']})  "
            f"lr {m['lr']:.3g}  {m['epoch_time_s']:.1f}s"
        )

    @hookimpl
    def pyramidkd_stage_end(self, run, stage, result):
        if run.quiet:
            return
        if result.get("skipped"):
            self._print(f"[{stage.id}] outputs exist: reused (test {100 * result['test_acc']:.2f}%); --force recomputes")
        else:
            self._print(f"[{stage.id}] best epoch {result['best_epoch']}: val {100 * result['best_val_acc']:.2f}%, test {100 * result['test_acc']:.2f}%")

    @hookimpl
    def pyramidkd_run_end(self, run, summary):
        self._print("")
        self._print(format_summary(summary))
        self._print(f"results: {run.directory.path}")


@hookimpl
def pyramidkd_register_loggers():
    return [ConsoleLogger]
