"""Every built-in scheme, and the example package's ``nkd`` scheme, trains one short
epoch under each precision (fp32, bf16) with and without ``channels_last``: no
combination of scheme, loss and autocast may crash (the ensemble once did under bf16,
its averaged teacher logits float32 against bf16 student logits)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest

from pyramidkd import testing

EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "pyramidkd-dkd" / "src"
LEVEL = 'width = 0.0625, batch_norm = true'

# One recipe holds every scheme (the pyramid levels need 32×32 images: five pools).
RECIPE = f"""
loggers = ["files"]

[experiment]
name = "precision"
seed = 0
device = "cpu"
threads = 1

[dataset]
name = "synthetic"
num_classes = 4
image_size = 32
train_size = 32
val_size = 16
test_size = 16

[train]
epochs = 1
batch_size = 16
optimizer = {{ name = "sgd", lr = 0.02 }}
scheduler = {{ name = "none" }}

[[stages]]
id = "teacher"
scheme = "scratch"
model = {{ name = "vgg19", {LEVEL} }}

[[stages]]
id = "teacher2"
scheme = "scratch"
model = {{ name = "vgg19", {LEVEL} }}

[[stages]]
id = "kd"
scheme = {{ name = "kd", teacher = "teacher" }}
model = {{ name = "svgg5", {LEVEL} }}

[[stages]]
id = "fwd"
scheme = {{ name = "pyramid-forward", teacher = "teacher", {LEVEL}, levels = ["svgg14"] }}
loss = {{ name = "kd", temperature = 4.0 }}

[[stages]]
id = "bwd"
scheme = {{ name = "pyramid-backward", teacher = "teacher", {LEVEL}, levels = ["svgg17_b"], stage1_loss = "gram" }}

[[stages]]
id = "fit"
scheme = {{ name = "fitnet", teacher = "teacher", {LEVEL}, levels = ["svgg11"] }}

[[stages]]
id = "gram"
scheme = {{ name = "gram-direct", teacher = "teacher", {LEVEL}, levels = ["svgg8"] }}

[[stages]]
id = "ta"
scheme = {{ name = "kd-chain", teacher = "teacher", {LEVEL}, levels = ["svgg17", "svgg5"] }}

[[stages]]
id = "ens-mean"
scheme = {{ name = "ensemble", teachers = ["teacher", "teacher2"] }}
model = {{ name = "svgg5", {LEVEL} }}

[[stages]]
id = "ens-sum"
scheme = {{ name = "ensemble", teachers = ["teacher", "teacher2"], aggregate = "sum-kl" }}
model = {{ name = "svgg5", {LEVEL} }}

[[stages]]
id = "ab"
scheme = {{ name = "ab", teacher = "teacher", init_epochs = 1 }}
model = {{ name = "svgg5", {LEVEL} }}

[[stages]]
id = "ft"
scheme = {{ name = "ft", teacher = "teacher", init_epochs = 1 }}
model = {{ name = "svgg5", {LEVEL} }}
loss = {{ name = "ft" }}

[[stages]]
id = "qat"
scheme = {{ name = "qat-kd", student = "kd" }}

[[stages]]
id = "nkd"
scheme = {{ name = "nkd", teacher = "teacher" }}
model = {{ name = "svgg5", {LEVEL} }}
"""

SCHEMES = {"scratch", "kd", "pyramid-forward", "pyramid-backward", "fitnet", "gram-direct", "kd-chain", "ensemble", "ab", "ft",
           "nkd", "qat-kd"}


@pytest.fixture(scope="module")
def dkd_plugin():
    """The example package's plugin module, from its source folder (not installed)."""
    sys.path.insert(0, str(EXAMPLE_SRC))
    try:
        yield importlib.import_module("pyramidkd_dkd.plugin")
    finally:
        sys.path.remove(str(EXAMPLE_SRC))


def test_the_recipe_uses_every_scheme(dkd_plugin, tmp_path):
    from pyramidkd.engine.runner import prepare

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE)
    with testing.autoload(False):
        prepared = prepare(str(path), extra_plugins=[dkd_plugin])
    assert {section.scheme.name for section in prepared.recipe.stages} == SCHEMES
    assert builtin_schemes() <= SCHEMES, "a new built-in scheme: add it to the matrix"


def builtin_schemes() -> set[str]:
    return set(testing.make_host().registry("scheme").names())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_scheme_trains_under_each_precision(precision, channels_last, dkd_plugin, tmp_path):
    overrides = [f"train.precision={precision}", f"train.channels_last={str(channels_last).lower()}"]
    summary = testing.run_tiny(RECIPE, overrides=overrides, extra_plugins=[dkd_plugin], workdir=tmp_path)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert len(stages) == 21  # ab and ft plan two stages each
    for stage_id, stage in stages.items():
        assert stage["epochs"] == 1, stage_id
        assert math.isfinite(stage["test_acc"]), stage_id
