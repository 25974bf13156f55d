"""``pyramidkd.load_model(path)``: a checkpoint as a plain ``nn.Module`` (eval mode)
with a ``transform``, from user code that imports nothing but ``pyramidkd``; and
the preprocessing every checkpoint records (issue 22)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from pyramidkd import testing
from pyramidkd.engine.deploy.preprocessing import describe_preprocessing
from pyramidkd.engine.host import make_plugin_host
from pyramidkd.engine.training.checkpoints import load_checkpoint
from pyramidkd.engine.training.models import model_from_checkpoint
from pyramidkd.engine.training.sharing import save_stage_weights


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load-model")
    testing.run_tiny(workdir=folder)
    return folder / "run"


def checkpoint_logits(path, images: torch.Tensor) -> torch.Tensor:
    """The logits of the checkpoint's model, rebuilt by the engine's own code."""
    model, _ = model_from_checkpoint(load_checkpoint(str(path)), str(path), make_plugin_host(load_entry_points=False))
    with torch.no_grad():
        return model.eval()(images)


USER_CODE = textwrap.dedent("""
    import sys
    import torch
    import pyramidkd

    assert not [m for m in sys.modules if m.startswith("pyramidkd.engine")], "import pyramidkd loaded the engine"
    model = pyramidkd.load_model(sys.argv[1])
    assert isinstance(model, torch.nn.Module) and not model.training
    expected = torch.load(sys.argv[2])
    with torch.no_grad():
        assert torch.equal(model(expected["images"]), expected["logits"]), "logits differ from the checkpoint's"
    pixels = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    assert model.transform(pixels).shape == (3, 8, 8) and model.transform(pixels).dtype == torch.float32
    print(",".join(model.class_names))
""")


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_load_model_in_a_process_that_imports_only_pyramidkd(kind, finished, tmp_path):
    best = finished / "checkpoints" / "student" / "best.pt"
    path = best if kind == "pt" else save_stage_weights(str(finished), "student", str(tmp_path / "student.safetensors")).path
    images = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save({"images": images, "logits": checkpoint_logits(best, images)}, tmp_path / "expected.pt")
    script = tmp_path / "user.py"
    script.write_text(USER_CODE)
    done = subprocess.run([sys.executable, str(script), str(path), str(tmp_path / "expected.pt")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "class0,class1,class2,class3"


def test_save_weights_carries_the_recorded_preprocessing(finished, tmp_path):
    saved = save_stage_weights(str(finished), "student", str(tmp_path / "s.safetensors"))
    recorded = load_checkpoint(str(finished / "checkpoints" / "student" / "best.pt"))["preprocessing"]
    given = {k: v for k, v in recorded.items() if v is not None}  # synthetic: no mean/std, scale, resize
    assert {k: saved.description["preprocessing"][k] for k in given} == given and "layout" in given


def write_image_tree(root, size=(12, 10)):
    generator = np.random.default_rng(0)
    for split, count in (("train", 10), ("test", 3)):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = generator.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index}.png")


@pytest.mark.parametrize("pipeline", ["dataloader", "tensor"])
def test_the_checkpoint_records_how_raw_images_become_inputs(pipeline, tmp_path):
    """On real pixels (an image folder, resized 12×10 -> 8×8): the checkpoint records
    resize, crop, scale, mean/std and classes, and ``model.transform`` of a raw test
    image gives exactly the tensor the run's evaluation fed the model."""
    import pyramidkd
    from pyramidkd.engine.deploy.runs import load_test_split, run_recipe_and_host, test_batches

    write_image_tree(tmp_path / "images")
    dataset = {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 8}
    recipe = testing.tiny_recipe(teacher=False, dataset=dataset)
    testing.run_tiny(recipe, overrides=[f"train.pipeline={pipeline}"], workdir=tmp_path / "work")
    run = tmp_path / "work" / "run"
    model = pyramidkd.load_model(run / "checkpoints" / "student" / "best.pt")
    recorded = model.preprocessing
    assert recorded["resize"] == 8 and recorded["crop"] == [8, 8] and recorded["scale"] == pytest.approx(1 / 255)
    assert recorded["mean"] == pytest.approx([0.485, 0.456, 0.406]) and recorded["class_names"] == ["cat", "dog"]
    assert recorded["channels"] == 3 and recorded["color"] == "RGB" and "note" not in recorded
    evaluated = next(test_batches(load_test_split(*run_recipe_and_host(str(run))), 1))[0][0]
    raw = Image.open(tmp_path / "images" / "test" / "cat" / "0.png")
    assert torch.allclose(model.transform(raw), evaluated, atol=1e-5)


def test_a_data_set_of_ready_made_tensors_says_so():
    data = testing.build_component("dataset", "synthetic", {"image_size": 8, "num_classes": 2}).load(None)
    described = describe_preprocessing(data)
    assert described["input_shape"] == [3, 8, 8] and described["mean"] is None and described["scale"] is None
    assert "float tensors" in described["note"] and described["class_names"] == ["class0", "class1"]


def test_the_documented_onnxruntime_example_preprocesses_from_the_metadata(tmp_path, capsys):
    """docs/deploy.md's onnxruntime block, run on an exported model of real (12×10)
    images: its logits are ``load_model``'s on ``model.transform(image)``."""
    import re
    from pathlib import Path

    import pyramidkd
    from pyramidkd.engine.deploy.export import export_stage

    write_image_tree(tmp_path / "images")
    dataset = {"name": "imagefolder", "root": str(tmp_path / "images"), "image_size": 8}
    testing.run_tiny(testing.tiny_recipe(teacher=False, dataset=dataset), workdir=tmp_path / "work")
    done = export_stage(str(tmp_path / "work" / "run"), None, "onnx")
    image = tmp_path / "images" / "test" / "dog" / "1.png"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    block = next(code for code in re.findall(r"```python\n(.*?)```", docs, re.DOTALL) if "onnxruntime" in code)
    block = re.sub(r'^MODEL, IMAGE = .*$', f"MODEL, IMAGE = {done.path!r}, {str(image)!r}", block, flags=re.MULTILINE)
    namespace: dict = {}
    exec(compile(block, "docs/deploy.md", "exec"), namespace)
    model = pyramidkd.load_model(tmp_path / "work" / "run" / "checkpoints" / "student" / "best.pt")
    with torch.no_grad():
        expected = model(model.transform(Image.open(image)).unsqueeze(0))
    assert np.abs(namespace["logits"] - expected.numpy()).max() < 1e-4
    assert capsys.readouterr().out.strip() == model.class_names[int(expected.argmax())]
