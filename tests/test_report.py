"""Results: `pyramidkd report` (tables, curves, accuracy vs params) and the tensorboard logger."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from pyramidkd import testing
from pyramidkd.engine import EpochRecord
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.reporting import build_report, format_markdown
from pyramidkd.engine.reporting.readers import is_chain
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.models import count_macs, model_from_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A chain-like run: three stages, two epochs, a published reference for one stage.
CHAIN_RECIPE = testing.tiny_recipe(epochs=2, name="chain") + """
[[stages]]
id = "student-b"
scheme = { name = "kd", teacher = "student" }
model = { name = "vgg", layers = [2, "M"] }

[reference]
student = 50.0
"""


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chain")
    testing.run_tiny(CHAIN_RECIPE, workdir=folder)
    return folder / "run"


@pytest.fixture(scope="module")
def chain_report(chain_run):
    return build_report(str(chain_run))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    testing.run_tiny(testing.tiny_recipe(name="single", teacher=False), workdir=folder)
    return folder / "run"


def is_png(path) -> bool:
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 1000


def table_rows(markdown: str) -> dict[str, list[str]]:
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in markdown.splitlines()
            if line.startswith("| ") and not line.startswith("| stage") and not line.startswith("| ---")}


def test_markdown_table_of_a_chain(chain_run, chain_report):
    out = format_markdown([chain_report])
    assert out.startswith("## chain\n")
    assert "| stage | model | params | MACs | best val % | last val % | test % | published % | Δ test − published |" in out
    summary = json.loads((chain_run / "summary.json").read_text())
    rows = table_rows(out)
    assert list(rows) == ["teacher", "student", "student-b"]
    student = next(s for s in summary["stages"] if s["stage"] == "student")
    model, best_val, test, published, delta = (rows["student"][i] for i in (0, 3, 5, 6, 7))
    assert model == "vgg" and best_val == f"{100 * student['best_val_acc']:.2f}"
    assert test == f"{100 * student['test_acc']:.2f}" and published == "50.00"
    assert delta == f"{100 * student['test_acc'] - 50.0:+.2f}"
    assert rows["teacher"][6] == "-" and rows["teacher"][7] == "-"
    # the plots are in the run directory and linked relative to it
    for stage in ("teacher", "student", "student-b"):
        assert is_png(chain_run / "plots" / f"{stage}.png")
        assert f"[{stage}](plots/{stage}.png)" in out
    assert is_png(chain_run / "plots" / "accuracy_vs_params.png")
    assert "(plots/accuracy_vs_params.png)" in out


def test_report_fields_and_macs_of_the_rebuilt_models(chain_run, chain_report):
    report = json.loads(json.dumps(chain_report))  # what --format json prints for a run
    assert report["chain"] is True and report["experiment"] == "chain"
    assert report["run_dir"] == str(chain_run)
    summary = json.loads((chain_run / "summary.json").read_text())
    host = make_plugin_host(load_entry_points=False)
    for row, result_ in zip(report["stages"], summary["stages"]):
        assert row["stage"] == result_["stage"] and row["num_parameters"] == result_["num_parameters"]
        path = str(chain_run / result_["checkpoint"])
        model, description = model_from_checkpoint(load_checkpoint(path), path, host)
        assert row["macs"] == count_macs(model, tuple(description["input_shape"])) > 0
        assert row["test_acc_pct"] == pytest.approx(100 * result_["test_acc"])
        assert row["best_val_acc_pct"] == pytest.approx(100 * result_["best_val_acc"])
        assert row["last_val_acc_pct"] == pytest.approx(100 * result_["last_val_acc"])
        assert row["curves"] == str(chain_run / "plots" / f"{row['stage']}.png")
    student = report["stages"][1]
    assert student["reference_test_acc_pct"] == 50.0
    assert student["difference_pct"] == pytest.approx(student["test_acc_pct"] - 50.0)
    assert report["stages"][0]["difference_pct"] is None
    assert report["accuracy_vs_params"] == str(chain_run / "plots" / "accuracy_vs_params.png")
    assert report["notes"] == []


def test_cli_json_for_several_runs(single_run, chain_run, cli):
    result = cli("report", single_run, chain_run, "--format", "json")
    assert result.code == 0, result.err
    single, chain = json.loads(result.out)["runs"]
    assert single["experiment"] == "single" and chain["experiment"] == "chain"
    assert single["chain"] is False and single["accuracy_vs_params"] is None and chain["chain"] is True
    assert [s["stage"] for s in single["stages"]] == ["student"]
    assert (single_run / "plots" / "student.png").is_file()
    assert not (single_run / "plots" / "accuracy_vs_params.png").exists()


def test_cli_markdown(single_run, cli):
    result = cli("report", single_run)
    assert result.code == 0, result.err
    assert result.out.startswith("## single\n") and list(table_rows(result.out)) == ["student"]
    assert "[student](plots/student.png)" in result.out and "accuracy_vs_params" not in result.out


def test_chain_detection():
    from types import SimpleNamespace as Result

    assert not is_chain([Result(stage="a", entry="a"), Result(stage="b", entry="b")])
    assert is_chain([Result(stage="a-1", entry="a"), Result(stage="a-2", entry="a")])
    assert is_chain([Result(stage=s, entry=s) for s in "abc"])


def test_a_run_without_metrics_file_gets_a_note(single_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(single_run, copy, ignore=shutil.ignore_patterns("plots"))
    (copy / "metrics.jsonl").unlink()
    report = build_report(str(copy))
    assert any("no metrics.jsonl" in note for note in report["notes"])
    assert "note: no metrics.jsonl" in format_markdown([report])
    assert report["stages"][0]["curves"] is None and not (copy / "plots").exists()


def test_a_missing_checkpoint_leaves_macs_empty(single_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(single_run, copy)
    (copy / "checkpoints" / "student" / "best.pt").unlink()
    report = build_report(str(copy), plots=False)
    assert report["stages"][0]["macs"] is None
    assert any("student" in note and "no MACs" in note for note in report["notes"])
    assert table_rows(format_markdown([report]))["student"][2] == "-"


def test_errors_name_the_folder_and_the_fix(tmp_path, cli):
    result = cli("report", tmp_path / "nowhere")
    assert result.code == 1 and "no such run directory" in result.err and "fix:" in result.err
    (tmp_path / "empty").mkdir()
    result = cli("report", tmp_path / "empty")
    assert result.code == 1 and "no summary.json" in result.err and "--resume" in result.err
    assert "Traceback" not in result.err
    assert cli("report").code == 2  # RUN_DIR is required
    # a --seeds folder is reported as one (tests/test_commands_report_seeds.py); a broken seed run is named
    (tmp_path / "seeds" / "seed-0").mkdir(parents=True)
    (tmp_path / "seeds" / "seed-0" / "summary.json").write_text("{}")
    result = cli("report", tmp_path / "seeds")
    assert result.code == 1 and "has no list of stages" in result.err and "seed-0" in result.err and "fix:" in result.err


# --- the tensorboard logger --------------------------------------------------------

TB_RECIPE = testing.tiny_recipe(epochs=2, teacher=False, loggers=["files", {"name": "tensorboard", "log_dir": "tb"}])


def test_tensorboard_logger_writes_scalars_per_stage_and_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyramidkd.engine.runner import run_recipe

    summary = testing.run_tiny(TB_RECIPE, workdir=tmp_path)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for stage in summary["stages"]:
        folder = run / "tb" / stage["stage"]
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"accuracy/train", "accuracy/val", "loss/train", "loss/val", "lr", "best_val_acc", "accuracy/test"} <= tags
        epochs = [r for r in records if r["stage"] == stage["stage"] and r["kind"] == "epoch"]
        val = events.Scalars("accuracy/val")
        assert [e.step for e in val] == [1, 2]
        assert [e.value for e in val] == pytest.approx([r["val_acc"] for r in epochs])
        (test,) = events.Scalars("accuracy/test")
        assert test.step == stage["best_epoch"] and test.value == pytest.approx(stage["test_acc"])

    # Recomputing the run starts each stage's folder afresh (no duplicate points).
    with testing.autoload(False):
        run_recipe(str(tmp_path / "recipe.toml"), output=str(run), quiet=True, force=True)
    for stage in summary["stages"]:
        assert len(list((run / "tb" / stage["stage"]).glob("events.out.tfevents.*"))) == 1


def test_tensorboard_missing_is_a_clear_error(write_recipe, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    recipe = write_recipe(TB_RECIPE)
    result = cli("validate", recipe)
    assert result.code == 1
    assert "loggers[1]" in result.err and "needs the tensorboard package" in result.err
    from pyramidkd.engine import install_hint

    assert install_hint("tensorboard") in result.err
    assert "Traceback" not in result.err


def test_tensorboard_logger_is_listed(cli):
    rows = {row["name"]: row for row in json.loads(cli("plugins", "--json").out)}
    assert rows["pyramidkd.plugins.loggers.tensorboard"]["components"] == {"logger": ["tensorboard"]}


def test_tensorboard_logger_rewrites_a_resumed_stage(tmp_path):
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pyramidkd.engine.rundir import RunDirectory
    from pyramidkd.plugins.loggers.tensorboard import TensorBoardLogger

    def record(epoch, val_acc):
        return EpochRecord(stage="s", epoch=epoch, train_acc=0.1, val_acc=val_acc, train_loss=1.0, val_loss=1.0, lr=0.1,
                           best_val_acc=val_acc)

    stage = SimpleNamespace(id="s")
    first = SimpleNamespace(directory=RunDirectory(str(tmp_path)), resume_stage=None, resume_history=[])
    crashed = TensorBoardLogger(TensorBoardLogger.Params(log_dir="tb"))
    crashed.pyramidkd_stage_start(first, stage)
    for epoch, value in ((1, 0.25), (2, 0.5)):  # epoch 2 was logged, but last.pt still held epoch 1
        crashed.pyramidkd_metrics(first, stage, record(epoch, value))
    crashed.close("s")

    resumed = SimpleNamespace(directory=first.directory, resume_stage="s", resume_history=[record(1, 0.25)])
    logger = TensorBoardLogger(TensorBoardLogger.Params(log_dir="tb"))
    logger.pyramidkd_stage_start(resumed, stage)
    for epoch, value in ((2, 0.75), (3, 1.0)):
        logger.pyramidkd_metrics(resumed, stage, record(epoch, value))
    logger.pyramidkd_stage_end(resumed, stage, {})

    folder = tmp_path / "tb" / "s"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(folder))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("accuracy/val")] == [(1, 0.25), (2, 0.75), (3, 1.0)]


def test_a_metrics_line_cut_short_is_passed_over(single_run, tmp_path):
    from pyramidkd.engine import TestRecord, read_metrics

    copy = tmp_path / "copy"
    shutil.copytree(single_run, copy)
    path = copy / "metrics.jsonl"
    whole = read_metrics(str(path))
    assert [type(r) for r in whole] == [EpochRecord, TestRecord]  # one epoch, then the test
    path.write_text(path.read_text() + '{"kind": "epoch", "stage": "stud')  # a crash mid-write
    assert read_metrics(str(path)) == whole
    report = build_report(str(copy))
    assert report["stages"][0]["curves"] and not report["notes"]


def _chain_report_rows():
    """A Pyramid chain as a run report lists it: each level's hint stage (head untrained, ~10 %) before it."""
    rows = [{"stage": "teacher", "entry": "teacher", "num_parameters": 20_000_000, "test_acc_pct": 93.5}]
    for level, params, acc in (("svgg17", 9_000_000, 93.1), ("svgg14", 8_500_000, 92.9), ("svgg11", 8_000_000, 92.8)):
        rows.append({"stage": f"chain.{level}.hint", "entry": "chain", "num_parameters": params, "test_acc_pct": 10.0, "hint": True})
        rows.append({"stage": f"chain.{level}", "entry": "chain", "num_parameters": params, "test_acc_pct": acc, "hint": False})
    return {"experiment": "pyramid", "stages": rows}


