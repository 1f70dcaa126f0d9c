"""Sweeps: a grid of runs handed to submitit, with the run directories as the only state.

    sweep file ──> grid of cells ──> validate every cell ──> submitit executor ──> cilbench run ... --resume

A sweep file names the grid (methods × protocols × seeds × `set` values; a list value in `set` is an axis,
a list-valued option is written as a list of lists) and the options every run shares. Every cell is
resolved exactly as `cilbench run` resolves its options before anything is submitted. Each cell runs as
`cilbench run ... --resume` in a process of its own, so a complete run is skipped, an interrupted one
continues after its last finished task, and `--status` is read from the run directories alone.
The local backend runs up to `--jobs` cells at once, each pinned to a GPU slot through CUDA_VISIBLE_DEVICES;
the Slurm backend submits one job array. Both use submitit's executor and the same job callable.
"""
from __future__ import annotations

import ctypes
import datetime as dt
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import submitit
import yaml

from cilbench.config import build, load_yaml, parse_override
from cilbench.errors import UserError

STATES = ("complete", "running", "interrupted", "failed", "pending")


@dataclass
class SweepSpec:
    """A sweep file: the grid and the options every run of it shares."""
    name: str = ""                       # default: the file's stem; names the log folder
    description: str = ""
    methods: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    set: dict[str, Any] = field(default_factory=dict)   # --set key -> value, or a list of values (an axis)
    epochs: int | None = None
    deterministic: bool = False
    device: str = "auto"
    out: str = "results/runs"
    data_root: str | None = None
    tag: str | None = None
    grids: list[dict] = field(default_factory=list)     # parts of the grid, each overriding the keys above
    skip_invalid: bool = False                          # skip (and list) cells that do not validate
    source: str = field(default="", init=False)        # the file it came from (for messages)
    skipped: list[tuple[str, str]] = field(default_factory=list, init=False)   # (cell, reason) under skip_invalid


@dataclass
class GridPart:
    """One part of a sweep's grid (e.g. one protocol with its own N): unset keys come from the file's top
    level; `set` entries are added to the top level's."""
    methods: list[str] | None = None
    protocols: list[str] | None = None
    seeds: list[int] | None = None
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: what `cilbench run` is given, and (after validation) where it writes."""
    method: str
    protocol: str
    seed: int
    overrides: tuple[str, ...] = ()      # --set texts: fixed options, then this cell's axis values
    axes: tuple[tuple[str, Any], ...] = ()
    tag: str | None = None
    run_dir: Path | None = None

    @property
    def label(self) -> str:
        values = " ".join(f"{k}={_yaml_value(v)}" for k, v in self.axes)
        return f"{self.method} on {self.protocol}, seed {self.seed}" + (f" ({values})" if values else "")


# --------------------------------------------------------------------------------------------------------
# Loading and expanding the grid

def load_sweep(path: str | None, methods=None, protocols=None, seeds=None, sets=(), **fixed) -> SweepSpec:
    """The sweep file (if any) with the command line's grid and options on top (the command line wins)."""
    if path is not None:
        data = load_yaml(path)
        data.setdefault("name", Path(path).stem)
        spec = build(SweepSpec, data, path)
        spec.source = path
    else:
        spec = SweepSpec(name="cli")
    for key, value in (("methods", methods), ("protocols", protocols), ("seeds", seeds)):
        if value:   # the command line's grid replaces the file's, in every part
            setattr(spec, key, list(value))
            for part in spec.grids:
                part.pop(key, None)
    for text in sets:   # the command line's --set wins over the file's, in every part
        path_, value = parse_override(text)
        key = ".".join(path_)
        spec.set[key] = value
        for part in spec.grids:
            if isinstance(part.get("set"), dict):
                part["set"].pop(key, None)
    for key, value in fixed.items():
        if value is not None:
            setattr(spec, key, value)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", spec.name or ""):
        raise UserError(f"sweep name {spec.name!r} must be one word of letters, digits, '.', '_' or '-'")
    return spec


