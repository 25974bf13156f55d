"""Build and install pyramidkd.

The repository folders map onto one import package (see ``package_dir``):
``package/`` -> ``pyramidkd``, ``engine/`` -> ``pyramidkd.engine``,
``plugins/`` -> ``pyramidkd.plugins``; nothing generic lands at the top of
site-packages.

The fused distillation loss in ``csrc/`` is compiled against the torch that is
already installed (``pip install --no-build-isolation .``): the CPU part always,
the CUDA part when nvcc is found (and its major version is torch's CUDA's) or
``FORCE_CUDA=1``. The decisions live in ``build_support.py`` (tested by
tests/test_build_rpath.py).
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_support():
    # By path: the build must not import the package (torch may be the only thing
    # importable) and the source folder need not be on sys.path.
    spec = importlib.util.spec_from_file_location("pyramidkd_build_support", os.path.join(ROOT, "build_support.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_support = _load_build_support()
PACKAGE_DIR = {
    "pyramidkd": "package",
    "pyramidkd.engine": "engine",
    "pyramidkd.plugins": "plugins",
}


def mapped_packages():
    packages = []
    for name, folder in PACKAGE_DIR.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(os.path.join(ROOT, folder))]
    return sorted(set(packages))


def locate_cuda_home():
    """Return the CUDA toolkit root, or None.

    torch guesses CUDA_HOME from nvcc's location; when nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc) that guess is wrong, so prefer the conventional
    toolkit folders before falling back to the nvcc on PATH.
    """
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return os.environ[variable]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def compiler_flags(torch):
    """The C++ flags, and the link flags for OpenMP."""
    # No -march=native: shipped builds must run on any x86-64; at::vec dispatches at run time.
    cxx_flags = ["-O3", "-std=c++20", "-fdiagnostics-color=always"]
    link_openmp = []
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        # at::parallel_for is an inline `#pragma omp parallel` in ATen's
        # headers: without -fopenmp the CPU kernel silently runs on one
        # thread.  The library links libgomp.so.1 by SONAME, the one torch
        # bundles and has already loaded, so both share one thread pool.
        cxx_flags.append("-fopenmp")
        link_openmp = ["-fopenmp"]
    return cxx_flags, link_openmp


def extension_modules():
    """The fused-loss extension ``pyramidkd._C`` (CPU always, CUDA when possible)."""
    cuda_home = locate_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must be set before cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpp_sources:
        return [], {}
    nvcc = build_support.nvcc_release(cuda_home)
    try:
        use_cuda, note = build_support.cuda_build_decision(os.environ.get("FORCE_CUDA"), cuda_home, torch.version.cuda, nvcc)
    except build_support.BuildConfigError as error:
        sys.exit(str(error))
    if note:
        print(note, file=sys.stderr)
    if use_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU to query: build for Ampere and Hopper, plus PTX for newer chips.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
    cxx_flags, link_openmp = compiler_flags(torch)
    extra = {"cxx": cxx_flags}
    # torch's BuildExtension adds -DPy_LIMITED_API=<its minimum CPython> itself
    # for py_limited_api extensions; defining it here too only redefines it.
    macros = []
    # Find libc10/libtorch and torch's CUDA runtime without `import torch` first,
    # in a wheel install ($ORIGIN/..) and in an editable one (build-time paths).
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
    cuda_major = None
    if use_cuda and cuda_sources:
        cuda_major = int((torch.version.cuda or nvcc or os.environ.get("CUDA_VERSION", "13")).split(".")[0])
    rpaths = build_support.extension_rpaths(torch_dir, cuda_major, build_support.nvidia_roots(torch_dir))
    link_args = [f"-Wl,-rpath,{path}" for path in rpaths] + link_openmp
    if use_cuda and cuda_sources:
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(
            "pyramidkd._C",
            cpp_sources + cuda_sources,
            extra_compile_args=extra,
            define_macros=macros + [("WITH_CUDA", None)],
            extra_link_args=link_args,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "pyramidkd._C",
            cpp_sources,
            extra_compile_args=extra,
            define_macros=macros,
            extra_link_args=link_args,
            py_limited_api=True,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=mapped_packages(),
    package_dir=PACKAGE_DIR,
    package_data={"pyramidkd": ["py.typed"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
