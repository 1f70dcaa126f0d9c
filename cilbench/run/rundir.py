"""Run directory: every file a run writes, written atomically (temp file + rename) and never through a link.

    <out>/<protocol>/<method>[+<tag>]/seed<k>/
        config.yaml  manifest.json  steps.csv  acc_matrix.csv  metrics.json  events.jsonl  checkpoint.pt

The checkpoint and the manifest carry the run's identity (protocol, method, seed, a hash of config.yaml,
and in the checkpoint the task it continues from), so a resume refuses a checkpoint of another run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from cilbench.errors import UserError
from cilbench.run.lock import LOCK_NAME
from cilbench.safeio import (
    append_line,
    atomic_write,
    check_no_foreign_entries,
    read_bounded,
    safe_yaml_load,
    safe_yaml_loads,
)

# params = params_total (backbones + classifier); params_backbone counts the extractors only (DER's #Paras)
STEP_FIELDS = ["step", "classes_seen", "top1", "top5", "extractors", "params", "memory_size",
               "memory_bytes", "memory_payload_bytes", "train_seconds", "eval_seconds", "params_backbone",
               "params_total", "fit_seconds", "statistics_seconds", "herding_seconds"]
# metrics.json entries that are wall-clock times: they differ between two runs with equal results
TIMING_METRICS = ("train_seconds", "eval_seconds", "time_split")


def run_dir(out: str | Path, protocol: str, run_name: str, seed: int) -> Path:
    return Path(out) / protocol / run_name / f"seed{seed}"


MANIFEST_MAX_BYTES = 1 << 20       # a manifest is a few KB


def damaged(path: Path, what: str) -> UserError:
    """The one-line error for a run file that cannot be read back."""
    return UserError(f"{path}: {what}; the run directory is damaged: start it over with --force "
                     "(or restore the file from a backup)")


def check_out_root(out: str | Path) -> Path:
    """--out must be a folder (or not exist yet)."""
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; point --out at a folder for the run directories")
    return root


class RunStore:
    def __init__(self, path: Path, root: str | Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else None   # --out: nothing is removed outside it
        self._identity: dict | None = None

    def exists(self) -> bool:
        return (self.path / "manifest.json").exists() or (self.path / "config.yaml").exists()

    def check_free(self, force: bool) -> None:
        """Stop early (before any work) when the directory is taken and --force was not given."""
        if self.path.exists() and any(p.name != LOCK_NAME for p in self.path.iterdir()) and not force:
            raise UserError(f"run directory {self.path} already exists: pass --resume to continue it "
                            "or --force to replace it")

    def create(self, force: bool) -> None:
        self.check_free(force)
        if self.path.exists():
            self.check_inside_root()
            for entry in self.path.iterdir():   # the lock file stays: this process owns the directory
                if entry.name == LOCK_NAME:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        self.path.mkdir(parents=True, exist_ok=True)

    def check_inside_root(self) -> None:
        """--force removes the run directory's contents; refuse when (through a link, say) that directory is
        not really below --out, or when it holds a link or special file cilbench did not create (a planted
        `.lock -> ~/notes` would otherwise be written through)."""
        check_no_foreign_entries(self.path, "run directory")
        if self.root is None:
            return
        real, root = self.path.resolve(), self.root.resolve()
        if real == root or root not in real.parents:
            raise UserError(f"run directory {self.path} resolves to {real}, outside --out {root}; "
                            "refusing to remove anything there")

    # --- files ----------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        self._identity = None

    def read_config(self) -> dict:
        path = self.path / "config.yaml"
        try:
            data = safe_yaml_load(path)
        except UserError as exc:
            raise damaged(path, str(exc).removeprefix(f"{path}: ")) from None
        if not isinstance(data, dict):
            raise damaged(path, "not a run configuration (expected a mapping)")
        return data

    def write_manifest(self, manifest: dict) -> None:
        manifest = {**manifest, "identity": self.identity()} if (self.path / "config.yaml").exists() else manifest
        atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=2))

    def read_manifest(self) -> dict:
        path = self.path / "manifest.json"
        try:
            data = json.loads(read_bounded(path, MANIFEST_MAX_BYTES, "a run manifest").decode("utf-8"))
        except UserError as exc:
            raise damaged(path, str(exc).removeprefix(f"{path}: ")) from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise damaged(path, "truncated or not JSON") from None
        if not isinstance(data, dict):
            raise damaged(path, "not a run manifest (expected a JSON object)")
        return data

    def write_steps(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        extra = [k for row in rows for k in row if k not in STEP_FIELDS]   # method/harness extras, in order
        writer = csv.DictWriter(buf, fieldnames=STEP_FIELDS + list(dict.fromkeys(extra)))
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.path / "steps.csv", buf.getvalue())

    def write_matrix(self, name: str, rows: list[list[float]]) -> None:
        T = len(rows)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["after_task"] + [f"task{j}" for j in range(T)])
        for i, row in enumerate(rows):
            writer.writerow([i] + [f"{v:.4f}" for v in row] + [""] * (T - len(row)))
        atomic_write(self.path / name, buf.getvalue())

    def write_metrics(self, metrics: dict) -> None:
        atomic_write(self.path / "metrics.json", json.dumps(metrics, indent=2))

    def append_event(self, event: dict) -> None:
        append_line(self.path / "events.jsonl", json.dumps(event))

    def truncate_events(self, keep_tasks_below: int) -> None:
        path = self.path / "events.jsonl"
        if not path.exists():
            return
        lines = [line for line in path.read_bytes().decode("utf-8", errors="replace").splitlines() if line.strip()]
        kept = []
        for k, line in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                if k == len(lines) - 1:    # a line torn by a kill mid-write: that epoch is replayed anyway
                    continue
                raise damaged(path, f"line {k + 1} is not JSON") from None
            if isinstance(event, dict) and event.get("task", 0) < keep_tasks_below:
                kept.append(line)
        atomic_write(path, "".join(line + "\n" for line in kept))

    # --- checkpoint -----------------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> None:
        state = {**state, "identity": {**self.identity(), "task": state["next_task"]}}
        atomic_write(self.path / "checkpoint.pt", lambda fh: torch.save(state, fh))

    def load_checkpoint(self, device) -> dict | None:
        path = self.path / "checkpoint.pt"
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception:   # truncated, empty, or not ours; never pass on torch's weights_only=False advice
            raise damaged(path, "truncated or not a cilbench checkpoint") from None
        if not isinstance(state, dict) or not CHECKPOINT_KEYS <= set(state):
            raise damaged(path, "not a cilbench checkpoint")
        self.check_checkpoint(state)
        return state

    # --- identity -------------------------------------------------------------------------------------
    def identity(self) -> dict:
        """Which run this is: protocol, method and seed from config.yaml, and the SHA-256 of config.yaml
        (the fully resolved configuration, written once when the run starts)."""
        if self._identity is None:
            path = self.path / "config.yaml"
            text = read_bounded(path, 1 << 20, "a run configuration")
            config = self.read_config()
            protocol = config.get("protocol")
            self._identity = {"protocol": protocol.get("name") if isinstance(protocol, dict) else None,
                              "method": config.get("method"), "seed": config.get("seed"),
                              "config_sha256": hashlib.sha256(text).hexdigest()}
        return self._identity

    def check_checkpoint(self, state: dict) -> None:
        """Refuse a checkpoint of another run (another protocol, method, seed or configuration: copied in, or
        left by a run that was replaced) and one whose task index does not fit this run's manifest."""
        path = self.path / "checkpoint.pt"
        manifest = self.read_manifest() if (self.path / "manifest.json").exists() else {}
        stamp = state.get("identity")
        if stamp is None and "identity" not in manifest:
            stamp = None                       # a run started before identities were recorded: as before
        elif not isinstance(stamp, dict) or {k: v for k, v in stamp.items() if k != "task"} != self.identity():
            raise UserError(f"{path}: belongs to another run ({_describe(stamp)}), not this one "
                            f"({_describe(self.identity())}); remove it to restart from the first task, or "
                            "start over with --force")
        self._check_task_index(state, manifest)

    def _check_task_index(self, state: dict, manifest: dict) -> None:
        """next_task must be a task of this run, agree with the results stored beside it, and be the task the
        manifest counts as done (or one more: the checkpoint is written just before the manifest)."""
        path = self.path / "checkpoint.pt"
        nxt, total, done = state["next_task"], manifest.get("tasks_total"), manifest.get("tasks_done")
        lengths = {len(state[k]) if isinstance(state[k], list) else -1 for k in ("steps", "acc", "acc5")}
        ok = (isinstance(nxt, int) and not isinstance(nxt, bool) and nxt >= 1 and lengths == {nxt}
              and (not isinstance(total, int) or nxt <= total)
              and (not isinstance(done, int) or nxt in (done, done + 1))
              and (state.get("identity") or {}).get("task", nxt) == nxt)
        if not ok:
            raise damaged(path, f"continues from task {nxt!r}, which does not fit this run "
                          f"({done} of {total} tasks done, {sorted(lengths)} step records)")


