"""The method-zoo losses with trainable modules (``cc``, ``vid``, ``ofd``, ``reviewkd``)
against their papers' formulas as the reference code bases compute them, written out
here in float64 from elementary tensor operations (loops over stages, samples, channels
and kernel offsets; no ``torch.nn.functional`` and none of the plugins' helpers), with
the losses' modules set to known weights: value and gradient w.r.t. the student's
features; then the modules' registration, bf16, channels_last, warm-up and the errors.

References: RepDistiller distiller_zoo/CC.py (Correlation) with train_student.py's
LinearEmbed on feat[-1] (models/util.py); RepDistiller distiller_zoo/VID.py (VIDLoss) and
mdistiller mdistiller/distillers/VID.py (vid_loss); mdistiller
mdistiller/distillers/OFD.py (feat_loss, ConnectorConvBN, init_ofd_modules' margins,
ofd_loss's 1 / 2^(n-i-1) and teacher pooling); mdistiller
mdistiller/distillers/ReviewKD.py (ABF, hcl_loss, the warm-up); defaults from
mdistiller/engine/cfg.py, configs/cifar100/reviewkd.yaml and RepDistiller's
scripts/run_cifar_distill.sh (cc: -b 0.02)."""

from __future__ import annotations

import math

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, RecipeError, UserError

BATCH = 4
EPS_BN = 1e-5
# The teacher is wider; its second stage is smaller spatially; the student has a third
# stage more (ofd and reviewkd align the last stages, vid pairs the first).
STUDENT = {"feat.1": (4, 8, 8), "feat.2": (6, 4, 4), "feat.3": (3, 2, 2)}
TEACHER = {"feat.1": (5, 8, 8), "feat.2": (7, 2, 2)}


def _features(shapes, seed, pooled_dim):
    generator = torch.Generator().manual_seed(seed)
    feats = {}
    for name, shape in shapes.items():
        preact = torch.randn(BATCH, *shape, generator=generator, dtype=torch.float64) + 0.3
        feats["preact" + name[4:]] = preact
        feats[name] = preact.clamp_min(0)  # the stage output: after the ReLU
    feats["pooled"] = torch.randn(BATCH, pooled_dim, generator=generator, dtype=torch.float64)
    return feats


def _outputs(seed=0, student_shapes=STUDENT, teacher_shapes=TEACHER):
    student, teacher = _features(student_shapes, seed, 6), _features(teacher_shapes, seed + 100, 9)
    logits = torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 1])
    return student, teacher, logits, targets


def _built(name, student, teacher, logits, params=None, seed=7):
    """The loss with its modules built (setup), in float64, every parameter set to known values."""
    loss = testing.build_component("loss", name, {"ce_weight": 0.0, **(params or {})})
    loss.setup(ModelOutput(logits, student), [ModelOutput(logits, teacher)])
    loss.double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in loss.parameters():
            parameter.copy_(0.6 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return loss


def _weights(loss):
    return {name: p.detach().clone() for name, p in loss.named_parameters()}


def _value_and_grads(function, student):
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in student.items()}
    value = function(leaves)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach(), {n: (g if g is not None else torch.zeros_like(leaves[n])) for n, g in zip(leaves, grads)}


def _assert_matches(loss, formula, student, teacher, logits, targets):
    weights = _weights(loss)
    ours = _value_and_grads(lambda s: loss(ModelOutput(logits, s), [ModelOutput(logits, teacher)], targets), student)
    expected = _value_and_grads(lambda s: formula(s, teacher, weights), student)
    torch.testing.assert_close(ours[0], expected[0], rtol=1e-9, atol=1e-12)
    assert expected[0].abs() > 0
    for name in student:
        torch.testing.assert_close(ours[1][name], expected[1][name], rtol=1e-8, atol=1e-11, msg=f"gradient w.r.t. {name}")
    assert any(g.abs().sum() > 0 for g in ours[1].values())


# --- elementary operations, written out -------------------------------------------


