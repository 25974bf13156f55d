"""FitNet's ``hint`` loss as one stage (CE + 100 × hint MSE, the CRD code base's
``--distill hint -r 1 -a 0 -b 100``): the formula on hand-made maps (value and
gradient, written out here), the CRD code base's ``ConvReg`` shape rules
(``regressor = "convreg"``), the fingerprint of older stages, and tiny runs on
``digits`` across model families in the kd scheme."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, UserError
from pyramidkd.engine.recipe import dump_toml
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.fingerprint import component_description

FITNET = {"ce_weight": 1.0, "feat_weight": 100.0}


def _maps(student_shape, teacher_shape, batch=4, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, *student_shape, generator=generator).clamp_min(0)
    teacher = torch.randn(batch, *teacher_shape, generator=generator).clamp_min(0)
    logits = torch.randn(batch, classes, generator=generator)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, logits, targets


def _ours(loss, student, teacher, logits, targets):
    """(value, d/d student map, d/d logits), the loss set up on these maps first."""
    student, logits = student.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    teachers = [ModelOutput(logits.detach().flip(0), {"feat.2": teacher})]
    with torch.no_grad():
        loss.setup(ModelOutput(logits, {"feat.2": student}), teachers)
    value = loss(ModelOutput(logits, {"feat.2": student}), teachers, targets)
    grads = torch.autograd.grad(value, [student, logits], allow_unused=True)
    return (value.detach(), *(g if g is not None else torch.zeros_like(x) for g, x in zip(grads, (student, logits))))


def test_fitnet_in_one_stage_is_ce_plus_100_times_the_hint_mse():
    """Equal shapes, no regressor: L = CE(z, y) + 100 · mean (s − t)², whose gradients are
    200 (s − t) / numel and (softmax(z) − onehot(y)) / N."""
    student, teacher, logits, targets = _maps((5, 4, 4), (5, 4, 4))
    loss = testing.build_component("loss", "hint", {**FITNET, "regressor": "never"})
    value, grad_s, grad_z = _ours(loss, student, teacher, logits, targets)
    log_p = logits.log_softmax(1)
    ce = -sum(log_p[n, targets[n]] for n in range(len(targets))) / len(targets)
    expected = ce + 100.0 * ((student - teacher) ** 2).sum() / student.numel()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s, 200.0 * (student - teacher) / student.numel(), rtol=1e-5, atol=1e-8)
    onehot = F.one_hot(targets, logits.shape[1]).float()
    torch.testing.assert_close(grad_z, (logits.softmax(1) - onehot) / len(targets), rtol=1e-5, atol=1e-8)


def test_the_defaults_are_the_pure_hint_term_of_a_hint_stage():
    student, teacher, logits, targets = _maps((5, 4, 4), (5, 4, 4))
    loss = testing.build_component("loss", "hint", {"regressor": "never"})
    value, _, grad_z = _ours(loss, student, teacher, logits, targets)
    torch.testing.assert_close(value, F.mse_loss(student, teacher))
    assert torch.count_nonzero(grad_z) == 0  # no CE term
    weighted = testing.build_component("loss", "hint", {"regressor": "never", "feat_weight": 3.0})
    torch.testing.assert_close(_ours(weighted, student, teacher, logits, targets)[0], 3.0 * F.mse_loss(student, teacher))


def _batch_norm_relu(x, norm):
    """BatchNorm in training mode (biased batch variance) then ReLU, written out."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    scale, shift = norm.weight.view(1, -1, 1, 1), norm.bias.view(1, -1, 1, 1)
    return torch.relu((x - mean) / torch.sqrt(var + norm.eps) * scale + shift)


@pytest.mark.parametrize("student_shape, kind, kernel, stride", [
    ((6, 4, 4), nn.Conv2d, (1, 1), (1, 1)),           # equal sizes: a 1×1 conv (not 3×3)
    ((6, 8, 8), nn.Conv2d, (3, 3), (2, 2)),           # twice the teacher's: 3×3 stride 2
    ((6, 2, 2), nn.ConvTranspose2d, (4, 4), (2, 2)),  # half the teacher's: 4×4 transposed, stride 2
    ((6, 6, 6), nn.Conv2d, (3, 3), (1, 1)),           # larger: a valid conv of kernel 1 + 6 − 4
])
def test_convreg_follows_the_crd_code_bases_shape_rules_and_formula(student_shape, kind, kernel, stride):
    student, teacher, logits, targets = _maps(student_shape, (5, 4, 4))
    loss = testing.build_component("loss", "hint", {**FITNET, "regressor": "convreg"})
    value, grad_s, _ = _ours(loss, student, teacher, logits, targets)
    conv, norm, relu = loss.regressor
    assert type(conv) is kind and conv.kernel_size == kernel and conv.stride == stride
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(relu, nn.ReLU) and conv.out_channels == 5

    leaf = student.clone().requires_grad_(True)
    project = F.conv_transpose2d if kind is nn.ConvTranspose2d else F.conv2d
    mapped = _batch_norm_relu(project(leaf, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding), norm)
    assert mapped.shape == teacher.shape
    expected = F.cross_entropy(logits, targets) + 100.0 * ((mapped - teacher) ** 2).mean()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_s, torch.autograd.grad(expected, leaf)[0], rtol=1e-4, atol=1e-6)  # summation order differs by CPU


