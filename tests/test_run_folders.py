"""Run folders: one run per ``--output_dir``, nothing-to-train errors, and every failed write as one ``error:`` line.

Each case runs ``main.py`` as a user does (a subprocess); variants that stop before any training run ``main.cli``
in-process. The full disk is a tmpfs of a few pages mounted for the test where mounting works (as root), else a test
double (:func:`install_quota`) that charges the files written under a folder in whole pages, as tmpfs does, and fails
a write past the free space with ``ENOSPC`` (``IRPE_TEST_DISK_DOUBLE=1`` picks the double where mounting works too).
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

import main
from kill_at import FileProxy
from tools.make_synthetic_dataset import make_dataset

REPO = Path(__file__).resolve().parents[1]
MODEL = "deit_tiny_patch16_224_ctx_product_50_shared_k"
PAGE = 4096  # tmpfs allocates files in pages; the test double charges the same way

# Runs main.cli with the files under argv[1] limited to argv[2] free pages (install_quota), then argv[3:] as flags.
QUOTA_DRIVER = f"""
import sys
sys.path[:0] = [{str(REPO)!r}, {str(Path(__file__).parent)!r}]
import main, test_run_folders
test_run_folders.install_quota(sys.argv[1], int(sys.argv[2]))
sys.exit(main.cli(sys.argv[3:]))
"""


def main_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", MODEL, "--input-size", "32", "--device", "cpu", "--num_workers", "0", "--batch-size", "4",
            "--data-path", str(data), "--output_dir", str(out), "--print-freq", "100", *extra]  # fmt: skip


def run_main(argv: list[str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python main.py ARGV`` in the repository (``prefix`` replaces ``main.py``: a driver and its arguments)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cmd = [sys.executable, *(prefix or ["main.py"]), *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a run that exited with code 2 (its whole stderr)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{err[-3000:]}"
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, num_classes=2, train_per_class=4, val_per_class=2, image_size=32, seed=1)
    return root


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


# ----------------------------------------------------------------------------------------------------------------
# A small disk: tmpfs, or the test double


def install_quota(root: str | os.PathLike[str], free_pages: int) -> None:
    """Test double of a nearly full file system at ``root``: files opened there for writing share ``free_pages``.

    ``io.open`` (behind ``open``, ``Path.open`` and ``os.fdopen``) returns, for such files, a wrapper that charges
    every write the pages it adds to its file, writes what fits and raises ``ENOSPC`` for the rest, as tmpfs does.
    Space freed by deleting or replacing files is not given back (the scenarios here do not need it).
    """
    real_open = io.open
    root = os.path.realpath(root)
    free = [free_pages]

    class QuotaFile(FileProxy):
        def __init__(self, f: Any) -> None:
            super().__init__(f)
            self._size = os.fstat(f.fileno()).st_size

        def write(self, data: bytes) -> int:
            pages = -(-self._size // PAGE)
            room = (pages + free[0]) * PAGE - self._size
            if len(data) > room:
                self._f.write(data[:room])
                self._size += room
                free[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._size += len(data)
            free[0] -= -(-self._size // PAGE) - pages
            return self._f.write(data)

    def quota_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        if not set(mode) & set("wax+"):
            return f
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.path.realpath(file)
        return QuotaFile(f) if path.startswith(root + os.sep) else f

    io.open = quota_open  # type: ignore[assignment]
    builtins.open = quota_open  # type: ignore[assignment]


def _mount_tmpfs(path: Path, pages: int) -> bool:
    if pages < 1 or not shutil.which("mount") or os.geteuid() != 0 or os.environ.get("IRPE_TEST_DISK_DOUBLE"):
        return False  # (size=0 would be a tmpfs without a limit)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={pages * PAGE}", "tmpfs", str(path)],
                          capture_output=True)  # fmt: skip
    return proc.returncode == 0


class SmallDisk:
    """A folder on a file system with a given number of free pages (see the fixture ``small_disk``)."""

    def __init__(self, root: Path, free_pages: int, tmpfs: bool) -> None:
        self.root, self.free_pages, self.tmpfs = root, free_pages, tmpfs

    def run(self, argv: list[str]) -> subprocess.CompletedProcess:
        """``main.py ARGV`` writing to this disk."""
        if self.tmpfs:
            return run_main(argv)
        return run_main(argv, prefix=["-c", QUOTA_DRIVER, str(self.root), str(self.free_pages)])

    def grow(self, pages: int) -> None:
        """Gives the file system ``pages`` more free pages (space freed on the disk)."""
        self.free_pages += pages
        if self.tmpfs:
            stat = os.statvfs(self.root)
            size = stat.f_blocks * stat.f_frsize + pages * PAGE
            subprocess.run(["mount", "-o", f"remount,size={size}", str(self.root)], check=True)

    def limit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Limits the writes of this process (in-process runs): nothing to do on a tmpfs."""
        if not self.tmpfs:
            monkeypatch.setattr(io, "open", io.open)
            monkeypatch.setattr(builtins, "open", builtins.open)
            install_quota(self.root, self.free_pages)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., SmallDisk]]:
    """``make(free_pages, files={name: bytes})``: a folder holding ``files``, then ``free_pages`` pages free."""
    mounted: list[Path] = []

    def make(free_pages: int, files: dict[str, bytes] | None = None) -> SmallDisk:
        root = tmp_path / f"disk{len(list(tmp_path.glob('disk*')))}"
        root.mkdir()
        files = files or {}
        used = sum(-(-len(content) // PAGE) for content in files.values())
        tmpfs = _mount_tmpfs(root, used + free_pages)
        if tmpfs:
            mounted.append(root)
        for name, content in files.items():
            (root / name).write_bytes(content)
        return SmallDisk(root, free_pages, tmpfs)

    yield make
    for root in mounted:
        subprocess.run(["umount", "-l", str(root)], check=False)


# ----------------------------------------------------------------------------------------------------------------
# 1. Nothing to train (the resumed variant is in the test of item 4)


def test_start_epoch_at_or_past_epochs_is_an_error(data, tmp_path):
    out = tmp_path / "new"
    err = error_line(run_main(main_argv(data, out, "--epochs", "1", "--start_epoch", "99")))
    assert err == (
        "error: --start_epoch 99 is not below --epochs 1 (epochs 0 to 0): nothing to train; raise --epochs above 99 "
        "to train on, or add --eval to only evaluate"
    )
    assert not out.exists(), "checked before the output folder is made"


# ----------------------------------------------------------------------------------------------------------------
# 2., 3. and 4. One run per folder, and a full disk


def test_full_disk_before_the_first_checkpoint_then_a_fresh_run_is_refused(data, small_disk, capsys):
    # Room for args.yaml, the event file, log.txt and best_checkpoint.pth (epoch 0 improves), not for checkpoint.pth:
    # a checkpoint holds the weights, their EMA and AdamW's two moments (float32), plus a little.
    n_params = sum(p.numel() for p in timm.create_model(MODEL, img_size=32, num_classes=2).parameters())
    disk = small_disk(free_pages=int(1.5 * 16 * n_params) // PAGE)
    out = disk.root
    err = error_line(disk.run(main_argv(data, out, "--epochs", "2")))
    assert err == (
        f"error: cannot write {out / 'checkpoint.pth'}: No space left on device; no checkpoint.pth was written "
        f"yet: free disk space, then continue with --resume {out / 'best_checkpoint.pth'}"
    )
    assert torch.load(out / "best_checkpoint.pth", weights_only=True)["epoch"] == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]
    assert not list(out.glob(".*.tmp"))

    # 2. A fresh run into the folder is refused before it writes anything.
    before = _snapshot(out)
    err = error_line(disk.run(main_argv(data, out, "--epochs", "2")))
    assert err == (
        f"error: --output_dir {out} holds another run (log.txt, best_checkpoint.pth; it reached epoch 0): continue "
        f"it with --resume {out / 'best_checkpoint.pth'}, or pass another --output_dir for a new run"
    )
    assert _snapshot(out) == before, "nothing written"

    # 1. Resuming at the last epoch leaves nothing to train: refused before the data and the model are built.
    assert main.cli(main_argv(data, out, "--epochs", "1", "--resume", str(out / "best_checkpoint.pth"))) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (
        f"error: --resume {out / 'best_checkpoint.pth'} holds epoch 0, the last of --epochs 1: nothing to train; "
        "raise --epochs above 1 to train on, or add --eval to only evaluate"
    )
    assert "Creating model" not in captured.out

    # 4. With space freed, the run goes on from the checkpoint the message named.
    disk.grow(2 * (n_params * 16 // PAGE))
    assert main.cli(main_argv(data, out, "--epochs", "2", "--resume", str(out / "best_checkpoint.pth"))) == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1]
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 1


def test_a_run_into_a_folder_holding_another_run_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.txt").write_text("".join(json.dumps({"epoch": e, "test_acc1": 50.0}) + "\n" for e in range(4)))
    torch.save({"model": {}, "optimizer": {}, "epoch": 3}, out / "checkpoint.pth")
    ckpt = out / "checkpoint.pth"
    assert main.cli(main_argv(data, out, "--epochs", "8")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out} holds another run (log.txt, checkpoint.pth; it reached epoch 3): continue it with "
        f"--resume {ckpt}, or pass another --output_dir for a new run"
    )
    # Resuming another run's checkpoint into it would mix the two runs the same way.
    other = tmp_path / "other.pth"
    torch.save({"model": {}, "optimizer": {}, "epoch": 1}, other)
    assert main.cli(main_argv(data, out, "--epochs", "8", "--resume", str(other))) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out} holds another run (log.txt, checkpoint.pth; it reached epoch 3), and --resume "
        f"{other} is not in it: pass another --output_dir, or --resume {ckpt} to continue the run there"
    )
    # A log without a checkpoint: nothing to resume.
    ckpt.unlink()
    assert main.cli(main_argv(data, out, "--epochs", "8")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --output_dir {out} holds another run (log.txt; it reached epoch 3) with no checkpoint to resume: "
        "delete its log.txt, or pass another --output_dir"
    )


