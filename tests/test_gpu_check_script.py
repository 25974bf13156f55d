"""scripts/bench-gpu.sh, checked without a GPU: a lent GPU comes with minutes of device
time, so the script must not fail there on a typo, a renamed flag or a missing archive."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_datasets import write_cifar10_jpeg_archive

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench-gpu.sh"


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _flags_used(script_name: str) -> set[str]:
    """Every --flag on the lines of bench-gpu.sh that call SCRIPT_NAME (continuations included)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if script_name in line]
    assert lines, f"bench-gpu.sh no longer calls {script_name}"
    return {flag for line in lines for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line.split(script_name, 1)[1])}


@pytest.mark.parametrize("script", ["scripts/bench_pipeline.py", "tests/benchmarks/test_bench_kd_loss.py"])
def test_every_flag_the_script_passes_exists(script):
    usage = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, check=True).stdout
    missing = sorted(flag for flag in _flags_used(Path(script).name) if flag not in usage)
    assert not missing, f"bench-gpu.sh passes {missing} to {script}, which does not accept them"


def test_cli_flags_of_the_quickstart_step_exist():
    usage = subprocess.run([sys.executable, "-m", "pyramidkd.engine.cli", "run", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in _flags_used("pyramidkd.engine.cli run"):
        assert flag in usage, flag


def test_without_a_gpu_it_stops_at_once_with_a_reason(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "PATH": os.environ["PATH"]}
    out = tmp_path / "bench"
    result = subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 1 and "no CUDA GPU visible" in result.stderr
    assert (out / "env.txt").exists() and "env\t" in (out / "steps.tsv").read_text()


def test_pipeline_benchmark_measures_each_precision_and_setting(tmp_path):
    """The grid bench-gpu.sh asks for (tensor path, deterministic on/off, fp32/bf16), on a tiny archive."""
    archive = write_cifar10_jpeg_archive(tmp_path / "tiny.tar.gz", train_per_class=10, test_per_class=1)
    rows_file = tmp_path / "rows.json"
    env = {**os.environ, "PYRAMIDKD_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_pipeline.py"), "--device", "cpu", "--archive", str(archive),
                    "--models", "svgg5", "--width", "0.0625", "--epochs", "2", "--batch-size", "8", "--limit", "100",
                    "--pipelines", "tensor", "--deterministic", "true,false", "--precisions", "fp32,bf16", "--threads", "1",
                    "--json", str(rows_file)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert [(r["deterministic"], r["precision"]) for r in rows] == [(True, "fp32"), (True, "bf16"), (False, "fp32"), (False, "bf16")]
    assert all(r["pipeline"] == "tensor" and r["images_per_s"] > 0 for r in rows)
