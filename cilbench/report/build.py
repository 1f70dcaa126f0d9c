"""build_report: scan, select, aggregate, write every table, plot and index.html, and a manifest of the files
written, so that the next report into the same folder removes only those (never a file of the user's)."""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cilbench import __version__
from cilbench.errors import UserError
from cilbench.provenance import git_commit
from cilbench.report.aggregate import (
    METRICS,
    SUMMARY_DEFAULT,
    TASK_MEAN_DEFAULT,
    RunGroup,
    _flat,
    default_metrics,
    group_runs,
    memory_label,
    order_name,
    resolve_metrics,
)
from cilbench.report.figures import protocol_plots
from cilbench.report.page import Section, write_html
from cilbench.report.reference import REFERENCE_DIR, filter_refs_by_methods, load_reference
from cilbench.report.tables import (
    protocol_table,
    runs_csv,
    steps_table,
    summary_table,
    to_csv,
    to_html,
    to_latex,
    to_latex_compact,
    to_markdown,
)
from cilbench.run.rundir import read_events, read_text, scan_runs
from cilbench.safeio import atomic_write, make_folder, read_bounded

MANIFEST = ".cilbench-report.json"
PLOTS_PER_PROTOCOL = 6           # accuracy per step (top-1, top-5), per task, heatmaps, #extractors, #params
RESERVED = {"summary", "runs", "index"}


# --------------------------------------------------------------------------------------------------------
# The output folder

def _clear_previous(out_dir: Path) -> None:
    """Remove the files the previous report listed in its manifest; refuse a non-empty folder without one."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    manifest = out_dir / MANIFEST
    if not manifest.exists() and _legacy_report(out_dir):
        return                     # written before manifests existed: overwrite our names, remove nothing
    try:
        files = json.loads(read_text(manifest))["files"]
        if not isinstance(files, list):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--out {out_dir} is not empty and is not a previous report (no readable {MANIFEST}); "
                        "pick a new or empty folder") from None
    root = out_dir.resolve()
    for name in files:
        if not isinstance(name, str):
            continue
        path = out_dir / name
        try:
            inside = path.parent.resolve().is_relative_to(root) and ".." not in Path(name).parts
        except OSError:
            continue
        if inside and (path.is_symlink() or path.is_file()):
            path.unlink()
    manifest.unlink()


def _legacy_report(out_dir: Path) -> bool:
    try:
        return "<title>cilbench report</title>" in read_text(out_dir / "index.html")
    except (OSError, ValueError):
        return False


def unique_slugs(protocols: list[str]) -> dict[str, str]:
    """One distinct, safe file stem per protocol ('a b' and 'a_b' do not share one; 'summary' is taken)."""
    taken = set(RESERVED)
    out = {}
    for p in protocols:
        base = re.sub(r"[^A-Za-z0-9_.+-]+", "_", p).strip("._") or "protocol"
        slug, k = base, 2
        while slug.lower() in taken:
            slug, k = f"{base}-{k}", k + 1
        taken.add(slug.lower())
        out[p] = slug
    return out


# --------------------------------------------------------------------------------------------------------
# What a protocol section says about its settings

def protocol_settings(groups: list[RunGroup]) -> list[tuple[str, str]]:
    done = [g for g in groups if g.n] or groups
    cfg = done[0].protocol_cfg
    if not cfg:
        return []
    train = cfg.get("train") if isinstance(cfg.get("train"), dict) else {}
    orders = sorted({o for g in done for o in g.orders()} or {order_name(cfg.get("class_order"))})
    first = cfg.get("base") or cfg.get("step")
    rows = [("description", str(cfg.get("description") or "")),
            ("dataset", f"{cfg.get('dataset')} ({cfg.get('num_classes')} classes), {cfg.get('regime', 'offline')}"),
            ("tasks", f"{cfg.get('tasks')}: first task {first} classes, then {cfg.get('step')} per task"),
            ("class order(s)", ", ".join(orders)),
            ("memory", memory_label(cfg) or "?"),
            ("backbone", done[0].backbone),
            ("training", f"{train.get('epochs')} epochs, batch {train.get('batch_size')}, {train.get('optimizer')} "
                         f"lr {train.get('lr')}, {train.get('schedule')} schedule" if train else ""),
            ("source", str(cfg.get("source") or ""))]
    return [(k, v) for k, v in rows if v]


def seed_differences(groups: list[RunGroup]) -> list[str]:
    """Within a row: the settings its seeds did not share, with each seed's value."""
    out = []
    for g in groups:
        flats = [(r.seed, _flat(r.config)) for r in g.complete]
        for k in g.config_mismatch()[:12]:
            values = ", ".join(f"seed{seed}: {f.get(k, '(unset)')}" for seed, f in flats)
            out.append(f"{g.name}: seeds differ in {k} ({values})")
    return out


