"""``pyramidkd bench-deploy`` (issue 22, Latency): every exported file of a tiny run
timed on its runtime next to PyTorch eager; the table, JSON and plot written with
the expected rows. Tiny budgets, no timed asserts (only that times were taken)."""

from __future__ import annotations

import json
import os

import pytest

from pyramidkd import testing
from pyramidkd.engine.deploy import bench, bench_report
from pyramidkd.engine.deploy.export import export_stage
from pyramidkd.engine.deploy.quantize import quantize_stage
from pyramidkd.engine.errors import UserError


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-deploy")
    testing.run_tiny(testing.tiny_recipe(), workdir=folder)
    run = folder / "run"
    for stage in ("teacher", "student"):
        export_stage(str(run), stage, "onnx")
    quantize_stage(str(run), "student", latency_budget_s=0.01)
    export_stage(str(run), "student", "torchscript")
    return run


def test_bench_deploy_writes_the_table_json_and_plot(exported, tmp_path, cli):
    result = cli("bench-deploy", exported, "--batch-sizes", "1,3", "--threads", "1", "--budget", "0.01",
                 "--compile-budget", "0", "--output", tmp_path)
    assert result.code == 0, result.err
    written = json.loads((tmp_path / "bench-deploy.json").read_text())
    seen = {(row["stage"], row["artefact"], row["runtime"], row["batch"]) for row in written["rows"]}
    expected = {(stage, artefact, runtime, batch) for batch in (1, 3) for stage, artefact, runtime in (
        ("teacher", "teacher.onnx", "onnxruntime-cpu"), ("student", "student.onnx", "onnxruntime-cpu"),
        ("student", "student.int8.onnx", "onnxruntime-cpu"), ("student", "student.torchscript.pt", "pytorch (torchscript)"),
        ("teacher", "checkpoint", "pytorch-eager"), ("student", "checkpoint", "pytorch-eager"))}
    assert expected <= seen
    assert all(row["runs"] >= bench.MIN_RUNS and row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"]
               and row["images_per_s"] > 0 and row["threads"] in (1, None) for row in written["rows"])
    int8 = next(row for row in written["rows"] if row["artefact"] == "student.int8.onnx")
    assert int8["precision"] == "int8" and int8["accuracy"] is not None and int8["file_bytes"] > 0
    assert any(entry["what"] == "torch.compile" for entry in written["skipped"])  # said, not silently left out
    assert "student.int8.onnx" in result.out and "skipped: torch.compile" in result.out
    table = (tmp_path / "bench-deploy.md").read_text()
    assert "| student | student.int8.onnx | onnxruntime-cpu | int8 |" in table and "bench-deploy.png" in table
    assert (tmp_path / "bench-deploy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_torch_compile_is_timed_or_skipped_with_its_reason(exported, monkeypatch):
    def refuses(model, **_options):
        raise RuntimeError("no C compiler\nmore")

    monkeypatch.setattr(bench.torch, "compile", refuses)
    result = bench.bench_deploy([str(exported)], batch_sizes=[2], threads=[1], budget_s=0.01, compile_budget_s=30,
                                output=str(exported / "b"))
    assert not [row for row in result["rows"] if row["runtime"] == "torch.compile"]
    reasons = [entry["reason"] for entry in result["skipped"] if "torch.compile" in entry["what"]]
    assert reasons == ["torch.compile failed: RuntimeError: no C compiler"] * 2  # teacher and student


def test_pareto_front_and_options():
    points = [(1.0, 80.0), (2.0, 90.0), (3.0, 85.0), (0.5, 70.0), (4.0, 95.0)]
    assert bench_report.pareto(points) == [3, 0, 1, 4]
    assert bench.parse_counts("1,N,1", "--threads")[0] == 1 and len(bench.parse_counts("1,N,1", "--threads")) <= 2
    with pytest.raises(UserError, match="positive integers"):
        bench.parse_counts("0,a", "--batch-sizes")


def test_a_run_without_exports_says_how_to_export(tmp_path, cli):
    testing.run_tiny(testing.tiny_recipe(teacher=False), workdir=tmp_path)
    result = cli("bench-deploy", tmp_path / "run")
    assert result.code == 1 and "no exported file" in result.err and "pyramidkd export" in result.err