def test_full_disk_under_tensorboard_is_one_error_line(data, small_disk):
    disk = small_disk(free_pages=1)  # args.yaml takes the page; the event file has none
    err = error_line(disk.run(main_argv(data, disk.root, "--epochs", "1")))
    (events,) = disk.root.glob("events.out.tfevents.*")
    assert err == (
        f"error: cannot write {events}: No space left on device; no checkpoint.pth was written yet: free disk "
        "space, then start the run again (no checkpoint was saved, so nothing can be resumed)"
    )
    assert not list(disk.root.glob(".*.tmp"))


def test_full_disk_at_args_yaml_keeps_the_previous_one(data, small_disk, monkeypatch, capsys):
    old = b"epochs: 1\n"
    disk = small_disk(free_pages=0, files={"args.yaml": old})
    disk.limit(monkeypatch)
    assert main.cli(main_argv(data, disk.root, "--epochs", "1")) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: cannot write {disk.root / 'args.yaml'}: No space left on device; the previous args.yaml is "
        "unchanged, no checkpoint.pth was written yet: free disk space, then start the run again (no checkpoint was "
        "saved, so nothing can be resumed)"
    )
    assert (disk.root / "args.yaml").read_bytes() == old
    assert sorted(p.name for p in disk.root.iterdir()) == ["args.yaml"], "no temporary file left"


