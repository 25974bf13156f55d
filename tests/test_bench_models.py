"""`pyramidkd bench-models`: table, JSON, PNG and the vgg19 → svgg5 ratios."""

from __future__ import annotations

import json

ARGS = ["bench-models", "--models", "vgg19,svgg14,svgg5", "--image-size", "32", "--width", "0.0625",
        "--batch-sizes", "1,2", "--repeats", "1", "--warmup", "0"]


def test_bench_models_writes_table_json_and_plot(tmp_path, cli):
    result = cli(*ARGS, "--output", tmp_path)
    assert result.code == 0, result.err
    assert "vgg19 → svgg5:" in result.out and "fewer parameters" in result.out and "faster at batch 2" in result.out
    assert f"plot: {tmp_path / 'bench-models.png'}" in result.out
    data = json.loads((tmp_path / "bench-models.json").read_text())
    rows = {row["name"]: row for row in data["models"]}
    assert set(rows) == {"vgg19", "svgg14", "svgg5"}
    assert rows["vgg19"]["params"] > rows["svgg14"]["params"] > rows["svgg5"]["params"]
    assert rows["vgg19"]["macs"] > rows["svgg5"]["macs"]
    assert all(set(row["latency_s"]) == {"1", "2"} and min(row["latency_s"].values()) > 0 for row in rows.values())
    assert data["vgg19_vs_svgg5"]["params"] == rows["vgg19"]["params"] / rows["svgg5"]["params"]
    assert data["plot"] == str(tmp_path / "bench-models.png")
    png = (tmp_path / "bench-models.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_output_it_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli(*ARGS, "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["plot"] is None and [row["name"] for row in data["models"]] == ["vgg19", "svgg14", "svgg5"]
    assert list(tmp_path.iterdir()) == []  # nothing in the current folder unasked
    result = cli(*ARGS)
    assert result.code == 0 and "add --output DIR" in result.out and list(tmp_path.iterdir()) == []


def test_bench_models_bad_input(cli, tmp_path):
    result = cli("bench-models", "--models", "vgg91", "--output", tmp_path)
    assert result.code == 1 and "unknown model 'vgg91'" in result.err and "did you mean 'vgg19'?" in result.err
    result = cli("bench-models", "--batch-sizes", "1,x", "--output", tmp_path)
    assert result.code == 1 and "--batch-sizes" in result.err
