"""One process per run directory: an exclusive lock held for the run's lifetime, and who holds it.

The lock is `<run dir>/.lock`, an OS advisory lock (flock) on that file, which records the owner: its pid,
host and (under Slurm) job id. The OS drops the flock when its process dies however it dies, so a lock file
left by a killed run is stale and simply taken over; a live owner is named in the error the second process
gets. Liveness is judged by the flock, never by the pid alone (a pid is reused after a reboot, and means
nothing on another host): see `lock_owner`, which `cilbench sweep` asks.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cilbench.errors import UserError
from cilbench.safeio import open_for_update, read_bounded

try:
    import fcntl
except ImportError:            # Windows: fall back to the pid in the file alone
    fcntl = None

LOCK_NAME = ".lock"


@dataclass(frozen=True)
class Owner:
    """Who wrote a run's lock file. alive: True while the lock is held; False when it is not held (the owner
    died, or the pid was reused by another process); None when this machine cannot tell: the owner was on
    another host and the lock is not visibly held here (a cluster file system may not share flocks between
    hosts), so ask the scheduler about `slurm_job`."""
    host: str | None
    pid: int | None
    slurm_job: str | None
    alive: bool | None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # exists, owned by someone else
        return True
    return True


def _record() -> str:
    """The lock file's text: the pid on the first line (what older cilbench wrote), then key=value lines."""
    lines = [str(os.getpid()), f"host={socket.gethostname()}"]
    if os.environ.get("SLURM_JOB_ID"):
        lines.append(f"slurm_job={os.environ['SLURM_JOB_ID']}")
    return "\n".join(lines) + "\n"


def _parse(text: str) -> tuple[int | None, dict]:
    first, *rest = text.splitlines() or [""]
    try:
        pid = int(first.strip())
    except ValueError:
        pid = None
    fields = dict(line.split("=", 1) for line in rest if "=" in line)
    return pid, fields


def _read(path: Path) -> tuple[int | None, dict]:
    try:
        return _parse(read_bounded(path, 4096, "a lock file").decode("utf-8", errors="replace"))
    except UserError:
        return None, {}


def _held(path: Path) -> bool | None:
    """Whether some process holds the flock on `path`: try it without waiting and let go at once. None when
    the file system does not do flock (or there is no fcntl)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:            # ENOLCK, EOPNOTSUPP: a file system without flock
        return None
    finally:
        os.close(fd)           # closing drops a lock we took
    return False


def lock_owner(run_dir: str | Path) -> Owner | None:
    """The owner recorded in `run_dir`'s lock file, and whether it is alive; None when there is no lock file
    (no process has the run, or it ended and released it)."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file() or path.is_symlink():
        return None
    pid, fields = _read(path)
    host = fields.get("host")
    local = host is None or host == socket.gethostname()
    held = _held(path)
    if held is None and local and pid:
        alive = _pid_alive(pid)         # no flock here: the pid on this host is the best evidence left
    elif held is False and not local:
        alive = None                    # not held as seen from here: flocks may not cross hosts
    else:
        alive = held
    return Owner(host, pid, fields.get("slurm_job"), alive)


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

    def _busy(self) -> UserError:
        pid, fields = _read(self.path)
        who = f"process {pid}" if pid else "another process"
        if fields.get("host") and fields["host"] != socket.gethostname():
            who += f" on {fields['host']}"
        return UserError(f"run directory {self.dir} is in use by {who} (lock {self.path}); wait for it to "
                         "finish or stop it, or pick another --tag/--seed")

    def acquire(self) -> None:
        missing = [p for p in [self.dir, *self.dir.parents] if not p.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.created = [p for p in missing if self.stop_at is None or p != self.stop_at]
        try:
            self.fd = self._lock()
        except BaseException:
            self._cleanup_created()
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, _record().encode())

    def _lock(self) -> int:
        while True:
            fd = open_for_update(self.path)     # never through a planted link
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)
                    raise self._busy() from None
            else:
                pid, _ = _read(self.path)
                if pid and pid != os.getpid() and _pid_alive(pid):
                    os.close(fd)
                    raise self._busy()
            # the owner before us may have unlinked the file between our open and our flock: then we hold a
            # lock on a file nobody else can see; open the current one again
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

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
