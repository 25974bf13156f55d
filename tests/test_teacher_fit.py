"""A teacher or ``init_from`` checkpoint trained on images of another shape or
another class count than the run's dataset is refused before anything trains,
with one error naming the stage, the checkpoint, both shapes and class counts, and
the fix (it used to crash deep inside PyTorch: max_pool2d, or "mat1 and mat2 shapes
cannot be multiplied")."""

from __future__ import annotations

import attrs
import pytest

from pyramidkd import testing
from pyramidkd.engine import CheckpointError, DataSplits, Dataset, hookimpl
from pyramidkd.engine.training.checkpoints import save_checkpoint

TINY_VGG = {"layers": [4, "M", 4, "M"]}


def write_checkpoint(path, *, shape, classes, model="vgg", params=None):
    """A pyramidkd checkpoint of ``model`` built for ``shape`` images and ``classes``."""
    component = testing.build_component("model", model, params if params is not None else TINY_VGG)
    network = component.build(classes, tuple(shape))
    save_checkpoint(str(path), {
        "model": {"name": model, "params": attrs.asdict(component.params), "num_classes": classes, "input_shape": list(shape)},
        "state_dict": network.state_dict(),
        "stage": "teacher",
        "epoch": 1,
        "val_acc": 0.5,
    })
    return path


def recipe_text(dataset: str, stages: str) -> str:
    return f"""
loggers = ["files"]
[experiment]
name = "fit"
device = "cpu"
threads = 1
[dataset]
{dataset}
[train]
epochs = 1
batch_size = 16
scheduler = {{ name = "none" }}
{stages}
"""


SYNTHETIC_1x16 = 'name = "synthetic"\nnum_classes = 10\nchannels = 1\nimage_size = 16\ntrain_size = 32\nval_size = 16\ntest_size = 16'
STUDENT = 'model = { name = "vgg", layers = [4, "M"] }'


@pytest.fixture
def cifar_shaped(tmp_path):
    """A checkpoint trained on 3×32×32 images with 10 classes (CIFAR's shape)."""
    return write_checkpoint(tmp_path / "cifar-teacher.pt", shape=(3, 32, 32), classes=10)


def check_message(text: str, *, stage: str, checkpoint, theirs: str, ours: str, key: str) -> None:
    assert "Traceback" not in text
    for fragment in (f"stage {stage!r}", str(checkpoint), theirs, ours, key, "fix:"):
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_a_teacher_of_another_shape_is_refused_by_validate_and_run(cifar_shaped, write_recipe, cli, tmp_path):
    recipe = write_recipe(recipe_text(SYNTHETIC_1x16, f"""
[[stages]]
id = "student"
scheme = {{ name = "kd", teacher = "{cifar_shaped}" }}
{STUDENT}
"""))
    result = cli("validate", recipe)
    assert result.code == 1 and result.err.startswith("error: ")
    check_message(result.err, stage="student", checkpoint=cifar_shaped, theirs="3×32×32 images with 10 classes",
                  ours="1×16×16 images with 10 classes", key="stages[0].scheme.teacher")
    assert result.err.count("error:") == 1
    out = tmp_path / "run"
    result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 1 and "3×32×32 images with 10 classes" in result.err and "Traceback" not in result.err
    assert not (out / "checkpoints").exists()  # nothing trained


def test_the_issue_case_a_cifar_teacher_on_digits(cifar_shaped, write_recipe, cli):
    recipe = write_recipe(recipe_text('name = "digits"\nimage_size = 16', f"""
[[stages]]
id = "student-kd"
scheme = {{ name = "kd", teacher = "{cifar_shaped}" }}
{STUDENT}
"""))
    result = cli("validate", recipe)
    assert result.code == 1
    check_message(result.err, stage="student-kd", checkpoint=cifar_shaped, theirs="3×32×32", ours="3×16×16", key="stages[0].scheme.teacher")


def test_another_class_count_and_init_from(tmp_path, write_recipe, cli):
    four = write_checkpoint(tmp_path / "four.pt", shape=(1, 16, 16), classes=4)
    recipe = write_recipe(recipe_text(SYNTHETIC_1x16, f"""
[[stages]]
id = "warm"
scheme = {{ name = "scratch", init_from = "{four}" }}
{STUDENT}
"""))
    result = cli("validate", recipe)
    assert result.code == 1
    check_message(result.err, stage="warm", checkpoint=four, theirs="1×16×16 images with 4 classes",
                  ours="1×16×16 images with 10 classes", key="stages[0].scheme.init_from")
    assert "init_from" in result.err


