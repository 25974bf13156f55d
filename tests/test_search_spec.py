"""The search file is validated like recipes and sweep files: every bad key gets
the file, the key and a fix (did-you-mean where a name is close), each space key
is tried in the recipe through the --set path, test accuracy is refused as a
metric, and the example search file stays valid."""

from __future__ import annotations

import textwrap

import pytest

from conftest import RECIPES, TINY_RECIPE
from pyramidkd.engine.errors import RecipeError
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.search.spec import check_search, load_search

SPACE = '"stages.student.loss.temperature" = { low = 1.0, high = 8.0, log = true }'


def write(tmp_path, search: str = "", space: str = SPACE, extra: str = "") -> str:
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    path = tmp_path / "search.toml"
    head = 'name = "s"\nrecipe = "tiny.toml"\n' + textwrap.dedent(search)
    path.write_text(f"[search]\n{head}\n[space]\n{textwrap.dedent(space)}\n{textwrap.dedent(extra)}")
    return str(path)


def error_of(path: str, check: bool = False) -> RecipeError:
    with pytest.raises(RecipeError) as caught:
        plan = load_search(path, registry=make_plugin_host().registry("launcher"))
        if check:
            check_search(plan)
    return caught.value


@pytest.mark.parametrize("search, space, extra, key, message, fix", [
    ("", SPACE, "[spaces]\n", "spaces", "unknown section", "did you mean [space]?"),
    ('metric = "test_acc"\n', SPACE, "", "search.metric", "never selects on test data", "best_val_acc"),
    ('metric = "best_val_ac"\n', SPACE, "", "search.metric", "unknown metric", "did you mean 'best_val_acc'?"),
    ('sampler = "tpee"\n', SPACE, "", "search.sampler", "expected one of", "did you mean 'tpe'?"),
    ('seeds = [0]\nfinal_seeds = [0, 100]\n', SPACE, "", "search.final_seeds", "also search seeds", "final_seeds = [100"),
    ('trials = 0\n', SPACE, "", "search.trials", "must be > 0", "trials"),
    ("", '"stages.student.loss.temperature" = { low = 1.0 }', "", 'space."stages.student.loss.temperature".high',
     "required key is missing", "low = 1.0, high = 8.0"),
    ("", '"stages.student.loss.temperature" = { low = 4.0, high = 2.0 }', "", 'space."stages.student.loss.temperature"',
     "low must be below high", "swap"),
    ("", '"stages.student.loss.temperature" = { low = 0.0, high = 2.0, log = true }', "",
     'space."stages.student.loss.temperature".low', "log scale needs low > 0", "set low above 0"),
    ("", '"stages.student.loss.alpha" = { low = 0.1, high = 0.9, step = 0.3 }', "", 'space."stages.student.loss.alpha".step',
     "does not divide", "high = 0.7"),
    ("", '"stages.student.loss.temperature" = { low = 1.0, high = 2.0, stpe = 0.5 }', "",
     'space."stages.student.loss.temperature".stpe', "unknown key 'stpe'", "did you mean 'step'?"),
    ("", '"stages.student.loss.temperature" = [2.0, 4.0]', "", 'space."stages.student.loss.temperature"',
     "a search space needs a distribution", "choices = [2.0, 4.0]"),
    ("", '"stages.student.loss.temperature" = 2.0', "", 'space."stages.student.loss.temperature"',
     "a fixed value goes in [search] set", "low = 1.0"),
    ('sampler = "grid"\n', SPACE, "", 'space."stages.student.loss.temperature"', "finite set of values", "step"),
    ('set = { "stages.student.loss.temperature" = 2.0 }\n', SPACE, "", 'space."stages.student.loss.temperature"',
     "both in [search] set and in [space]", "one of them"),
    ('pruner = "median"\ndirection = "minimize"\n', SPACE, "", "search.pruner", "direction is minimize", 'pruner = "none"'),
])
def test_each_bad_key_names_the_file_the_key_and_a_fix(tmp_path, search, space, extra, key, message, fix):
    path = write(tmp_path, search, space, extra)
    error = error_of(path)
    assert error.file == path and error.key == key
    assert message in error.message and fix in error.fix, (error.message, error.fix)


