"""Sweep files: cells from recipes x grid, and every kind of bad input failing
at once with the file, the key and a fix (nothing runs, no folder is made)."""

from __future__ import annotations

import textwrap

import pytest

from conftest import RECIPES, TINY_RECIPE
from pyramidkd.engine.errors import RecipeError, UserError
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.sweeps.spec import load_sweep


@pytest.fixture
def sweep_file(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)

    def write(text: str) -> str:
        path = tmp_path / "sweep.toml"
        path.write_text(textwrap.dedent(text))
        return str(path)

    return write


def launchers():
    return make_plugin_host().registry("launcher")


def test_cells_are_the_grid_product_with_readable_ids(sweep_file):
    plan = load_sweep(sweep_file("""
        [sweep]
        name = "t"
        recipe = "tiny.toml"
        seeds = [0, 1]
        set = { "train.epochs" = 1 }
        [grid]
        "stages.student.loss.temperature" = [2.0, 4.0]
        "stages[0].train.epochs" = [1]
        "stages.student.train.epochs" = [1, 2]
        "stages.teacher.train.batch_size" = [16, 32]
    """))
    assert [c.id for c in plan.cells][:3] == [
        "temperature=2.0-epochs=1-batch_size=16",
        "temperature=2.0-epochs=1-batch_size=32",
        "temperature=2.0-epochs=2-batch_size=16",
    ]
    assert len(plan.cells) == 8 and len({c.id for c in plan.cells}) == 8
    first = plan.cells[0]
    assert first.overrides == {"train.epochs": 1, "stages.student.loss.temperature": 2.0, "stages[0].train.epochs": 1,
                               "stages.student.train.epochs": 1, "stages.teacher.train.batch_size": 16}
    assert first.override_args()[:2] == ["train.epochs=1", "stages.student.loss.temperature=2.0"]
    assert first.folder == first.id and plan.seeds == [0, 1]


def test_a_recipe_list_is_an_axis_and_a_single_cell_is_named_by_its_recipe(sweep_file, tmp_path):
    (tmp_path / "other.toml").write_text(TINY_RECIPE)
    plan = load_sweep(sweep_file("""
        [sweep]
        name = "t"
        recipe = ["tiny.toml", "other.toml"]
        [grid]
        "stages.student.loss.temperature" = [2.0, 4.0]
    """))
    assert [c.id for c in plan.cells] == ["tiny-temperature=2.0", "tiny-temperature=4.0", "other-temperature=2.0",
                                          "other-temperature=4.0"]
    assert plan.cells[2].recipe_path == str(tmp_path / "other.toml")
    single = load_sweep(sweep_file('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n'))
    assert [c.id for c in single.cells] == ["tiny"] and single.seeds == [0]


def test_baselines_pick_one_cell_or_a_stage(sweep_file):
    plan = load_sweep(sweep_file("""
        [sweep]
        name = "t"
        recipe = "tiny.toml"
        baseline = [{ "stages.student.loss.temperature" = 4.0 }, { stage = "teacher" },
                    { "stages.student.loss.temperature" = 2.0, stage = "student" }]
        [grid]
        "stages.student.loss.temperature" = [2.0, 4.0]
    """))
    assert [(b.label, b.cell, b.stage) for b in plan.baselines] == [
        ("temperature=4.0", "temperature=4.0", None), ("teacher", None, "teacher"),
        ("temperature=2.0/student", "temperature=2.0", "student")]


