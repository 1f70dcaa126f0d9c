"""Starting a sweep: the runs that need starting, run here (progress on the terminal) or submitted to Slurm
as one job array; and the summary printed afterwards.

    cells ──> to_start (state from disk, jobs still queued) ──> local slots | sbatch ──> Outcome ──> summary
"""
from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cilbench.safeio import atomic_write
from cilbench.sweep import slurm
from cilbench.sweep.backends import Backend, gpu_slots, make_executor, submit_array
from cilbench.sweep.grid import Cell, SweepSpec, log_folder
from cilbench.sweep.job import RunCell, run_command
from cilbench.sweep.state import STATES, RunState, duration, read_state, read_states


@dataclass
class Outcome:
    complete: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)
    skipped: dict[str, list[Cell]] = field(default_factory=dict)   # state -> cells not started
    interrupted: list[Cell] = field(default_factory=list)
    job_id: str | None = None


def to_start(cells: list[Cell], retry_failed: bool) -> tuple[list[Cell], dict[str, list[Cell]]]:
    """Cells to start (pending, interrupted, and failed ones with --retry-failed) and the rest by state."""
    start, skipped = [], {}
    for cell, state in zip(cells, read_states(cells)):
        if state.state in ("pending", "interrupted") or (state.state == "failed" and retry_failed):
            start.append(cell)
        else:
            skipped.setdefault(state.state, []).append(cell)
    return start, skipped


