"""The job a sweep submits for each run: `cilbench run ... --resume` in a process of its own, watched.

The job ends with the run: exit 0 only when the run is complete, an exception (submitit: exit 1) otherwise,
so Slurm's state, `sacct`, `--mail-type=FAIL` and `afterok` see failures. A run whose process dies without
writing its status (SIGKILL, the OOM killer) is marked failed here, by the job that saw it die, so every
host reads the same state.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from cilbench.errors import UserError
from cilbench.kit.registry import plugin_paths
from cilbench.sweep.grid import Cell, SweepSpec

LOG_ENV = "CILBENCH_JOB_LOGS"   # the job's stdout and stderr, os.pathsep-joined; the run records them


class RunNotComplete(RuntimeError):
    """The job's run ended without completing (the job fails, so Slurm says FAILED)."""


def run_command(spec: SweepSpec, cell: Cell, threads: int | None = None) -> list[str]:
    """The run's command line; `threads` pins torch's CPU threads unless the cell sets runtime.threads."""
    args = ["run", "--method", cell.method, "--protocol", _absolute_if_path(cell.protocol),
            "--seed", str(cell.seed), "--out", str(Path(spec.out).resolve()), "--device", spec.device]
    for text in cell.overrides:
        args += ["--set", text]
    if threads and not any(text.startswith("runtime.threads=") for text in cell.overrides):
        args += ["--set", f"runtime.threads={threads}"]
    if spec.epochs is not None:
        args += ["--epochs", str(spec.epochs)]
    if spec.deterministic:
        args.append("--deterministic")
    if spec.data_root:
        args += ["--data-root", str(Path(spec.data_root).resolve())]
    if cell.tag:
        args += ["--tag", cell.tag]
    args.append("--resume")           # a complete run is never started; an interrupted one continues
    for path in plugin_paths():       # the run loads the sweep's plug-ins even where the job's environment
        args += ["--plugin", path]    # is not exported (sbatch --export=NONE)
    return [sys.executable, "-m", "cilbench.cli", *args]


def _absolute_if_path(protocol: str) -> str:
    return str(Path(protocol).resolve()) if protocol.endswith((".yaml", ".yml")) or os.sep in protocol else protocol


def _child_setup() -> None:
    """In the run's process: leave Slurm's early-warning signal (USR2) to the job, which checkpoints and
    stops the run with SIGTERM; and die with SIGTERM if the job's process dies first."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except OSError:
        pass


def _exited(child: subprocess.Popen, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        if child.returncode is not None:
            return True
        try:
            if os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:   # reaped meanwhile
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def oom_kills() -> int:
    """OOM kills counted in this process's memory cgroup (v2 memory.events, v1 memory.oom_control); 0 when
    the kernel does not say. Slurm's cgroup plugins put a job in a cgroup of its own."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        names = [("memory.events", "/sys/fs/cgroup")] if controllers == "" else \
            [("memory.oom_control", "/sys/fs/cgroup/memory")] if "memory" in controllers.split(",") else []
        for name, root in names:
            try:
                text = (Path(root + rel) / name).read_text()
            except OSError:
                continue
            counts = dict(line.split()[:2] for line in text.splitlines() if len(line.split()) >= 2)
            return int(counts.get("oom_kill", 0))
    return 0


def death_reason(code: int, oom: bool) -> str:
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    hint = "; out of memory (the kernel's OOM killer ended it): ask for more with --mem-gb" if oom else ""
    return f"its process {how} without marking the run{hint}; --retry-failed resumes it"


def mark_died(run_dir: Path, pid: int, code: int, oom: bool) -> bool:
    """Mark the run failed when it is still marked running by the process that just died (`pid`)."""
    from cilbench.run.lock import RunLock
    from cilbench.run.rundir import RunStore
    from cilbench.sweep.state import read_manifest
    manifest = read_manifest(run_dir)
    if not manifest or manifest.get("status") != "running" or manifest.get("pid") != pid:
        return False
    try:
        with RunLock(run_dir):   # its process is gone, so the lock is free unless a new owner took it
            manifest = read_manifest(run_dir) or {}
            if manifest.get("status") != "running" or manifest.get("pid") != pid:
                return False
            manifest.update(status="failed", error=death_reason(code, oom),
                            finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
            RunStore(run_dir).write_manifest(manifest)
    except UserError:
        return False
    return True


def _job_logs() -> str | None:
    """This job's stdout and stderr paths, when it runs under submitit."""
    try:
        paths = submitit.JobEnvironment().paths
    except Exception:   # not inside a submitit job (a test calling the job directly)
        return None
    return os.pathsep.join((str(paths.stdout), str(paths.stderr)))


class RunCell(submitit.helpers.Checkpointable):
    """The submitit job callable. On pre-emption or time-out submitit calls `checkpoint`: the run is stopped
    with SIGTERM (it marks itself interrupted after its last finished task) and the same command is
    requeued, which resumes it."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None

    def __call__(self, command: list[str], run_dir: str | None = None,
                 cuda_visible_devices: str | None = None) -> int:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        if cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        logs = _job_logs()
        if logs:
            env[LOG_ENV] = logs
        print("+ " + " ".join(command), flush=True)
        oom_before = oom_kills()
        self._child = subprocess.Popen(command, env=env, preexec_fn=_child_setup)
        try:
            code = self._child.wait()
        except KeyboardInterrupt:   # a cancelled job; on a terminal the run got the same Ctrl-C itself
            self._stop(signal.SIGINT, grace_s=0.5)
            raise
        return code if run_dir is None else self._verdict(Path(run_dir), code, oom_kills() > oom_before)

    def _verdict(self, run_dir: Path, code: int, oom: bool) -> int:
        """0 for a complete run; otherwise the run's state and reason in an `error:` line, and a failed job."""
        from cilbench.sweep.state import read_state
        mark_died(run_dir, self._child.pid, code, oom)
        state = read_state(run_dir, job_states={})
        if state.state == "complete":
            return 0
        message = f"run {run_dir} is {state.state}: {state.reason or 'no reason recorded'} (exit code {code})"
        print(f"error: job: {message}", file=sys.stderr, flush=True)
        raise RunNotComplete(message)

    def _stop(self, sig: int, grace_s: float = 0.0, wait_s: float = 60.0) -> None:
        """Signal the run unless it ends within `grace_s`, then give it `wait_s` to mark itself and exit.
        Runs inside submitit's signal handler, while `__call__` may hold Popen's wait lock: so it watches the
        process with waitid(WNOWAIT), which leaves reaping to `__call__`."""
        child = self._child
        if child is None or _exited(child, grace_s):
            return
        child.send_signal(sig)
        if not _exited(child, wait_s):
            child.kill()

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        self._stop(signal.SIGTERM)
        return submitit.helpers.DelayedSubmission(RunCell(), *args, **kwargs)

    def __getstate__(self) -> dict:
        return {"_child": None}     # a process does not travel with the pickled job
