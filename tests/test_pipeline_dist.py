"""Real 2-process distributed training on CPU (Gloo): ``torch.distributed.launch --use_env`` and ``torchrun``."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
    make_dataset(root, num_classes=2, train_per_class=6, val_per_class=3, image_size=32, seed=5)
    (root / "val" / "n00000000" / "val_000_00000.jpg").rename(root / "val" / "n00000000" / "extra.jpg")
    make_dataset(root / "more", num_classes=2, train_per_class=1, val_per_class=1, image_size=32, seed=6)
    (root / "more" / "val" / "n00000001" / "val_001_00000.jpg").rename(root / "val" / "n00000001" / "odd.jpg")
    return root


def _run(launcher: list[str], data: Path, out: Path) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", *launcher, "main.py", "--model", MODEL, "--input-size", "32", "--device", "cpu",
           "--data-path", str(data), "--output_dir", str(out), "--epochs", "1", "--batch-size", "2",
           "--num_workers", "0", "--aa", "none", "--reprob", "0", "--warmup-epochs", "0"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _check(stdout: str, out: Path) -> None:
    assert "world size: 2" in stdout
    assert len(SUMMARY.findall(stdout)) == 1, "only rank 0 prints"
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1
    assert log[0]["test_num_images"] == 7, "each val image counted exactly once over the two ranks"
    # RASampler (repeated augmentation is on by default): 12 images -> 6 per rank -> 3 steps of 2
    assert "[2/3]" in stdout
    assert (out / "checkpoint.pth").is_file()


def test_ddp_torch_distributed_launch(data, tmp_path):
    """The original's launcher (deprecated but present in this torch)."""
    port = str(_free_port())
    launcher = ["torch.distributed.launch", "--nproc_per_node=2", "--use_env", "--master_port", port]
    _check(_run(launcher, data, tmp_path), tmp_path)


def test_ddp_torchrun(data, tmp_path):
    launcher = ["torch.distributed.run", "--nproc_per_node=2", "--master_port", str(_free_port())]
    _check(_run(launcher, data, tmp_path), tmp_path)
