"""index.html: one self-contained page (no scripts, no network; every link relative, so it opens from disk)."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

from cilbench.report.tables import run_info, status_text
from cilbench.run.rundir import SeedRun
from cilbench.safeio import atomic_write

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1500px;
color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.6em;margin-bottom:2px}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
p.made{color:#666;font-size:13px;margin-top:0}
table.results{border-collapse:collapse;font-size:13px;margin:8px 0}
table.results th,table.results td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
table.results th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.published td{background:#eef6ff;font-style:italic}tr.delta td{background:#fafafa;color:#555;font-size:12px}
tr.incomplete td{color:#999;text-decoration:line-through}tr.bound td:first-child{color:#555}
span.tag{font-size:10px;background:#3178c6;color:#fff;border-radius:3px;padding:0 4px;font-style:normal}
ul.notes{font-size:12px;color:#555}.plots img{max-width:100%;border:1px solid #eee;margin:6px 0}
.plots figure{margin:10px 0}figcaption{font-size:12px;color:#555}.links a{margin-right:10px;font-size:13px}
nav a{margin-right:12px}dl.legend{font-size:13px;background:#f8f8f8;border:1px solid #e3e3e3;padding:8px 14px}
dl.legend dt{font-weight:600;float:left;clear:left;width:150px}dl.legend dd{margin-left:160px;margin-bottom:3px}
table.settings{font-size:13px;border-collapse:collapse}table.settings td{padding:1px 10px 1px 0;vertical-align:top}
table.settings td:first-child{color:#666}details{margin:8px 0}summary{cursor:pointer;font-size:14px}
"""

LEGEND = [
    ("Avg", "average incremental accuracy: the mean over all steps, base step included, of top-1 accuracy on "
            "the test samples of all classes seen so far (per sample, over all seen classes)."),
    ("Last", "the same top-1 accuracy after the last step."),
    ("BWT", "backward transfer: mean over the tasks before the last of a[T][j] − a[j][j], the accuracy on task "
            "j's classes after the last step minus right after learning task j (negative = forgetting)."),
    ("Forgetting", "mean over the tasks before the last of max over earlier steps of a[i][j] − a[T][j] (HPCR Eq. "
                   "29; lower is better)."),
    ("task mean", "Avg (task mean) and Last (task mean): A_i is the mean over seen tasks of a[i][j] instead of "
                  "the mean over samples (FACIL, SEED, HPCR Eq. 27-28). Equal to the per-sample form when every "
                  "task has as many test samples."),
    ("top-5", "the same with top-5 accuracy (ImageNet, as DER reports)."),
    ("#Ext, #Params", "extractors and parameters (millions) used at inference; total = extractors + classifier, "
                      "backbone = extractors only, which is what the papers' #Params count."),
    ("±", "sample std over seeds (offline tables) or the 95% confidence interval t·s/√n over seeds (online "
          "tables, as HPCR reports). Bold = best, underlined = second best of our rows, bounds excluded."),
    ("rows", "Finetune (lower bound) first, Joint (upper bound) last. Published rows are the papers' numbers as "
             "printed; Δ = ours − published where protocol, backbone and memory match, marked (≠ class order) "
             "where the class orders differ or are not stated."),
]


@dataclass
class Section:
    protocol: str
    anchor: str
    settings: list[tuple[str, str]]
    differences: list[str]
    table_html: str
    files: list[Path]
    steps_html: str = ""
    steps_files: list[Path] = field(default_factory=list)
    plots: list[tuple[str, Path]] = field(default_factory=list)


