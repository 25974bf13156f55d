"""The Pyramid family: VGG19 and its compressed SVGG levels.

3×3 convolutions (padding 1) + ReLU, 2×2 max-pooling, no batch norm unless
``batch_norm = true``; five pools, so a 96×96 input ends in a 512×3×3 = 4608 map.

Forward direction (compress from the classifier end, 1-FC head)::

    vgg19   block1 block2 block3   block4   block5   head   (16 convs + 3 FC)
    svgg17  block1 block2 block3   block4   block5   head1  (16 convs + 1 FC)
    svgg14  block1 block2 block3   block4   block5_c head1
    svgg11  block1 block2 block3   block4_c block5_c head1
    svgg8   block1 block2 block3_c block4_c block5_c head1
    svgg5   block1' block2_c block3_c block4_c block5_c head1   (5 convs + 1 FC)

Backward direction (compress from the input end, 3-FC head kept)::

    svgg17_b  block1' block2_c block3   block4   block5   head
    svgg14_b  block1' block2_c block3_c block4   block5   head
    svgg11_b  block1' block2_c block3_c block4_c block5   head
    svgg8_b   block1' block2_c block3_c block4_c block5_c head
    svgg5     (svgg8_b's convs + head1: the two directions meet)

Blocks (module names; ``width`` scales every channel count)::

    block1    conv1_1 64, conv1_2 64, pool1          block1' = conv1_1 only
    block2    conv2_1 128, conv2_2 128, pool2        block2_c = pool1, conv2_c 64→128, pool2
    block3    conv3_1..conv3_4 256, pool3            block3_c = conv3_c 128→256, pool3
    block4    conv4_1..conv4_4 512, pool4            block4_c = conv4_c 256→512, pool4
    block5    conv5_1..conv5_4 512, pool5            block5_c = conv5_c 512→512, pool5
    head      Linear(F, 2048·w)-ReLU-Dropout-Linear(2048·w, 512·w)-ReLU-Dropout-Linear(512·w, C)
    head1     Dropout-Linear(F, C)                   F = 512·w × (S/32)²

Inside a block the layers are named ``conv<i>``, ``bn<i>`` (batch norm only),
``relu<i>`` and ``pool<k>``, so state-dict keys read ``block4.conv4_2.weight``.
A layer shared by two levels has the same key (and shape) in both, and a
compressed block's keys (``block4_c.conv4_c.weight``) never collide with the
original layers', so the runner's ``init_from`` weight inheritance (same key,
same shape) copies exactly the shared layers and leaves every new block random.
The 3-FC ``head`` of vgg19 is inherited by the backward levels; the 1-FC ``head1``
is a different module and starts random where it first appears (svgg17, svgg5).

Options: ``width`` (channel multiplier; also scales the 3-FC hidden sizes 2048/512),
``batch_norm`` (default false), ``dropout`` (0.5), ``init`` ("kaiming": torchvision's
init — Kaiming fan-out convs, N(0, 0.01) linears — with the linears rescaled to keep
the published model's per-layer gain at any width/input size; "pytorch": defaults).

Class-level metadata, for schemes (see :class:`PyramidModel`): ``blocks`` (module
names in order, head last), ``points`` (depth point -> module path to tap),
``regions`` (compressed block -> (input point, output point)).

Tap points (``tap_points()``, the contract every model shares; the same meaning as
the zoo's ``vgg*_bn``): each block is one resolution; ``block1`` (``block1'`` in the
levels that keep only conv1_1) is the stem, blocks 2-5 (or their compressed ``_c``
forms) are stages 1-4. ``feat.k`` is the block's last ReLU output *before* its pool
(``block3.relu3_4`` in vgg19, ``block3_c.relu3_c`` in svgg5), ``preact.k`` that
ReLU's input, ``pooled`` the flattened last map (the head's input, 512·w·(S/32)²).
So every level has the same points at the same shapes as vgg19 (at 32×32, width 1:
feat.0 64×32×32, feat.1 128×16×16, feat.2 256×8×8, feat.3 512×4×4, feat.4 512×2×2,
pooled 512; at 96×96 each map is 3× larger and pooled 4608). FitNet's hint layer of
the Pyramid study, conv4_2, is not a stage output; the ``fitnet`` scheme taps it by
module path (``points["hint"]``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import ClassVar, Literal

import attrs
import torch
from torch import nn

from pyramidkd.engine import Model, between, hookimpl, positive
from pyramidkd.plugins.models.vgg import POOL, contract_points, conv_layers, feature_size, init_weights, make_head, scaled

NUM_POOLS = 5
HEAD_3FC, HEAD_1FC = "head", "head1"
HEAD_HIDDEN = (2048, 512)  # scaled by width


@attrs.define(frozen=True)
class BlockSpec:
    """A block: its module name, VGG config (channels and "M"), layer labels."""

    module: str
    config: tuple
    convs: tuple[str, ...]  # labels: conv<label>, bn<label>, relu<label>
    pools: tuple[str, ...] = ()  # labels: pool<label>
    out_point: str = ""  # the depth point its output is
    region: tuple[str, str] | None = None  # compressed blocks: (input point, output point) it replaces


BLOCKS: dict[str, BlockSpec] = {  # key -> spec (block1_short is module "block1" with conv1_1 only)
    "block1": BlockSpec("block1", (64, 64, POOL), ("1_1", "1_2"), ("1",), "block1"),
    "block1_short": BlockSpec("block1", (64,), ("1_1",), (), "conv1_1"),
    "block2": BlockSpec("block2", (128, 128, POOL), ("2_1", "2_2"), ("2",), "block2"),
    "block3": BlockSpec("block3", (256,) * 4 + (POOL,), ("3_1", "3_2", "3_3", "3_4"), ("3",), "block3"),
    "block4": BlockSpec("block4", (512,) * 4 + (POOL,), ("4_1", "4_2", "4_3", "4_4"), ("4",), "block4"),
    "block5": BlockSpec("block5", (512,) * 4 + (POOL,), ("5_1", "5_2", "5_3", "5_4"), ("5",), "block5"),
    "block2_c": BlockSpec("block2_c", (POOL, 128, POOL), ("2_c",), ("1", "2"), "block2", ("conv1_1", "block2")),
    "block3_c": BlockSpec("block3_c", (256, POOL), ("3_c",), ("3",), "block3", ("block2", "block3")),
    "block4_c": BlockSpec("block4_c", (512, POOL), ("4_c",), ("4",), "block4", ("block3", "block4")),
    "block5_c": BlockSpec("block5_c", (512, POOL), ("5_c",), ("5",), "block5", ("block4", "block5")),
}

FULL = ("block1", "block2", "block3", "block4", "block5")
SHORT = ("block1_short", "block2_c")
ARCHITECTURES: dict[str, tuple[tuple[str, ...], str]] = {
    # name: (blocks, head)
    "vgg19": (FULL, HEAD_3FC),
    "svgg17": (FULL, HEAD_1FC),
    "svgg14": (FULL[:4] + ("block5_c",), HEAD_1FC),
    "svgg11": (FULL[:3] + ("block4_c", "block5_c"), HEAD_1FC),
    "svgg8": (FULL[:2] + ("block3_c", "block4_c", "block5_c"), HEAD_1FC),
    "svgg5": (SHORT + ("block3_c", "block4_c", "block5_c"), HEAD_1FC),
    "svgg17_b": (SHORT + ("block3", "block4", "block5"), HEAD_3FC),
    "svgg14_b": (SHORT + ("block3_c", "block4", "block5"), HEAD_3FC),
    "svgg11_b": (SHORT + ("block3_c", "block4_c", "block5"), HEAD_3FC),
    "svgg8_b": (SHORT + ("block3_c", "block4_c", "block5_c"), HEAD_3FC),
}
FORWARD_LEVELS = ("svgg17", "svgg14", "svgg11", "svgg8", "svgg5")
BACKWARD_LEVELS = ("svgg17_b", "svgg14_b", "svgg11_b", "svgg8_b", "svgg5")

DESCRIPTIONS = {
    "vgg19": "VGG19: 16 convs + 3-FC head (the Pyramid teacher)",
    "svgg17": "SVGG17: VGG19's 16 convs + 1-FC head",
    "svgg14": "SVGG14: VGG19 blocks 1-4 + one 512 conv + 1-FC",
    "svgg11": "SVGG11: VGG19 blocks 1-3 + 2 compressed convs + 1-FC",
    "svgg8": "SVGG8: VGG19 blocks 1-2 + 3 compressed convs + 1-FC",
    "svgg5": "SVGG5: conv1_1 + 4 compressed convs + 1-FC (end of both chains)",
    "svgg17_b": "SVGG17-b: conv1_1 + 1 compressed conv + VGG19 blocks 3-5 + 3-FC",
    "svgg14_b": "SVGG14-b: conv1_1 + 2 compressed convs + VGG19 blocks 4-5 + 3-FC",
    "svgg11_b": "SVGG11-b: conv1_1 + 3 compressed convs + VGG19 block 5 + 3-FC",
    "svgg8_b": "SVGG8-b: conv1_1 + 4 compressed convs + 3-FC",
}


def _named_block(spec: BlockSpec, in_channels: int, width: float, batch_norm: bool) -> tuple[nn.Sequential, int]:
    layers, out_channels, _ = conv_layers(list(spec.config), in_channels, width, batch_norm)
    convs, pools = iter(spec.convs), iter(spec.pools)
    named: OrderedDict[str, nn.Module] = OrderedDict()
    label = ""
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            label = next(convs)
            named[f"conv{label}"] = layer
        elif isinstance(layer, nn.BatchNorm2d):
            named[f"bn{label}"] = layer
        elif isinstance(layer, nn.ReLU):
            named[f"relu{label}"] = layer
        else:
            named[f"pool{next(pools)}"] = layer
    return nn.Sequential(named), out_channels


def _keep_published_gain(head: nn.Module) -> None:
    """Rescale ``init_weights``' N(0, 0.01) head so that each Linear layer has the
    signal gain (0.01·√fan-in) it has in the published model (96 px, width 1, fan-ins
    4608 / 2048 / 512): σ = 0.01·√(published fan-in / fan-in). At the published size
    this is exactly torchvision's init; at a small width or input it keeps the head
    from starting ~1000× quieter, which leaves a narrow 3-FC VGG unable to learn."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    published = [512 * 3 * 3, *HEAD_HIDDEN][: len(linears)]
    with torch.no_grad():
        for layer, fan_in in zip(linears, published):
            layer.weight.mul_(math.sqrt(fan_in / layer.in_features))


