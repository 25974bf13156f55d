"""What a new user sees for bad input: every independent error of a file at once,
suggestions that rank whole words over spelling, sweep baselines that point at the
real mistake, plural type names, and install commands that fit the installation."""

from __future__ import annotations

import textwrap
from typing import Literal

import pytest

from conftest import TINY_RECIPE
from pyramidkd.engine import errors as errors_module
from pyramidkd.engine.errors import RecipeError, RecipeErrors, install_hint, suggest
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.recipe import load_recipe
from pyramidkd.engine.sweeps.spec import load_sweep
from pyramidkd.engine.validation import describe_type


def broken(text: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new, 1)
    return text


def test_every_independent_error_of_a_recipe_is_reported_at_once(write_recipe, cli):
    path = write_recipe(broken(TINY_RECIPE, ("epochs = 2", "epoch = 2"), ("batch_size = 32", 'batch_size = "32"'),
                               ("temperature = 2.0", "temprature = 2.0"), ('scheme = "scratch"', 'scheme = "scratch"\nfoo = 1')))
    result = cli("validate", path)
    assert result.code == 1
    text = result.err
    assert f"{path}: 4 errors" in text
    for number, key, fix in [(1, "train.epoch", "did you mean 'epochs'?"), (2, "train.batch_size", "write a whole number"),
                             (3, "stages[0].foo", "scheme-specific keys go in [stages.scheme]"), (4, "stages[1].loss.temprature", "did you mean 'temperature'?")]:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{number}. {key}:"))
        fix_line = text.splitlines()[text.splitlines().index(line) + 1]
        assert fix_line.strip().startswith("fix:") and fix in fix_line, text


def test_load_recipe_alone_raises_all_host_key_errors_and_one_error_as_before(write_recipe):
    path = write_recipe(broken(TINY_RECIPE, ("epochs = 2", "epochs = 0"), ('lr = 0.05', 'lr = -1.0')))
    with pytest.raises(RecipeErrors) as several:
        load_recipe(str(path))
    assert [error.key for error in several.value.errors] == ["train.optimizer.lr", "train.epochs"]
    single = write_recipe(broken(TINY_RECIPE, ("epochs = 2", "epochs = 0")), "single.toml")
    with pytest.raises(RecipeError) as one:
        load_recipe(str(single))
    assert not isinstance(one.value, RecipeErrors)
    assert str(one.value) == (f"{single}: train.epochs: must be > 0, got 0\n"
                              "  fix: set epochs to a positive value (number of epochs, e.g. 10)")


def test_errors_inside_an_unknown_section_are_not_reported(write_recipe):
    path = write_recipe(TINY_RECIPE + '\n[trian]\nepochs = "x"\n')
    with pytest.raises(RecipeError) as error:
        load_recipe(str(path))
    assert not isinstance(error.value, RecipeErrors)
    assert error.value.key == "trian" and "did you mean [train]?" in error.value.fix


def test_a_sweep_file_reports_every_error_at_once(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)
    path = tmp_path / "sweep.toml"
    path.write_text(textwrap.dedent("""
        [sweep]
        name = "t"
        recipe = "tiny.toml"
        seeds = []
        [grid]
        "train.epochs" = 3
        [launcher]
        name = "local"
        worker = 2
    """))
    with pytest.raises(RecipeErrors) as error:
        load_sweep(str(path), registry=make_plugin_host().registry("launcher"))
    assert [e.key for e in error.value.errors] == ["sweep.seeds", 'grid."train.epochs"', "launcher.worker"]


def test_suggestions_rank_shared_words_over_spelling(write_recipe, cli):
    assert suggest("hinton-kd", ["ce", "hint", "kd", "kd-ensemble", "dkd"]) == "kd"
    assert suggest("review-kd", ["kd", "reviewkd"]) == "reviewkd"
    assert suggest("mse_logit", ["mse", "mse-logits"]) == "mse-logits"
    assert suggest("temprature", ["temperature", "alpha"]) == "temperature"
    assert suggest("zzz", ["kd"]) is None
    path = write_recipe(broken(TINY_RECIPE, ('loss = { name = "kd"', 'loss = { name = "hinton-kd"')))
    result = cli("validate", path)
    assert "unknown loss 'hinton-kd'" in result.err and "did you mean 'kd'?" in result.err


@pytest.fixture
def sweep_file(tmp_path):
    (tmp_path / "tiny.toml").write_text(TINY_RECIPE)

    def write(baseline: str, grid: str) -> str:
        path = tmp_path / "sweep.toml"
        path.write_text(f'[sweep]\nname = "t"\nrecipe = "tiny.toml"\nbaseline = {baseline}\n[grid]\n{grid}\n')
        return str(path)

    return write


def test_a_baseline_naming_the_right_spelling_of_a_misspelt_grid_key_points_at_the_typo(sweep_file):
    path = sweep_file('{ "stages.student.loss.temperature" = 4.0 }', '"stages.student.loss.temprature" = [2.0, 4.0]')
    with pytest.raises(RecipeError) as error:
        load_sweep(path)
    assert error.value.fix.startswith("did you mean the [grid] key stages.student.loss.temprature? it is misspelt")
    assert "use one of: stages.student.loss.temprature" not in str(error.value)


def test_a_baseline_value_outside_the_grid_names_the_grid_values(sweep_file):
    path = sweep_file('{ "stages.student.loss.temperature" = 3.0 }', '"stages.student.loss.temperature" = [2.0, 4.0]')
    with pytest.raises(RecipeError) as error:
        load_sweep(path)
    assert error.value.key == "sweep.baseline.stages.student.loss.temperature"
    assert error.value.message == "3.0 is not one of the grid's values [2.0, 4.0]"


def test_type_names_read_as_english():
    assert describe_type(list[int]) == "a list of integers"
    assert describe_type(list[list[float]]) == "a list of lists of numbers"
    assert describe_type(str | list[str]) == "a string or a list of strings"
    assert describe_type(list[Literal["a", "b"]]) == "a list of values among 'a', 'b'"


def test_install_hint_fits_a_checkout_or_an_installed_package(tmp_path, monkeypatch):
    checkout = tmp_path / "checkout"
    (checkout / "engine").mkdir(parents=True)
    (checkout / ".venv").mkdir()
    (checkout / "pyproject.toml").write_text("")
    monkeypatch.setattr(errors_module, "__file__", str(checkout / "engine" / "errors.py"))
    assert install_hint("ray") == f"from the checkout {checkout}: .venv/bin/pip install -e '.[ray]'"
    monkeypatch.setattr(errors_module, "__file__", str(tmp_path / "site-packages" / "pyramidkd" / "engine" / "errors.py"))
    assert install_hint("ray") == "pip install 'pyramidkd[ray]'"