def row_differences(groups: list[RunGroup]) -> list[str]:
    """Protocol and runtime settings that are not the same for every row (e.g. an --epochs cap, a width)."""
    done = [g for g in groups if g.n]
    if len(done) < 2:
        return []
    flats = {g.run_name: _flat({"protocol": g.complete[0].config.get("protocol"),
                                "runtime": g.complete[0].config.get("runtime")}) for g in done}
    keys = sorted(set().union(*flats.values()))
    ignore = ("protocol.methods.", "runtime.device", "protocol.class_order")
    out = []
    for k in keys:
        if k.startswith(ignore):
            continue
        values = {name: f.get(k, "(unset)") for name, f in flats.items()}
        if len(set(values.values())) > 1:
            out.append(f"{k}: " + "; ".join(f"{next(g.name for g in done if g.run_name == n)} = {v}"
                                             for n, v in values.items()))
    return out


# --------------------------------------------------------------------------------------------------------
# Entry point

def _select(groups: dict[str, list[RunGroup]], protocols: list[str] | None, methods: list[str] | None,
            runs_dir: Path) -> dict[str, list[RunGroup]]:
    if protocols:
        wanted = [p.strip() for raw in protocols for p in raw.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in groups]
        if unknown:
            raise UserError(f"--protocol: no runs for {', '.join(unknown)} under {runs_dir}; "
                            f"protocols with runs: {', '.join(groups) or 'none'}")
        groups = {p: groups[p] for p in wanted}
    if methods:
        wanted_m = [m.strip() for raw in methods for m in raw.split(",") if m.strip()]
        all_names = sorted({n for gs in groups.values() for g in gs for n in (g.run_name, g.method, g.base_name)})
        unknown = [m for m in wanted_m if m not in all_names]
        if unknown:
            raise UserError(f"--methods: no runs named {', '.join(unknown)} under {runs_dir}"
                            f"{' for the selected protocols' if protocols else ''}; "
                            f"run names and methods found: {', '.join(all_names) or 'none'}")
        keep = set(wanted_m)
        groups = {p: [g for g in gs if keep & {g.run_name, g.method, g.base_name}] for p, gs in groups.items()}
        groups = {p: gs for p, gs in groups.items() if gs}
    return groups


def _metrics_for(gs: list[RunGroup], refs: list, chosen: list[str] | None) -> list[str]:
    if chosen:
        return chosen
    keys = default_metrics(gs[0].dataset, gs[0].regime, {g.method for g in gs})
    if any(r.has_values(list(TASK_MEAN_DEFAULT)) for r in refs):    # a paper that reports the task-mean form
        keys += [k for k in TASK_MEAN_DEFAULT if k not in keys]
    return keys


