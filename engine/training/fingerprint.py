"""What a stage *is*: a fingerprint of its resolved plan, to decide reuse.

A completed stage is reused, and an interrupted one resumed, only when the
fingerprint stored with it (``result.json``, ``last.pt``) equals the one of the
stage as now planned. It covers the model, the loss, the resolved training
settings, the data set, the run's seed, what trains and what is tapped, how the
best epoch is chosen, and — recursively — the fingerprints of the stage's teachers
and ``init_from`` (a checkpoint file by the hash of its bytes).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import attrs

from ..components import CheckpointFile, ComponentSpec, ModelSource, StageOutput, StagePlan
from ..errors import CheckpointError
from ..records import StageResult

# Bump when the description below changes meaning: every stored stage then counts as changed.
FINGERPRINT_VERSION = 1
# [train] keys added since version 1, left out while at their default: a stage stored
# before a key existed is still reused (its value then was the default's behaviour).
# A dotted key names a key of a nested section.
LATER_TRAIN_KEYS = {"sync_batchnorm": True, "scheduler.milestones": [], "test_every_epoch": False}


def component_description(spec: ComponentSpec) -> dict[str, Any]:
    """A component's name and parameters. A parameter added after components were first
    fingerprinted declares ``metadata={"since": "<version>"}``: at the value that does what
    the component did before it existed (``metadata["was"]``, else its default) it is left
    out, so stages stored by the older release are reused."""
    params = attrs.asdict(spec.params)
    if attrs.has(type(spec.params)):
        for field in attrs.fields(type(spec.params)):
            if "since" in field.metadata and field.name in params and params[field.name] == _older_behaviour(field):
                del params[field.name]
    return {"name": spec.name, "params": params}


def _older_behaviour(field: attrs.Attribute) -> Any:
    if "was" in field.metadata:
        return field.metadata["was"]
    default = field.default
    return default.factory() if isinstance(default, attrs.Factory) and not default.takes_self else default


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise CheckpointError(f"cannot read the checkpoint: {error.strerror or error}", file=path,
                              fix="check the path and its permissions") from error
    return digest.hexdigest()


class Fingerprints:
    """The fingerprint of every planned stage, computed once (stages in run order)."""

    def __init__(self, stages: Iterable[StagePlan], dataset: ComponentSpec, seed: int):
        self.dataset = component_description(dataset)
        self.seed = seed
        self._files: dict[str, str] = {}
        self.by_stage: dict[str, str] = {}
        for stage in stages:
            self.by_stage[stage.id] = _digest(self.describe(stage))

    def __getitem__(self, stage_id: str) -> str:
        return self.by_stage[stage_id]

    def describe(self, stage: StagePlan) -> dict[str, Any]:
        """The canonical description the fingerprint hashes."""
        return {
            "version": FINGERPRINT_VERSION,
            "stage": stage.id,  # the stage's seed derives from it
            "model": component_description(stage.model),
            "loss": component_description(stage.loss),
            "train": train_description(stage.train),
            "dataset": self.dataset,
            "seed": self.seed,
            "trainable": stage.trainable,
            "student_taps": stage.student_taps,
            "teacher_taps": stage.teacher_taps,
            "select": stage.select,
            "teachers": [self.source(source) for source in stage.teachers],
            "init_from": self.source(stage.init_from) if stage.init_from is not None else None,
        }

    def source(self, source: ModelSource) -> dict[str, str]:
        if isinstance(source, StageOutput):
            return {"stage_fingerprint": self.by_stage[source.stage_id]}
        assert isinstance(source, CheckpointFile)
        if source.path not in self._files:
            self._files[source.path] = file_digest(source.path)
        return {"file_sha256": self._files[source.path]}


def train_description(train) -> dict[str, Any]:
    described = attrs.asdict(train)
    for key, default in LATER_TRAIN_KEYS.items():
        *sections, name = key.split(".")
        table = described
        for section in sections:
            table = table.get(section, {})
        if name in table and table[name] == default:
            del table[name]
    return described


def _digest(description: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(description).encode("utf-8")).hexdigest()


def source_label(source: ModelSource) -> str:
    return source.stage_id if isinstance(source, StageOutput) else source.path


def change_reason(stage: StagePlan, stored: StageResult | None, recomputed: set[str]) -> str:
    """Why a stored stage no longer matches its plan, as far as its result tells
    (``recomputed``: the stages recomputed before it in this run)."""
    if stored is None:
        return "its plan changed since it was interrupted"
    if stored.fingerprint is None:
        return "it was stored without a fingerprint (an older run)"
    reasons = []
    old_teachers = [teacher.label() for teacher in stored.teachers]
    new_teachers = [source_label(source) for source in stage.teachers]
    if old_teachers != new_teachers:
        reasons.append(f"teacher {', '.join(old_teachers) or '(none)'} -> {', '.join(new_teachers) or '(none)'}")
    else:
        inputs = list(stage.teachers) + ([stage.init_from] if stage.init_from is not None else [])
        changed = [s.stage_id for s in inputs if isinstance(s, StageOutput) and s.stage_id in recomputed]
        reasons += [f"{name} is recomputed" for name in dict.fromkeys(changed)]
    if stored.model != stage.model.name or stored.model_params != json.loads(canonical_json(stage.model.as_dict())):
        reasons.append(f"model {stored.model} -> {stage.model.name}" if stored.model != stage.model.name else "model parameters")
    if stored.loss != stage.loss.name:
        reasons.append(f"loss {stored.loss} -> {stage.loss.name}")
    if stored.epochs != stage.train.epochs:
        reasons.append(f"epochs {stored.epochs} -> {stage.train.epochs}")
    return ", ".join(reasons) or "its plan changed (loss, training, data or input settings)"
