"""``pyramidkd export`` (issue 22, Export): every format exports a tiny run's stage,
runs on its test images with logits equal to the checkpoint's, writes its accuracy
and preprocessing beside it; the TorchScript trace fallback; the errors."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch

from pyramidkd import testing
from pyramidkd.engine.deploy import errors as deploy_errors
from pyramidkd.engine.deploy import formats
from pyramidkd.engine.deploy.export import export_stage
from pyramidkd.engine.deploy.loading import load_model
from pyramidkd.engine.errors import RunDirectoryError, UserError
from pyramidkd.engine.training.checkpoints import load_checkpoint, save_checkpoint

FORMATS = ["onnx", "pt2", "torchscript"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    testing.run_tiny(testing.tiny_recipe(dataset={**testing.TINY_DATASET, "test_size": 37}), workdir=folder)
    return folder / "run"


@pytest.fixture(scope="module")
def exported(finished):
    return {name: export_stage(str(finished), None, name) for name in FORMATS}


def run_file(name: str, path: str, images: torch.Tensor) -> torch.Tensor:
    """The exported file run by its own runtime, as a deployer would (not through the engine)."""
    if name == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])
    if name == "pt2":
        return torch.export.load(path).module()(images)
    return torch.jit.load(path)(images)


def file_metadata(name: str, path: str) -> dict:
    if name == "onnx":
        import onnx

        model = onnx.load(path)
        onnx.checker.check_model(model)
        return {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    files = {"preprocessing.json": "", "pyramidkd.json": ""}
    if name == "pt2":
        torch.export.load(path, extra_files=files)
    else:
        torch.jit.load(path, _extra_files=files)
    return {key[: -len(".json")]: json.loads(value) for key, value in files.items()}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_exports_verifies_and_matches_the_checkpoint(name, finished, exported):
    done = exported[name]
    assert done.path == str(finished / "export" / f"student{formats.FORMATS[name].suffix}")  # the last stage by default
    report = json.loads(open(done.report_path, encoding="utf-8").read())
    assert report["format"] == name and report["stage"] == "student" and report["file_bytes"] == os.path.getsize(done.path)
    checked = report["verification"]
    assert checked["images"] == 37 and checked["passed"] and 1 in checked["batch_sizes"]
    assert checked["relative_diff"] <= 1e-4 and checked["tolerance"] == 1e-4
    accuracy = report["test_accuracy"]
    assert accuracy["exported"] == accuracy["checkpoint"] == accuracy["recorded_by_the_run"]
    assert report["versions"]["torch"] == torch.__version__
    # the file on its own runtime, another batch size: the checkpoint's logits
    model = load_model(finished / "checkpoints" / "student" / "best.pt")
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
    got = run_file(name, done.path, images)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    metadata = file_metadata(name, done.path)
    assert metadata["preprocessing"] == report["preprocessing"] == model.preprocessing
    assert metadata["preprocessing"]["class_names"] == ["class0", "class1", "class2", "class3"]
    assert metadata["pyramidkd"]["stage"] == "student" and metadata["pyramidkd"]["model"]["name"] == "vgg"


def test_onnx_report_names_the_opset_and_runtime(exported):
    versions = exported["onnx"].report["versions"]
    assert versions["opset"] >= 17 and versions["onnx"] and versions["onnxruntime"]
    assert exported["onnx"].report["exporter"] == "torch.onnx.export(dynamo=True)"


def test_stage_and_output_options_and_the_cli(finished, tmp_path, cli):
    result = cli("export", finished, "--stage", "teacher", "--format", "pt2", "--output", tmp_path)
    assert result.code == 0, result.err
    assert os.path.exists(tmp_path / "teacher.pt2") and os.path.exists(tmp_path / "teacher.pt2.json")
    assert "verified on 37 test images" in result.out and "test accuracy" in result.out
    named = export_stage(str(finished), "teacher", "torchscript", str(tmp_path / "mine.pt"))
    assert named.path == str(tmp_path / "mine.pt") and os.path.exists(tmp_path / "mine.pt.json")
    assert sorted(os.listdir(tmp_path)) == ["mine.pt", "mine.pt.json", "teacher.pt2", "teacher.pt2.json"]  # no temporaries


def test_a_failed_verification_writes_nothing(finished, tmp_path, monkeypatch):
    def off_by_a_little(payload):
        run = formats.pt2_runner(payload)
        return lambda images: run(images) + 0.01

    monkeypatch.setitem(formats.FORMATS, "pt2", formats.ExportFormat("pt2", ".pt2", formats.export_pt2, off_by_a_little))
    with pytest.raises(deploy_errors.ExportError, match="does not reproduce the checkpoint") as error:
        export_stage(str(finished), "student", "pt2", str(tmp_path))
    assert "--format" in error.value.fix
    assert os.listdir(tmp_path) == []


def test_errors_name_the_stages_and_the_fix(finished, tmp_path, cli):
    unknown = cli("export", finished, "--stage", "nope")
    assert unknown.code == 1 and "stage 'nope' does not exist" in unknown.err and "teacher, student" in unknown.err
    assert "Traceback" not in unknown.err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(finished, unfinished, ignore=shutil.ignore_patterns("export", "summary.json"))
    os.remove(unfinished / "checkpoints" / "student" / "result.json")
    with pytest.raises(RunDirectoryError, match="stage 'student' is not finished.*student \\(unfinished\\)"):
        export_stage(str(unfinished), "student", "pt2")
    os.remove(unfinished / "checkpoints" / "teacher" / "result.json")
    none = cli("export", unfinished)
    assert none.code == 1 and "no finished stage" in none.err and "--resume" in none.err
    assert cli("export", tmp_path).code == 1 and "not a run folder" in cli("export", tmp_path).err


def test_the_deploy_extra_missing_says_how_to_install(finished, monkeypatch):
    real = deploy_errors.importlib.util.find_spec
    monkeypatch.setattr(deploy_errors.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    with pytest.raises(UserError, match="needs onnxruntime, which is not installed") as error:
        export_stage(str(finished), None, "onnx")
    assert ".venv/bin/pip install -e '.[deploy]'" in error.value.fix  # a checkout: the editable install


def test_torchscript_falls_back_to_a_checked_trace():
    class Unscriptable(torch.nn.Module):  # getattr(self, name)(x): what torch.jit.script refuses
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.names = ["conv"]

        def forward(self, x):
            for name in self.names:
                x = getattr(self, name)(x)
            return x.mean((2, 3))

    model = Unscriptable().eval()
    artefact = formats.export_torchscript(model, torch.randn(2, 3, 8, 8), {"preprocessing": "{}"})
    assert artefact.exporter == "torch.jit.trace" and "traced instead" in artefact.notes[0]
    images = torch.randn(6, 3, 8, 8)
    assert torch.allclose(formats.torchscript_runner(artefact.payload)(images), model(images))


def test_a_trace_that_depends_on_the_input_is_refused():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.names = ["double"]

        def double(self, x):
            return 2 * x

        def forward(self, x):
            for name in self.names:
                x = getattr(self, name)(x)
            return x.mean((2, 3)) if x.shape[0] == 2 else -x.mean((2, 3))  # frozen by tracing at batch 2

    with pytest.raises(deploy_errors.ExportError, match="traced model differs") as error:
        formats.export_torchscript(Branchy().eval(), torch.randn(2, 3, 8, 8), {})
    assert "--format onnx or pt2" in error.value.fix


@torch.library.custom_op("pyramidkd_test::mystery", mutates_args=())
def mystery(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@mystery.register_fake
def _(x):
    return torch.empty_like(x)


def test_an_op_the_onnx_exporter_cannot_handle_is_named_with_the_fix():
    class Mysterious(torch.nn.Module):
        def forward(self, x):
            return mystery(x).mean((2, 3))

    with pytest.raises(deploy_errors.ExportError, match="mystery") as error:
        formats.export_onnx(Mysterious().eval(), torch.randn(2, 3, 8, 8), {})
    assert "cannot handle" in error.value.message and "--format pt2 or torchscript" in error.value.fix
    pt2 = formats.export_pt2(Mysterious().eval(), torch.randn(2, 3, 8, 8), {})  # the fix works
    assert formats.pt2_runner(pt2.payload)(torch.ones(3, 3, 8, 8)).shape == (3, 3)


def test_an_older_checkpoint_without_preprocessing_still_exports(finished, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(finished, old, ignore=shutil.ignore_patterns("export"))
    best = str(old / "checkpoints" / "student" / "best.pt")
    checkpoint = load_checkpoint(best)
    del checkpoint["preprocessing"], checkpoint["format"]
    save_checkpoint(best, checkpoint)
    model = load_model(best)
    assert "predates recorded preprocessing" in model.preprocessing["note"] and model.class_names == ["class0", "class1", "class2", "class3"]
    done = export_stage(str(old), None, "pt2")
    assert done.report["verification"]["passed"] and done.report["preprocessing"]["input_shape"] == [3, 8, 8]
    buffer = io.BytesIO(open(done.path, "rb").read())
    assert formats.read_pt2_metadata(buffer.getvalue())["preprocessing"]