class _Written:
    """Every file this report writes, relative to the output folder (becomes the manifest)."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.files = out_dir, []

    def text(self, path: Path, text: str) -> Path:
        make_folder(path.parent, self.out_dir)
        atomic_write(path, text, root=self.out_dir)
        return self.add(path)

    def add(self, path: Path) -> Path:
        self.files.append(path.relative_to(self.out_dir).as_posix())
        return path

    def plot(self, path: Path) -> Path:
        from cilbench.report.plots import pdf_paths
        self.add(path)
        for pdf in pdf_paths(path):
            if pdf.exists():
                self.add(pdf)
        return path


def build_report(runs_dir: Path, out_dir: Path, protocols=None, methods=None, metrics=None,
                 reference_dir: Path | None = None, include: Callable[[Path], bool] | None = None,
                 plots: bool = True, plot_workers: int | None = None) -> Path:
    """Scan runs_dir (only the seed directories include() keeps; None = all), aggregate seeds, write tables,
    plots (unless plots=False: tables and the page only, much faster) and index.html under out_dir;
    return index.html. The figures are drawn by `plot_workers` processes (default: one per core when there are
    enough figures to pay for starting the processes; 1 draws them in this process)."""
    # resolved before any check: `--out userdir/missing/..` is userdir, and must meet the guard as such
    runs_dir, out_dir = Path(runs_dir), Path(out_dir).resolve()
    chosen_metrics = resolve_metrics(list(metrics) if metrics else None)
    all_runs = scan_runs(runs_dir, include)
    if not all_runs:
        raise UserError(f"no runs under {runs_dir} (expected <runs>/<protocol>/<run_name>/seed<k>/manifest.json); "
                        "run `cilbench run ...` first or pass --runs DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file; pass a folder for the report")
    if out_dir.resolve() == runs_dir.resolve() or runs_dir.resolve() in out_dir.resolve().parents:
        raise UserError(f"--out {out_dir} is inside the runs directory {runs_dir}; pick another folder")
    groups = _select(group_runs(all_runs), protocols, methods, runs_dir)
    refs, curves = load_reference(reference_dir)
    shown_runs = [r for gs in groups.values() for g in gs for r in g.runs]

    _clear_previous(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = _files_under(out_dir)     # files the previous report did not list: never ours to remove
    w = _Written(out_dir)
    _write_manifest(out_dir, [], complete=False)       # from here on the folder is a report's, even if cut short
    try:
        index = _write_report(out_dir, w, groups, refs, curves, shown_runs, runs_dir, methods, chosen_metrics,
                              reference_dir, plots, plot_workers)
    except BaseException:    # interrupted or failed: list every file it wrote, so the next report removes them
        try:
            _write_manifest(out_dir, sorted(set(w.files) | (_files_under(out_dir) - before)), complete=False)
        except Exception:    # noqa: BLE001 - the original error is the one to report
            pass
        raise
    _write_manifest(out_dir, w.files, complete=True)
    return index


def _write_report(out_dir: Path, w: "_Written", groups: dict, refs: list, curves: list, shown_runs: list,
                  runs_dir: Path, methods, chosen_metrics, reference_dir, plots: bool,
                  plot_workers: int | None) -> Path:
    """Tables, figures and the page of build_report into out_dir (prepared and emptied); returns index.html."""
    tables_dir, plot_dir, ref_out = out_dir / "tables", out_dir / "plots", out_dir / "reference"
    for folder in (tables_dir, plot_dir / "training") if plots else (tables_dir,):
        make_folder(folder, out_dir)      # a planted `tables -> ~/thesis` is refused before any write
    slugs = unique_slugs(list(groups))
    jobs = _training_jobs(groups, slugs, plot_dir / "training") if plots else []
    figures = len(jobs) + PLOTS_PER_PROTOCOL * len(groups) if plots else 0
    with FigurePool(figures, plot_workers) as pool:     # figures are drawn meanwhile, tables written here
        drawn = []
        sections = []
        for protocol, gs in groups.items():
            slug = slugs[protocol]
            p_refs = filter_refs_by_methods([r for r in refs if r.protocol == protocol], gs, methods)
            keys = _metrics_for(gs, p_refs, chosen_metrics)
            spread = "ci95" if gs[0].regime == "online" else "std"
            table = protocol_table(protocol, gs, p_refs, keys, spread)
            files = [w.text(tables_dir / f"{slug}{suffix}", render(table))
                     for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv))]
            compact_keys = [k for k in (["last_task_mean", "avg_task_mean", "forgetting"] if spread == "ci95"
                                        else ["avg", "last", "bwt"]) if k in keys] or keys[:3]
            bb = all(g.footprint()["params_bb_avg"][0] is not None for g in gs if g.n)
            caption = f"{'mean ± 95% CI' if spread == 'ci95' else 'mean ± std'} over seeds; #Params = " + \
                ("backbone" if bb else "total") + " parameters at inference, average over steps (M)"
            files.append(w.text(tables_dir / f"{slug}_compact.tex",
                                to_latex_compact(table, compact_keys + ["params_bb_avg" if bb else "params_avg"],
                                                 caption)))
            section = Section(protocol, f"p-{slug}", protocol_settings(gs),
                              row_differences(gs) + seed_differences(gs), to_html(table), files)
            p_curves = [c for c in curves if not methods or c.match in {g.method for g in gs}]
            if any(g.n for g in gs):
                st = steps_table(protocol, gs, p_curves)
                section.steps_html = to_html(st)
                section.steps_files = [w.text(tables_dir / f"{slug}_steps{suffix}", render(st))
                                       for suffix, render in ((".md", to_markdown), (".tex", to_latex),
                                                              (".csv", to_csv))]
            top5 = any(k.endswith("top5") for k in keys)
            if plots:
                drawn.append((section, pool.submit(protocol_plots, protocol, slug, gs, p_refs, p_curves, plot_dir,
                                                   top5)))
            sections.append(section)

        summary = None
        if groups:
            s_metrics = chosen_metrics or list(SUMMARY_DEFAULT)
            s_refs = filter_refs_by_methods(refs, [g for gs in groups.values() for g in gs], methods)
            table = summary_table(list(groups), groups, s_refs, [k for k in s_metrics if k in METRICS])
            summary = {"html": to_html(table),
                       "files": [w.text(tables_dir / f"summary{suffix}", render(table)) for suffix, render
                                 in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv))]}
        training_curves = []
        if jobs:
            from cilbench.report.plots import plot_training
            training_curves = [(run, pool.submit(plot_training, png, title, events))
                               for run, png, title, events in jobs]
        for section, handle in drawn:
            section.plots = [(c, w.plot(p)) for c, p in handle.result()]
        training = {run: w.plot(handle.result()) for run, handle in training_curves}
    runs_csv_path = w.text(tables_dir / "runs.csv", runs_csv(shown_runs))
    ref_files = []
    src_dir = Path(reference_dir) if reference_dir is not None else REFERENCE_DIR
    if src_dir.is_dir():
        make_folder(ref_out, out_dir)
        for f in sorted(src_dir.glob("*.csv")):
            atomic_write(ref_out / f.name, read_bounded(f, 1 << 24, "a reference CSV"), root=out_dir)
            ref_files.append(w.add(ref_out / f.name))
    made = (f"Made {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by cilbench {__version__}"
            + (f" (commit {commit})" if (commit := git_commit(Path(__file__))) else ""))
    index = write_html(out_dir, made, sections, summary, shown_runs, training, ref_files, runs_dir, runs_csv_path)
    w.add(index)
    return index


def _write_manifest(out_dir: Path, files: list[str], complete: bool) -> None:
    """The list of files this report wrote (the next report into the folder removes exactly these); an
    interrupted report writes it too, marked incomplete, so its folder is never left unusable."""
    atomic_write(out_dir / MANIFEST, json.dumps({"written_by": f"cilbench {__version__}", "complete": complete,
                                                 "files": files}, indent=1))


def _files_under(out_dir: Path) -> set[str]:
    """Every file (or link) under out_dir but the manifest, relative, without following links to folders."""
    found = set()
    for folder, _, names in os.walk(out_dir):
        for name in names:
            found.add((Path(folder) / name).relative_to(out_dir).as_posix())
    found.discard(MANIFEST)
    return found


def _training_jobs(groups: dict[str, list[RunGroup]], slugs: dict[str, str], folder: Path) -> list[tuple]:
    """(run directory, png path, title, events) of every run with training events, in the page's order."""
    jobs, used = [], set()
    for protocol, gs in groups.items():
        for g in gs:
            stem = f"{slugs[protocol]}_{_safe(g.run_name)}"
            while stem.lower() in used:          # two run names that make the same file name
                stem += "_"
            used.add(stem.lower())
            for r in g.runs:
                events = read_events(r.path / "events.jsonl")
                if events:
                    title = f"{r.protocol} / {g.name} / seed {r.seed}: training loss and lr"
                    jobs.append((r.path, folder / f"{stem}_seed{r.seed}.png", title, events))
    return jobs


class FigurePool:
    """Draws the report's figures in worker processes while the main process writes tables, or in place when a
    pool would not pay for itself. `submit` returns a handle whose result() is the drawing's (a worker's error
    is raised there)."""
    # a worker's start-up (1-4 s: matplotlib, and torch where the plotted runs' data or the calling program
    # import it) is worth 1-2 figures
    FIGURES_PER_WORKER = 4

    def __init__(self, figures: int, workers: int | None):
        if workers is None:
            workers = min(available_cores(), figures // self.FIGURES_PER_WORKER)
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from cilbench.report.plots import ignore_interrupts
            # spawn: a fresh interpreter, never a fork of a process that may run torch's thread pools; Ctrl-C
            # stops the main process only, the workers finish the figures they draw (listed, not torn)
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=ignore_interrupts)

    def submit(self, fn: Callable, *args):
        if self.pool is not None:
            return self.pool.submit(fn, *args)
        return _Done(fn(*args))

    def __enter__(self) -> "FigurePool":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


@dataclass
class _Done:
    value: object

    def result(self):
        return self.value


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:          # macOS
        return os.cpu_count() or 1


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name).strip("._") or "run"
