"""recipes/cifar100-kd/: the standard CIFAR-100 KD table (CRD, ICLR 2020) — one teacher
recipe per teacher, one scratch + KD recipe per pair — runs and validates on data in
CIFAR-100's real on-disk format (written here), with the literature's schedule and the
published accuracies in [reference]; each pair's one-stage FitNet of methods/<pair>.toml validates
with the trained teacher (its ConvReg fits the pair's feat.2 maps)."""

from __future__ import annotations

import tomllib

import pytest

from conftest import RECIPES
from pyramidkd.engine.recipe import dump_toml
from test_datasets import write_cifar100

FOLDER = RECIPES / "cifar100-kd"
TEACHERS = sorted(path.stem for path in (FOLDER / "teachers").glob("*.toml"))
PAIRS = sorted(path.stem for path in FOLDER.glob("*-*.toml"))
TABLE_PAIRS = ["resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "wrn_40_2-wrn_40_1",
               "vgg13_bn-vgg8_bn", "vgg13_bn-mobilenetv2", "resnet50-mobilenetv2", "resnet50-vgg8_bn",
               "resnet32x4-shufflenetv1", "resnet32x4-shufflenetv2", "wrn_40_2-shufflenetv1"]
LIGHT_STUDENTS = {"mobilenetv2", "shufflenetv1", "shufflenetv2"}


def test_every_teacher_and_pair_of_the_table_has_a_recipe():
    assert TEACHERS == sorted(["resnet56", "resnet110", "resnet32x4", "wrn_40_2", "vgg13_bn", "resnet50"])
    assert PAIRS == sorted(TABLE_PAIRS)
    for pair in PAIRS:
        teacher, student = pair.split("-")
        assert teacher in TEACHERS
        recipe = tomllib.loads((FOLDER / f"{pair}.toml").read_text())
        stages = {stage["id"]: stage for stage in recipe["stages"]}
        assert stages["student"]["model"]["name"] == student == stages["kd"]["model"]["name"]
        assert stages["kd"]["scheme"]["teacher"].endswith(f"teachers/{teacher}/checkpoints/teacher/best.pt")
        train = recipe["train"]
        assert train["epochs"] == 240 and train["batch_size"] == 64
        assert train["scheduler"] == {"name": "multistep", "milestones": [150, 180, 210], "gamma": 0.1}
        assert train["optimizer"]["lr"] == (0.01 if student in LIGHT_STUDENTS else 0.05)
        assert set(recipe["reference"]) == {"student", "kd"} and recipe["reference"]["kd"] > recipe["reference"]["student"]


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, classes_used=5, train_per_class=4, test_per_class=2)
    return root


TINY = ("--set", "train.epochs=1", "--set", "dataset.val_fraction=0.5", "--set", "dataset.verify_checksums=false", "--set", "train.eval_batch_size=16")


# The three largest teachers take longest to build and step on 2 cores: in the slow suite.
LARGE = {"resnet110", "resnet32x4", "resnet50"}


@pytest.mark.parametrize("teacher", [pytest.param(t, marks=pytest.mark.slow) if t in LARGE else t for t in TEACHERS])
def test_teacher_recipes_train_and_every_pair_of_theirs_validates_with_the_teacher(teacher, cifar100_root, tmp_path, cli):
    out = tmp_path / "teacher"
    trained = cli("run", FOLDER / "teachers" / f"{teacher}.toml", "--output", out, "--quiet",
                  "--set", f"dataset.root={cifar100_root}", *TINY)
    assert trained.code == 0, trained.err
    checkpoint = out / "checkpoints" / "teacher" / "best.pt"
    assert checkpoint.is_file()
    for pair in (p for p in PAIRS if p.startswith(teacher + "-")):
        checked = cli("validate", FOLDER / f"{pair}.toml", "--set", f"dataset.root={cifar100_root}",
                      "--set", f"stages.kd.scheme.teacher={checkpoint}", *TINY)
        assert checked.code == 0, (pair, checked.err)
        student = pair.split("-")[1]
        assert f"kd: model {student}, loss kd, teacher {checkpoint}" in checked.out, checked.out
        # FitNet of the benchmark's methods recipe (CE + 100 x hint through ConvReg): its feat.2 maps fit.
        fitnet = fitnet_only(pair, tmp_path)
        checked = cli("validate", fitnet, "--set", f"dataset.root={cifar100_root}", "--set", f"stages.fitnet.scheme.teacher={checkpoint}", *TINY)
        assert checked.code == 0, (pair, checked.err)
        assert f"fitnet: model {student}, loss hint, teacher {checkpoint}" in checked.out, checked.out


def fitnet_only(pair: str, folder) -> str:
    """methods/<pair>.toml with its fitnet stage only."""
    recipe = tomllib.loads((FOLDER / "methods" / f"{pair}.toml").read_text())
    recipe["stages"] = [stage for stage in recipe["stages"] if stage["id"] == "fitnet"]
    recipe["reference"] = {"fitnet": recipe["reference"]["fitnet"]}
    path = folder / f"{pair}-fitnet.toml"
    path.write_text(dump_toml(recipe))
    return str(path)


@pytest.mark.parametrize("teacher", sorted(LARGE))
def test_the_large_teachers_recipes_validate(teacher, cifar100_root, cli):
    checked = cli("validate", FOLDER / "teachers" / f"{teacher}.toml", "--set", f"dataset.root={cifar100_root}", *TINY)
    assert checked.code == 0, checked.err
    assert f"teacher: model {teacher}, loss ce, teacher -, 1 epochs" in checked.out, checked.out


def test_a_pair_without_its_trained_teacher_says_how_to_train_it(cifar100_root, cli):
    checked = cli("validate", FOLDER / "resnet56-resnet20.toml", "--set", f"dataset.root={cifar100_root}", *TINY)
    assert checked.code != 0
    assert "stages[1].scheme.teacher" in checked.err and "teachers/resnet56/checkpoints/teacher/best.pt" in checked.err
