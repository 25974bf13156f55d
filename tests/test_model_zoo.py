"""The standard KD model zoo (CIFAR ResNets, WRNs, VGG-BN, MobileNetV2, ShuffleNets):
exact parameter counts against the reference definitions, output shapes, the tap
contract (``tap_points()`` through TapRecorder), the CLI listing, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import RecipeError, UserError
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.training.taps import TapRecorder

# Exact counts at 100 classes, 3×32×32. The reference numbers were computed from
# RepDistiller's models/{resnet,resnetv2,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py
# (mdistiller's models/cifar/ are the same definitions): a transcription of them,
# outside this repository, loads our state dicts strictly and gives the same outputs.
EXACT_PARAMETERS = {
    "resnet8": 83_892, "resnet14": 181_108, "resnet20": 278_324, "resnet32": 472_756, "resnet44": 667_188,
    "resnet56": 861_620, "resnet110": 1_736_564, "resnet8x4": 1_233_540, "resnet32x4": 7_433_860, "resnet50": 23_705_252,
    "wrn_16_1": 180_916, "wrn_16_2": 703_284, "wrn_40_1": 569_780, "wrn_40_2": 2_255_156,
    "vgg8_bn": 3_965_028, "vgg11_bn": 9_277_284, "vgg13_bn": 9_462_180, "vgg16_bn": 14_774_436, "vgg19_bn": 20_086_692,
    "mobilenetv2": 812_836, "shufflenetv1": 949_258, "shufflenetv2": 1_355_528,
}
PUBLISHED_MILLIONS = {  # as the CRD paper's tables print them
    "resnet56": 0.86, "resnet20": 0.28, "resnet110": 1.74, "resnet32": 0.47, "resnet32x4": 7.43, "resnet8x4": 1.23,
    "wrn_40_2": 2.26, "wrn_16_2": 0.70, "wrn_40_1": 0.57, "vgg13_bn": 9.46, "vgg8_bn": 3.96,
    "mobilenetv2": 0.81, "shufflenetv1": 0.95, "shufflenetv2": 1.36,
}
ZOO = sorted(EXACT_PARAMETERS)

# Tap shapes at 32×32: (channels, side) of feat.0 .. feat.K, and the pooled width D.
BASIC, X4 = [(16, 32), (16, 32), (32, 16), (64, 8)], [(32, 32), (64, 32), (128, 16), (256, 8)]
VGG = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)]  # no 4th max-pool below 64 px, as the reference


def wrn_taps(k: int):
    return [(16, 32), (16 * k, 32), (32 * k, 16), (64 * k, 8)], 64 * k


TAP_SHAPES = {
    **{name: (BASIC, 64) for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "resnet8x4": (X4, 256), "resnet32x4": (X4, 256),
    "resnet50": ([(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    "wrn_16_1": wrn_taps(1), "wrn_40_1": wrn_taps(1), "wrn_16_2": wrn_taps(2), "wrn_40_2": wrn_taps(2),
    **{name: (VGG, 512) for name in ("vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")},
    "mobilenetv2": ([(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflenetv1": ([(24, 32), (240, 16), (480, 8), (960, 4)], 960),
    "shufflenetv2": ([(24, 32), (116, 16), (232, 8), (464, 4)], 1024),
}
LINEAR_BOTTLENECKS = {"mobilenetv2"}  # stage outputs with no activation: feat.k is preact.k
LARGE_INPUT = ["resnet8", "resnet8x4", "wrn_16_1", "vgg8_bn", "mobilenetv2", "shufflenetv1", "shufflenetv2"]  # cheap at 96 px


@pytest.fixture(scope="module")
def registry():
    return make_plugin_host().registry("model")


def build(registry, name: str, classes: int = 100, size: int = 32, params: dict | None = None):
    cls = registry.get(name)
    return cls(cls.Params(**(params or {}))).build(classes, (3, size, size))


@pytest.fixture(scope="module")
def default_model(registry):
    """name -> the model for 100 classes at 32×32, built once for the count and tap tests
    (and freed with this module: the zoo holds about 100 M parameters)."""
    built: dict[str, torch.nn.Module] = {}

    def get(name: str) -> torch.nn.Module:
        if name not in built:
            built[name] = build(registry, name)
        return built[name]

    yield get
    built.clear()


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_match_the_reference_definitions(default_model, name):
    parameters = count(default_model(name))
    assert parameters == EXACT_PARAMETERS[name]
    if name in PUBLISHED_MILLIONS:  # the paper rounds, except vgg8_bn's 3.965 M, printed as 3.96
        millions = parameters / 1e6
        assert PUBLISHED_MILLIONS[name] in (round(millions, 2), math.floor(millions * 100) / 100)
    if name == "resnet50":
        assert round(parameters / 1e6, 1) == 23.7


def record(model, images):
    recorder = TapRecorder(model, model.tap_points(), role="student", stage_id="zoo")
    try:
        with torch.no_grad():
            return recorder(images)
    finally:
        recorder.close()


def classifier_in_features(model) -> int:
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1].in_features


def check_taps(model, name: str, size: int, batch: int = 2):
    torch.manual_seed(0)
    output = record(model.eval(), torch.randn(batch, 3, size, size))
    assert output.logits.shape == (batch, 100)
    stages, pooled = TAP_SHAPES[name]
    depth = len(stages) - 1
    expected_names = {f"feat.{k}" for k in range(depth + 1)} | {f"preact.{k}" for k in range(1, depth + 1)} | {"pooled"}
    assert set(model.tap_points()) == expected_names and set(output.features) == expected_names
    scale = size // 32
    for k, (channels, side) in enumerate(stages):
        assert output.features[f"feat.{k}"].shape == (batch, channels, side * scale, side * scale), f"feat.{k}"
        if k:
            assert output.features[f"preact.{k}"].shape == output.features[f"feat.{k}"].shape, f"preact.{k}"
    assert output.features["pooled"].shape == (batch, pooled) and pooled == classifier_in_features(model)
    for k in range(1, depth + 1):
        feat, preact = output.features[f"feat.{k}"], output.features[f"preact.{k}"]
        if name in LINEAR_BOTTLENECKS:
            assert torch.equal(feat, preact)
        else:  # feat after the ReLU, preact before it
            assert feat.min() >= 0 and preact.min() < 0, f"stage {k}"


@pytest.mark.parametrize("name", ZOO)
def test_outputs_and_tap_points_at_32px(default_model, name):
    check_taps(default_model(name), name, 32)


@pytest.mark.parametrize("name", LARGE_INPUT)
def test_outputs_and_tap_points_at_96px(registry, name):
    """Global pooling (the reference's fixed pools at 32 px) lets larger images through."""
    check_taps(build(registry, name, size=96), name, 96, batch=1)


def test_tap_shapes_at_96px_on_the_meta_device(registry):
    """Shapes alone, without computing (as a validation pass can), for every model."""
    size = 96
    scale = size // 32
    for name in ZOO:
        with torch.device("meta"):
            model = build(registry, name, size=size)
            output = record(model, torch.empty(2, 3, size, size))
        stages, pooled = TAP_SHAPES[name]
        assert output.logits.shape == (2, 100)
        for k, (channels, side) in enumerate(stages):
            assert output.features[f"feat.{k}"].shape == (2, channels, side * scale, side * scale), (name, k)
            if k:
                assert output.features[f"preact.{k}"].shape == output.features[f"feat.{k}"].shape, (name, k)
        assert output.features["pooled"].shape == (2, pooled), name


def test_tap_specs_name_real_modules_and_taps_do_not_change_the_output(registry):
    model = build(registry, "resnet8x4", classes=10).eval()
    assert model.tap_points()["preact.3"] == "layer3.0.out_relu:input" and model.tap_points()["pooled"] == "flatten"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(images)
    assert torch.equal(record(model, images).logits, plain)


def test_state_dict_keys_are_the_references(registry):
    """Parameter names follow RepDistiller's, so its published checkpoints' keys match."""
    keys = {name: set(build(registry, name, classes=10).state_dict()) for name in ("resnet8x4", "resnet50", "wrn_40_2", "vgg8_bn", "mobilenetv2", "shufflenetv1", "shufflenetv2")}
    assert {"conv1.weight", "layer1.0.downsample.0.weight", "layer3.0.bn2.running_var", "fc.weight"} <= keys["resnet8x4"]
    assert {"layer1.0.shortcut.1.weight", "layer4.2.conv3.weight", "linear.bias"} <= keys["resnet50"]
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.5.bn2.weight", "bn1.running_mean", "fc.weight"} <= keys["wrn_40_2"]
    assert {"block0.0.bias", "block0.1.weight", "block4.1.running_mean", "classifier.weight"} <= keys["vgg8_bn"]
    assert {"conv1.0.weight", "blocks.6.0.conv.7.weight", "conv2.1.weight", "classifier.0.weight"} <= keys["mobilenetv2"]
    assert {"layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"} <= keys["shufflenetv1"]
    assert {"layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "bn2.weight"} <= keys["shufflenetv2"]


def test_shufflenetv1_does_not_group_the_first_conv_on_the_stem(registry):
    model = build(registry, "shufflenetv1")
    assert model.layer1[0].conv1.groups == 1 and model.layer1[1].conv1.groups == 3 and model.layer2[0].conv1.groups == 3
    assert model.layer1[0].conv3.out_channels == 240 - 24  # a stride-2 block concatenates its pooled input


def test_batch_norm_models_train_and_backpropagate(registry):
    for name in ("resnet8", "wrn_16_1", "shufflenetv2"):
        model = build(registry, name, classes=10).train()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
        loss.backward()
        assert all(p.grad is not None for p in model.parameters()), name


def test_the_generic_wrn_takes_any_6n_plus_4_depth(registry):
    assert count(build(registry, "wrn", params={"depth": 28, "widen_factor": 2})) == 1_479_220  # WRN-28-2 (reference: same)
    assert count(build(registry, "wrn", params={"depth": 40, "widen_factor": 2})) == EXACT_PARAMETERS["wrn_40_2"]
    dropped = build(registry, "wrn", classes=10, params={"depth": 10, "widen_factor": 1, "dropout": 0.3}).train()
    assert dropped(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(RecipeError) as error:
        testing.build_component("model", "wrn", {"depth": 20})
    assert "depth" in str(error.value) and "6n + 4" in str(error.value) and "16 or 22" in str(error.value)


def test_sizes_and_widths_a_model_cannot_take_are_clear_errors(registry):
    with pytest.raises(UserError, match="shrink a 4×4 input") as error:
        build(registry, "vgg13_bn", size=4)
    assert "image_size >= 8" in error.value.fix
    with pytest.raises(UserError, match="width_mult"):
        build(registry, "mobilenetv2", params={"width_mult": 0.01})


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8_bn", "mobilenetv2", "shufflenetv1", "shufflenetv2"])
def test_one_channel_small_images_build_and_run(registry, name):
    """The stem takes the data set's channels (e.g. the 8×8 grey digits)."""
    cls = registry.get(name)
    model = cls(cls.Params()).build(10, (1, 8, 8)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_the_models_command_lists_the_zoo(cli):
    # 8×8 keeps it fast; the zoo's counts do not depend on the size (global pooling)
    result = cli("models", "--json", "--image-size", "8", "--num-classes", "100", "--width", "0.0625")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)}
    for name in ZOO:
        assert rows[name]["params"] == EXACT_PARAMETERS[name] and rows[name]["macs"] > 0, name
        assert not rows[name].get("error") and rows[name]["description"]
    assert rows["wrn"]["params"] == EXACT_PARAMETERS["wrn_16_2"]  # the generic wrn's defaults: depth 16, widen 2
    assert {"vgg", "vgg19", "svgg5"} <= set(rows)  # the Pyramid family keeps its names
