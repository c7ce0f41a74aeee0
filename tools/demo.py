"""``make demo``: generate a small dataset, train an iRPE DeiT-Tiny on it, evaluate, plot; all in a few minutes.

Steps (each a real command line, shown as it runs):

1. ``tools/make_synthetic_dataset.py``: 10 learnable classes of real JPEG files in the ImageNet layout, plus
   ``train.tar`` / ``val.tar``, under ``outputs/demo/data``.
2. ``main.py --config configs/demo_cpu.yaml``: trains ``deit_tiny_patch16_224_ctx_product_50_shared_k`` from the
   image folders (GPU if one is visible, else CPU), writing ``log.txt``, checkpoints, ``args.yaml`` and
   TensorBoard events to ``outputs/demo``.
3. ``main.py --eval --resume outputs/demo/checkpoint.pth --load-tar``: evaluates the checkpoint, reading the
   validation images from ``val.tar`` this time.
4. ``tools/plot_logs.py``: ``outputs/demo/curves.png``.

Exits non-zero if a step fails or the final top-1 accuracy is below ``--min-acc``.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^\* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+) loss (\d+\.\d+)$")
RUN_FILES = ("log.txt", "args.yaml", "checkpoint.pth", "best_checkpoint.pth", "curves.png")


def default_device() -> str:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run(cmd: list[str], title: str) -> list[str]:
    """Runs ``cmd`` in the repository, echoing its output line by line as it comes; returns the lines.

    Raises:
        SystemExit: with the command's exit code when it fails.
    """
    print(f"\n=== {title}\n$ {shlex.join(cmd)}", flush=True)  # quoted: copy-pasteable
    lines = []
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout or ():
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    if proc.returncode != 0:
        print(f"demo: step '{title}' failed with exit code {proc.returncode}", file=sys.stderr)
        raise SystemExit(proc.returncode or 1)
    return lines


def clean_previous_run(out: Path) -> None:
    """Removes the files of an earlier demo run (log.txt is appended to, so it must start empty)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for f in out.glob("events.out.tfevents.*"):
        f.unlink()
    shutil.rmtree(out / "data", ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (relative to the repository)")
    parser.add_argument("--config", default="configs/demo_cpu.yaml", help="training recipe")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if visible)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--val-per-class", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=56, help="generated image side (input is 48)")
    parser.add_argument("--min-acc", type=float, default=50.0, help="fail below this final top-1 (%%)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.time()
    py = sys.executable
    out = (REPO / args.out).resolve()
    data = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    clean_previous_run(out)
    device = args.device or default_device()
    timings: dict[str, float] = {}

    t = time.time()
    run([py, "tools/make_synthetic_dataset.py", "--out", str(data), "--num-classes", "10",
         "--train-per-class", str(args.train_per_class), "--val-per-class", str(args.val_per_class),
         "--image-size", str(args.image_size), "--tar", "--seed", "0"], "1/4 synthetic dataset")  # fmt: skip
    timings["data"] = time.time() - t

    t = time.time()
    train_cmd = [py, "main.py", "--config", args.config, "--data-path", str(data), "--output_dir", str(out),
                 "--device", device]  # fmt: skip
    if args.epochs is not None:
        train_cmd += ["--epochs", str(args.epochs)]
    run(train_cmd, f"2/4 training on {device}")
    timings["train"] = time.time() - t

    t = time.time()
    eval_lines = run([py, "main.py", "--config", args.config, "--data-path", str(data), "--load-tar", "--eval",
                      "--resume", str(out / "checkpoint.pth"), "--device", device],
                     "3/4 evaluation of checkpoint.pth (images read from val.tar)")  # fmt: skip
    timings["eval"] = time.time() - t
    found = [m for m in map(SUMMARY.match, eval_lines) if m]
    if not found:
        print("demo: no '* Acc@1 ...' line in the evaluation output", file=sys.stderr)
        return 1
    top1, top5 = float(found[-1].group(1)), float(found[-1].group(2))

    t = time.time()
    run([py, "tools/plot_logs.py", str(out / "log.txt"), "--out", str(out / "curves.png"), "--labels",
         "deit_tiny ctx_product_50_shared_k"], "4/4 curves")  # fmt: skip
    timings["plot"] = time.time() - t

    total = time.time() - start
    rel = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    print("\n=== demo done")
    print(f"top-1 {top1:.2f}%  top-5 {top5:.2f}%  on {args.val_per_class * 10} validation images")
    print(f"time {total:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + f") on {device}")
    print(f"results in {rel}/: log.txt, args.yaml, checkpoint.pth, best_checkpoint.pth, curves.png, TensorBoard events")
    print(f"TensorBoard: {Path(py).parent / 'tensorboard'} --logdir {rel}  (then open http://localhost:6006)")
    if top1 < args.min_acc:
        print(f"demo: top-1 {top1:.2f}% is below the {args.min_acc:.0f}% target", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
