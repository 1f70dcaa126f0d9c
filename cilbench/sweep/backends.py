"""Where a sweep's runs execute: submitit's local executor (runs pinned to GPU slots) or its Slurm executor
(one job array), with the options each takes. An option that does not apply to the chosen backend is
refused, never ignored; sbatch's refusal comes back as one line naming the option, with nothing left behind.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import submitit

from cilbench.config import build
from cilbench.errors import UserError
from cilbench.safeio import check_no_foreign_entries, check_no_linked_folder
from cilbench.sweep.grid import SweepSpec, log_folder


@dataclass
class SlurmOptions:
    """Slurm options; the CLI's flags, or a sweep file's `slurm:` block (the flags win, lists add up)."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str | None = None              # wall-clock limit per run, [D-]HH:MM:SS or minutes
    gpus_per_run: int | None = None      # default: 1, or 0 when the sweep's device is cpu
    cpus_per_run: int | None = None      # also pins each run's torch threads
    mem_gb: float | None = None
    array_parallelism: int | None = None
    setup: list[str] = field(default_factory=list)    # job script lines before the run (module load, source ...)
    sbatch: list[str] = field(default_factory=list)   # other sbatch options: key=value, or key for a flag

    BOUNDS = {"gpus_per_run": (0, None), "cpus_per_run": (1, None), "mem_gb": (0, None),
              "array_parallelism": (1, None)}


@dataclass
class Backend(SlurmOptions):
    kind: str = "local"                  # local | slurm
    jobs: int | None = None              # local: runs at once (default: one per GPU slot, else 1)
    gpus: list[int] | None = None        # local: GPU ids to pin runs to (default: all visible)
    runs_per_gpu: int | None = None      # local: runs packed on each GPU (default 1)


# options (as Backend fields) that only one backend uses, with their flags
LOCAL_ONLY = {"jobs": "--jobs", "gpus": "--gpus", "runs_per_gpu": "--runs-per-gpu"}
SLURM_ONLY = {"partition": "--partition", "account": "--account", "qos": "--qos", "constraint": "--constraint",
              "gpus_per_run": "--gpus-per-run", "mem_gb": "--mem-gb", "array_parallelism": "--array-parallelism",
              "setup": "--setup", "sbatch": "--sbatch"}
WHY_NOT = {"local": "on Slurm each run is one array task with --gpus-per-run GPUs and --cpus-per-run CPUs; "
                    "drop it, or use --backend local",
           "slurm": "it is a Slurm option; drop it, or add --backend slurm"}


def check_applicable(backend: Backend) -> None:
    """Refuse a flag that the chosen backend would not use."""
    others = LOCAL_ONLY if backend.kind == "slurm" else SLURM_ONLY
    for name, flag in others.items():
        if getattr(backend, name) not in (None, []):
            raise UserError(f"{flag} does not apply to --backend {backend.kind}: "
                            f"{WHY_NOT['local' if backend.kind == 'slurm' else 'slurm']}")


def with_file_options(backend: Backend, spec: SweepSpec) -> Backend:
    """The sweep file's `slurm:` block under the command line's flags."""
    block = build(SlurmOptions, spec.slurm, spec.source or "the sweep", prefix="slurm.")
    for f in fields(SlurmOptions):
        mine, theirs = getattr(backend, f.name), getattr(block, f.name)
        if isinstance(mine, list):
            setattr(backend, f.name, list(theirs) + list(mine))
        elif mine is None:
            setattr(backend, f.name, theirs)
    return backend


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


def gpus_per_run(backend: Backend, device: str) -> int:
    """GPUs each run asks for: none for `device: cpu`; for auto the flag decides (default 1)."""
    if device == "cpu":
        if backend.gpus_per_run:
            raise UserError(f"--gpus-per-run {backend.gpus_per_run} with device cpu: a CPU run uses no GPU; "
                            "drop --gpus-per-run or use --device auto/cuda")
        return 0
    wanted = 1 if backend.gpus_per_run is None else backend.gpus_per_run
    if device == "cuda" and wanted < 1:
        raise UserError("--gpus-per-run 0 with device cuda: a CUDA run needs a GPU; use --device cpu for CPU "
                        "nodes, or --gpus-per-run 1")
    return wanted


def sbatch_options(lines: list[str]) -> dict[str, Any]:
    """--sbatch texts: 'key=value' -> --key=value; 'key' (or 'key=') -> the bare flag --key."""
    options: dict[str, Any] = {}
    for line in lines:
        key, _, value = line.partition("=")
        key = key.strip().lstrip("-")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise UserError(f"--sbatch {line!r}: expected key=value or a flag name, e.g. --sbatch qos=high "
                            "or --sbatch requeue")
        options[key] = value.strip() or True
    return options


WRITTEN_LOGS = ("controllers.err", "slurm-jobs.json")   # what cilbench and its job shell write in the log folder


