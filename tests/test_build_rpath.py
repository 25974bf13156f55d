"""setup.py's build decisions without building (issue 19 item 12): which kernels
to build for the nvcc and torch at hand, and the extension's RUNPATH for torch's
cu12 and cu13 wheel layouts, in wheel and editable installs."""

from __future__ import annotations

import importlib.util
import os
import runpy
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_build_support():
    spec = importlib.util.spec_from_file_location("build_support_under_test", ROOT / "build_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bs = load_build_support()
NVCC_13 = b"nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\nBuild cuda_13.0.r13.0\n"


def test_nvcc_release_is_read_from_its_version_text():
    assert bs.nvcc_release("/cuda", run=lambda argv, **_: NVCC_13) == "13.0"
    assert bs.nvcc_release("/cuda", run=lambda argv, **_: b"release 12.4, V12.4.131") == "12.4"
    assert bs.nvcc_release("/cuda", run=lambda argv, **_: b"something else") is None
    assert bs.nvcc_release(None) is None

    def missing(argv, **_):
        raise FileNotFoundError(argv[0])

    assert bs.nvcc_release("/nowhere", run=missing) is None


@pytest.mark.parametrize("force, home, torch_cuda, nvcc, expected", [
    (None, "/usr/local/cuda", "13.0", "13.0", True),
    (None, "/usr/local/cuda", "13.0", "13.2", True),  # a minor difference: cpp_extension only warns
    (None, "/usr/local/cuda", "12.8", "12.4", True),
    (None, "/usr/local/cuda", "13.0", None, True),  # nvcc says nothing readable: cpp_extension decides
    (None, None, "13.0", None, False),  # no toolkit
    (None, "/usr/local/cuda", None, "13.0", False),  # a CPU-only torch
    ("0", "/usr/local/cuda", "13.0", "13.0", False),
    ("1", None, None, None, True),  # forced
])
def test_which_kernels_are_built(force, home, torch_cuda, nvcc, expected):
    assert bs.cuda_build_decision(force, home, torch_cuda, nvcc) == (expected, None)


@pytest.mark.parametrize("torch_cuda, nvcc", [("12.8", "13.0"), ("13.0", "12.9")])
def test_an_nvcc_of_another_major_version_builds_the_cpu_kernel_and_names_the_fix(torch_cuda, nvcc):
    use_cuda, note = bs.cuda_build_decision(None, "/opt/cuda", torch_cuda, nvcc)
    assert use_cuda is False
    assert "\n" not in note and f"nvcc {nvcc}" in note and f"torch's CUDA {torch_cuda}" in note
    major = torch_cuda.split(".")[0]
    for fix in (f"CUDA {major}.x toolkit", "CUDA_HOME", "FORCE_CUDA=0", "CPU kernel only"):
        assert fix in note
    with pytest.raises(bs.BuildConfigError, match="FORCE_CUDA=0"):  # FORCE_CUDA=1 insists: an error, not a fallback
        bs.cuda_build_decision("1", "/opt/cuda", torch_cuda, nvcc)


def site_packages(tmp_path: Path, runtime: str) -> Path:
    """A site-packages with torch and torch's CUDA runtime where its wheels put it."""
    site = tmp_path / "site-packages"
    (site / "torch" / "lib").mkdir(parents=True)
    (site / runtime).mkdir(parents=True)
    (site / runtime / "libcudart.so").write_text("")
    return site


def resolved(rpaths: list[str], so_dir: Path) -> set[Path]:
    return {Path(os.path.normpath(p.replace("$ORIGIN", str(so_dir)))) for p in rpaths}


@pytest.mark.parametrize("major, runtime", [(13, "nvidia/cu13/lib"), (12, "nvidia/cuda_runtime/lib")])
def test_the_runpath_finds_torch_and_its_cuda_runtime_in_wheel_and_editable_installs(tmp_path, major, runtime):
    site = site_packages(tmp_path, runtime)
    roots = bs.nvidia_roots(str(site / "torch"))
    assert roots[0] == str(site / "nvidia")  # the build-time torch's own first (then any other on the path)
    rpaths = bs.extension_rpaths(str(site / "torch"), major, roots)
    assert f"$ORIGIN/../{runtime}" in rpaths  # wheel install: relocatable
    wheel = site / "pyramidkd"  # where a wheel puts _C
    editable = tmp_path / "src" / "package"  # where an editable install leaves it
    for so_dir in (wheel, editable):
        found = resolved(rpaths, so_dir)
        assert site / "torch" / "lib" in found, so_dir
        assert site / runtime in found, so_dir
    assert len(rpaths) == len(set(rpaths))


def test_a_cpu_build_has_no_cuda_runtime_in_its_runpath(tmp_path):
    site = site_packages(tmp_path, "nvidia/cu13/lib")
    rpaths = bs.extension_rpaths(str(site / "torch"), None, [str(site / "nvidia")])
    assert rpaths == ["$ORIGIN/../torch/lib", str(site / "torch" / "lib")]


# --- setup.py itself, with setup() captured instead of run ----------------------------


def run_setup_py(monkeypatch, tmp_path, release: str) -> tuple[dict, str]:
    """Execute setup.py against a stand-in toolkit whose nvcc reports ``release``."""
    import setuptools
    import torch

    toolkit = tmp_path / "cuda"
    (toolkit / "bin").mkdir(parents=True)
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")  # restored afterwards, whatever setup.py sets
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured, str(toolkit)


def test_setup_py_builds_the_cpu_kernel_when_nvcc_is_of_another_major(monkeypatch, tmp_path, capsys):
    captured, toolkit = run_setup_py(monkeypatch, tmp_path, "12.4")
    (ext,) = captured["ext_modules"]
    assert not any(source.endswith(".cu") for source in ext.sources)
    assert ("WITH_CUDA", None) not in ext.define_macros
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pyramidkd:")]
    assert len(lines) == 1 and "nvcc 12.4" in lines[0] and toolkit in lines[0] and "FORCE_CUDA=0" in lines[0]


def test_setup_py_links_the_build_time_cuda_runtime_by_its_absolute_path(monkeypatch, tmp_path):
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    if not (site / "nvidia" / "cu13" / "lib").is_dir():
        pytest.skip("this torch is not a cu13 pip wheel")
    captured, _ = run_setup_py(monkeypatch, tmp_path, "13.0")
    (ext,) = captured["ext_modules"]
    assert any(source.endswith(".cu") for source in ext.sources)
    assert f"-Wl,-rpath,{site / 'nvidia' / 'cu13' / 'lib'}" in ext.extra_link_args  # the editable install's
    assert "-Wl,-rpath,$ORIGIN/../nvidia/cu13/lib" in ext.extra_link_args  # a wheel's


def test_the_installed_extension_finds_its_libraries():
    """The RUNPATH of the extension now installed: every entry resolves to a folder
    (checked only where the extension and readelf exist)."""
    from pyramidkd.engine import ops

    if not ops.fused_available():
        pytest.skip("the extension is not built")
    import pyramidkd._C as ext

    try:
        dynamic = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("no readelf")
    entries = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "RUNPATH" in line or "RPATH" in line]
    assert entries
    so_dir = Path(ext.__file__).parent
    found = resolved(entries[0].split(":"), so_dir)
    assert any((path / "libc10.so").exists() for path in found)
