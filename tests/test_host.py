"""The plugin host: registration, duplicates, unknown names, entry points, check_pending."""

from __future__ import annotations

import json
import sys
import types

import pytest

from pyramidkd.engine import Loss, PluginError, RecipeError, hookimpl
from pyramidkd.engine.host import make_plugin_host


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


class ZeroLoss(Loss):
    """A loss that is always zero."""

    name = "zero"

    def forward(self, student, teachers, targets):
        return student.logits.sum() * 0


def test_builtins_are_registered_by_kind():
    host = make_plugin_host(load_entry_points=False)
    assert {"scratch", "kd"} <= set(host.registry("scheme").names())
    assert {"ce", "kd", "mse-logits"} <= set(host.registry("loss").names())
    assert {"digits", "synthetic"} <= set(host.registry("dataset").names())
    assert "vgg" in host.registry("model").names()
    assert {"console", "files"} <= set(host.registry("logger").names())
    assert host.registry("loss").provider("kd") == "pyramidkd.plugins.losses.distillation"


def test_each_call_builds_a_fresh_manager():
    extra = plugin_module("extra_zero", pyramidkd_register_losses=lambda: [ZeroLoss])
    with_extra = make_plugin_host(load_entry_points=False, extra_plugins=[extra])
    plain = make_plugin_host(load_entry_points=False)
    assert "zero" in with_extra.registry("loss")
    assert "zero" not in plain.registry("loss")
    assert with_extra.pm is not plain.pm


def test_duplicate_component_name_names_both_plugins():
    class ShadowCE(ZeroLoss):
        name = "ce"

    extra = plugin_module("shadowing_plugin", pyramidkd_register_losses=lambda: [ShadowCE])
    with pytest.raises(PluginError) as error:
        make_plugin_host(load_entry_points=False, extra_plugins=[extra])
    message = str(error.value)
    assert "'ce'" in message
    assert "pyramidkd.plugins.losses.classification" in message and "shadowing_plugin" in message


def test_unknown_name_lists_choices_and_suggests():
    host = make_plugin_host(load_entry_points=False)
    with pytest.raises(RecipeError) as error:
        host.registry("loss").get("kd2", file="r.toml", key="stages[0].loss.name")
    text = str(error.value)
    assert "r.toml: stages[0].loss.name" in text
    assert "unknown loss 'kd2'; available: " in text
    available = text.split("available: ", 1)[1].split("\n", 1)[0].split(", ")
    assert {"ce", "kd"} <= set(available) and available == sorted(available)  # every loss, in order
    assert "did you mean 'kd'?" in text


def test_non_component_class_is_rejected():
    extra = plugin_module("bad_kind", pyramidkd_register_losses=lambda: [dict])
    with pytest.raises(PluginError, match="not a subclass of Loss"):
        make_plugin_host(load_entry_points=False, extra_plugins=[extra])


def test_params_must_be_attrs():
    class Bad(ZeroLoss):
        name = "bad-params"
        Params = dict

    extra = plugin_module("bad_params", pyramidkd_register_losses=lambda: [Bad])
    with pytest.raises(PluginError, match="Params must be an attrs class"):
        make_plugin_host(load_entry_points=False, extra_plugins=[extra])


def test_check_pending_catches_a_misspelled_hook():
    extra = plugin_module("typo_plugin", pyramidkd_register_lossess=lambda: [ZeroLoss])
    with pytest.raises(PluginError) as error:
        make_plugin_host(load_entry_points=False, extra_plugins=[extra])
    assert "typo_plugin" in str(error.value)
    assert "does not exist" in str(error.value)


def test_plugin_raising_in_registration_is_named():
    def explode():
        raise RuntimeError("boom")

    extra = plugin_module("exploding", pyramidkd_register_models=explode)
    with pytest.raises(PluginError, match="'exploding' raised in pyramidkd_register_models: RuntimeError: boom"):
        make_plugin_host(load_entry_points=False, extra_plugins=[extra])


def write_fake_distribution(root, module_source: str, *, module="fake_kd_plugin", dist="fake-kd-plugin", version="1.2.3"):
    (root / f"{module}.py").write_text(module_source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[pyramidkd]\nfakekd = {module}\n")


FAKE_PLUGIN = '''
from pyramidkd.engine import Loss, hookimpl

class HalfLoss(Loss):
    """Half the logits' mean."""
    name = "half"
    def forward(self, student, teachers, targets):
        return student.logits.mean() / 2

@hookimpl
def pyramidkd_register_losses():
    return [HalfLoss]
'''


def test_entry_point_plugin_from_an_installed_distribution(tmp_path, monkeypatch, cli):
    write_fake_distribution(tmp_path, FAKE_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    host = make_plugin_host()
    assert "half" in host.registry("loss")
    assert host.registry("loss").provider("half") == "fakekd"
    assert host.origins["fakekd"].distribution == "fake-kd-plugin"

    result = cli("plugins", "--json")
    assert result.code == 0
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert rows["fakekd"]["distribution"] == "fake-kd-plugin"
    assert rows["fakekd"]["version"] == "1.2.3"
    assert rows["fakekd"]["components"] == {"loss": ["half"]}
    assert rows["pyramidkd.plugins.schemes.basic"]["components"] == {"scheme": ["kd", "scratch"]}

    # The environment variable switches third-party autoload off.
    monkeypatch.setenv("PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "half" not in make_plugin_host().registry("loss")
    sys.modules.pop("fake_kd_plugin", None)


def test_broken_entry_point_is_reported_with_its_distribution(tmp_path, monkeypatch):
    write_fake_distribution(tmp_path, "raise ImportError('needs foo')\n", module="broken_kd_plugin", dist="broken-kd")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    with pytest.raises(PluginError) as error:
        make_plugin_host()
    assert "broken-kd" in str(error.value) and "needs foo" in str(error.value)
    assert "PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD" in str(error.value)


def test_local_plugin_module_named_by_a_recipe(tmp_path, write_recipe, cli):
    (tmp_path / "my_losses.py").write_text(FAKE_PLUGIN)
    recipe = write_recipe(
        """
        [experiment]
        plugins = ["my_losses"]
        [dataset]
        name = "synthetic"
        [[stages]]
        id = "a"
        scheme = "scratch"
        model = { name = "vgg", layers = [4, "M"] }
        loss = { name = "half" }
        """
    )
    result = cli("validate", recipe)
    assert result.code == 0, result.err
    assert "loss half" in result.out
    sys.modules.pop("my_losses", None)


def test_missing_local_plugin_module(write_recipe, cli):
    recipe = write_recipe(
        """
        [experiment]
        plugins = ["not_there_module"]
        [dataset]
        name = "synthetic"
        [[stages]]
        id = "a"
        scheme = "scratch"
        model = "vgg"
        """
    )
    result = cli("validate", recipe)
    assert result.code == 1
    assert "experiment.plugins[0]" in result.err and "not_there_module" in result.err
    assert "Traceback" not in result.err


def test_hookspecs_all_have_docstrings():
    from pyramidkd.engine import hookspecs

    names = [n for n in dir(hookspecs) if n.startswith("pyramidkd_")]
    assert len(names) >= 12
    for name in names:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
