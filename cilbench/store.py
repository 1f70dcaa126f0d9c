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

from .errors import UserError

STEP_FIELDS = ["step", "classes_seen", "top1", "top5", "extractors", "params", "memory_size",
               "memory_bytes", "memory_payload_bytes", "train_seconds", "eval_seconds"]


def run_dir(out: str | Path, protocol: str, run_name: str, seed: int) -> Path:
    return Path(out) / protocol / run_name / f"seed{seed}"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunStore:
    def __init__(self, path: Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "manifest.json").exists() or (self.path / "config.yaml").exists()

    def check_free(self, force: bool) -> None:
        """Stop early (before any work) when the directory is taken and --force was not given."""
        if self.path.exists() and any(self.path.iterdir()) and not force:
            raise UserError(f"run directory {self.path} already exists: pass --resume to continue it "
                            "or --force to replace it")

    def create(self, force: bool) -> None:
        self.check_free(force)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    # --- files ----------------------------------------------------------------------------------------
    def write_config(self, config: dict) -> None:
        atomic_write(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def read_config(self) -> dict:
        with open(self.path / "config.yaml") as fh:
            return yaml.safe_load(fh)

    def write_manifest(self, manifest: dict) -> None:
        atomic_write(self.path / "manifest.json", json.dumps(manifest, indent=2))

    def read_manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def write_steps(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=STEP_FIELDS)
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
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("task", 0) < keep_tasks_below]
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
        return torch.load(path, map_location=device, weights_only=True)


def read_matrix(path: Path) -> list[list[float]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))[1:]
    return [[float(v) for v in row[1:] if v != ""] for row in rows]
