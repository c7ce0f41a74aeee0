"""Plots training curves from one or more ``log.txt`` files (JSON lines written by ``main.py``) into one PNG.

Four panels, one line per run: train loss, learning rate, test top-1 and test top-5 accuracy, against the epoch.

Example::

    python tools/plot_logs.py outputs/run1/log.txt outputs/run2/log.txt --labels baseline irpe --out curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PANELS: tuple[tuple[str, str], ...] = (
    ("train_loss", "train loss"),
    ("train_lr", "learning rate"),
    ("test_acc1", "test top-1 (%)"),
    ("test_acc5", "test top-5 (%)"),
)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Reads the JSON lines of a ``log.txt``; a resumed run's repeated epochs keep their last entry.

    Raises:
        ValueError: when the file holds a line that is not JSON, or no entry with an ``epoch``.
    """
    by_epoch: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        if isinstance(entry, dict) and "epoch" in entry:
            by_epoch[int(entry["epoch"])] = entry
    if not by_epoch:
        raise ValueError(f"{path}: no log entries with an 'epoch'")
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_logs(logs: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    """Draws the curves of every log on one figure and saves it as ``out`` (PNG).

    Args:
        logs: ``log.txt`` files.
        out: Output image path.
        labels: One legend label per log (default: the log's parent folder name).

    Raises:
        ValueError: bad logs or a label count that does not match.
        ImportError: matplotlib is not installed (with the install command in the message).
    """
    if labels is not None and len(labels) != len(logs):
        raise ValueError(f"got {len(labels)} labels for {len(logs)} logs")
    runs = [read_log(p) for p in logs]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_logs needs matplotlib: pip install matplotlib (or `make setup`)") from e

    names = labels or [Path(p).resolve().parent.name for p in logs]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, entries in zip(names, runs):
            points = [(e["epoch"], e[key]) for e in entries if isinstance(e.get(key), (int, float))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if key == "train_lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.flat[0].legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", nargs="+", help="log.txt files")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--labels", nargs="+", default=None, help="one legend label per log")
    args = parser.parse_args(argv)
    try:
        out = plot_logs(args.logs, args.out, args.labels)
    except (ValueError, ImportError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
