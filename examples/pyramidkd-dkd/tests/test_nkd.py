"""Tests of the dkd loss and scheme, written with pyramidkd's helpers (pyramidkd.testing)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, RecipeError

import pyramidkd_dkd.plugin as plugin
from pyramidkd_dkd import DKDLoss, dkd_loss, dkd_terms


def reference_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """The formula as the authors' code (mdistiller) writes it: probabilities, a
    -1000 logit offset to drop the target class, kl_div summed / batch."""
    gt = F.one_hot(target, logits_student.shape[1]).float()
    other = 1 - gt
    ps = F.softmax(logits_student / temperature, 1)
    pt = F.softmax(logits_teacher / temperature, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * other).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * other).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temperature**2 / target.shape[0]
    nckd = F.kl_div(F.log_softmax(logits_student / temperature - 1000.0 * gt, 1),
                    F.softmax(logits_teacher / temperature - 1000.0 * gt, 1), reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


def test_matches_the_reference_formula():
    student, (teacher,), targets = testing.random_outputs(16, 10, seed=1)
    for alpha, beta, temperature in [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (2.0, 0.0, 3.0)]:
        ours = dkd_loss(student.logits, teacher.logits, targets, alpha=alpha, beta=beta, temperature=temperature)
        expected = reference_dkd(student.logits.double(), teacher.logits.double(), targets, alpha, beta, temperature)
        torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_kd_decomposes_into_tckd_and_nckd():
    """The paper's Eq. 7: KL(p_t || p_s) = TCKD + (1 - p_t(target)) * NCKD, per sample."""
    student, (teacher,), targets = testing.random_outputs(32, 7, seed=2)
    temperature = 3.0
    tckd, nckd = dkd_terms(student.logits, teacher.logits, targets, temperature)
    log_ps = F.log_softmax(student.logits / temperature, 1)
    log_pt = F.log_softmax(teacher.logits / temperature, 1)
    kd = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    teacher_target = log_pt.exp().gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(kd, tckd + (1 - teacher_target) * nckd, rtol=1e-4, atol=1e-6)
    assert (tckd >= -1e-6).all() and (nckd >= -1e-6).all()


def test_identical_logits_give_zero_distillation():
    logits = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    assert dkd_loss(logits, logits, targets).abs().item() < 1e-5


def test_confident_student_stays_finite():
    targets = torch.tensor([0, 1, 2, 3])
    student = ModelOutput((60.0 * F.one_hot(targets, 4).float()).requires_grad_(True))
    teacher = ModelOutput(torch.randn(4, 4))
    loss = DKDLoss()(student, [teacher], targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.logits.grad).all()


def test_the_loss_passes_the_generic_loss_checks():
    loss = testing.build_component("loss", "dkd", {"beta": 2.0, "temperature": 2.0}, extra_plugins=[plugin])
    assert isinstance(loss, DKDLoss) and loss.params.beta == 2.0
    assert testing.check_loss(loss, num_classes=10) > 0
    assert testing.check_loss(loss, teachers=3) > 0  # an ensemble: logits averaged


def test_parameters_are_validated_like_a_recipe():
    with pytest.raises(RecipeError) as error:
        testing.build_component("loss", "dkd", {"beta": -1.0}, extra_plugins=[plugin])
    assert "loss.beta" in str(error.value) and "must be >= 0" in str(error.value)
    with pytest.raises(RecipeError, match="unknown key 'gamma'"):
        testing.build_component("loss", "dkd", {"gamma": 1.0}, extra_plugins=[plugin])


def test_warmup_ramps_per_training_step_and_is_saved():
    loss = DKDLoss(DKDLoss.Params(warmup_steps=4, ce_weight=0.0))
    student, teachers, targets = testing.random_outputs(8, 5, seed=3)
    full = dkd_loss(student.logits, teachers[0].logits, targets)
    values = [loss(student, teachers, targets).item() for _ in range(6)]
    expected = [full.item() * min(step / 4, 1.0) for step in range(1, 7)]
    assert values == pytest.approx(expected, rel=1e-5)

    state = loss.state_dict()  # what last.pt stores as loss_state
    assert int(state["steps"]) == 6
    resumed = DKDLoss(DKDLoss.Params(warmup_steps=10, ce_weight=0.0))
    resumed.load_state_dict(state)
    assert resumed(student, teachers, targets).item() == pytest.approx(full.item() * 0.7, rel=1e-5)

    resumed.eval()  # validation does not advance the ramp
    with torch.no_grad():
        resumed(student, teachers, targets)
    assert int(resumed.steps) == 7


def test_the_host_registers_both_components():
    host = testing.make_host(plugin)
    assert host.registry("loss").provider("dkd") == "pyramidkd_dkd.plugin"
    assert "dkd" in host.registry("scheme")


def test_tiny_run_with_the_dkd_scheme():
    summary = testing.run_tiny(testing.tiny_recipe(scheme="dkd"), extra_plugins=[plugin])
    student = summary["stages"][-1]
    assert student["stage"] == "student" and student["loss"] == "dkd"
    assert student["teachers"][0]["stage"] == "teacher"
    assert 0.0 <= student["test_acc"] <= 1.0


def test_tiny_run_with_the_dkd_loss_in_the_kd_scheme(tmp_path):
    recipe = testing.tiny_recipe(loss="dkd", loss_params={"beta": 2.0, "warmup_steps": 3})
    summary = testing.run_tiny(recipe, extra_plugins=[plugin], overrides=["train.epochs=2"], workdir=tmp_path)
    assert [s["loss"] for s in summary["stages"]] == ["ce", "dkd"]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_entry_point_of_the_installed_distribution():
    try:
        importlib.metadata.distribution("pyramidkd-dkd")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyramidkd-dkd is not installed (pip install examples/pyramidkd-dkd)")
    host = testing.make_host(entry_points=True)
    assert host.registry("loss").provider("dkd") == "dkd"
    assert host.origins["dkd"].distribution == "pyramidkd-dkd"
    summary = testing.run_tiny(testing.tiny_recipe(scheme="dkd"), entry_points=True)
    assert summary["stages"][-1]["loss"] == "dkd"
