"""One training run per `train.out_dir`: an exclusive advisory lock held by rank 0 for the run.

Two runs on one directory destroy each other's work (the second's start-up removes the first's
in-flight save as a leftover of a crash). The lock is `flock` on `OUT/.lock`: the kernel releases it
when the holding process dies, however it dies (kill -9 included), so a stale lock file of a dead run
never blocks the next one; the file only records who holds it, for the error message. `flock` locks
belong to an open file, so a second run in the same process is refused too (what tests rely on).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path

from llamatron.errors import LlamatronError

LOCK_NAME = ".lock"


class RunLock:
    """The held lock of one run directory; `release()` (or exiting the process) frees it."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: removing it would let a third run lock a new file while a second one
            # waits on the old inode, two holders at once.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "a process that has not written its pid yet"


def acquire(out_dir: str | Path, log=print) -> RunLock:
    """Lock `out_dir` (created if missing) for this run, or fail with one line naming the holder."""
    out_dir = Path(out_dir)
    path = out_dir / LOCK_NAME
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LlamatronError(f"config key 'train.out_dir': {out_dir} cannot be written ({e.strerror or e}); "
                             "set train.out_dir to a writable directory") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise LlamatronError(f"train.out_dir {out_dir} is in use by another training run ({holder}; lock {path}); "
                             "wait for it to end, or set train.out_dir to another directory") from None
    except OSError as e:
        # A filesystem without flock (Lustre mounted without -o flock says ENOSYS): refusing to train
        # there would be worse than running unprotected, so warn and go on.
        os.close(fd)
        log(f"warning: train.out_dir {out_dir}: cannot lock {path} ({e.strerror or e}); a second run on this "
            "directory would not be prevented")
        return RunLock(path, None)
    info = f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    return RunLock(path, fd)


def check_free(out_dir: str | Path) -> None:
    """Fail now if another run holds `out_dir` (a launcher's check before it starts workers); holds nothing."""
    if (Path(out_dir) / LOCK_NAME).is_file():
        acquire(out_dir, log=lambda *_: None).release()
