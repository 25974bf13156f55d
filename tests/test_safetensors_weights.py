"""Sharing weights without code (issue 24): ``pyramidkd save-weights`` writes a
stage's best weights as ``.safetensors`` with its model description and
preprocessing as JSON (metadata and a file beside it), and a teacher or
``init_from`` given as that file works like its ``.pt`` — identical logits."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine.errors import CheckpointError
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.rundir import RunDirectory
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.models import model_from_checkpoint
from pyramidkd.engine.training.sharing import run_preprocessing, save_stage_weights
from pyramidkd.engine.training.weights import METADATA_KEY


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("weights")
    testing.run_tiny(workdir=folder)
    return folder / "run"


def test_save_weights_writes_safetensors_with_the_model_description(finished, tmp_path, cli):
    out = tmp_path / "teacher.safetensors"
    result = cli("save-weights", finished, "--stage", "teacher", "--output", out)
    assert result.code == 0, result.err
    assert "model vgg (4 classes, input 3×8×8)" in result.out
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as handle:
        described = json.loads(handle.metadata()[METADATA_KEY])
    assert described == json.loads((tmp_path / "teacher.json").read_text())
    assert described["model"]["name"] == "vgg" and described["model"]["params"]["layers"] == [8, "M", 8, "M"]
    pre = described["preprocessing"]
    assert pre["dataset"] == "synthetic" and pre["input_shape"] == [3, 8, 8] and pre["num_classes"] == 4
    assert pre["class_names"] == ["class0", "class1", "class2", "class3"] and "mean" not in pre  # synthetic: no normalisation
    assert described["stage"] == "teacher" and described["epoch"] == 1


def test_a_teacher_round_trips_through_safetensors_with_identical_logits(finished):
    saved = save_stage_weights(str(finished), "teacher")
    assert saved.path == str(finished / "weights" / "teacher.safetensors")
    host = make_plugin_host()
    best = str(finished / "checkpoints" / "teacher" / "best.pt")
    original, _ = model_from_checkpoint(load_checkpoint(best), best, host)
    shared, description = model_from_checkpoint(load_checkpoint(saved.path), saved.path, host)
    images = torch.randn(6, *description["input_shape"], generator=torch.Generator().manual_seed(0))
    original.eval(), shared.eval()
    with torch.no_grad():
        assert torch.equal(original(images), shared(images))
    for name, tensor in original.state_dict().items():  # buffers too (BN statistics)
        assert torch.equal(tensor, shared.state_dict()[name]), name

@pytest.mark.parametrize("role", ["teacher", "init_from"])
def test_a_safetensors_file_is_a_teacher_or_init_from(role, finished, tmp_path, write_recipe, cli):
    shutil.copy(save_stage_weights(str(finished), "teacher").path, tmp_path / "teacher.safetensors")
    if role == "teacher":
        text = testing.tiny_recipe(teacher=False, scheme="kd", scheme_params={"teacher": "teacher.safetensors"}, name="shared")
    else:  # init_from needs the teacher's own architecture
        text = testing.tiny_recipe(teacher=False, scheme_params={"init_from": "teacher.safetensors"}, name="shared",
                           student_model=testing.TINY_TEACHER_MODEL)
    recipe = write_recipe(text)  # no JSON beside it: the metadata is enough
    checked = cli("validate", recipe)
    assert checked.code == 0, checked.err
    ran = cli("run", recipe, "--quiet", "--output", tmp_path / "out")
    assert ran.code == 0, ran.err
    result = json.loads((tmp_path / "out" / "summary.json").read_text())["stages"][0]
    if role == "teacher":
        assert result["teachers"][0]["file"].endswith("teacher.safetensors")
    else:
        assert result["inherited_tensors"] > 0


def test_a_safetensors_file_without_a_description(tmp_path, finished):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"weight": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a pyramidkd weights file"):
        load_checkpoint(str(path))
    saved = save_stage_weights(str(finished), "student", str(tmp_path))  # a folder: <stage>.safetensors in it
    state = load_checkpoint(saved.path)["state_dict"]
    save_file(state, str(path))  # re-saved by another tool: the metadata is gone, the JSON beside it is read
    shutil.copy(saved.description_path, tmp_path / "bare.json")
    assert load_checkpoint(str(path))["model"]["name"] == "vgg"
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{oops}")
    with pytest.raises(CheckpointError, match="cannot read the safetensors file"):
        load_checkpoint(str(tmp_path / "broken.safetensors"))


def test_save_weights_errors_name_the_fix(finished, tmp_path, cli):
    wrong = cli("save-weights", finished, "--stage", "nope")
    assert wrong.code == 1 and "no best checkpoint for stage 'nope'" in wrong.err and "student, teacher" in wrong.err
    suffix = cli("save-weights", finished, "--stage", "teacher", "--output", tmp_path / "teacher.pt")
    assert suffix.code == 1 and "--output must end with .safetensors" in suffix.err and "Traceback" not in suffix.err


def test_preprocessing_names_published_or_recipe_statistics(tmp_path):
    checkpoint = {"model": {"name": "vgg", "input_shape": [3, 32, 32], "num_classes": 10}, "class_names": ["a", "b"]}
    (tmp_path / "recipe.toml").write_text('[dataset]\nname = "cifar10"\nroot = "/private/data"\nimage_size = 32\n')
    published = run_preprocessing(RunDirectory(str(tmp_path)), checkpoint)
    registry_stats = make_plugin_host().registry("dataset").get("cifar10").stats
    assert published["mean"] == list(registry_stats[0]) and published["std"] == list(registry_stats[1])
    assert published["dataset_params"] == {"image_size": 32}  # local paths stay local
    assert published["class_names"] == ["a", "b"]
    (tmp_path / "recipe.toml").write_text('[dataset]\nname = "cifar10"\nmean = [0.5, 0.5, 0.5]\nstd = [0.25, 0.25, 0.25]\n')
    own = run_preprocessing(RunDirectory(str(tmp_path)), checkpoint)
    assert own["mean"] == [0.5] * 3 and own["std"] == [0.25] * 3
