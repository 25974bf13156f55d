"""The example third-party plugin (examples/pyramidkd-dkd: the ``nkd`` loss and scheme), installed for real with pip.

The folder is copied (pip builds in the source tree) and installed with
``pip install --no-deps --no-build-isolation --target DIR``; the commands then run
in fresh interpreters with DIR prepended to PYTHONPATH, so pyramidkd finds the
plugin through its entry point exactly as it would in a user's environment. The
three commands run concurrently (each one's time is mostly importing torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyramidkd.engine.host import DISABLE_AUTOLOAD_ENV

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pyramidkd-dkd"
TIMEOUT = 300


def _tail(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(source copy, install target, environment) after a real pip install."""
    root = tmp_path_factory.mktemp("nkd")
    source = root / "pyramidkd-dkd"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = root / "site"
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-deps",
               "--no-build-isolation", "--no-index", "--target", str(target), str(source)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"pip install failed:\n{_tail(done.stdout + done.stderr)}"
    env = dict(os.environ)
    env.pop(DISABLE_AUTOLOAD_ENV, None)
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return source, target, env


@pytest.fixture(scope="module")
def commands(installed, tmp_path_factory):
    """Start the three commands at once; each test waits for its own."""
    source, _, env = installed
    work = tmp_path_factory.mktemp("nkd-work")
    argv = {
        "plugins": [sys.executable, "-m", "pyramidkd", "plugins", "--json"],
        "run": [sys.executable, "-m", "pyramidkd", "run", str(source / "recipes" / "tiny.toml"), "--quiet",
                "--output", str(work / "run")],
        "tests": [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  str(source / "tests")],
    }
    started = {name: subprocess.Popen(args, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in argv.items()}
    results: dict = {}

    def wait(name: str) -> subprocess.CompletedProcess:
        if name not in results:
            process = started[name]
            try:
                out, err = process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            results[name] = subprocess.CompletedProcess(argv[name], process.returncode, out, err)
        return results[name]

    wait.work = work
    yield wait
    for process in started.values():  # a test that failed early leaves none running
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_pip_installs_the_entry_point(installed):
    _, target, _ = installed
    (info,) = target.glob("pyramidkd_dkd-*.dist-info")
    assert "[pyramidkd]\nnkd = pyramidkd_dkd.plugin" in (info / "entry_points.txt").read_text()
    assert (target / "pyramidkd_dkd" / "loss.py").is_file()


def test_plugins_lists_the_installed_distribution(commands):
    done = commands("plugins")
    assert done.returncode == 0, _tail(done.stderr)
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["nkd"]["source"] == "entry-point"
    assert rows["nkd"]["distribution"] == "pyramidkd-dkd" and rows["nkd"]["version"] == "0.2.0"
    assert rows["nkd"]["components"] == {"loss": ["nkd"], "scheme": ["nkd"]}
    assert "dkd" in rows["pyramidkd.plugins.losses.logits"]["components"]["loss"]  # DKD is built in now


def test_a_recipe_runs_the_plugin_components(commands):
    done = commands("run")
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
    summary = json.loads((commands.work / "run" / "summary.json").read_text())
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert list(stages) == ["teacher", "student-nkd", "student-kd-scheme"]
    assert stages["student-nkd"]["loss"] == "nkd" and stages["student-nkd"]["info"] == {"scheme": "nkd"}
    assert stages["student-nkd"]["teachers"][0]["stage"] == "teacher"
    assert stages["student-kd-scheme"]["loss"] == "nkd"
    for stage in stages.values():
        assert 0.0 <= stage["test_acc"] <= 1.0


def test_the_example_package_own_tests_pass(commands):
    done = commands("tests")
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
    assert " passed" in done.stdout and "skipped" not in done.stdout  # the entry-point test ran too
