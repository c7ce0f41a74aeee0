"""How CPU training degrades when the cores are shared: one epoch of the demo recipe, alone and beside busy processes.

Runs ``main.py --config configs/demo_cpu.yaml --epochs 1`` (DeiT's augmentation, DataLoader workers, 48 px) on a
generated dataset, once per setting and number of competing processes (each a Python busy loop, as another job on
the same cores would be), and prints the epoch's training time as ``main.py`` reports it. A setting is a set of
environment variables given to ``main.py`` (``default`` gives none, so ``main.py`` chooses).

Example::

    python tools/benchmark_cpu_sharing.py --busy 0 2 --settings default OMP_NUM_THREADS=1 OMP_WAIT_POLICY=ACTIVE
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _bench as bench  # first: it puts the repository root on sys.path
from make_synthetic_dataset import make_dataset

EPOCH_TIME = re.compile(r"^Epoch: \[0\] Total time: (\d+):(\d\d):(\d\d) \(([\d.]+) s / it\)", re.MULTILINE)
STEPS = re.compile(r"^Epoch: \[0\]\s+\[\s*\d+/(\d+)\]", re.MULTILINE)
BUSY_LOOP = "while True: pass"


def parse_setting(text: str) -> dict[str, str]:
    """``default`` -> {}; ``A=1,B=2`` -> {'A': '1', 'B': '2'}."""
    if text == "default":
        return {}
    pairs = [p.split("=", 1) for p in text.split(",")]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"error: setting {text!r} is not 'default' or NAME=VALUE[,NAME=VALUE]")
    return dict(pairs)


def epoch_seconds(data: Path, out: Path, env: dict[str, str], busy: int, timeout: float) -> float:
    """Training seconds of epoch 0 (``main.py``'s own ``Total time`` line: steps x seconds per step)."""
    hogs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(busy)]
    try:
        time.sleep(0.5 if busy else 0)
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        cmd = [sys.executable, "main.py", "--config", "configs/demo_cpu.yaml", "--epochs", "1", "--device", "cpu",
               "--data-path", str(data), "--output_dir", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=bench.ROOT, env={**base, **env}, capture_output=True, text=True, timeout=timeout)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    if proc.returncode != 0:
        raise SystemExit(f"error: main.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    m = EPOCH_TIME.search(proc.stdout)
    if m is None:
        raise SystemExit("error: no 'Epoch: [0] Total time' line in main.py's output")
    steps = STEPS.search(proc.stdout)
    if steps is None:
        raise SystemExit("error: no progress line of epoch 0 in main.py's output")
    return float(m.group(4)) * int(steps.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, nargs="+", default=[0, 2], help="numbers of competing busy processes")
    parser.add_argument("--settings", nargs="+", default=["default", "OMP_NUM_THREADS=1", "OMP_WAIT_POLICY=ACTIVE"])
    parser.add_argument("--train-per-class", type=int, default=60, help="images per class (10 classes)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, num_classes=10, train_per_class=args.train_per_class, val_per_class=2, image_size=56)
        rows = []
        for setting in args.settings:
            for busy in args.busy:
                out = Path(tmp) / f"run_{len(rows)}"
                seconds = epoch_seconds(data, out, parse_setting(setting), busy, args.timeout)
                rows.append((setting, busy, seconds))
                print(f"{setting:32s} busy={busy}: {seconds:7.1f} s", flush=True)
    print(f"\n{os.cpu_count()} CPUs; epoch 0 of configs/demo_cpu.yaml ({args.train_per_class * 10} images)")
    cells = [[setting] + [f"{s:.1f} s" for st, b, s in rows if st == setting] for setting in args.settings]
    print(bench.markdown_table(["setting", *(f"{b} busy" for b in args.busy)], cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
