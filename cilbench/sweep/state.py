"""A run's state, read from its directory (and, for a run owned by a job on another host, from Slurm).

    complete | running | interrupted | failed | pending

A run marked running whose process is gone was killed without a chance to say so: it reads as interrupted.
The run's lock tells (held while its process lives); for an owner on another host, the Slurm job the run
recorded (squeue/sacct).
"""
from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from pathlib import Path

from cilbench.run.lock import lock_owner
from cilbench.run.rundir import manifest_of, read_steps
from cilbench.sweep import slurm
from cilbench.sweep.grid import Cell, SweepSpec, log_folder

STATES = ("complete", "running", "interrupted", "failed", "pending")


@dataclass
class RunState:
    state: str                       # one of STATES
    tasks_done: int = 0
    tasks_total: int | None = None
    elapsed_s: float | None = None
    reason: str = ""
    orphaned: bool = False           # marked running, but its process is gone (killed, out of memory, reboot)
    job_id: str | None = None        # the Slurm job the run last ran in
    job_logs: tuple[str, ...] = ()   # that job's stdout and stderr


def _elapsed(path: Path, manifest: dict) -> float | None:
    if manifest.get("status") == "running" and manifest.get("started"):
        started = dt.datetime.fromisoformat(manifest["started"])
        return (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    try:
        steps = read_steps(path / "steps.csv")
    except (OSError, ValueError):
        return None
    return sum(s["train_seconds"] + s["eval_seconds"] for s in steps)


def read_manifest(path: Path) -> dict | None:
    """The run's manifest; None when it has none; {} when it cannot be read."""
    return manifest_of(path)


def remote_job(manifest: dict | None) -> str | None:
    """The Slurm job id of a run marked running by a process on another host (the pid cannot be checked)."""
    if manifest and manifest.get("status") == "running" and manifest.get("host") != socket.gethostname():
        return manifest.get("slurm_job_id")
    return None


def _gone(path: Path, manifest: dict, job_states: dict[str, str]) -> str:
    """Why a run marked running has no live process, or '' when it may have one. The run's lock decides
    (held while its process lives, never a pid alone: pids are reused); for an owner on another host whose lock
    cannot be seen from here, the Slurm job the run recorded decides."""
    owner = lock_owner(path)
    if owner is not None and owner.alive:
        return ""
    remote = manifest.get("host") not in (None, socket.gethostname())
    if not remote or (owner is not None and owner.alive is False):
        pid = manifest.get("pid")
        return f"its process ({pid}) is gone (the run's lock is not held)"
    job = manifest.get("slurm_job_id") or (owner.slurm_job if owner is not None else None)
    state = job_states.get(job) if job else None
    if state is None or slurm.is_active(state):
        return ""
    return f"its Slurm job {job} ended ({state}) without marking the run"


def read_state(path: Path, job_states: dict[str, str] | None = None) -> RunState:
    """The run's state; `job_states` (from `slurm.job_states`) answers for runs owned by another host, and is
    asked for here when not given."""
    manifest = read_manifest(path)
    if manifest is None:
        return RunState("pending")
    if not manifest:
        return RunState("failed", reason="manifest.json unreadable")
    if job_states is None:
        job_states = slurm.job_states({remote_job(manifest)} - {None})
    status = manifest.get("status", "failed")
    reason = manifest.get("error") or ""
    if status == "complete" and not (Path(path) / "metrics.json").exists():
        status, reason = "failed", "marked complete but metrics.json is missing"
    if status == "running" and (why := _gone(Path(path), manifest, job_states)):
        status, reason = "interrupted", why
    elif status == "running" and manifest.get("host") != socket.gethostname():
        job = f", Slurm job {manifest['slurm_job_id']}" if manifest.get("slurm_job_id") else ""
        reason = reason or f"owned by pid {manifest.get('pid')} on {manifest.get('host')}{job}"
    if status not in STATES:
        status = "failed"
    return RunState(status, int(manifest.get("tasks_done") or 0), manifest.get("tasks_total"),
                    _elapsed(Path(path), manifest), reason if status != "complete" else "",
                    orphaned=manifest.get("status") == "running" and status == "interrupted",
                    job_id=manifest.get("slurm_job_id"), job_logs=tuple(manifest.get("job_logs") or ()))


def read_states(cells: list[Cell]) -> list[RunState]:
    """Every cell's state, with one Slurm query for all runs owned by other hosts."""
    manifests = [read_manifest(c.run_dir) for c in cells]
    job_states = slurm.job_states({remote_job(m) for m in manifests} - {None})
    return [read_state(c.run_dir, job_states) for c in cells]


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _queued_note(state: RunState, entry: dict, job_state: str | None) -> str:
    """A not-started run whose Slurm job is queued reads 'queued as job N', not a bare 'pending'."""
    if state.state in ("pending", "interrupted") and job_state and slurm.is_active(job_state):
        return f"queued: Slurm job {entry['job_id']} is {job_state.lower()}"
    return state.reason


def status_table(spec: SweepSpec, cells: list[Cell]) -> str:
    """Counts per state, then one line per run: state, elapsed time, last finished task, Slurm job, and a
    note (reason; for a run that is not complete, its job's log)."""
    states = read_states(cells)
    record = slurm.JobRecord(log_folder(spec)).load()
    entries = [record.get(str(c.run_dir.resolve()), {}) for c in cells]
    job_states = slurm.job_states({e.get("job_id") for e in entries} - {None})
    counts = {s: sum(st.state == s for st in states) for s in STATES}
    head = f"sweep {spec.name}: {len(cells)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)
    rows = [("protocol", "run", "seed", "state", "elapsed", "tasks", "job", "note")]
    for cell, st, entry in zip(cells, states, entries):
        tasks = f"{st.tasks_done}/{st.tasks_total}" if st.tasks_total else "-"
        job = st.job_id or entry.get("job_id") or "-"
        note = _queued_note(st, entry, job_states.get(entry.get("job_id")))
        logs = st.job_logs or tuple(entry.get("logs") or ())
        if st.state != "complete" and logs:
            note = f"{note}; log {logs[-1]}" if note else f"log {logs[-1]}"
        rows.append((cell.run_dir.parent.parent.name, cell.run_dir.parent.name, str(cell.seed), st.state,
                     duration(st.elapsed_s), tasks, job, note))
    widths = [max(len(r[i]) for r in rows) for i in range(7)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:7], widths)) + ("  " + r[7] if r[7] else "") for r in rows]
    return "\n".join([head, ""] + [line.rstrip() for line in lines])