class PyramidNet(nn.Sequential):
    """``block*`` modules in order -> flatten -> ``head`` / ``head1``.

    A ``Sequential`` (so ``torch.jit.script`` compiles it) whose children keep the
    block names: state-dict keys read ``block4.conv4_2.weight``."""

    def __init__(self, blocks: "OrderedDict[str, nn.Module]", head_name: str, head: nn.Module, points: dict[str, str]):
        super().__init__(OrderedDict([*blocks.items(), (head_name, head)]))
        self.block_names = list(blocks)
        self.head_name = head_name
        self.num_blocks = len(blocks)
        self.points = dict(points)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for index, module in enumerate(self):
            if index == self.num_blocks:  # the head takes the flattened last map
                x = x.flatten(1)
            x = module(x)
        return x

    def tap_points(self) -> dict[str, str]:
        """The tap contract's points (see the module docstring)."""
        return dict(self.points)


@attrs.define
class PyramidModelParams:
    width: float = attrs.field(default=1.0, validator=positive, metadata={"help": "channel multiplier, e.g. 0.25 (also scales the 3-FC hidden sizes)"})
    batch_norm: bool = attrs.field(default=False, metadata={"help": "BatchNorm after every conv (the original has none)"})
    dropout: float = attrs.field(default=0.5, validator=between(0.0, 1.0), metadata={"help": "dropout of the heads"})
    init: Literal["kaiming", "pytorch"] = attrs.field(default="kaiming", metadata={"help": "kaiming = torchvision-style fan-out init; pytorch = PyTorch defaults"})


