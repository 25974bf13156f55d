"""The Pyramid model family (vgg19, svgg*), weight inheritance and `pyramidkd models`."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from pyramidkd.engine.training.models import inherit_weights
from pyramidkd.plugins.models.pyramid import BACKWARD_LEVELS, FORWARD_LEVELS, MODELS

SMALL = 0.0625  # width for fast tests: vgg19 has 4..32 channels


def build(name: str, *, width: float = SMALL, batch_norm: bool = False, size: int = 32, classes: int = 10) -> nn.Module:
    cls = MODELS[name]
    return cls(cls.Params(width=width, batch_norm=batch_norm)).build(classes, (3, size, size))


def conv_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


def linear_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def vgg19_parameter_count(classes: int, features: int) -> int:
    channels = [3, 64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
    convs = sum(9 * cin * cout + cout for cin, cout in zip(channels, channels[1:]))
    head = features * 2048 + 2048 + 2048 * 512 + 512 + 512 * classes + classes
    return convs + head


def test_vgg19_at_96px_has_the_published_4608_feature_head():
    model = build("vgg19", width=1.0, size=96)
    first, *_, last = [m for m in model.head if isinstance(m, nn.Linear)]
    assert first.in_features == 4608 and first.out_features == 2048 and last.out_features == 10
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [2048, 512, 10]
    assert sum(p.numel() for p in model.parameters()) == vgg19_parameter_count(10, 4608) == 30_517_834
    assert conv_count(model) == 16 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    svgg5 = build("svgg5", width=1.0, size=96)
    assert svgg5.head1[1].in_features == 4608 and isinstance(svgg5.head1[0], nn.Dropout)
    assert sum(p.numel() for p in svgg5.parameters()) < sum(p.numel() for p in model.parameters()) / 7


LAYERS = {  # name: (convs, linears)
    "vgg19": (16, 3), "svgg17": (16, 1), "svgg14": (13, 1), "svgg11": (10, 1), "svgg8": (7, 1), "svgg5": (5, 1),
    "svgg17_b": (14, 3), "svgg14_b": (11, 3), "svgg11_b": (8, 3), "svgg8_b": (5, 3),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_level_builds_runs_and_exposes_its_depth_points(name, batch_norm):
    model = build(name, batch_norm=batch_norm, classes=7)
    cls = MODELS[name]
    assert (conv_count(model), linear_count(model)) == LAYERS[name]
    assert [n for n, _ in model.named_children()] == list(cls.blocks)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == (LAYERS[name][0] if batch_norm else 0)
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[path].register_forward_hook(lambda m, i, o, point=point: seen.__setitem__(point, o.shape))
             for point, path in cls.points.items()]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    for hook in hooks:
        hook.remove()
    assert seen["conv1_1"] == (2, 4, 32, 32)
    for k, channels in zip(range(1, 6), (4, 8, 16, 32, 32)):  # 64, 128, 256, 512, 512 × 1/16
        if f"block{k}" in seen:
            assert seen[f"block{k}"] == (2, channels, 32 >> k, 32 >> k), k
    assert seen["hint"] == (2, 32, 4, 4)  # conv4_2's output: 512·w channels at 1/8 resolution
    assert ("block1" in cls.points) == (cls.blocks[1] == "block2")  # no block1 pool where block2_c starts


def test_the_two_directions_meet_at_svgg5():
    assert FORWARD_LEVELS[-1] == BACKWARD_LEVELS[-1] == "svgg5"
    svgg5, svgg8_b = build("svgg5"), build("svgg8_b")
    conv_keys = lambda m: {k: v.shape for k, v in m.state_dict().items() if not k.startswith("head")}  # noqa: E731
    assert conv_keys(svgg5) == conv_keys(svgg8_b)
    assert MODELS["svgg5"].head == "head1" and MODELS["svgg8_b"].head == "head"


def test_width_scales_channels_and_the_3fc_hidden_sizes():
    model = build("vgg19", width=0.25, size=64)
    assert model.block1.conv1_1.out_channels == 16 and model.block5.conv5_4.out_channels == 128
    assert [m.out_features for m in model.head if isinstance(m, nn.Linear)] == [512, 128, 10]
    assert model.head[0].in_features == 128 * 2 * 2


def test_too_small_an_input_is_a_clear_error():
    from pyramidkd.engine.errors import UserError

    with pytest.raises(UserError, match="5 pooling layers shrink a 16×16 input"):
        build("svgg5", size=16)


CHAIN_PAIRS = list(zip(("vgg19",) + FORWARD_LEVELS, FORWARD_LEVELS)) + list(zip(("vgg19",) + BACKWARD_LEVELS, BACKWARD_LEVELS))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("teacher,student", CHAIN_PAIRS, ids=[f"{t}-{s}" for t, s in CHAIN_PAIRS])
def test_each_level_inherits_exactly_the_layers_it_shares_with_the_level_above(teacher, student, batch_norm):
    torch.manual_seed(0)
    source = build(teacher, batch_norm=batch_norm).state_dict()
    model = build(student, batch_norm=batch_norm)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    copied = inherit_weights(model, source)
    new_blocks = [b for b in MODELS[student].blocks if b not in MODELS[teacher].blocks]
    assert len(new_blocks) == 1  # one compressed block (or the new head) per level
    state = model.state_dict()
    for key, value in state.items():
        block = key.split(".")[0]
        if block in new_blocks:
            assert key not in source and key not in copied and torch.equal(value, fresh[key]), key
        else:
            assert key in copied and torch.equal(value, source[key]), key


def test_svgg14_from_vgg19_state():
    torch.manual_seed(1)
    vgg19 = build("vgg19").state_dict()
    svgg14 = build("svgg14")
    copied = set(inherit_weights(svgg14, vgg19))
    state = svgg14.state_dict()
    shared = [k for k in state if k in vgg19]
    assert shared and set(shared) == copied
    assert all(torch.equal(state[k], vgg19[k]) for k in shared)
    assert {k.split(".")[0] for k in shared} == {"block1", "block2", "block3", "block4"}
    assert sorted(k for k in state if k not in vgg19) == ["block5_c.conv5_c.bias", "block5_c.conv5_c.weight", "head1.1.bias", "head1.1.weight"]
    # the 3-FC head is inherited by the backward levels, never confused with head1
    svgg17_b = build("svgg17_b")
    assert {k.split(".")[0] for k in inherit_weights(svgg17_b, vgg19)} == {"block1", "block3", "block4", "block5", "head"}


def test_models_command_json(cli):
    result = cli("models", "--json", "--image-size", "32", "--width", str(SMALL), "--num-classes", "5")
    assert result.code == 0, result.err
    rows = {row["name"]: row for row in json.loads(result.out)}
    assert set(LAYERS) <= set(rows) and "vgg" in rows
    for name in LAYERS:
        model = build(name, size=32, classes=5)
        assert rows[name]["params"] == sum(p.numel() for p in model.parameters())
        assert rows[name]["macs"] > 0 and rows[name]["width"] == SMALL
    assert rows["svgg5"]["macs"] < rows["svgg8"]["macs"] < rows["svgg11"]["macs"] < rows["svgg14"]["macs"] < rows["vgg19"]["macs"]
    assert rows["svgg8_b"]["macs"] < rows["svgg11_b"]["macs"] < rows["svgg14_b"]["macs"] < rows["svgg17_b"]["macs"] < rows["vgg19"]["macs"]
    # conv MACs of vgg19 at width 1/16: sum over convs of H·W·Cout·Cin·9, plus the linear layers
    channels = [3, 4, 4, 8, 8, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 32, 32]
    sizes = [32, 32, 16, 16, 8, 8, 8, 8, 4, 4, 4, 4, 2, 2, 2, 2]
    expected = sum(s * s * cout * cin * 9 for s, cin, cout in zip(sizes, channels, channels[1:])) + 32 * 128 + 128 * 32 + 32 * 5
    assert rows["vgg19"]["macs"] == expected


def test_models_command_table(cli):
    result = cli("models", "--image-size", "32", "--width", str(SMALL))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("name"))
    table = lines[header:]
    names = [line.split()[0] for line in table[2:]]
    assert {"vgg19", "svgg5", "svgg8_b"} <= set(names)
    end = table[0].index("MACs") + len("MACs")  # right-aligned numbers end under their header
    assert all(line[end - 1] != " " for line in table[2:])

    small = cli("models", "--image-size", "16", "--json")  # too small for five pools: an error per row, not a crash
    assert small.code == 0
    assert "shrink a 16×16 input" in {row["name"]: row for row in json.loads(small.out)}["vgg19"]["error"]
    assert cli("models", "--width", "0").code == 1
