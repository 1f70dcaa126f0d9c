"""`make demo`: every method of the harness on the embedded digits cards, on a CPU, then one summary table and
the HTML report. Complete runs already under results/runs are reused (set DEMO_FORCE=1 to redo them).

The demo keeps each card's own budget except where one phase dominates the wall time: TSD's distillation
runs 12 epochs instead of the reduced cards' 24 so that the whole demo fits in about three minutes on two
CPU cores. The paper cards are untouched.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cilbench.errors import UserError
from cilbench.run.rundir import manifest_of, read_metrics, run_dir
from cilbench.run.runner import RunRequest, execute

RUNS = Path(os.environ.get("DEMO_RUNS", "results/runs"))
REPORT = Path(os.environ.get("DEMO_REPORT", "results/report"))
DEMO_KD_EPOCHS = 12
# (protocol, method, --set overrides, run name): offline B0, offline B4 (EXACFS's B50-like setting), online
DEMO_RUNS = [
    ("digits_b0s2", "finetune", [], "finetune"),
    ("digits_b0s2", "replay", [], "replay"),
    ("digits_b0s2", "der", [], "der"),
    ("digits_b0s2", "der_prune", [], "der_prune"),
    ("digits_b0s2", "foster", [], "foster"),
    ("digits_b0s2", "tsd_grc", ["tsd_grc.n_extractors=2", f"tsd_grc.kd_epochs={DEMO_KD_EPOCHS}"], "tsd_grc+N2"),
    ("digits_b0s2", "tsd_fixed", ["tsd_fixed.n_extractors=2", f"tsd_fixed.kd_epochs={DEMO_KD_EPOCHS}"],
     "tsd_fixed+N2"),
    ("digits_b0s2", "seed", [], "seed"),
    ("digits_b0s2", "joint", [], "joint"),
    ("digits_b4s2", "finetune", [], "finetune"),
    ("digits_b4s2", "replay", [], "replay"),
    ("digits_b4s2", "exacfs", [], "exacfs"),
    ("digits_online_b0s2", "er", [], "er"),
    ("digits_online_b0s2", "pcr", [], "pcr"),
    ("digits_online_b0s2", "hpcr", [], "hpcr"),
]


def _complete(path: Path) -> bool:
    return (manifest_of(path) or {}).get("status") == "complete"


def _run_all(console: Console, force: bool, epochs: int | None) -> list[tuple[str, str, dict]] | None:
    rows = []
    for protocol, method, overrides, name in DEMO_RUNS:
        path = run_dir(RUNS, protocol, name, 0)
        label = f"{protocol} {name}"
        t0 = time.perf_counter()
        if _complete(path) and not force:
            console.print(f"  {escape(label):<32} reused {escape(str(path))}")
        else:
            console.print(f"  {escape(label):<32} running ...", end="")
            try:
                path = execute(RunRequest(method=method, protocol=protocol, overrides=overrides, out=str(RUNS),
                                          force=True, quiet=True, epochs=epochs))
            except UserError as exc:
                console.print(f"\nerror: {escape(str(exc))}")
                return None
            console.print(f" {time.perf_counter() - t0:.0f}s")
        rows.append((protocol, name, read_metrics(path / "metrics.json")))
    return rows


def _summary(rows: list[tuple[str, str, dict]]) -> Table:
    table = Table(title="cilbench demo, seed 0 (Avg: mean top-1 over steps incl. the first; Last: after the last "
                        "step; BWT: backward transfer)")
    for col in ("protocol", "method", "Avg", "Last", "BWT", "#ext", "#params M", "train s"):
        table.add_column(col, justify="left" if col in ("protocol", "method") else "right", no_wrap=True)
    for i, (protocol, name, m) in enumerate(rows):
        if i and protocol != rows[i - 1][0]:
            table.add_section()
        bwt = "-" if m.get("bwt") is None else f"{m['bwt']:.2f}"
        table.add_row(escape(protocol), escape(name), f"{m['avg_acc']:.2f}", f"{m['last_acc']:.2f}", bwt,
                      str(m["extractors_last"]), f"{m['params_last'] / 1e6:.3f}", f"{m['train_seconds']:.0f}")
    return table


def main() -> int:
    console = Console(width=max(Console().width, 100))   # the summary table needs 100 columns
    force = os.environ.get("DEMO_FORCE") == "1"
    epochs = int(os.environ["DEMO_EPOCHS"]) if os.environ.get("DEMO_EPOCHS") else None
    protocols = sorted({p for p, *_ in DEMO_RUNS})
    console.print(f"cilbench demo: {len(DEMO_RUNS)} runs on {', '.join(protocols)} (CPU), results in {RUNS}")
    t0 = time.perf_counter()
    rows = _run_all(console, force, epochs)
    if rows is None:
        return 2
    console.print(_summary(rows))
    from cilbench.report import build_report
    try:
        index = build_report(RUNS, REPORT, protocols=protocols)
    except UserError as exc:
        console.print(f"error: {escape(str(exc))}")
        return 2
    console.print(f"report: {escape(str(index))} (open it in a browser); demo took {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