def test_one_mismatching_teacher_of_an_ensemble(tmp_path, write_recipe, cli):
    good = write_checkpoint(tmp_path / "good.pt", shape=(1, 16, 16), classes=10)
    bad = write_checkpoint(tmp_path / "bad.pt", shape=(1, 8, 8), classes=10)
    recipe = write_recipe(recipe_text(SYNTHETIC_1x16, f"""
[[stages]]
id = "ens"
scheme = {{ name = "ensemble", teachers = ["{good}", "{bad}"] }}
{STUDENT}
"""))
    result = cli("validate", recipe)
    assert result.code == 1
    check_message(result.err, stage="ens", checkpoint=bad, theirs="1×8×8", ours="1×16×16", key="stages[0].scheme.teachers[1]")
    assert str(good) not in result.err


def test_a_pyramid_chain_from_a_checkpoint_teacher(tmp_path, write_recipe, cli):
    vgg19 = {"width": 0.0625, "batch_norm": True}
    teacher = write_checkpoint(tmp_path / "vgg19.pt", shape=(3, 32, 32), classes=10, model="vgg19", params=vgg19)
    dataset = 'name = "synthetic"\nnum_classes = 10\nimage_size = 64\ntrain_size = 32\nval_size = 16\ntest_size = 16'
    recipe = write_recipe(recipe_text(dataset, f"""
[[stages]]
id = "fwd"
scheme = {{ name = "pyramid-forward", teacher = "{teacher}", width = 0.0625, batch_norm = true, levels = ["svgg14"] }}
"""))
    result = cli("validate", recipe)
    assert result.code == 1
    check_message(result.err, stage="fwd.svgg14.hint", checkpoint=teacher, theirs="3×32×32", ours="3×64×64", key="stages[0].scheme.teacher")


def test_a_fitting_checkpoint_and_stage_teachers_pass(tmp_path, write_recipe, cli):
    fitting = write_checkpoint(tmp_path / "fits.pt", shape=(1, 16, 16), classes=10)
    recipe = write_recipe(recipe_text(SYNTHETIC_1x16, f"""
[[stages]]
id = "teacher"
scheme = "scratch"
model = {{ name = "vgg", layers = [4, "M", 4, "M"] }}

[[stages]]
id = "from-stage"
scheme = {{ name = "kd", teacher = "teacher" }}
{STUDENT}

[[stages]]
id = "from-file"
scheme = {{ name = "kd", teacher = "{fitting}", init_from = "{fitting}" }}
model = {{ name = "vgg", layers = [4, "M", 4, "M"] }}
"""))
    result = cli("validate", recipe)
    assert result.code == 0, result.err


@attrs.define
class OpaqueParams:
    image_size: int = 16


class Opaque(Dataset):
    """A dataset that cannot tell its shape without loading (data_shape: None)."""

    name = "opaque"
    Params = OpaqueParams

    def load(self, context):
        import torch

        size = self.params.image_size

        def split(n):
            return torch.utils.data.TensorDataset(torch.randn(n, 1, size, size), torch.randint(0, 10, (n,)))

        return DataSplits(split(32), split(16), split(16), 10, (1, size, size))


@hookimpl
def pyramidkd_register_datasets():
    return [Opaque]


def test_a_dataset_that_tells_its_shape_only_when_loaded(cifar_shaped, tmp_path):
    """Planning cannot check it; the run checks the loaded data before training."""
    import sys

    from pyramidkd.engine.runner import prepare

    plugin = sys.modules[__name__]
    path = tmp_path / "opaque.toml"
    path.write_text(recipe_text('name = "opaque"', f"""
[[stages]]
id = "student"
scheme = {{ name = "kd", teacher = "{cifar_shaped}" }}
{STUDENT}
"""))
    with testing.autoload(False):
        prepared = prepare(str(path), extra_plugins=[plugin])
    data = prepared.dataset.instantiate().load(None)
    with pytest.raises(CheckpointError) as raised:
        prepared.check_data(data)
    check_message(str(raised.value), stage="student", checkpoint=cifar_shaped, theirs="3×32×32 images with 10 classes",
                  ours="1×16×16 images with 10 classes", key="stages[0].scheme.teacher")
    with pytest.raises(CheckpointError, match="3×32×32 images with 10 classes"):
        testing.run_tiny(str(path), extra_plugins=[plugin], workdir=tmp_path / "work")
    assert not (tmp_path / "work" / "run" / "checkpoints").exists()
