"""The two-stage methods ``ab`` (Activation Boundaries, Heo et al. AAAI 2019) and ``ft``
(Factor Transfer, Kim et al. NeurIPS 2018): their formulas against the references,
written out here in float64 from elementary operations (loops over stages, samples,
channels and positions); the schemes' plans; tiny runs on digits; exact resume; errors.

References: AB — bhheo/AB_distillation ``cifar10_AB_distillation.py``
(``criterion_alternative_L2``, ``loss_alter / batch_size [/2, /4] / 1000 * 3``) and
RepDistiller ``distiller_zoo/AB.py`` (``w = 2**(i-feat_num+1)``). FT — RepDistiller
``distiller_zoo/FT.py`` (``factor = F.normalize(f.pow(2).mean(1).view(N, -1))``, mean
|·|), ``models/util.py`` (Paraphraser, Translator), ``helper/pretrain.py`` with
``train_student.py`` (``criterion_init = nn.MSELoss()``); the authors'
Factor-Transfer-pytorch ``train_student.py`` / ``utils.FT`` for ``factor = "paper"``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pyramidkd import testing
from pyramidkd.engine import Model, ModelOutput, RecipeError, UserError
from pyramidkd.engine.recipe import dump_toml
from pyramidkd.engine.training.checkpoints import load_checkpoint

BATCH = 3
STUDENT = {"preact.1": (2, 4, 4), "preact.2": (3, 2, 2), "preact.3": (2, 2, 2)}
TEACHER = {"preact.1": (4, 2, 2), "preact.2": (3, 2, 2)}  # two stages: paired with the student's last two


def _maps(shapes, seed):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(BATCH, *shape, generator=generator, dtype=torch.float64) * 1.5 for name, shape in shapes.items()}


def _logits(seed=5):
    return torch.randn(BATCH, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- ab --------------------------------------------------------------------------------


def _reference_ab(student, teacher, weights, margin=1.0):
    """Σ_i 2^(i-n)·Σ[(s+m)²·(s>-m, t<=0) + (s-m)²·(s<=m, t>0)] / N × 3/1000, s = conv1×1(x)/√(1+ε) (BN at its start)."""
    pairs = [("preact.2", "preact.1"), ("preact.3", "preact.2")]
    total = 0.0
    for index, (ours, theirs) in enumerate(pairs):
        x, t, w = student[ours], teacher[theirs], weights[index]
        term = 0.0
        for n in range(BATCH):
            for c in range(w.shape[0]):
                for i in range(x.shape[2]):
                    for j in range(x.shape[3]):
                        s = sum(w[c, k] * x[n, k, i, j] for k in range(x.shape[1])) / math.sqrt(1 + 1e-5)
                        if s > -margin and t[n, c, i, j] <= 0:
                            term = term + (s + margin) ** 2
                        if s <= margin and t[n, c, i, j] > 0:
                            term = term + (s - margin) ** 2
        total = total + term * 2.0 ** (index + 1 - len(pairs))
    return total / BATCH * 3 / 1000


def test_ab_value_and_gradient_match_the_reference():
    student, teacher = _maps(STUDENT, 0), _maps(TEACHER, 1)
    loss = testing.build_component("loss", "ab", {"ce_weight": 0.0})
    loss.setup(ModelOutput(_logits(), student), [ModelOutput(_logits(), teacher)])
    loss.double().eval()  # BN at its start: running mean 0, var 1
    weights = [conv[0].weight.detach()[:, :, 0, 0] for conv in loss.connectors]
    assert [tuple(w.shape) for w in weights] == [(4, 3), (3, 2)] and abs(loss.params.feat_weight - 3e-3) < 1e-15
    ours = {k: v.clone().requires_grad_(True) for k, v in student.items()}
    value = loss(ModelOutput(_logits(), ours), [ModelOutput(_logits(), teacher)], torch.tensor([0, 1, 2]))
    theirs = {k: v.clone().requires_grad_(True) for k, v in student.items()}
    expected = _reference_ab(theirs, teacher, weights)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10) and value.item() > 0
    value.backward()
    expected.backward()
    assert ours["preact.1"].grad is None or not ours["preact.1"].grad.any()  # the student's first stage is not paired
    for name in ("preact.2", "preact.3"):
        assert torch.allclose(ours[name].grad, theirs[name].grad, rtol=1e-9, atol=1e-12)


def test_ab_refuses_stages_of_other_spatial_sizes():
    loss = testing.build_component("loss", "ab")
    with pytest.raises(UserError, match="spatial sizes differ"):
        loss.check_features({"preact.1": (4, 8, 8)}, {"preact.1": (8, 4, 4)})


# --- ft --------------------------------------------------------------------------------


def _reference_factor_loss(fs, ft, form):
    """mean_n,x |φ_s − φ_t|, φ = (mean_c f² or all of f) per sample, flattened, L2-normalised."""
    def factor(f):
        rows = []
        for n in range(f.shape[0]):
            if form == "crd":
                values = [sum(f[n, c, i, j] ** 2 for c in range(f.shape[1])) / f.shape[1]
                          for i in range(f.shape[2]) for j in range(f.shape[3])]
            else:
                values = [f[n, c, i, j] for c in range(f.shape[1]) for i in range(f.shape[2]) for j in range(f.shape[3])]
            norm = sum(v * v for v in values) ** 0.5
            rows.append([v / norm for v in values])
        return rows
    a, b = factor(fs), factor(ft)
    count = len(a) * len(a[0])
    return sum(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / count


@pytest.mark.parametrize("form", ["crd", "paper"])
def test_ft_value_and_gradient_match_the_reference(form):
    student = {"feat.1": torch.randn(BATCH, 3, 2, 2, dtype=torch.float64)}
    teacher = {"feat.1": torch.randn(BATCH, 4, 2, 2, dtype=torch.float64).relu()}
    loss = testing.build_component("loss", "ft", {"ce_weight": 0.0, "factor": form})
    assert loss.params.feat_weight == 200.0 and loss.params.rate == 0.5
    loss.setup(ModelOutput(_logits(), student), [ModelOutput(_logits(), teacher)])
    loss.double().eval()
    assert loss.translator[3].out_channels == 2 and loss.paraphraser.encoder[3].out_channels == 2  # int(4 · 0.5)
    ours = student["feat.1"].clone().requires_grad_(True)
    value = loss(ModelOutput(_logits(), {"feat.1": ours}), [ModelOutput(_logits(), teacher)], torch.tensor([0, 1, 2]))
    theirs = student["feat.1"].clone().requires_grad_(True)
    with torch.no_grad():
        factor_t = loss.paraphraser.encoder(teacher["feat.1"])
    expected = 200.0 * _reference_factor_loss(loss.translator(theirs), factor_t, form)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    value.backward()
    expected.backward()
    assert torch.allclose(ours.grad, theirs.grad, rtol=1e-8, atol=1e-12)
    assert all(p.grad is None for p in loss.paraphraser.parameters())  # the teacher's side carries no gradient


def test_ft_paraphraser_reconstructs_the_teachers_last_stage_with_mse():
    teacher = {"feat.1": torch.randn(BATCH, 3, 2, 2), "feat.2": torch.randn(BATCH, 4, 2, 2).relu()}
    loss = testing.build_component("loss", "ft-paraphraser")
    value = loss(ModelOutput(torch.zeros(BATCH, 3)), [ModelOutput(torch.zeros(BATCH, 3), teacher)], torch.tensor([0, 1, 2]))
    rebuilt = loss.paraphraser.decoder(loss.paraphraser.encoder(teacher["feat.2"]))
    assert value.item() == pytest.approx(((rebuilt - teacher["feat.2"]) ** 2).mean().item(), rel=1e-6)
    assert loss.paraphraser.encoder[3].out_channels == 2 and loss.student_taps() == ()


def test_ft_inherit_state_loads_and_freezes_the_paraphraser():
    student, teacher = {"feat.1": torch.randn(2, 3, 2, 2)}, {"feat.1": torch.randn(2, 4, 2, 2)}
    first = testing.build_component("loss", "ft-paraphraser")
    first.setup(ModelOutput(torch.zeros(2, 3), student), [ModelOutput(torch.zeros(2, 3), teacher)])
    loss = testing.build_component("loss", "ft")
    loss.setup(ModelOutput(torch.zeros(2, 3), student), [ModelOutput(torch.zeros(2, 3), teacher)])
    with pytest.raises(UserError, match="needs a paraphraser"):
        loss.start_epoch(1)  # a run that never loaded one (e.g. ft in the kd scheme) stops before training
    with pytest.raises(UserError, match="saved none"):
        loss.inherit_state(None)
    loss.inherit_state(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(loss.paraphraser.state_dict().values(), first.paraphraser.state_dict().values()))
    assert not any(p.requires_grad for p in loss.paraphraser.parameters()) and all(p.requires_grad for p in loss.translator.parameters())
    loss.start_epoch(1)


# --- the schemes ----------------------------------------------------------------------------


def _recipe(stages, epochs=1, teacher=None):
    teacher = teacher or {"name": "resnet14"}
    return dump_toml({
        "loggers": ["files"],
        "experiment": {"name": "abft", "seed": 0, "device": "cpu"},
        "dataset": {"name": "digits", "image_size": 8, "limit": 200},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                  "scheduler": {"name": "cosine"}},
        "stages": [{"id": "teacher", "scheme": "scratch", "model": teacher}, *stages],
    })


def _plan(text, tmp_path, extra_plugins=()):
    from pyramidkd.engine.planning import prepare_run
    from pyramidkd.engine.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return {stage.id: stage for stage in prepare_run(load_recipe(str(path)), testing.make_host(extra_plugins=extra_plugins)).stages}


def test_the_schemes_plan_both_stages(tmp_path):
    stages = _plan(_recipe([
        {"id": "ab", "scheme": {"name": "ab", "teacher": "teacher", "init_epochs": 30, "main": "kd"}, "model": {"name": "resnet8"}},
        {"id": "ft", "scheme": {"name": "ft", "teacher": "teacher", "init_epochs": 30, "init_train": {"optimizer": {"lr": 0.01}}},
         "model": {"name": "resnet8"}, "loss": {"name": "ft", "rate": 0.25}},
    ], epochs=240), tmp_path)
    assert list(stages) == ["teacher", "ab.init", "ab", "ft.paraphraser", "ft"]
    init, ab, para, ft = stages["ab.init"], stages["ab"], stages["ft.paraphraser"], stages["ft"]
    assert (init.train.epochs, ab.train.epochs, para.train.epochs, ft.train.epochs) == (30, 240, 30, 240)
    assert init.train.scheduler.name == para.train.scheduler.name == "none" and ab.train.scheduler.name == "cosine"
    assert para.train.optimizer.lr == 0.01 and init.train.optimizer.lr == ft.train.optimizer.lr == 0.02
    # RepDistiller's get_feat_modules(): every layer but the classifier
    assert init.trainable == ["conv1", "bn1", "layer1", "layer2", "layer3"] and ab.trainable is None
    assert init.loss.name == "ab" and init.loss.params.ce_weight == 0.0 and init.select == para.select == "last"
    assert init.student_taps == init.teacher_taps == {"preact.*": "@preact.*"}
    assert ab.init_from.stage_id == "ab.init" and [t.stage_id for t in ab.teachers] == ["teacher"]
    assert ab.loss.name == "kd" and ab.loss.params.temperature == 3.0 and ab.loss.params.weights() == pytest.approx((1 / 9, 0.0))
    assert para.loss.name == "ft-paraphraser" and para.loss.params.rate == 0.25 and para.trainable == []
    assert para.student_taps == {} and para.teacher_taps == {"feat.*": "@feat.*"}
    assert ft.loss.name == "ft" and ft.init_from.stage_id == "ft.paraphraser" and ft.student_taps == {"feat.*": "@feat.*"}


def test_ab_with_ce_has_no_teacher_in_its_main_stage(tmp_path):
    stages = _plan(_recipe([{"id": "ab", "scheme": {"name": "ab", "teacher": "teacher"}, "model": {"name": "resnet8"}}]), tmp_path)
    assert stages["ab"].loss.name == "ce" and stages["ab"].teachers == [] and stages["ab.init"].train.epochs == 30


class _PlainNet(nn.Module):  # no tap_points(): nothing to distil from its stages
    def __init__(self, classes):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


class PlainModel(Model):
    name = "plain"

    def build(self, num_classes, input_shape):
        return _PlainNet(num_classes)


def test_bad_configurations_are_refused_before_training(tmp_path):
    plain = testing.plugin_module("plain_model", pyramidkd_register_models=lambda: [PlainModel])
    with pytest.raises(RecipeError) as error:
        _plan(_recipe([{"id": "ab", "scheme": {"name": "ab", "teacher": "teacher"}, "model": {"name": "plain"}}]), tmp_path, [plain])
    assert "'ab.init'" in str(error.value) and "'preact.1'" in str(error.value) and "preact.1 … preact.K" in error.value.fix
    with pytest.raises(RecipeError, match="does not continue one"):
        _plan(_recipe([{"id": "ft", "scheme": {"name": "ft", "teacher": "teacher"}, "model": {"name": "resnet8"},
                        "loss": {"name": "kd"}}]), tmp_path)
    with pytest.raises(RecipeError, match="spatial sizes differ"):  # its last stage is 4×4, the teacher's 2×2
        _plan(_recipe([{"id": "ab", "scheme": {"name": "ab", "teacher": "teacher"},
                        "model": {"name": "vgg", "layers": [4, "M", 8]}}]), tmp_path)


# --- end to end -------------------------------------------------------------------------------------

FAMILIES = {
    "resnet": ({"name": "resnet14"}, {"name": "resnet8"}),
    "vgg": ({"name": "vgg", "layers": [8, "M", 16, "M"]}, {"name": "vgg", "layers": [4, "M", 8, "M"]}),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ab_and_ft_train_on_digits(family, tmp_path):
    teacher, student = FAMILIES[family]
    text = _recipe([{"id": "ab", "scheme": {"name": "ab", "teacher": "teacher", "init_epochs": 1, "main": "kd"}, "model": student},
                    {"id": "ft", "scheme": {"name": "ft", "teacher": "teacher", "init_epochs": 1}, "model": student}], teacher=teacher)
    summary = testing.run_tiny(text, workdir=tmp_path)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert list(stages) == ["teacher", "ab.init", "ab", "ft.paraphraser", "ft"]
    assert all(math.isfinite(stage["test_loss"]) for stage in stages.values())
    folder = tmp_path / "run" / "checkpoints"
    init = load_checkpoint(str(folder / "ab.init" / "last.pt"))
    head = [key for key in init["state_dict"] if key.startswith(("fc.", "classifier.", "linear."))]
    trained = sum(len(group["params"]) for group in init["optimizer"]["param_groups"])
    connectors = [key for key in init["loss_state"] if key.endswith(("0.weight", "1.weight", "1.bias"))]
    features = [k for k in init["state_dict"] if k not in head and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert head and trained == len(features) + len(connectors)  # the classifier is frozen
    first = load_checkpoint(str(folder / "ft.paraphraser" / "last.pt"))
    second = load_checkpoint(str(folder / "ft" / "last.pt"))
    assert sum(len(g["params"]) for g in first["optimizer"]["param_groups"]) == len(first["loss_state"])  # the paraphraser alone
    paraphraser = {k: v for k, v in second["loss_state"].items() if k.startswith("paraphraser.")}
    assert paraphraser and all(torch.equal(v, first["loss_state"][k]) for k, v in paraphraser.items())


def _crash_once(stage_id):
    state = {"done": False}

    def pyramidkd_epoch_end(run, stage, epoch, metrics):
        if stage.id == stage_id and epoch == 1 and not state["done"]:
            state["done"] = True
            raise RuntimeError("stopped on purpose")

    return testing.plugin_module(f"crash_{stage_id.replace('.', '_')}", pyramidkd_epoch_end=pyramidkd_epoch_end)


def test_ft_resumes_exactly_in_both_stages(tmp_path):
    from pyramidkd.engine.runner import run_recipe

    text = _recipe([{"id": "ft", "scheme": {"name": "ft", "teacher": "teacher", "init_epochs": 2}, "model": {"name": "resnet8"}}],
                   epochs=2)
    testing.run_tiny(text, workdir=tmp_path / "reference")
    path = tmp_path / "resumed" / "recipe.toml"
    path.parent.mkdir()
    path.write_text(text)
    for stage_id in ("ft.paraphraser", "ft"):
        with pytest.raises(Exception, match="stopped on purpose"):
            run_recipe(str(path), output=str(tmp_path / "resumed" / "run"), quiet=True, extra_plugins=[_crash_once(stage_id)])
        assert load_checkpoint(str(tmp_path / "resumed" / "run" / "checkpoints" / stage_id / "last.pt"))["epoch"] == 1
    run_recipe(str(path), output=str(tmp_path / "resumed" / "run"), quiet=True, resume=True)
    for stage_id in ("ft.paraphraser", "ft"):
        a = load_checkpoint(str(tmp_path / "reference" / "run" / "checkpoints" / stage_id / "last.pt"))
        b = load_checkpoint(str(tmp_path / "resumed" / "run" / "checkpoints" / stage_id / "last.pt"))
        for part in ("state_dict", "loss_state"):
            assert a[part].keys() == b[part].keys() and all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (stage_id, part)
