"""Build the compiled iRPE lookup operators (`rpe_ops._C`).

Usage (from this directory):
    python setup.py build_ext --inplace          # in-place build, used by the repository's Makefile
    pip install --no-build-isolation .           # or: python setup.py install --user

Environment:
    RPE_OPS_CUDA=0|1        force the CUDA kernels off / on (default: on whenever nvcc and a CUDA build of torch
                            are found, whether or not a GPU is visible, and nvcc's CUDA major version is torch's).
    TORCH_CUDA_ARCH_LIST    CUDA architectures (default: "7.0;7.5;8.0;8.6;9.0+PTX", V100 to H100, filtered to those
                            the installed nvcc supports).
    CUDA_HOME / CUDA_PATH   CUDA toolkit root (default: found from `nvcc` on PATH, then /usr/local/cuda).
    MAX_JOBS                parallel compile jobs (ninja).

A missing C++ compiler is reported and the extension skipped: the Python package still installs and imports, and
irpe falls back to its PyTorch lookup. An nvcc whose CUDA major version differs from torch's (torch refuses to build
with it) is reported and the CUDA kernels left out: the CPU operators build, and `python -m irpe` says why.
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

# Why the CUDA kernels are left out, compiled into the extension (RPE_OPS_CPU_ONLY) for `rpe_ops.build_info()`.
CPU_ONLY_REASONS = {"disabled": 1, "no-toolkit": 2, "cpu-torch": 3, "version-mismatch": 4}


def nvcc_version() -> str | None:
    """The CUDA release of the toolkit's nvcc ("12.4"), or None when it cannot be run or read."""
    try:
        text = subprocess.run(
            [str(Path(CUDA_ROOT) / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def cuda_decision() -> tuple[bool, str, str]:
    """Whether to build the CUDA kernels, the reason key of CPU_ONLY_REASONS when not, and one line saying why and
    what to do. RPE_OPS_CUDA=0 turns them off; =1 makes any obstacle an error; unset builds them when a toolkit whose
    CUDA major version is torch's is found (torch refuses to compile with another major version)."""
    flag = os.environ.get("RPE_OPS_CUDA", "").strip()
    if flag == "0":
        return False, "disabled", "RPE_OPS_CUDA=0: building the CPU kernels only"
    if CUDA_ROOT is None:
        key, why = "no-toolkit", "no CUDA toolkit (nvcc) found"
        todo = "set CUDA_HOME to a toolkit to build the CUDA kernels"
    elif torch.version.cuda is None:
        key, why = "cpu-torch", f"torch {torch.__version__} is a CPU-only build"
        todo = "install a CUDA build of torch to build the CUDA kernels"
    else:
        found = nvcc_version()
        if found is None or found.split(".")[0] == torch.version.cuda.split(".")[0]:
            return True, "", ""
        key = "version-mismatch"
        why = f"the nvcc at {CUDA_ROOT} is CUDA {found}, torch {torch.__version__} was built with CUDA "
        why += torch.version.cuda
        todo = (
            f"to build the CUDA kernels, set CUDA_HOME to a CUDA {torch.version.cuda.split('.')[0]}.x toolkit; "
            "RPE_OPS_CUDA=0 builds the CPU kernels without this note"
        )
    if flag == "1":
        sys.exit(f"[rpe_ops] RPE_OPS_CUDA=1 but {why}; {todo}, or unset RPE_OPS_CUDA")
    return False, key, f"{why}: building the CPU kernels only ({todo})"


def ptx_min_arch(arch_list: str) -> int | None:
    """The lowest architecture of TORCH_CUDA_ARCH_LIST compiled to PTX ("8.0;9.0+PTX" -> 90): its PTX runs, compiled
    by the driver, on every GPU of that compute capability or newer."""
    archs = [re.match(r"(\d+)\.(\d+)", item.strip()) for item in re.split(r"[;\s]+", arch_list) if "+PTX" in item]
    found = [int(m.group(1)) * 10 + int(m.group(2)) for m in archs if m]
    return min(found) if found else None


def nvcc_arch_list() -> set[str] | None:
    """Compute capabilities ("7.5", "9.0", ...) the installed nvcc can compile for, or None when unknown."""
    try:
        listing = subprocess.run(
            [str(Path(CUDA_ROOT) / "bin" / "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
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
    cuda, reason, message = cuda_decision()
    if cuda:
        macros = [("RPE_OPS_WITH_CUDA", None)]
        ptx = ptx_min_arch(resolve_arch_list())
        if ptx is not None:
            macros.append(("RPE_OPS_PTX_MIN", str(ptx)))
        return [
            CUDAExtension(
                "rpe_ops._C",
                sources + ["csrc/cuda/rpe_ops_cuda.cu"],
                define_macros=macros,
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
                extra_link_args=link_flags,
            )
        ]
    note(message)
    macros = [("RPE_OPS_CPU_ONLY", str(CPU_ONLY_REASONS[reason]))]
    flags = {"extra_compile_args": {"cxx": cxx_flags}, "extra_link_args": link_flags}
    return [CppExtension("rpe_ops._C", sources, define_macros=macros, **flags)]


class BuildPy(build_py):
    """Installs the package's Python modules, leaving out this build script."""

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        return [m for m in super().find_package_modules(package, package_dir) if m[1] != "setup"]


if __name__ == "__main__":
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
