"""Scheme ``qat-kd`` (issue 22, quantisation-aware distillation): the fake quantiser's
arithmetic against hand-computed int8, its agreement with the int8 ONNX file the
export writes, the scheme end to end from the CLI (checkpoint layout, int8 export,
accuracy), exact resume, and the errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from conftest import recipe_with_plugin
from pyramidkd.engine.cli import main
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.plugins.schemes import fake_quant
from pyramidkd.plugins.schemes.fake_quant import FakeQuantSettings, attach_fake_quant, detach_fake_quant

# 90 test images (1 image = 1.1 points); test_quantize.py measured PTQ within 1 image on such runs.
INT8_TOLERANCE_POINTS = 3.0

RECIPE = """
[experiment]
name = "qat"
seed = 0
device = "cpu"
plugins = ["qat_helpers"]

[dataset]
name = "digits"
image_size = 8
limit = 600

[train]
epochs = 4
batch_size = 32
optimizer = { name = "sgd", lr = 0.05, momentum = 0.9 }

[[stages]]
id = "student"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M", 16, "M"], batch_norm = true, dropout = 0.0 }

[[stages]]
id = "qat"
train = { epochs = 3, optimizer = { lr = 0.005 } }
scheme = { name = "qat-kd", student = "student", observer_epochs = 2, freeze_bn_epochs = 1 }
loss = { name = "kd", temperature = 2.0, alpha = 0.9 }
"""

# A test plugin: raises in a batch_end hook where QAT_RAISE_AT = "stage:epoch:step" says
# (the loop saves `last` mid-epoch first), and a model with no Conv2d/Linear layer.
HELPER_PLUGIN = '''
import os
import attrs, torch
from torch import nn
from pyramidkd.engine import Model, hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    if os.environ.get("QAT_RAISE_AT") == f"{stage.id}:{epoch}:{step}":
        raise ValueError("stopped on purpose")

class MeanPool(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(classes))
    def forward(self, images):
        return images.mean((2, 3))[:, :1].repeat(1, self.scale.numel()) * self.scale

class NoLayers(Model):
    """Logits without a Conv2d or Linear layer."""
    name = "no-layers"
    def build(self, num_classes, input_shape):
        return MeanPool(num_classes)

@hookimpl
def pyramidkd_register_models():
    return [NoLayers]
'''


# --- the arithmetic ------------------------------------------------------------------


def test_weights_round_to_per_channel_symmetric_int8_as_computed_by_hand():
    weight = torch.tensor([[0.5, -1.27, 0.004], [0.1, 0.2, -0.3], [0.0, 0.0, 0.0]])
    # channel 0: scale 1.27/127 = 0.01 -> 50, -127, 0;  channel 1: scale 0.3/127 -> 42.33, 84.67, -127
    # -> 42, 85, -127;  channel 2 (all zero): scale 1 (ONNX Runtime's rule), stays 0
    scale_1 = 0.3 / 127
    expected = torch.tensor([[0.5, -1.27, 0.0], [42 * scale_1, 85 * scale_1, -0.3], [0.0, 0.0, 0.0]])
    assert torch.allclose(fake_quant.weight_scales(weight), torch.tensor([0.01, scale_1, 1.0]))
    assert torch.allclose(fake_quant.fake_quantize_weight(weight), expected, atol=1e-7)
    conv = torch.randn(4, 3, 3, 3)  # a conv weight: one scale per output channel (dimension 0)
    scales = conv.flatten(1).abs().amax(1) / 127
    assert torch.allclose(fake_quant.fake_quantize_weight(conv), torch.round(conv / scales[:, None, None, None]) * scales[:, None, None, None])


def test_folding_batchnorm_first_gives_the_same_integers():
    """ONNX Runtime quantises the BN-folded weight w·γ/σ; per-channel symmetric rounding
    commutes with a factor per output channel, so quantising w is exact."""
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    factor = torch.tensor([0.3, -2.0, 5.0, 1e-3, 0.77, -0.01])[:, None, None, None]
    folded_first = fake_quant.fake_quantize_weight(weight * factor)
    assert torch.allclose(folded_first, fake_quant.fake_quantize_weight(weight) * factor, rtol=1e-5, atol=1e-9)


def test_activations_round_to_uint8_with_onnxruntime_parameters_and_straight_through_gradients():
    low, high = torch.tensor(-1.0), torch.tensor(1.55)  # scale 2.55/255 = 0.01, zero point 100
    scale, zero_point = fake_quant.activation_qparams(low, high)
    assert scale.item() == pytest.approx(0.01) and zero_point.item() == 100
    x = torch.tensor([0.123, -0.456, 2.0, -3.0], requires_grad=True)
    y = fake_quant.fake_quantize_activation(x, low, high)
    assert torch.allclose(y, torch.tensor([0.12, -0.46, 1.55, -1.0]), atol=1e-6)  # the last two clipped
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]  # straight through inside the range, zero where clipped
    weight = torch.randn(3, 5, requires_grad=True)
    fake_quant.fake_quantize_weight(weight).mul(torch.arange(5.0)).sum().backward()
    assert torch.equal(weight.grad, torch.arange(5.0).expand(3, 5))  # nothing clipped: the identity
    positive_only = fake_quant.activation_qparams(torch.tensor(0.5), torch.tensor(2.55))
    assert positive_only[0].item() == pytest.approx(0.01) and positive_only[1].item() == 0  # the range widened to 0


def test_attaching_leaves_the_state_dict_and_detaching_restores_the_float_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    keys = list(model.state_dict())
    images = torch.randn(8, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        plain = model(images)
    quantizer = attach_fake_quant(model, FakeQuantSettings(freeze_bn_epochs=0))  # BatchNorm statistics untouched
    assert list(model.state_dict()) == keys and quantizer.points == ["0:input", "4:input", "output"]
    model.train()
    model(images)  # observes the ranges
    model.eval()
    with torch.no_grad():
        simulated = model(images)
    assert not torch.equal(simulated, plain) and (simulated - plain).abs().max() < 0.1 * plain.abs().max()
    detach_fake_quant(model, quantizer)
    with torch.no_grad():
        assert torch.equal(model(images), plain)


# --- end to end -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    with recipe_with_plugin(tmp_path_factory.mktemp("qat"), "qat_helpers", HELPER_PLUGIN, RECIPE) as path:
        yield path


@pytest.fixture(scope="module")
def finished(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("qat-run") / "run"
    assert main(["run", str(recipe), "--quiet", "--output", str(out)]) == 0
    return out


def test_the_stage_checkpoint_is_the_students_plain_model(finished):
    from pyramidkd import load_model

    student, qat = (load_checkpoint(str(finished / "checkpoints" / s / "best.pt")) for s in ("student", "qat"))
    assert qat["model"] == student["model"]  # the same class, parameters, classes and input shape
    assert list(qat["state_dict"]) == list(student["state_dict"])
    assert any(not torch.equal(qat["state_dict"][k], student["state_dict"][k]) for k in student["state_dict"])  # fine-tuned
    model = load_model(finished / "checkpoints" / "qat" / "best.pt")
    assert not any("forward" in vars(m) for m in model.modules())  # no fake quantiser in the loaded model
    last = load_checkpoint(str(finished / "checkpoints" / "qat" / "last.pt"))
    assert {"fake_quant.low", "fake_quant.high", "fake_quant.observed"} <= set(last["loss_state"])
    assert bool(last["loss_state"]["fake_quant.observed"].all())
    summary = json.loads((finished / "summary.json").read_text())
    stage = next(s for s in summary["stages"] if s["stage"] == "qat")
    assert stage["loss"] == "kd" and stage["info"]["method"] == "qat-kd" and stage["info"]["teacher"] == "student"
    assert stage["teachers"][0]["stage"] == "student" and stage["epochs"] == 3


def test_the_stage_exports_to_int8_within_the_tolerance_of_the_fp32_student(finished, cli):
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    result = cli("export", finished, "--stage", "qat", "--format", "onnx", "--quantize", "int8", "--calibration", "128")
    assert result.code == 0, result.err
    report = json.loads((finished / "export" / "qat.int8.onnx.json").read_text())
    summary = json.loads((finished / "summary.json").read_text())
    fp32_student = next(s["test_acc"] for s in summary["stages"] if s["stage"] == "student")
    assert fp32_student > 0.6  # it learnt something: the comparison means something
    assert 100 * (fp32_student - report["test_accuracy"]["exported"]) <= INT8_TOLERANCE_POINTS
    assert report["source"]["stage"] == "qat" and report["quantization"]["weights"] == "int8"


def test_the_fake_quantiser_agrees_with_the_int8_file(finished):
    """Ranges calibrated on the export's own calibration images: the simulated model and
    the int8 ONNX file predict the same classes, and their logits are closer than the
    fp32 model's are to the int8 file's."""
    ort = pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    from pyramidkd.engine.deploy.export import export_source
    from pyramidkd.engine.deploy.quantize import draw_calibration, quantize_stage
    from pyramidkd.engine.deploy.runs import test_batches

    done = quantize_stage(str(finished), "qat", str(finished / "agreement.int8.onnx"), calibration=128, latency_budget_s=0.01)
    source = export_source(str(finished), "qat")
    model = source.model
    quantizer = attach_fake_quant(model, FakeQuantSettings(freeze_bn_epochs=0))
    quantizer.start_epoch(1)
    with torch.no_grad():
        model.train()(draw_calibration(source, 128))  # BatchNorm frozen: the ranges of the folded model
    model.eval()
    session = ort.InferenceSession(done.path, providers=["CPUExecutionProvider"])
    simulated, plain, int8 = [], [], []
    for images, _ in test_batches(source.test_split, 64):
        with torch.no_grad():
            simulated.append(model(images))
        int8.append(torch.from_numpy(session.run(None, {"input": images.numpy()})[0]))
    detach_fake_quant(model, quantizer)
    for images, _ in test_batches(source.test_split, 64):
        with torch.no_grad():
            plain.append(model(images))
    simulated, plain, int8 = torch.cat(simulated), torch.cat(plain), torch.cat(int8)
    assert (simulated.argmax(1) == int8.argmax(1)).float().mean() >= 0.97
    assert (simulated - int8).abs().max() < 0.5 * (plain - int8).abs().max()


def test_resume_mid_stage_is_exact(recipe, finished, tmp_path, cli, monkeypatch):
    out = tmp_path / "interrupted"
    monkeypatch.setenv("QAT_RAISE_AT", "qat:2:3")  # epoch 2 of 3, ranges still observed
    stopped = cli("run", recipe, "--quiet", "--output", out)
    assert stopped.code == 1 and "stopped on purpose" in stopped.err
    assert load_checkpoint(str(out / "checkpoints" / "qat" / "last.pt"))["progress"]["step"] == 3
    monkeypatch.delenv("QAT_RAISE_AT")
    resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert resumed.code == 0, resumed.err
    for which in ("best", "last"):
        left, right = (load_checkpoint(str(run / "checkpoints" / "qat" / f"{which}.pt")) for run in (finished, out))
        assert all(torch.equal(left["state_dict"][k], right["state_dict"][k]) for k in left["state_dict"])
    ranges = [load_checkpoint(str(run / "checkpoints" / "qat" / "last.pt"))["loss_state"] for run in (finished, out)]
    assert all(torch.equal(ranges[0][k], ranges[1][k]) for k in ranges[0])
    accuracy = [next(s["test_acc"] for s in json.loads((run / "summary.json").read_text())["stages"] if s["stage"] == "qat")
                for run in (finished, out)]
    assert accuracy[0] == accuracy[1]


# --- errors --------------------------------------------------------------------------


SCHEME_LINE = 'scheme = { name = "qat-kd", student = "student", observer_epochs = 2, freeze_bn_epochs = 1 }'


@pytest.mark.parametrize("scheme, message, key", [
    ('{ name = "qat-kd", student = "nobody" }', "refers to stage 'nobody', which does not exist; earlier stages: student",
     "stages[1].scheme.student"),
    ('{ name = "qat-kd", student = "missing.pt" }', "checkpoint file 'missing.pt' does not exist", "stages[1].scheme.student"),
    ('{ name = "qat-kd", student = "student", observer_epochs = 0 }', "must be > 0, got 0", "stages[1].scheme.observer_epochs"),
    ('{ name = "qat-kd", student = "student", observer_epochs = 5 }', "observer_epochs = 5 is more than the stage's 3 epochs",
     "stages[1].scheme.observer_epochs"),
    ('{ name = "qat-kd", student = "student", freeze_bn_epochs = -1 }', "must be >= 0, got -1", "stages[1].scheme.freeze_bn_epochs"),
    ('{ name = "qat-kd", student = "student", observer = "median" }', "observer", "stages[1].scheme.observer"),
    ('{ name = "qat-kd", student = "student" }\nmodel = { name = "vgg", layers = [4, "M"] }',
     "fine-tunes the student's own model", "stages[1].model"),
])
def test_bad_settings_are_one_line_errors_before_training(scheme, message, key, recipe, tmp_path, cli):
    shutil.copy(recipe.parent / "qat_helpers.py", tmp_path / "qat_helpers.py")
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.read_text().replace(SCHEME_LINE, f"scheme = {scheme}"))
    result = cli("run", path, "--quiet", "--output", tmp_path / "run")
    assert result.code == 1 and message in result.err and key in result.err, result.err
    assert "Traceback" not in result.err and not (tmp_path / "run" / "checkpoints").exists()


def test_a_student_that_is_not_a_checkpoint_or_has_nothing_to_quantise_is_refused(recipe, tmp_path, cli):
    shutil.copy(recipe.parent / "qat_helpers.py", tmp_path / "qat_helpers.py")
    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.read_text().replace('student = "student"', 'student = "notes.pt"', 1))
    result = cli("run", path, "--quiet", "--output", tmp_path / "run")
    assert result.code == 1 and "notes.pt" in result.err and "Traceback" not in result.err, result.err
    path.write_text(recipe.read_text().replace('name = "vgg", layers = [8, "M", 16, "M"], batch_norm = true, dropout = 0.0',
                                               'name = "no-layers"'))
    result = cli("run", path, "--quiet", "--output", tmp_path / "run2")
    assert result.code == 1 and "has no nn.Conv2d or nn.Linear layer" in result.err and "stages[1].scheme.student" in result.err
    assert not (tmp_path / "run2" / "checkpoints").exists()  # refused before the student trained
