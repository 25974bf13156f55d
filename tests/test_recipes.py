"""Recipes: validation of the file and of --set overrides, with messages that
name the file, the key and the fix (exit 1, no traceback)."""

from __future__ import annotations

import pytest

from conftest import RECIPES, TINY_RECIPE
from pyramidkd.engine.recipe import dump_toml, load_recipe, parse_key_path

STAGE_TAIL = """
[[stages]]
id = "a"
scheme = "scratch"
model = { name = "vgg", layers = [4, "M"] }
"""
HEAD = '[dataset]\nname = "synthetic"\n'

# (recipe text, --set overrides, substrings the error must contain)
MALFORMED = {
    "empty file": ("", [], ["the recipe is empty"]),
    "invalid toml": (HEAD + "[train\nepochs = 3\n" + STAGE_TAIL, [], ["invalid TOML", "line 3"]),
    "unknown section": (HEAD + "[trian]\nepochs = 2\n" + STAGE_TAIL, [], ["trian", "unknown section", "did you mean [train]?"]),
    "unknown train key": (HEAD + "[train]\nepoch = 2\n" + STAGE_TAIL, [], ["train.epoch", "unknown key 'epoch'", "did you mean 'epochs'?"]),
    "wrong type": (HEAD + '[train]\nepochs = "ten"\n' + STAGE_TAIL, [], ["train.epochs", "expected an integer", "'ten' (str)"]),
    "epochs zero": (HEAD + "[train]\nepochs = 0\n" + STAGE_TAIL, [], ["train.epochs", "must be > 0, got 0", "fix:"]),
    "batch size negative": (HEAD + "[train]\nbatch_size = -4\n" + STAGE_TAIL, [], ["train.batch_size", "must be > 0"]),
    "lr zero": (HEAD + "[train]\noptimizer = { lr = 0.0 }\n" + STAGE_TAIL, [], ["train.optimizer.lr", "must be > 0", "learning rate"]),
    "unknown optimizer": (HEAD + '[train]\noptimizer = { name = "sgdd" }\n' + STAGE_TAIL, [], ["train.optimizer.name", "one of 'sgd', 'adam', 'adamw'", "did you mean 'sgd'?"]),
    "temperature negative": (TINY_RECIPE.replace("temperature = 2.0", "temperature = -1.0"), [], ["stages[1].loss.temperature", "must be > 0, got -1.0", "softmax temperature"]),
    "alpha out of range": (TINY_RECIPE.replace("alpha = 0.7", "alpha = 1.5"), [], ["stages[1].loss.alpha", "must be in [0.0, 1.0]"]),
    "unknown loss name": (TINY_RECIPE.replace('name = "kd", temperature', 'name = "kdd", temperature'), [], ["stages[1].loss.name", "unknown loss 'kdd'", "did you mean 'kd'?"]),
    "unknown scheme shorthand": (HEAD + STAGE_TAIL.replace('scheme = "scratch"', 'scheme = "scrach"'), [], ["stages[0].scheme", "unknown scheme 'scrach'", "did you mean 'scratch'?"]),
    "unknown dataset": ('[dataset]\nname = "cifar1000"\n' + STAGE_TAIL, [], ["dataset.name", "unknown dataset 'cifar1000'"]),
    "unknown component key": (TINY_RECIPE.replace("alpha = 0.7", "alpah = 0.7"), [], ["stages[1].loss.alpah", "unknown key 'alpah'", "did you mean 'alpha'?"]),
    "missing teacher stage": (TINY_RECIPE.replace('teacher = "teacher"', 'teacher = "teachr"'), [], ["stages[1].scheme.teacher", "'teachr', which does not exist", "did you mean 'teacher'?"]),
    "teacher runs later": (
        HEAD + '[[stages]]\nid = "s"\nscheme = { name = "kd", teacher = "t" }\nmodel = "vgg"\n[[stages]]\nid = "t"\nscheme = "scratch"\nmodel = "vgg"\n',
        [],
        ["stages[0].scheme.teacher", "runs later"],
    ),
    "missing checkpoint file": (TINY_RECIPE.replace('teacher = "teacher"', 'teacher = "nowhere/best.pt"'), [], ["stages[1].scheme.teacher", "does not exist"]),
    "missing required scheme key": (TINY_RECIPE.replace('{ name = "kd", teacher = "teacher" }', '{ name = "kd" }'), [], ["stages[1].scheme.teacher", "required key is missing"]),
    "kd loss without teacher": (HEAD + STAGE_TAIL + 'loss = { name = "kd" }\n', [], ["stages[0].loss", "needs a teacher", 'scheme "kd"']),
    "no stages": (HEAD, [], ["stages", "trains nothing"]),
    "no dataset": (STAGE_TAIL, [], ["dataset", "required section is missing"]),
    "duplicate stage id": (HEAD + STAGE_TAIL + STAGE_TAIL, [], ["stages[1].id", "duplicate stage id 'a'"]),
    "unknown stage key": (HEAD + STAGE_TAIL + "epochs = 3\n", [], ["stages[0].epochs", "unknown key 'epochs'"]),
    "bad device": (HEAD + '[experiment]\ndevice = "gpu"\n' + STAGE_TAIL, [], ["experiment.device", "one of 'auto', 'cpu', 'cuda'"]),
    "bad model layers": (HEAD + STAGE_TAIL.replace('[4, "M"]', '[4, "P"]'), [], ["stages[0].model.layers", '"M" (max-pool)']),
    "override bad value": (TINY_RECIPE, ["train.epochs=0"], ["value from --set train.epochs", "must be > 0"]),
    "override stage by id": (TINY_RECIPE, ["stages.student.loss.temperature=0"], ["stages[1].loss.temperature", "--set"]),
    "override missing index": (TINY_RECIPE, ["stages[5].train.epochs=1"], ["there is no stages[5]", "2 entries"]),
    "override not key=value": (TINY_RECIPE, ["train.epochs"], ["is not KEY=VALUE"]),
    "override misspelt stage id": (TINY_RECIPE, ["stages.studnt.train.epochs=1"], ["no entry with id 'studnt'", "ids: teacher, student", "did you mean 'student'?"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_recipe_gives_a_clear_error(case, write_recipe, cli):
    text, overrides, expected = MALFORMED[case]
    recipe = write_recipe(text)
    args = ["validate", recipe]
    for override in overrides:
        args += ["--set", override]
    result = cli(*args)
    assert result.code == 1, (result.out, result.err)
    assert result.err.startswith("error: ")
    assert "Traceback" not in result.err
    for fragment in expected:
        assert fragment in result.err, f"{fragment!r} not in {result.err!r}"
    if case not in ("override not key=value", "override missing index"):
        assert str(recipe) in result.err  # the file is named


def test_missing_recipe_file(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.toml")
    assert result.code == 1
    assert "nope.toml: recipe file not found" in result.err


def test_debug_shows_the_traceback(cli, tmp_path):
    result = cli("--debug", "validate", tmp_path / "nope.toml")
    assert result.code == 1 and "Traceback" in result.err


def test_usage_error_exits_2(cli):
    assert cli("run").code == 2
    assert cli("frobnicate").code == 2
    assert cli().code == 2


def test_version(cli):
    result = cli("--version")
    assert result.code == 0 and result.out.startswith("pyramidkd ")


def test_quickstart_validates(cli):
    result = cli("validate", RECIPES / "quickstart.toml")
    assert result.code == 0, result.err
    assert "3 stage(s): teacher, student-scratch, student-kd" in result.out


def test_every_shipped_recipe_validates(cli):
    recipes = sorted(RECIPES.rglob("*.toml"))
    assert recipes
    for recipe in recipes:
        result = cli("validate", recipe)
        if result.code != 0:  # only the real datasets' files may be missing here, and the
            # teachers the cifar100-kd pairs read from runs/ (test_cifar100_kd_recipes.py trains them),
            # and the checkpoints the CIFAR-10 method table's and second study's recipes read from
            # their first commands' runs
            missing_data = result.err.startswith("error: dataset") and "not found" in result.err
            untrained_teacher = (any(f"runs/{folder}/" in result.err for folder in ("cifar100-kd/teachers", "cifar10-methods", "cifar10-study2"))
                                 and (".scheme.teacher" in result.err or ".scheme.student" in result.err))
            assert missing_data or untrained_teacher, f"{recipe}: {result.err}"


def test_overrides_apply_and_are_typed(write_recipe):
    recipe = load_recipe(str(write_recipe(TINY_RECIPE)), ["train.epochs=5", "stages.student.loss.temperature=3", "dataset.name=digits", "stages[0].train.batch_size=7"])
    assert recipe.train.epochs == 5
    assert recipe.data["stages"][1]["loss"]["temperature"] == 3
    assert recipe.dataset.name == "digits"
    assert recipe.stages[0].train_overrides == {"batch_size": 7}
    assert recipe.stages[0].train.batch_size == 7 and recipe.stages[0].train.epochs == 5
    assert recipe.overridden == {"train.epochs", "stages[1].loss.temperature", "dataset.name", "stages[0].train.batch_size"}


def test_key_paths():
    assert parse_key_path("stages[1].loss.temperature") == ["stages", 1, "loss", "temperature"]
    assert parse_key_path("stages.1.loss") == ["stages", 1, "loss"]


def test_dump_toml_round_trips(write_recipe):
    import tomllib

    recipe = load_recipe(str(write_recipe(TINY_RECIPE)))
    assert tomllib.loads(dump_toml(recipe.data)) == recipe.data


SHADOWING = TINY_RECIPE.replace('id = "teacher"\nscheme = "scratch"\n', 'id = "teacher"\nscheme = "scratch"\ntrain = { epochs = 4, optimizer = { lr = 0.1 } }\n')


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_shadowed_override_is_reported_in_one_line(command, write_recipe, cli, tmp_path):
    recipe = write_recipe(SHADOWING)
    args = [command, recipe, "--set", "train.epochs=1", "--set", "train.optimizer.lr=0.02", "--set", "train.batch_size=16"]
    if command == "run":
        args += ["--quiet", "--output", tmp_path / "run", "--set", "stages.teacher.train.epochs=1"]
    result = cli(*args)
    assert result.code == 0, result.err
    notes = [line for line in result.err.splitlines() if line.startswith("pyramidkd: --set")]
    lr = "pyramidkd: --set train.optimizer.lr=0.02 does not reach 1 stage(s) that set their own: teacher (0.1, from stages[0].train.optimizer.lr)"
    assert lr in notes
    epochs = [line for line in notes if line.startswith("pyramidkd: --set train.epochs=1")]
    if command == "validate":
        assert epochs == ["pyramidkd: --set train.epochs=1 does not reach 1 stage(s) that set their own: teacher "
                          "(4, from stages[0].train.epochs); --max-epochs N caps every stage"]
    else:  # the stage's own value set from the command line too: that one is meant
        assert epochs == []
    assert len(notes) == 1 + len(epochs)  # batch_size reaches every stage: nothing to say


def test_no_note_without_shadowing(write_recipe, cli):
    result = cli("validate", write_recipe(TINY_RECIPE), "--set", "train.epochs=1", "--set", "stages.student.train.epochs=3")
    assert result.code == 0 and "--set" not in result.err


def test_a_scheme_setting_shadowing_an_override_is_named(write_recipe):
    """A Pyramid scheme's stage1_epochs beats --set train.epochs for its hint stages."""
    from pyramidkd.engine.shadowing import shadowed_overrides
    from pyramidkd.engine.runner import prepare

    text = TINY_RECIPE.replace('[[stages]]\nid = "student"', '[[stages]]\nid = "chain"\nscheme = { name = "pyramid-forward", teacher = "teacher", '
                               'width = 0.0625, levels = ["svgg14"], stage1_epochs = 2 }\n\n[[stages]]\nid = "student"')
    text = text.replace('model = { name = "vgg", layers = [8, "M", 16, "M"] }', 'model = { name = "vgg19", width = 0.0625, batch_norm = false }')
    text = text.replace("image_size = 8", "image_size = 32")
    prepared = prepare(str(write_recipe(text)), ["train.epochs=3"])
    assert [s.train.epochs for s in prepared.stages] == [3, 2, 3, 3]
    assert prepared.notes == shadowed_overrides(prepared.recipe, prepared.stages) == [
        "--set train.epochs=3 does not reach 1 stage(s) that set their own: chain.svgg14.hint "
        "(2, from scheme 'pyramid-forward' of stages[1]); --max-epochs N caps every stage"
    ]


def test_max_epochs_caps_every_stage_and_counts_for_the_notes(write_recipe):
    from pyramidkd.engine.runner import prepare

    recipe = str(write_recipe(SHADOWING))
    capped = prepare(recipe, ["train.epochs=1"], max_epochs=1)
    assert [stage.train.epochs for stage in capped.stages] == [1, 1] and capped.notes == []
    loose = prepare(recipe, ["train.epochs=1"], max_epochs=3)
    assert [stage.train.epochs for stage in loose.stages] == [3, 1]
    assert loose.notes == ["--set train.epochs=1 does not reach 1 stage(s) that set their own: teacher "
                           "(3, from stages[0].train.epochs); --max-epochs N caps every stage"]
