"""The ``torchvision`` and ``timm`` model plugins: parameter counts against the
libraries' own models, output and tap-point shapes, recipe errors, pretrained
weights (a fake download), and a checkpoint that rebuilds with no recipe.
Random init only, tiny inputs, no network."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torchvision import models
from torchvision.models._api import WeightsEnum

from pyramidkd import testing
from pyramidkd.engine import RecipeError, UserError, install_hint
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.models import model_from_checkpoint
from pyramidkd.engine.training.taps import TapRecorder


def build(name: str, params: dict, classes: int = 10, shape=(3, 32, 32)):
    return testing.build_component("model", name, params).build(classes, shape)


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def record(model, images):
    recorder = TapRecorder(model, model.tap_points(), role="student", stage_id="t")
    try:
        with torch.no_grad():
            return recorder(images)
    finally:
        recorder.close()


# --- torchvision ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_parameters_and_keys_are_torchvisions_own_model_with_the_class_count(arch):
    ours, theirs = build("torchvision", {"arch": arch}), models.get_model(arch, num_classes=10)
    assert count(ours) == count(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # pretrained state dicts load by these keys


def test_small_input_swaps_only_the_stem():
    plain, small = build("torchvision", {"arch": "resnet18"}), build("torchvision", {"arch": "resnet18", "small_input": True})
    assert count(small) == count(plain) - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3
    assert small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert plain(torch.randn(2, 3, 64, 64)).shape == (2, 10)


RESNET18 = [(64, 1), (64, 1), (128, 2), (256, 4), (512, 8)]  # feat.0 … feat.4: (channels, downsampling)
MOBILENET_V3_SMALL = [(16, 2), (16, 4), (24, 8), (48, 16), (576, 32)]
TORCHVISION_TAPS = {  # (arch, small_input, size): (stages, pooled, linear stages: preact is feat)
    ("resnet18", True, 32): (RESNET18, 512, set()),
    ("resnet18", True, 96): (RESNET18, 512, set()),
    ("resnet18", False, 96): ([(64, 4)] + [(c, 4 * s) for c, s in RESNET18[1:]], 512, set()),
    ("mobilenet_v3_small", False, 32): (MOBILENET_V3_SMALL, 1024, {1, 2, 3}),
    ("mobilenet_v3_small", False, 96): (MOBILENET_V3_SMALL, 1024, {1, 2, 3}),
    ("mobilenet_v3_small", True, 32): ([(c, max(1, s // 2)) for c, s in MOBILENET_V3_SMALL], 1024, {1, 2, 3}),
}


@pytest.mark.parametrize("arch, small_input, size", list(TORCHVISION_TAPS))
def test_torchvision_tap_points_have_the_contracts_shapes(arch, small_input, size):
    stages, pooled, linear = TORCHVISION_TAPS[arch, small_input, size]
    model = build("torchvision", {"arch": arch, "small_input": small_input}, shape=(3, size, size)).eval()
    torch.manual_seed(0)
    images = torch.randn(2, 3, size, size)
    output = record(model, images)
    depth = len(stages) - 1
    assert list(model.tap_points()) == [f"feat.{k}" for k in range(depth + 1)] + [f"preact.{k}" for k in range(1, depth + 1)] + ["pooled"]
    for k, (channels, down) in enumerate(stages):
        side = -(-size // down)
        assert output.features[f"feat.{k}"].shape == (2, channels, side, side), f"feat.{k}"
    for k in range(1, depth + 1):
        feat, preact = output.features[f"feat.{k}"], output.features[f"preact.{k}"]
        if k in linear:
            assert torch.equal(feat, preact)
        else:  # after the activation vs before it
            assert preact.shape == feat.shape and not torch.equal(feat, preact) and preact.min() < feat.min() + 1e-6
    assert output.features["pooled"].shape == (2, pooled)
    assert torch.equal(output.logits, model(images))  # tapping changes nothing


def test_resnet_preact_is_the_block_sum_before_its_relu():
    model = build("torchvision", {"arch": "resnet18", "small_input": True}).eval()
    output = record(model, torch.randn(2, 3, 32, 32))
    for k in range(1, 5):
        assert torch.equal(output.features[f"feat.{k}"], torch.relu(output.features[f"preact.{k}"]))
        assert output.features[f"preact.{k}"].min() < 0
    assert torch.equal(output.features["pooled"], output.features["feat.4"].mean((2, 3)))


@pytest.mark.parametrize("params, expected", [
    ({"arch": "resnet181"}, ["unknown torchvision arch 'resnet181'", "did you mean 'resnet18'", "model.arch"]),
    ({"arch": "fasterrcnn_resnet50_fpn"}, ["not an image classifier", "model.arch"]),
    ({"arch": "resnet18", "weights": "IMAGENET1K_V2"}, ["no weights 'IMAGENET1K_V2'", "resnet50", "IMAGENET1K_V1, DEFAULT"]),
    ({"arch": "resnet18", "weights": "ResNet50_Weights.IMAGENET1K_V2"}, ["do not belong to arch 'resnet18'", "resnet50's", "IMAGENET1K_V1"]),
    ({"arch": "vgg11", "small_input": True}, ["'vgg11' has no small-input stem", "ResNet / ResNeXt"]),
])
def test_torchvision_recipe_errors_name_the_key_and_the_fix(params, expected):
    with pytest.raises(RecipeError) as caught:
        testing.build_component("model", "torchvision", params)
    text = str(caught.value)
    assert caught.value.fix and all(part in text for part in expected), text


@pytest.fixture
def fake_download(monkeypatch):
    """torchvision's weight download replaced by a seeded 1000-class ResNet-18 state dict."""
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append(self)
        torch.manual_seed(1)
        return models.resnet18(num_classes=1000).state_dict()

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return calls


