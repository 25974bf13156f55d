"""Pyramid ladders beyond VGG: the CIFAR ResNet and WRN depth ladders (plugins/schemes/ladders.py).

What a level inherits (every tensor, exactly, for a residual level; all but the new
compressed block / head for a VGG level), what each hint stage matches and trains, the
chain end to end in both directions, and clear errors for bad ladder configurations."""

from __future__ import annotations

import json

import attrs
import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine import StageOutput
from pyramidkd.engine.runner import prepare
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.models import inherit_weights

HEAD = """
[experiment]
name = "ladders"
seed = 0
device = "cpu"

[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
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
model = "resnet20"
"""


def chain(entry: str, scheme: str, teacher: str = "teacher", **keys) -> str:
    values = ", ".join(f"{key} = {json.dumps(value)}" for key, value in keys.items())  # JSON scalars and lists are TOML
    return f'\n[[stages]]\nid = "{entry}"\nscheme = {{ name = "{scheme}", teacher = "{teacher}"{", " if values else ""}{values} }}\n'


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan(write_recipe, text: str) -> dict:
    return {stage.id: stage for stage in prepare(str(write_recipe(text))).stages}


def build(spec, classes: int = 4, size: int = 8):
    torch.manual_seed(1)
    return spec.instantiate().build(classes, (3, size, size))


# --- planning ------------------------------------------------------------------------


def test_forward_compresses_the_last_stage_first(write_recipe):
    stages = plan(write_recipe, HEAD + chain("fwd", "pyramid-forward", levels=["resnet8"]))
    ids = [s for s in stages if s.startswith("fwd.")]
    assert ids == ["fwd.resnet8.hint.layer3", "fwd.resnet8.hint.layer2", "fwd.resnet8.hint.layer1", "fwd.resnet8"]
    first, second, last = (stages[i] for i in ids[:3])
    assert first.model.name == "resnet_blocks" and first.model.params.blocks == [3, 3, 1]
    assert second.model.params.blocks == [3, 1, 1] and last.model.name == "resnet8"
    assert first.trainable == ["conv1", "bn1", "layer1", "layer2", "layer3"] and last.trainable == ["conv1", "bn1", "layer1"]
    assert first.student_taps == first.teacher_taps == {"in": "layer3:input", "out": "layer3", "hint": "layer3"}
    assert [s.init_from for s in (first, second, last)] == [StageOutput("teacher"), StageOutput(first.id), StageOutput(second.id)]
    assert all(s.teachers == [StageOutput("teacher")] and s.select == "val_loss" and s.loss.name == "mse" for s in (first, second, last))
    trained = stages["fwd.resnet8"]
    assert trained.init_from == StageOutput(last.id) and trained.model.name == "resnet8" and trained.loss.name == "ce"


def test_backward_compresses_the_first_stage_first_and_chains_levels(write_recipe):
    text = HEAD.replace('"resnet20"', '"resnet32"') + chain("bwd", "pyramid-backward", levels=["resnet20", "resnet8"], stage1_loss="gram")
    stages = plan(write_recipe, text)
    assert [s for s in stages if s.startswith("bwd.resnet20")] == [
        "bwd.resnet20.hint.layer1", "bwd.resnet20.hint.layer2", "bwd.resnet20.hint.layer3", "bwd.resnet20"]
    first = stages["bwd.resnet20.hint.layer1"]
    assert first.model.params.blocks == [3, 5, 5] and first.trainable == ["conv1", "bn1", "layer1"] and first.loss.name == "gram"
    below = stages["bwd.resnet8.hint.layer1"]  # the next level is taught by this level's trained model
    assert below.teachers == [StageOutput("bwd.resnet20")] and below.init_from == StageOutput("bwd.resnet20")
    assert below.model.params.blocks == [1, 3, 3]


def test_wrn_ladder_plans_through_wrn_28_2(write_recipe):
    text = HEAD.replace('"resnet20"', '"wrn_40_2"') + chain("fwd", "pyramid-forward", levels=["wrn_28_2", "wrn_16_2"])
    stages = plan(write_recipe, text)
    hint = stages["fwd.wrn_28_2.hint.block3"]
    assert hint.model.name == "wrn_blocks" and attrs.asdict(hint.model.params) == {"blocks": [6, 6, 4], "widen_factor": 2, "dropout": 0.0}
    assert hint.trainable == ["conv1", "block1", "block2", "block3"] and hint.student_taps["out"] == "block3"
    assert stages["fwd.wrn_28_2.hint.block1"].model.name == "wrn_28_2" and stages["fwd.wrn_16_2"].model.name == "wrn_16_2"


