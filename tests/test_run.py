"""End-to-end runs: the run directory, determinism, chains, reuse, refusal."""

from __future__ import annotations

import csv
import json
import os
import tomllib

import pytest
import torch

from conftest import RECIPES, TINY_RECIPE
from pyramidkd.engine.training.checkpoints import load_checkpoint

TIMING_KEYS = {"epoch_time_s", "train_time_s", "time_s"}


def metrics(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The quickstart recipe, shrunk with --set: every stage, 1 epoch, 300 images."""
    from pyramidkd.engine.cli import main

    out = tmp_path_factory.mktemp("qs") / "run"
    code = main(["run", str(RECIPES / "quickstart.toml"), "--quiet", "--output", str(out),
                 "--set", "train.epochs=1", "--set", "dataset.limit=300"])
    assert code == 0
    return out


def test_quickstart_run_directory(quickstart_run):
    out = quickstart_run
    for name in ("recipe.toml", "manifest.json", "metrics.jsonl", "metrics.csv", "summary.json"):
        assert (out / name).is_file(), name
    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert recipe["train"]["epochs"] == 1 and recipe["dataset"]["limit"] == 300  # overrides are stored

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["torch_version"] == torch.__version__
    assert manifest["device"] == "cpu" or manifest["device"].startswith("cuda")
    assert manifest["seed"] == 0 and manifest["started"] and manifest["finished"]
    assert "pyramidkd_version" in manifest and "git_commit" in manifest

    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["teacher", "student-scratch", "student-kd"]
    for stage in stages.values():
        assert stage["num_parameters"] > 0 and 0 <= stage["best_val_acc"] <= 1 and 0 <= stage["test_acc"] <= 1
        assert (out / stage["checkpoint"]).is_file()
        assert (out / "checkpoints" / stage["stage"] / "last.pt").is_file()
    assert stages["teacher"]["num_parameters"] > 10 * stages["student-kd"]["num_parameters"]
    assert stages["student-kd"]["teachers"] == [{"stage": "teacher", "model": "vgg", "test_acc": stages["teacher"]["test_acc"]}]
    assert stages["student-kd"]["loss"] == "kd"

    records = metrics(out)
    assert [r["kind"] for r in records] == ["epoch", "test"] * 3
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and rows[0]["stage"] == "teacher"
    # nothing half-written is left behind
    assert not [p for p in out.rglob("*.tmp")]


def test_checkpoint_is_self_describing(quickstart_run):
    checkpoint = load_checkpoint(str(quickstart_run / "checkpoints" / "teacher" / "best.pt"))
    assert checkpoint["model"]["name"] == "vgg"
    assert checkpoint["model"]["num_classes"] == 10 and checkpoint["model"]["input_shape"] == [3, 16, 16]
    assert checkpoint["stage"] == "teacher"


def test_best_checkpoint_is_chosen_on_validation(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    result = cli("run", recipe, "--quiet", "--output", tmp_path / "run", "--set", "train.epochs=3")
    assert result.code == 0, result.err
    records = metrics(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    for stage in summary["stages"]:
        epochs = [r for r in records if r["stage"] == stage["stage"] and r["kind"] == "epoch"]
        best = max(epochs, key=lambda r: (r["val_acc"], -r["epoch"]))
        assert stage["best_epoch"] == best["epoch"]
        assert stage["best_val_acc"] == best["val_acc"]
    # the test-split result belongs to the best epoch, whatever test accuracy other epochs had
    tests = [r for r in records if r["kind"] == "test"]
    assert [t["epoch"] for t in tests] == [s["best_epoch"] for s in summary["stages"]]


def test_same_seed_gives_identical_metrics(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    for name in ("a", "b"):
        assert cli("run", recipe, "--quiet", "--output", tmp_path / name).code == 0
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    other = cli("run", recipe, "--quiet", "--output", tmp_path / "c", "--set", "experiment.seed=4")
    assert other.code == 0
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_output_folder_with_another_run_is_refused(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "run"
    assert cli("run", recipe, "--quiet", "--output", out).code == 0
    result = cli("run", recipe, "--quiet", "--output", out, "--set", "train.epochs=1")
    assert result.code == 1
    assert "holds a different run" in result.err and str(out) in result.err and "fix:" in result.err

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    result = cli("run", recipe, "--quiet", "--output", stranger)
    assert result.code == 1 and "holds no pyramidkd run" in result.err


def test_rerun_reuses_completed_stages_and_force_recomputes(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "run"
    assert cli("run", recipe, "--quiet", "--output", out).code == 0
    first = json.loads((out / "summary.json").read_text())
    best = out / "checkpoints" / "teacher" / "best.pt"
    stamp = os.stat(best).st_mtime_ns

    again = cli("run", recipe, "--output", out)
    assert again.code == 0
    assert "outputs exist: reused" in again.out
    assert os.stat(best).st_mtime_ns == stamp
    second = json.loads((out / "summary.json").read_text())
    assert [s["test_acc"] for s in second["stages"]] == [s["test_acc"] for s in first["stages"]]
    assert all(s["skipped"] for s in second["stages"])

    forced = cli("run", recipe, "--quiet", "--output", out, "--force")
    assert forced.code == 0
    assert os.stat(best).st_mtime_ns != stamp


def test_teacher_is_frozen_and_kd_uses_it(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "run"
    assert cli("run", recipe, "--quiet", "--output", out).code == 0
    teacher_before = load_checkpoint(str(out / "checkpoints" / "teacher" / "best.pt"))["state_dict"]
    # a teacher loaded from a file, by path, in another recipe
    text = TINY_RECIPE.replace('teacher = "teacher"', f'teacher = "{out / "checkpoints" / "teacher" / "best.pt"}"')
    text = text.replace('[[stages]]\nid = "teacher"\nscheme = "scratch"\nmodel = { name = "vgg", layers = [8, "M", 16, "M"] }\n', "")
    result = cli("run", write_recipe(text, "from_file.toml"), "--quiet", "--output", tmp_path / "from_file")
    assert result.code == 0, result.err
    teacher_after = load_checkpoint(str(out / "checkpoints" / "teacher" / "best.pt"))["state_dict"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    summary = json.loads((tmp_path / "from_file" / "summary.json").read_text())
    assert summary["stages"][0]["teachers"][0]["file"].endswith("best.pt")


def test_wrong_architecture_teacher_file(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "run"
    assert cli("run", recipe, "--quiet", "--output", out).code == 0
    path = out / "checkpoints" / "teacher" / "best.pt"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["model"]["params"]["layers"] = [8, "M", 32, "M"]
    torch.save(checkpoint, tmp_path / "wrong.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for name, message in (("wrong.pt", "does not fit this model"), ("garbage.pt", "corrupt or truncated")):
        text = TINY_RECIPE.replace('teacher = "teacher"', f'teacher = "{tmp_path / name}"')
        result = cli("run", write_recipe(text, f"r_{name}.toml"), "--quiet", "--output", tmp_path / f"o_{name}")
        assert result.code == 1, result.err
        assert message in result.err and name in result.err and "Traceback" not in result.err


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pyramidkd", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("pyramidkd ")


def test_multi_seed_run_reports_mean_and_std(write_recipe, tmp_path, cli):
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "seeds"
    result = cli("run", recipe, "--quiet", "--output", out, "--seeds", "0,1,2", "--set", "train.epochs=1")
    assert result.code == 0, result.err
    (cell,) = json.loads((out / "results.json").read_text())["cells"]  # the one aggregate, a sweep's
    assert cell["seeds"] == [0, 1, 2]
    for index, stage in enumerate(cell["stages"].values()):
        per_seed = [json.loads((out / f"seed-{s}" / "summary.json").read_text())["stages"][index]["test_acc"] for s in (0, 1, 2)]
        assert stage["test_acc"]["values"] == per_seed
        assert stage["test_acc"]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert "test % (mean ± std)" in result.out
    assert cli("run", recipe, "--seeds", "0,0").code == 1


def test_a_run_killed_while_creating_its_folder_is_continued(tmp_path, write_recipe, cli):
    """SIGKILL between mkstemp and rename leaves `.recipe.toml.<random>.tmp` behind (no
    clean-up runs); the same command again must start the run, not refuse the folder."""
    recipe = write_recipe(TINY_RECIPE)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".recipe.toml.k3j9x2.tmp").write_text("partial")
    (out / ".lock").write_text("")
    result = cli("run", recipe, "--output", out, "--quiet")
    assert result.code == 0, result.err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    refused = cli("run", recipe, "--output", tmp_path / "other", "--quiet")
    assert refused.code == 1 and "holds no pyramidkd run" in refused.err
