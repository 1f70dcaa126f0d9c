"""One process per run directory: an exclusive lock held for the run's lifetime.

The lock is `<run dir>/.lock`, holding the owner's pid, and an OS advisory lock (flock) on that file. The OS
drops the flock when its process dies however it dies, so a lock file left by a killed run (its pid gone) is
stale and simply taken over; a live owner is named in the error the second process gets.
"""
from __future__ import annotations

import os
from pathlib import Path

from cilbench.errors import UserError

try:
    import fcntl
except ImportError:            # Windows: fall back to the pid in the file alone
    fcntl = None

LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # exists, owned by someone else
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "x")
    except (OSError, ValueError):
        return None


class RunLock:
    """`with RunLock(run_dir):` the directory (created if needed) belongs to this process until exit.
    Folders the lock had to create are removed again on release if the run left nothing in them."""

    def __init__(self, run_dir: Path, stop_at: Path | None = None):
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.stop_at = Path(stop_at) if stop_at is not None else None
        self.fd: int | None = None
        self.created: list[Path] = []

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, pid: int | None) -> UserError:
        who = f"process {pid}" if pid else "another process"
        return UserError(f"run directory {self.dir} is in use by {who} (lock {self.path}); wait for it to "
                         "finish or stop it, or pick another --tag/--seed")

    def acquire(self) -> None:
        missing = [p for p in [self.dir, *self.dir.parents] if not p.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.created = [p for p in missing if self.stop_at is None or p != self.stop_at]
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    self._cleanup_created()
                    raise self._busy(_read_pid(self.path)) from None
            else:
                pid = _read_pid(self.path)
                if pid and pid != os.getpid() and _pid_alive(pid):
                    os.close(fd)
                    raise self._busy(pid)
            # the owner before us may have unlinked the file between our open and our flock: then we hold a
            # lock on a file nobody else can see; open the current one again
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()     # unlink while still holding the flock, so no one locks a dead file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._cleanup_created()

    def _cleanup_created(self) -> None:
        """Remove the folders this lock created, innermost first, as long as they are empty (a run refused
        for bad input leaves no empty run directory behind)."""
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:
                break
        self.created = []
