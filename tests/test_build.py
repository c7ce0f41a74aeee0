"""How `rpe_ops` builds and loads on machines unlike this one: an nvcc whose CUDA major version differs from torch's,
and a GPU whose architecture the build left out (both faked here: no GPU and one toolkit on the CI machine)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import irpe
import rpe_ops

REPO_ROOT = Path(__file__).resolve().parents[1]
needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU-only build")


def _other_cuda_major() -> str:
    """A CUDA release whose major version is not torch's (torch 13.x -> 12.4)."""
    major = int(torch.version.cuda.split(".")[0])
    return f"{major - 1}.4"


def _fake_toolkit(root: Path, release: str) -> Path:
    """A CUDA toolkit whose nvcc reports ``release`` and compiles nothing: enough for setup.py's and torch's checks."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("#error this fake toolkit compiles nothing\n")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text(
        textwrap.dedent(
            f"""\
            #!/bin/sh
            case "$1" in
              --version) echo "Cuda compilation tools, release {release}, V{release}.99";;
              --list-gpu-arch) printf 'compute_70\\ncompute_75\\ncompute_80\\ncompute_86\\ncompute_90\\n';;
              *) echo "fake nvcc: cannot compile" >&2; exit 1;;
            esac
            """
        )
    )
    nvcc.chmod(0o755)
    return root


def _toolkit_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RPE_OPS_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_PATH")}
    return {**env, "CUDA_HOME": str(root), "PATH": f"{root / 'bin'}{os.pathsep}{env['PATH']}", **extra}


def _decision(root: Path, **extra: str) -> subprocess.CompletedProcess:
    """setup.py's CUDA decision and extension list with the toolkit at ``root``, without compiling anything."""
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "rpe_ops")
        import setup
        cuda, reason, message = setup.cuda_decision()
        print(cuda, reason)
        print(message)
        ext = setup.build_extensions()[0]
        print(type(ext).__name__ if hasattr(ext, "name") else ext, "csrc/cuda/rpe_ops_cuda.cu" in ext.sources)
        print(dict(ext.define_macros).get("RPE_OPS_CPU_ONLY"))
        """
    )
    env = _toolkit_env(root, **extra)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def _printed(result: subprocess.CompletedProcess) -> list[str]:
    """_decision's four lines, without setup.py's own notes."""
    return [line for line in result.stdout.splitlines() if not line.startswith("[rpe_ops]")]


@needs_cuda_torch
def test_mismatched_nvcc_builds_the_cpu_operators_and_says_why(tmp_path) -> None:
    release = _other_cuda_major()
    result = _decision(_fake_toolkit(tmp_path / "cuda", release))
    assert result.returncode == 0, result.stderr
    decision, message, extension, cpu_only = _printed(result)
    assert f"[rpe_ops] {message}" in result.stdout  # the build's one line
    assert decision == "False version-mismatch"
    assert f"CUDA {release}" in message and f"built with CUDA {torch.version.cuda}" in message
    assert "building the CPU kernels only" in message and "CUDA_HOME" in message and "RPE_OPS_CUDA=0" in message
    assert extension.endswith("False")  # no .cu source
    assert cpu_only == "4"


@needs_cuda_torch
def test_mismatched_nvcc_with_cuda_forced_is_an_error(tmp_path) -> None:
    result = _decision(_fake_toolkit(tmp_path / "cuda", _other_cuda_major()), RPE_OPS_CUDA="1")
    assert result.returncode == 1
    assert "RPE_OPS_CUDA=1 but the nvcc at" in result.stderr and "unset RPE_OPS_CUDA" in result.stderr


@needs_cuda_torch
def test_matching_nvcc_builds_the_cuda_kernels(tmp_path) -> None:
    result = _decision(_fake_toolkit(tmp_path / "cuda", torch.version.cuda), TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX")
    assert result.returncode == 0, result.stderr
    decision, _, extension, cpu_only = _printed(result)
    assert decision == "True " and extension.endswith("True") and cpu_only == "None"


def test_ptx_architecture_from_the_arch_list() -> None:
    sys.path.insert(0, str(REPO_ROOT / "rpe_ops"))
    try:
        import setup  # noqa: PLC0415

        assert setup.ptx_min_arch("7.0;7.5;8.0;8.6;9.0+PTX") == 90
        assert setup.ptx_min_arch("8.0+PTX 9.0+PTX") == 80
        assert setup.ptx_min_arch("8.0;9.0") is None
    finally:
        sys.path.remove(str(REPO_ROOT / "rpe_ops"))
        sys.modules.pop("setup", None)


@pytest.mark.slow
@needs_cuda_torch
def test_set_up_goes_on_with_a_mismatched_nvcc(tmp_path) -> None:
    # The whole build with the fake toolkit first on PATH and in CUDA_HOME, in a copy of the package: the CPU
    # operators compile and load, and `python -m irpe` says why there are no CUDA kernels.
    shutil.copytree(REPO_ROOT / "rpe_ops", tmp_path / "rpe_ops", ignore=shutil.ignore_patterns("build", "*.so"))
    shutil.copy(REPO_ROOT / "irpe.py", tmp_path / "irpe.py")
    env = _toolkit_env(_fake_toolkit(tmp_path / "cuda", _other_cuda_major()))
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path / "rpe_ops",
        env=env,
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert "building the CPU kernels only" in build.stdout
    report = subprocess.run([sys.executable, "-m", "irpe"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert report.returncode == 0, report.stderr
    assert "without CUDA kernels (the CUDA toolkit's major version differed from torch's" in report.stdout
    assert "cpu : rpe_ops (compiled CPU kernels)" in report.stdout


# ---------------------------------------------------------------------------------------------------------------------
# A GPU outside the built architectures


def _info(archs: list[str], ptx: str | None) -> dict:
    return {"cuda_kernels": True, "cuda_archs": archs, "cuda_ptx": ptx}


@pytest.mark.parametrize(
    "capability,archs,ptx,runs",
    [
        ((9, 0), ["sm_70", "sm_80", "sm_90"], None, True),  # its own architecture
        ((8, 6), ["sm_70", "sm_80"], None, True),  # sm_80 code runs on 8.x GPUs of a higher minor version
        ((8, 0), ["sm_86"], None, False),  # not on a lower minor version
        ((12, 0), ["sm_70", "sm_80", "sm_90"], None, False),  # a newer major version needs PTX
        ((12, 0), ["sm_70", "sm_80", "sm_90"], "sm_90", True),  # which the driver compiles for it
        ((7, 0), ["sm_75", "sm_80"], "sm_80", False),  # PTX serves newer GPUs only
        ((7, 5), [], None, True),  # architectures unknown (no __CUDA_ARCH_LIST__): trusted
    ],
)
def test_cuda_kernels_serve_only_the_architectures_they_were_built_for(capability, archs, ptx, runs) -> None:
    ok, why = rpe_ops.cuda_capability_supported(capability, _info(archs, ptx))
    assert ok == runs, why
    if not runs:
        assert f"sm_{capability[0]}{capability[1]}" in why and "TORCH_CUDA_ARCH_LIST" in why


@pytest.fixture
def fake_gpu(monkeypatch):
    """A visible 'GPU' of a chosen compute capability and a library whose CUDA kernels were built for sm_70-sm_90
    without PTX."""

    def make(capability: tuple[int, int]) -> None:
        if not rpe_ops.is_available():
            pytest.skip("rpe_ops is not built")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        info = {**rpe_ops.build_info(), **_info(["sm_70", "sm_75", "sm_80", "sm_86", "sm_90"], None)}
        monkeypatch.setattr(rpe_ops, "build_info", lambda: info)
        monkeypatch.setattr(rpe_ops, "has_cuda_kernels", lambda: True)
        rpe_ops._cuda_device_support.cache_clear()

    yield make
    rpe_ops._cuda_device_support.cache_clear()


def test_a_gpu_outside_the_build_takes_the_pytorch_path(fake_gpu) -> None:
    fake_gpu((12, 0))
    supported, why = rpe_ops.serves(torch.device("cuda"), torch.float32)
    assert not supported and "not for this GPU (sm_120)" in why
    report = rpe_ops.report()
    assert "cuda: PyTorch fallback (rpe_ops' CUDA kernels were built for sm_70" in report
    assert not irpe._compiled(_FakeCudaTensor())


class _FakeCudaTensor:
    """What irpe._compiled reads of a tensor: its device and dtype."""

    device = torch.device("cuda", 0)
    dtype = torch.float32


def test_a_gpu_inside_the_build_takes_the_kernels(fake_gpu) -> None:
    fake_gpu((8, 9))
    supported, why = rpe_ops.serves(torch.device("cuda"), torch.float32)
    assert supported and "sm_89" in why
    assert irpe._compiled(_FakeCudaTensor())


@pytest.mark.cuda
def test_cuda_bucket_sum_alerts_under_deterministic_algorithms() -> None:
    if not rpe_ops.has_cuda_kernels():
        pytest.skip("rpe_ops built without CUDA kernels")
    values = torch.randn(1, 1, 4, 6, device="cuda")
    index = torch.randint(0, 3, (4, 6), device="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match=r"rpe_ops::rpe_bucket_sum \(CUDA\)"):
            rpe_ops.rpe_bucket_sum(values, index, 3)
    finally:
        torch.use_deterministic_algorithms(previous)