def still_queued(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """Cells whose last Slurm job is still pending or running (a requeued job waits as pending)."""
    record = slurm.JobRecord(log_folder(spec))
    ids = {c: record.get(c.run_dir).get("job_id") for c in cells}
    states = slurm.job_states(set(ids.values()) - {None})
    return [c for c in cells if ids[c] in states and slurm.is_active(states[ids[c]])]


SKIPPED = (("complete", "complete, skipped"), ("running", "running in another process, left alone"),
           ("queued", "queued or running in Slurm already, not submitted again"),
           ("failed", "failed before (reasons in --status; --retry-failed reruns them)"))


def run_sweep(spec: SweepSpec, cells: list[Cell], backend: Backend, retry_failed: bool = False,
              echo: Callable[[str], None] = print) -> Outcome:
    start, skipped = to_start(cells, retry_failed)
    if backend.kind == "slurm":
        queued = still_queued(spec, start)
        start = [c for c in start if c not in queued]
        if queued:
            skipped["queued"] = queued
    outcome = Outcome(skipped=skipped)
    for state, what in SKIPPED:
        if skipped.get(state):
            echo(f"{len(skipped[state])} of {len(cells)} runs {what}")
    if not start:
        echo("nothing to start")
        return outcome
    executor = make_executor(backend, spec)
    if backend.kind == "slurm":
        return _submit(spec, start, executor, backend, outcome, echo)
    return _run_local(spec, start, executor, gpu_slots(backend), backend, outcome, echo)


def _submit(spec, start, executor, backend, outcome, echo) -> Outcome:
    commands = [run_command(spec, c, backend.cpus_per_run) for c in start]
    # the script lists what each array task runs (submitit's pickles hold the same commands)
    listing = [f"# array task {i}: cilbench {' '.join(cmd[3:])}" for i, cmd in enumerate(commands)]
    executor.update_parameters(slurm_setup=listing + list(backend.setup))
    folder = log_folder(spec)
    jobs = submit_array(executor, folder, commands, [str(c.run_dir.resolve()) for c in start])
    slurm.JobRecord(folder).add({c.run_dir: {"job_id": j.job_id, "logs": [str(j.paths.stdout), str(j.paths.stderr)]}
                                 for c, j in zip(start, jobs)})
    outcome.job_id = jobs[0].job_id.split("_")[0]
    atomic_write(folder / f"array-{outcome.job_id}.txt",
                 "".join(f"{i}\t{' '.join(cmd)}\n" for i, cmd in enumerate(commands)))
    what = "1 run as Slurm job" if len(start) == 1 else f"{len(start)} runs as Slurm job array"
    echo(f"submitted {what} {outcome.job_id}; logs in {folder}")
    return outcome


class Progress:
    """One line per finished run and a total bar (a bar only on a terminal)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress
            self.bar = RichProgress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    transient=True)
            self.task = self.bar.add_task("runs", total=total)
            self.bar.start()

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def finished(self, cell: Cell, state: RunState, seconds: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.advance(self.task)
        note = f": {state.reason}" if state.state != "complete" and state.reason else ""
        self.line(f"[{self.done}/{self.total}] {state.state:<11} {cell.label} ({duration(seconds)}){note}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _failure_reason(job, state: RunState) -> str:
    """The run's own reason, else the last `error:` line the run printed (e.g. data not found)."""
    if state.orphaned:
        return "its process died without marking the run; the next invocation resumes it"
    if state.reason:
        return state.reason
    try:
        text = (job.stderr() or "") + (job.stdout() or "")
    except Exception:   # a job that never started has no log
        text = ""
    errors = [line[len("error: "):] for line in text.splitlines()
              if line.startswith("error: ") and not line.startswith("error: job: ")]   # not the job's own line
    return errors[-1] if errors else "the run stopped without a reason; see " + str(job.paths.stderr)


def _run_local(spec, start, executor, slots, backend, outcome, echo) -> Outcome:
    echo(f"starting {len(start)} runs, {len(slots)} at a time; logs in {log_folder(spec)}")
    progress = Progress(len(start))
    queue, free, running = list(start), list(slots), {}
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        while queue or running:
            while queue and free:
                cell, slot = queue.pop(0), free.pop(0)
                job = executor.submit(RunCell(), run_command(spec, cell, backend.cpus_per_run),
                                      str(cell.run_dir.resolve()), slot)
                running[job] = (cell, slot, time.monotonic())
            time.sleep(0.2)
            for job in [j for j in running if j.done()]:
                cell, slot, t0 = running.pop(job)
                free.append(slot)
                state = read_state(cell.run_dir)
                if state.state == "complete":
                    outcome.complete.append(cell)
                elif state.state == "interrupted" and not state.orphaned:   # stopped from outside
                    outcome.interrupted.append(cell)
                else:
                    state.reason = _failure_reason(job, state)
                    state.state = "failed"
                    outcome.failed.append((cell, state.reason))
                progress.finished(cell, state, time.monotonic() - t0)
    except KeyboardInterrupt:
        for job in running:
            job.cancel()
        deadline = time.monotonic() + 60
        while any(not j.done() for j in running) and time.monotonic() < deadline:
            time.sleep(0.2)
        outcome.interrupted += [c for c, _, _ in running.values()] + queue
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
        with contextlib.suppress(OSError):   # submitit's local controllers create the folder pattern literally
            (log_folder(spec) / "%j").rmdir()
    return outcome


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM to the sweep (a closed session, `timeout`) stops its runs as Ctrl-C does."""
    raise KeyboardInterrupt


def report_command(spec: SweepSpec) -> str:
    if spec.source:
        return f"cilbench report --sweep {shlex.quote(spec.source)}"
    return f"cilbench report --runs {shlex.quote(spec.out)}"


def summary(spec: SweepSpec, cells: list[Cell], outcome: Outcome, report: Path | None, again: str) -> str:
    """`again`: the command that selects this sweep (file or grid flags), for the follow-up commands."""
    if outcome.job_id is not None:
        return f"follow it with: {again} --status"
    total = {s: sum(st.state == s for st in read_states(cells)) for s in STATES}
    lines = [f"sweep {spec.name}: {len(cells)} runs: " + ", ".join(f"{total[s]} {s}" for s in STATES if total[s])]
    for cell, reason in outcome.failed:
        lines.append(f"  failed: {cell.label}: {reason}")
    if outcome.interrupted:
        lines.append(f"interrupted with {len(outcome.interrupted)} runs left; the same command continues them")
    if total["failed"]:
        lines.append("rerun the failed ones with --retry-failed")
    if report is not None:
        lines.append(f"report: {report}")
    else:
        lines.append(f"tables of these runs: {report_command(spec)}")
    return "\n".join(lines)
