"""`make demo`: real methods on the embedded digits protocol, offline on a CPU, then the summary table and
the HTML report. Complete runs already under results/runs are reused (set DEMO_FORCE=1 to redo them)."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import UserError
from .runner import RunRequest, execute
from .store import run_dir

PROTOCOL = os.environ.get("DEMO_PROTOCOL", "digits_b0s2")
RUNS = Path(os.environ.get("DEMO_RUNS", "results/runs"))
REPORT = Path(os.environ.get("DEMO_REPORT", "results/report"))
# (method, --set overrides, run name)
DEMO_RUNS = [
    ("finetune", [], "finetune"),
    ("replay", [], "replay"),
    ("joint", [], "joint"),
    ("der", [], "der"),
    ("der_prune", [], "der_prune"),
    ("tsd_grc", ["tsd_grc.n_extractors=2"], "tsd_grc+N2"),
    ("tsd_fixed", ["tsd_fixed.n_extractors=2"], "tsd_fixed+N2"),
    ("tsd_fixed", ["tsd_fixed.n_extractors=3"], "tsd_fixed+N3"),
]


def _complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "complete"


def main() -> int:
    console = Console()
    force = os.environ.get("DEMO_FORCE") == "1"
    epochs = int(os.environ["DEMO_EPOCHS"]) if os.environ.get("DEMO_EPOCHS") else None
    console.print(f"cilbench demo: {len(DEMO_RUNS)} runs on {PROTOCOL} (CPU, offline), results in {RUNS}")
    rows = []
    for method, overrides, name in DEMO_RUNS:
        path = run_dir(RUNS, PROTOCOL, name, 0)
        t0 = time.perf_counter()
        if _complete(path) and not force:
            console.print(f"  {name:<14} reused {path}")
        else:
            console.print(f"  {name:<14} running ...", end="")
            try:
                path = execute(RunRequest(method=method, protocol=PROTOCOL, overrides=overrides, out=str(RUNS),
                                          force=True, quiet=True, epochs=epochs))
            except UserError as exc:
                console.print(f"\nerror: {exc}")
                return 2
            console.print(f" {time.perf_counter() - t0:.0f}s")
        metrics = json.loads((path / "metrics.json").read_text())
        rows.append((name, metrics))
    table = Table(title=f"cilbench demo on {PROTOCOL} (seed 0)")
    for col in ("method", "Avg", "Last", "BWT", "#extractors", "#params (M)", "train s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for name, m in rows:
        bwt = "-" if m["bwt"] is None else f"{m['bwt']:.2f}"
        table.add_row(name, f"{m['avg_acc']:.2f}", f"{m['last_acc']:.2f}", bwt, str(m["extractors_last"]),
                      f"{m['params_last'] / 1e6:.3f}", f"{m['train_seconds']:.0f}")
    console.print(table)
    try:
        from .report import build_report
        index = build_report(RUNS, REPORT, protocols=[PROTOCOL])
        console.print(f"report: {index} (open it in a browser)")
    except ImportError:
        console.print("report: not available in this version")
    return 0


if __name__ == "__main__":
    sys.exit(main())
