"""Helpers for testing pyramidkd plugins: ``from pyramidkd import testing``.

A plugin author's test usually needs three things, all here:

* a plugin host with the plugin under test registered next to the built-ins
  (:func:`make_host`), or one component built and validated exactly as a recipe
  would build it (:func:`build_component`);
* a quick numerical check of a loss on random logits (:func:`random_outputs`,
  :func:`check_loss`);
* a whole run of a tiny recipe, a second or two on a CPU, that returns the run
  summary (:data:`TINY_RECIPE`, :func:`tiny_recipe`, :func:`run_tiny`).

For example, for a loss named ``"my-loss"`` in ``my_package.plugin``::

    from pyramidkd import testing
    import my_package.plugin as plugin

    def test_my_loss_trains():
        summary = testing.run_tiny(testing.tiny_recipe(loss="my-loss"), extra_plugins=[plugin])
        assert summary["stages"][-1]["loss"] == "my-loss"

Third-party plugins installed in the environment (entry points) are *not* loaded by
these helpers unless ``entry_points=True``: a test then sees exactly the built-ins
plus the plugins it passes, and an installed copy of the plugin under test cannot
clash with the one passed in ``extra_plugins``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from pyramidkd.engine.components import ModelOutput
from pyramidkd.engine.host import DISABLE_AUTOLOAD_ENV, PluginHost, make_plugin_host
from pyramidkd.engine.hookspecs import hookimpl
from pyramidkd.engine.recipe import dump_toml

__all__ = [
    "TINY_RECIPE",
    "autoload",
    "build_component",
    "check_loss",
    "make_host",
    "plugin_module",
    "random_outputs",
    "run_tiny",
    "tiny_recipe",
]

# The tiny recipe's pieces: 4 classes of 8x8 synthetic images, a VGG teacher with
# two conv layers and a one-conv student (`layers = [4, "M"]`), 1 epoch each.
TINY_DATASET = {
    "name": "synthetic",
    "num_classes": 4,
    "image_size": 8,
    "train_size": 64,
    "val_size": 32,
    "test_size": 32,
}
TINY_TEACHER_MODEL = {"name": "vgg", "layers": [8, "M", 8, "M"]}
TINY_STUDENT_MODEL = {"name": "vgg", "layers": [4, "M"]}


def tiny_recipe(
    *,
    loss: str | None = None,
    loss_params: dict | None = None,
    scheme: str | None = None,
    scheme_params: dict | None = None,
    teacher: bool = True,
    student_model: dict | None = None,
    teacher_model: dict | None = None,
    dataset: dict | None = None,
    epochs: int = 1,
    loggers: Sequence[Any] = ("files",),
    name: str = "tiny",
    seed: int = 0,
) -> str:
    """TOML text of a tiny experiment that trains in about a second on a CPU.

    With ``teacher=True`` (the default) it has two stages: ``teacher`` (scheme
    ``scratch``) and ``student``, planned by ``scheme`` (default ``"kd"``) with
    ``teacher = "teacher"`` and trained with ``loss`` (default: the scheme's own
    default loss). With ``teacher=False`` there is only ``student`` (scheme
    default ``"scratch"``). ``*_params`` are added to the component's table;
    ``student_model``, ``teacher_model`` and ``dataset`` replace those tables
    (``{"name": ..., ...}``). Point it at your loss with ``tiny_recipe(loss="my-loss")``.
    """
    stages: list[dict] = []
    student: dict[str, Any] = {"id": "student"}
    if teacher:
        stages.append({"id": "teacher", "scheme": "scratch", "model": dict(teacher_model or TINY_TEACHER_MODEL)})
        student["scheme"] = {"name": scheme or "kd", "teacher": "teacher", **(scheme_params or {})}
    else:
        student["scheme"] = {"name": scheme or "scratch", **(scheme_params or {})}
    student["model"] = dict(student_model or TINY_STUDENT_MODEL)
    if loss is not None or loss_params:
        if loss is None:
            raise ValueError("loss_params needs loss (the loss name)")
        student["loss"] = {"name": loss, **(loss_params or {})}
    stages.append(student)
    data = {
        "loggers": list(loggers),
        "experiment": {"name": name, "seed": seed, "device": "cpu"},
        "dataset": dict(dataset or TINY_DATASET),
        "train": {
            "epochs": epochs,
            "batch_size": 32,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "scheduler": {"name": "none"},
        },
        "stages": stages,
    }
    return dump_toml(data)


#: A teacher (scratch) and a student (kd, Hinton loss), 1 epoch on synthetic 8x8 images.
TINY_RECIPE = tiny_recipe()


@contextlib.contextmanager
def autoload(enabled: bool) -> Iterator[None]:
    """Switch loading of installed third-party plugins (entry points) on or off
    for the duration of a ``with`` block (sets ``PYRAMIDKD_DISABLE_PLUGIN_AUTOLOAD``)."""
    previous = os.environ.get(DISABLE_AUTOLOAD_ENV)
    if enabled:
        os.environ.pop(DISABLE_AUTOLOAD_ENV, None)
    else:
        os.environ[DISABLE_AUTOLOAD_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DISABLE_AUTOLOAD_ENV, None)
        else:
            os.environ[DISABLE_AUTOLOAD_ENV] = previous


def make_host(*plugins: object, extra_plugins: Iterable[object] = (), entry_points: bool = False) -> PluginHost:
    """A fresh plugin host: the built-ins, then ``plugins`` (modules or objects with
    ``@hookimpl`` functions). ``host.registry("loss").names()`` lists the losses."""
    return make_plugin_host(extra_plugins=[*plugins, *extra_plugins], load_entry_points=entry_points)


def plugin_module(name: str, **hooks: Callable) -> types.ModuleType:
    """A plugin made from plain functions, e.g.
    ``plugin_module("mine", pyramidkd_register_losses=lambda: [MyLoss])``."""
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, hookimpl(function))
    return module


def build_component(kind: str, name: str, params: dict | None = None, *, extra_plugins: Iterable[object] = (),
                    entry_points: bool = False, host: PluginHost | None = None):
    """An instance of the ``kind`` component ``name`` ("loss", "scheme", "model",
    "dataset", "logger"), its ``params`` validated like a recipe section (a bad
    value raises the same :class:`~pyramidkd.engine.RecipeError` a recipe gets)."""
    from pyramidkd.engine.validation import Structurer

    host = host or make_host(extra_plugins=extra_plugins, entry_points=entry_points)
    cls = host.registry(kind).get(name, key=f"{kind}.name")
    structured = Structurer("<test>").structure(cls.Params, dict(params or {}), kind)
    return cls(structured)


def random_outputs(batch: int = 8, num_classes: int = 4, *, teachers: int = 1, seed: int = 0,
                   scale: float = 3.0) -> tuple[ModelOutput, list[ModelOutput], torch.Tensor]:
    """Random ``(student, teachers, targets)`` as a loss receives them: student
    logits that require grad, teacher logits that do not, integer targets."""
    generator = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(batch, num_classes, generator=generator)).requires_grad_(True)
    teacher_outputs = [ModelOutput(scale * torch.randn(batch, num_classes, generator=generator)) for _ in range(teachers)]
    targets = torch.randint(0, num_classes, (batch,), generator=generator)
    return ModelOutput(student), teacher_outputs, targets


def check_loss(loss, batch: int = 8, num_classes: int = 4, *, teachers: int | None = None, seed: int = 0) -> float:
    """Call ``loss`` on random outputs and check the basics every loss must meet:
    a finite scalar whose gradient reaches the student's logits (finite, not all
    zero). Returns the loss value; raises ``AssertionError`` naming what failed."""
    count = teachers if teachers is not None else (1 if getattr(loss, "needs_teacher", False) else 0)
    student, teacher_outputs, targets = random_outputs(batch, num_classes, teachers=count, seed=seed)
    value = loss(student, teacher_outputs, targets)
    name = getattr(loss, "name", type(loss).__name__)
    assert isinstance(value, torch.Tensor), f"loss {name!r} returned {type(value).__name__}, not a tensor"
    assert value.dim() == 0, f"loss {name!r} returned shape {tuple(value.shape)}, not a scalar"
    assert torch.isfinite(value).item(), f"loss {name!r} is not finite: {value.item()}"
    value.backward()
    grad = student.logits.grad
    assert grad is not None, f"loss {name!r}: no gradient reaches the student's logits"
    assert torch.isfinite(grad).all().item(), f"loss {name!r}: the gradient is not finite"
    assert grad.abs().sum().item() > 0, f"loss {name!r}: the gradient is zero"
    return float(value.detach())


def run_tiny(
    recipe: str | os.PathLike | None = None,
    *,
    overrides: Sequence[str] = (),
    extra_plugins: Iterable[object] = (),
    entry_points: bool = False,
    workdir: str | os.PathLike | None = None,
    quiet: bool = True,
) -> dict:
    """Run a recipe and return its summary (the dict written to ``summary.json``).

    ``recipe`` is TOML text, or the path of a ``.toml`` file, or ``None`` for
    :data:`TINY_RECIPE`. ``overrides`` are ``--set`` values (``"train.epochs=2"``);
    ``extra_plugins`` are registered after the built-ins. Text is written to
    ``recipe.toml`` and the run goes to ``run/`` inside ``workdir``, which is kept;
    without ``workdir`` both go to a temporary folder removed afterwards.
    """
    from pyramidkd.engine.runner import run_recipe

    with contextlib.ExitStack() as stack:
        if workdir is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyramidkd-test-")))
        else:
            folder = Path(workdir)
            folder.mkdir(parents=True, exist_ok=True)
        path = _recipe_path(recipe, folder)
        stack.enter_context(autoload(entry_points))
        return run_recipe(str(path), list(overrides), output=str(folder / "run"), quiet=quiet, extra_plugins=list(extra_plugins))


def _recipe_path(recipe: str | os.PathLike | None, folder: Path) -> Path:
    if recipe is None:
        recipe = TINY_RECIPE
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith(".toml")):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe file not found: {path}")
        return path
    path = folder / "recipe.toml"
    path.write_text(recipe, encoding="utf-8")
    return path