def conv1x1(x, weight, bias=None):
    out = torch.stack([sum(weight[o, c, 0, 0] * x[:, c] for c in range(x.shape[1])) for o in range(weight.shape[0])], 1)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def conv3x3(x, weight):
    """Zero padding 1, stride 1."""
    h, w = x.shape[-2:]
    padded = torch.zeros(x.shape[0], x.shape[1], h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    return sum(conv1x1(padded[:, :, dy:dy + h, dx:dx + w], weight[:, :, dy:dy + 1, dx:dx + 1]) for dy in range(3) for dx in range(3))


def batch_norm_train(x, gamma, beta):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS_BN) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def relu(x):
    return torch.where(x > 0, x, torch.zeros_like(x))


def adaptive_avg(x, out_h, out_w):
    h, w = x.shape[-2:]
    rows = [(i * h // out_h, -(-(i + 1) * h // out_h)) for i in range(out_h)]
    cols = [(j * w // out_w, -(-(j + 1) * w // out_w)) for j in range(out_w)]
    return torch.stack([torch.stack([x[..., r0:r1, c0:c1].mean(dim=(-2, -1)) for c0, c1 in cols], -1) for r0, r1 in rows], -2)


def nearest(x, out_h, out_w):
    h, w = x.shape[-2:]
    rows = [math.floor(i * h / out_h) for i in range(out_h)]
    cols = [math.floor(j * w / out_w) for j in range(out_w)]
    return x[..., rows, :][..., cols]


def mse(a, b):
    return ((a - b) ** 2).mean()


# --- the papers' terms --------------------------------------------------------------


def cc_formula(s, t, w):
    """(1/(N-1)) Σ_i Σ_d |Δ_i,d| |Δ_i+1,d|, Δ = W_s f_s + b_s − (W_t f_t + b_t)."""
    e_s = s["pooled"] @ w["embed_s.linear.weight"].T + w["embed_s.linear.bias"]
    e_t = t["pooled"] @ w["embed_t.linear.weight"].T + w["embed_t.linear.bias"]
    delta = (e_s - e_t).abs()
    return sum(sum(delta[i, d] * delta[i + 1, d] for d in range(delta.shape[1])) for i in range(BATCH - 1)) / (BATCH - 1)


def vid_formula(s, t, w, eps=1e-5):
    total = 0.0
    for k in (1, 2):  # stages paired by index: feat.1, feat.2
        f_s, f_t = s[f"feat.{k}"], t[f"feat.{k}"]
        h, wd = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
        f_s, f_t = adaptive_avg(f_s, h, wd), adaptive_avg(f_t, h, wd)
        i = k - 1
        mean = conv1x1(relu(conv1x1(relu(conv1x1(f_s, w[f"regressors.{i}.0.weight"])), w[f"regressors.{i}.2.weight"])), w[f"regressors.{i}.4.weight"])
        variance = (torch.log(1.0 + torch.exp(w[f"log_scales.{i}"])) + eps).view(1, -1, 1, 1)
        total = total + (0.5 * ((mean - f_t) ** 2 / variance + torch.log(variance))).mean()
    return total


def ofd_margin(teacher_map):
    """Per channel E[x | x < 0] of the Gaussian with the map's batch mean and std (−3σ when P(x<0) ≤ 0.001)."""
    margins = []
    for c in range(teacher_map.shape[1]):
        values = teacher_map[:, c].flatten()
        m = values.mean().item()
        sd = math.sqrt(((values - m) ** 2).mean().item())
        below = 0.5 * math.erfc((m / sd) / math.sqrt(2))
        margins.append(m - sd * math.exp(-(m / sd) ** 2 / 2) / math.sqrt(2 * math.pi) / below if below > 0.001 else -3 * sd)
    return torch.tensor(margins, dtype=torch.float64).view(1, -1, 1, 1)


def ofd_formula(s, t, w):
    pairs = [("preact.2", "preact.1"), ("preact.3", "preact.2")]  # the last two stages of each
    total = 0.0
    for i, (ours, theirs) in enumerate(pairs):
        source = batch_norm_train(conv1x1(s[ours], w[f"connectors.{i}.0.weight"]), w[f"connectors.{i}.1.weight"], w[f"connectors.{i}.1.bias"])
        target = adaptive_avg(t[theirs], *source.shape[-2:])
        margin = ofd_margin(t[theirs]).expand_as(target)
        loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin))
                + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0))
                + (source - target) ** 2 * (target > 0))
        total = total + loss.sum() / BATCH / 2 ** (len(pairs) - i - 1)
    return total


