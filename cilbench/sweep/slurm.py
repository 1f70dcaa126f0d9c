"""What Slurm says about a sweep's jobs, and which job each run was submitted as.

Slurm is asked (squeue, then sacct) only about job ids the sweep recorded: a run marked running on another
host is alive while its job is; a run whose job is still queued or running is not submitted again.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path

from cilbench.run.rundir import atomic_write

# states in which a job still holds (or waits for) an allocation; every other state is final
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"}
GONE = "ENDED"   # a job Slurm no longer knows: it ended and was purged (pending/running jobs never are)
RECORD_NAME = "slurm-jobs.json"


def _ask(command: list[str]) -> str | None:
    """stdout of a Slurm query, or None when Slurm could not answer (not installed, controller down)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        return None
    return done.stdout


def job_states(job_ids: set[str]) -> dict[str, str]:
    """Slurm's state of each job id ('123' or array task '123_4'): its squeue/sacct state, GONE when Slurm
    no longer knows it. Ids Slurm could not be asked about are left out (the caller then assumes alive)."""
    ids = sorted(i for i in job_ids if i)
    if not ids:
        return {}
    queued = _ask(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(ids)])
    if queued is None:
        return {}
    states = dict(line.split()[:2] for line in queued.splitlines() if len(line.split()) >= 2)
    missing = [i for i in ids if i not in states]
    if missing:   # purged from the controller: accounting (if any) still knows the final state
        accounted = _ask(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(missing)]) or ""
        for line in accounted.splitlines():
            job, _, state = line.partition("|")
            states.setdefault(job, state.split()[0] if state else GONE)   # "CANCELLED by 0" -> CANCELLED
    return {i: states.get(i, GONE) for i in ids}


def is_active(state: str | None) -> bool:
    return state is None or state.split()[0] in ACTIVE


class JobRecord:
    """`<sweep log folder>/slurm-jobs.json`: run directory -> the job it was last submitted as (id, logs)."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RECORD_NAME

    def load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, run_dir: Path) -> dict:
        return self.load().get(str(Path(run_dir).resolve()), {})

    def add(self, entries: dict[Path, dict]) -> None:
        data = self.load()
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for run_dir, entry in entries.items():
            data[str(Path(run_dir).resolve())] = {**entry, "submitted": now}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(data, indent=2))