def test_tensorboard_write_failing_mid_epoch_keeps_the_events_before(small_disk, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    disk = small_disk(free_pages=1)
    disk.limit(monkeypatch)
    tb = main.TensorBoardLogger(str(disk.root), every=1, steps_per_epoch=1000, output_dir=disk.root)
    path = tb.path
    with pytest.raises(main.UserError) as info:
        for step in range(1000):  # about 50 bytes a record: the 8 KiB write buffer fills, and its flush fails
            tb.step(step, {"loss": 1.0 / (step + 1), "lr": 1e-3})
    tb.close()
    assert str(info.value) == (
        f"cannot write {path}: No space left on device; the events written before are intact, no checkpoint.pth "
        "was written yet: free disk space, then start the run again (no checkpoint was saved, so nothing can be "
        "resumed)"
    )
    acc = EventAccumulator(str(disk.root))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps and steps == list(range(len(steps))), "the records that fit are readable"


# ----------------------------------------------------------------------------------------------------------------
# 5. Messages about checkpoints


def test_a_file_not_written_by_torch_save_is_named_so(data, tmp_path, capsys):
    pickled = tmp_path / "pickled.pth"  # torch.load warns about its pickle protocol before failing
    pickled.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}, "epoch": 3}))
    err = error_line(run_main(main_argv(data, tmp_path / "out", "--resume", str(pickled))))
    assert err == (
        f"error: {pickled} is not a readable checkpoint (UnpicklingError: Unsupported operand 149: not a file written "
        "by torch.save); it is read in place (not a download) and was left as it is: replace it with a complete copy"
    )
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(240, 256)) * 64)
    assert main.cli(main_argv(data, tmp_path / "out", "--resume", str(noise))) == 2
    assert (
        f"{noise} is not a readable checkpoint (UnpicklingError: Unsupported operand 240: not a file written by "
        "torch.save)" in capsys.readouterr().err
    )


def test_a_checkpoint_without_optimizer_state_says_training_starts_over(data, tmp_path, capsys):
    path = tmp_path / "weights.pth"
    torch.save({"model": {}, "epoch": 5}, path)
    assert (
        main.cli(main_argv(data, tmp_path / "out", "--epochs", "1", "--start_epoch", "1", "--resume", str(path))) == 2
    )
    warning, error = capsys.readouterr().err.strip().split("\n")
    assert warning == (
        f"warning: {path} has no optimizer state, so training does not resume: its weights are loaded, and training "
        "starts at epoch 1 (--start_epoch) with a fresh optimizer and learning-rate schedule"
    )
    assert error.startswith("error: --start_epoch 1 is not below --epochs 1")
