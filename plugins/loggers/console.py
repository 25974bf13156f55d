"""``console``: a progress bar per epoch, one line per epoch, the final table.

The bar is drawn only when stderr is a terminal; a redirected log gets the plain
per-epoch lines on stdout and no ``\\r`` fragments. With ``--quiet`` only the
final table is printed.
"""

from __future__ import annotations

import sys

from pyramidkd.engine import EpochRecord, Logger, RunSummary, StageResult, format_summary, hookimpl, progress_bar


def _source(teacher) -> str:
    return getattr(teacher, "stage_id", None) or getattr(teacher, "path", None) or "?"


class ConsoleLogger(Logger):
    """Progress bars and per-epoch lines on the terminal."""

    name = "console"

    def __init__(self, params=None):
        super().__init__(params)
        self.bar = None
        self.bar_epoch: tuple[str, int] | None = None  # (stage id, epoch) the open bar counts

    def _print(self, text: str) -> None:
        print(text, file=sys.stdout, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.bar_epoch = None, None

    @hookimpl
    def pyramidkd_run_start(self, run):
        if not run.quiet:
            stages = ", ".join(stage.id for stage in run.stages)
            self._print(f"run {run.recipe.experiment.name!r} -> {run.directory.path} on {run.device}; stages: {stages}")

    @hookimpl
    def pyramidkd_stage_start(self, run, stage):
        if not run.quiet:
            teachers = f", teacher {', '.join(_source(t) for t in stage.teachers)}" if stage.teachers else ""
            self._print(f"[{stage.id}] {stage.model.name}, loss {stage.loss.name}{teachers}, {stage.train.epochs} epochs")

    @hookimpl
    def pyramidkd_batch_end(self, run, stage, epoch, step, num_steps, loss):
        if run.quiet:
            return
        if self.bar_epoch != (stage.id, epoch):
            self.close_bar()
            self.bar = progress_bar(num_steps, f"{stage.id} {epoch}/{stage.train.epochs}")
            self.bar_epoch = (stage.id, epoch)
            if self.bar is not None and step > 1:  # an epoch resumed mid-way
                self.bar.update(step - 1)
        if self.bar is None:  # stderr is not a terminal: the epoch line says it all
            return
        self.bar.update(1)
        if step % 10 == 0 or step == num_steps:
            self.bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    @hookimpl
    def pyramidkd_epoch_end(self, run, stage, epoch, metrics: EpochRecord):
        self.close_bar()
        if run.quiet:
            return
        m = metrics
        self._print(
            f"[{stage.id}] epoch {epoch}/{m.epochs}  loss {m.train_loss:.4f}  train {100 * m.train_acc:.1f}%  "
            f"val {100 * m.val_acc:.1f}% (best {100 * m.best_val_acc:.1f}% @{m.best_epoch})  "
            f"lr {m.lr:.3g}  {m.epoch_time_s:.1f}s"
        )

    @hookimpl
    def pyramidkd_stage_end(self, run, stage, result: StageResult):
        self.close_bar()
        if run.quiet:
            return
        if result.skipped:
            self._print(f"[{stage.id}] outputs exist: reused (test {100 * result.test_acc:.2f}%); --force recomputes")
        else:
            self._print(f"[{stage.id}] best epoch {result.best_epoch}: val {100 * result.best_val_acc:.2f}%, "
                        f"test {100 * result.test_acc:.2f}%")

    @hookimpl
    def pyramidkd_run_end(self, run, summary: RunSummary):
        self.close_bar()
        self._print("")
        self._print(format_summary(summary))
        self._print(f"results: {run.directory.path}")


@hookimpl
def pyramidkd_register_loggers():
    return [ConsoleLogger]
