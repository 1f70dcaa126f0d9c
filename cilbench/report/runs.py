"""Reading run directories: <runs>/<protocol>/<run_name>/seed<k>/ as cilbench.run.runner writes them.

Nothing here raises on a bad directory. Every file is checked (finite numbers, the right shapes, bounded YAML)
and a run that fails a check keeps the reason and is listed, never averaged.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cilbench.errors import UserError
from cilbench.safeio import read_bounded, safe_yaml_loads

MAX_FILE_BYTES = 4_000_000         # a run's config/metrics/steps files are a few KB; refuse anything huge


# --------------------------------------------------------------------------------------------------------
# Bounded loading

def read_text(path: Path, limit: int = MAX_FILE_BYTES) -> str:
    """UTF-8 text of a small regular file; ValueError naming the file when it is too big, not text, or not a
    regular file (a FIFO would block the report forever)."""
    try:
        data = read_bounded(path, limit, "a small run file")
    except UserError as exc:
        if "not found" in str(exc):
            raise FileNotFoundError(path) from None
        raise ValueError(f"{path.name}: {str(exc).removeprefix(f'{path}: ')}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path.name} is not UTF-8 text") from None


def load_yaml_bounded(text: str) -> Any:
    """cilbench.safeio's bounded safe_load (size, alias expansion, recursion); ValueError with its reason."""
    try:
        return safe_yaml_loads(text, "config.yaml")
    except UserError as exc:
        raise ValueError(str(exc).split(": ", 1)[-1]) from None


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} is {value!r}, not a number")
    if not math.isfinite(value):
        raise ValueError(f"{what} is {value}, not a finite number")
    return float(value)


# --------------------------------------------------------------------------------------------------------
# One seed directory

@dataclass
class SeedRun:
    """One <protocol>/<run_name>/seed<k>/ directory as found on disk."""
    path: Path
    protocol: str
    run_name: str
    seed: int
    status: str       # complete | failed | running | interrupted | incomplete (bad files) | unreadable | empty
    reason: str = ""
    method: str = ""
    config: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    tasks_done: int | None = None
    tasks_total: int | None = None
    metrics: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)
    matrix5: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    @property
    def protocol_cfg(self) -> dict:
        proto = self.config.get("protocol")
        return proto if isinstance(proto, dict) else {}

    @property
    def class_order(self) -> Any:
        """The order this seed used: `class_orders[seed]` when the card maps seeds to orders, else class_order."""
        cfg = self.protocol_cfg
        orders = cfg.get("class_orders") or self.config.get("class_orders")
        if isinstance(orders, list) and 0 <= self.seed < len(orders):
            return orders[self.seed]
        return cfg.get("class_order", "seed1993")


STEP_REQUIRED = ("step", "classes_seen", "top1", "top5", "extractors")


def read_steps(path: Path) -> list[dict]:
    """steps.csv rows as numbers; `params` is the total count (older runs), `params_backbone` None if absent."""
    rows = list(csv.DictReader(io.StringIO(read_text(path))))
    out = []
    for line, r in enumerate(rows, start=2):
        if None in r or any(v is None for v in r.values()):
            raise ValueError(f"steps.csv line {line} does not have the header's {len(r) - (None in r)} fields")
        missing = [k for k in STEP_REQUIRED if not r.get(k)]
        total = r.get("params_total") or r.get("params")
        if missing or not total:
            raise ValueError(f"steps.csv line {line} lacks {', '.join(missing) or 'params'}")
        count = lambda v: int(float(v))   # noqa: E731  (counts may be written as 12.0)
        try:
            row = {"step": int(r["step"]), "classes_seen": int(r["classes_seen"]), "top1": float(r["top1"]),
                   "top5": float(r["top5"]), "extractors": int(r["extractors"]), "params": count(total),
                   "params_backbone": count(r["params_backbone"]) if r.get("params_backbone") else None,
                   "memory_size": count(r.get("memory_size") or 0),
                   "train_seconds": float(r.get("train_seconds") or 0),
                   "eval_seconds": float(r.get("eval_seconds") or 0)}
        except (ValueError, OverflowError):
            raise ValueError(f"steps.csv line {line} holds a value that is not a finite number") from None
        for k in ("top1", "top5", "train_seconds", "eval_seconds"):
            _finite(row[k], f"steps.csv line {line} {k}")
        out.append(row)
    return out


