"""A run folder belongs to one writer: ``<folder>/.lock`` holds the writer's pid under an flock.

The kernel drops an flock when its process dies (even by ``kill -9``), so a lock file whose lock can
be taken is stale by construction; its recorded pid is reported and the file is reused. A second
writer gets a one-line :class:`RunFolderBusy` naming the pid that holds the folder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from types import TracebackType

from mag.errors import MagError

__all__ = ["LOCK_NAME", "RunFolderBusy", "RunLock"]

LOCK_NAME = ".lock"


class RunFolderBusy(MagError):
    """Another live process is writing into this run folder."""


class RunLock:
    """Exclusive ownership of a folder while held; ``stale`` names a dead previous holder, if
    any."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise RunFolderBusy(f"run folder {self.folder} is in use by process {holder or '?'}"
                                    f" (lock file {self.path}); wait for it to finish or choose "
                                    "another"
                                    " output folder") from None
            # The holder we waited on may have unlinked the file: lock the file that is there now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        self.stale = previous or None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __del__(self) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read(fd: int) -> str:
    """The ``pid host`` line a holder wrote (empty if none)."""
    return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