@pytest.mark.parametrize("regressor", ["convreg", "auto"])
def test_bf16_and_channels_last_give_the_fp32_loss(regressor):
    student, teacher, logits, targets = _maps((6, 2, 2), (5, 4, 4), seed=3)
    loss = testing.build_component("loss", "hint", {**FITNET, "regressor": regressor})
    loss.setup(ModelOutput(logits, {"feat.2": student}), [ModelOutput(logits, {"feat.2": teacher})])
    loss.eval()  # BatchNorm on its running statistics: the same for every call

    def run(convert):
        leaf = convert(student).detach().requires_grad_(True)
        value = loss(ModelOutput(logits, {"feat.2": leaf}), [ModelOutput(logits, {"feat.2": convert(teacher)})], targets)
        value.backward()
        assert torch.isfinite(leaf.grad.float()).all()
        return value.detach()

    reference = run(lambda x: x)
    torch.testing.assert_close(run(lambda x: x.contiguous(memory_format=torch.channels_last)), reference, rtol=1e-5, atol=1e-6)
    half = run(lambda x: x.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=5e-2, atol=5e-2 * reference.abs().item() + 1e-3)


def test_convreg_refuses_sizes_it_has_no_conv_for_before_training():
    loss = testing.build_component("loss", "hint", {"regressor": "convreg"})
    with pytest.raises(UserError, match="ConvReg needs a student map larger, equal, twice or half") as error:
        loss.check_features({"feat.2": (8, 1, 1)}, {"feat.2": (6, 4, 4)})
    assert 'regressor = "auto"' in error.value.fix
    loss.check_features({"feat.2": (8, 2, 2)}, {"feat.2": (6, 4, 4)})  # half: fine


def test_a_ce_term_needs_class_logits():
    """A hint stage's partial model ends in a map: a CE term there is refused by name."""
    student, teacher, _, targets = _maps((5, 4, 4), (5, 4, 4))
    loss = testing.build_component("loss", "hint", FITNET)
    with pytest.raises(UserError, match="ce_weight = 1 needs the student's class logits"):
        loss.setup(ModelOutput(student, {"feat.2": student}), [ModelOutput(teacher, {"feat.2": teacher})])


def describe(params):
    loss = testing.build_component("loss", "hint", params)
    return component_description(type("Spec", (), {"name": "hint", "params": loss.params})())["params"]


def test_stages_of_older_releases_keep_their_fingerprint():
    assert set(describe({})) == {"regressor", "hint_layer"}
    assert set(describe({"hint_layer": "hint"})) == {"regressor"}
    assert describe(FITNET)["ce_weight"] == 1.0 and describe(FITNET)["feat_weight"] == 100.0


@pytest.mark.parametrize("name, params, message", [("hint", {"ce_weight": -1.0}, "must be >= 0"),
                                                   ("hint", {"regressor": "conv"}, "convreg")])
def test_parameters_are_validated_like_a_recipe(name, params, message):
    with pytest.raises(Exception, match=message):
        testing.build_component("loss", name, params)


RESNET14, RESNET8 = {"name": "resnet14"}, {"name": "resnet8"}
VGG_TEACHER = {"name": "vgg", "layers": [8, "M", 16, "M", 16, "M"]}
VGG_STUDENT = {"name": "vgg", "layers": [4, "M", 8, "M", 8, "M"]}
# On 8×8 digits feat.2 is 32×4×4 in both ResNets (a 1×1 conv), 16×2×2 / 8×2×2 in the VGGs
# (a 1×1 conv mapping the channels), and 8×2×2 against 32×4×4 across them (transposed conv).
PAIRS = {"resnet": ("teacher-resnet", RESNET8, "regressor.0.weight"), "vgg": ("teacher-vgg", VGG_STUDENT, "regressor.0.weight"),
         "vgg-from-resnet": ("teacher-resnet", VGG_STUDENT, "regressor.0.weight")}


def _recipe() -> str:
    stages = [{"id": "teacher-resnet", "scheme": "scratch", "model": RESNET14},
              {"id": "teacher-vgg", "scheme": "scratch", "model": VGG_TEACHER}]
    for stage_id, (teacher, model, _) in PAIRS.items():
        stages.append({"id": stage_id, "scheme": {"name": "kd", "teacher": teacher}, "model": model,
                       "loss": {"name": "hint", **FITNET, "regressor": "convreg"}})
    return dump_toml({
        "loggers": ["files"],
        "experiment": {"name": "fitnet", "seed": 0, "device": "cpu"},
        "dataset": {"name": "digits", "image_size": 8, "limit": 200},
        "train": {"epochs": 1, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                  "scheduler": {"name": "none"}},
        "stages": stages,
    })


def test_fitnet_trains_in_one_kd_stage_across_model_families(tmp_path):
    summary = testing.run_tiny(_recipe(), workdir=tmp_path)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for stage_id, (teacher, _, weight) in PAIRS.items():
        assert stages[stage_id]["loss"] == "hint" and stages[stage_id]["teachers"][0]["stage"] == teacher
        assert math.isfinite(stages[stage_id]["test_loss"]) and 0.0 <= stages[stage_id]["test_acc"] <= 1.0
        epoch = next(r for r in records if r["kind"] == "epoch" and r["stage"] == stage_id)
        assert math.isfinite(epoch["train_loss"])
        checkpoint = load_checkpoint(str(tmp_path / "run" / "checkpoints" / stage_id / "last.pt"))
        state = checkpoint["loss_state"]  # the regressor trained with the student, saved for an exact resume
        assert weight in state and "regressor.1.running_mean" in state
        optimised = sum(len(group["params"]) for group in checkpoint["optimizer"]["param_groups"])
        parameters = [k for s in (checkpoint["state_dict"], state) for k in s if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert optimised == len(parameters)
    cross = load_checkpoint(str(tmp_path / "run" / "checkpoints" / "vgg-from-resnet" / "last.pt"))["loss_state"]
    assert tuple(cross["regressor.0.weight"].shape) == (8, 32, 4, 4)  # ConvTranspose2d: [in, out, 4, 4]
