"""The logit losses of the method zoo (``kd`` with ``standardize`` and weights, ``dkd``,
``dist``) against their papers' formulas, written out here with per-sample loops in
float64, independently of the plugins' helpers: value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, RecipeError, ops


def _logits(batch=6, classes=5, seed=0, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    teacher = scale * torch.randn(batch, classes, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, targets


def _ours(loss, student, teacher, targets):
    """(value, gradient w.r.t. the student's logits) of a loss plugin."""
    leaf = student.detach().clone().requires_grad_(True)
    value = loss(ModelOutput(leaf), [ModelOutput(teacher)], targets)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().double(), grad


def _expected(formula, student, teacher, targets):
    leaf = student.detach().clone().requires_grad_(True)
    value = formula(leaf, teacher, targets)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _assert_matches(ours, expected, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(ours[0], expected[0], rtol=rtol, atol=atol)
    torch.testing.assert_close(ours[1], expected[1], rtol=rtol, atol=atol)


def _softmax_row(row):
    exps = [torch.exp(v - row.max()) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _ce(logits, targets):
    return sum(-torch.log_softmax(logits[n], 0)[targets[n]] for n in range(len(targets))) / len(targets)


def _zscore(row):
    """Sun et al. 2024, Eq. (standardisation): (z − mean) / (unbiased std + 1e-7)."""
    mean = sum(row) / len(row)
    std = torch.sqrt(sum((v - mean) ** 2 for v in row) / (len(row) - 1))
    return torch.stack([(v - mean) / (std + 1e-7) for v in row])


def _kd_term(student, teacher, temperature, standardize=False):
    """Hinton et al. 2015: T² · mean_n Σ_c p_t (log p_t − log p_s), p = softmax(z / T)."""
    total = 0
    for n in range(student.shape[0]):
        zs, zt = (_zscore(student[n]), _zscore(teacher[n])) if standardize else (student[n], teacher[n])
        ps, pt = _softmax_row(zs / temperature), _softmax_row(zt / temperature)
        total = total + sum(pt[c] * (torch.log(pt[c]) - torch.log(ps[c])) for c in range(len(pt)))
    return temperature**2 * total / student.shape[0]


# --- kd ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_kd_standardize_matches_logit_standardisation(backend):
    """Sun et al., "Logit Standardization in KD", CVPR 2024; reference
    sunshangquan/logit-standardization-KD mdistiller/distillers/KD.py (normalize, kd_loss,
    around lines 8-25): KD on z-scored logits, CE on the raw student logits; the
    published CIFAR-100 setting T 2, kd_weight 9, ce_weight 0.1."""
    if backend == "fused" and not ops.fused_available():
        pytest.skip("the fused op is not built")
    student, teacher, targets = _logits(seed=1)
    loss = testing.build_component("loss", "kd", {"standardize": True, "temperature": 2.0, "kd_weight": 9.0,
                                                  "ce_weight": 0.1, "backend": backend})
    expected = _expected(lambda s, t, y: 9.0 * _kd_term(s, t, 2.0, standardize=True) + 0.1 * _ce(s, y), student, teacher, targets)
    _assert_matches(_ours(loss, student, teacher, targets), expected)


def test_standardised_logits_are_invariant_to_shift_and_scale():
    student, teacher, targets = _logits(seed=2)
    loss = testing.build_component("loss", "kd", {"standardize": True, "ce_weight": 0.0, "kd_weight": 1.0})
    base = loss(ModelOutput(student), [ModelOutput(teacher)], targets)
    moved = loss(ModelOutput(3.0 * student + 7.0), [ModelOutput(0.5 * teacher - 2.0)], targets)
    torch.testing.assert_close(base, moved, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("params, weights", [({}, (0.9, 0.1)), ({"alpha": 0.5}, (0.5, 0.5)),
                                             ({"kd_weight": 2.0, "ce_weight": 0.5}, (2.0, 0.5)),
                                             ({"kd_weight": 9.0}, (9.0, 0.1)), ({"ce_weight": 1.0}, (0.9, 1.0)),
                                             ({"kd_weight": 0.0, "ce_weight": 1.0}, (0.0, 1.0))])
def test_kd_weights_default_to_alpha(params, weights):
    """Hinton KD, w_kd · KD + w_ce · CE, with w_kd = α and w_ce = 1 − α unless set."""
    student, teacher, targets = _logits(seed=3)
    loss = testing.build_component("loss", "kd", {**params, "backend": "eager"})
    w_kd, w_ce = weights
    expected = _expected(lambda s, t, y: w_kd * _kd_term(s, t, 4.0) + w_ce * _ce(s, y), student, teacher, targets)
    _assert_matches(_ours(loss, student, teacher, targets), expected)


def test_the_plain_alpha_form_is_the_op_call_it_was():
    """Default kd: exactly one op call with alpha (the quickstart's numbers do not move)."""
    student, teacher, targets = _logits(seed=4)
    loss = testing.build_component("loss", "kd", {"alpha": 0.7, "temperature": 2.0})
    op = ops.kd_loss if loss.use_fused else ops.kd_loss_eager
    assert torch.equal(loss(ModelOutput(student), [ModelOutput(teacher)], targets),
                       op(student, teacher, temperature=2.0, labels=targets, alpha=0.7))


@pytest.mark.parametrize("params, message", [
    ({"alpha": 0.5, "kd_weight": 1.0}, "alpha = 0.5 and kd_weight / ce_weight are both set"),
    ({"kd_weight": 0.0, "ce_weight": 0.0}, "both 0"),
    ({"kd_weight": -1.0}, "must be >= 0"),
])
def test_kd_refuses_contradictory_weights(params, message):
    with pytest.raises(RecipeError, match=message):
        testing.build_component("loss", "kd", params)


# --- dkd -----------------------------------------------------------------------------


def _dkd_formula(alpha, beta, temperature, standardize=False):
    """Zhao et al. 2022, Eqs. (1)-(8): per sample b = [p_t, 1 − p_t], TCKD = KL(b^T‖b^S),
    p̂_j = p_j / (1 − p_t) over j ≠ t, NCKD = KL(p̂^T‖p̂^S); T²(α·TCKD + β·NCKD), batch mean."""
    def formula(student, teacher, targets):
        total = 0
        for n in range(student.shape[0]):
            zs, zt = (_zscore(student[n]), _zscore(teacher[n])) if standardize else (student[n], teacher[n])
            ps, pt = _softmax_row(zs / temperature), _softmax_row(zt / temperature)
            y = int(targets[n])
            bs, bt = [ps[y], 1 - ps[y]], [pt[y], 1 - pt[y]]
            tckd = sum(bt[i] * torch.log(bt[i] / bs[i]) for i in range(2))
            others = [j for j in range(len(ps)) if j != y]
            nckd = sum((pt[j] / bt[1]) * torch.log((pt[j] / bt[1]) / (ps[j] / bs[1])) for j in others)
            total = total + alpha * tckd + beta * nckd
        return temperature**2 * total / student.shape[0]
    return formula


@pytest.mark.parametrize("alpha, beta, temperature, standardize", [(1.0, 8.0, 4.0, False), (0.5, 2.0, 1.0, False),
                                                                   (1.0, 8.0, 2.0, True)])
def test_dkd_matches_the_paper(alpha, beta, temperature, standardize):
    """Reference: mdistiller mdistiller/distillers/DKD.py, dkd_loss (lines 7-35: the
    -1000 target mask for NCKD, kl_div summed / batch, × T²) and DKD.forward_train
    (lines 56-76: CE + min(epoch / warmup, 1) · dkd_loss)."""
    student, teacher, targets = _logits(batch=5, classes=6, seed=5)
    params = {"alpha": alpha, "beta": beta, "temperature": temperature, "standardize": standardize, "warmup": 0}
    loss = testing.build_component("loss", "dkd", params)
    dkd = _dkd_formula(alpha, beta, temperature, standardize)
    _assert_matches(_ours(loss, student, teacher, targets), _expected(lambda s, t, y: dkd(s, t, y) + _ce(s, y), student, teacher, targets))


def test_dkd_warmup_follows_the_epoch():
    """min(epoch / 20, 1) with mdistiller's 1-based epoch: 1/20 before any epoch is announced."""
    student, teacher, targets = _logits(seed=6)
    loss = testing.build_component("loss", "dkd", {"ce_weight": 0.0})
    full = _dkd_formula(1.0, 8.0, 4.0)(student, teacher, targets)
    value = lambda: loss(ModelOutput(student), [ModelOutput(teacher)], targets)  # noqa: E731
    torch.testing.assert_close(value(), full / 20)
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (20, 1.0), (240, 1.0)]:
        loss.start_epoch(epoch)
        torch.testing.assert_close(value(), full * factor)
    off = testing.build_component("loss", "dkd", {"ce_weight": 0.0, "warmup": 0})
    torch.testing.assert_close(off(ModelOutput(student), [ModelOutput(teacher)], targets), full)


def test_dkd_is_kd_decomposed():
    """The paper's Eq. 7: KD = TCKD + (1 − p^T_t) · NCKD, per sample; with α = 1 and
    β = 1 − p^T_t for one sample, DKD equals Hinton's KD term."""
    student, teacher, targets = _logits(batch=1, seed=7)
    p_target = torch.softmax(teacher[0] / 4.0, 0)[targets[0]].item()
    loss = testing.build_component("loss", "dkd", {"ce_weight": 0.0, "warmup": 0, "beta": 1 - p_target})
    torch.testing.assert_close(loss(ModelOutput(student), [ModelOutput(teacher)], targets), _kd_term(student, teacher, 4.0))


def test_dkd_stays_finite_for_a_saturated_student():
    targets = torch.tensor([0, 1, 2, 3])
    student = ModelOutput((400.0 * F.one_hot(targets, 4).float()).requires_grad_(True))
    loss = testing.build_component("loss", "dkd", {"warmup": 0})
    value = loss(student, [ModelOutput(torch.randn(4, 4))], targets)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.logits.grad).all()


# --- dist ----------------------------------------------------------------------------


def _pearson(a, b):
    a_mean, b_mean = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - a_mean) * (y - b_mean) for x, y in zip(a, b))
    den = torch.sqrt(sum((x - a_mean) ** 2 for x in a)) * torch.sqrt(sum((y - b_mean) ** 2 for y in b))
    return num / (den + 1e-8)