def test_weights_load_the_pretrained_body_under_a_fresh_head(fake_download):
    model = build("torchvision", {"arch": "resnet18", "weights": "IMAGENET1K_V1"})
    assert len(fake_download) == 1 and fake_download[0] is models.ResNet18_Weights.IMAGENET1K_V1
    pretrained = fake_download[0].get_state_dict()
    ours = model.state_dict()
    assert all(torch.equal(ours[key], value) for key, value in pretrained.items() if not key.startswith("fc."))
    assert ours["fc.weight"].shape == (10, 512)
    grey = build("torchvision", {"arch": "resnet18", "weights": "DEFAULT"}, shape=(1, 32, 32))
    assert torch.allclose(grey.conv1.weight, pretrained["conv1.weight"].sum(1, keepdim=True))
    small = build("torchvision", {"arch": "resnet18", "weights": "DEFAULT", "small_input": True}, shape=(1, 32, 32))
    assert small.conv1.weight.shape == (64, 1, 3, 3) and torch.equal(small.state_dict()["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])


def test_checkpoint_rebuilds_and_meta_builds_do_not_download(fake_download):
    cls = make_plugin_host().registry("model").get("torchvision")
    params = cls.Params(arch="resnet18", weights="IMAGENET1K_V1")
    assert count(cls(params).build_for_checkpoint(10, (3, 32, 32))) == count(models.resnet18(num_classes=10))
    with torch.device("meta"):
        model = cls(params).build(10, (3, 32, 32))
        assert record(model, torch.empty(2, 3, 32, 32)).features["feat.4"].shape == (2, 512, 1, 1)
    assert fake_download == []


def test_a_run_checkpoint_rebuilds_with_no_recipe(tmp_path):
    dataset = {"name": "synthetic", "num_classes": 4, "channels": 1, "image_size": 16, "train_size": 64, "val_size": 32, "test_size": 64}
    student = {"name": "torchvision", "arch": "mobilenet_v3_small", "small_input": True}
    summary = testing.run_tiny(testing.tiny_recipe(teacher=False, student_model=student, dataset=dataset), workdir=tmp_path)
    stage = summary["stages"][-1]
    path = str(tmp_path / "run" / stage["checkpoint"])
    model, description = model_from_checkpoint(load_checkpoint(path), path, make_plugin_host(load_entry_points=False))
    assert description["params"] == {"arch": "mobilenet_v3_small", "weights": "", "small_input": True}
    synthetic = testing.build_component("dataset", "synthetic", {k: v for k, v in dataset.items() if k != "name"})
    images, labels = synthetic.tensors()[2]
    with torch.no_grad():
        accuracy = (model.eval()(images).argmax(1) == labels).float().mean().item()
    assert accuracy == pytest.approx(stage["test_acc"]), json.dumps(stage)


# --- timm ----------------------------------------------------------------------------


TIMM_ARCHS = ["resnet18", "mobilenetv3_small_050"]


@pytest.mark.parametrize("arch", TIMM_ARCHS)
@pytest.mark.parametrize("size", [32, 96])
def test_timm_models_tap_their_feature_info_levels(arch, size):
    timm = pytest.importorskip("timm")
    model = build("timm", {"arch": arch}, shape=(3, size, size)).eval()
    assert count(model) == count(timm.create_model(arch, num_classes=10))
    output = record(model, torch.randn(2, 3, size, size))
    levels = model.feature_info
    assert list(model.tap_points()) == [f"feat.{k}" for k in range(len(levels))] + ["pooled"]  # no preact: timm names none
    for k, level in enumerate(levels):
        side = -(-size // level["reduction"])
        assert output.features[f"feat.{k}"].shape == (2, level["num_chs"], side, side), f"feat.{k}"
    assert output.features["pooled"].shape == (2, model.get_classifier().in_features)
    assert output.logits.shape == (2, 10)


def test_timm_grey_images_and_errors():
    pytest.importorskip("timm")
    assert build("timm", {"arch": "resnet18"}, shape=(1, 32, 32)).conv1.in_channels == 1
    with pytest.raises(RecipeError, match="did you mean 'resnet18'") as caught:
        testing.build_component("model", "timm", {"arch": "resnet18x"})
    assert caught.value.key == "model.arch"


def test_without_timm_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(RecipeError) as caught:
        testing.build_component("model", "timm", {"arch": "resnet18"})
    assert "timm package, which is not installed" in caught.value.message
    assert install_hint("timm") in caught.value.fix  # from this checkout: .venv/bin/pip install -e '.[timm]'
    assert ".venv/bin/pip install -e '.[timm]'" in caught.value.fix
    assert isinstance(caught.value, UserError)
