"""recipes/cifar100-kd/benchmark.toml: the standard CIFAR-100 distillation table as one
sweep — the 12 pairs of the CRD paper x every method of methods/<pair>.toml x 5 seeds —
is well formed, carries only published numbers, and validates on data in CIFAR-100's real
on-disk format with tiny trained teachers (the heavy teachers in the slow suite)."""

from __future__ import annotations

import re
import shutil
import tomllib

import pytest

from conftest import RECIPES
from test_cifar100_kd_recipes import TABLE_PAIRS, TINY
from test_datasets import write_cifar100

FOLDER = RECIPES / "cifar100-kd"
BENCHMARK = FOLDER / "benchmark.toml"
# Every method of the issue, FitNet as one kd-scheme stage (CE + 100 x hint through ConvReg).
METHODS = ["scratch", "kd", "kd-standardize", "dkd", "dist", "at", "nst", "sp", "pkt", "rkd", "cc", "vid", "kdsvd",
           "ofd", "reviewkd", "crd", "ab", "ft", "fitnet"]
SAME_CHANNELS = {"resnet56-resnet20", "resnet110-resnet32", "resnet32x4-resnet8x4", "wrn_40_2-wrn_16_2", "vgg13_bn-vgg8_bn"}
SAME_SIZES = SAME_CHANNELS | {"wrn_40_2-wrn_40_1"}
DKD_BETA = {"resnet56-resnet20": 2.0, "resnet110-resnet32": 2.0, "vgg13_bn-mobilenetv2": 6.0, "vgg13_bn-vgg8_bn": 6.0,
            "wrn_40_2-wrn_16_2": 6.0, "wrn_40_2-wrn_40_1": 6.0}  # mdistiller configs/cifar100/dkd/*.yaml; else 8
# The authors' --kd-loss-weight (dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh); pairs it lacks keep 5.0.
REVIEWKD_WEIGHT = {"resnet56-resnet20": 0.6, "resnet110-resnet32": 1.0, "resnet32x4-resnet8x4": 5.0, "resnet32x4-shufflenetv1": 5.0,
                   "resnet32x4-shufflenetv2": 8.0, "wrn_40_2-wrn_16_2": 5.0, "wrn_40_2-wrn_40_1": 5.0, "wrn_40_2-shufflenetv1": 5.0}
# FitNet's top-1 in the CRD paper, Tables 1-2 (RepDistiller README).
FITNET = {"resnet56-resnet20": 69.21, "resnet110-resnet32": 71.06, "resnet32x4-resnet8x4": 73.50, "wrn_40_2-wrn_16_2": 73.58,
          "wrn_40_2-wrn_40_1": 72.24, "vgg13_bn-vgg8_bn": 71.02, "vgg13_bn-mobilenetv2": 64.14, "resnet50-mobilenetv2": 63.16,
          "resnet50-vgg8_bn": 70.69, "resnet32x4-shufflenetv1": 73.59, "resnet32x4-shufflenetv2": 73.54, "wrn_40_2-shufflenetv1": 73.73}


def expected_methods(pair: str) -> list[str]:
    """The methods the engine accepts for the pair: kd-svd needs equal channels, ab equal spatial sizes."""
    return [m for m in METHODS if (m != "kdsvd" or pair in SAME_CHANNELS) and (m != "ab" or pair in SAME_SIZES)]


def methods_recipe(pair: str) -> dict:
    return tomllib.loads((FOLDER / "methods" / f"{pair}.toml").read_text())


def test_the_benchmark_sweeps_every_pair_over_five_seeds_against_scratch_on_a_cluster():
    sweep = tomllib.loads(BENCHMARK.read_text())
    assert sweep["sweep"]["recipe"] == [f"methods/{pair}.toml" for pair in TABLE_PAIRS]
    assert sweep["sweep"]["seeds"] == [0, 1, 2, 3, 4] and sweep["sweep"]["baseline"] == {"stage": "scratch"}
    assert sweep["launcher"]["name"] == "ray" and sweep["launcher"]["num_gpus"] == 1
    assert sweep["launcher"]["slurm"]["gpus_per_task"] == 1
    from pyramidkd.engine.sweeps.spec import load_sweep

    plan = load_sweep(str(BENCHMARK))
    assert len(plan.cells) == 12 and plan.seeds == [0, 1, 2, 3, 4] and plan.baselines[0].stage == "scratch"