CHECKPOINT_KEYS = {"next_task", "method", "memory", "steps", "acc", "acc5"}


def _describe(identity: Any) -> str:
    if not isinstance(identity, dict):
        return "no identity recorded"
    return (f"protocol {identity.get('protocol')}, method {identity.get('method')}, seed {identity.get('seed')}, "
            f"config {str(identity.get('config_sha256'))[:12]}")


# --------------------------------------------------------------------------------------------------------
# Reading runs back (report, summary, sweep status, demo, bench). Nothing here raises on a bad directory:
# every file is checked (finite numbers, the right shapes, bounded YAML) and a run that fails a check keeps
# the reason and is listed, never averaged.

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


def read_metrics(path: Path, fields: list[str] | None = None) -> dict:
    """metrics.json; `fields` (default: every top-level number) must be finite numbers where present."""
    data = json.loads(read_text(path))
    if not isinstance(data, dict):
        raise ValueError(f"metrics.json is a {type(data).__name__}, not an object")
    if fields is None:
        fields = [k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for key in fields:
        if data.get(key) is not None:
            _finite(data[key], f"metrics.json {key}")
    return data


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(path: Path, protocol: str, run_name: str, seed: int, metric_fields: list[str] | None = None) -> SeedRun:
    """Read one run directory. Never raises: a broken directory gets a status and the reason."""
    fields = metric_fields
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


def manifest_of(path: Path) -> dict | None:
    """A run's manifest for status readers (sweep, demo): None when it has none, {} when it cannot be read."""
    manifest_path = Path(path) / "manifest.json"
    if not manifest_path.exists():
        return None
    try:
        data = json.loads(read_text(manifest_path))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_events(path: Path) -> list[dict]:
    """The per-epoch events of events.jsonl with finite task, loss and lr (method messages and a torn or
    foreign line are skipped)."""
    try:
        text = read_text(path, 8 * MAX_FILE_BYTES)
    except (OSError, ValueError):
        return []
    events = []
    for line in text.splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if not isinstance(e, dict):
            continue
        values = [e.get("task"), e.get("loss"), e.get("lr")]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            events.append(e)
    return events
