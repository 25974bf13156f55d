"""A checkpoint is data, never code (issue 24): real pickle payloads — a ``__reduce__``
that writes a marker file — as a teacher, as ``init_from``, as a run's ``last.pt``
under ``--resume``, under ``report``, ``save-weights`` and ``convert-checkpoint``:
each is refused with a pyramidkd error naming the file and the global (exit 1, no
traceback), and the marker is never written. Plus: every file the engine writes
reads back weights-only, and a 0.1.0 checkpoint (NumPy RNG state inside) still
resumes exactly."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine.errors import CheckpointError, UnsafeCheckpointError
from pyramidkd.engine.training.checkpoints import CHECKPOINT_FORMAT, load_checkpoint
from pyramidkd.engine.training.sharing import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled, it writes ``marker`` (what a shell command in a real attack would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def write_payload(path: Path, marker: Path, how: str = "torch.save") -> Path:
    """A file that looks like a pyramidkd checkpoint, with the payload inside."""
    content = {"format": CHECKPOINT_FORMAT, "model": {"name": "vgg", "params": {}, "num_classes": 4, "input_shape": [3, 8, 8]},
               "state_dict": {}, "extra": Payload(marker)}
    if how == "torch.save":
        torch.save(content, path)
    else:  # a bare pickle, as another tool (or an attacker) writes it
        with open(path, "wb") as handle:
            pickle.dump(content, handle, protocol=2)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "the payload ran"


def assert_refused(result, path):
    assert result.code == 1, (result.out, result.err)
    assert "Traceback" not in result.err
    assert str(path) in result.err and "refused" in result.err and "builtins.exec" in result.err, result.err
    assert "\n  fix: delete it" in result.err or "\n  fix: delete the file" in result.err  # not "convert it"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_the_payload_is_real(tmp_path, how):
    """The control: unpickled plainly, the test payload does write its marker."""
    marker = tmp_path / "control"
    path = write_payload(tmp_path / "payload.pt", marker, how)
    if how == "torch.save":
        torch.load(path, weights_only=False)  # what pyramidkd 0.1.0 did
    else:
        pickle.loads(path.read_bytes())
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_load_checkpoint_refuses_a_payload_naming_file_and_global(tmp_path, marker, how):
    path = write_payload(tmp_path / "payload.pt", marker, how)
    with pytest.raises(UnsafeCheckpointError) as caught:
        load_checkpoint(str(path))
    assert caught.value.file == str(path) and "builtins.exec" in caught.value.message
    assert "program, not a checkpoint" in caught.value.fix and "--trust" not in caught.value.fix


def student_of(scheme: str, **params) -> str:
    """A one-stage recipe whose student uses a checkpoint file (``teacher`` / ``init_from``)."""
    return testing.tiny_recipe(teacher=False, scheme=scheme, scheme_params=params, name="payload")


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("role", ["teacher", "init_from"])
def test_a_payload_as_teacher_or_init_from_is_refused(command, role, tmp_path, marker, write_recipe, cli):
    path = write_payload(tmp_path / "downloaded.pt", marker)
    recipe = write_recipe(student_of("kd", teacher="downloaded.pt") if role == "teacher" else student_of("scratch", init_from="downloaded.pt"))
    args = [command, recipe] + (["--quiet", "--output", tmp_path / "out"] if command == "run" else [])
    assert_refused(cli(*args), path)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before anything ran


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished")
    testing.run_tiny(workdir=folder)
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_payload_as_last_pt_under_resume_is_refused(run_copy, marker, cli):
    run = run_copy / "run"
    (run / "checkpoints" / "student" / "result.json").unlink()  # the student stage was interrupted
    last = write_payload(run / "checkpoints" / "student" / "last.pt", marker)
    result = cli("run", run_copy / "recipe.toml", "--quiet", "--output", run, "--resume")
    assert_refused(result, last)


@pytest.mark.parametrize("command", ["report", "save-weights"])
def test_a_payload_as_best_pt_under_report_and_save_weights_is_refused(command, run_copy, marker, cli):
    best = write_payload(run_copy / "run" / "checkpoints" / "teacher" / "best.pt", marker)
    args = ["report", run_copy / "run"] if command == "report" else ["save-weights", run_copy / "run", "--stage", "teacher"]
    assert_refused(cli(*args), best)


def test_convert_checkpoint_refuses_a_payload_even_with_trust(tmp_path, marker, cli):
    path = write_payload(tmp_path / "payload.pt", marker)
    assert_refused(cli("convert-checkpoint", path), path)
    trusted = cli("convert-checkpoint", path, "--trust")
    assert trusted.code == 1 and "Traceback" not in trusted.err
    assert "refused, even with --trust" in trusted.err and "builtins.exec" in trusted.err


class Fraction2:  # a harmless object another tool might pickle (importable: tests are on sys.path)
    def __init__(self, value):
        self.value = value


def test_convert_checkpoint_with_trust_rewrites_numpy_values_as_plain_data(tmp_path, cli):
    path = tmp_path / "other-tool.pt"
    content = {"format": CHECKPOINT_FORMAT, "model": {"name": "vgg", "params": {"layers": [4, "M"]}, "num_classes": 4,
                                                      "input_shape": [3, 8, 8]},
               "state_dict": {"w": torch.ones(2)}, "val_acc": np.float64(0.5), "extra": {"bank": np.arange(6, dtype=np.float32)}}
    torch.save(content, path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint(str(path))
    refused = cli("convert-checkpoint", path)
    assert refused.code == 1 and "numpy" in refused.err and "--trust" in refused.err
    done = cli("convert-checkpoint", path, "--trust", "--output", tmp_path / "plain.pt")
    assert done.code == 0, done.err
    assert "rewritten as plain data" in done.out and "allowed (--trust)" in done.out
    assert torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "plain.pt") == []
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["val_acc"] == 0.5 and torch.equal(plain["extra"]["bank"], torch.arange(6, dtype=torch.float32))


def test_convert_checkpoint_names_the_key_of_an_object_it_cannot_rewrite(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": {}, "loss_state": {"thing": Fraction2(3)}}, path)
    with pytest.raises(CheckpointError, match=r"key loss_state\.thing holds a .*Fraction2 object"):
        convert_checkpoint(str(path), trust=True)


def test_a_bare_state_dict_is_not_a_pyramidkd_checkpoint(tmp_path, write_recipe, cli):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "bare.pt")
    recipe = write_recipe(student_of("kd", teacher="bare.pt"))
    result = cli("validate", recipe)
    assert result.code == 1 and "not a pyramidkd checkpoint" in result.err, result.err
    assert "unknown model" not in result.err and "None" not in result.err


def test_every_file_the_engine_writes_reads_weights_only(finished_run):
    files = sorted((finished_run / "run" / "checkpoints").glob("*/*.pt"))
    assert {f.name for f in files} == {"best.pt", "last.pt"} and len(files) == 4
    for path in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)  # no allowance at all


PYRAMID = """
[experiment]
name = "every-state"
seed = 0
device = "cpu"

