"""The decisions ``setup.py`` makes about the extension's build, as small functions
that a test can call with any torch, nvcc and folder layout (tests/test_build_rpath.py).

``setup.py`` loads this file by its path (it is not part of the package, and must
not import it): keep it free of imports beyond the standard library.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess

FIX_LINE = ("to build the CUDA kernel, install the CUDA {major}.x toolkit (torch's) and point CUDA_HOME at it; "
            "FORCE_CUDA=0 builds the CPU kernel without this message")


class BuildConfigError(Exception):
    """A build the environment cannot give (e.g. FORCE_CUDA=1 with a mismatched nvcc)."""


def nvcc_release(cuda_home: str | None, run=subprocess.check_output) -> str | None:
    """nvcc's release ("13.0") as ``cuda_home/bin/nvcc --version`` says it, or None."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    try:
        text = run([nvcc, "--version"], stderr=subprocess.STDOUT).decode("utf-8", "replace")
    except (OSError, subprocess.CalledProcessError):
        return None
    found = re.search(r"release (\d+)\.(\d+)", text)
    return f"{found.group(1)}.{found.group(2)}" if found else None


def cuda_build_decision(force: str | None, cuda_home: str | None, torch_cuda: str | None,
                        nvcc: str | None) -> tuple[bool, str | None]:
    """Whether to build the CUDA kernel, and the one line to print when it is left out.

    torch's cpp_extension refuses an nvcc whose major version differs from the CUDA
    torch was built with (a minor difference only warns): that case builds the CPU
    kernel and says how to get the CUDA one, instead of failing the install.
    ``FORCE_CUDA=1`` insists on CUDA: a mismatch is then an error naming the fix.
    """
    if force == "0":
        return False, None
    if force != "1" and (cuda_home is None or torch_cuda is None):
        return False, None  # no toolkit, or a CPU-only torch: the CPU kernel, as always
    if nvcc is None or torch_cuda is None or nvcc.split(".")[0] == torch_cuda.split(".")[0]:
        return True, None
    major = torch_cuda.split(".")[0]
    problem = (f"nvcc {nvcc} (CUDA_HOME={cuda_home}) and torch's CUDA {torch_cuda} differ in their major version, "
               "which torch's cpp_extension refuses to build")
    if force == "1":
        raise BuildConfigError(f"pyramidkd: {problem}; {FIX_LINE.format(major=major)}")
    return False, f"pyramidkd: {problem}: building the CPU kernel only; {FIX_LINE.format(major=major)}"


def wheel_runtime_dir(cuda_major: int) -> str:
    """Where torch's pip wheels keep the CUDA runtime, under site-packages:
    one ``nvidia/cu13/lib`` for CUDA 13 on, ``nvidia/cuda_runtime/lib`` (one
    package per library) for CUDA 12 and before."""
    return f"nvidia/cu{cuda_major}/lib" if cuda_major >= 13 else "nvidia/cuda_runtime/lib"


def nvidia_roots(torch_dir: str) -> list[str]:
    """The installed ``nvidia`` package folders: the one beside the build-time torch,
    then any other on the path (a namespace package can span several)."""
    roots = [os.path.join(os.path.dirname(torch_dir), "nvidia")]
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots += [str(location) for location in spec.submodule_search_locations]
    return _unique(os.path.abspath(root) for root in roots if os.path.isdir(root))


def extension_rpaths(torch_dir: str, cuda_major: int | None, roots: list[str]) -> list[str]:
    """The extension's RUNPATH, for both install layouts.

    A wheel install puts ``_C`` in site-packages/pyramidkd, so ``$ORIGIN/..`` is
    site-packages and the relative entries find torch and its CUDA runtime; an
    editable install keeps ``_C`` in the source tree's package/, where only the
    absolute paths of the build-time torch and nvidia folders are right.
    """
    paths = ["$ORIGIN/../torch/lib", os.path.join(torch_dir, "lib")]
    if cuda_major is not None:
        runtime = wheel_runtime_dir(cuda_major)
        paths.append(f"$ORIGIN/../{runtime}")
        below = runtime.split("/", 1)[1]  # the part under nvidia/
        paths += [os.path.join(root, below) for root in roots if os.path.isdir(os.path.join(root, below))]
    return _unique(paths)


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))