def abf(w, prefix, x, below, out_size):
    x = batch_norm_train(conv1x1(x, w[f"{prefix}.conv1.0.weight"]), w[f"{prefix}.conv1.1.weight"], w[f"{prefix}.conv1.1.bias"])
    if below is not None:
        below = nearest(below, *x.shape[-2:])
        z = torch.sigmoid(conv1x1(torch.cat([x, below], 1), w[f"{prefix}.att_conv.0.weight"], w[f"{prefix}.att_conv.0.bias"]))
        x = x * z[:, 0:1] + below * z[:, 1:2]
    if tuple(x.shape[-2:]) != tuple(out_size):
        x = nearest(x, *out_size)
    return batch_norm_train(conv3x3(x, w[f"{prefix}.conv2.0.weight"]), w[f"{prefix}.conv2.1.weight"], w[f"{prefix}.conv2.1.bias"]), x


def hcl(fs, ft):
    loss, weight, weights = mse(fs, ft), 1.0, 1.0
    for size in (4, 2, 1):
        if size < fs.shape[2]:
            weight /= 2
            loss = loss + weight * mse(adaptive_avg(fs, size, size), adaptive_avg(ft, size, size))
            weights += weight
    return loss / weights


def reviewkd_formula(s, t, w):
    """Student feat.2, feat.3, pooled against teacher preact.1, preact.2, pooled; fused deepest first."""
    student = [s["feat.2"], s["feat.3"], s["pooled"].view(BATCH, -1, 1, 1)]
    teacher = [t["preact.1"], t["preact.2"], t["pooled"].view(BATCH, -1, 1, 1)]
    out, fused = abf(w, "abfs.0", student[2], None, (1, 1))
    outputs = [out]
    for index, level in ((1, 1), (2, 0)):
        out, fused = abf(w, f"abfs.{index}", student[level], fused, teacher[level].shape[-2:])
        outputs.insert(0, out)
    return sum(hcl(o, target) for o, target in zip(outputs, teacher))


FORMULAS = {"cc": cc_formula, "vid": vid_formula, "ofd": ofd_formula, "reviewkd": reviewkd_formula}
DEFAULTS = {"cc": {"ce_weight": 1.0, "feat_weight": 0.02, "feat_dim": 128},
            "vid": {"ce_weight": 1.0, "feat_weight": 1.0, "init_var": 5.0, "eps": 1e-5},
            "ofd": {"ce_weight": 1.0, "feat_weight": 1e-3},
            "reviewkd": {"ce_weight": 1.0, "reviewkd_weight": 5.0, "warmup": 20}}
TERM_ONLY = {"cc": {"feat_weight": 1.0, "feat_dim": 5}, "vid": {"feat_weight": 1.0}, "ofd": {"feat_weight": 1.0},
             "reviewkd": {"reviewkd_weight": 1.0, "warmup": 0}}


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_the_term_matches_the_paper(name):
    student, teacher, logits, targets = _outputs()
    loss = _built(name, student, teacher, logits, TERM_ONLY[name])
    _assert_matches(loss, FORMULAS[name], student, teacher, logits, targets)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_defaults_are_the_references_and_ce_is_added(name):
    assert {key: getattr(testing.build_component("loss", name).params, key) for key in DEFAULTS[name]} == DEFAULTS[name]
    student, teacher, logits, targets = _outputs(seed=1)
    params = {key: value for key, value in DEFAULTS[name].items() if key != "ce_weight"}
    if name == "reviewkd":
        params["warmup"] = 0
    loss = _built(name, student, teacher, logits, {**params, "feat_dim": 5} if name == "cc" else params)
    loss.params.ce_weight = 1.0
    weight = loss.params.reviewkd_weight if name == "reviewkd" else loss.params.feat_weight
    total = loss(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets)
    cross_entropy = -torch.log_softmax(logits, 1)[torch.arange(BATCH), targets].mean()
    torch.testing.assert_close(total, weight * FORMULAS[name](student, teacher, _weights(loss)) + cross_entropy, rtol=1e-9, atol=1e-12)


