"""Ladders: the chains of ever smaller models that ``pyramid-forward`` / ``pyramid-backward`` walk.

A model family declares a ladder: its levels, largest first, and for each pair of
adjacent levels what the smaller shares with the larger (copied exactly: the runner's
``init_from`` copies every tensor of the same name and shape), what is compressed, and
where the hint stage matches the level above. A chain starts at the teacher (any level
of the ladder) and goes down through the ``levels`` a recipe lists (in ladder order,
skipping allowed). Each level trains in hint stage(s), then in one ``train`` stage (see
plugins/schemes/pyramid.py).

**VGG19 Pyramid** (vgg19 → svgg17 → svgg14 → svgg11 → svgg8 → svgg5 forward,
vgg19 → svgg17_b → … → svgg8_b → svgg5 backward; plugins/models/pyramid.py). A level
inherits every block it shares with the level above; each level replaces one more block
by a single compressed conv (fresh weights), from the classifier end (forward) or the
input end (backward). One hint stage, ``<entry>.<level>.hint``: the layers up to and
including the new block learn to reproduce the level above's output at that block's
depth (taps ``in``/``out``); a level that adds no conv (svgg17: new 1-FC head; svgg5
after svgg8_b) matches logits with every layer training.

**Residual depth ladders**: CIFAR ResNet resnet110 → resnet56 → resnet32 → resnet20 →
resnet8 (18, 9, 5, 3, 1 blocks per stage) and WRN wrn_40_2 → wrn_28_2 → wrn_16_2 (6, 4,
2 blocks per stage), declared as ``PYRAMID_LADDER`` in
plugins/models/cifar_resnet.py and wide_resnet.py. Every level has the same stem, stage
widths and head; a smaller level has fewer blocks in each of the 3 stages.

* What a level inherits: everything, exactly. Stem, head, and in every stage the first
  n blocks, n being the smaller level's count: those keep their names (``layer2.0`` …
  ``layer2.4``) and shapes, so every tensor of the smaller level is the larger's; the
  output-side blocks of each stage are the ones dropped (a stage's first block holds its
  stride and projection shortcut, so it is always kept). Nothing starts random.
* What is compressed: one stage at a time, in the direction's order, so that each step
  mirrors one VGG level: forward compresses the last stage first (layer3, layer2,
  layer1: from the output side), backward the first (layer1, layer2, layer3: from the
  input side). So a level has one hint stage per stage whose depth changes (3),
  ``<entry>.<level>.hint.<stage>``, before its ``train`` stage; the models in between are
  ``resnet_blocks`` / ``wrn_blocks`` with some stages already shortened (e.g. resnet56 →
  resnet32 forward: [9, 9, 5], then [9, 5, 5], then resnet32 = [5, 5, 5]). Each starts
  from the previous one (the first from the level above), so the later stages keep what
  the earlier hints taught them, as the blocks a VGG level inherits do.
* What the hint matches: the compressed stage's output (taps ``out`` and ``hint`` = the
  stage module, ``in`` = its input, for ``gram``), against the same stage of the level
  above (the chain's teacher for that level); the stem and the stages up to and including
  the compressed one train, the later stages and the head are frozen.
"""

from __future__ import annotations

from typing import Literal

import attrs

from pyramidkd.engine import RecipeError
from pyramidkd.plugins.models import cifar_resnet, wide_resnet
from pyramidkd.plugins.models.pyramid import BACKWARD_LEVELS, FORWARD_LEVELS
from pyramidkd.plugins.models.pyramid import MODELS as PYRAMID_MODELS

Direction = Literal["forward", "backward"]


@attrs.define
class HintStep:
    """One hint stage of a level: which model trains (``model`` None: the level's own),
    which of its parameters, and the taps matched against the level above."""

    suffix: str  # stage id: "<entry>.<level>.<suffix>"
    trainable: list[str]
    student_taps: dict[str, str]
    teacher_taps: dict[str, str]
    matched: str  # for the stage's info: what the loss compares
    new_blocks: list[str] = attrs.field(factory=list)  # modules that start random
    model: str | None = None
    params: dict = attrs.field(factory=dict)
    match_logits: bool = False  # mse-logits instead of the scheme's stage1_loss


# --- VGG19 -> SVGG ------------------------------------------------------------------


def region_taps(student_cls, teacher_cls, blocks: list[str], key: str, teacher_name: str) -> tuple[dict, dict]:
    """Taps ``in``/``out`` (one block) or ``in.<block>``/``out.<block>`` (several): the
    input and output points of each compressed block, in the student and the teacher."""
    student_taps, teacher_taps = {}, {}
    for block in blocks:
        suffix = "" if len(blocks) == 1 else f".{block}"
        for tap, point in zip(("in", "out"), student_cls.regions[block]):
            if point not in teacher_cls.points:
                raise RecipeError(
                    f"the teacher {teacher_name!r} ({teacher_cls.name}) has no layer at depth {point!r} to match {student_cls.name}'s {block}",
                    key=key,
                    fix="use a teacher that still has that depth (e.g. vgg19)",
                )
            student_taps[tap + suffix] = student_cls.points[point]
            teacher_taps[tap + suffix] = teacher_cls.points[point]
    return student_taps, teacher_taps


def vgg_hint(student_cls, teacher_cls, *, key: str, teacher_name: str) -> HintStep:
    """The hint stage of a Pyramid-family student against a larger Pyramid model: the
    compressed blocks it has and the teacher lacks, or its logits where it adds no conv."""
    new_blocks = [b for b in student_cls.blocks if b not in teacher_cls.blocks]
    compressed = [b for b in new_blocks if b in student_cls.regions]
    if not compressed:  # no new conv: the level differs by its head; match logits, every layer trains
        return HintStep("hint", list(student_cls.blocks), {}, {}, "logits", new_blocks, match_logits=True)
    student_taps, teacher_taps = region_taps(student_cls, teacher_cls, compressed, key, teacher_name)
    last = max(student_cls.blocks.index(b) for b in compressed)
    return HintStep("hint", list(student_cls.blocks[: last + 1]), student_taps, teacher_taps,
                    "features: " + ", ".join(compressed), new_blocks)