def check_log_folder(spec: SweepSpec) -> None:
    """submitit and the shell write the logs where we cannot pass O_NOFOLLOW: refuse a log folder reached
    through a link or holding one (a planted `controllers.err -> ~/notes`) before anything is written."""
    folder = log_folder(spec)
    check_no_linked_folder(folder / "x", Path(spec.out).resolve())
    ours = lambda entry: entry.parent == folder and (entry.name in WRITTEN_LOGS or entry.name.startswith("array-"))
    check_no_foreign_entries(folder, "sweep log folder", only=ours)   # submitit links its own files: left alone


def make_executor(backend: Backend, spec: SweepSpec) -> submitit.AutoExecutor:
    gpus_per_run(backend, spec.device)     # a contradiction in the options is named first, Slurm or not
    if backend.kind == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        raise UserError("--backend slurm: sbatch/srun not found; submit from a Slurm login node "
                        "(or use --backend local)")
    check_log_folder(spec)
    executor = submitit.AutoExecutor(folder=log_folder(spec) / "%j", cluster=backend.kind)
    minutes = parse_time(backend.time)
    if backend.kind == "local":
        # submitit's per-job controller writes a traceback when a job is cancelled: keep it in the logs
        controller_log = shlex.quote(str(log_folder(spec) / "controllers.err"))
        executor.update_parameters(timeout_min=minutes or 60 * 24 * 365, local_setup=[f"exec 2>>{controller_log}"])
        return executor
    gpus = gpus_per_run(backend, spec.device)
    params: dict[str, Any] = dict(name=f"cilbench-{spec.name}", timeout_min=minutes or 60 * 24, nodes=1,
                                  tasks_per_node=1, gpus_per_node=gpus or None,
                                  cpus_per_task=backend.cpus_per_run, mem_gb=backend.mem_gb,
                                  slurm_partition=backend.partition, slurm_account=backend.account,
                                  slurm_qos=backend.qos, slurm_constraint=backend.constraint,
                                  slurm_array_parallelism=backend.array_parallelism,
                                  slurm_additional_parameters=sbatch_options(backend.sbatch) or None)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    # no --wckey unless asked for (--sbatch wckey=NAME): submitit's default one is refused on clusters that
    # track wckeys, and None is the only value its update_parameters would not keep
    executor._executor.parameters["wckey"] = None
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
    per_gpu = 1 if backend.runs_per_gpu is None else backend.runs_per_gpu
    if per_gpu < 1:
        raise UserError(f"--runs-per-gpu must be >= 1, got {per_gpu}")
    slots = [str(g) for g in gpus for _ in range(per_gpu)]
    jobs = backend.jobs if backend.jobs is not None else max(1, len(slots))
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    if slots and jobs > len(slots):
        raise UserError(f"--jobs {jobs} is more than the {len(slots)} GPU slots (--gpus {','.join(map(str, gpus))} "
                        f"x --runs-per-gpu {per_gpu}); raise --runs-per-gpu or lower --jobs")
    return slots[:jobs] if slots else [""] * jobs


# --------------------------------------------------------------------------------------------------------
# Submitting to Slurm: sbatch's refusal as one line, and nothing left behind

# words of sbatch's error -> the flag that set that option
CULPRITS = (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"), ("gres", "--gpus-per-run"),
            ("gpu", "--gpus-per-run"), ("time limit", "--time"), ("memory", "--mem-gb"), ("feature", "--constraint"),
            ("constraint", "--constraint"), ("cpu", "--cpus-per-run"), ("unrecognized option", "--sbatch"),
            ("invalid option", "--sbatch"), ("unrecognized", "--sbatch"))


def sbatch_refusal(text: str) -> UserError:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    said = [line.removeprefix("sbatch:").strip() for line in lines if line.startswith("sbatch:")]
    message = (errors or said or lines or ["no message"])[-1]   # sbatch's own words, before submitit's
    culprit = next((flag for word, flag in CULPRITS if word in message.lower()), None)
    fix = f"check {culprit}" if culprit else "check the Slurm options (--partition, --account, --qos, --sbatch, ...)"
    return UserError(f"sbatch refused the submission: {message}; {fix}")


def _entries(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


def _remove_new(folder: Path, before: set[Path], existed: list[Path]) -> None:
    """Remove what a failed submission left: new files, then the folders it created."""
    for path in sorted(_entries(folder) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for path in [folder, *folder.parents]:
        if path in existed:
            break
        with contextlib.suppress(OSError):
            path.rmdir()


def submit_array(executor: submitit.AutoExecutor, folder: Path, *args: list) -> list:
    """executor.map_array(RunCell(), *args), with sbatch's refusal as a UserError and no leftovers."""
    from cilbench.sweep.job import RunCell
    existed = [p for p in [folder, *folder.parents] if p.exists()]
    before = _entries(folder)
    stderr = io.StringIO()   # submitit prints sbatch's stderr itself: it goes into the one-line error
    try:
        with contextlib.redirect_stderr(stderr):
            return executor.map_array(RunCell(), *args)
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError, OSError) as exc:
        _remove_new(folder, before, existed)
        raise sbatch_refusal(f"{stderr.getvalue()}\n{exc}") from None
