"""Reuse by fingerprint: a stage is reused only when what it *is* (its resolved
plan, its teachers' and init_from's fingerprints) is unchanged; otherwise it and
every stage depending on it are recomputed, and one line says which and why."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_RECIPE
from pyramidkd.engine.runner import prepare
from pyramidkd.engine.training.fingerprint import Fingerprints

# TINY_RECIPE's experiment, data and one-epoch training, with a chain of stages:
# teacher -> student -> pupil, and "alt", "other" beside them.
CHAIN = TINY_RECIPE.split("[[stages]]")[0].replace("epochs = 2", "epochs = 1") + """
[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M", 16, "M"] }

[[stages]]
id = "alt"
scheme = "scratch"
model = { name = "vgg", layers = [8, "M"] }

[[stages]]
id = "student"
scheme = { name = "kd", teacher = "teacher" }
model = { name = "vgg", layers = [4, "M"] }
loss = { name = "kd", temperature = 2.0, alpha = 0.7 }

[[stages]]
id = "pupil"
scheme = { name = "kd", teacher = "student" }
model = { name = "vgg", layers = [4, "M"] }
loss = { name = "kd", temperature = 2.0, alpha = 0.7 }

[[stages]]
id = "other"
scheme = "scratch"
model = { name = "vgg", layers = [4, "M"] }
"""


def reused(out) -> dict[str, bool]:
    summary = json.loads((out / "summary.json").read_text())
    return {stage["stage"]: stage.get("skipped", False) for stage in summary["stages"]}


@pytest.fixture
def finished(write_recipe, tmp_path, cli):
    recipe = write_recipe(CHAIN)
    out = tmp_path / "run"
    result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 0, result.err
    return recipe, out


def test_result_and_last_checkpoint_carry_the_fingerprint(finished):
    recipe, out = finished
    from pyramidkd.engine.training.checkpoints import load_checkpoint

    prepared = prepare(str(recipe))
    expected = Fingerprints(prepared.stages, prepared.dataset, prepared.recipe.experiment.seed).by_stage
    for stage_id, fingerprint in expected.items():
        result = json.loads((out / "checkpoints" / stage_id / "result.json").read_text())
        assert result["fingerprint"] == fingerprint
        assert load_checkpoint(str(out / "checkpoints" / stage_id / "last.pt"))["fingerprint"] == fingerprint
    assert len(set(expected.values())) == len(expected)


def test_unchanged_rerun_reuses_everything(finished, cli):
    recipe, out = finished
    again = cli("run", recipe, "--quiet", "--output", out)
    assert again.code == 0, again.err
    assert all(reused(out).values())
    assert "recomputing" not in again.err


def test_a_changed_teacher_recomputes_the_dependent_stages_only(finished, cli):
    recipe, out = finished
    result = cli("run", recipe, "--quiet", "--output", out, "--resume", "--force", "--set", 'stages.student.scheme.teacher="alt"')
    assert result.code == 0, result.err
    assert reused(out) == {"teacher": True, "alt": True, "student": False, "pupil": False, "other": True}
    lines = [line for line in result.err.splitlines() if "recomputing" in line]
    assert lines == ["pyramidkd: recomputing 2 stage(s) whose inputs changed: student (teacher teacher -> alt); pupil (student is recomputed)"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"][2]["teachers"][0]["stage"] == "alt"


def test_a_changed_loss_parameter_recomputes_the_stage_and_its_pupils(finished, cli):
    recipe, out = finished
    result = cli("run", recipe, "--quiet", "--output", out, "--resume", "--force", "--set", "stages.student.loss.temperature=3.0")
    assert result.code == 0, result.err
    assert reused(out) == {"teacher": True, "alt": True, "student": False, "pupil": False, "other": True}
    assert "student (its plan changed (loss, training, data or input settings)); pupil (student is recomputed)" in result.err


def test_a_result_without_fingerprint_counts_as_changed(finished, cli):
    recipe, out = finished
    path = out / "checkpoints" / "other" / "result.json"
    old = json.loads(path.read_text())
    del old["fingerprint"]
    path.write_text(json.dumps(old))
    last = out / "checkpoints" / "other" / "last.pt"
    state = torch.load(last, weights_only=False)
    del state["fingerprint"]
    torch.save(state, last)
    result = cli("run", recipe, "--quiet", "--output", out)
    assert result.code == 0, result.err
    assert reused(out) == {"teacher": True, "alt": True, "student": True, "pupil": True, "other": False}
    assert "other (it was stored without a fingerprint (an older run))" in result.err


def test_an_interrupted_stage_resumes_only_when_its_plan_is_unchanged(finished, cli):
    recipe, out = finished
    (out / "checkpoints" / "student" / "result.json").unlink()  # as if interrupted after its last epoch
    same = cli("run", recipe, "--quiet", "--output", out, "--resume")
    assert same.code == 0, same.err
    assert "finishing stage 'student' (all 1 epoch(s) were done; testing its best checkpoint); reused stages: teacher, alt" in same.err
    assert reused(out) == {"teacher": True, "alt": True, "student": False, "pupil": True, "other": True}

    (out / "checkpoints" / "student" / "result.json").unlink()
    changed = cli("run", recipe, "--quiet", "--output", out, "--resume", "--force", "--set", "stages.student.loss.alpha=0.5")
    assert changed.code == 0, changed.err
    assert "resuming" not in changed.err
    assert "student (its plan changed since it was interrupted); pupil (student is recomputed)" in changed.err


def test_fingerprint_covers_teacher_files_and_settings(write_recipe, tmp_path, finished):
    _, out = finished
    teacher_file = tmp_path / "teacher.pt"
    teacher_file.write_bytes((out / "checkpoints" / "teacher" / "best.pt").read_bytes())
    text = CHAIN.replace('teacher = "teacher"', f'teacher = "{teacher_file}"')

    def fingerprints(*overrides):
        prepared = prepare(str(write_recipe(text, "file.toml")), list(overrides))
        return Fingerprints(prepared.stages, prepared.dataset, prepared.recipe.experiment.seed).by_stage

    base = fingerprints()
    assert fingerprints() == base  # deterministic
    for override in ("experiment.seed=4", "dataset.train_size=64", "train.batch_size=16", "stages.student.model.layers=[6, \"M\"]"):
        changed = fingerprints(override)
        assert changed["student"] != base["student"] and changed["pupil"] != base["pupil"], override
    assert fingerprints("stages.alt.model.layers=[6, \"M\"]")["student"] == base["student"]  # alt is not an input

    teacher_file.write_bytes((out / "checkpoints" / "alt" / "best.pt").read_bytes())  # same path, other weights
    after = fingerprints()
    assert after["student"] != base["student"] and after["pupil"] != base["pupil"] and after["other"] == base["other"]
