"""Kills a training run inside its save sequence and checks checkpoint.pth, best_checkpoint.pth and log.txt.

The runs are subprocesses that SIGKILL themselves at a named point of the writes (``tests/kill_at.py`` patches the
file system calls of the run's process) and report scripted accuracies (a driver wraps ``main.evaluate``), so which
epochs improve is known. After every kill the files must satisfy the invariant documented in ``main.py`` (above
``save_epoch_outputs``), and after resuming: every epoch logged exactly once, the best weights never lost, no
temporary file left.

Default suite: one chain of four runs with a kill inside each of the three writes (best_checkpoint.pth after its
rename, log.txt after the append, checkpoint.pth part-written), and a full disk. ``-m slow``: every kill point on
its own, and a kill in epoch 0's checkpoint.pth followed by a refused fresh run and a resume from best_checkpoint.pth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

import main
import utils
from tools.make_synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
KILL_AT = Path(__file__).resolve().parent / "kill_at.py"
MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"
ACC = [40.0, 60.0, 50.0, 80.0]  # scripted test_acc1 of epochs 0..3: epochs 0, 1 and 3 improve

# Runs main.cli with test_acc1 of epoch e replaced by ACC[e] (training and evaluation stay real).
DRIVER = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import main
ACC, seen = {ACC!r}, {{}}
train, evaluate = main.train_one_epoch, main.evaluate
def scripted_train(*args, **kwargs):
    seen["epoch"] = args[5]
    return train(*args, **kwargs)
def scripted_evaluate(*args, **kwargs):
    return {{**evaluate(*args, **kwargs), "acc1": ACC[seen["epoch"]]}}
main.train_one_epoch, main.evaluate = scripted_train, scripted_evaluate
sys.exit(main.cli(sys.argv[1:]))
"""
POINTS = [f"{name}:{step}" for name in ("best_checkpoint.pth", "checkpoint.pth") for step in ("partial", "written",
          "replaced")] + ["log.txt:partial", "log.txt:appended"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=2, train_per_class=4, val_per_class=2, image_size=32, seed=1)
    (root / "scripted_main.py").write_text(DRIVER)
    return root


def _argv(data: Path, out: Path, epochs: int, resume: bool) -> list[str]:
    argv = ["--model", MODEL, "--input-size", "32", "--device", "cpu", "--num_workers", "0", "--batch-size", "4",
            "--data-path", str(data), "--output_dir", str(out), "--epochs", str(epochs),
            "--print-freq", "100"]  # fmt: skip
    return argv + (["--resume", str(out / "checkpoint.pth")] if resume else [])


