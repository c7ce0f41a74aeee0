"""End-to-end runs of ``main.py`` as a subprocess (the real CLI) on generated image files and tar archives.

Every run uses DeiT's default recipe (RandAugment ``rand-m9-mstd0.5-inc1``, colour jitter, random erasing, mixup 0.8 /
cutmix 1.0, label smoothing, model EMA), as users run it; only the size is small (3 classes, 48 px, so the ImageNet
transforms and a 3x3 patch grid, a few images): each run takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from tools.make_synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"
SUMMARY = re.compile(r"^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$", re.MULTILINE)
COMMON = ["--model", MODEL, "--input-size", "48", "--device", "cpu", "--num_workers", "0", "--batch-size", "4",
          "--print-freq", "1", "--tb-log-freq", "1"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_main(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "main.py", *args], cwd=REPO, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-3000:]}"
    return proc.stdout


def read_log(path: Path) -> dict[int, dict]:
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {e["epoch"]: e for e in entries}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=3, train_per_class=4, val_per_class=2, image_size=56, tar=True, seed=3)
    return root


RECIPE = "epochs: 2\nwarmup-epochs: 1\nlr: 4.0e-3\nmin-lr: 1.0e-6\nwarmup-lr: 1.0e-7\n"  # DeiT's augmentation


def recipe_args(data: Path, cfg: Path, out: Path) -> list[str]:
    """The 2-epoch run shared by the uninterrupted and the killed-then-resumed runs."""
    return ["--config", str(cfg), *COMMON, "--data-path", str(data), "--output_dir", str(out)]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-epoch run from image folders, configured through --config (the CLI overrides a key)."""
    out = tmp_path_factory.mktemp("run_folders")
    cfg = out / "recipe.yaml"
    cfg.write_text(RECIPE.replace("warmup-epochs: 1", "warmup-epochs: 3"))
    stdout = _ok(run_main(*recipe_args(data, cfg, out), "--warmup-epochs", "1"))
    return out, stdout


def test_train_one_epoch_from_folders_writes_outputs(trained):
    out, stdout = trained
    assert SUMMARY.search(stdout), stdout[-2000:]
    assert re.search(r"Epoch: \[0\]  \[0/3\]  eta: \d+:\d\d:\d\d", stdout)
    args = yaml.safe_load((out / "args.yaml").read_text())
    assert args["epochs"] == 2 and args["warmup_epochs"] == 1 and args["lr"] == 4e-3 and args["model"] == MODEL
    log = read_log(out / "log.txt")
    assert set(log) == {0, 1}
    assert log[0]["train_lr"] != log[1]["train_lr"]
    keys = {"train_lr", "train_loss", "test_loss", "test_acc1", "test_acc5", "epoch", "n_parameters"}
    assert keys <= set(log[0])
    assert log[0]["test_num_images"] == 6
    assert list(out.glob("events.out.tfevents.*")), "TensorBoard event file missing"
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and {"model", "optimizer", "lr_scheduler", "model_ema", "args"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == MODEL
    assert (out / "best_checkpoint.pth").is_file()
    assert not list(out.glob(".*.tmp")), "temporary checkpoint files left behind"


def test_tensorboard_has_step_and_epoch_scalars(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "epoch/test_acc1", "epoch/train_loss"} <= tags
    assert len(acc.Scalars("train/loss")) == 6  # every step of 2 epochs (--tb-log-freq 1)
    assert [e.step for e in acc.Scalars("epoch/test_acc1")] == [0, 1]


def test_train_one_epoch_from_tars(data, tmp_path):
    stdout = _ok(run_main(*COMMON, "--data-path", str(data), "--load-tar", "--epochs", "1", "--output_dir",
                          str(tmp_path)))  # fmt: skip
    assert "data: 12 train / 6 val images, 3 classes" in stdout
    assert SUMMARY.search(stdout)
    assert read_log(tmp_path / "log.txt")[0]["test_num_images"] == 6


def test_eval_resume_reproduces_the_training_evaluation(trained, data):
    out, _ = trained
    stdout = _ok(run_main(*COMMON, "--data-path", str(data), "--eval", "--resume", str(out / "checkpoint.pth")))
    acc1 = float(SUMMARY.search(stdout).group(1))
    assert acc1 == pytest.approx(read_log(out / "log.txt")[1]["test_acc1"], abs=1e-3)
    assert "Accuracy of the network on the 6 test images" in stdout


def test_eval_pretrained_from_a_model_zoo_mirror(trained, data, tmp_path):
    """--pretrained downloads <IRPE_MODEL_ZOO_URL><model>.pth from an http.server on 127.0.0.1."""
    out, _ = trained
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    state = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)["model"]
    torch.save({"model": state}, zoo / f"{MODEL}.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(zoo))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = _env(IRPE_MODEL_ZOO_URL=f"http://127.0.0.1:{server.server_address[1]}/", TORCH_HOME=str(tmp_path / "th"))
        stdout = _ok(run_main(*COMMON, "--data-path", str(data), "--eval", "--pretrained", env=env))
    finally:
        server.shutdown()
        server.server_close()
    acc1 = float(SUMMARY.search(stdout).group(1))
    assert acc1 == pytest.approx(read_log(out / "log.txt")[1]["test_acc1"], abs=1e-3)


def test_user_error_from_a_dataloader_worker_is_one_line(data, tmp_path):
    """An unreadable image met inside a worker process still gives `error: ...` naming the file, exit code 2."""
    import shutil

    shutil.copytree(data / "train", tmp_path / "train")
    shutil.copytree(data / "val", tmp_path / "val")
    (tmp_path / "val" / "n00000002" / "zz_broken.png").write_bytes(b"\x89PNG garbage")
    args = list(COMMON)
    args[args.index("--num_workers") + 1] = "1"
    proc = run_main(*args, "--data-path", str(tmp_path), "--eval", "--eval-random-init")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image ") and "zz_broken.png" in last
    assert "Traceback" not in proc.stderr


def test_kill_during_training_then_resume_keeps_the_lr_schedule(trained, data, tmp_path):
    """kill -9 after the first checkpoint; --resume continues at the next epoch with the uninterrupted LRs."""
    full, _ = trained
    reference = read_log(full / "log.txt")
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(RECIPE)
    part = tmp_path / "part"
    proc = subprocess.Popen(
        [sys.executable, "main.py", *recipe_args(data, cfg, part)],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 240
        while not (part / "checkpoint.pth").exists():
            assert proc.poll() is None, "training exited before writing a checkpoint"
            assert time.time() < deadline, "no checkpoint within the deadline"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert torch.load(part / "checkpoint.pth", map_location="cpu", weights_only=True)["epoch"] == 0
    assert sorted(read_log(part / "log.txt")) == [0]

    stdout = _ok(run_main(*recipe_args(data, cfg, part), "--resume", str(part / "checkpoint.pth")))
    assert "continuing at epoch 1" in stdout
    resumed = read_log(part / "log.txt")
    assert sorted(resumed) == [0, 1]
    for epoch in (0, 1):
        assert resumed[epoch]["train_lr"] == pytest.approx(reference[epoch]["train_lr"], rel=1e-9, abs=0)
    ckpt = torch.load(part / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["args"]["resume"].endswith("checkpoint.pth")
