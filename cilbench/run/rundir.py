"""Run directory: every file a run writes, written atomically (temp file + rename).

    <out>/<protocol>/<method>[+<tag>]/seed<k>/
        config.yaml  manifest.json  steps.csv  acc_matrix.csv  metrics.json  events.jsonl  checkpoint.pt
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from cilbench.errors import UserError
from cilbench.run.lock import LOCK_NAME
from cilbench.safeio import safe_yaml_load

# params = params_total (backbones + classifier); params_backbone counts the extractors only (DER's #Paras)
STEP_FIELDS = ["step", "classes_seen", "top1", "top5", "extractors", "params", "memory_size",
               "memory_bytes", "memory_payload_bytes", "train_seconds", "eval_seconds", "params_backbone",
               "params_total", "fit_seconds", "statistics_seconds", "herding_seconds"]
# metrics.json entries that are wall-clock times: they differ between two runs with equal results
TIMING_METRICS = ("train_seconds", "eval_seconds", "time_split")


def run_dir(out: str | Path, protocol: str, run_name: str, seed: int) -> Path:
    return Path(out) / protocol / run_name / f"seed{seed}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        not really below --out."""
        if self.root is None:
            return
        real, root = self.path.resolve(), self.root.resolve()
        if real == root or root not in real.parents:
            raise UserError(f"run directory {self.path} resolves to {real}, outside --out {root}; "
                            "refusing to remove anything there")

    # --- files ----------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

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
        atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=2))

    def read_manifest(self) -> dict:
        path = self.path / "manifest.json"
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
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
        with open(self.path / "events.jsonl", "a") as fh:
            fh.write(json.dumps(event) + "\n")

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
        path = self.path / "checkpoint.pt"
        tmp = path.with_name(".checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

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
        return state


CHECKPOINT_KEYS = {"next_task", "method", "memory", "steps", "acc", "acc5"}


def read_matrix(path: Path) -> list[list[float]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))[1:]
    return [[float(v) for v in row[1:] if v != ""] for row in rows]
