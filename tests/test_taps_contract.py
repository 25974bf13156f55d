"""The feature-tap contract: every model's points and their shapes, schemes that tap
only what the loss reads, a third-party model, the checks ``validate`` runs before
anything trains, and ``Loss.start_epoch`` (also after a resume)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import Loss, UserError
from pyramidkd.engine.runner import prepare
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.taps import TapRecorder

BASIC_RESNET = ([(16, 32), (16, 32), (32, 16), (64, 8)], 64)
WIDE_1 = BASIC_RESNET
WIDE_2 = ([(16, 32), (32, 32), (64, 16), (128, 8)], 128)
VGG_BN = ([(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], 512)
PYRAMID = ([(64, 32), (128, 16), (256, 8), (512, 4), (512, 2)], 512)  # pooled: the flattened 512·(S/32)² map
# (channels, height at 32×32) of feat.0 … feat.K, and pooled's size at 32×32; at 96×96 every map is 3× larger.
EXPECTED = {
    **{name: BASIC_RESNET for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")},
    "resnet8x4": ([(32, 32), (64, 32), (128, 16), (256, 8)], 256),
    "resnet32x4": ([(32, 32), (64, 32), (128, 16), (256, 8)], 256),
    "resnet50": ([(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4)], 2048),
    "wrn_16_1": WIDE_1, "wrn_40_1": WIDE_1, "wrn_16_2": WIDE_2, "wrn_40_2": WIDE_2, "wrn": WIDE_2,
    **{name: VGG_BN for name in ("vgg8_bn", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")},
    "mobilenetv2": ([(16, 16), (12, 16), (16, 8), (48, 4), (160, 2)], 1280),
    "shufflenetv1": ([(24, 32), (240, 16), (480, 8), (960, 4)], 960),
    "shufflenetv2": ([(24, 32), (116, 16), (232, 8), (464, 4)], 1024),
    **{name: PYRAMID for name in ("vgg", "vgg19", "svgg17", "svgg14", "svgg11", "svgg8", "svgg5",
                                  "svgg17_b", "svgg14_b", "svgg11_b", "svgg8_b")},
}
NEEDS_PARAMETERS = {"torchvision", "timm"}  # an arch to name; their own tests cover them


@pytest.fixture(scope="module")
def models():
    return testing.make_host().registry("model")


def meta_features(cls, size: int, params=None, classes: int = 100) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of every declared tap point, the model built and run on the meta device."""
    with torch.device("meta"):
        model = cls(params if params is not None else cls.Params()).build(classes, (3, size, size))
    taps = {name: f"@{name}" for name in model.tap_points()}
    recorder = TapRecorder(model, taps, role="student", stage_id="shapes")
    features = recorder(torch.empty(2, 3, size, size, device="meta")).features
    recorder.close()
    return {name: tuple(value.shape[1:]) for name, value in features.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_tap_point_has_its_documented_shape_at_32_and_96_pixels(name, models):
    stages, pooled = EXPECTED[name]
    for size in (32, 96):
        scale = size // 32
        features = meta_features(models.get(name), size)
        expected = {f"feat.{k}": (c, h * scale, h * scale) for k, (c, h) in enumerate(stages)}
        expected.update({f"preact.{k}": (c, h * scale, h * scale) for k, (c, h) in enumerate(stages) if k >= 1})
        expected["pooled"] = (pooled * scale * scale if EXPECTED[name] is PYRAMID else pooled,)
        assert features == expected, (name, size)


def test_every_builtin_model_declares_the_contract(models):
    checked = 0
    for name in models.names():
        cls = models.get(name)
        if name in NEEDS_PARAMETERS:
            continue
        features = meta_features(cls, 32)
        stages = sorted(int(k[5:]) for k in features if k.startswith("feat."))
        assert stages == list(range(len(stages))) and len(stages) >= 2, name
        assert sorted(features) == sorted([f"feat.{k}" for k in stages] + [f"preact.{k}" for k in stages[1:]] + ["pooled"]), name
        heights = [features[f"feat.{k}"][1] for k in stages]
        assert heights == sorted(heights, reverse=True) and len(features["pooled"]) == 1, name
        checked += 1
    assert checked >= len(EXPECTED)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_pyramid_and_vgg_models_are_scriptable():
    for name, params in (("vgg19", {"width": 0.125, "batch_norm": True}), ("svgg5", {"width": 0.125}), ("vgg", {"layers": [4, "M", 8, "M"]})):
        model = testing.build_component("model", name, params).build(10, (3, 32, 32)).eval()
        images = torch.randn(2, 3, 32, 32)
        assert torch.equal(torch.jit.script(model)(images), model(images)), name


def test_preact_is_the_value_before_the_stage_activation():
    model = testing.build_component("model", "svgg5", {"width": 0.125}).build(10, (3, 32, 32))
    recorder = TapRecorder(model, {"feat.*": "@feat.*", "preact.*": "@preact.*"}, role="student", stage_id="x")
    features = recorder(torch.randn(2, 3, 32, 32)).features
    assert torch.equal(features["feat.2"], features["preact.2"].relu()) and (features["preact.2"] < 0).any()


# --- schemes tap what the loss reads --------------------------------------------

PLUGIN = '''
import os
import attrs, torch, torch.nn.functional as F
from torch import nn
from pyramidkd.engine import Loss, Model, Scheme, StagePlan, hookimpl

EPOCHS = []

@hookimpl
def pyramidkd_epoch_end(run, stage, epoch, metrics):
    if f"{stage.id}:{epoch}" == os.environ.get("TAPS_TEST_STOP_AT"):
        raise ValueError("stopped on purpose")

class TinyNet(nn.Module):
    """conv-BN-ReLU stem, one stage, global pool, linear head (a user's own model)."""
    def __init__(self, classes, pool=None, inplace=False, points=None):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.stage = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU(inplace=inplace)
        self.pool = pool or nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, classes)
        self.points = points
    def forward(self, x):
        return self.head(self.pool(self.act(self.stage(self.stem(x)))).flatten(1))

class WithTaps(TinyNet):
    def tap_points(self):
        return self.points or {"feat.0": "stem", "feat.1": "act", "preact.1": "act:input", "pooled": "head:input"}

def model_class(name, build):
    return type(name.title().replace("-", ""), (Model,), {"name": name, "build": lambda self, c, shape: build(c)})

@attrs.define
class WrongPathParams:
    teacher: str = "teacher"

class WrongPath(Scheme):
    name = "wrong-path"
    Params = WrongPathParams
    def plan(self, entry, context):
        loss = context.component("loss", "mse", {}, key=entry.key + ".loss")
        return [StagePlan(id=entry.id, model=entry.require_model(), loss=loss, train=context.train(entry),
                          teachers=[context.model_source(self.params.teacher, entry.key)],
                          student_taps={"out": "stage.7"}, teacher_taps={"out": "stage.7"})]

class EpochWeighted(Loss):
    """Cross-entropy weighted by the epoch (a warm-up needs the exact epoch)."""
    name = "epoch-weighted"
    def start_epoch(self, epoch):
        super().start_epoch(epoch)
        EPOCHS.append(epoch)
    def forward(self, student, teachers, targets):
        return F.cross_entropy(student.logits, targets) * self.epoch

@hookimpl
def pyramidkd_register_models():
    return [model_class("plain-net", TinyNet), model_class("tapped-net", WithTaps),
            model_class("broken-taps-net", lambda c: WithTaps(c, points={"feat.0": "stem", "feat.1": "stage.9", "pooled": "head:input"})),
            model_class("inplace-net", lambda c: WithTaps(c, inplace=True)),
            model_class("fixed-pool-net", lambda c: WithTaps(c, pool=nn.AvgPool2d(8)))]

@hookimpl
def pyramidkd_register_schemes():
    return [WrongPath]

@hookimpl
def pyramidkd_register_losses():
    return [EpochWeighted]
'''


def recipe_text(stages: str, *, image_size: int = 16, epochs: int = 1, teacher: str = "resnet8") -> str:
    teacher_params = ", width = 0.0625" if teacher == "vgg19" else ""
    return f"""
[experiment]
name = "taps"
seed = 1
device = "cpu"
plugins = ["tap_helpers"]

[dataset]
name = "synthetic"
num_classes = 4
image_size = {image_size}
train_size = 64
val_size = 32
test_size = 32

[train]
epochs = {epochs}
batch_size = 32
optimizer = {{ name = "sgd", lr = 0.05 }}
scheduler = {{ name = "none" }}

[[stages]]
id = "teacher"
scheme = "scratch"
model = {{ name = "{teacher}"{teacher_params} }}
{stages}"""


@pytest.fixture
def write(write_recipe, tmp_path):
    (tmp_path / "tap_helpers.py").write_text(PLUGIN)

    def write_stages(stages: str, **options):
        return write_recipe(recipe_text(stages, **options))

    return write_stages


def test_kd_plans_exactly_the_taps_its_loss_reads(write):
    path = write("""
[[stages]]
id = "plain"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "tapped-net" }

[[stages]]
id = "hinted"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "tapped-net" }
loss = { name = "hint", hint_layer = "feat.2", guided_layer = "feat.1" }

[[stages]]
id = "matched"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "resnet8" }
loss = { name = "mse", layers = ["feat.*", "pooled"] }
""")
    stages = {stage.id: stage for stage in prepare(str(path)).stages}
    assert stages["plain"].student_taps == stages["plain"].teacher_taps == {}
    assert stages["hinted"].student_taps == {"feat.1": "@feat.1"} and stages["hinted"].teacher_taps == {"feat.2": "@feat.2"}
    assert stages["matched"].student_taps == {"feat.*": "@feat.*", "pooled": "@pooled"}


def count_forward_hooks(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_a_plain_kd_stage_registers_no_forward_hook_and_a_feature_loss_only_its_own(monkeypatch):
    from pyramidkd.engine.training import loop

    hooks = {}
    build = loop.build_stage_state

    def counting(run, stage, cache):
        state = build(run, stage, cache)
        hooks[stage.id] = [count_forward_hooks(state.student)] + [count_forward_hooks(t.model) for t in state.teacher_taps]
        return state

    monkeypatch.setattr(loop, "build_stage_state", counting)
    testing.run_tiny(testing.tiny_recipe(loss="kd"))
    assert hooks["student"] == [0, 0]
    testing.run_tiny(testing.tiny_recipe(loss="hint", loss_params={"hint_layer": "feat.0"}))
    assert hooks["student"] == [1, 1]  # the student's and the teacher's feat.0, nothing else


def test_any_loss_on_any_pair_and_fitnet_from_any_teacher_end_to_end(write, cli, tmp_path):
    path = write("""
[[stages]]
id = "fit"
scheme = { name = "fitnet", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg5"] }

[[stages]]
id = "own"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "tapped-net" }
loss = { name = "hint", hint_layer = "feat.3", guided_layer = "feat.1" }
""", image_size=32)
    plan = {stage.id: stage for stage in prepare(str(path)).stages}
    hint = plan["fit.svgg5.hint"]
    assert hint.student_taps == hint.teacher_taps == {"hint": "@feat.2", "out": "@feat.2"}
    assert hint.loss.params.hint_layer == "hint" and hint.trainable == ["block1", "block2_c", "block3_c.conv3_c", "block3_c.bn3_c"]
    result = cli("run", path, "--quiet", "--output", tmp_path / "run")
    assert result.code == 0, result.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["teacher", "fit.svgg5.hint", "fit.svgg5", "own"]


def test_fitnet_from_a_torchvision_resnet_into_svgg5_needs_no_custom_scheme(write_recipe):
    models = testing.make_host().registry("model")
    if "torchvision" not in models:
        pytest.skip("the torchvision model plugin is not registered")
    text = recipe_text("""
[[stages]]
id = "fit"
scheme = { name = "fitnet", teacher = "teacher", width = 0.0625, levels = ["svgg5"], hint_layer = "feat.3" }
""", image_size=32).replace('model = { name = "resnet8" }', 'model = { name = "torchvision", arch = "resnet18", small_input = true }', 1)
    stages = {stage.id: stage for stage in prepare(str(write_recipe(text.replace('plugins = ["tap_helpers"]\n', '')))).stages}
    assert stages["fit.svgg5.hint"].teacher_taps["hint"] == "@feat.3" and stages["fit.svgg5.hint"].loss.name == "hint"


# --- validate refuses, before anything trains ---------------------------------------

REFUSED = {  # case: (the student stage, what the error says, image size)
    "a tap path the model lacks": ('scheme = { name = "wrong-path" }\nmodel = { name = "resnet8" }',
                                   ["stage 'student'", "no module 'stage.7'", "tap 'out'"], 32),
    "a tap point with a wrong path": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "broken-taps-net" }\n'
                                      'loss = { name = "hint", hint_layer = "feat.1" }', ["no module 'stage.9'", "tap_points()"], 32),
    "a tap the stage does not record": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, levels = ["svgg14"], '
                                        'stage1_loss = { name = "hint", hint_layer = "feat.2" } }',
                                        ["loss 'hint' reads the student's tap 'feat.2', but the stage taps in, out", "kd scheme"], 32),
    "a model without tap points": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "plain-net" }\nloss = "hint"',
                                   ["stage 'student'", "(plain-net) declares no tap points", "declare tap_points()"], 32),
    "a point the model does not offer": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "resnet8" }\n'
                                         'loss = { name = "hint", hint_layer = "feat.9" }', ["has no tap point 'feat.9'", "feat.3"], 32),
    "maps a loss cannot match": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "resnet8x4" }\n'
                                 'loss = { name = "mse", layers = ["feat.3"] }',
                                 ["stage 'student'", "'feat.3'", "(256, 8, 8)", "(64, 8, 8)", '"hint"'], 32),
    "a Gram flow of other channels": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "resnet8x4" }\n'
                                      'loss = { name = "gram", layers = ["feat.2", "feat.3"] }', ["feat.2 → feat.3", "channels", '"hint"'], 32),
    "an image size the pooling cannot take": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "fixed-pool-net" }',
                                              ["the student model 'fixed-pool-net' cannot take 3×8×8 images", "image_size"], 8),
    "an image size a zoo model refuses": ('scheme = "scratch"\nmodel = { name = "vgg8_bn" }', ["stage 'student' (student): model 'vgg8_bn'", "image_size >= 8"], 4),
    "a pre-activation an in-place ReLU overwrites": ('scheme = { name = "kd", teacher = "teacher" }\nmodel = { name = "inplace-net" }\n'
                                                     'loss = { name = "hint", hint_layer = "preact.1" }', ["in-place activation", "nn.ReLU()"], 32),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_validate_refuses_before_anything_trains(case, write, cli, tmp_path):
    stage, expected, image_size = REFUSED[case]
    teacher = "vgg19" if "pyramid-forward" in stage else "resnet8"
    path = write(f'\n[[stages]]\nid = "student"\n{stage}\n', image_size=image_size, teacher=teacher)
    result = cli("validate", path)
    assert result.code == 1, result.out
    for text in expected + ["fix:"]:
        assert text in result.err, (text, result.err)
    assert "Traceback" not in result.err
    if case == "a tap path the model lacks":  # `run` refuses it too, before the teacher trains
        ran = cli("run", path, "--quiet", "--output", tmp_path / "run")
        assert ran.code == 1 and not (tmp_path / "run" / "checkpoints" / "teacher").exists()


