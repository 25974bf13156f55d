"""Training keys added after the fingerprint's format was fixed do not invalidate the
run folders written before them while they keep their default."""

from __future__ import annotations

import attrs

from pyramidkd.engine.settings import TrainSection
from pyramidkd.engine.training.fingerprint import LATER_TRAIN_KEYS, train_description


def test_a_later_key_at_its_default_is_left_out_of_the_fingerprint():
    train = TrainSection()
    described = train_description(train)
    for key, default in LATER_TRAIN_KEYS.items():
        assert getattr(train, key) == default and key not in described
    everything_else = {k: v for k, v in attrs.asdict(train).items() if k not in LATER_TRAIN_KEYS}
    assert described == everything_else  # what a run folder of 0.1.0 hashed


def test_a_later_key_set_away_from_its_default_changes_the_fingerprint():
    train = attrs.evolve(TrainSection(), sync_batchnorm=False)
    assert train_description(train)["sync_batchnorm"] is False