@pytest.mark.parametrize("pair", TABLE_PAIRS)
def test_each_methods_recipe_holds_the_pairs_methods_on_its_schedule_with_published_numbers(pair):
    teacher, student = pair.split("-")
    recipe, single = methods_recipe(pair), tomllib.loads((FOLDER / f"{pair}.toml").read_text())
    stages = {stage["id"]: stage for stage in recipe["stages"]}
    assert list(stages) == expected_methods(pair)
    assert {stage["model"]["name"] for stage in stages.values()} == {student}
    for stage_id, stage in stages.items():
        scheme = stage["scheme"]
        if stage_id != "scratch":  # every method reads the one trained teacher of the pair
            assert scheme["teacher"] == f"../../../runs/cifar100-kd/teachers/{teacher}/checkpoints/teacher/best.pt"
            assert (FOLDER / "methods" / scheme["teacher"]).resolve() == (RECIPES.parent / "runs" / "cifar100-kd" / "teachers"
                                                                          / teacher / "checkpoints" / "teacher" / "best.pt")
        expected_scheme = stage_id if stage_id in ("ab", "ft") else ("scratch" if stage_id == "scratch" else "kd")
        assert (scheme if isinstance(scheme, str) else scheme["name"]) == expected_scheme
    assert recipe["train"] == single["train"] and recipe["dataset"] == {**single["dataset"], "root": "../data"}
    assert stages["dkd"]["loss"]["beta"] == DKD_BETA.get(pair, 8.0)
    loss = stages["kd-standardize"]["loss"]
    assert loss["standardize"] is True and (loss["temperature"], loss["kd_weight"], loss["ce_weight"]) == (2.0, 9.0, 0.1)
    assert stages["crd"]["loss"] == {"name": "crd", "mode": "exact"}
    assert stages["fitnet"]["loss"] == {"name": "hint", "ce_weight": 1.0, "feat_weight": 100.0, "hint_layer": "feat.2",
                                        "regressor": "convreg"}
    review = stages["reviewkd"]["loss"]
    assert (review if isinstance(review, str) else review["name"]) == "reviewkd"
    assert (5.0 if isinstance(review, str) else review["reviewkd_weight"]) == REVIEWKD_WEIGHT.get(pair, 5.0)
    reference = recipe["reference"]
    assert set(reference) <= set(stages) and all(50.0 < value < 80.0 for value in reference.values())
    assert (reference["scratch"], reference["kd"]) == (single["reference"]["student"], single["reference"]["kd"])
    assert {"at", "sp", "pkt", "rkd", "cc", "vid", "nst", "crd", "ft", "fitnet"} <= set(reference)
    assert reference["fitnet"] == FITNET[pair]
    assert ("dkd" in reference) == (pair != "resnet50-vgg8_bn")  # the DKD paper's tables leave this pair out
    assert not {"kd-standardize", "dist", "ofd", "reviewkd", "kdsvd"} & set(reference)  # no figure from these papers
    text = (FOLDER / "methods" / f"{pair}.toml").read_text()
    assert re.search(r"No published number here for: .*kd-standardize", text)


def test_the_published_figures_are_the_papers(pair="resnet32x4-resnet8x4"):
    reference = methods_recipe(pair)["reference"]
    assert reference == {"scratch": 72.5, "kd": 73.33, "at": 73.44, "nst": 73.3, "sp": 72.94, "pkt": 73.64, "rkd": 71.9,
                         "cc": 72.97, "vid": 73.09, "crd": 75.51, "ab": 73.17, "ft": 72.86, "dkd": 76.32, "fitnet": 73.5}


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar100(root, classes_used=5, train_per_class=4, test_per_class=2)
    return root


def copy_of_the_recipes(tmp_path):
    """recipes/cifar100-kd/ copied under tmp_path/recipes, so that its teacher paths lead to tmp_path/runs."""
    target = tmp_path / "recipes" / "cifar100-kd"
    shutil.copytree(FOLDER, target, ignore=shutil.ignore_patterns("data"))
    return target