def rel(path: Path, root: Path) -> str:
    """A link from root to path, relative (works when the report is opened from disk or moved with the runs)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()


def _links(paths: list[Path], out_dir: Path, label=lambda p: p.suffix[1:]) -> str:
    return "".join(f'<a href="{html.escape(rel(p, out_dir))}">{html.escape(label(p))}</a>' for p in paths)


def _section(s: Section, out_dir: Path) -> list[str]:
    esc = html.escape
    parts = [f'<h2 id="{esc(s.anchor)}">{esc(s.protocol)}</h2>']
    if s.settings:
        parts.append('<table class="settings">' + "".join(
            f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in s.settings) + "</table>")
    if s.differences:
        parts.append("<p><b>Settings that differ between rows or between the seeds of a row:</b></p>"
                     "<ul class=\"notes\">"
                     + "".join(f"<li>{esc(d)}</li>" for d in s.differences) + "</ul>")
    parts.append(s.table_html)
    parts.append('<p class="links">table as ' + _links(
        s.files, out_dir, lambda p: "compact tex" if p.stem.endswith("_compact") else p.suffix[1:]) + "</p>")
    if s.steps_html:
        parts.append("<details><summary>Accuracy after each step (table)</summary>" + s.steps_html
                     + '<p class="links">as ' + _links(s.steps_files, out_dir) + "</p></details>")
    if s.plots:
        from cilbench.report.plots import pdf_paths  # matplotlib only when there are plots
        parts.append('<div class="plots">')
        for caption, path in s.plots:
            src = esc(rel(path, out_dir))
            pdf, pdf1 = (esc(rel(p, out_dir)) for p in pdf_paths(path))
            parts.append(f'<figure><a href="{src}"><img src="{src}" alt="{esc(caption)}" loading="lazy"></a>'
                         f'<figcaption>{esc(caption)} (pdf: <a href="{pdf}">double column</a>, '
                         f'<a href="{pdf1}">single column</a>)</figcaption></figure>')
        parts.append("</div>")
    return parts


def _runs_table(runs: list[SeedRun], training: dict[Path, Path], out_dir: Path) -> list[str]:
    esc = html.escape
    head = ["Protocol", "Method", "Run", "Seed", "Status", "Tasks", "Averaged", "Class order", "cilbench",
            "Method code", "torch", "Device", "Finished", "Train s", "Eval s", "Files"]
    parts = ['<table class="results"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
             + "</tr></thead><tbody>"]
    for r in runs:
        info = run_info(r)
        tasks = f"{r.tasks_done}/{r.tasks_total}" if r.tasks_total else ""
        files = [f'<a href="{esc(rel(r.path, out_dir))}/">folder</a>']
        for name in ("config.yaml", "manifest.json", "metrics.json", "steps.csv"):
            if (r.path / name).is_file():
                files.append(f'<a href="{esc(rel(r.path / name, out_dir))}">{name.split(".")[0]}</a>')
        if r.path in training:
            files.append(f'<a href="{esc(rel(training[r.path], out_dir))}">training curves</a>')
        version = " ".join(x for x in (info["cilbench_version"], info["cilbench_commit"]) if x)
        cells = [r.protocol, info["name"], r.run_name, str(r.seed), status_text(r), tasks,
                 "yes" if r.ok else "no", info["class_order"], version, info["method_source"], info["torch"],
                 info["device"],
                 str(info["finished"] or info["started"]), info["train_seconds"], info["eval_seconds"]]
        cls = "ours" if r.ok else "incomplete"
        parts.append(f'<tr class="{cls}">' + "".join(f"<td>{esc(str(c))}</td>" for c in cells)
                     + f"<td>{' '.join(files)}</td></tr>")
    parts.append("</tbody></table>")
    return parts


def write_html(out_dir: Path, made: str, sections: list[Section], summary: dict | None, runs: list[SeedRun],
               training: dict[Path, Path], ref_files: list[Path], runs_dir: Path, runs_csv: Path) -> Path:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>cilbench report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>cilbench report</h1>", f'<p class="made">{esc(made)}</p>',
             f"<p>Runs from <code>{esc(str(runs_dir))}</code>: {sum(r.ok for r in runs)} complete seed run(s) "
             f"averaged over {len(sections)} protocol(s); {sum(not r.ok for r in runs)} not complete or not "
             "readable (listed with the reason, never averaged).</p>"]
    links = "".join(f'<a href="#{esc(s.anchor)}">{esc(s.protocol)}</a>' for s in sections)
    parts.append('<nav><a href="#legend">how to read</a>' + ('<a href="#summary">summary</a>' if summary else "")
                 + links + '<a href="#runs">all runs</a><a href="#reference">reference data</a></nav>')
    parts.append('<h2 id="legend">How to read the tables</h2><dl class="legend">'
                 + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in LEGEND) + "</dl>")
    if summary:
        parts.append('<h2 id="summary">Summary across protocols</h2>')
        parts.append(summary["html"])
        parts.append('<p class="links">' + _links(summary["files"], out_dir) + "</p>")
    for s in sections:
        parts.extend(_section(s, out_dir))
    parts.append('<h2 id="runs">All runs found</h2>')
    parts.extend(_runs_table(runs, training, out_dir))
    parts.append(f'<p class="links"><a href="{esc(rel(runs_csv, out_dir))}">runs.csv</a></p>')
    parts.append('<h2 id="reference">Published reference data</h2>')
    parts.append("<p>Numbers copied from the published papers (DER, SEED, HPCR, EXACFS) with their source, "
                 "backbone, class order and number of runs; † = value flagged as garbled or a "
                 "likely typo (kept as printed), ‡ = not readable in the paper, taken from an outside listing "
                 "(unverified), "
                 "n/a = the number could not be read from the paper, – = not reported by the paper.</p>")
    parts.append('<p class="links">' + _links(ref_files, out_dir, lambda p: p.name) + "</p>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    atomic_write(index, "\n".join(parts), root=out_dir)
    return index
