"""`make demo`: every method of the harness on the embedded digits cards, on a CPU, then one summary table and
the HTML report. Complete runs already under results/runs are reused (set DEMO_FORCE=1 to redo them).

The demo keeps each card's own budget except where one phase dominates the wall time: TSD's distillation and
FOSTER's compression run the card's training epochs (8) instead of the reduced cards' 3 x 8, DyTox 30 + 5 fine-tuning
epochs instead of 50 + 20, so that the whole demo fits in three minutes on two CPU cores. The paper cards are
untouched.

The runs go to DEMO_WORKERS worker processes (default 2, at most one per core), each with one torch thread;
progress lines and the table keep DEMO_RUNS' order whichever run finishes first, and a run that fails is
reported while the others go on.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cilbench.data.protocol import load_card
from cilbench.errors import UserError
from cilbench.run.rundir import manifest_of, read_metrics, run_dir
from cilbench.run.runner import RunRequest, execute

RUNS = Path(os.environ.get("DEMO_RUNS", "results/runs"))
REPORT = Path(os.environ.get("DEMO_REPORT", "results/report"))
DEMO_KD_EPOCHS = load_card("digits_b0s2")["train"]["epochs"]   # distillation at the card's training epochs
DEMO_DYTOX_EPOCHS, DEMO_DYTOX_FT_EPOCHS = 30, 5
# (protocol, method, --set overrides, run name): offline B0, offline B4 (EXACFS's B50-like setting), online
DEMO_RUNS = [
    ("digits_b0s2", "finetune", [], "finetune"),
    ("digits_b0s2", "replay", [], "replay"),
    ("digits_b0s2", "der", [], "der"),
    ("digits_b0s2", "der_prune", [], "der_prune"),
    ("digits_b0s2", "dytox", [f"dytox.epochs={DEMO_DYTOX_EPOCHS}", f"dytox.ft_epochs={DEMO_DYTOX_FT_EPOCHS}"],
     "dytox"),
    ("digits_b0s2", "foster", [f"foster.compression_epochs={DEMO_KD_EPOCHS}"], "foster"),
    ("digits_b0s2", "memo", [], "memo"),
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


def _one_thread() -> None:
    """A worker's start: one torch thread, so two workers share two cores without oversubscribing them."""
    import torch
    torch.set_num_threads(1)


def _execute(protocol: str, method: str, overrides: list[str], out: str,
             epochs: int | None) -> tuple[str, str, float]:
    """One demo run in a worker: ("ok", run directory, seconds) or ("error", one line, seconds). Errors come back
    as text, so a failing run (or an exception that cannot be pickled) never stops the others."""
    t0 = time.perf_counter()
    try:
        path = execute(RunRequest(method=method, protocol=protocol, overrides=overrides, out=out, force=True,
                                  quiet=True, epochs=epochs))
        return "ok", str(path), time.perf_counter() - t0
    except UserError as exc:
        return "error", str(exc), time.perf_counter() - t0
    except Exception as exc:   # a method's bug, a diverged run: report it and let the other runs finish
        return "error", f"{type(exc).__name__}: {exc}", time.perf_counter() - t0


# Demo run times on 2 idle CPU cores, two workers (seconds, rounded): the longest runs are submitted first, so the
# two workers finish together instead of one starting DER while the other has nothing left.
EXPECTED_SECONDS = {"dytox": 25, "tsd_fixed": 25, "der_prune": 23, "tsd_grc": 23, "foster": 22, "der": 20,
                    "memo": 19, "joint": 15, "exacfs": 11, "replay": 8}


def _longest_first(method: str) -> float:
    return -EXPECTED_SECONDS.get(method, 10)


def workers() -> int:
    """DEMO_WORKERS (default 2), at most one per core."""
    text = os.environ.get("DEMO_WORKERS") or "2"
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"DEMO_WORKERS={text!r}: give a number of worker processes >= 1, e.g. DEMO_WORKERS=2")
    return min(int(text), os.cpu_count() or 1)


def _run_all(console: Console, force: bool, epochs: int | None) -> tuple[list[tuple[str, str, dict]], int]:
    """Every run of DEMO_RUNS (complete ones reused unless `force`), in worker processes; the rows of the runs
    that completed, in DEMO_RUNS' order, and how many failed."""
    jobs: dict[int, Future] = {}
    done: dict[int, tuple[str, str, float]] = {}
    for i, (protocol, method, overrides, name) in enumerate(DEMO_RUNS):
        path = run_dir(RUNS, protocol, name, 0)
        if _complete(path) and not force:
            done[i] = ("reused", str(path), 0.0)
    todo = [i for i in range(len(DEMO_RUNS)) if i not in done]
    pool = None
    if todo:   # spawn: a fresh interpreter, never a fork of a process that already runs torch's thread pools
        pool = ProcessPoolExecutor(min(workers(), len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_one_thread)
        for i in sorted(todo, key=lambda i: _longest_first(DEMO_RUNS[i][1])):
            protocol, method, overrides, _ = DEMO_RUNS[i]
            jobs[i] = pool.submit(_execute, protocol, method, list(overrides), str(RUNS), epochs)
    rows, failed = [], 0
    try:
        for i, (protocol, _, _, name) in enumerate(DEMO_RUNS):   # printed in this order, whoever finishes first
            label = f"{protocol} {name}"
            if i in jobs:
                try:
                    done[i] = jobs[i].result()
                except Exception as exc:      # the worker itself died (killed, out of memory)
                    done[i] = ("error", f"worker lost ({type(exc).__name__}: {exc})", 0.0)
            status, detail, seconds = done[i]
            if status == "error":
                failed += 1
                console.print(f"  {escape(label):<32} failed: {escape(detail)}")
                continue
            what = "reused" if status == "reused" else f"{seconds:.0f}s"
            console.print(f"  {escape(label):<32} {what} {escape(detail) if status == 'reused' else ''}".rstrip())
            rows.append((protocol, name, read_metrics(Path(detail) / "metrics.json")))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows, failed


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
    try:
        workers()
    except UserError as exc:
        console.print(f"error: {escape(str(exc))}")
        return 2
    rows, failed = _run_all(console, force, epochs)
    if rows:
        console.print(_summary(rows))
    if failed:
        console.print(f"error: {failed} of {len(DEMO_RUNS)} runs failed (above); the table and report show the rest")
    if not rows:
        return 2
    from cilbench.report import build_report
    try:
        index = build_report(RUNS, REPORT, protocols=protocols)
    except UserError as exc:
        console.print(f"error: {escape(str(exc))}")
        return 2
    console.print(f"report: {escape(str(index))} (open it in a browser); demo took {time.perf_counter() - t0:.0f}s")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
