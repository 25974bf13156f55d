"""Training keys added after the fingerprint's format was fixed do not invalidate the
run folders written before them while they keep their default."""

from __future__ import annotations

import attrs

from pyramidkd.engine.settings import TrainSection
from pyramidkd.engine.training.fingerprint import LATER_TRAIN_KEYS, train_description


def test_a_later_key_at_its_default_is_left_out_of_the_fingerprint():
    train = TrainSection()
    described = train_description(train)
    assert train.sync_batchnorm is True and "sync_batchnorm" not in described
    assert train.scheduler.milestones == [] and "milestones" not in described["scheduler"]
    everything_else = {k: v for k, v in attrs.asdict(train).items() if k not in ("sync_batchnorm", "test_every_epoch")}
    del everything_else["scheduler"]["milestones"]
    assert described == everything_else  # what a run folder of 0.1.0 hashed
    assert train.test_every_epoch is False and "test_every_epoch" not in described
    assert set(LATER_TRAIN_KEYS) == {"sync_batchnorm", "scheduler.milestones", "test_every_epoch"}


def test_a_later_key_set_away_from_its_default_changes_the_fingerprint():
    train = attrs.evolve(TrainSection(), sync_batchnorm=False)
    assert train_description(train)["sync_batchnorm"] is False


def test_multistep_milestones_enter_the_fingerprint():
    train = attrs.evolve(TrainSection(), scheduler=attrs.evolve(TrainSection().scheduler, name="multistep", milestones=[2, 4]))
    assert train_description(train)["scheduler"]["milestones"] == [2, 4]


def test_a_component_parameter_marked_since_is_left_out_at_its_default():
    from pyramidkd.engine import ComponentSpec, Loss
    from pyramidkd.engine.training.fingerprint import component_description

    @attrs.define
    class Params:
        temperature: float = 4.0
        added: bool = attrs.field(default=False, metadata={"since": "0.3.0"})
        listed: list = attrs.field(factory=list, metadata={"since": "0.3.0"})

    class Later(Loss):
        name = "later"

    def describe(**values):
        return component_description(ComponentSpec(Later, Params(**values), "loss"))

    assert describe() == {"name": "later", "params": {"temperature": 4.0}}  # what the older release hashed
    assert describe(added=True)["params"] == {"temperature": 4.0, "added": True}
    assert describe(listed=[1])["params"]["listed"] == [1]


def test_kd_stages_of_0_2_0_keep_their_fingerprint():
    """kd gained standardize, kd_weight and ce_weight in 0.3.0; at their defaults a kd
    stage is described as 0.2.0 described it, so its run folders are reused."""
    from pyramidkd.engine.training.fingerprint import component_description
    from pyramidkd.testing import build_component

    loss = build_component("loss", "kd")
    spec = type("Spec", (), {"name": "kd", "params": loss.params})()
    assert component_description(spec) == {"name": "kd", "params": {"temperature": 4.0, "alpha": 0.9, "backend": "auto"}}
    standardized = build_component("loss", "kd", {"standardize": True, "kd_weight": 9.0, "ce_weight": 0.1})
    spec.params = standardized.params
    assert component_description(spec)["params"]["standardize"] is True


def test_hint_mse_and_gram_stages_of_0_2_0_keep_their_fingerprint():
    """hint gained hint_layer / guided_layer and mse / gram gained layers in 0.3.0; a
    stage configured as 0.2.0 could (hint reading the tap named "hint") is described as
    0.2.0 described it."""
    from pyramidkd.engine.training.fingerprint import component_description
    from pyramidkd.testing import build_component

    def describe(name, params):
        loss = build_component("loss", name, params)
        return component_description(type("Spec", (), {"name": name, "params": loss.params})())["params"]

    assert set(describe("hint", {"hint_layer": "hint"})) == {"regressor"}
    assert describe("hint", {})["hint_layer"] == "feat.2"  # the new default is a new behaviour
    assert "layers" not in describe("mse", {}) and "layers" not in describe("gram", {})