class VggLadder:
    """VGG19 and its SVGG levels: one chain per direction, meeting at svgg5."""

    family = "VGG19 Pyramid"
    level_params = ("width", "batch_norm", "dropout")  # the scheme's parameters a level is built with

    def chain(self, direction: Direction) -> tuple[str, ...]:
        return ("vgg19",) + (FORWARD_LEVELS if direction == "forward" else BACKWARD_LEVELS)

    def has(self, model: str) -> bool:
        return model in PYRAMID_MODELS

    def students(self) -> tuple[str, ...]:
        """The levels a chain may list (any order, for kd-chain)."""
        return tuple(name for name in PYRAMID_MODELS if name != "vgg19")

    def level_model(self, level: str, params) -> tuple[str, dict]:
        return level, {"width": params.width, "batch_norm": params.batch_norm, "dropout": params.dropout}

    def hints(self, student_cls, teacher_cls, direction: Direction, *, key: str, teacher_name: str) -> list[HintStep]:
        return [vgg_hint(student_cls, teacher_cls, key=key, teacher_name=teacher_name)]


# --- residual depth ladders ------------------------------------------------------------


@attrs.define
class ResidualLadder:
    """A depth ladder of a residual family: every level has the same stem, stage widths
    and head, and ``levels`` gives each level's blocks per stage (largest first)."""

    family: str
    levels: dict[str, list[int]]
    in_between: tuple[str, dict]  # the model (and fixed params) taking ``blocks``, for partly compressed levels
    stem: tuple[str, ...]  # parameter prefixes before the first stage
    stages: tuple[str, ...]  # stage modules, input side first
    level_params: tuple[str, ...] = ()

    @classmethod
    def declared(cls, declaration: dict) -> "ResidualLadder":
        return cls(declaration["family"], dict(declaration["levels"]), declaration["in_between"],
                   tuple(declaration["stem"]), tuple(declaration["stages"]))

    def chain(self, direction: Direction) -> tuple[str, ...]:
        return tuple(self.levels)

    def has(self, model: str) -> bool:
        return model in self.levels

    def students(self) -> tuple[str, ...]:
        return tuple(self.levels)

    def level_model(self, level: str, params) -> tuple[str, dict]:
        return level, {}

    def hints(self, student_cls, teacher_cls, direction: Direction, *, key: str, teacher_name: str) -> list[HintStep]:
        """One hint per stage whose depth changes, output side first (forward) or input side first (backward)."""
        above, below = self.levels[teacher_cls.name], self.levels[student_cls.name]
        order = range(len(self.stages))
        current, steps = list(above), []
        for index in reversed(order) if direction == "forward" else order:
            if current[index] == below[index]:
                continue
            current[index] = below[index]
            stage = self.stages[index]
            taps = {"in": f"{stage}:input", "out": stage, "hint": stage}
            in_between = current != below
            model, fixed = self.in_between if in_between else (None, {})
            steps.append(HintStep(
                f"hint.{stage}", list(self.stem) + list(self.stages[: index + 1]), dict(taps), dict(taps),
                f"features: {stage} ({above[index]} -> {below[index]} blocks)",
                model=model, params={**fixed, "blocks": list(current)} if in_between else {}))
        return steps


LADDERS = (VggLadder(), ResidualLadder.declared(cifar_resnet.PYRAMID_LADDER), ResidualLadder.declared(wide_resnet.PYRAMID_LADDER))


def ladder_of(model: str):
    """The ladder a registered model name is a level of, or None."""
    return next((ladder for ladder in LADDERS if ladder.has(model)), None)


def describe_ladders() -> str:
    return "; ".join(f"{ladder.family}: {' → '.join(ladder.chain('forward'))}" for ladder in LADDERS)


def check_same_ladder(levels: list[str], ladder, key: str, scheme: str, *, teacher: str = "", below: tuple[str, ...] = ()) -> None:
    """Refuse a level of another family's ladder (mixing families), naming both; ``below``: the levels to suggest."""
    for index, level in enumerate(levels):
        other = ladder_of(level)
        if other is not None and other is not ladder:
            whose = f"the teacher {teacher}" if teacher else f"the first level {levels[0]!r}"
            raise RecipeError(
                f"scheme {scheme!r}: level {level!r} is on the {other.family} ladder, but {whose} is on the {ladder.family} "
                f"ladder ({' → '.join(ladder.chain('forward'))}); a chain stays in one family",
                key=f"{key}[{index}]",
                fix=(f"e.g. levels = [{', '.join(map(repr, below))}]; " if below else "")
                + f"list levels of the {ladder.family} ladder only (levels defaults to the VGG19 chain: set it for other families)",
            )


def refuse_level_params(params, ladder, key: str, scheme: str) -> None:
    """width / batch_norm / dropout build VGG levels; a residual ladder's levels are fixed models."""
    defaults = {field.name: field.default for field in attrs.fields(type(params))}
    for name in ("width", "batch_norm", "dropout"):
        if name not in ladder.level_params and getattr(params, name) != defaults[name]:
            raise RecipeError(
                f"scheme {scheme!r}: {name} applies to the VGG19 Pyramid's levels; the {ladder.family} ladder's levels are fixed models",
                key=f"{key}.{name}",
                fix=f"remove {name} from [stages.scheme]",
            )