[dataset]
name = "synthetic"
num_classes = 4
image_size = 32
train_size = 64
val_size = 32
test_size = 32

[train]
epochs = 1
batch_size = 32
optimizer = { name = "adam", lr = 0.001 }
scheduler = { name = "cosine" }

[[stages]]
id = "teacher"
scheme = "scratch"
model = { name = "vgg19", width = 0.0625, batch_norm = true }

[[stages]]
id = "fwd"
[stages.scheme]
name = "pyramid-forward"
teacher = "teacher"
levels = ["svgg17"]
width = 0.0625
batch_norm = true
"""


def test_every_scheme_state_reads_weights_only(tmp_path, write_recipe, cli):
    """A Pyramid chain (hint stage with its loss state), Adam and a cosine schedule."""
    out = tmp_path / "run"
    result = cli("run", write_recipe(PYRAMID), "--quiet", "--output", out)
    assert result.code == 0, result.err
    files = sorted((out / "checkpoints").glob("*/*.pt"))
    assert len(files) == 6
    for path in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == [], path
        torch.load(path, weights_only=True)


def test_no_weights_only_false_in_the_sources():
    pattern = re.compile(r"weights_only\s*=\s*False")
    offenders = [f"{path.relative_to(ROOT)}:{number}" for folder in ("engine", "plugins", "package", "scripts")
                 for path in sorted((ROOT / folder).rglob("*")) if path.is_file() and path.suffix in (".py", ".sh", ".md", "")
                 for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not offenders, "checkpoints are read weights-only: " + ", ".join(offenders)


# --- a checkpoint written by pyramidkd 0.1.0 -----------------------------------------

RAISING_PLUGIN = '''
import os
from pyramidkd.engine import hookimpl

@hookimpl
def pyramidkd_batch_end(run, stage, epoch, step, num_steps, loss):
    if f"{epoch}:{step}" == os.environ.get("PYRAMIDKD_TEST_RAISE_AT"):
        raise ValueError("stopped on purpose")
'''

RESUMABLE = """
[experiment]
name = "legacy"
seed = 3
device = "cpu"
plugins = ["legacy_helpers"]

