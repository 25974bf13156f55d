"""Every built-in model family exports to ONNX and TorchScript (scripted, or traced
and checked) with logits equal to the eager model's, from random weights at a small
image size. The large members of a family (VGG19, ResNet-50, ...) share its code and
are left to ``pytest -m slow``, with the ShuffleNets (slow to export, not large)."""

from __future__ import annotations

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine.deploy import formats

# one small member per family: (name, params, image size)
FAMILIES = [
    ("vgg", {"layers": [8, "M", 16, "M"]}, 16),
    ("svgg5", {}, 32),
    ("resnet8", {}, 32),
    ("resnet_blocks", {"blocks": [1, 1, 1]}, 16),
    ("wrn_16_1", {}, 16),
    ("vgg8_bn", {}, 32),
    ("mobilenetv2", {}, 32),
]
# Large members, and the ShuffleNets (hundreds of small ops: 10-25 s per export on 2 busy cores)
LARGE = [("shufflenetv1", {}, 32), ("shufflenetv2", {}, 32), ("svgg17", {}, 32), ("vgg19", {}, 32), ("resnet50", {}, 32), ("wrn_40_2", {}, 32)]
CASES = [pytest.param(*case, id=case[0]) for case in FAMILIES] + [pytest.param(*case, id=case[0], marks=pytest.mark.slow) for case in LARGE]


@pytest.fixture(scope="module")
def host():
    return testing.make_host()


@pytest.mark.parametrize("name, params, size", CASES)
@pytest.mark.parametrize("format_name", ["onnx", "torchscript"])
def test_a_built_in_model_exports_with_equal_logits(format_name, name, params, size, host):
    torch.manual_seed(0)
    model = testing.build_component("model", name, params, host=host).build(10, (3, size, size)).eval()
    export_format = formats.get_format(format_name)
    artefact = export_format.export(model, torch.randn(2, 3, size, size), {"preprocessing": "{}"})
    images = torch.randn(3, 3, size, size)
    with torch.no_grad():
        expected = model(images)
    got = export_format.runner(artefact.payload)(images)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))