@pytest.mark.parametrize("search, space, key, message, fix", [
    ("", '"stages.student.loss.temprature" = { low = 1.0, high = 8.0 }', 'space."stages.student.loss.temprature"',
     "unknown key 'temprature'", "did you mean 'temperature'?"),
    ("", '"stages.studnt.loss.alpha" = { low = 0.1, high = 0.9 }', 'space."stages.studnt.loss.alpha"',
     "no entry with id 'studnt'", "did you mean 'student'?"),
    ("", '"stages.student.loss.temperature" = { low = 0.0, high = 4.0 }', 'space."stages.student.loss.temperature"',
     "temperature = 0.0 does not fit the recipe", "positive"),
    ("", '"stages.student.loss.alpha" = { choices = [0.5, 1.5] }', 'space."stages.student.loss.alpha"',
     "alpha = 1.5 does not fit", "alpha"),
    ('stage = "studnt"\n', SPACE, "search.stage", "not a stage of tiny.toml", "did you mean 'student'?"),
    ('set = { "train.epocs" = 2 }\n', SPACE, "search.set", "unknown key 'epocs'", "did you mean 'epochs'?"),
])
def test_every_space_key_is_tried_in_the_recipe(tmp_path, search, space, key, message, fix):
    path = write(tmp_path, search, space)
    error = error_of(path, check=True)
    assert error.file == path and error.key == key
    assert message in error.message and fix in error.fix, (error.message, error.fix)


def test_a_good_file_is_planned_with_its_defaults(tmp_path):
    space = SPACE + '\n"stages.student.loss.alpha" = { low = 0.1, high = 0.9, step = 0.2 }\n"train.epochs" = { low = 1, high = 3 }\n'
    plan = load_search(write(tmp_path, space=space), registry=make_plugin_host().registry("launcher"))
    check_search(plan)
    assert plan.stage == "student" and plan.seeds == [0] and plan.section.final_seeds == [100, 101, 102]
    temperature, alpha, epochs = plan.space
    assert (temperature.kind, temperature.log, alpha.kind, epochs.kind) == ("float", True, "float", "int")
    assert alpha.grid_values() == [0.1, 0.3, 0.5, 0.7, 0.9] and epochs.grid_values() == [1, 2, 3]
    assert plan.launcher.cls.name == "local"


def test_the_command_prints_the_error_and_the_example_dry_runs(tmp_path, cli):
    bad = write(tmp_path, 'metric = "test_acc"\n')
    result = cli("search", bad, "--dry-run")
    assert result.code == 1 and f"{bad}: search.metric:" in result.err and "fix:" in result.err
    result = cli("search", RECIPES / "quickstart-search.toml", "--dry-run", "--output", tmp_path / "qs")
    assert result.code == 0, result.err
    assert "selects on best_val_acc of stage 'student-kd'" in result.out and "stages.student-kd.loss.alpha" in result.out
    assert not (tmp_path / "qs").exists()  # a dry run writes nothing


def test_validate_checks_a_search_file(cli, tmp_path):
    """`pyramidkd validate SEARCH.toml` runs the search's checks, like `search --dry-run`."""
    from conftest import RECIPES

    checked = cli("validate", RECIPES / "quickstart-search.toml")
    assert checked.code == 0, checked.err
    assert "quickstart-search.toml: ok" in checked.out and "stages.student-kd.loss.temperature" in checked.out
    bad = tmp_path / "bad.toml"
    bad.write_text((RECIPES / "quickstart-search.toml").read_text().replace('"best_val_acc"', '"test_acc"')
                   .replace('recipe = "quickstart.toml"', f'recipe = "{RECIPES / "quickstart.toml"}"'))
    refused = cli("validate", bad)
    assert refused.code == 1 and "search.metric" in refused.err
