"""The one-run summary `cilbench run` prints at the end, in the report's table style (cilbench.report):
the per-step table, then the run's row as `cilbench report` shows it, with the published rows of the same
method and protocol and the differences where protocol, backbone and memory match."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from rich.console import Console

from cilbench.errors import UserError
from cilbench.report import (
    Column,
    Row,
    RunGroup,
    Stat,
    Table,
    default_metrics,
    load_reference,
    protocol_table,
    read_run,
    status_text,
    to_rich,
)
from cilbench.run.rundir import read_steps


def _steps(path: Path) -> list[dict]:
    """Per-step rows of a run of any status (empty when steps.csv is missing or unreadable)."""
    try:
        return read_steps(path / "steps.csv")
    except (OSError, ValueError):
        return []


def steps_table(title: str, steps: list[dict]) -> Table:
    """Accuracy and footprint after each step of one run."""
    cols = [Column("step", "Task"), Column("classes", "Classes"), Column("top1", "Top-1"), Column("top5", "Top-5"),
            Column("ext", "#Ext"), Column("params", "#Params M"), Column("train", "Train s"),
            Column("eval", "Eval s")]
    rows = []
    for s in steps:   # tasks are numbered from 1 wherever a person reads them
        params = s["params"] / 1e6
        rows.append(Row("ours", {
            "step": Stat(s["step"] + 1, digits=0), "classes": Stat(s["classes_seen"], digits=0),
            "top1": Stat(s["top1"]), "top5": Stat(s["top5"]), "ext": Stat(s["extractors"], digits=0),
            "params": Stat(params, digits=2 if params >= 1 else 3),
            "train": Stat(s["train_seconds"], digits=1), "eval": Stat(s["eval_seconds"], digits=1)}))
    return Table(title, cols, rows)


WIDTH = 100    # the one-run tables fit a 100-column terminal

# For one run: one value per footprint column (seeds, averages of one seed and the backbone are said once).
ONE_RUN_LABELS = {"ext_last": "#Ext", "params_last": "#Params M", "params_bb_avg": "#Params M (backbone, avg)"}
ONE_RUN_DROP = {"seeds", "backbone", "ext_avg", "params_avg", "source"}


def print_run_summary(path: Path, console: Console | None = None) -> None:
    if console is None:    # a terminal narrower than WIDTH keeps its width; a pipe (sweeps, CI) gets WIDTH
        terminal = Console()
        console = Console(width=min(terminal.width, WIDTH)) if terminal.is_terminal else Console(width=WIDTH)
    path = Path(path)
    digits = path.name[4:]
    run = read_run(path, path.parent.parent.name, path.parent.name, int(digits) if digits.isdigit() else 0)
    steps = _steps(path)
    if steps:
        console.print(to_rich(steps_table(f"{run.run_name} on {run.protocol} (seed {run.seed}): {run.status}",
                                          steps)))
    if not run.ok:
        console.print(f"status {status_text(run)}", markup=False, highlight=False)
        console.print(f"results: {path}", markup=False, highlight=False)
        return
    group = RunGroup(run.protocol, run.run_name, [run])
    try:
        refs, _ = load_reference()
    except UserError:
        refs = []
    refs = [r for r in refs if r.protocol == run.protocol and r.match and r.match in (run.method, run.run_name)]
    metrics = default_metrics(group.dataset, group.regime, {run.method})
    table = protocol_table(run.protocol, [group], refs,
                           metrics + ([] if "forgetting" in metrics else ["forgetting"]))
    table.title = "Result (as in `cilbench report`)"
    sources = [(table.cell_text(r, c), table.cell_text(r, next(c for c in table.columns if c.key == "source")))
               for r in table.rows for c in table.columns[:1]]
    columns = []
    for c in table.columns:   # the terminal is narrow: one value per idea, no empty columns
        if c.key in ONE_RUN_DROP or not any(table.cell_text(r, c) not in ("", "–") for r in table.rows):
            continue
        if c.key in ONE_RUN_LABELS:
            c = replace(c, label=ONE_RUN_LABELS[c.key])
        columns.append(c)
    if any(c.key == "params_bb_avg" for c in columns) and any(c.key == "params_last" for c in columns) \
            and all(r.kind != "published" for r in table.rows):
        columns = [c for c in columns if c.key != "params_bb_avg"]   # ours alone: the total says it
    table.columns = columns
    console.print(to_rich(table))
    console.print(f"  backbone: {group.backbone}", markup=False, highlight=False)
    for name, source in sources:
        if source:
            console.print(f"  {name}: {source}", markup=False, highlight=False)
    for note in table.notes[1:]:
        console.print(f"  {note}", style="dim", markup=False, highlight=False)
    console.print(f"results: {path}", markup=False, highlight=False)
