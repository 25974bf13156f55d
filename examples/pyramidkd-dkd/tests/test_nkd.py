"""Tests of the nkd loss and scheme, written with pyramidkd's helpers (pyramidkd.testing)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, RecipeError

import pyramidkd_dkd.plugin as plugin
from pyramidkd_dkd import NKDLoss, nkd_loss


def paper_nkd(student, teacher, targets, temperature, gamma):
    """The paper's Eq. 8, one sample at a time: −T_t·log S_t − γλ²·Σ_(j≠t) T̂_j log Ŝ_j,
    with T̂, Ŝ the softmaxes at λ over the non-target classes only; batch mean."""
    total = 0.0
    for n in range(student.shape[0]):
        t = int(targets[n])
        others = [j for j in range(student.shape[1]) if j != t]
        target_part = -torch.softmax(teacher[n], 0)[t] * torch.log_softmax(student[n], 0)[t]
        s_hat = torch.log_softmax(student[n, others] / temperature, 0)
        t_hat = torch.softmax(teacher[n, others] / temperature, 0)
        total = total + target_part - gamma * temperature**2 * (t_hat * s_hat).sum()
    return total / student.shape[0]


@pytest.mark.parametrize("temperature, gamma", [(1.0, 1.5), (4.0, 0.5)])
def test_matches_the_paper_value_and_gradient(temperature, gamma):
    student, (teacher,), targets = testing.random_outputs(6, 5, seed=1)
    logits = student.logits.detach().double()
    ours_leaf = logits.clone().requires_grad_(True)
    ours = nkd_loss(ours_leaf, teacher.logits.double(), targets, temperature=temperature, gamma=gamma)
    ours.backward()
    ref_leaf = logits.clone().requires_grad_(True)
    expected = paper_nkd(ref_leaf, teacher.logits.double(), targets, temperature, gamma)
    expected.backward()
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_leaf.grad, ref_leaf.grad, rtol=1e-5, atol=1e-6)


def test_the_loss_adds_cross_entropy():
    student, teachers, targets = testing.random_outputs(8, 4, seed=2)
    loss = NKDLoss()
    expected = nkd_loss(student.logits, teachers[0].logits, targets) + F.cross_entropy(student.logits, targets)
    torch.testing.assert_close(loss(student, teachers, targets), expected)


def test_confident_student_stays_finite():
    targets = torch.tensor([0, 1, 2, 3])
    student = ModelOutput((60.0 * F.one_hot(targets, 4).float()).requires_grad_(True))
    loss = NKDLoss()(student, [ModelOutput(torch.randn(4, 4))], targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.logits.grad).all()


def test_the_loss_passes_the_generic_loss_checks():
    loss = testing.build_component("loss", "nkd", {"gamma": 1.0, "temperature": 2.0}, extra_plugins=[plugin])
    assert isinstance(loss, NKDLoss) and loss.params.gamma == 1.0
    assert testing.check_loss(loss, num_classes=10) > 0
    assert testing.check_loss(loss, teachers=3) > 0  # an ensemble: logits averaged


def test_parameters_are_validated_like_a_recipe():
    with pytest.raises(RecipeError) as error:
        testing.build_component("loss", "nkd", {"gamma": -1.0}, extra_plugins=[plugin])
    assert "loss.gamma" in str(error.value) and "must be >= 0" in str(error.value)
    with pytest.raises(RecipeError, match="unknown key 'beta'"):
        testing.build_component("loss", "nkd", {"beta": 1.0}, extra_plugins=[plugin])


def test_the_host_registers_both_components():
    host = testing.make_host(plugin)
    assert host.registry("loss").provider("nkd") == "pyramidkd_dkd.plugin"
    assert "nkd" in host.registry("scheme")


def test_tiny_run_with_the_nkd_scheme():
    summary = testing.run_tiny(testing.tiny_recipe(scheme="nkd"), extra_plugins=[plugin])
    student = summary["stages"][-1]
    assert student["stage"] == "student" and student["loss"] == "nkd"
    assert student["teachers"][0]["stage"] == "teacher"
    assert 0.0 <= student["test_acc"] <= 1.0


def test_tiny_run_with_the_nkd_loss_in_the_kd_scheme(tmp_path):
    recipe = testing.tiny_recipe(loss="nkd", loss_params={"gamma": 1.0, "temperature": 2.0})
    summary = testing.run_tiny(recipe, extra_plugins=[plugin], overrides=["train.epochs=2"], workdir=tmp_path)
    assert [s["loss"] for s in summary["stages"]] == ["ce", "nkd"]
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_entry_point_of_the_installed_distribution():
    try:
        importlib.metadata.distribution("pyramidkd-dkd")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyramidkd-dkd is not installed (pip install examples/pyramidkd-dkd)")
    host = testing.make_host(entry_points=True)
    assert host.registry("loss").provider("nkd") == "nkd"
    assert host.origins["nkd"].distribution == "pyramidkd-dkd"
    summary = testing.run_tiny(testing.tiny_recipe(scheme="nkd"), entry_points=True)
    assert summary["stages"][-1]["loss"] == "nkd"
