"""Build and install pyramidkd.

The repository folders map onto one import package (see ``package_dir``):
``package/`` -> ``pyramidkd``, ``engine/`` -> ``pyramidkd.engine``,
``plugins/`` -> ``pyramidkd.plugins``; nothing generic lands at the top of
site-packages.

The fused distillation loss in ``csrc/`` is compiled against the torch that is
already installed (``pip install --no-build-isolation .``): the CPU part always,
the CUDA part when nvcc is found or ``FORCE_CUDA=1``.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
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
    use_cuda = os.environ.get("FORCE_CUDA") == "1" or (
        cuda_home is not None and os.environ.get("FORCE_CUDA") != "0" and torch.version.cuda is not None
    )
    if use_cuda and not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU to query: build for Ampere and Hopper, plus PTX for newer chips.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
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
    extra = {"cxx": cxx_flags}
    # torch's BuildExtension adds -DPy_LIMITED_API=<its minimum CPython> itself
    # for py_limited_api extensions; defining it here too only redefines it.
    macros = []
    # Find libc10/libtorch without `import torch` first: next to an installed
    # torch ($ORIGIN/../torch/lib) and where the build-time torch lives.
    torch_lib = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "lib")
    link_args = ["-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"] + link_openmp
    if use_cuda and cuda_sources:
        # ... and the CUDA runtime of torch's pip wheels (nvidia/cu<major>/lib).
        cuda_major = (torch.version.cuda or os.environ.get("CUDA_VERSION", "13")).split(".")[0]
        link_args = link_args + [f"-Wl,-rpath,$ORIGIN/../nvidia/cu{cuda_major}/lib"]
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