class PyramidModel(Model):
    """Base of vgg19 and the SVGG levels; subclasses set ``name`` and the metadata.

    Metadata (class attributes, what schemes use to plan taps and trainable layers):

    * ``blocks``: module names in forward order, head last, e.g.
      ``("block1", "block2", "block3", "block4", "block5_c", "head1")``;
    * ``points``: depth point -> module path whose *output* is that point:
      ``"conv1_1"`` (after conv1_1's ReLU, full resolution), ``"block1"`` .. ``"block5"``
      (after the k-th pool, 1/2^k resolution; a level without block1's pool has no
      ``"block1"``), ``"hint"`` (the FitNet hint/guided layer: ``block4.relu4_2`` =
      conv4_2's output where the level has it, else ``block4_c.relu4_c``; both are the
      1/8-resolution 512·w-channel map);
    * ``regions``: compressed block -> (input point, output point) of the original
      layers it replaces, e.g. ``{"block5_c": ("block4", "block5")}``;
    * ``head``: ``"head"`` (3 FC) or ``"head1"`` (1 FC).
    """

    Params = PyramidModelParams
    blocks: ClassVar[tuple[str, ...]] = ()
    points: ClassVar[dict[str, str]] = {}
    regions: ClassVar[dict[str, tuple[str, str]]] = {}
    head: ClassVar[str] = HEAD_1FC
    block_specs: ClassVar[tuple[BlockSpec, ...]] = ()

    def build(self, num_classes, input_shape):
        p = self.params
        channels = input_shape[0]
        modules: OrderedDict[str, nn.Module] = OrderedDict()
        for spec in self.block_specs:
            modules[spec.module], channels = _named_block(spec, channels, p.width, p.batch_norm)
        size = feature_size(input_shape[1], NUM_POOLS, self.name)
        width_size = feature_size(input_shape[2], NUM_POOLS, self.name)
        hidden = [scaled(h, p.width) for h in HEAD_HIDDEN]
        kind = "3fc" if self.head == HEAD_3FC else "1fc"
        head = make_head(kind, channels * size * width_size, num_classes, hidden, p.dropout)
        model = PyramidNet(modules, self.head, head, self.contract_points())
        if p.init == "kaiming":
            init_weights(model)
            _keep_published_gain(head)
        return model

    @classmethod
    def contract_points(cls) -> dict[str, str]:
        """Tap name -> module path (the tap contract): block1 (or block1') is the stem,
        every later block a stage; a block's point is its last ReLU."""
        return contract_points([f"{spec.module}.relu{spec.convs[-1]}" for spec in cls.block_specs], f"{cls.head}:input")

    # -- helpers for schemes ---------------------------------------------------
    @classmethod
    def block_of(cls, module_path: str) -> str:
        return module_path.split(".", 1)[0]

    @classmethod
    def layers_up_to(cls, module_path: str) -> list[str]:
        """Parameter-name prefixes of every layer up to and including ``module_path``
        (a block, or a layer inside one, e.g. ``block4.relu4_2``)."""
        block, _, layer = module_path.partition(".")
        index = cls.blocks.index(block)
        prefixes = list(cls.blocks[:index])
        if not layer:
            return prefixes + [block]
        spec = next(s for s in cls.block_specs if s.module == block)
        label = layer[len("relu"):] if layer.startswith("relu") else layer[len("conv"):] if layer.startswith("conv") else None
        if label not in spec.convs:
            return prefixes + [block]
        for conv in spec.convs[: spec.convs.index(label) + 1]:
            prefixes += [f"{block}.conv{conv}", f"{block}.bn{conv}"]
        return prefixes


def _make_model_class(name: str) -> type[PyramidModel]:
    block_keys, head = ARCHITECTURES[name]
    specs = tuple(BLOCKS[key] for key in block_keys)
    points = {"conv1_1": "block1.relu1_1"}
    for spec in specs:
        if spec.out_point != "conv1_1":
            points[spec.out_point] = spec.module
    points["hint"] = "block4.relu4_2" if "block4" in block_keys else "block4_c.relu4_c"
    attributes = {
        "name": name,
        "description": DESCRIPTIONS[name],
        "__doc__": DESCRIPTIONS[name],
        "__module__": __name__,
        "blocks": tuple(spec.module for spec in specs) + (head,),
        "points": points,
        "regions": {spec.module: spec.region for spec in specs if spec.region},
        "head": head,
        "block_specs": specs,
    }
    return type(name.upper().replace("_", ""), (PyramidModel,), attributes)


MODELS: dict[str, type[PyramidModel]] = {name: _make_model_class(name) for name in ARCHITECTURES}


@hookimpl
def pyramidkd_register_models():
    return list(MODELS.values())