def train_teacher(cli, folder, teacher: str, root) -> str:
    out = folder.parent.parent / "runs" / "cifar100-kd" / "teachers" / teacher
    trained = cli("run", folder / "teachers" / f"{teacher}.toml", "--output", out, "--quiet", "--set", f"dataset.root={root}", *TINY)
    assert trained.code == 0, trained.err
    return str(out / "checkpoints" / "teacher" / "best.pt")


def tiny_benchmark(folder, root, pairs: list[str]):
    """The benchmark file as shipped, its recipe list cut to ``pairs`` and a [sweep] set for tiny data."""
    text = (folder / "benchmark.toml").read_text()
    listed = "recipe = [" + ", ".join(f'"methods/{pair}.toml"' for pair in pairs) + "]"
    text = re.sub(r"recipe = \[[^\]]*\]", listed, text, count=1)
    tiny = {"dataset.root": str(root), "train.epochs": 1, "dataset.val_fraction": 0.5, "dataset.verify_checksums": False}
    values = ", ".join(f'"{key}" = {value!r}'.replace("False", "false") if not isinstance(value, str) else f'"{key}" = "{value}"'
                       for key, value in tiny.items())
    text = text.replace("seeds = [0, 1, 2, 3, 4]", "seeds = [0, 1, 2, 3, 4]\nset = { " + values + " }", 1)
    path = folder / "benchmark.toml"
    path.write_text(text)
    return path


def test_the_sweep_validates_for_one_teachers_pairs_and_its_recipe_with_a_teacher_file(cifar100_root, tmp_path, cli):
    folder = copy_of_the_recipes(tmp_path)
    checkpoint = train_teacher(cli, folder, "wrn_40_2", cifar100_root)
    pairs = [pair for pair in TABLE_PAIRS if pair.startswith("wrn_40_2-")]
    dry = cli("sweep", tiny_benchmark(folder, cifar100_root, pairs), "--dry-run", "--output", tmp_path / "sweep")
    assert dry.code == 0, dry.err
    assert "3 cell(s) x 5 seed(s) = 15 run(s)" in dry.out, dry.out
    # The shipped recipe, its teacher given per stage on the command line.
    pair = "wrn_40_2-wrn_16_2"
    teachers = [arg for stage in expected_methods(pair)[1:] for arg in ("--set", f"stages.{stage}.scheme.teacher={checkpoint}")]
    checked = cli("validate", FOLDER / "methods" / f"{pair}.toml", "--set", f"dataset.root={cifar100_root}", *TINY, *teachers)
    assert checked.code == 0, checked.err
    assert f"ok — 21 stage(s)" in checked.out and f"crd: model wrn_16_2, loss crd, teacher {checkpoint}" in checked.out
    assert f"fitnet: model wrn_16_2, loss hint, teacher {checkpoint}" in checked.out
    # Across families, wrn_40_2 -> shufflenetv1: ConvReg maps the student's 8x8 feat.2 onto the teacher's
    # 16x16 one (a transposed conv); a guided layer four times smaller than the hint has no ConvReg and
    # is refused before training, naming the stage.
    pair = "wrn_40_2-shufflenetv1"
    teachers = [arg for stage in expected_methods(pair)[1:] for arg in ("--set", f"stages.{stage}.scheme.teacher={checkpoint}")]
    args = ("validate", FOLDER / "methods" / f"{pair}.toml", "--set", f"dataset.root={cifar100_root}", *TINY, *teachers)
    checked = cli(*args)
    assert checked.code == 0, checked.err
    assert f"fitnet: model shufflenetv1, loss hint, teacher {checkpoint}" in checked.out
    refused = cli(*args, "--set", "stages.fitnet.loss.guided_layer=feat.3")
    assert refused.code != 0
    assert "stage 'fitnet'" in refused.err and "ConvReg needs a student map larger, equal, twice or half" in refused.err


@pytest.mark.slow
def test_the_whole_benchmark_validates_with_every_teacher(cifar100_root, tmp_path, cli):
    folder = copy_of_the_recipes(tmp_path)
    for teacher in sorted({pair.split("-")[0] for pair in TABLE_PAIRS}):
        train_teacher(cli, folder, teacher, cifar100_root)
    dry = cli("sweep", tiny_benchmark(folder, cifar100_root, TABLE_PAIRS), "--dry-run", "--output", tmp_path / "sweep")
    assert dry.code == 0, dry.err
