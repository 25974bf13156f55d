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


DOCS = RECIPES.parent / "docs" / "results"


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


# (results JSON, its sweep command, the README's Results subsection that quotes it or None
# where the README only links the document, seeds)
COMMITTED_STUDIES = {
    "cifar10-study": ("pyramidkd sweep recipes/cifar10-jpeg/study.toml", None, [0, 1, 2, 3]),
    "cifar10-methods": ("pyramidkd sweep recipes/cifar10-jpeg/methods-sweep.toml", "### The method zoo", [0, 1, 2, 3]),
    "cifar10-study2": ("pyramidkd sweep recipes/cifar10-jpeg/study2.toml", "### The Pyramid study on CIFAR-10", [0, 1, 2]),
}


def _results_section() -> str:
    readme = (RECIPES.parent / "README.md").read_text()
    return readme.split("\n## Results", 1)[1].split("\n## ", 1)[0]


def _readme_subsection(title: str) -> str:
    results_section = _results_section()
    assert title in results_section, f"the README's Results section has no subsection {title!r}"
    return results_section.split(title, 1)[1].split("\n### ", 1)[0]


@pytest.mark.parametrize("name", sorted(COMMITTED_STUDIES))
def test_a_committed_study_json_and_markdown_agree(name):
    """docs/results/<study>.md shows the table the committed JSON gives (regenerated
    here, row for row), and the README's headline rows are rows of it (or the README
    links the document)."""
    import json

    from pyramidkd.engine.formatting import format_markdown_table
    from pyramidkd.engine.sweeps.results import METHOD_RIGHT, methods_table_rows

    command, subsection, seeds = COMMITTED_STUDIES[name]
    results = json.loads((DOCS / f"{name}.json").read_text())
    assert results["name"] == name and results["seeds"] == seeds
    for cell in results["cells"]:
        assert cell["seeds"] == seeds and not cell["failed"] and not cell["missing"], cell["id"]
    table = format_markdown_table(methods_table_rows(results), right=METHOD_RIGHT)
    document = (DOCS / f"{name}.md").read_text()
    assert table in document
    assert command in document
    assert (DOCS / f"{name}.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    if subsection is None:
        assert f"(docs/results/{name}.md)" in _results_section(), f"the README's Results section does not link {name}.md"
        return
    headline = _table_lines(_readme_subsection(subsection))[2:]  # past the header and its rule
    assert headline, f"the README's {subsection!r} has no table"
    rows = set(_table_lines(table))
    for line in headline:
        assert line in rows, f"README row not in the {name} table: {line}"


# The second study's other paired comparisons (docs/results/cifar10-study2.md), from the same JSON.
STUDY2_PAIRS = [("pyramid-fwd-mse.svgg5", "svgg5-compute-matched"), ("pyramid-bwd-mse.svgg5", "svgg5-compute-matched"),
                ("reviewkd", "svgg5-compute-matched"), ("pyramid-fwd-mse.svgg5", "kd"), ("pyramid-fwd-mse.svgg5", "sp"),
                ("pyramid-fwd-mse.svgg5", "reviewkd"), ("pyramid-fwd-mse.svgg5", "pyramid-bwd-mse.svgg5")]


def test_the_second_study_pairs_table_is_regenerated_from_its_json():
    import json

    from pyramidkd.engine.formatting import format_markdown_table
    from pyramidkd.engine.sweeps.results import format_comparison
    from pyramidkd.engine.sweeps.stats import paired_comparison

    results = json.loads((DOCS / "cifar10-study2.json").read_text())
    stages = {stage_id: stage for cell in results["cells"] for stage_id, stage in cell["stages"].items()}

    def by_seed(stage_id: str) -> dict[int, float]:
        return dict(zip(results["seeds"], stages[stage_id]["test_acc"]["values"], strict=True))

    rows = [{"stage": ours, "against": theirs,
             "Δ (points), paired by seed": format_comparison(paired_comparison(by_seed(ours), by_seed(theirs)))}
            for ours, theirs in STUDY2_PAIRS]
    assert format_markdown_table(rows) in (DOCS / "cifar10-study2.md").read_text()