def read_matrix(path: Path) -> list[list[float]]:
    rows = list(csv.reader(io.StringIO(read_text(path))))[1:]
    out = []
    for i, row in enumerate(rows):
        try:
            values = [float(v) for v in row[1:] if v != ""]
        except ValueError:
            raise ValueError(f"{path.name} row {i} holds a value that is not a number") from None
        for v in values:
            _finite(v, f"{path.name} row {i}")
        if len(values) != i + 1:
            raise ValueError(f"{path.name} row {i} has {len(values)} values, expected {i + 1}")
        out.append(values)
    return out


def read_metrics(path: Path, fields: list[str]) -> dict:
    data = json.loads(read_text(path))
    if not isinstance(data, dict):
        raise ValueError(f"metrics.json is a {type(data).__name__}, not an object")
    for key in fields:
        if data.get(key) is not None:
            _finite(data[key], f"metrics.json {key}")
    return data


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(path: Path, protocol: str, run_name: str, seed: int, metric_fields: list[str] | None = None) -> SeedRun:
    """Read one run directory. Never raises: a broken directory gets a status and the reason."""
    from cilbench.report.aggregate import METRICS
    fields = metric_fields if metric_fields is not None else [m.field for m in METRICS.values()]
    run = SeedRun(path=path, protocol=protocol, run_name=run_name, seed=seed, status="unreadable",
                  method=run_name.split("+")[0])
    if not (path / "manifest.json").exists():
        run.status, run.reason = "empty", "no manifest.json (never started, or removed)"
        return run
    try:
        manifest = json.loads(read_text(path / "manifest.json"))
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not an object")
    except (OSError, ValueError) as exc:
        run.reason = f"manifest.json unreadable: {exc}"
        return run
    run.manifest = manifest
    run.status = str(manifest.get("status") or "unknown")
    run.method = str(manifest.get("method") or run.method)
    run.tasks_done = _int_or_none(manifest.get("tasks_done"))
    run.tasks_total = _int_or_none(manifest.get("tasks_total"))
    run.reason = str(manifest.get("error") or "")
    problem = ""
    try:
        config = load_yaml_bounded(read_text(path / "config.yaml"))
        if not isinstance(config, dict):
            raise ValueError(f"config.yaml holds a {type(config).__name__}, not a mapping")
        run.config = config
        if isinstance(config.get("method"), str):
            run.method = config["method"]
    except (OSError, ValueError) as exc:
        problem = f"config.yaml: {exc}"
    if run.status != "complete":
        if problem:
            run.reason = "; ".join(p for p in (run.reason, problem) if p)
        return run
    try:   # complete: every file must be there and consistent, else the run is not averaged in
        if problem:
            raise ValueError(problem)
        run.metrics = read_metrics(path / "metrics.json", fields)
        run.steps = read_steps(path / "steps.csv")
        if not run.steps:
            raise ValueError("steps.csv has no rows")
        if (path / "acc_matrix.csv").exists():
            run.matrix = read_matrix(path / "acc_matrix.csv")
        if (path / "acc_matrix_top5.csv").exists():
            run.matrix5 = read_matrix(path / "acc_matrix_top5.csv")
        if run.tasks_total is not None and len(run.steps) != run.tasks_total:
            raise ValueError(f"steps.csv has {len(run.steps)} rows, manifest says {run.tasks_total} tasks")
    except (OSError, ValueError) as exc:
        run.status = "incomplete"
        run.reason = f"marked complete but {exc}" if not isinstance(exc, OSError) else \
            f"marked complete but {exc.__class__.__name__}: {Path(exc.filename or '').name or exc}"
        run.metrics, run.steps, run.matrix, run.matrix5 = {}, [], [], []
    return run


def scan_runs(runs_dir: Path, include: Callable[[Path], bool] | None = None) -> list[SeedRun]:
    """Every <runs>/<protocol>/<run_name>/seed<k>/ directory (with or without a manifest) that include() keeps."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise UserError(f"runs directory {runs_dir} does not exist; run `cilbench run ...` first "
                        "or pass --runs DIR")
    if not runs_dir.is_dir():
        raise UserError(f"--runs {runs_dir} is not a directory")
    found = []
    for seed_dir in sorted(runs_dir.glob("*/*/seed*")):
        m = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not m or not seed_dir.is_dir() or seed_dir.is_symlink():
            continue
        if include is not None and not include(seed_dir):
            continue
        found.append(read_run(seed_dir, seed_dir.parent.parent.name, seed_dir.parent.name, int(m.group(1))))
    return found