# --- inheritance -------------------------------------------------------------------------


def inherited(child, parent) -> tuple[list[str], list[str]]:
    """(copied, fresh) tensor names of ``child`` initialised from ``parent`` as the runner does,
    after checking that every copied tensor is exactly the parent's."""
    copied = inherit_weights(child, parent.state_dict())
    state, source = child.state_dict(), parent.state_dict()
    assert all(torch.equal(state[name], source[name]) for name in copied)
    return copied, sorted(set(state) - set(copied))


@pytest.mark.parametrize("teacher, level, direction", [("resnet56", "resnet32", "forward"), ("resnet20", "resnet8", "backward"),
                                                        ("wrn_40_2", "wrn_28_2", "backward")])
def test_a_residual_level_inherits_every_tensor_exactly(write_recipe, teacher, level, direction):
    text = HEAD.replace('"resnet20"', f'"{teacher}"') + chain("c", f"pyramid-{direction}", levels=[level])
    stages = plan(write_recipe, text)
    parent = build(stages["teacher"].model)
    for stage in [s for s in stages.values() if s.id.startswith(f"c.{level}.hint")]:
        child = build(stage.model)
        copied, fresh = inherited(child, parent)
        assert fresh == [] and len(copied) == len(child.state_dict())  # stem, head, the first n blocks of each stage
        parent = child  # the next hint starts from this one
    assert build(stages[f"c.{level}"].model).state_dict().keys() == parent.state_dict().keys()


def test_a_vgg_level_inherits_all_but_its_new_block(write_recipe):
    text = HEAD.replace('model = "resnet20"', 'model = { name = "vgg19", width = 0.0625, batch_norm = true }').replace(
        "image_size = 8", "image_size = 32")
    text += chain("fwd", "pyramid-forward", levels=["svgg17", "svgg14"], width=0.0625, batch_norm=True)
    stages = plan(write_recipe, text)
    vgg19, svgg17, svgg14 = (build(stages[i].model, size=32) for i in ("teacher", "fwd.svgg17", "fwd.svgg14"))
    copied, fresh = inherited(svgg17, vgg19)
    assert {name.split(".")[0] for name in fresh} == {"head1"} and copied  # 16 convs kept, new 1-FC head
    copied, fresh = inherited(svgg14, svgg17)
    assert {name.split(".")[0] for name in fresh} == {"block5_c"}  # the compressed block only
    assert len(copied) + len(fresh) == len(svgg14.state_dict())


# --- end to end --------------------------------------------------------------------------


def test_resnet_and_wrn_chains_run_in_both_directions(tmp_path, one_thread):
    text = HEAD + '\n[[stages]]\nid = "wide"\nscheme = "scratch"\nmodel = "wrn_28_2"\n'
    text += chain("fwd", "pyramid-forward", levels=["resnet8"]) + chain("bwd", "pyramid-backward", levels=["resnet8"], stage1_loss="gram")
    text += chain("wfwd", "pyramid-forward", teacher="wide", levels=["wrn_16_2"])
    text += chain("wbwd", "pyramid-backward", teacher="wide", levels=["wrn_16_2"]) + 'loss = { name = "kd", temperature = 4.0 }\n'
    summary = testing.run_tiny(text, workdir=tmp_path)
    stages = {s["stage"]: s for s in summary["stages"]}
    assert "bwd.resnet8.hint.layer1" in stages and stages["wbwd.wrn_16_2"]["loss"] == "kd"
    hint = stages["fwd.resnet8.hint.layer3"]
    assert hint["model"] == "resnet_blocks" and hint["model_params"]["blocks"] == [3, 3, 1] and hint["select"] == "val_loss"

    def state(stage: str) -> dict:
        return load_checkpoint(str(tmp_path / "run" / stages[stage]["checkpoint"]))["state_dict"]

    assert hint["inherited_tensors"] == len(state(hint["stage"]))  # nothing fresh
    assert stages["wfwd.wrn_16_2"]["model"] == "wrn_16_2" and stages["wfwd.wrn_16_2.hint.block3"]["teachers"][0]["stage"] == "wide"
    assert stages["wbwd.wrn_16_2"]["teachers"][0]["stage"] == "wide"  # kd in the train stage: from the level above

    def weights(stage: str) -> dict:
        return {k: v for k, v in state(stage).items() if k.endswith(("weight", "bias"))}  # BN buffers update in train mode

    teacher, first = weights("teacher"), weights("bwd.resnet8.hint.layer1")
    frozen = [k for k in first if k.startswith(("layer2.", "layer3.", "fc."))]
    assert frozen and all(torch.equal(first[k], teacher[k]) for k in frozen)  # after the compressed stage: frozen
    assert any(not torch.equal(first[k], teacher[k]) for k in first if k.startswith("layer1."))  # the compressed stage trains


