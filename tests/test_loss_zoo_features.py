"""The feature losses of the method zoo (``at``, ``nst``, ``sp``, ``pkt``, ``rkd``,
``kdsvd``) against their papers' formulas, written out here with loops over samples,
channels and stages in float64, independently of the plugins' helpers: value and
gradient w.r.t. the student's features, then bf16, channels_last and the errors.

Features are hand-made ``ModelOutput.features`` in the tap contract's names
(``feat.1`` … ``feat.K``, ``pooled``), as the kd scheme hands them to the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine import ModelOutput, RecipeError, UserError

BATCH = 4
# Two stages; the teacher is wider, and its first stage is twice as large spatially.
STUDENT_SHAPES = {"feat.1": (4, 4, 4), "feat.2": (6, 2, 2)}
TEACHER_SHAPES = {"feat.1": (5, 8, 8), "feat.2": (7, 2, 2)}


def _features(shapes, seed, pooled_dim, nonnegative=True):
    generator = torch.Generator().manual_seed(seed)
    feats = {name: torch.randn(BATCH, *shape, generator=generator, dtype=torch.float64) for name, shape in shapes.items()}
    if nonnegative:  # stage outputs after ReLU
        feats = {name: value.clamp_min(0) + 0.05 for name, value in feats.items()}
    feats["pooled"] = torch.randn(BATCH, pooled_dim, generator=generator, dtype=torch.float64)
    return feats


def _outputs(student_shapes=STUDENT_SHAPES, teacher_shapes=TEACHER_SHAPES, seed=0):
    student = _features(student_shapes, seed, 6)
    teacher = _features(teacher_shapes, seed + 100, 9)
    targets = torch.randint(0, 3, (BATCH,), generator=torch.Generator().manual_seed(seed))
    logits = torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return student, teacher, logits, targets


def _ours(loss, student, teacher, logits, targets):
    """(value, gradients w.r.t. every student feature) of the plugin, feature term only
    when its ce_weight is 0."""
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in student.items()}
    value = loss(ModelOutput(logits, leaves), [ModelOutput(logits.flip(0), teacher)], targets)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach().double(), _grads(leaves, grads)


def _expected(formula, student, teacher):
    leaves = {name: value.detach().clone().requires_grad_(True) for name, value in student.items()}
    value = formula(leaves, teacher)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach(), _grads(leaves, grads)


def _grads(leaves, grads):
    return {name: (g if g is not None else torch.zeros_like(leaves[name])) for name, g in zip(leaves, grads)}


def _assert_matches(ours, expected, rtol=1e-6, atol=1e-10):
    torch.testing.assert_close(ours[0], expected[0], rtol=rtol, atol=atol)
    for name in expected[1]:
        torch.testing.assert_close(ours[1][name], expected[1][name], rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")


def _pool_pair(f_s, f_t):
    """The references' adaptive average pooling of the larger map to the smaller."""
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    return F.adaptive_avg_pool2d(f_s, (h, w)), F.adaptive_avg_pool2d(f_t, (h, w))


# --- formulas, written out ------------------------------------------------------------


def at_formula(student, teacher, p=2.0):
    """Zagoruyko & Komodakis 2017, Eq. 2: Q = vec(Σ_c |A_c|^p / C) / ‖·‖₂, per stage
    mean_(n, position) (Q_s − Q_t)², summed over stages."""
    total = 0
    for stage in ("feat.1", "feat.2"):
        f_s, f_t = _pool_pair(student[stage], teacher[stage])
        for n in range(BATCH):
            q = []
            for f in (f_s[n], f_t[n]):
                a = sum(f[c].abs() ** p for c in range(f.shape[0])).flatten() / f.shape[0]
                q.append(a / torch.sqrt((a * a).sum()))
            total = total + ((q[0] - q[1]) ** 2).sum() / (BATCH * q[0].numel())
    return total


def nst_formula(student, teacher):
    """Huang & Wang 2017, Eq. 5 with the polynomial kernel (d = 2, c = 0): per stage
    and sample, the channels' maps normalised, MMD² = mean k(t, t') + mean k(s, s')
    − 2 mean k(s, t); averaged over the batch, summed over stages."""
    def kernel_mean(a, b):
        return sum(float(0) + (a[i] @ b[j]) ** 2 for i in range(len(a)) for j in range(len(b))) / (len(a) * len(b))

    total = 0
    for stage in ("feat.1", "feat.2"):
        f_s, f_t = _pool_pair(student[stage], teacher[stage])
        for n in range(BATCH):
            s = [row / row.norm() for row in f_s[n].flatten(1)]
            t = [row / row.norm() for row in f_t[n].flatten(1)]
            total = total + (kernel_mean(t, t) + kernel_mean(s, s) - 2 * kernel_mean(s, t)) / BATCH
    return total


