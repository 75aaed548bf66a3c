"""The run folder: refused when it cannot hold a new run, locked for the run's life.

Two processes given the same ``--out`` used to both pass the emptiness check and mix
their files. Now a run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` from before
its first file to its end; a second process is refused at once, naming the holder's
pid. The kernel releases the lock when the holder dies, so a SIGKILLed run can be
resumed without clearing anything by hand. The lock file itself is left in place:
deleting it would let a third process lock a new file while the second holds the old.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from fedtune.errors import FedtuneError

LOCK_NAME = ".lock"
RUN_DIR_MODE = 0o700
"""A run folder holds the adapter, the data's statistics and perhaps a secrets file:
its owner's alone, under any umask."""


class RunDirLock:
    """An exclusive lock on a run folder, held until :meth:`release` (or the process
    ends). A context manager."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


def is_busy(run_dir: Path) -> bool:
    """Whether another open lock holds ``run_dir`` (this process's own counts too)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def _busy_error(run_dir: Path) -> FedtuneError:
    return FedtuneError(
        f"{run_dir} is in use by another fedtune process{_holder(run_dir / LOCK_NAME)}: "
        "wait for it to end or choose another --out"
    )


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse, before anything runs or is written, a folder that cannot hold a new run:
    a file, a folder in use, a finished run, any other content."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FedtuneError(f"{run_dir} is a file, not a run folder: choose another --out")
    if not run_dir.exists():
        return
    if is_busy(run_dir):
        raise _busy_error(run_dir)
    if (run_dir / "summary.json").exists():
        raise FedtuneError(f"{run_dir} already holds a finished run: choose another --out")
    if any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        raise FedtuneError(f"{run_dir} is not empty: choose another --out")


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``--resume`` folder that is not a folder or is in use."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "a file" if run_dir.exists() else "missing"
        raise FedtuneError(f"{run_dir} is {what}, not a run folder to resume")
    if is_busy(run_dir):
        raise _busy_error(run_dir)


def lock_run_dir(run_dir: Path, new: bool) -> RunDirLock:
    """Take the run folder's lock, or raise at once if another process holds it.

    ``new``: create the folder (mode 0700) and, once locked, check again that it is
    empty — the check before the lock can race with another process's start.
    Otherwise (a resume) the folder must exist and hold no finished run.
    """
    run_dir = Path(run_dir)
    if new:
        check_new_run_dir(run_dir)
        run_dir.mkdir(mode=RUN_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(run_dir, RUN_DIR_MODE)  # mkdir's mode is masked by the umask
    else:
        check_run_dir(run_dir)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)  # not inheritable
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy_error(run_dir) from None
    lock = RunDirLock(run_dir, fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if (run_dir / "summary.json").exists():
            raise FedtuneError(f"{run_dir} holds a finished run: choose another --out")
        if new and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
            raise FedtuneError(f"{run_dir} is not empty: choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock
