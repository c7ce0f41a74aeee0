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
import itertools
import logging
import os
import shutil
import signal
import socket
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
# Metric logging


class SmoothedValue:
    """Tracks a series of values: a windowed median/average for progress lines and a global (weighted) average.

    Args:
        window_size: Number of recent values kept for ``median`` and ``avg``.
        fmt: ``str.format`` template over ``median, avg, global_avg, max, value``.
    """

    def __init__(self, window_size: int = 20, fmt: str | None = None) -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        """Adds ``value`` observed ``n`` times (e.g. a batch mean weighted by the batch size)."""
        self.deque.append(float(value))
        self.count += n
        self.total += float(value) * n

    def synchronize_between_processes(self) -> None:
        """Sums ``count`` and ``total`` over all ranks so that ``global_avg`` is the average over all samples.

        The window (``median``/``avg``) stays per rank: it only feeds progress lines.
        """
        if not is_dist_avail_and_initialized():
            return
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = float(t[1].item())

    @property
    def median(self) -> float:
        if not self.deque:
            return 0.0
        return float(torch.tensor(list(self.deque)).median().item())

    @property
    def avg(self) -> float:
        if not self.deque:
            return 0.0
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """A set of named ``SmoothedValue`` meters and a ``log_every`` iterator logging progress lines with an ETA.

    Args:
        delimiter: Separator between meters in progress lines.
    """

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: defaultdict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float | torch.Tensor) -> None:
        """Updates meters by name; tensors are converted with ``.item()``; ``n`` weights the values."""
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v), n=n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        """Registers a meter up front (so that every rank holds the same meters even with no batch)."""
        self.meters[name] = meter

    def __getattr__(self, attr: str) -> SmoothedValue:
        meters = self.__dict__.get("meters", {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        """Synchronizes all meters in a fixed (sorted) order, identical on every rank."""
        for name in sorted(self.meters):
            self.meters[name].synchronize_between_processes()

    def log_every(self, iterable: Iterable[T], print_freq: int, header: str = "") -> Iterator[T]:
        """Yields from ``iterable`` and logs a progress line every ``print_freq`` steps and at the last one.

        Lines show the step, the ETA of the loop, the meters, the time per step and the data-loading time.
        """
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = 0
        width = len(str(total))
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        print_freq = max(int(print_freq), 1)
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * max(total - i - 1, 0)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self), f"time: {iter_time}"]
                parts.append(f"data: {data_time}")
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                _logger.info(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total_time = datetime.timedelta(seconds=int(time.time() - start))
        _logger.info(f"{header} Total time: {total_time} ({(time.time() - start) / max(total, 1):.4f} s / it)")


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
    """Reads (rank, world_size, local_rank) from the launcher's environment, or None when not launched.

    ``torch.distributed.launch --use_env`` and ``torchrun`` set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; SLURM sets
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def launch_rank() -> int:
    """This process's global rank as the launcher set it (0 when not launched): known before the process group."""
    found = distributed_env()
    return found[0] if found is not None else 0


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Initializes the process group when launched by a distributed launcher; sets ``args.distributed`` and ranks.

    Uses NCCL when ``args.device`` is CUDA and Gloo otherwise. Under SLURM without ``MASTER_ADDR`` the caller
    must give ``--dist_url`` (``run_with_submitit.py`` passes a shared file).
    """
    found = distributed_env()
    if found is None:
        _logger.info("Not using distributed mode")
        args.distributed = False
        args.rank, args.world_size, args.gpu = 0, 1, 0
        return
    args.rank, args.world_size, args.gpu = found
    if args.world_size <= 1:
        args.distributed = False
        return
    args.distributed = True
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


# Test hook: the crash-consistency tests (tests/test_crash_consistency.py) set IRPE_TEST_KILL_AT to make a run kill
# itself inside the save sequence. Unset (always, outside those tests) it costs one dictionary lookup per point.
KILL_AT_ENV = "IRPE_TEST_KILL_AT"
_kill_point_hits: defaultdict[str, int] = defaultdict(int)


def kill_point(name: str) -> None:
    """Test hook: SIGKILLs this process at the save-sequence point ``name`` when ``IRPE_TEST_KILL_AT`` asks for it.

    ``IRPE_TEST_KILL_AT=<point>`` kills at the first time the point is reached, ``<point>#<n>`` at the n-th (e.g.
    ``checkpoint.pth:written#2``: the second epoch's checkpoint, fully written but not yet renamed). The points are
    ``<file>:partial`` (part of the temporary file or of the log line written), ``<file>:written`` (temporary file
    complete and fsynced, not renamed) and ``<file>:replaced`` (renamed over ``<file>``; ``log.txt:appended`` for the
    log), for ``<file>`` in ``best_checkpoint.pth``, ``log.txt`` and ``checkpoint.pth``. SIGKILL, as ``kill -9`` or a
    lost node: no handler, ``finally`` block or buffered write runs.
    """
    spec = os.environ.get(KILL_AT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition("#")
    if point != name:
        return
    _kill_point_hits[name] += 1
    if _kill_point_hits[name] == int(nth or 1):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def temp_file_pattern(name: str) -> str:
    """The glob of the temporary files :func:`atomic_write` makes for a file called ``name`` (``.<name>.*.tmp``)."""
    return f".{name}.*.tmp"


def remove_stale_temp_files(directory: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Deletes the temporary files a killed :func:`atomic_write` of one of ``names`` left in ``directory``.

    Returns:
        The files removed.
    """
    removed = []
    for name in names:
        for tmp in Path(directory).glob(temp_file_pattern(name)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Makes a rename in ``directory`` durable (best effort: some file systems refuse to fsync a directory)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


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
        kill_point(f"{path.name}:written")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    kill_point(f"{path.name}:replaced")


class _WriteErrorRecorder:
    """Forwards ``write`` to a binary file and keeps the first ``OSError`` it raised.

    ``torch.save`` turns a failed write (e.g. ``ENOSPC``) into ``RuntimeError: ... unexpected pos ...``, which hides
    the cause; :func:`atomic_torch_save` re-raises the recorded ``OSError`` instead.
    """

    def __init__(self, f: IO[bytes], name: str) -> None:
        self.f = f
        self.name = name
        self.error: OSError | None = None
        self.writes = 0

    def write(self, data: bytes) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise
        self.writes += 1
        if self.writes == 1 and os.environ.get(KILL_AT_ENV):  # test hook: a kill with the file partly written
            self.f.flush()
            kill_point(f"{self.name}:partial")
        return n

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
        recorder = _WriteErrorRecorder(f, path.name)
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


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copies ``src`` to ``dst`` atomically, as :func:`atomic_write`."""
    with open(src, "rb") as source:
        atomic_write(dst, lambda f: shutil.copyfileobj(source, f, 1 << 20))


def append_line(path: str | os.PathLike[str], line: str) -> None:
    """Appends ``line`` and a newline to the text file ``path``, flushed and fsynced.

    A kill can leave part of the line (no newline at the end); readers such as ``main.reconcile_outputs`` drop it.
    """
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    with path.open("ab") as f:
        f.write(data[: len(data) // 2])
        if os.environ.get(KILL_AT_ENV):  # test hook: a kill with half the line written
            f.flush()
            kill_point(f"{path.name}:partial")
        f.write(data[len(data) // 2 :])
        f.flush()
        os.fsync(f.fileno())
    kill_point(f"{path.name}:appended")


_event_file_ids = itertools.count()


class ScalarEventFile:
    """A TensorBoard event file of scalars, written by the calling thread.

    ``torch.utils.tensorboard.SummaryWriter`` writes from a thread of its own: a failed write (a full disk) prints
    that thread's traceback, then fails again in the training loop. Here every write and flush happens in the
    caller, so an ``OSError`` reaches it, and the records written before stay readable. The file is named and laid
    out as ``SummaryWriter``'s (TFRecord framing from ``tensorboard``, summaries from ``torch.utils.tensorboard``);
    records are buffered and flushed by :meth:`flush` or at the first record ``flush_secs`` after the last flush.

    Args:
        log_dir: Folder of the event file (created if missing).
        flush_secs: Longest time a record stays in memory, as ``SummaryWriter``'s ``flush_secs``.

    Raises:
        OSError: the folder or the file cannot be created or written (also from :meth:`add_scalar` and :meth:`flush`).
    """

    def __init__(self, log_dir: str | os.PathLike[str], flush_secs: float = 120.0) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
        from torch.utils.tensorboard.summary import scalar

        self._event, self._scalar = Event, scalar
        self.flush_secs = flush_secs
        stamp = f"{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_event_file_ids)}"
        self.path = Path(log_dir) / f"events.out.tfevents.{stamp}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("xb")
        self._records = RecordWriter(self._file)
        try:
            self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
            self.flush()
        except OSError as e:
            self.close_quietly()
            e.filename = e.filename or str(self.path)  # a failed flush names no file
            raise

    def _write(self, event: Any) -> None:
        self._records.write(event.SerializeToString())

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Adds one scalar record (``SummaryWriter.add_scalar``'s layout)."""
        self._write(self._event(wall_time=time.time(), step=int(step), summary=self._scalar(tag, value)))
        if time.monotonic() - self._last_flush >= self.flush_secs:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered records to the file."""
        self._last_flush = time.monotonic()
        self._file.flush()

    def close_quietly(self) -> None:
        """Closes the file, dropping what cannot be written: after a failed write, which was reported then."""
        with contextlib.suppress(OSError):
            self._file.close()


# ----------------------------------------------------------------------------------------------------------------
# Logging


class _StandardStreamHandler(logging.StreamHandler):
    """A ``StreamHandler`` on ``sys.stdout`` or ``sys.stderr`` as they are at each record, not as they were at set-up.

    So output follows a later redirection (pytest's ``capsys``, ``contextlib.redirect_stdout``) like ``print`` does.
    """

    def __init__(self, name: str) -> None:
        self._stream_name = name
        super().__init__()

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value: IO[str]) -> None:  # StreamHandler.__init__ assigns it; the property decides
        pass


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
        rank: global rank of this process (default: :func:`launch_rank`, read from the launcher's environment).
    """
    rank = launch_rank() if rank is None else rank
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StandardStreamHandler)]:
        root.removeHandler(handler)
    stdout = _StandardStreamHandler("stdout")
    stdout.addFilter(lambda record: record.levelno < logging.WARNING)
    stdout.setFormatter(logging.Formatter("%(message)s"))
    stderr = _StandardStreamHandler("stderr")
    stderr.setLevel(logging.WARNING)
    stderr.setFormatter(_LevelFormatter("%(message)s"))
    root.addHandler(stdout)
    root.addHandler(stderr)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def eprint(message: str) -> None:
    """Prints ``message`` to stderr on every rank, whatever the log level: the ``error:`` lines of the scripts."""
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()
