"""Build the compiled iRPE lookup operators (`rpe_ops._C`).

Usage (from this directory):
    python setup.py build_ext --inplace          # in-place build, used by the repository's Makefile
    pip install --no-build-isolation .           # or: python setup.py install --user

Environment:
    RPE_OPS_CUDA=0|1        force the CUDA kernels off / on (default: on whenever nvcc and a CUDA build of torch
                            are found, whether or not a GPU is visible).
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default: "7.0;7.5;8.0;8.6;9.0+PTX", V100 to H100, filtered to those
                            the installed nvcc supports).
    CUDA_HOME / CUDA_PATH   CUDA toolkit root (default: found from `nvcc` on PATH, then /usr/local/cuda).
    MAX_JOBS                parallel compile jobs (ninja).

A missing C++ compiler is reported and the extension skipped: the Python package still installs and imports, and
irpe falls back to its PyTorch lookup.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "7.0;7.5;8.0;8.6;9.0+PTX"


def note(message: str) -> None:
    """Prints a build note that stands out in pip/setuptools output."""
    print(f"[rpe_ops] {message}", flush=True)


def find_cuda_home() -> str | None:
    """Returns the CUDA toolkit root: the first candidate holding `bin/nvcc` and `include/cuda_runtime.h`."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for position, root in enumerate(candidates):
        if root and (Path(root) / "bin" / "nvcc").exists() and (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
        if root and position < 2:
            note(f"{('CUDA_HOME', 'CUDA_PATH')[position]}={root} has no bin/nvcc + include/cuda_runtime.h: ignored")
    return None


# torch.utils.cpp_extension reads CUDA_HOME when imported: resolve it first (a wrapper script `nvcc` on PATH outside
# the toolkit would otherwise point it at the wrong directory).
CUDA_ROOT = find_cuda_home()
if CUDA_ROOT is not None:
    os.environ["CUDA_HOME"] = CUDA_ROOT

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda() -> bool:
    """Decides whether to build the CUDA kernels (RPE_OPS_CUDA overrides the automatic choice)."""
    flag = os.environ.get("RPE_OPS_CUDA", "").strip()
    found = CUDA_ROOT is not None and torch.version.cuda is not None
    why_not = "no CUDA toolkit (nvcc) found" if CUDA_ROOT is None else f"torch {torch.__version__} is a CPU-only build"
    if flag == "0":
        note("RPE_OPS_CUDA=0: building the CPU kernels only")
        return False
    if flag == "1":
        if not found:
            sys.exit(f"[rpe_ops] RPE_OPS_CUDA=1 but {why_not}; set CUDA_HOME or unset RPE_OPS_CUDA")
        return True
    if not found:
        note(f"{why_not}: building the CPU kernels only (set CUDA_HOME to build the CUDA kernels)")
    return found


def nvcc_arch_list() -> set[str] | None:
    """Compute capabilities ("7.5", "9.0", ...) the installed nvcc can compile for, or None when unknown."""
    try:
        listing = subprocess.run(
            [str(Path(CUDA_ROOT) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {f"{int(m.group(1)) // 10}.{int(m.group(1)) % 10}" for m in re.finditer(r"compute_(\d+)", listing)}


def resolve_arch_list() -> str:
    """Sets TORCH_CUDA_ARCH_LIST to the default list filtered to what nvcc supports, unless the user set it."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        note(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (from the environment)")
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    supported = nvcc_arch_list()
    wanted = DEFAULT_ARCH_LIST.split(";")
    ptx = any(item.endswith("+PTX") for item in wanted)
    archs = [item.removesuffix("+PTX") for item in wanted]
    kept = archs if supported is None else [a for a in archs if a in supported]
    dropped = [a for a in archs if a not in kept]
    if dropped:
        names = ", ".join("sm_" + a.replace(".", "") for a in dropped)
        note(f"the nvcc at {CUDA_ROOT} cannot compile for {names}: dropped from the default list")
    if not kept:
        sys.exit(f"[rpe_ops] nvcc supports none of {DEFAULT_ARCH_LIST}; set TORCH_CUDA_ARCH_LIST")
    if ptx:
        kept[-1] += "+PTX"
    arch_list = ";".join(kept)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    note(f"TORCH_CUDA_ARCH_LIST={arch_list}")
    return arch_list


def have_cxx_compiler() -> bool:
    """True when the C++ compiler torch will call (CXX, else c++) exists."""
    return shutil.which(os.environ.get("CXX", "c++").split()[0]) is not None


def build_extensions() -> list:
    """The extension modules to build (empty when no C++ compiler is available)."""
    if not have_cxx_compiler():
        note(
            "no C++ compiler found (set CXX or install g++): skipping the compiled operators; "
            "`import rpe_ops` still works and irpe uses its PyTorch fallback"
        )
        return []
    # -fno-trapping-math: lets the compiler turn the kernels' float selects (clamps, maxima) into vector blends, which
    # a trapping compare would forbid; floating-point exceptions are masked in PyTorch processes anyway.
    # -fopenmp-simd: the kernels' `omp simd` reductions vectorise even where OpenMP itself is not linked.
    cxx_flags = ["-O3", "-fno-trapping-math", "-fopenmp-simd"]
    link_flags: list[str] = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is inline OpenMP code: without -fopenmp it would run on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    sources = ["csrc/rpe_ops.cpp", "csrc/rpe_attention_cpu.cpp"]
    if want_cuda():
        resolve_arch_list()
        return [
            CUDAExtension(
                "rpe_ops._C",
                sources + ["csrc/cuda/rpe_ops_cuda.cu"],
                define_macros=[("RPE_OPS_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                extra_link_args=link_flags,
            )
        ]
    return [CppExtension("rpe_ops._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)]


class BuildPy(build_py):
    """Installs the package's Python modules, leaving out this build script."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        return [m for m in super().find_package_modules(package, package_dir) if m[1] != "setup"]


os.chdir(HERE)
setup(
    name="rpe_ops",
    version="0.1.0",
    description="Compiled CPU/CUDA lookup operators of iRPE (image relative position encoding)",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["rpe_ops"],
    package_dir={"rpe_ops": "."},
    ext_modules=build_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True), "build_py": BuildPy},
    zip_safe=False,
)