def run_driver(data: Path, argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    """The driver on ``argv``, killed at ``kill_at`` (``<point>#<n>``: the n-th time, see tests/kill_at.py)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    point, _, nth = (kill_at or "").partition("#")
    prefix = [str(KILL_AT), point, nth or "1"] if kill_at else []
    cmd = [sys.executable, *prefix, str(data / "scripted_main.py"), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run(data: Path, out: Path, epochs: int, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """Runs (resuming when out/checkpoint.pth exists) and checks it was killed when asked, else that it succeeded."""
    proc = run_driver(data, _argv(data, out, epochs, (out / "checkpoint.pth").exists()), kill_at)
    expected = -signal.SIGKILL if kill_at else 0
    assert proc.returncode == expected, f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def log_epochs(out: Path) -> tuple[list[int], str]:
    """Epochs of the complete log lines, and the cut-short last line ('' if none)."""
    text = (out / "log.txt").read_text()
    *lines, tail = text.split("\n")
    return [json.loads(line)["epoch"] for line in lines], tail


def check_invariant(out: Path, best_epoch: int) -> int:
    """The state a kill may leave (see main.py); returns the committed epoch c."""
    c = _load(out / "checkpoint.pth")["epoch"] if (out / "checkpoint.pth").exists() else -1
    epochs, _ = log_epochs(out)
    assert epochs in (list(range(c + 1)), list(range(c + 2))), (c, epochs)
    best = _load(out / "best_checkpoint.pth")
    assert best["epoch"] == best_epoch and best["max_accuracy"] == ACC[best_epoch]
    if c >= 0:
        assert best["max_accuracy"] >= _load(out / "checkpoint.pth")["max_accuracy"]
    return c


def check_final(out: Path, epochs: int) -> None:
    """After an uninterrupted end: each epoch logged once with its accuracy, best weights = best epoch's, no tmp."""
    entries = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [e["epoch"] for e in entries] == list(range(epochs))
    assert [e["test_acc1"] for e in entries] == ACC[:epochs]
    best_epoch = max(range(epochs), key=lambda e: (ACC[e], -e))
    ckpt, best = _load(out / "checkpoint.pth"), _load(out / "best_checkpoint.pth")
    assert ckpt["epoch"] == epochs - 1 and ckpt["max_accuracy"] == ACC[best_epoch]
    assert best["epoch"] == best_epoch and best["max_accuracy"] == ACC[best_epoch]
    if best_epoch == epochs - 1:  # the best epoch is the last one: its weights are checkpoint.pth's
        assert all(torch.equal(best["model"][k], v) for k, v in ckpt["model"].items())
    assert not list(out.glob(".*.tmp")), "temporary files left behind"


def test_kill_in_each_write_then_resume(data, tmp_path):
    """A chain of kills, one inside each of the three writes, each followed by a resume."""
    out = tmp_path / "run"
    # Epoch 1 improves (60%): best_checkpoint.pth is renamed into place, then the run dies before log and checkpoint.
    run(data, out, 4, "best_checkpoint.pth:replaced#2")
    assert check_invariant(out, best_epoch=1) == 0 and log_epochs(out)[0] == [0]
    # Resumed at epoch 1, which is retrained (60% again: no better, so best_checkpoint.pth is kept) and logged; the
    # run dies before checkpoint.pth.
    run(data, out, 4, "log.txt:appended#1")
    assert check_invariant(out, best_epoch=1) == 0 and log_epochs(out)[0] == [0, 1]
    # Resumed: epoch 1's line is dropped and written again, checkpoint.pth commits epoch 1; epoch 2 (50%) dies with
    # its checkpoint.pth partly written to the temporary file.
    proc = run(data, out, 4, "checkpoint.pth:partial#2")
    assert "log.txt: removed 1 line(s) of epochs after 0" in proc.stdout
    assert check_invariant(out, best_epoch=1) == 1 and log_epochs(out)[0] == [0, 1, 2]
    assert len(list(out.glob(".checkpoint.pth.*.tmp"))) == 1
    # Resumed to the end: the temporary file is removed at start, epoch 2 re-logged once, epoch 3 (80%) is the best.
    proc = run(data, out, 4)
    assert "left by a run killed while saving" in proc.stdout
    check_final(out, 4)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kill_at_each_point_of_the_second_epoch(data, tmp_path, point):
    """Every kill point on its own, in epoch 1 (which improves), then a resume to the end."""
    out = tmp_path / "run"
    run(data, out, 3, f"{point}#2")  # the second time: epoch 1 (epochs 0 and 1 both write best_checkpoint.pth)
    best_written = point in ("best_checkpoint.pth:replaced",) or not point.startswith("best")
    c = check_invariant(out, best_epoch=1 if best_written else 0)
    assert c == (1 if point == "checkpoint.pth:replaced" else 0)
    left_tmp = point.endswith(("partial", "written")) and not point.startswith("log")
    assert bool(list(out.glob(".*.tmp"))) == left_tmp
    if point == "log.txt:partial":
        assert log_epochs(out)[1] != ""  # a cut-short line
    run(data, out, 3)
    check_final(out, 3)


def _scripted(monkeypatch, accs: list[float]) -> None:
    """In-process equivalent of DRIVER."""
    seen = {}
    train, evaluate = main.train_one_epoch, main.evaluate

    def scripted_train(*args, **kwargs):
        seen["epoch"] = args[5]
        return train(*args, **kwargs)

    monkeypatch.setattr(main, "train_one_epoch", scripted_train)
    monkeypatch.setattr(main, "evaluate", lambda *a, **k: {**evaluate(*a, **k), "acc1": accs[seen["epoch"]]})


def test_full_disk_is_one_error_line_and_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch, capsys):
    """ENOSPC on the second epoch's checkpoint.pth (its temporary file is /dev/full): one line, the file named."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    _scripted(monkeypatch, [50.0, 40.0])
    real_mkstemp = tempfile.mkstemp
    calls = []

    def mkstemp_on_full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if kwargs.get("prefix") == ".checkpoint.pth.":
            calls.append(name)
            if len(calls) == 2:
                os.close(fd)
                fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, as on a full disk
        return fd, name

    monkeypatch.setattr(utils.tempfile, "mkstemp", mkstemp_on_full_disk)
    out = tmp_path / "run"
    assert main.cli(_argv(data, out, 2, resume=False)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert f"cannot write {out / 'checkpoint.pth'}: No space left on device" in err
    assert f"the previous {out / 'checkpoint.pth'} is intact" in err and "--resume" in err
    assert _load(out / "checkpoint.pth")["epoch"] == 0
    assert not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_in_the_first_checkpoint_then_a_fresh_run_is_refused_and_best_resumes(data, tmp_path):
    """A kill inside epoch 0's checkpoint.pth leaves best_checkpoint.pth and log.txt: a run without --resume is
    refused (it would log epoch 0 twice), and --resume best_checkpoint.pth, which the message names, completes."""
    out = tmp_path / "run"
    run(data, out, 2, "checkpoint.pth:partial#1")
    assert check_invariant(out, best_epoch=0) == -1
    proc = run_driver(data, _argv(data, out, 2, resume=False))
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: --output_dir {out} holds another run (log.txt, best_checkpoint.pth; it reached epoch 0): continue "
        f"it with --resume {out / 'best_checkpoint.pth'}, or pass another --output_dir for a new run"
    )
    argv = [*_argv(data, out, 2, resume=False), "--resume", str(out / "best_checkpoint.pth")]
    proc = run_driver(data, argv)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_final(out, 2)