def test_vid_starts_at_the_initial_variance():
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", "vid", {"init_var": 3.0, "eps": 1e-3})
    loss(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets)
    for log_scale in loss.log_scales:
        torch.testing.assert_close(torch.log1p(torch.exp(log_scale.double())) + 1e-3, torch.full_like(log_scale.double(), 3.0))


def test_ofd_margin_is_the_gaussian_tail_mean():
    """E[x | x < 0] of N(μ, σ²) by numerical integration, against the margins OFD applies:
    with the student far above everything, each element's loss is (s − max(t, m))²."""
    from pyramidkd.plugins.losses.ofd import gaussian_margin

    mean, std = torch.tensor([0.5, -1.0, 0.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    grid = torch.linspace(-30, 0, 300001, dtype=torch.float64)
    for m, sd, margin in zip(mean.tolist(), std.tolist(), gaussian_margin(mean, std).tolist()):
        density = torch.exp(-0.5 * ((grid - m) / sd) ** 2)
        tail = 0.5 * math.erfc((m / sd) / math.sqrt(2))
        expected = (grid * density).sum() / density.sum() if tail > 0.001 else -3 * sd
        assert margin == pytest.approx(float(expected), abs=1e-4)


def test_reviewkd_warms_up_linearly_over_the_epochs():
    student, teacher, logits, targets = _outputs()
    loss = _built("reviewkd", student, teacher, logits, {"warmup": 20})
    values = {}
    for epoch in (1, 5, 10, 20, 40):
        loss.start_epoch(epoch)
        values[epoch] = loss(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets).item()
    full = reviewkd_formula(student, teacher, _weights(loss)).item() * 5.0
    assert values == pytest.approx({1: full / 20, 5: full / 4, 10: full / 2, 20: full, 40: full}, rel=1e-9)


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_modules_are_built_in_setup_and_trained(name):
    """setup builds them, so the engine puts them in the optimiser, the checkpoint and
    DDP's gradient sync; the same weights loaded into a fresh loss give the same value."""
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", name)
    assert list(loss.parameters()) == []
    loss.setup(ModelOutput(logits.float(), {k: v.float() for k, v in student.items()}), [ModelOutput(logits.float(), {k: v.float() for k, v in teacher.items()})])
    parameters = dict(loss.named_parameters())
    assert parameters and all(p.requires_grad and p.dtype == torch.float32 for p in parameters.values())
    assert set(parameters) <= set(loss.state_dict())
    again = testing.build_component("loss", name)
    again.setup(ModelOutput(logits, student), [ModelOutput(logits, teacher)])
    again.load_state_dict(loss.state_dict())
    call = lambda l: l(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets)  # noqa: E731
    torch.testing.assert_close(call(again), call(loss))
    call(loss).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.parameters())


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_modules_are_built_on_the_first_call_without_setup(name):
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", name)
    value = loss(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets)
    assert torch.isfinite(value) and list(loss.parameters())


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_bf16_and_channels_last_give_the_fp32_loss(name):
    student, teacher, logits, targets = _outputs(seed=5)
    loss = testing.build_component("loss", name)

    def run(convert):
        leaves = {key: convert(value).detach().requires_grad_(True) for key, value in student.items()}
        value = loss(ModelOutput(logits.float(), leaves), [ModelOutput(logits.float(), {k: convert(v) for k, v in teacher.items()})], targets)
        value.backward()
        assert any(leaf.grad is not None for leaf in leaves.values())
        assert all(torch.isfinite(leaf.grad.float()).all() for leaf in leaves.values() if leaf.grad is not None)
        return value.detach()

    reference = run(lambda t: t.float())
    last = run(lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.float())
    torch.testing.assert_close(last, reference, rtol=1e-5, atol=1e-6)
    half = run(lambda t: t.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=5e-2, atol=5e-2 * reference.abs().item() + 1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the loop calls losses under autocast: the term stays float32
        assert run(lambda t: t.float()).dtype == torch.float32


TAPS = {"cc": (("pooled",), ("pooled",)), "vid": (("feat.*",), ("feat.*",)), "ofd": (("preact.*",), ("preact.*",)),
        "reviewkd": (("feat.*", "pooled"), ("preact.*", "pooled"))}


@pytest.mark.parametrize("name", sorted(TAPS))
def test_losses_declare_the_features_they_read(name):
    loss = testing.build_component("loss", name)
    assert loss.needs_teacher and (loss.student_taps(), loss.teacher_taps()) == TAPS[name]


@pytest.mark.parametrize("name, tap", [("cc", "pooled"), ("vid", "feat.2"), ("ofd", "preact.3"), ("reviewkd", "feat.3")])
def test_features_the_modules_were_not_built_for_are_refused_by_tap(name, tap):
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", name)
    loss.setup(ModelOutput(logits, student), [ModelOutput(logits, teacher)])
    wider = dict(student)
    wider[tap] = torch.cat([student[tap], student[tap]], dim=1)
    with pytest.raises(UserError, match=f"loss {name!r}: its modules were built for student {tap} of shape") as error:
        loss(ModelOutput(logits, wider), [ModelOutput(logits, teacher)], targets)
    assert tap in str(error.value) and error.value.fix


@pytest.mark.parametrize("name, tap, role", [("vid", "feat.1", "student"), ("ofd", "preact.2", "teacher"), ("reviewkd", "preact.1", "teacher")])
def test_a_tap_that_is_not_a_feature_map_is_refused(name, tap, role):
    student, teacher, logits, targets = _outputs()
    flat = {"student": dict(student), "teacher": dict(teacher)}
    flat[role][tap] = flat[role][tap].flatten(1)
    with pytest.raises(UserError, match=rf"loss '{name}' reads feature maps \[N, C, H, W\], but the {role}'s tap '{tap}'") as error:
        testing.build_component("loss", name).setup(ModelOutput(logits, flat["student"]), [ModelOutput(logits, flat["teacher"])])
    assert "tap_points()" in error.value.fix


@pytest.mark.parametrize("name, missing, role", [("cc", "pooled", "teacher"), ("vid", "feat.1", "student"),
                                                 ("ofd", "preact.1", "teacher"), ("reviewkd", "pooled", "student")])
def test_a_missing_tap_is_named(name, missing, role):
    student, teacher, logits, targets = _outputs()
    outputs = {"student": dict(student), "teacher": dict(teacher)}
    family = missing.split(".")[0]
    outputs[role] = {k: v for k, v in outputs[role].items() if k.split(".")[0] != family}
    with pytest.raises(UserError, match=f"needs the {role}'s tap '{missing}'"):
        testing.build_component("loss", name)(ModelOutput(logits, outputs["student"]), [ModelOutput(logits, outputs["teacher"])], targets)


@pytest.mark.parametrize("name, params, message", [("cc", {"feat_dim": 0}, "must be > 0"), ("vid", {"init_var": 0.0}, "must be > 0"),
                                                   ("ofd", {"feat_weight": -1.0}, "must be >= 0"), ("reviewkd", {"warmup": -1}, "must be >= 0"),
                                                   ("reviewkd", {"feat_weight": 1.0}, "unknown key 'feat_weight'")])
def test_parameters_are_validated_like_a_recipe(name, params, message):
    with pytest.raises(RecipeError, match=message):
        testing.build_component("loss", name, params)