def test_accuracy_vs_params_draws_final_stages_with_labels_apart(tmp_path):
    from pyramidkd.engine.reporting.plots import plot_accuracy_vs_params, save

    drawing = plot_accuracy_vs_params(_chain_report_rows())
    axes = drawing.axes[0]
    chain = next(line for line in axes.get_lines() if line.get_label() == "chain")
    assert list(chain.get_ydata()) == [93.1, 92.9, 92.8]  # no zig-zag through the hint stages' 10 %
    labels = [text for text in axes.texts]
    assert sorted(t.get_text() for t in labels) == ["chain.svgg11", "chain.svgg14", "chain.svgg17", "teacher"]
    drawing.canvas.draw()
    boxes = [text.get_window_extent() for text in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert all(text.get_fontsize() >= 9 for text in labels)
    path = tmp_path / "plots" / "accuracy_vs_params.png"
    path.parent.mkdir()
    save(drawing, str(path))
    assert is_png(path) and (tmp_path / "plots" / "accuracy_vs_params.pdf").read_bytes().startswith(b"%PDF")
    assert axes.title.get_fontsize() == 12 and axes.xaxis.label.get_fontsize() == 11


def test_a_hint_stage_row_is_labelled(chain_run):
    from pyramidkd.engine.reporting.run_report import format_run_markdown

    report = _chain_report_rows()
    report.update(seed=0, run_dir=str(chain_run), accuracy_vs_params=None, notes=[])
    for row in report["stages"]:
        row.update(model="vgg", best_val_acc_pct=None, last_val_acc_pct=None, reference_test_acc_pct=None, difference_pct=None,
                   curves=None, macs=None)
    rows = table_rows(format_run_markdown(report))
    assert "chain.svgg17.hint (hint stage: head untrained)" in rows and "chain.svgg17" in rows
    assert "its classifier head is not trained" in format_run_markdown(report)


def test_every_plot_has_a_pdf_beside_it(chain_run, chain_report):
    for stage in ("teacher", "student", "student-b", "accuracy_vs_params"):
        assert (chain_run / "plots" / f"{stage}.pdf").read_bytes().startswith(b"%PDF")
