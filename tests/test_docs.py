"""docs/plugins.md documents every hook, and its examples work."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import torch

from pyramidkd import testing
from pyramidkd.engine import DatasetContext, hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
HEADING = re.compile(r"^###\s+`(pyramidkd_\w+)\((.*?)\)`\s*$", re.MULTILINE)
SECTION_PARTS = ("**When:**", "**Arguments:**", "**Returns:**", "**Example:**", "```python")


def hookspec_signatures() -> dict[str, str]:
    """Every hookspec in engine/hookspecs.py: name -> "arg, arg"."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: ", ".join(inspect.signature(function).parameters)
        for name, function in vars(hookspecs).items()
        if name.startswith("pyramidkd_") and callable(function) and hasattr(function, marker)
    }


def documented() -> dict[str, str]:
    return {match.group(1): match.group(2).replace(" ", "").replace(",", ", ") for match in HEADING.finditer(DOCS.read_text())}


def sections() -> dict[str, str]:
    text = DOCS.read_text()
    matches = list(HEADING.finditer(text))
    out = {}
    for index, match in enumerate(matches):
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        body = text[match.end():end]
        out[match.group(1)] = body.split("\n## ")[0]
    return out


def code_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.DOTALL)


def test_every_hookspec_is_documented_with_its_signature():
    specs = hookspec_signatures()
    assert len(specs) >= 12
    docs = documented()
    missing = [f"### `{name}({args})`" for name, args in specs.items() if name not in docs]
    assert not missing, f"docs/plugins.md lacks a heading for: {', '.join(missing)}"
    wrong = [f"{name}: documented ({docs[name]}), hookspec ({args})" for name, args in specs.items() if docs[name] != args]
    assert not wrong, "docs/plugins.md shows outdated arguments: " + "; ".join(wrong)


def test_no_documented_hook_is_stale():
    stale = sorted(set(documented()) - set(hookspec_signatures()))
    assert not stale, f"docs/plugins.md documents hooks that do not exist: {stale}"


def test_every_hook_section_says_when_arguments_returns_and_shows_an_example():
    for name, body in sections().items():
        for part in SECTION_PARTS:
            assert part in body, f"docs/plugins.md, section {name}: missing {part}"
        assert name in body.split("```python", 1)[1], f"docs/plugins.md, section {name}: the example does not implement {name}"


def _exec_module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = f"<docs/plugins.md:{name}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def _smoke(kind: str, cls, tmp_path) -> None:
    if kind == "loss":
        testing.check_loss(cls())
    elif kind == "model":
        model = cls().build(4, (3, 8, 8))
        assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    elif kind == "dataset":
        splits = cls().load(DatasetContext(seed=0, recipe_dir=str(tmp_path), cache_dir=str(tmp_path)))
        image, label = splits.train[0]
        assert tuple(image.shape) == tuple(splits.input_shape) and 0 <= int(label) < splits.num_classes
    elif kind == "logger":
        cls()


def test_the_examples_are_working_plugins(tmp_path, monkeypatch):
    """Every example block runs; each one with hook implementations is a valid plugin
    (check_pending passes) whose components work; the testing example passes."""
    blocks = code_blocks()
    complete = [b for b in blocks if b.startswith('"""my_plugin:')]
    assert len(complete) == 1
    monkeypatch.setitem(sys.modules, "my_plugin", _exec_module("my_plugin", complete[0]))
    checked = set()
    for index, block in enumerate(blocks):
        if "def test_" in block:
            module = _exec_module(f"docs_block_{index}", block)
            for name, function in vars(module).items():
                if name.startswith("test_"):
                    function()
            continue
        if "@hookimpl" not in block:
            _exec_module(f"docs_block_{index}", block)
            continue
        module = sys.modules["my_plugin"] if block is complete[0] else _exec_module(f"docs_block_{index}", block)
        host = testing.make_host(module)
        for kind, registry in host.registries.items():
            for entry in registry:
                if entry.plugin == module.__name__:
                    _smoke(kind, entry.cls, tmp_path)
                    checked.add((kind, entry.cls.name))
    assert {("scheme", "twice"), ("loss", "soft-targets"), ("dataset", "stripes"), ("model", "mlp"),
            ("logger", "best"), ("loss", "smooth-ce"), ("logger", "test-accuracy")} <= checked


def test_the_scheme_example_plans_two_stages(tmp_path):
    block = next(b for b in code_blocks() if 'name = "twice"' in b)
    module = _exec_module("docs_twice", block)
    recipe = tmp_path / "twice.toml"
    recipe.write_text(testing.tiny_recipe(scheme="twice"))
    from pyramidkd.engine.runner import prepare

    with testing.autoload(False):
        prepared = prepare(str(recipe), extra_plugins=[module])
    stages = {stage.id: stage for stage in prepared.stages}
    assert list(stages) == ["teacher", "student-1", "student-2"]
    assert [t.stage_id for t in stages["student-2"].teachers] == ["student-1"]
    assert stages["student-2"].entry_id == "student"


def test_the_readme_hook_table_names_only_real_hooks():
    text = (DOCS.parents[1] / "README.md").read_text()
    named = set(re.findall(r"`(pyramidkd_\w+)\(", text))
    assert named <= set(hookspec_signatures()), sorted(named - set(hookspec_signatures()))
