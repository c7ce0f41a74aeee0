"""Training utilities: logging, metric logging with ETA, distributed set-up, atomic writes and user-facing errors.

The layout follows DeiT's ``utils.py`` (a ``MetricLogger`` of ``SmoothedValue`` meters, ``init_distributed_mode``),
rewritten to run the same on CPU (Gloo) and GPU (NCCL) and to write checkpoints atomically. Output goes through the
``logging`` module, as in timm (a module-level ``_logger`` per module); :func:`setup_logging` sends INFO to stdout on
rank 0 only, where DeiT replaced ``builtins.print`` on the other ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_logger = logging.getLogger(__name__)


class UserError(Exception):
    """An error the user can fix (bad flag, missing data, wrong checkpoint).

    ``main`` catches it, prints ``error: <message>`` to stderr and exits with code 2 instead of a traceback.
    The constructor takes a single message so that DataLoader workers can re-raise it in the main process.
    """


class TrainingError(Exception):
    """A run that cannot go on (e.g. a non-finite loss); ``main`` prints it and exits with code 1."""


def user_message(exc: BaseException) -> str:
    """Returns the one-line message of ``exc``, unwrapping the traceback text DataLoader workers add.

    A ``UserError`` raised in a DataLoader worker is re-raised in the main process with a message that holds the
    worker's whole traceback; its last line (``module.UserError: <message>``) is what the user needs.
    """
    text = str(exc).strip()
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        if ": " in last:
            return last.split(": ", 1)[1]
        return last
    return text


# ----------------------------------------------------------------------------------------------------------------
# Metric logging (DeiT's SmoothedValue and MetricLogger)


class SmoothedValue:
    """A series of values: a windowed median/average for progress lines and a global (weighted) average.

    Args:
        window_size: Number of recent values kept for ``median`` and ``avg``.
        fmt: ``str.format`` template over ``median, avg, global_avg, max, value``.
    """

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        """Adds ``value`` observed ``n`` times (e.g. a batch mean weighted by the batch size)."""
        self.deque.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sums ``count`` and ``total`` over the ranks (``global_avg`` over all samples); the window stays per rank."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor(
            [self.count, self.total], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu"
        )
        dist.barrier()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    def __str__(self) -> str:
        last, top = (self.deque[-1], max(self.deque)) if self.deque else (0.0, 0.0)
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=top, value=last)


class MetricLogger:
    """Named ``SmoothedValue`` meters and a ``log_every`` iterator that logs progress lines with an ETA."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float) -> None:
        """Updates meters by name; ``n`` weights the values."""
        for k, v in kwargs.items():
            self.meters[k].update(float(v), n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Registers a meter up front (so that every rank holds the same meters even with no batch)."""
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Synchronizes all meters in a fixed (sorted) order, identical on every rank."""
        for name in sorted(self.meters):
            self.meters[name].synchronize_between_processes()

    def log_every(self, iterable: Iterable[T], print_freq: int, header: str = "") -> Iterator[T]:
        """Yields from ``iterable``; logs the step, ETA, meters, step and data time every ``print_freq`` steps."""
        total = len(iterable)  # type: ignore[arg-type]
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{len(str(total))}}/{total}]", f"eta: {eta}", str(self)]
                parts += [f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                _logger.info(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = time.time() - start
        _logger.info(
            f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
            f"({total_time / max(total, 1):.4f} s / it)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Distributed


def is_dist_avail_and_initialized() -> bool:
    """Whether ``torch.distributed`` is usable and a process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    """Whether this process writes files and logs progress."""
    return get_rank() == 0


def distributed_env() -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) from the launcher's environment, or None when not launched.

    ``torch.distributed.launch --use_env`` and ``torchrun`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; SLURM sets
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Initializes the process group when launched by a distributed launcher; sets ``args.distributed`` and ranks.

    Uses NCCL when ``args.device`` is CUDA and Gloo otherwise. Under SLURM without ``MASTER_ADDR`` the caller
    must give ``--dist_url`` (``run_with_submitit.py`` passes a shared file).
    """
    args.rank, args.world_size, args.gpu = distributed_env() or (0, 1, 0)
    args.distributed = args.world_size > 1
    if not args.distributed:
        _logger.info("Not using distributed mode")
        return
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    if args.dist_url == "env://" and "MASTER_ADDR" not in os.environ:
        raise UserError("distributed launch without MASTER_ADDR/MASTER_PORT: set them or pass --dist_url")
    _logger.info(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {args.dist_url}")
    dist.init_process_group(backend=backend, init_method=args.dist_url, world_size=args.world_size, rank=args.rank)
    dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: plain data and atomic writes


def to_plain(obj: Any) -> Any:
    """Converts ``obj`` to plain Python data (dict/list/str/int/float/bool/None) for safe serialization.

    Paths become strings, tuples and sets become lists, anything else unknown becomes its ``str``.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    return str(obj)


def remove_stale_temp_files(directory: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Deletes the temporary files ``.<name>.*.tmp`` a killed :func:`atomic_write` of one of ``names`` left.

    Returns:
        The files removed.
    """
    removed = [tmp for name in names for tmp in Path(directory).glob(f".{name}.*.tmp")]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (best effort: some file systems refuse to fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` through ``write(file)`` so that ``path`` holds either the old or the complete new content.

    ``write`` fills a temporary file ``.<name>.<random>.tmp`` in the same directory, which is flushed, fsynced and
    ``os.replace``d over ``path`` (atomic on POSIX and Windows). An error removes the temporary file and leaves the
    previous ``path`` intact; a kill leaves the temporary file, which :func:`remove_stale_temp_files` deletes.

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``, disk full); ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


class _WriteErrorRecorder:
    """Forwards ``write`` to a binary file and keeps the first ``OSError`` it raised.

    ``torch.save`` turns a failed write (e.g. ``ENOSPC``) into ``RuntimeError: ... unexpected pos ...``, which hides
    the cause; :func:`atomic_torch_save` re-raises the recorded ``OSError`` instead.
    """

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Saves ``obj`` with ``torch.save`` so that ``path`` holds either the old or the complete new file.

    See :func:`atomic_write` (temporary file, fsync, rename).

    Raises:
        OSError: the write failed (e.g. ``ENOSPC``, not torch's ``unexpected pos`` error); ``path`` is unchanged.
    """
    path = Path(path)

    def write(f: IO[bytes]) -> None:
        recorder = _WriteErrorRecorder(f)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise recorder.error from None
            raise

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replaces the text file ``path`` atomically with ``text`` (UTF-8), as :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Appends ``line`` and a newline to the text file ``path``, flushed and fsynced.

    A kill can leave part of the line (no newline at the end); readers such as ``main.reconcile_outputs`` drop it.
    """
    with Path(path).open("ab") as f:
        f.write((line.rstrip("\n") + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# Logging


class _StandardStreamHandler(logging.StreamHandler):
    """A ``StreamHandler`` on ``sys.<name>`` as it is at each record, so output follows a later redirection (pytest's
    ``capsys``, ``contextlib.redirect_stdout``) as ``print`` does."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = getattr(sys, self.name)
        super().emit(record)


class _LevelFormatter(logging.Formatter):
    """``warning: <message>`` (the level in lower case), as the ``error:`` lines of :func:`eprint` read."""

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {super().format(record)}"


def setup_logging(rank: int | None = None) -> None:
    """Configures the root logger: INFO and above on rank 0, WARNING and above on the other ranks.

    INFO lines go to stdout as bare messages (progress lines, the ``* Acc@1`` summary that scripts parse); warnings
    and errors to stderr as ``warning: <message>``. timm's ``setup_default_logging`` would send everything to stderr.
    Calling it again (runs of ``main.cli`` in one process) replaces the handlers it installed before.

    Args:
        rank: global rank of this process (default: the launcher's, from :func:`distributed_env`).
    """
    rank = (distributed_env() or (0,))[0] if rank is None else rank
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StandardStreamHandler)]:
        root.removeHandler(handler)
    stdout, stderr = _StandardStreamHandler(), _StandardStreamHandler()
    stdout.name, stderr.name = "stdout", "stderr"
    stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(_LevelFormatter("%(message)s"))
    root.addHandler(stdout)
    root.addHandler(stderr)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def eprint(message: str) -> None:
    """Prints ``message`` to stderr on every rank, whatever the log level: the ``error:`` lines of the scripts."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
