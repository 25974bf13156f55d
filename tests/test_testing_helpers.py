"""pyramidkd.testing: the helpers plugin authors test with."""

from __future__ import annotations

import json
import os
import sys
import tomllib

import attrs
import pytest
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine import Loss, RecipeError
from pyramidkd.engine.host import DISABLE_AUTOLOAD_ENV


@attrs.define
class SoftParams:
    temperature: float = 2.0


class SoftTargets(Loss):
    """Cross-entropy with the teacher's softened probabilities."""

    name = "soft-targets"
    Params = SoftParams
    needs_teacher = True

    def forward(self, student, teachers, targets):
        T = self.params.temperature
        return -(F.softmax(teachers[0].logits / T, 1) * F.log_softmax(student.logits / T, 1)).sum(1).mean()


class ZeroLoss(Loss):
    name = "zero"

    def forward(self, student, teachers, targets):
        return student.logits.sum() * 0


class VectorLoss(Loss):
    name = "vector"

    def forward(self, student, teachers, targets):
        return F.cross_entropy(student.logits, targets, reduction="none")


SOFT = testing.plugin_module("soft_plugin", pyramidkd_register_losses=lambda: [SoftTargets])


def test_tiny_recipe_is_tiny():
    data = tomllib.loads(testing.TINY_RECIPE)
    assert data["dataset"]["name"] == "synthetic" and data["dataset"]["image_size"] == 8
    assert data["train"]["epochs"] == 1 and data["experiment"]["device"] == "cpu"
    teacher, student = data["stages"]
    assert teacher["scheme"] == "scratch"
    assert student["scheme"] == {"name": "kd", "teacher": "teacher"}
    assert student["model"] == {"name": "vgg", "layers": [4, "M"]}
    assert "loss" not in student  # the scheme's default


def test_tiny_recipe_points_at_a_loss_and_scheme():
    data = tomllib.loads(testing.tiny_recipe(loss="soft-targets", loss_params={"temperature": 3.0}, scheme="kd", epochs=2))
    assert data["stages"][1]["loss"] == {"name": "soft-targets", "temperature": 3.0}
    assert data["train"]["epochs"] == 2
    alone = tomllib.loads(testing.tiny_recipe(teacher=False, loss="ce", loggers=[]))
    assert [s["id"] for s in alone["stages"]] == ["student"] and alone["stages"][0]["scheme"] == {"name": "scratch"}
    assert alone["loggers"] == []
    with pytest.raises(ValueError, match="loss_params needs loss"):
        testing.tiny_recipe(loss_params={"alpha": 0.5})


def test_make_host_adds_plugins_to_the_builtins():
    host = testing.make_host(SOFT)
    assert host.registry("loss").provider("soft-targets") == "soft_plugin"
    assert "kd" in host.registry("loss") and "soft-targets" not in testing.make_host().registry("loss")


def test_make_host_ignores_installed_plugins_unless_asked(tmp_path, monkeypatch):
    (tmp_path / "helper_fake_plugin.py").write_text(
        "from pyramidkd.engine import Loss, hookimpl\n"
        "class Fake(Loss):\n    name = 'fake-installed'\n    def forward(self, s, t, y):\n        return s.logits.mean()\n"
        "@hookimpl\ndef pyramidkd_register_losses():\n    return [Fake]\n"
    )
    info = tmp_path / "helper_fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: helper-fake\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[pyramidkd]\nhelperfake = helper_fake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    assert "fake-installed" not in testing.make_host().registry("loss")
    assert "fake-installed" in testing.make_host(entry_points=True).registry("loss")
    sys.modules.pop("helper_fake_plugin", None)


def test_autoload_sets_and_restores_the_environment(monkeypatch):
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    with testing.autoload(False):
        assert os.environ[DISABLE_AUTOLOAD_ENV] == "1"
    assert DISABLE_AUTOLOAD_ENV not in os.environ
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "yes")
    with testing.autoload(True):
        assert DISABLE_AUTOLOAD_ENV not in os.environ
    assert os.environ[DISABLE_AUTOLOAD_ENV] == "yes"


def test_build_component_validates_like_a_recipe():
    loss = testing.build_component("loss", "kd", {"temperature": 2.0, "alpha": 0.5})
    assert loss.params.temperature == 2.0 and loss.params.alpha == 0.5
    with pytest.raises(RecipeError) as error:
        testing.build_component("loss", "kd", {"temperature": -1.0})
    assert "loss.temperature" in str(error.value) and "must be > 0" in str(error.value)
    with pytest.raises(RecipeError, match="unknown loss 'soft-targets'"):
        testing.build_component("loss", "soft-targets")
    assert isinstance(testing.build_component("loss", "soft-targets", extra_plugins=[SOFT]), SoftTargets)
    model = testing.build_component("model", "vgg", {"layers": [4, "M"]})
    assert model.build(3, (3, 8, 8)) is not None


def test_random_outputs_look_like_what_a_loss_receives():
    student, teachers, targets = testing.random_outputs(6, 5, teachers=2, seed=4)
    assert student.logits.shape == (6, 5) and student.logits.requires_grad
    assert len(teachers) == 2 and not teachers[0].logits.requires_grad
    assert targets.shape == (6,) and int(targets.max()) < 5
    again, _, _ = testing.random_outputs(6, 5, teachers=2, seed=4)
    assert (again.logits == student.logits).all()


def test_check_loss():
    assert testing.check_loss(SoftTargets()) > 0
    assert testing.check_loss(testing.build_component("loss", "ce")) > 0
    with pytest.raises(AssertionError, match="gradient is zero"):
        testing.check_loss(ZeroLoss())
    with pytest.raises(AssertionError, match="not a scalar"):
        testing.check_loss(VectorLoss())


def test_run_tiny_default_recipe():
    summary = testing.run_tiny()
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "student"]
    assert [s["loss"] for s in summary["stages"]] == ["ce", "kd"]
    assert summary["dataset"]["input_shape"] == [3, 8, 8]
    assert not os.path.exists(os.path.dirname(summary["recipe"]))  # the temporary folder is gone


def test_run_tiny_with_a_plugin_overrides_and_a_kept_folder(tmp_path):
    recipe = testing.tiny_recipe(loss="soft-targets", loss_params={"temperature": 3.0})
    summary = testing.run_tiny(recipe, extra_plugins=[SOFT], overrides=["train.epochs=2"], workdir=tmp_path)
    student = summary["stages"][-1]
    assert student["loss"] == "soft-targets" and student["epochs"] == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["stages"][-1]["loss"] == "soft-targets"
    assert (tmp_path / "recipe.toml").read_text() == recipe


def test_run_tiny_from_a_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(testing.tiny_recipe(teacher=False))
    summary = testing.run_tiny(path, workdir=tmp_path / "work")
    assert [s["stage"] for s in summary["stages"]] == ["student"]
    assert summary["recipe"] == str(path)
    with pytest.raises(FileNotFoundError):
        testing.run_tiny(str(tmp_path / "missing.toml"))
