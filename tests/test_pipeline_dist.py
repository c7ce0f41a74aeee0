"""Real 2-process distributed training on CPU (Gloo): ``torch.distributed.launch --use_env`` and ``torchrun``.

The runs use DeiT's default recipe (RandAugment, random erasing, mixup 0.8 / cutmix 1.0, repeated augmentation,
model EMA, label smoothing) with DataLoader workers, at 48 px (a 3x3 patch grid) so that an epoch takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools.make_synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"
SUMMARY = re.compile(r"^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$", re.MULTILINE)

pytestmark = pytest.mark.dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    # 7 val images: an odd count, so an exact sharded evaluation must not pad or drop any
    make_dataset(root, num_classes=2, train_per_class=6, val_per_class=3, image_size=56, seed=5)
    (root / "val" / "n00000000" / "val_000_00000.jpg").rename(root / "val" / "n00000000" / "extra.jpg")
    make_dataset(root / "more", num_classes=2, train_per_class=1, val_per_class=1, image_size=56, seed=6)
    (root / "more" / "val" / "n00000001" / "val_001_00000.jpg").rename(root / "val" / "n00000001" / "odd.jpg")
    return root


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch() -> list[str]:
    """The original project's launcher line (deprecated in torch, still present)."""
    return ["torch.distributed.launch", "--nproc_per_node=2", "--use_env", "--master_port", str(_free_port())]


def _cmd(launcher: list[str], data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", *launcher, "main.py", "--model", MODEL, "--input-size", "48", "--device", "cpu",
            "--data-path", str(data), "--output_dir", str(out), "--epochs", "1", "--batch-size", "2",
            "--num_workers", "1", "--warmup-epochs", "0", *extra]  # fmt: skip


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (torch's launcher starts each rank in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def _check(stdout: str, out: Path) -> None:
    assert "world size: 2" in stdout
    assert len(SUMMARY.findall(stdout)) == 1, "only rank 0 prints"
    log = _log(out)
    assert len(log) == 1
    assert log[0]["test_num_images"] == 7, "each val image counted exactly once over the two ranks"
    # RASampler (repeated augmentation is on by default): 12 images -> 6 per rank -> 3 steps of 2
    assert "[2/3]" in stdout
    assert (out / "checkpoint.pth").is_file()


def test_ddp_torch_distributed_launch(data, tmp_path):
    _check(_run(_cmd(_launch(), data, tmp_path)), tmp_path)


def test_ddp_torchrun(data, tmp_path):
    launcher = ["torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    _check(_run(_cmd(launcher, data, tmp_path)), tmp_path)


def test_ddp_kill_9_then_resume_then_evaluate(data, tmp_path):
    """The original command's life cycle: train, ``kill -9`` the job after the first checkpoint, resume, evaluate."""
    cmd = _cmd(_launch(), data, tmp_path, "--epochs", "2")
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "checkpoint.pth").exists():
            assert proc.poll() is None, "training exited before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.02)
        for pid in _process_tree(proc.pid):  # the launcher, both ranks and their DataLoader workers, at once
            os.kill(pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 0

    cmd = _cmd(_launch(), data, tmp_path, "--epochs", "2", "--resume", str(tmp_path / "checkpoint.pth"))
    stdout = _run(cmd)
    assert "continuing at epoch 1" in stdout
    assert [e["epoch"] for e in _log(tmp_path)] == [0, 1]
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["epoch"] == 1

    stdout = _run(_cmd(_launch(), data, tmp_path, "--eval", "--resume", str(tmp_path / "checkpoint.pth")))
    acc1 = float(SUMMARY.search(stdout).group(1))
    assert acc1 == pytest.approx(_log(tmp_path)[-1]["test_acc1"], abs=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_ddp_on_cuda_without_a_gpu_is_one_error_line_per_rank(data, tmp_path):
    proc = subprocess.run(_cmd(_launch(), data, tmp_path, "--device", "cuda"), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    """Each rank checks the device before joining the process group; the launcher stops the other rank as soon as
    the first exits, so one or two error lines appear, followed by the launcher's own failure summary."""
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2, proc.stderr[-3000:]
    assert set(errors) == {"error: --device cuda but no CUDA GPU is visible; use --device cpu"}
    assert 'main.py", line' not in proc.stderr and "exitcode  : 2" in proc.stderr, "a traceback of main.py"