def sp_formula(student, teacher):
    """Tung & Mori 2019, Eqs. 1-4 on the last stage: G = Q Qᵀ row-normalised,
    ‖G_t − G_s‖²_F / b²."""
    def similarity(f):
        q = f.reshape(BATCH, -1)
        g = torch.stack([torch.stack([q[i] @ q[j] for j in range(BATCH)]) for i in range(BATCH)])
        return torch.stack([row / row.norm() for row in g])

    return ((similarity(teacher["feat.2"]) - similarity(student["feat.2"])) ** 2).sum() / BATCH**2


def pkt_formula(student, teacher, eps=1e-7):
    """Passalis & Tefas 2018, Eqs. 8-11 with the cosine kernel K = (cos + 1) / 2,
    P_(i|j) = K_ij / Σ_k K_ik, and mean over (i, j) of P_t log((P_t + ε) / (P_s + ε))."""
    def conditional(e):
        unit = [row / (row.norm() + eps) for row in e]
        k = [[(unit[i] @ unit[j] + 1) / 2 for j in range(BATCH)] for i in range(BATCH)]
        return [[k[i][j] / sum(k[i]) for j in range(BATCH)] for i in range(BATCH)]

    p_s, p_t = conditional(student["pooled"]), conditional(teacher["pooled"])
    return sum(p_t[i][j] * torch.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(BATCH) for j in range(BATCH)) / BATCH**2


def _huber(x, y):
    d = (x - y).abs()
    return 0.5 * d * d if d < 1 else d - 0.5


def rkd_formula(student, teacher, w_d=25.0, w_a=50.0):
    """Park et al. 2019, Eqs. 3-7: ψ_D = ‖e_i − e_j‖ / μ (μ the mean over the pairs i ≠ j),
    ψ_A = ⟨(e_i − e_j)/‖·‖, (e_k − e_j)/‖·‖⟩, both by the Huber (smooth L1) loss, means
    over the N² pairs and N³ triples (with the zero diagonal entries, as the reference)."""
    def distances(e):
        d = [[(e[i] - e[j]).norm() if i != j else e[i].sum() * 0 for j in range(BATCH)] for i in range(BATCH)]
        mu = sum(d[i][j] for i in range(BATCH) for j in range(BATCH) if i != j) / (BATCH * (BATCH - 1))
        return [[d[i][j] / mu for j in range(BATCH)] for i in range(BATCH)]

    def unit(v):
        return v / v.norm() if v.norm() > 0 else v * 0

    def angle(e, i, j, k):
        return unit(e[i] - e[j]) @ unit(e[k] - e[j])

    e_s, e_t = student["pooled"], teacher["pooled"]
    d_s, d_t = distances(e_s), distances(e_t)
    distance = sum(_huber(d_s[i][j], d_t[i][j]) for i in range(BATCH) for j in range(BATCH)) / BATCH**2
    triples = [(i, j, k) for j in range(BATCH) for i in range(BATCH) for k in range(BATCH)]
    angle_loss = sum(_huber(angle(e_s, i, j, k), angle(e_t, i, j, k)) for i, j, k in triples) / BATCH**3
    return w_d * distance + w_a * angle_loss


