"""Shared pytest fixtures and the automatic skip of CUDA tests on machines without a GPU."""

from __future__ import annotations

import logging
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton runs in its interpreter, so that the Triton attention kernel's tests run on CPU tensors
# (tests/test_triton_attention.py). The mode must be chosen before Triton is first imported (the test modules import
# it through timm and rpe_ops); with a GPU visible the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
# The full reference vectors live beside the checkout (../shared/reference); tests that need files too large to
# commit skip when it is absent.
SHARED_REFERENCE = REPO_ROOT.parent / "shared" / "reference"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _cpu_model() -> str:
    """The CPU's model name and widest x86 vector extensions, from /proc/cpuinfo (Linux), else the platform's."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    simd = [f for f in ("avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(simd) or 'no AVX2'})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    """The machine and the variant of the CPU attention kernel this run uses (tests/test_rpe_ops.py also forces each
    variant the CPU supports, ATEN_CPU_CAPABILITY)."""
    import rpe_ops  # noqa: PLC0415

    info = rpe_ops.build_info()
    kernel = f"CPU kernel variant {info['cpu_isa']}" if info["available"] else f"not built ({info['error']})"
    return [f"cpu: {_cpu_model()}", f"rpe_ops: {kernel}"]


# The test that runs the CPU attention kernel in each instruction-set variant (tests/test_rpe_ops.py), ids
# "<variant>-<factored|key-by-key>".
_VARIANT_TEST = "test_rpe_attention_on_product_ids_matches_its_definition["


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """One line saying which variants of the CPU kernel were checked against float64 in this run, and which not."""
    lines = {}
    for outcome in ("passed", "failed", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "")
            if _VARIANT_TEST in nodeid and (report.when == "call" or outcome == "skipped"):
                params = nodeid.split(_VARIANT_TEST, 1)[1].rstrip("]")
                lines.setdefault(outcome, []).append(params)
    if lines:
        text = "; ".join(f"{outcome}: {', '.join(sorted(ids))}" for outcome, ids in lines.items())
        terminalreporter.write_line(f"rpe_ops CPU kernel variants against float64 -- {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Each test leaves the root logger as it found it: ``main.cli`` run in-process installs stdout/stderr handlers
    (``utils.setup_logging``) that would otherwise print INFO lines into later tests' captured output."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    if not SHARED_REFERENCE.is_dir():
        pytest.skip(f"{SHARED_REFERENCE} is absent")
    return SHARED_REFERENCE


@pytest.fixture
def hub_dir(tmp_path: Path) -> Iterator[Path]:
    """torch.hub's directory inside tmp_path for the test; downloads are cached in ``<hub_dir>/checkpoints``."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)