# --- bad configurations ------------------------------------------------------------------

BAD = {
    "not on the ladder": (chain("c", "pyramid-forward", levels=["resnet14"]), ["stages[1].scheme.levels[0]", "unknown level 'resnet14'"]),
    "out of order": (chain("c", "pyramid-forward", teacher="teacher", levels=["resnet8", "resnet32"]),
                     ["stages[1].scheme.levels", "chain order", "resnet32, resnet8"]),
    "mixing families": (chain("c", "pyramid-backward", levels=["resnet8", "wrn_16_2"]),
                        ["stages[1].scheme.levels[1]", "'wrn_16_2' is on the WRN ladder", "CIFAR ResNet ladder"]),
    "default VGG levels": (chain("c", "pyramid-forward"), ["stages[1].scheme.levels[0]", "'svgg17' is on the VGG19 Pyramid ladder"]),
    "teacher below the levels": (chain("c", "pyramid-forward", levels=["resnet32"]), ["stages[1].scheme.teacher", "not above the first level"]),
    "teacher off every ladder": ('\n[[stages]]\nid = "t14"\nscheme = "scratch"\nmodel = "resnet14"\n'
                                 + chain("c", "pyramid-forward", teacher="t14", levels=["resnet8"]),
                                 ["stages[2].scheme.teacher", "Pyramid-family teacher", "'resnet14' model"]),
    "VGG width on a ResNet ladder": (chain("c", "pyramid-forward", levels=["resnet8"], width=0.5),
                                     ["stages[1].scheme.width", "remove width"]),
    "kd-chain mixing families": (chain("c", "kd-chain", levels=["resnet8", "svgg5"]), ["stages[1].scheme.levels[1]", "VGG19 Pyramid ladder"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_ladder_configurations_fail_validate_clearly(case, write_recipe, cli):
    stages, expected = BAD[case]
    path = write_recipe(HEAD + stages, name="ladder.toml")
    result = cli("validate", path)
    assert result.code == 1, result.out
    for text in expected + ["ladder.toml", "fix:"]:
        assert text in result.err, (text, result.err)
    assert "Traceback" not in result.err


def test_the_wrn_28_2_level_is_the_reference_wrn_28_2():
    model = testing.build_component("model", "wrn_28_2").build(100, (3, 32, 32))
    assert sum(p.numel() for p in model.parameters()) == 1_479_220  # = wrn depth 28, widen 2 (tests/test_model_zoo.py)
    blocks = testing.build_component("model", "resnet_blocks", {"blocks": [5, 5, 5]}).build(100, (3, 32, 32))
    assert sum(p.numel() for p in blocks.parameters()) == 472_756  # resnet32's count


def test_a_hint_stage1_loss_reads_the_layers_the_hint_stage_matches(tmp_path, cli):
    """stage1_loss = "hint" compares the matched layers (tapped as "out") through the
    regressor, on the VGG Pyramid and on a residual ladder alike."""
    for scheme, teacher, levels in (("pyramid-forward", "vgg19", '["svgg17", "svgg14"]'),
                                    ("pyramid-backward", "resnet20", '["resnet8"]')):
        recipe = tmp_path / f"{scheme}-{teacher}.toml"
        recipe.write_text(f'''
[experiment]
name = "hint-stage"
[dataset]
name = "synthetic"
[train]
epochs = 1
[[stages]]
id = "teacher"
scheme = "scratch"
model = {{ name = "{teacher}" }}
[[stages]]
id = "chain"
scheme = {{ name = "{scheme}", teacher = "teacher", levels = {levels}, stage1_loss = "hint" }}
''')
        checked = cli("validate", recipe)
        assert checked.code == 0, checked.err