def kdsvd_formula(student, teacher, k=1, stages=("feat.1", "feat.2")):
    """Lee et al. 2018, Sec. 3: per sample, X = [H·W, C] (the map's positions as rows),
    X = U Σ Vᵀ; the teacher's first k right singular vectors and the student's k + 3,
    normalised; each teacher vector takes the student vector of largest |cos| (with its
    sign); both scaled by the teacher's normalised singular values; the relation of
    consecutive stages is exp(−(v_l,c − v_(l−1),c')² / 8) and the loss Σ ‖R_s − R_t‖² / N."""
    total, previous = 0, None
    for stage in stages:
        current = []
        for n in range(BATCH):
            vectors = []
            for f, count in ((teacher[stage][n], k), (student[stage][n], k + 3)):
                x = f.permute(1, 2, 0).reshape(-1, f.shape[0])  # [H·W, C]
                _, values, vh = torch.linalg.svd(x, full_matrices=False)
                columns = [vh[i] / vh[i].norm() for i in range(min(count, vh.shape[0]))]
                vectors.append((columns, values[:count] / values[:count].norm()))
            (v_t, s_t), (v_s, _) = vectors
            aligned = []
            for j in range(k):
                cosines = [v @ v_t[j] for v in v_s]
                best = max(range(len(v_s)), key=lambda i: abs(float(cosines[i].detach())))
                aligned.append(torch.sign(cosines[best]) * v_s[best] * s_t[j])
            current.append(([v * s_t[j] for j, v in enumerate(v_t)], aligned))
        if previous is not None:
            for n in range(BATCH):
                for j in range(k):
                    (t_now, s_now), (t_before, s_before) = current[n], previous[n]
                    rbf_s = torch.exp(-(s_now[j][:, None] - s_before[j][None, :]) ** 2 / 8)
                    rbf_t = torch.exp(-(t_now[j][:, None] - t_before[j][None, :]) ** 2 / 8)
                    total = total + ((rbf_s - rbf_t) ** 2).sum() / BATCH
        previous = current
    return total


SAME_WIDTH = {"feat.1": (4, 5, 3), "feat.2": (5, 2, 4)}  # kdsvd needs equal channels; non-square maps