# --- the loss API ----------------------------------------------------------------


def test_loss_contract_defaults_and_shape_checks():
    loss = Loss()
    assert loss.taps == loss.student_taps() == loss.teacher_taps() == () and loss.epoch == 1
    loss.start_epoch(4)
    assert loss.epoch == 4
    loss.check_features({"feat.1": (8, 4, 4)}, {"feat.1": (16, 2, 2)})  # matches = "any"
    spatial = type("Spatial", (Loss,), {"name": "spatial", "matches": "same_spatial"})()
    spatial.check_features({"feat.1": (8, 4, 4)}, {"feat.1": (16, 4, 4)})
    with pytest.raises(UserError, match=r"same spatial.*'feat.1'.*\(8, 4, 4\).*\(16, 2, 2\)"):
        spatial.check_features({"feat.1": (8, 4, 4)}, {"feat.1": (16, 2, 2)})


def test_start_epoch_is_called_every_epoch_and_again_after_a_resume(write, cli, tmp_path, monkeypatch):
    stages = '\n[[stages]]\nid = "student"\nscheme = "scratch"\nmodel = { name = "tapped-net" }\nloss = "epoch-weighted"\n'
    path = write(stages, epochs=3)
    reference = cli("run", path, "--quiet", "--output", tmp_path / "reference")
    assert reference.code == 0, reference.err
    helpers = sys.modules["tap_helpers"]
    assert helpers.EPOCHS[-3:] == [1, 2, 3]
    out = tmp_path / "interrupted"
    monkeypatch.setenv("TAPS_TEST_STOP_AT", "student:1")  # stopped after the student's epoch 1 was saved
    assert cli("run", path, "--quiet", "--output", out).code == 1
    monkeypatch.delenv("TAPS_TEST_STOP_AT")
    helpers.EPOCHS.clear()
    resumed = cli("run", path, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    assert helpers.EPOCHS == [2, 3]  # the resumed stage starts at epoch 2, and its loss knows it
    for which in ("best", "last"):
        ours = load_checkpoint(str(out / "checkpoints" / "student" / f"{which}.pt"))["state_dict"]
        theirs = load_checkpoint(str(tmp_path / "reference" / "checkpoints" / "student" / f"{which}.pt"))["state_dict"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), which