def _dist_formula(beta, gamma, tau):
    """Huang et al. 2022, Eqs. (7)-(10): 1 − mean Pearson over samples (inter-class)
    and over classes (intra-class) of softmax(z / τ), × τ²."""
    def formula(student, teacher, targets):
        ys = torch.stack([torch.stack(_softmax_row(row / tau)) for row in student])
        yt = torch.stack([torch.stack(_softmax_row(row / tau)) for row in teacher])
        inter = 1 - sum(_pearson(ys[n], yt[n]) for n in range(ys.shape[0])) / ys.shape[0]
        intra = 1 - sum(_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])) / ys.shape[1]
        return tau**2 * (beta * inter + gamma * intra)
    return formula


@pytest.mark.parametrize("params, beta, gamma, tau", [({}, 2.0, 2.0, 4.0), ({"beta": 1.0, "gamma": 3.0, "temperature": 1.0}, 1.0, 3.0, 1.0)])
def test_dist_matches_the_paper(params, beta, gamma, tau):
    """Reference: hunto/DIST_KD classification/lib/models/losses/dist_kd.py (DIST.forward,
    lines 20-35); CIFAR-100: τ 4, β = γ = 1 with the authors' loss weight 2."""
    student, teacher, targets = _logits(batch=6, classes=5, seed=8)
    loss = testing.build_component("loss", "dist", params)
    dist = _dist_formula(beta, gamma, tau)
    _assert_matches(_ours(loss, student, teacher, targets), _expected(lambda s, t, y: dist(s, t, y) + _ce(s, y), student, teacher, targets))


