"""The one-run summary `cilbench run` prints at the end."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_run_summary(path: Path, console: Console | None = None) -> None:
    console = console or Console()
    manifest = json.loads((path / "manifest.json").read_text())
    with open(path / "steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    table = Table(title=f"{manifest['run_name']} on {manifest['protocol']} (seed {manifest['seed']}): "
                        f"{manifest['status']}")
    for col in ("step", "classes", "top-1", "top-5", "#extractors", "#params (M)", "train s", "eval s"):
        table.add_column(col, justify="right")
    for s in steps:
        table.add_row(s["step"], s["classes_seen"], _fmt(float(s["top1"])), _fmt(float(s["top5"])),
                      s["extractors"], _fmt(int(s["params"]) / 1e6, 3), _fmt(float(s["train_seconds"]), 1),
                      _fmt(float(s["eval_seconds"]), 1))
    console.print(table)
    metrics_path = path / "metrics.json"
    if metrics_path.exists() and manifest["status"] == "complete":
        m = json.loads(metrics_path.read_text())
        console.print(f"Avg {_fmt(m['avg_acc'])}  Last {_fmt(m['last_acc'])}  BWT {_fmt(m['bwt'])}  "
                      f"Forgetting {_fmt(m['forgetting'])}  Avg top-5 {_fmt(m['avg_acc_top5'])}")
    else:
        console.print(f"status {manifest['status']}: {manifest.get('error') or ''}")
    console.print(f"results: {path}")
