"""What a run writes: file modes that follow the umask, epochs capped by
``max_epochs`` in every stage (scheme-planned ones included)."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

from conftest import TINY_RECIPE
from test_pyramid_schemes import HEAD
from pyramidkd.engine.runner import prepare, run_recipe
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.fingerprint import Fingerprints


@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_file_of_a_run_follows_the_umask(mask, mode, umask, write_recipe, tmp_path, cli):
    umask(mask)
    out = tmp_path / "run"
    result = cli("run", write_recipe(TINY_RECIPE), "--quiet", "--output", out, "--set", "train.epochs=1")
    assert result.code == 0, result.err
    files = [path for path in out.rglob("*") if path.is_file()]
    assert {"recipe.toml", "manifest.json", "summary.json", "metrics.jsonl", "best.pt", "last.pt", "result.json"} <= {p.name for p in files}
    modes = {str(path.relative_to(out)): oct(stat.S_IMODE(path.stat().st_mode)) for path in files}
    assert set(modes.values()) == {oct(mode)}, modes


# A Pyramid chain whose stages set their own epochs three ways: [train], the
# scheme's stage1_epochs, and a stage's own [stages.train].
CHAIN = HEAD.replace("epochs = 1", "epochs = 3").replace("batch_norm = true }\n", "batch_norm = true }\ntrain = { epochs = 4 }\n", 1) + """
[[stages]]
id = "fwd"
scheme = { name = "pyramid-forward", teacher = "teacher", levels = ["svgg17"], width = 0.0625, batch_norm = true, stage1_epochs = 5 }
"""


def test_max_epochs_caps_every_planned_stage(write_recipe):
    recipe = str(write_recipe(CHAIN))
    planned = {stage.id: stage.train.epochs for stage in prepare(recipe).stages}
    assert planned == {"teacher": 4, "fwd.svgg17.hint": 5, "fwd.svgg17": 3}
    capped = prepare(recipe, max_epochs=2)
    assert {stage.id: stage.train.epochs for stage in capped.stages} == {"teacher": 2, "fwd.svgg17.hint": 2, "fwd.svgg17": 2}
    assert all(s.train.epochs == 4 for s in prepare(recipe, max_epochs=9).stages if s.id == "teacher")  # a cap, not a setting

    # the cap is part of what a stage is: a capped stage is never reused for an uncapped one
    uncapped = prepare(recipe)
    assert (Fingerprints(capped.stages, capped.dataset, 0).by_stage.keys() == Fingerprints(uncapped.stages, uncapped.dataset, 0).by_stage.keys())
    assert all(a != b for a, b in zip(Fingerprints(capped.stages, capped.dataset, 0).by_stage.values(),
                                      Fingerprints(uncapped.stages, uncapped.dataset, 0).by_stage.values()))


def test_max_epochs_run_trains_each_stage_at_most_n_epochs(write_recipe, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "run"
        summary = run_recipe(str(write_recipe(CHAIN)), output=str(out), quiet=True, max_epochs=1)
    finally:
        torch.set_num_threads(threads)
    assert [(s["stage"], s["epochs"]) for s in summary["stages"]] == [("teacher", 1), ("fwd.svgg17.hint", 1), ("fwd.svgg17", 1)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"], r["epochs"]) for r in records if r["kind"] == "epoch"] == [
        ("teacher", 1, 1), ("fwd.svgg17.hint", 1, 1), ("fwd.svgg17", 1, 1)]
    # the scheduler was built for the capped count (cosine over 1 epoch, not 4)
    last = load_checkpoint(str(out / "checkpoints" / "teacher" / "last.pt"))
    assert last["scheduler"]["T_max"] == 1


def test_a_run_leaves_the_process_torch_settings_as_they_were(write_recipe, tmp_path, cli):
    """A run with ``threads = 1`` inside a longer process (a notebook, this test
    session) must not leave that process on one thread."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    result = cli("run", write_recipe(TINY_RECIPE), "--quiet", "--output", tmp_path / "run", "--set", "train.epochs=1",
                 "--set", f"experiment.threads={threads + 1}")
    assert result.code == 0, result.err
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