# --- common --------------------------------------------------------------------------


@pytest.mark.parametrize("name, params", [("kd", {"standardize": True}), ("dkd", {}), ("dkd", {"standardize": True}),
                                          ("dist", {}), ("dist", {"standardize": True})])
def test_the_generic_loss_checks_pass(name, params):
    loss = testing.build_component("loss", name, params)
    assert loss.needs_teacher and tuple(getattr(loss, "taps", ())) == ()
    assert testing.check_loss(loss, num_classes=10) > 0
    assert testing.check_loss(loss, teachers=3) > 0  # an ensemble: the teachers' logits are averaged


@pytest.mark.parametrize("name, params", [("kd", {}), ("kd", {"standardize": True, "kd_weight": 9.0}),
                                          ("dkd", {}), ("dist", {})])
def test_bf16_logits_give_the_fp32_loss(name, params):
    student, teacher, targets = _logits(batch=16, classes=10, seed=9)
    loss = testing.build_component("loss", name, params)
    reference = loss(ModelOutput(student.float()), [ModelOutput(teacher.float())], targets)
    leaf = student.bfloat16().requires_grad_(True)
    value = loss(ModelOutput(leaf), [ModelOutput(teacher.bfloat16())], targets)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(leaf.grad.float()).all()
    torch.testing.assert_close(value, reference, rtol=3e-2, atol=3e-2)