[dataset]
name = "synthetic"
num_classes = 4
image_size = 8
train_size = 128
val_size = 32
test_size = 32

[train]
epochs = 2
batch_size = 16
optimizer = { name = "sgd", lr = 0.05 }

[[stages]]
id = "student"
scheme = "scratch"
model = { name = "vgg", layers = [4, "M"], dropout = 0.3 }
"""


def as_0_1_0(rng: dict) -> dict:
    """The RNG states in the shapes pyramidkd 0.1.0 wrote (random.getstate(),
    np.random.get_state() with its uint32 array, no CUDA)."""
    python, numpy_ = rng["python"], rng["numpy"]
    return {**rng,
            "python": (python["version"], tuple(python["state"].tolist()), python["gauss_next"]),
            "numpy": (numpy_["key"], numpy_["state"].numpy().astype(np.uint32), numpy_["pos"], numpy_["has_gauss"],
                      numpy_["cached_gaussian"]),
            "cuda": None}


def run_summary(out: Path) -> tuple:
    summary = json.loads((out / "summary.json").read_text())
    state = load_checkpoint(str(out / "checkpoints" / "student" / "best.pt"))["state_dict"]
    return [s["test_acc"] for s in summary["stages"]], {k: v.clone() for k, v in state.items()}


def test_a_0_1_0_last_pt_reads_as_it_is_and_resumes_exactly(tmp_path, cli, monkeypatch):
    (tmp_path / "legacy_helpers.py").write_text(RAISING_PLUGIN)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RESUMABLE)
    try:
        assert cli("run", recipe, "--quiet", "--output", tmp_path / "reference").code == 0
        monkeypatch.setenv("PYRAMIDKD_TEST_RAISE_AT", "2:3")
        out = tmp_path / "interrupted"
        assert cli("run", recipe, "--quiet", "--output", out).code == 1
        monkeypatch.delenv("PYRAMIDKD_TEST_RAISE_AT")
        last = out / "checkpoints" / "student" / "last.pt"
        checkpoint = torch.load(last, weights_only=True)
        assert checkpoint["progress"]["step"] == 3  # saved mid-epoch
        torch.save({**checkpoint, "rng": as_0_1_0(checkpoint["rng"])}, last)  # what 0.1.0 wrote
        assert any("numpy" in name for name in torch.serialization.get_unsafe_globals_in_checkpoint(last))
        assert isinstance(load_checkpoint(str(last))["rng"]["numpy"][1], np.ndarray)
        resumed = cli("run", recipe, "--quiet", "--output", out, "--resume")
        assert resumed.code == 0, resumed.err
    finally:
        sys.modules.pop("legacy_helpers", None)
    (acc_a, state_a), (acc_b, state_b) = run_summary(tmp_path / "reference"), run_summary(out)
    assert acc_a == acc_b and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_convert_checkpoint_rewrites_a_0_1_0_file_without_trust(tmp_path):
    from pyramidkd.engine.training.rng import restore_rng_states, rng_states

    generator = torch.Generator().manual_seed(1)
    legacy = {"format": CHECKPOINT_FORMAT, "model": {"name": "vgg", "params": {}, "num_classes": 4, "input_shape": [3, 8, 8]},
              "state_dict": {}, "rng": as_0_1_0(rng_states(generator))}
    path = tmp_path / "last.pt"
    torch.save(legacy, path)
    done = convert_checkpoint(str(path), trust=False)
    assert done.allowed == [] and torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    restore_rng_states(torch.load(path, weights_only=True)["rng"], generator)
    first = (np.random.rand(), torch.rand(1).item())
    restore_rng_states(legacy["rng"], generator)
    assert (np.random.rand(), torch.rand(1).item()) == first