def _yaml_value(value: Any) -> str:
    """A value as `--set` reads it back (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def _family(method: str) -> str:
    from cilbench.kit.contract import REGISTRY, load_plugins
    load_plugins()
    entry = REGISTRY.get(method)
    return entry.cls.family if entry is not None else method


def _known_method_heads() -> set[str]:
    from cilbench.kit.contract import REGISTRY, load_plugins
    load_plugins()
    return set(REGISTRY) | {entry.cls.family for entry in REGISTRY.values()}


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, part by part, protocol-major."""
    where = spec.source or "the command line"
    parts = [build(GridPart, g, where, prefix=f"grids[{i}].") for i, g in enumerate(spec.grids)] or [GridPart()]
    cells = []
    for i, part in enumerate(parts):
        name = f"{spec.name}" + (f" grids[{i}]" if spec.grids else "")
        cells += _expand_part(name, part.methods or spec.methods, part.protocols or spec.protocols,
                              spec.seeds if part.seeds is None else part.seeds, {**spec.set, **part.set}, spec.tag)
    return cells


def _expand_part(name: str, methods: list[str], protocols: list[str], seeds: list[int], sets: dict,
                 tag: str | None) -> list[Cell]:
    """A `set` key headed by a method (or its family) applies only to that method's cells; any other key
    (card, runtime) applies to all. A list value is an axis."""
    for what, values in (("methods", methods), ("protocols", protocols), ("seeds", seeds)):
        if not values:
            raise UserError(f"sweep {name}: the grid is empty: no {what} given (in the file or --{what})")
    heads = _known_method_heads() | set(methods)
    families = {m: _family(m) for m in methods}
    for key, value in sets.items():
        head = key.split(".")[0]
        if head in heads and head not in set(methods) | set(families.values()):
            raise UserError(f"sweep {name}: set key '{key}' is an option of '{head}', which is not in the "
                            f"grid's methods ({', '.join(methods)}); remove it or add the method")
        if value == []:
            raise UserError(f"sweep {name}: set key '{key}' is an empty list, so the grid is empty; "
                            "give at least one value")
    cells = []
    for protocol in protocols:
        for method in methods:
            keys = [k for k in sets if k.split(".")[0] not in heads or k.split(".")[0] in (method, families[method])]
            fixed = [f"{k}={_yaml_value(sets[k])}" for k in keys if not isinstance(sets[k], list)]
            axis_keys = [k for k in keys if isinstance(sets[k], list)]
            for values in itertools.product(*(sets[k] for k in axis_keys)):
                axes = tuple(zip(axis_keys, values))
                overrides = tuple(fixed + [f"{k}={_yaml_value(v)}" for k, v in axes])
                for seed in seeds:
                    cells.append(Cell(method, protocol, int(seed), overrides, axes, tag))
    return cells


# --------------------------------------------------------------------------------------------------------
# Validation: every cell resolved as `cilbench run` would, before anything is submitted

def _request(spec: SweepSpec, cell: Cell, **extra):
    from cilbench.run.runner import RunRequest
    return RunRequest(method=cell.method, protocol=cell.protocol, seed=cell.seed, overrides=list(cell.overrides),
                      epochs=spec.epochs, device=spec.device, data_root=spec.data_root, out=spec.out,
                      tag=cell.tag, deterministic=spec.deterministic, **extra)


def _locate(spec: SweepSpec, cell: Cell) -> Cell:
    from cilbench.run.rundir import run_dir
    from cilbench.run.runner import resolve
    try:
        resolved = resolve(_request(spec, cell))
    except UserError as exc:
        raise UserError(f"sweep {spec.name}: cell {cell.label}: {exc}") from None
    return replace(cell, run_dir=run_dir(spec.out, resolved.protocol.name, resolved.run_name, cell.seed))


