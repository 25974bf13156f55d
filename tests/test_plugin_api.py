"""The built-in plugins and the example package use only the public plugin API:
``pyramidkd.engine``'s ``__all__``, the op front end ``pyramidkd.engine.ops`` and
other plugin modules (and, in the example's tests, ``pyramidkd.testing``)."""

from __future__ import annotations

import ast
import inspect
import sys
import typing
from pathlib import Path

import attrs
import pytest

import pyramidkd.engine as engine
from pyramidkd.engine import PlanContext, StageEntry

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_TREES = [ROOT / "plugins", ROOT / "examples"]
OPS = "pyramidkd.engine.ops"


def plugin_files() -> list[Path]:
    files = [path for tree in PLUGIN_TREES for path in sorted(tree.rglob("*.py"))]
    return [path for path in files if not {"build", ".venv", "__pycache__"} & set(path.parts)]


def is_example_test(path: Path) -> bool:
    return "examples" in path.parts and "tests" in path.parts


def forbidden_imports(path: Path) -> list[str]:
    """``file:line: import`` for every import of a non-public pyramidkd name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    example_test = is_example_test(path)
    allowed_modules = {"pyramidkd.engine", OPS} | ({"pyramidkd.testing"} if example_test else set())

    def allowed(module: str) -> bool:
        return module in allowed_modules or module == "pyramidkd.plugins" or module.startswith("pyramidkd.plugins.")

    bad = []
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.Import):
            found = [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "pyramidkd" and not allowed(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "pyramidkd":
            module, names = node.module, [alias.name for alias in node.names]
            if module == "pyramidkd.engine":
                found = [f"from pyramidkd.engine import {n} (not in __all__)" for n in names if n not in engine.__all__ and n != "ops"]
            elif module == "pyramidkd":
                found = [f"from pyramidkd import {n}" for n in names if not (n == "testing" and example_test)]
            elif not allowed(module):
                found = [f"from {module} import {', '.join(names)}"]
        bad += [f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {item}" for item in found]
    return bad


def test_the_checked_trees_hold_the_plugins():
    names = {path.relative_to(ROOT).as_posix() for path in plugin_files()}
    assert "plugins/schemes/pyramid.py" in names and "examples/pyramidkd-dkd/src/pyramidkd_dkd/scheme.py" in names


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_plugins_import_only_the_public_api(path):
    bad = forbidden_imports(path)
    assert not bad, "plugins may import only pyramidkd.engine's public names, pyramidkd.engine.ops and other plugins:\n" + "\n".join(bad)


def test_the_check_catches_internal_imports(tmp_path, monkeypatch):
    """The checker itself: each of these imports is refused, the public ones pass."""
    plugin = tmp_path / "plugins" / "sneaky.py"
    plugin.parent.mkdir()
    cases = {
        "from pyramidkd.engine.validation import positive": True,
        "from pyramidkd.engine import rundir": True,
        "import pyramidkd.engine.recipe": True,
        "from pyramidkd.engine.errors import UserError": True,
        "from pyramidkd import testing": True,
        "from pyramidkd.engine import positive, UserError, StageEntry, ops": False,
        "from pyramidkd.engine.ops import kd_loss": False,
        "from pyramidkd.plugins.models.vgg import POOL": False,
        "import torch": False,
    }
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for source, refused in cases.items():
        plugin.write_text(source + "\n")
        assert bool(forbidden_imports(plugin)) == refused, source


def test_every_public_name_exists():
    missing = [name for name in engine.__all__ if not hasattr(engine, name)]
    assert not missing
    assert len(set(engine.__all__)) == len(engine.__all__)


def test_schemes_need_no_raw_section_or_registries():
    """What the Pyramid scheme needed from internals is now on the public types."""
    assert "section" not in {field.name for field in attrs.fields(StageEntry)}
    for method in ("component", "train", "model_source", "model_of", "stages"):
        assert hasattr(PlanContext, method), method
    assert not hasattr(PlanContext, "registries")


# --- the planning API a scheme uses ------------------------------------------------

PROBE_RECIPE = """
loggers = ["files"]
[experiment]
device = "cpu"
[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
[train]
epochs = 3
optimizer = { name = "adam", lr = 0.01 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg", layers = [4, "M"] }

[[stages]]
id = "probe"
scheme = { name = "probe", reference = "teacher" }
model = { name = "vgg", layers = [4, "M"] }
train = { batch_size = 16 }
"""


def probe_plugin(seen: dict):
    from pyramidkd import testing
    from pyramidkd.engine import Scheme, StagePlan

    @attrs.define
    class ProbeParams:
        reference: str = ""

    class Probe(Scheme):
        name = "probe"
        Params = ProbeParams

        def plan(self, entry, context):
            seen["entry"] = entry
            seen["plain"] = context.train(entry)
            seen["defaults"] = context.train(entry, {"epochs": 9, "batch_size": 8, "grad_clip": 1.0, "optimizer": {"lr": 0.5, "momentum": 0.5}})
            seen["overrides"] = context.train(entry, overrides={"optimizer": {"lr": 0.2}}, epochs=1)
            seen["model"] = context.model_of(self.params.reference, f"{entry.key}.scheme.reference")
            seen["earlier"] = context.stages
            return [StagePlan(id=entry.id, model=entry.require_model(), loss=context.component("loss", "ce", key=f"{entry.key}.loss"),
                              train=seen["plain"])]

    return testing.plugin_module("probe_plugin", pyramidkd_register_schemes=lambda: [Probe])


def test_a_scheme_gets_settings_and_models_from_the_context(tmp_path):
    from pyramidkd import testing
    from pyramidkd.engine.runner import prepare

    path = tmp_path / "probe.toml"
    path.write_text(PROBE_RECIPE)
    seen: dict = {}
    with testing.autoload(False):
        prepare(str(path), extra_plugins=[probe_plugin(seen)])
    entry = seen["entry"]
    assert (entry.id, entry.key, entry.train.epochs, entry.train.batch_size) == ("probe", "stages[1]", 3, 16)
    plain = seen["plain"]
    assert (plain.epochs, plain.batch_size, plain.optimizer.name, plain.optimizer.lr) == (3, 16, "adam", 0.01)
    # scheme defaults apply only where neither [train] nor [stages.train] says anything
    defaults = seen["defaults"]
    assert (defaults.epochs, defaults.batch_size, defaults.grad_clip) == (3, 16, 1.0)
    assert (defaults.optimizer.lr, defaults.optimizer.momentum, defaults.optimizer.name) == (0.01, 0.5, "adam")
    # overrides go over everything, key by key; epochs last
    overrides = seen["overrides"]
    assert (overrides.optimizer.name, overrides.optimizer.lr, overrides.epochs, overrides.batch_size) == ("adam", 0.2, 1, 16)
    model = seen["model"]
    assert model.name == "vgg" and model.params["layers"] == [4, "M"] and model.input_shape is None
    assert [stage.id for stage in seen["earlier"]] == ["teacher"]


def test_model_of_a_checkpoint_reports_what_it_was_trained_on(tmp_path):
    from pyramidkd import testing
    from pyramidkd.engine.runner import prepare
    from pyramidkd.engine.training.checkpoints import save_checkpoint

    component = testing.build_component("model", "vgg", {"layers": [4, "M"]})
    save_checkpoint(str(tmp_path / "t.pt"), {
        "model": {"name": "vgg", "params": attrs.asdict(component.params), "num_classes": 4, "input_shape": [3, 8, 8]},
        "state_dict": component.build(4, (3, 8, 8)).state_dict(),
    })
    path = tmp_path / "probe.toml"
    path.write_text(PROBE_RECIPE.replace('reference = "teacher"', 'reference = "t.pt"'))
    seen: dict = {}
    with testing.autoload(False):
        prepare(str(path), extra_plugins=[probe_plugin(seen)])
    model = seen["model"]
    assert model.name == "vgg" and model.params["layers"] == [4, "M"]
    assert (model.input_shape, model.num_classes) == ((3, 8, 8), 4)
    assert model.source.path == str(tmp_path / "t.pt") and model.source.key == "stages[1].scheme.reference"


# --- the hook specifications: typed, and called in the documented order -------------


def type_checking_names(module) -> dict:
    """The module's names plus what its ``if TYPE_CHECKING:`` block imports (run here,
    so a name that does not exist fails)."""
    tree = ast.parse(inspect.getsource(module))
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    namespace = {**vars(module)}
    exec(compile(ast.Module(block.body, type_ignores=[]), module.__file__, "exec"), namespace)
    return namespace


def test_every_hookspec_is_annotated_with_real_types():
    from pyramidkd.engine import hookspecs
    from pyramidkd.engine.lifecycle import Run
    from pyramidkd.engine.records import StageResult

    namespace = type_checking_names(hookspecs)
    specs = {name: getattr(hookspecs, name) for name in dir(hookspecs) if name.startswith("pyramidkd_")}
    assert len(specs) == 14
    for name, spec in specs.items():
        hints = typing.get_type_hints(spec, globalns=namespace)
        assert set(hints) == {*inspect.signature(spec).parameters, "return"}, f"{name} is not fully annotated"
    stage_end = typing.get_type_hints(specs["pyramidkd_stage_end"], globalns=namespace)
    assert stage_end["run"] is Run and stage_end["result"] is StageResult and stage_end["stage"] is engine.StagePlan
    assert typing.get_type_hints(specs["pyramidkd_register_losses"], globalns=namespace)["return"] == list[type[engine.Loss]]


LIFECYCLE_HOOKS = ("run_start", "stage_start", "batch_end", "epoch_end", "metrics", "stage_end", "run_end")


def recorder(calls: list):
    """A plugin that records every lifecycle call as a short tuple."""

    class Recorder:
        @engine.hookimpl
        def pyramidkd_run_start(self, run):
            calls.append(("run_start",))

        @engine.hookimpl
        def pyramidkd_stage_start(self, run, stage):
            calls.append(("stage_start", stage.id))

        @engine.hookimpl
        def pyramidkd_batch_end(self, run, stage, epoch, step, num_steps, loss):
            calls.append(("batch_end", stage.id, epoch, step, num_steps))

        @engine.hookimpl
        def pyramidkd_epoch_end(self, run, stage, epoch, metrics):
            calls.append(("epoch_end", stage.id, epoch, metrics.epoch))

        @engine.hookimpl
        def pyramidkd_metrics(self, run, stage, record):
            calls.append(("metrics", stage.id, record.kind))

        @engine.hookimpl
        def pyramidkd_stage_end(self, run, stage, result):
            calls.append(("stage_end", stage.id, result.skipped))

        @engine.hookimpl
        def pyramidkd_run_end(self, run, summary):
            calls.append(("run_end", len(summary.stages)))

    return Recorder()


def documented_order(stages: list[str], epochs: int, steps: int, *, reused: bool = False) -> list[tuple]:
    """The call sequence the sketch in hookspecs.py's docstring describes."""
    calls: list[tuple] = [("run_start",)]
    for stage in stages:
        if reused:
            calls.append(("stage_end", stage, True))
            continue
        calls.append(("stage_start", stage))
        for epoch in range(1, epochs + 1):
            calls += [("batch_end", stage, epoch, step, steps) for step in range(1, steps + 1)]
            calls += [("epoch_end", stage, epoch, epoch), ("metrics", stage, "epoch")]
        calls += [("metrics", stage, "test"), ("stage_end", stage, False)]
    return calls + [("run_end", len(stages))]


def test_the_lifecycle_hooks_run_in_the_documented_order(tmp_path):
    from pyramidkd import testing
    from pyramidkd.engine import hookspecs
    from pyramidkd.engine.runner import run_recipe
    from conftest import TINY_RECIPE

    sketch = hookspecs.__doc__.split("::", 1)[1]
    assert all(f"pyramidkd_{hook}(" in sketch for hook in LIFECYCLE_HOOKS)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TINY_RECIPE)
    for reused in (False, True):  # the second run into the folder reuses both stages
        calls: list = []
        with testing.autoload(False):
            run_recipe(str(recipe), output=str(tmp_path / "run"), quiet=True, extra_plugins=[recorder(calls)])
        steps = next(call[4] for call in calls if call[0] == "batch_end") if not reused else 0
        assert steps > 1 or reused
        assert calls == documented_order(["teacher", "student"], epochs=2, steps=steps, reused=reused)