BAD_FILES = {
    "unknown section": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[grids]\nx = [1]\n', "grids", "unknown section"),
    "no sweep table": ('[grid]\n"train.epochs" = [1]\n', "sweep", "[sweep] table is missing"),
    "no recipe": ('[sweep]\nname = "t"\n', "sweep.recipe", "required key is missing"),
    "misspelt key": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nseed = [1]\n', "sweep.seed", "did you mean 'seeds'"),
    "repeated seeds": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nseeds = [1, 1]\n', "sweep.seeds", "seeds repeat"),
    "no seeds": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nseeds = []\n', "sweep.seeds", "at least one seed"),
    "bad name": ('[sweep]\nname = "a b"\nrecipe = "tiny.toml"\n', "sweep.name", "not a usable name"),
    "grid value not a list": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[grid]\n"train.epochs" = 3\n', 'grid."train.epochs"', "non-empty list"),
    "grid value repeats": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[grid]\n"train.epochs" = [1, 1]\n', 'grid."train.epochs"', "repeats"),
    "set and grid": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nset = { "train.epochs" = 1 }\n[grid]\n"train.epochs" = [1, 2]\n',
                     "grid.train.epochs", "both in [sweep] set and in [grid]"),
    "baseline not a grid key": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nbaseline = { "train.lr" = 1 }\n[grid]\n"train.epochs" = [1, 2]\n',
                                "sweep.baseline.train.lr", "not a [grid] key"),
    "baseline value not in the grid": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nbaseline = { "train.epochs" = 3 }\n[grid]\n'
                                       '"train.epochs" = [1, 2]\n', "sweep.baseline.train.epochs", "3 is not one of the grid's values [1, 2]"),
    "baseline matches two cells": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nbaseline = { "train.epochs" = 1 }\n[grid]\n'
                                   '"train.epochs" = [1, 2]\n"train.batch_size" = [8, 16]\n', "sweep.baseline", "matches 2"),
    "unknown launcher": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[launcher]\nname = "locl"\n', "launcher.name", "did you mean 'local'"),
    "bad launcher key": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[launcher]\nname = "local"\nworker = 2\n', "launcher.worker",
                         "did you mean 'workers'"),
    "bad launcher value": ('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[launcher]\nname = "local"\nworkers = 0\n', "launcher.workers", "> 0"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_sweep_files_name_the_key_and_a_fix(sweep_file, case):
    text, key, message = BAD_FILES[case]
    path = sweep_file(text)
    with pytest.raises(UserError) as error:
        load_sweep(path, registry=launchers())
    assert error.value.file == path and error.value.key == key, str(error.value)
    assert message in str(error.value) and error.value.fix


def test_an_error_in_any_cell_stops_the_sweep_before_anything_runs(sweep_file, cli, tmp_path):
    path = sweep_file("""
        [sweep]
        name = "t"
        recipe = "tiny.toml"
        [grid]
        "stages.student.loss.temperature" = [2.0, 4.0, -1.0]
    """)
    out = tmp_path / "out"
    result = cli("sweep", path, "--output", out)
    assert result.code == 1
    assert "cell 'temperature=-1.0'" in result.err and "stages[1].loss.temperature" in result.err
    assert "must be > 0" in result.err and "fix:" in result.err
    assert not out.exists()


def test_a_misspelt_grid_key_is_refused_with_the_recipe_keys(sweep_file, cli, tmp_path):
    path = sweep_file('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n[grid]\n"stages.student.loss.temprature" = [2.0]\n')
    result = cli("sweep", path, "--output", tmp_path / "out")
    assert result.code == 1 and "temprature" in result.err and "did you mean 'temperature'" in result.err


def test_a_missing_recipe_and_a_missing_sweep_file(sweep_file, cli, tmp_path):
    result = cli("sweep", sweep_file('[sweep]\nname = "t"\nrecipe = "nothere.toml"\n'), "--dry-run")
    assert result.code == 1 and "nothere.toml" in result.err and "not found" in result.err
    result = cli("sweep", tmp_path / "absent.toml", "--dry-run")
    assert result.code == 1 and "absent.toml" in result.err


def test_launcher_from_the_command_line_and_per_launcher_tables(sweep_file):
    path = sweep_file("""
        [sweep]
        name = "t"
        recipe = "tiny.toml"
        [launcher]
        name = "local"
        workers = 2
        [launcher.ray]
        num_cpus = 2
    """)
    plan = load_sweep(path, registry=launchers())
    assert plan.launcher.name == "local" and plan.launcher.params.workers == 2
    plan = load_sweep(path, launcher="ray", registry=launchers())
    assert plan.launcher.name == "ray" and plan.launcher.params.num_cpus == 2
    with pytest.raises(RecipeError, match="unknown launcher 'nope'"):
        load_sweep(path, launcher="nope", registry=launchers())


def test_dry_run_lists_cells_and_runs_and_creates_nothing(cli, tmp_path):
    out = tmp_path / "out"
    result = cli("sweep", RECIPES / "quickstart-sweep.toml", "--dry-run", "--output", out)
    assert result.code == 0, result.err
    assert "3 cell(s) x 3 seed(s) = 9 run(s)" in result.out and "local: 2 workers" in result.out
    for cell in ("temperature=2.0", "temperature=4.0", "temperature=8.0"):
        assert f"{cell}/seed-2" in result.out
    assert "stages.student-kd.loss.temperature=8.0" in result.out
    assert "compared with (paired by seed): temperature=4.0" in result.out
    assert not out.exists()


def test_a_misspelt_baseline_stage_is_refused(sweep_file, cli, tmp_path):
    path = sweep_file('[sweep]\nname = "t"\nrecipe = "tiny.toml"\nbaseline = { stage = "studnet" }\n')
    result = cli("sweep", path, "--dry-run", "--output", tmp_path / "out")
    assert result.code == 1 and "sweep.baseline" in result.err and "'studnet' is not a stage" in result.err
    assert "did you mean 'student'" in result.err


def test_an_output_that_is_a_file_is_refused(sweep_file, cli, tmp_path):
    path = sweep_file('[sweep]\nname = "t"\nrecipe = "tiny.toml"\n')
    (tmp_path / "taken").write_text("")
    result = cli("sweep", path, "--output", tmp_path / "taken")
    assert result.code == 1 and "taken: exists and is not a folder" in result.err and "fix: choose another --output" in result.err