def _axis_tag(cell: Cell, keys: list[str]) -> str:
    parts = [re.sub(r"[^A-Za-z0-9._-]", "", f"{k.split('.')[-1]}{_yaml_value(v)}") for k, v in cell.axes if k in keys]
    return "_".join(p for p in [cell.tag, *parts] if p)


def validate(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """Resolve every cell (raising on the first that does not validate, naming it) and give each its run
    directory. Cells that differ only in options absent from the run name get those values as a tag."""
    if spec.epochs is not None and spec.epochs < 1:
        raise UserError(f"sweep {spec.name}: epochs must be >= 1, got {spec.epochs}")
    if any(c.seed < 0 for c in cells):
        raise UserError(f"sweep {spec.name}: seeds must be >= 0, got {spec.seeds}")
    if spec.skip_invalid:    # a grid pairing, say, an offline-only method with an online card: run the rest
        located, spec.skipped = [], []
        for c in cells:
            try:
                located.append(_locate(spec, c))
            except UserError as exc:
                spec.skipped.append((c.label, str(exc).split(f"cell {c.label}: ", 1)[-1]))
        if not located:
            raise UserError(f"sweep {spec.name}: no cell validates (first: {spec.skipped[0][0]}: "
                            f"{spec.skipped[0][1]})" if spec.skipped else f"sweep {spec.name}: the grid is empty")
    else:
        located = [_locate(spec, c) for c in cells]
    groups: dict[Path, list[int]] = {}
    for i, cell in enumerate(located):
        groups.setdefault(cell.run_dir, []).append(i)
    for members in (m for m in groups.values() if len(m) > 1):
        differing = [k for k, _ in located[members[0]].axes
                     if len({_yaml_value(dict(located[i].axes)[k]) for i in members}) > 1]
        for i in members:
            located[i] = _locate(spec, replace(located[i], tag=_axis_tag(located[i], differing) or None))
    seen: dict[Path, Cell] = {}
    for cell in located:
        if cell.run_dir in seen:
            raise UserError(f"sweep {spec.name}: cells {seen[cell.run_dir].label} and {cell.label} would both "
                            f"write {cell.run_dir}; remove the duplicate from the grid")
        seen[cell.run_dir] = cell
    return located


def prepare(spec: SweepSpec) -> list[Cell]:
    return validate(spec, expand(spec))


# --------------------------------------------------------------------------------------------------------
# State of a run, read from its directory

@dataclass
class RunState:
    state: str                       # one of STATES
    tasks_done: int = 0
    tasks_total: int | None = None
    elapsed_s: float | None = None
    reason: str = ""
    orphaned: bool = False           # marked running, but its process is gone (killed, out of memory, reboot)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _elapsed(path: Path, manifest: dict) -> float | None:
    if manifest.get("status") == "running" and manifest.get("started"):
        started = dt.datetime.fromisoformat(manifest["started"])
        return (dt.datetime.now(dt.timezone.utc) - started).total_seconds()
    steps = path / "steps.csv"
    if not steps.exists():
        return None
    import csv
    with open(steps) as fh:
        return sum(float(r["train_seconds"]) + float(r["eval_seconds"]) for r in csv.DictReader(fh))


def read_state(path: Path) -> RunState:
    """complete | running | interrupted | failed | pending. A run marked running whose process is gone (same
    host, pid not alive) was killed without a chance to say so: it reads as interrupted."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        return RunState("pending")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return RunState("failed", reason="manifest.json unreadable")
    status = manifest.get("status", "failed")
    reason = manifest.get("error") or ""
    if status == "complete" and not (Path(path) / "metrics.json").exists():
        status, reason = "failed", "marked complete but metrics.json is missing"
    if status == "running" and manifest.get("host") == socket.gethostname() and manifest.get("pid") \
            and not _pid_alive(int(manifest["pid"])):
        status, reason = "interrupted", f"its process ({manifest['pid']}) is gone"
    if status not in STATES:
        status = "failed"
    return RunState(status, int(manifest.get("tasks_done") or 0), manifest.get("tasks_total"),
                    _elapsed(Path(path), manifest), reason if status != "complete" else "",
                    orphaned=manifest.get("status") == "running" and status == "interrupted")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def status_table(spec: SweepSpec, cells: list[Cell]) -> str:
    """Counts per state, then one line per run: state, elapsed time, last finished task, reason."""
    states = [read_state(c.run_dir) for c in cells]
    counts = {s: sum(st.state == s for st in states) for s in STATES}
    head = f"sweep {spec.name}: {len(cells)} runs: " + ", ".join(f"{counts[s]} {s}" for s in STATES)
    rows = [("protocol", "run", "seed", "state", "elapsed", "tasks", "note")]
    for cell, st in zip(cells, states):
        tasks = f"{st.tasks_done}/{st.tasks_total}" if st.tasks_total else "-"
        rows.append((cell.run_dir.parent.parent.name, cell.run_dir.parent.name, str(cell.seed), st.state,
                     _duration(st.elapsed_s), tasks, st.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r[:6], widths)) + ("  " + r[6] if r[6] else "") for r in rows]
    return "\n".join([head, ""] + [line.rstrip() for line in lines])


# --------------------------------------------------------------------------------------------------------
# The job: one `cilbench run ... --resume` in a process of its own

def run_command(spec: SweepSpec, cell: Cell) -> list[str]:
    args = ["run", "--method", cell.method, "--protocol", _absolute_if_path(cell.protocol),
            "--seed", str(cell.seed), "--out", str(Path(spec.out).resolve()), "--device", spec.device]
    for text in cell.overrides:
        args += ["--set", text]
    if spec.epochs is not None:
        args += ["--epochs", str(spec.epochs)]
    if spec.deterministic:
        args.append("--deterministic")
    if spec.data_root:
        args += ["--data-root", str(Path(spec.data_root).resolve())]
    if cell.tag:
        args += ["--tag", cell.tag]
    args.append("--resume")           # a complete run is never started; an interrupted one continues
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


class RunCell(submitit.helpers.Checkpointable):
    """The submitit job callable. On pre-emption or time-out submitit calls `checkpoint`: the run is stopped
    with SIGTERM (it marks itself interrupted after its last finished task) and the same command is
    requeued, which resumes it."""

    def __init__(self) -> None:
        self._child: subprocess.Popen | None = None

    def __call__(self, command: list[str], cuda_visible_devices: str | None = None) -> int:
        env = dict(os.environ)
        package_parent = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        if cuda_visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        print("+ " + " ".join(command), flush=True)
        self._child = subprocess.Popen(command, env=env, preexec_fn=_child_setup)
        try:
            return self._child.wait()
        except KeyboardInterrupt:   # a cancelled job; on a terminal the run got the same Ctrl-C itself
            self._stop(signal.SIGINT, grace_s=0.5)
            raise

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


# --------------------------------------------------------------------------------------------------------
# Backends

@dataclass
class Backend:
    kind: str = "local"                  # local | slurm
    jobs: int | None = None              # local: runs at once (default: one per GPU slot, else 1)
    gpus: list[int] | None = None        # local: GPU ids to pin runs to (default: all visible)
    runs_per_gpu: int = 1
    time: str | None = None              # wall-clock limit per run, [D-]HH:MM:SS or minutes
    partition: str | None = None
    account: str | None = None
    gpus_per_run: int = 1
    cpus_per_run: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    sbatch: list[str] = field(default_factory=list)   # extra #SBATCH lines, key=value


def parse_time(text: str | None) -> int | None:
    """'12:00:00' -> 720, '1-00:00:00' -> 1440, '90' -> 90 (minutes)."""
    if text is None:
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d{2}):(\d{2})|(\d+)", text.strip())
    if not m:
        raise UserError(f"--time {text!r}: expected [D-]HH:MM:SS or minutes, e.g. --time 12:00:00")
    if m.group(5):
        return int(m.group(5))
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups()[:4])
    return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def log_folder(spec: SweepSpec) -> Path:
    """submitit's folder for this sweep, beside the runs."""
    return Path(spec.out).resolve() / "sweep-logs" / spec.name


def make_executor(backend: Backend, spec: SweepSpec) -> submitit.AutoExecutor:
    if backend.kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("--backend slurm: sbatch/srun not found; submit from a Slurm login node "
                        "(or use --backend local)")
    executor = submitit.AutoExecutor(folder=log_folder(spec) / "%j", cluster=backend.kind)
    minutes = parse_time(backend.time)
    if backend.kind == "local":
        # submitit's per-job controller writes a traceback when a job is cancelled: keep it in the logs
        controller_log = shlex.quote(str(log_folder(spec) / "controllers.err"))
        executor.update_parameters(timeout_min=minutes or 60 * 24 * 365, local_setup=[f"exec 2>>{controller_log}"])
        return executor
    extra = {}
    for line in backend.sbatch:
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--sbatch {line!r}: expected key=value, e.g. --sbatch qos=high")
        extra[key.strip().lstrip("-")] = value.strip()
    params: dict[str, Any] = dict(name=f"cilbench-{spec.name}", timeout_min=minutes or 60 * 24, nodes=1,
                                  tasks_per_node=1, gpus_per_node=backend.gpus_per_run,
                                  cpus_per_task=backend.cpus_per_run, mem_gb=backend.mem_gb,
                                  slurm_partition=backend.partition, slurm_account=backend.account,
                                  slurm_array_parallelism=backend.array_parallelism,
                                  slurm_additional_parameters=extra or None)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def gpu_slots(backend: Backend) -> list[str]:
    """One CUDA_VISIBLE_DEVICES value per run that may run at once: each GPU `runs_per_gpu` times."""
    gpus = backend.gpus
    if gpus is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = [int(g) for g in visible.split(",") if g.strip().isdigit()]
        else:
            import torch
            gpus = list(range(torch.cuda.device_count()))
    if backend.runs_per_gpu < 1:
        raise UserError(f"--runs-per-gpu must be >= 1, got {backend.runs_per_gpu}")
    slots = [str(g) for g in gpus for _ in range(backend.runs_per_gpu)]
    jobs = backend.jobs if backend.jobs is not None else max(1, len(slots))
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if slots and jobs > len(slots):
        raise UserError(f"--jobs {jobs} is more than the {len(slots)} GPU slots (--gpus {','.join(map(str, gpus))} "
                        f"x --runs-per-gpu {backend.runs_per_gpu}); raise --runs-per-gpu or lower --jobs")
    return slots[:jobs] if slots else [""] * jobs


# --------------------------------------------------------------------------------------------------------
# Progress on the terminal

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
        self.line(f"[{self.done}/{self.total}] {state.state:<11} {cell.label} ({_duration(seconds)}){note}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _failure_reason(cell: Cell, job, state: RunState) -> str:
    """The run's own reason, else the last `error:` line the job printed (e.g. data not found)."""
    if state.orphaned:
        try:
            code = f"exit code {job.result()}"
        except Exception:   # the job itself failed
            code = "no exit code"
        return f"its process died without marking the run ({code}); the next invocation resumes it"
    if state.reason:
        return state.reason
    try:
        text = (job.stderr() or "") + (job.stdout() or "")
    except Exception:   # a job that never started has no log
        text = ""
    errors = [line[len("error: "):] for line in text.splitlines() if line.startswith("error: ")]
    return errors[-1] if errors else "the run stopped without a reason; see " + str(job.paths.stderr)


# --------------------------------------------------------------------------------------------------------
# Running a sweep

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
    for cell in cells:
        state = read_state(cell.run_dir).state
        if state in ("pending", "interrupted") or (state == "failed" and retry_failed):
            start.append(cell)
        else:
            skipped.setdefault(state, []).append(cell)
    return start, skipped


def run_sweep(spec: SweepSpec, cells: list[Cell], backend: Backend, retry_failed: bool = False,
              echo: Callable[[str], None] = print) -> Outcome:
    start, skipped = to_start(cells, retry_failed)
    outcome = Outcome(skipped=skipped)
    for state, what in (("complete", "complete, skipped"), ("running", "running in another process, left alone"),
                        ("failed", "failed before (reasons in --status; --retry-failed reruns them)")):
        if skipped.get(state):
            echo(f"{len(skipped[state])} of {len(cells)} runs {what}")
    if not start:
        echo("nothing to start")
        return outcome
    executor = make_executor(backend, spec)
    if backend.kind == "slurm":
        return _submit_array(spec, start, executor, outcome, echo)
    return _run_local(spec, start, executor, gpu_slots(backend), outcome, echo)


def _submit_array(spec, start, executor, outcome, echo) -> Outcome:
    # the script lists what each array task runs (submitit's pickles hold the same commands)
    listing = [f"# array task {i}: cilbench {' '.join(run_command(spec, c)[3:])}" for i, c in enumerate(start)]
    executor.update_parameters(slurm_setup=listing)
    jobs = executor.map_array(RunCell(), [run_command(spec, c) for c in start])
    outcome.job_id = jobs[0].job_id.split("_")[0]
    (log_folder(spec) / f"array-{outcome.job_id}.txt").write_text(
        "".join(f"{i}\t{' '.join(run_command(spec, c))}\n" for i, c in enumerate(start)))
    echo(f"submitted {len(start)} runs as Slurm job array {outcome.job_id}; logs in {log_folder(spec)}")
    return outcome


def _run_local(spec, start, executor, slots, outcome, echo) -> Outcome:
    echo(f"starting {len(start)} runs, {len(slots)} at a time; logs in {log_folder(spec)}")
    progress = Progress(len(start))
    queue, free, running = list(start), list(slots), {}
    previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        while queue or running:
            while queue and free:
                cell, slot = queue.pop(0), free.pop(0)
                job = executor.submit(RunCell(), run_command(spec, cell), slot)
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
                    state.reason = _failure_reason(cell, job, state)
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
    return outcome


def _terminate_as_interrupt(signum, frame) -> None:
    """SIGTERM to the sweep (a closed session, `timeout`) stops its runs as Ctrl-C does."""
    raise KeyboardInterrupt


def summary(spec: SweepSpec, cells: list[Cell], outcome: Outcome, report: Path | None, sweep_file: str | None) -> str:
    lines = []
    if outcome.job_id is not None:
        lines.append(f"follow it with: cilbench sweep {sweep_file or '...'} --status")
        return "\n".join(lines)
    total = {s: sum(read_state(c.run_dir).state == s for c in cells) for s in STATES}
    lines.append(f"sweep {spec.name}: {len(cells)} runs: " + ", ".join(f"{total[s]} {s}" for s in STATES if total[s]))
    for cell, reason in outcome.failed:
        lines.append(f"  failed: {cell.label}: {reason}")
    if outcome.interrupted:
        lines.append(f"interrupted with {len(outcome.interrupted)} runs left; the same command continues them")
    if total["failed"]:
        lines.append("rerun the failed ones with --retry-failed")
    if report is not None:
        lines.append(f"report: {report}")
    else:
        lines.append(f"tables of these runs: cilbench report --sweep {sweep_file or '...'}")
    return "\n".join(lines)


def include_filter(cells: list[Cell]) -> Callable[[Path], bool]:
    """For `build_report(include=...)`: a seed directory belongs to the sweep when a cell writes it."""
    wanted = {c.run_dir.resolve() for c in cells}
    return lambda seed_dir: Path(seed_dir).resolve() in wanted


def default_report_dir(spec: SweepSpec) -> Path:
    return Path(spec.out).parent / "report" / spec.name
