"""Tap benchmarks: what the feature-tap contract costs a training step.

One SGD step (forward, cross-entropy, backward, update) of ``resnet20`` on a batch of
32 CIFAR-sized images, three ways:

* ``bare`` — the model called directly, as a hand-written loop would;
* ``no-taps`` — through a :class:`TapRecorder` with no taps, as every plain KD or
  scratch stage runs (no hook is registered: the declared tap points cost nothing);
* ``all-points`` — every declared point (feat.0 … feat.3, preact.1 … preact.3,
  pooled) recorded by forward hooks and left unused: the most a feature loss's
  hooks can add.

    pytest tests/benchmarks/test_bench_taps.py --benchmark-enable

Under the default ``--benchmark-disable`` each case runs once as a smoke test; the
figures to compare are ``no-taps`` against ``bare`` (expected: equal within noise).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyramidkd import testing
from pyramidkd.engine.training.taps import TapRecorder

pytestmark = pytest.mark.benchmark_suite
BATCH = 32


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = testing.build_component("model", "resnet20").build(10, (3, 32, 32))
    images, targets = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    return model, images, targets


def step_function(model, forward, images, targets):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        logits = forward(images)
        logits = logits.logits if hasattr(logits, "logits") else logits
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


@pytest.mark.parametrize("case", ["bare", "no-taps", "all-points"])
def test_training_step_with_and_without_taps(benchmark, setup, case):
    model, images, targets = setup
    recorder = None
    if case != "bare":
        taps = {} if case == "no-taps" else {name: f"@{name}" for name in model.tap_points()}
        recorder = TapRecorder(model, taps, role="student", stage_id="bench")
        assert len(recorder.handles) == len(taps)
    try:
        step = step_function(model, recorder or model, images, targets)
        step()  # warm-up
        benchmark.pedantic(step, rounds=20 if benchmark.enabled else 1, iterations=1)
    finally:
        if recorder is not None:
            recorder.close()