CASES = {
    # name: (formula, default feat_weight, student shapes, teacher shapes, reference)
    "at": (at_formula, 1000.0, STUDENT_SHAPES, TEACHER_SHAPES),
    "nst": (nst_formula, 50.0, STUDENT_SHAPES, TEACHER_SHAPES),
    "sp": (sp_formula, 3000.0, STUDENT_SHAPES, TEACHER_SHAPES),
    "pkt": (pkt_formula, 30000.0, STUDENT_SHAPES, TEACHER_SHAPES),
    "rkd": (rkd_formula, 1.0, STUDENT_SHAPES, TEACHER_SHAPES),
    "kdsvd": (kdsvd_formula, 1.0, SAME_WIDTH, {"feat.1": (4, 6, 3), "feat.2": (5, 3, 2)}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_feature_term_matches_the_paper(name):
    """References (the term and its defaults): RepDistiller distiller_zoo/AT.py (Attention,
    lines 7-36), NST.py (NSTLoss, lines 8-43), SP.py (Similarity, lines 8-33), PKT.py
    (cosine_similarity_loss, lines 17-45), RKDLoss.py (forward and pdist, lines 9-56),
    KDSVD.py (lines 8-79: its view(-1, C, H*H) equals [N, H·W, C] only for square maps,
    the maps here are not); mdistiller mdistiller/distillers/{AT,NST,SP,PKT,RKD,KDSVD}.py
    for the same terms with the CE and feature weights of mdistiller/engine/cfg.py."""
    formula, feat_weight, student_shapes, teacher_shapes = CASES[name]
    student, teacher, logits, targets = _outputs(student_shapes, teacher_shapes)
    loss = testing.build_component("loss", name, {"ce_weight": 0.0, "feat_weight": 1.0})
    _assert_matches(_ours(loss, student, teacher, logits, targets), _expected(formula, student, teacher))
    default = testing.build_component("loss", name)
    assert default.params.feat_weight == feat_weight and default.params.ce_weight == 1.0
    total = default(ModelOutput(logits, student), [ModelOutput(logits, teacher)], targets)
    expected = feat_weight * formula(student, teacher) + F.cross_entropy(logits, targets)
    torch.testing.assert_close(total.double(), expected, rtol=1e-6, atol=1e-8)


def test_at_with_another_exponent():
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", "at", {"ce_weight": 0.0, "feat_weight": 1.0, "p": 3.0})
    _assert_matches(_ours(loss, student, teacher, logits, targets), _expected(lambda s, t: at_formula(s, t, p=3.0), student, teacher))


def test_rkd_weights():
    student, teacher, logits, targets = _outputs(seed=3)
    loss = testing.build_component("loss", "rkd", {"ce_weight": 0.0, "distance_weight": 1.0, "angle_weight": 2.0})
    _assert_matches(_ours(loss, student, teacher, logits, targets),
                    _expected(lambda s, t: rkd_formula(s, t, 1.0, 2.0), student, teacher))


def test_kdsvd_with_more_singular_vectors():
    student, teacher, logits, targets = _outputs(SAME_WIDTH, {"feat.1": (4, 6, 3), "feat.2": (5, 3, 2)}, seed=4)
    loss = testing.build_component("loss", "kdsvd", {"ce_weight": 0.0, "k": 2})
    _assert_matches(_ours(loss, student, teacher, logits, targets), _expected(lambda s, t: kdsvd_formula(s, t, k=2), student, teacher))


@pytest.mark.parametrize("name", sorted(CASES))
def test_losses_declare_their_taps(name):
    loss = testing.build_component("loss", name)
    expected = ("pooled",) if name in ("pkt", "rkd") else ("feat.*",)
    assert loss.needs_teacher and loss.student_taps() == expected and loss.teacher_taps() == expected


@pytest.mark.parametrize("name", sorted(CASES))
def test_bf16_and_channels_last_give_the_fp32_loss(name):
    _, _, student_shapes, teacher_shapes = CASES[name]
    student, teacher, logits, targets = _outputs(student_shapes, teacher_shapes, seed=5)
    loss = testing.build_component("loss", name)

    def run(convert):
        leaves = {key: convert(value).detach().requires_grad_(True) for key, value in student.items()}
        value = loss(ModelOutput(logits.float(), leaves), [ModelOutput(logits.float(), {k: convert(v) for k, v in teacher.items()})], targets)
        value.backward()
        assert all(torch.isfinite(leaf.grad.float()).all() for leaf in leaves.values() if leaf.grad is not None)
        return value.detach()

    reference = run(lambda t: t.float())
    last = run(lambda t: t.float().contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t.float())
    torch.testing.assert_close(last, reference, rtol=1e-5, atol=1e-6)
    half = run(lambda t: t.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, reference, rtol=5e-2, atol=5e-2 * reference.abs().item() + 1e-3)


def test_a_missing_tap_is_named():
    student, teacher, logits, targets = _outputs()
    loss = testing.build_component("loss", "pkt")
    with pytest.raises(UserError, match="needs the teacher's tap 'pooled'") as error:
        loss.setup(ModelOutput(logits, student), [ModelOutput(logits, {"feat.1": teacher["feat.1"]})])
    assert "tap_points()" in error.value.fix
    with pytest.raises(UserError, match="needs the student's tap 'feat.1'"):
        testing.build_component("loss", "at").setup(ModelOutput(logits, {"pooled": student["pooled"]}), [ModelOutput(logits, teacher)])


def test_kdsvd_refuses_unequal_widths_before_training():
    student, teacher, logits, targets = _outputs()
    with pytest.raises(UserError, match="stage feat.1 has 4 channels in the student and 5 in the teacher"):
        testing.build_component("loss", "kdsvd").setup(ModelOutput(logits, student), [ModelOutput(logits, teacher)])


def test_feature_losses_want_one_teacher():
    student, teacher, logits, targets = _outputs()
    with pytest.raises(UserError, match="2 teachers"):
        testing.build_component("loss", "sp")(ModelOutput(logits, student), [ModelOutput(logits, teacher)] * 2, targets)


@pytest.mark.parametrize("name, params, message", [("at", {"feat_weight": -1.0}, "must be >= 0"), ("at", {"p": 0.0}, "must be > 0"),
                                                   ("kdsvd", {"k": 0}, "must be > 0"), ("rkd", {"beta": 1.0}, "unknown key 'beta'")])
def test_parameters_are_validated_like_a_recipe(name, params, message):
    with pytest.raises(RecipeError, match=message):
        testing.build_component("loss", name, params)


def test_kdsvd_declares_equal_channels_for_the_check_before_training():
    """Loss.check_features (run by validate and before training) refuses unequal widths."""
    loss = testing.build_component("loss", "kdsvd")
    loss.check_features({"feat.1": (16, 8, 8), "feat.2": (32, 4, 4)}, {"feat.1": (16, 16, 16), "feat.2": (32, 8, 8)})
    with pytest.raises(UserError, match="feat.2"):
        loss.check_features({"feat.1": (16, 8, 8), "feat.2": (32, 4, 4)}, {"feat.1": (16, 8, 8), "feat.2": (64, 4, 4)})
    for name in ("at", "nst", "sp", "pkt", "rkd"):  # relations: any widths and sizes
        testing.build_component("loss", name).check_features({"feat.1": (4, 8, 8), "pooled": (8,)}, {"feat.1": (16, 4, 4), "pooled": (64,)})
