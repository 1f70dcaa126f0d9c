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
import importlib

# Imported on first use: `import cilbench.report.plots` (a figure worker's import) does not import torch.
_EXPORTS = {
    "cilbench.report.aggregate": ["METRICS", "Metric", "RunGroup", "default_metrics", "display_name", "group_runs",
                                  "mean_ci95", "mean_std", "resolve_metrics", "strip_n_tag"],
    "cilbench.report.build": ["MANIFEST", "build_report"],
    "cilbench.report.reference": ["REFERENCE_DIR", "RefCurve", "RefRow", "load_reference"],
    "cilbench.report.tables": ["Column", "Row", "Stat", "Table", "protocol_table", "status_text", "to_rich"],
    "cilbench.run.rundir": ["SeedRun", "load_yaml_bounded", "read_run", "scan_runs"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cilbench.report' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
