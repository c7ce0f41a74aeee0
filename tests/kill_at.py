"""Runs a Python script and SIGKILLs it at the n-th time it reaches a point of the save sequence of a run's files.

Usage: ``python tests/kill_at.py POINT N SCRIPT [ARGS...]`` (tests/test_crash_consistency.py), where POINT is

- ``<file>:partial``: half the data of the first write to ``<file>`` or to its temporary file is on disk;
- ``<file>:written``: the temporary file of ``<file>`` is complete and fsynced, not yet renamed over ``<file>``;
- ``<file>:replaced``: right after that rename;
- ``<file>:appended``: right after the fsync of a line appended to ``<file>`` itself (log.txt).

The points are reached through ``io.open``, ``os.replace`` and ``os.fsync``, patched in this process only (the
script is unchanged). SIGKILL, as ``kill -9`` or a lost node: no handler, ``finally`` block or buffered write runs.
"""

from __future__ import annotations

import io
import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any


class FileProxy:
    """A file object that forwards everything to the file it wraps (subclasses change ``write``)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def __enter__(self) -> FileProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def main(point: str, nth: int, script: str, script_args: list[str]) -> None:
    """Patches the file system calls to kill this process at the ``nth`` pass at ``point``, then runs ``script``."""
    target, _, step = point.partition(":")
    hits = [0]

    def is_target(path: Any, temporary_too: bool = True) -> bool:
        """Whether ``path`` (a path or a file descriptor) is the target file or (``temporary_too``) one of its
        temporary files, ``.<target>.<random>.tmp`` as ``utils.atomic_write`` names them."""
        name = os.path.basename(os.readlink(f"/proc/self/fd/{path}") if isinstance(path, int) else os.fspath(path))
        return name == target or (temporary_too and name.startswith(f".{target}.") and name.endswith(".tmp"))

    def reached() -> None:
        hits[0] += 1
        if hits[0] == nth:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    class HalfWrite(FileProxy):
        """A file whose first write puts half its data on disk, then reaches the point."""

        def __init__(self, f: Any) -> None:
            super().__init__(f)
            self._written = False

        def write(self, data: bytes) -> int:
            if self._written:
                return self._f.write(data)
            self._written = True
            half = len(data) // 2
            self._f.write(data[:half])
            self._f.flush()
            reached()
            return half + self._f.write(data[half:])

    real_open, real_replace, real_fsync = io.open, os.replace, os.fsync

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return HalfWrite(f) if step == "partial" and set(mode) & set("wax") and is_target(file) else f

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if step == "written" and Path(dst).name == target:
            reached()
        real_replace(src, dst, *args, **kwargs)
        if step == "replaced" and Path(dst).name == target:
            reached()

    def fsync(fd: Any) -> None:
        real_fsync(fd)
        if step == "appended" and is_target(fd if isinstance(fd, int) else fd.fileno(), temporary_too=False):
            reached()

    io.open, os.replace, os.fsync = open_, replace, fsync
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:])
