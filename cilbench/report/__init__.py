"""`cilbench report`: scan run directories, aggregate seeds, write paper-style tables, plots and index.html.

    <runs>/<protocol>/<run_name>/seed<k>/{config.yaml, manifest.json, steps.csv, acc_matrix*.csv, metrics.json}

The package, one idea per module:
    runs.py       reading run directories (bounded, never raising: a bad directory keeps its reason)
    aggregate.py  metrics, mean ± std / 95% CI over seeds, readable names, row order, RunGroup
    reference.py  published numbers (results/reference/*.csv) and how they line up with ours (Δ, class orders)
    tables.py     the table model, the report's tables and their formats (Markdown, LaTeX, CSV, HTML, rich)
    figures.py    the plots of one protocol and the training curves (drawing: cilbench.report.plots)
    page.py       index.html
    build.py      build_report: everything above into one output folder, with a manifest of its files

Output (under `out`):
    index.html                               everything below, linked relatively (opens offline)
    tables/<protocol>.{md,tex,csv}           one table per protocol; <protocol>_compact.tex for a paper column
    tables/<protocol>_steps.{md,tex,csv}     accuracy after each step
    tables/summary.{md,tex,csv}              protocols as column groups
    tables/runs.csv                          every seed directory found, with its status
    plots/*.png + *.pdf                      accuracy per step, per-task accuracy, heatmaps, vs #extractors, vs #params
    plots/training/*.png + *.pdf             loss and lr per epoch of each run
    reference/*.csv                          copy of the published numbers used
    .cilbench-report.json                    the files above (the next report removes only these)
"""
from cilbench.report.aggregate import (
    METRICS,
    Metric,
    RunGroup,
    default_metrics,
    display_name,
    group_runs,
    mean_ci95,
    mean_std,
    resolve_metrics,
    strip_n_tag,
)
from cilbench.report.build import MANIFEST, build_report
from cilbench.report.reference import REFERENCE_DIR, RefCurve, RefRow, load_reference
from cilbench.report.tables import Column, Row, Stat, Table, protocol_table, status_text, to_rich
from cilbench.run.rundir import SeedRun, load_yaml_bounded, read_run, scan_runs

__all__ = ["METRICS", "MANIFEST", "REFERENCE_DIR", "Column", "Metric", "RefCurve", "RefRow", "Row", "RunGroup",
           "SeedRun", "Stat", "Table", "build_report", "default_metrics", "display_name", "group_runs",
           "load_reference", "load_yaml_bounded", "mean_ci95", "mean_std", "protocol_table", "read_run",
           "resolve_metrics", "scan_runs", "status_text", "strip_n_tag", "to_rich"]
