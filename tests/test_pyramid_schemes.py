"""Pyramid schemes: planned stages, errors, feature losses, and a tiny end-to-end chain."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import RECIPES
from pyramidkd.engine import ModelOutput, StageOutput, UserError
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.runner import prepare

HEAD = """
[experiment]
name = "pyramid-test"
seed = 0
device = "cpu"

[dataset]
name = "synthetic"
num_classes = 4
image_size = 32
train_size = 64
val_size = 32
test_size = 32

[train]
epochs = 1
batch_size = 32
optimizer = { name = "sgd", lr = 0.02 }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg19", width = 0.0625, batch_norm = true }
"""

ALL_SCHEMES = HEAD + """
[[stages]]
id = "teacher2"
scheme = "scratch"
model = { name = "vgg19", width = 0.0625, batch_norm = true }

[[stages]]
id = "fwd"
scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, stage1_epochs = 2 }

[[stages]]
id = "bwd"
scheme = { name = "pyramid-backward", teacher = "teacher", width = 0.0625, batch_norm = true, stage1_loss = "gram" }
loss = { name = "kd", temperature = 4.0 }

[[stages]]
id = "fit"
scheme = { name = "fitnet", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg14", "svgg5"] }

[[stages]]
id = "gram"
scheme = { name = "gram-direct", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg8"] }

[[stages]]
id = "ta"
scheme = { name = "kd-chain", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg14", "svgg5"] }

[[stages]]
id = "ens"
scheme = { name = "ensemble", teachers = ["teacher", "teacher2"], aggregate = "sum-kl" }
model = { name = "svgg5", width = 0.0625, batch_norm = true }
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "all.toml"
    path.write_text(ALL_SCHEMES)
    return path, {stage.id: stage for stage in prepare(str(path)).stages}


def teacher_ids(stage):
    return [t.stage_id for t in stage.teachers]


def test_validate_lists_every_planned_stage(planned, cli):
    path, _ = planned
    result = cli("validate", path)
    assert result.code == 0, result.err
    assert "ok — 31 stage(s)" in result.out
    assert "  fwd.svgg14.hint: model svgg14, loss mse, teacher fwd.svgg17, 1 epochs" not in result.out  # stage1_epochs = 2
    assert "  fwd.svgg14.hint: model svgg14, loss mse, teacher fwd.svgg17, 2 epochs" in result.out
    assert "  fwd.svgg14: model svgg14, loss ce, teacher -, 1 epochs" in result.out
    assert "  bwd.svgg5: model svgg5, loss kd, teacher bwd.svgg8_b, 1 epochs" in result.out
    assert "  ens: model svgg5, loss kd-ensemble, teacher teacher, teacher2, 1 epochs" in result.out


def test_pyramid_forward_plans_a_two_stage_chain(planned):
    _, stages = planned
    ids = [s for s in stages if s.startswith("fwd.")]
    levels = ["svgg17", "svgg14", "svgg11", "svgg8", "svgg5"]
    assert ids == [i for level in levels for i in (f"fwd.{level}.hint", f"fwd.{level}")]
    above = ["teacher"] + [f"fwd.{level}" for level in levels]
    for level, teacher in zip(levels, above):
        hint, train = stages[f"fwd.{level}.hint"], stages[f"fwd.{level}"]
        assert teacher_ids(hint) == [teacher] and hint.init_from == StageOutput(teacher)
        assert hint.select == "val_loss" and hint.train.epochs == 2
        assert train.init_from == StageOutput(hint.id) and train.teachers == [] and train.loss.name == "ce"
        assert train.select == "val_acc" and train.model.params.width == 0.0625 and train.model.params.batch_norm
    # svgg17 adds no conv: logits matching, every layer trains
    assert stages["fwd.svgg17.hint"].loss.name == "mse-logits" and not stages["fwd.svgg17.hint"].student_taps
    svgg14 = stages["fwd.svgg14.hint"]
    assert svgg14.loss.name == "mse"
    assert svgg14.trainable == ["block1", "block2", "block3", "block4", "block5_c"]
    assert svgg14.student_taps == {"in": "block4", "out": "block5_c"}
    assert svgg14.teacher_taps == {"in": "block4", "out": "block5"}
    assert stages["fwd.svgg11.hint"].trainable == ["block1", "block2", "block3", "block4_c"]
    assert stages["fwd.svgg11.hint"].teacher_taps == {"in": "block3", "out": "block4"}
    svgg5 = stages["fwd.svgg5.hint"]
    assert svgg5.trainable == ["block1", "block2_c"]
    assert svgg5.student_taps == {"in": "block1.relu1_1", "out": "block2_c"}
    assert svgg5.teacher_taps == {"in": "block1.relu1_1", "out": "block2"}


def test_pyramid_backward_plans_from_the_input_end(planned):
    _, stages = planned
    levels = ["svgg17_b", "svgg14_b", "svgg11_b", "svgg8_b", "svgg5"]
    assert [s for s in stages if s.startswith("bwd.")] == [i for level in levels for i in (f"bwd.{level}.hint", f"bwd.{level}")]
    first = stages["bwd.svgg17_b.hint"]
    assert first.loss.name == "gram" and first.trainable == ["block1", "block2_c"]
    assert first.student_taps == {"in": "block1.relu1_1", "out": "block2_c"}
    assert stages["bwd.svgg8_b.hint"].teacher_taps == {"in": "block4_c", "out": "block5"}
    assert stages["bwd.svgg8_b.hint"].trainable == ["block1", "block2_c", "block3_c", "block4_c", "block5_c"]
    last = stages["bwd.svgg5.hint"]  # svgg5 = svgg8_b's convs + the 1-FC head: logits
    assert last.loss.name == "mse-logits" and teacher_ids(last) == ["bwd.svgg8_b"]
    assert stages["bwd.svgg5"].loss.name == "kd" and teacher_ids(stages["bwd.svgg5"]) == ["bwd.svgg8_b"]


def test_baseline_schemes(planned):
    _, stages = planned
    fit = stages["fit.svgg5.hint"]
    assert fit.loss.name == "hint" and teacher_ids(fit) == ["teacher"] and fit.init_from is None
    assert fit.student_taps["hint"] == "block4_c.relu4_c" and fit.teacher_taps["hint"] == "block4.relu4_2"
    assert fit.trainable == ["block1", "block2_c", "block3_c", "block4_c.conv4_c", "block4_c.bn4_c"]
    assert stages["fit.svgg14.hint"].student_taps["hint"] == "block4.relu4_2"
    assert teacher_ids(stages["fit.svgg14.hint"]) == ["teacher"]  # not chained

    gram = stages["gram.svgg8.hint"]
    assert gram.loss.name == "gram" and teacher_ids(gram) == ["teacher"] and gram.init_from == StageOutput("teacher")
    assert gram.student_taps == {"in.block3_c": "block2", "out.block3_c": "block3_c", "in.block4_c": "block3_c",
                                 "out.block4_c": "block4_c", "in.block5_c": "block4_c", "out.block5_c": "block5_c"}
    assert gram.teacher_taps["out.block4_c"] == "block4" and gram.teacher_taps["in.block4_c"] == "block3"

    assert [s for s in stages if s.startswith("ta.")] == ["ta.svgg14", "ta.svgg5"]
    assert teacher_ids(stages["ta.svgg5"]) == ["ta.svgg14"] and stages["ta.svgg5"].loss.name == "kd"

    ens = stages["ens"]
    assert teacher_ids(ens) == ["teacher", "teacher2"]
    assert ens.loss.name == "kd-ensemble" and ens.loss.params.aggregate == "sum-kl"


BAD = {
    "unknown level": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg15"] }',
                      ["stages[1].scheme.levels[0]", "unknown level 'svgg15'"]),
    "wrong order": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg8", "svgg14"] }',
                    ["stages[1].scheme.levels", "chain order", "svgg14, svgg8"]),
    "backward level in forward": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg14_b"] }',
                                  ["unknown level 'svgg14_b'"]),
    "width mismatch": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.125, batch_norm = true }',
                       ["stages[1].scheme.width", "width = 0.0625", "fix:"]),
    "batch norm mismatch": ('scheme = { name = "pyramid-backward", teacher = "teacher", width = 0.0625 }',
                            ["stages[1].scheme.batch_norm", "batch_norm = true"]),
    "model section": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true }\nmodel = "svgg5"',
                      ["stages[1].model", "builds one model per level"]),
    "unknown stage1 loss": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, stage1_loss = "gramm" }',
                            ["stages[1].scheme.stage1_loss", "unknown loss 'gramm'", "did you mean 'gram'?"]),
    "missing teacher": ('scheme = { name = "pyramid-forward", width = 0.0625 }', ["stages[1].scheme.teacher", "required key is missing"]),
    "bad stage1_train": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, stage1_train = { optimizer = { lr = -1.0 } } }',
                         ["stages[1].scheme.stage1_train.optimizer.lr", "must be > 0"]),
    "unknown stage1_train key": ('scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, stage1_train = { epoch = 2 } }',
                                 ["stages[1].scheme.stage1_train.epoch", "did you mean 'epochs'?"]),
    "ensemble of one": ('scheme = { name = "ensemble", teachers = ["teacher"] }\nmodel = "svgg5"', ["stages[1].scheme.teachers", "two or more"]),
    "ensemble duplicate teacher": ('scheme = { name = "ensemble", teachers = ["teacher", "teacher"] }\nmodel = "svgg5"', ["listed twice"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scheme_parameters_give_clear_errors(case, write_recipe, cli):
    stage, expected = BAD[case]
    result = cli("validate", write_recipe(HEAD + f'\n[[stages]]\nid = "chain"\n{stage}\n'))
    assert result.code == 1, result.out
    for text in expected:
        assert text in result.err, (text, result.err)
    assert "Traceback" not in result.err


def test_teacher_must_be_a_pyramid_model(write_recipe, cli):
    text = HEAD.replace('name = "vgg19", width = 0.0625, batch_norm = true', 'name = "vgg", layers = [4, "M"]')
    text += '\n[[stages]]\nid = "chain"\nscheme = { name = "pyramid-forward", teacher = "teacher" }\n'
    result = cli("validate", write_recipe(text))
    assert result.code == 1 and "Pyramid-family teacher" in result.err and "'vgg' model" in result.err


# --- losses -------------------------------------------------------------------


def output(logits=None, **features):
    return ModelOutput(torch.zeros(2, 3) if logits is None else logits, features)


def test_mse_is_mean_reduced_and_checks_shapes():
    from pyramidkd.plugins.losses.features import FeatureMSELoss

    s, t = torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5)
    loss = FeatureMSELoss()
    assert torch.allclose(loss(output(out=s), [output(out=t)], None), F.mse_loss(s, t))
    assert torch.allclose(loss(output(out=s, **{"out.b": t}), [output(out=t, **{"out.b": t})], None), F.mse_loss(s, t) / 2)
    with pytest.raises(UserError, match=r"differ in shape: student \(8, 5, 5\) vs teacher \(16, 5, 5\)"):
        loss.setup(output(out=s), [output(out=torch.randn(4, 16, 5, 5))])
    with pytest.raises(UserError, match="needs the teacher's tap 'out'"):
        loss(output(out=s), [output()], None)


def test_gram_matches_the_flow_between_block_input_and_output():
    from pyramidkd.plugins.losses.features import GramLoss, gram_matrix

    f_in, f_out = torch.randn(2, 4, 8, 8), torch.randn(2, 6, 4, 4)
    g = gram_matrix(f_in, f_out)
    pooled = F.adaptive_avg_pool2d(f_in, 4).flatten(2)
    assert g.shape == (2, 4, 6) and torch.allclose(g, pooled @ f_out.flatten(2).transpose(1, 2) / 16)
    loss = GramLoss()
    same = loss(output(**{"in": f_in, "out": f_out}), [output(**{"in": f_in, "out": f_out})], None)
    assert same.item() == 0
    other = loss(output(**{"in": f_in, "out": f_out}), [output(**{"in": f_in, "out": 2 * f_out})], None)
    assert torch.allclose(other, F.mse_loss(g, 2 * g))


def test_hint_creates_a_regressor_only_where_channels_differ():
    from pyramidkd.plugins.losses.features import HintLoss, HintParams

    student, teacher = output(hint=torch.randn(2, 4, 4, 4)), output(hint=torch.randn(2, 8, 4, 4))
    loss = HintLoss(HintParams(hint_layer="hint"))  # the name the fitnet scheme taps its layer under
    assert loss.student_taps() == loss.teacher_taps() == ("hint",)
    loss.setup(student, [teacher])
    assert isinstance(loss.regressor, torch.nn.Conv2d) and loss.regressor.kernel_size == (1, 1)
    assert sum(p.numel() for p in loss.parameters()) == 4 * 8 + 8
    value = loss(student, [teacher], None)
    value.backward()
    assert loss.regressor.weight.grad is not None
    same = HintLoss(HintParams(hint_layer="hint"))
    same.setup(teacher, [teacher])
    assert same.regressor is None and same(teacher, [teacher], None).item() == 0


def test_kd_ensemble_aggregates():
    from pyramidkd.engine import ops
    from pyramidkd.plugins.losses.features import KDEnsembleLoss, KDEnsembleParams

    torch.manual_seed(0)
    s, t1, t2 = torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    kd = lambda a, b: ops.kd_loss_eager(a, b, temperature=2.0)  # noqa: E731
    ce = F.cross_entropy(s, y)
    mean = KDEnsembleLoss(KDEnsembleParams(temperature=2.0, alpha=0.5, backend="eager"))
    assert torch.allclose(mean(output(s), [output(t1), output(t2)], y), 0.5 * kd(s, (t1 + t2) / 2) + 0.5 * ce, atol=1e-6)
    summed = KDEnsembleLoss(KDEnsembleParams(temperature=2.0, alpha=0.5, backend="eager", aggregate="sum-kl"))
    assert torch.allclose(summed(output(s), [output(t1), output(t2)], y), 0.5 * (kd(s, t1) + kd(s, t2)) + 0.5 * ce, atol=1e-6)


# --- end to end -----------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared machine the
    threads' synchronisation makes the run several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_level_forward_chain_end_to_end(write_recipe, tmp_path, cli, one_thread):
    text = HEAD + """
[[stages]]
id = "fwd"
[stages.scheme]
name = "pyramid-forward"
teacher = "teacher"
levels = ["svgg17", "svgg14"]
width = 0.0625
batch_norm = true
"""
    out = tmp_path / "run"
    result = cli("run", write_recipe(text), "--quiet", "--output", out)
    assert result.code == 0, result.err
    summary = json.loads((out / "summary.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["teacher", "fwd.svgg17.hint", "fwd.svgg17", "fwd.svgg14.hint", "fwd.svgg14"]
    assert stages["fwd.svgg14.hint"]["teachers"][0]["stage"] == "fwd.svgg17"
    assert stages["fwd.svgg14.hint"]["loss"] == "mse" and stages["fwd.svgg14.hint"]["select"] == "val_loss"

    def state(stage):
        return load_checkpoint(str(out / "checkpoints" / stage / "best.pt"))["state_dict"]

    init, hinted, trained = state("fwd.svgg17"), state("fwd.svgg14.hint"), state("fwd.svgg14")
    params = [k for k in hinted if k.endswith(("weight", "bias"))]  # parameters (BN buffers update in train mode)
    frozen = [k for k in params if k.startswith("head1.")]
    assert frozen and all(torch.equal(hinted[k], init[k]) for k in frozen)  # after the compressed block: frozen
    assert any(not torch.equal(hinted[k], init[k]) for k in params if k.startswith("block4."))  # inherited, trained
    assert all(k not in init for k in params if k.startswith("block5_c."))  # the compressed block: new
    assert any(not torch.equal(trained[k], hinted[k]) for k in frozen)  # stage 2 trains everything
    assert stages["fwd.svgg14.hint"]["inherited_tensors"] > 0

    again = cli("run", write_recipe(text), "--output", out)  # a complete chain is reused, level by level
    assert again.code == 0 and again.out.count("outputs exist: reused") == 5


def test_digits_cpu_recipes_validate(cli):
    result = cli("validate", RECIPES / "digits" / "pyramid-forward-cpu.toml")
    assert result.code == 0, result.err
    for stage in ("teacher", "forward.svgg17.hint", "forward.svgg5", "svgg5-scratch"):
        assert f"  {stage}:" in result.out
    backward = cli("validate", RECIPES / "digits" / "pyramid-backward-cpu.toml")
    assert backward.code == 0, backward.err
    assert "  backward.svgg5: model svgg5, loss ce, teacher -, 8 epochs" in backward.out


def test_level_epochs_shortens_every_level_but_the_last(write_recipe):
    """Chains keep the last level's epochs (the final budget every method shares)
    and may train the levels before it less (a CPU-sized study)."""
    text = HEAD.replace("epochs = 1", "epochs = 3") + """
[[stages]]
id = "fwd"
scheme = { name = "pyramid-forward", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg11", "svgg5"], stage1_epochs = 2, level_epochs = 1 }

[[stages]]
id = "chain"
scheme = { name = "kd-chain", teacher = "teacher", width = 0.0625, batch_norm = true, levels = ["svgg17", "svgg11"], level_epochs = 1 }
"""
    stages = {stage.id: stage for stage in prepare(str(write_recipe(text))).stages}
    assert stages["fwd.svgg11"].train.epochs == 1 and stages["fwd.svgg5"].train.epochs == 3
    assert stages["fwd.svgg11.hint"].train.epochs == 2 and stages["fwd.svgg5.hint"].train.epochs == 2  # stage1_epochs
    assert stages["chain.svgg17"].train.epochs == 1 and stages["chain.svgg11"].train.epochs == 3
