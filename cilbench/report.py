"""`cilbench report`: scan run directories, aggregate seeds, write paper-style tables, plots and index.html.

    <runs>/<protocol>/<run_name>/seed<k>/{config.yaml, manifest.json, steps.csv, acc_matrix*.csv, metrics.json}

Only runs whose manifest says `complete` and that have a metrics.json are averaged; failed, running and
interrupted runs are listed as such. Published numbers come from results/reference/*.csv (see its README):
they are shown as separate rows, with the difference ours - published where protocol, backbone and memory match.

Output (under `out`):
    index.html                       everything below, linked relatively (opens offline)
    tables/<protocol>.{md,tex,csv}   one table per protocol
    tables/summary.{md,tex,csv}      protocols as column groups
    tables/runs.csv                  every seed run found, with its status
    plots/*.png                      accuracy per step, per-task accuracy, heatmaps, vs #extractors, vs #params
    reference/*.csv                  copy of the published numbers used (provenance travels with the report)
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "results" / "reference"


# --------------------------------------------------------------------------------------------------------
# Metrics a table can show

@dataclass(frozen=True)
class Metric:
    key: str          # name on the command line (--metric) and in CSV headers
    field: str        # key in metrics.json
    label: str        # column header
    latex: str


METRICS: dict[str, Metric] = {m.key: m for m in [
    Metric("avg", "avg_acc", "Avg", "Avg"),
    Metric("last", "last_acc", "Last", "Last"),
    Metric("bwt", "bwt", "BWT", "BWT"),
    Metric("forgetting", "forgetting", "Forgetting", "Forg."),
    Metric("avg_top5", "avg_acc_top5", "Avg top-5", "Avg top-5"),
    Metric("last_top5", "last_acc_top5", "Last top-5", "Last top-5"),
    Metric("bwt_top5", "bwt_top5", "BWT top-5", "BWT top-5"),
    Metric("forgetting_top5", "forgetting_top5", "Forgetting top-5", "Forg. top-5"),
    Metric("avg_task_mean", "avg_acc_task_mean", "Avg (task mean)", "Avg (task mean)"),
    Metric("last_task_mean", "last_acc_task_mean", "Last (task mean)", "Last (task mean)"),
]}
DEFAULT_METRICS = ("avg", "last", "bwt")
TOP5_DEFAULT = ("avg_top5", "last_top5")
SUMMARY_DEFAULT = ("avg", "last")


def resolve_metrics(names: list[str] | None) -> list[str] | None:
    """--metric values -> metric keys (accepts the metrics.json names too); None = the defaults."""
    if not names:
        return None
    by_field = {m.field: m.key for m in METRICS.values()}
    out: list[str] = []
    for raw in names:
        for name in (p.strip().lower() for p in raw.split(",")):
            if not name:
                continue
            key = name if name in METRICS else by_field.get(name)
            if key is None:
                raise UserError(f"--metric: unknown metric '{name}'; known: {', '.join(METRICS)}")
            if key not in out:
                out.append(key)
    if not out:
        raise UserError(f"--metric: name at least one metric of: {', '.join(METRICS)}")
    return out


def default_metrics(dataset: str, regime: str = "offline") -> list[str]:
    """Avg, Last, BWT; + top-5 on ImageNet (as DER reports); + forgetting online (as HPCR reports)."""
    return (list(DEFAULT_METRICS) + (list(TOP5_DEFAULT) if dataset.startswith("imagenet") else [])
            + (["forgetting"] if regime == "online" else []))


# --------------------------------------------------------------------------------------------------------
# Run directories

@dataclass
class SeedRun:
    """One <protocol>/<run_name>/seed<k>/ directory as found on disk."""
    path: Path
    protocol: str
    run_name: str
    seed: int
    status: str                      # complete | failed | running | interrupted | incomplete | unreadable
    reason: str = ""
    method: str = ""
    config: dict = field(default_factory=dict)
    tasks_done: int | None = None
    tasks_total: int | None = None
    metrics: dict = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)
    matrix5: list[list[float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "complete"

    @property
    def protocol_cfg(self) -> dict:
        return self.config.get("protocol") or {}


def _read_steps(path: Path) -> list[dict]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        out.append({"step": int(r["step"]), "classes_seen": int(r["classes_seen"]), "top1": float(r["top1"]),
                    "top5": float(r["top5"]), "extractors": int(r["extractors"]), "params": int(r["params"]),
                    "memory_size": int(r.get("memory_size") or 0)})
    return out


def _read_matrix(path: Path) -> list[list[float]]:
    with open(path) as fh:
        rows = list(csv.reader(fh))[1:]
    return [[float(v) for v in row[1:] if v != ""] for row in rows]


def read_run(path: Path, protocol: str, run_name: str, seed: int) -> SeedRun:
    """Read one run directory. Never raises: a broken directory becomes status 'unreadable' with the reason."""
    run = SeedRun(path=path, protocol=protocol, run_name=run_name, seed=seed, status="unreadable")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if not isinstance(manifest, dict):
            raise ValueError("manifest.json is not an object")
    except (OSError, ValueError) as exc:
        run.reason = f"manifest.json unreadable ({exc.__class__.__name__})"
        return run
    run.status = str(manifest.get("status") or "unknown")
    run.method = str(manifest.get("method") or run_name.split("+")[0])
    run.tasks_done, run.tasks_total = manifest.get("tasks_done"), manifest.get("tasks_total")
    run.reason = str(manifest.get("error") or "")
    try:
        with open(path / "config.yaml") as fh:
            run.config = yaml.safe_load(fh) or {}
        run.method = str(run.config.get("method") or run.method)
    except (OSError, yaml.YAMLError):
        run.config = {}
    if run.status != "complete":
        return run
    # complete: every file must be there and consistent, else the run is not averaged in
    try:
        run.metrics = json.loads((path / "metrics.json").read_text())
        run.steps = _read_steps(path / "steps.csv")
        if not run.steps:
            raise ValueError("steps.csv has no rows")
        if (path / "acc_matrix.csv").exists():
            run.matrix = _read_matrix(path / "acc_matrix.csv")
        if (path / "acc_matrix_top5.csv").exists():
            run.matrix5 = _read_matrix(path / "acc_matrix_top5.csv")
        if run.tasks_total is not None and len(run.steps) != run.tasks_total:
            raise ValueError(f"steps.csv has {len(run.steps)} rows, manifest says {run.tasks_total} tasks")
    except (OSError, ValueError, KeyError) as exc:
        run.status = "incomplete"
        run.reason = f"marked complete but {exc.__class__.__name__}: {exc}"
        run.metrics, run.steps = {}, []
    return run


def scan_runs(runs_dir: Path) -> list[SeedRun]:
    """Every <runs>/<protocol>/<run_name>/seed<k>/ directory that holds a manifest.json."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        raise UserError(f"runs directory {runs_dir} does not exist; run `cilbench run ...` first "
                        "or pass --runs DIR")
    if not runs_dir.is_dir():
        raise UserError(f"--runs {runs_dir} is not a directory")
    found = []
    for manifest in sorted(runs_dir.glob("*/*/seed*/manifest.json")):
        seed_dir = manifest.parent
        m = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not m:
            continue
        found.append(read_run(seed_dir, seed_dir.parent.parent.name, seed_dir.parent.name, int(m.group(1))))
    return found


# --------------------------------------------------------------------------------------------------------
# Aggregation over seeds

def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def strip_n_tag(run_name: str) -> str:
    """'tsd_grc+N3' -> 'tsd_grc'; 'tsd_fixed+N3+long' -> 'tsd_fixed+long'."""
    parts = run_name.split("+")
    return "+".join([parts[0]] + [p for p in parts[1:] if not re.fullmatch(r"N\d+", p)])


def memory_label(protocol_cfg: dict) -> str:
    mem = protocol_cfg.get("memory") or {}
    policy = mem.get("policy")
    if policy == "fixed_total":
        return f"fixed_total:{mem.get('total')}"
    if policy == "per_class":
        return f"per_class:{mem.get('per_class')}"
    if policy == "reservoir":
        return f"reservoir:{mem.get('size')}"
    return "none" if policy == "none" else ""


@dataclass
class RunGroup:
    """All seeds of one run name on one protocol."""
    protocol: str
    run_name: str
    runs: list[SeedRun]

    @property
    def complete(self) -> list[SeedRun]:
        return [r for r in self.runs if r.ok]

    @property
    def incomplete(self) -> list[SeedRun]:
        return [r for r in self.runs if not r.ok]

    @property
    def n(self) -> int:
        return len(self.complete)

    def _first(self) -> SeedRun:
        return (self.complete or self.runs)[0]

    @property
    def method(self) -> str:
        return self._first().method

    @property
    def base_name(self) -> str:
        return strip_n_tag(self.run_name)

    @property
    def protocol_cfg(self) -> dict:
        return self._first().protocol_cfg

    @property
    def dataset(self) -> str:
        return str(self.protocol_cfg.get("dataset") or self.protocol.split("_")[0])

    @property
    def regime(self) -> str:
        return str(self.protocol_cfg.get("regime") or ("online" if "_online" in self.protocol else "offline"))

    @property
    def backbone(self) -> str:
        bb = self.protocol_cfg.get("backbone") or {}
        name = str(bb.get("name") or "?")
        return f"{name} (width {bb['width']})" if bb.get("width") else name

    @property
    def backbone_standard(self) -> str | None:
        """The backbone name when it has its standard width (only then can it match a paper's)."""
        bb = self.protocol_cfg.get("backbone") or {}
        return None if bb.get("width") else bb.get("name")

    @property
    def memory(self) -> str:
        """The memory the method actually used: 'none' when it kept no exemplars at any step."""
        run = self._first()
        if run.steps and all(s["memory_size"] == 0 for s in run.steps):
            return "none"
        return memory_label(run.protocol_cfg)

    def epochs_cap_text(self) -> str:
        """'' when no complete seed ran under --epochs, else e.g. 'epochs capped at 2 (1/3 seeds)'."""
        caps = [(r.config.get("runtime") or {}).get("max_epochs") for r in self.complete]
        used = [c for c in caps if c is not None]
        if not used:
            return ""
        text = f"epochs capped at {'/'.join(str(c) for c in sorted(set(used)))}"
        return text + (f" ({len(used)}/{len(caps)} seeds)" if len(used) < len(caps) else "")

    def config_mismatch(self) -> list[str]:
        """Config keys (other than seed/device) that differ between the complete seeds."""
        def flat(d: Any, prefix: str = "") -> dict:
            if isinstance(d, dict):
                out: dict = {}
                for k, v in d.items():
                    out.update(flat(v, f"{prefix}{k}."))
                return out
            return {prefix[:-1]: json.dumps(d, sort_keys=True, default=str)}
        flats = [flat(r.config) for r in self.complete]
        keys = set().union(*flats) if flats else set()
        ignore = {"seed", "runtime.device", "protocol.description", "protocol.source"}
        differ = [k for k in keys if k not in ignore and not k.startswith("protocol.methods.")
                  and len({f.get(k) for f in flats}) > 1]
        order = ("method_config.", "runtime.", "protocol.")
        return sorted(differ, key=lambda k: (next((i for i, p in enumerate(order) if k.startswith(p)), 3), k))

    def metric(self, key: str) -> tuple[float | None, float | None, int]:
        field_ = METRICS[key].field
        vals = [r.metrics.get(field_) for r in self.complete]
        vals = [v for v in vals if isinstance(v, (int, float))]
        mean, std = mean_std(vals)
        return mean, std, len(vals)

    def footprint(self) -> dict[str, tuple[float | None, float | None]]:
        runs = self.complete
        return {
            "ext_last": mean_std([r.steps[-1]["extractors"] for r in runs]),
            "ext_avg": mean_std([statistics.fmean(s["extractors"] for s in r.steps) for r in runs]),
            "params_last": mean_std([r.steps[-1]["params"] / 1e6 for r in runs]),
            "params_avg": mean_std([statistics.fmean(s["params"] for s in r.steps) / 1e6 for r in runs]),
        }

    def curve(self, key: str = "top1") -> tuple[list[int], list[float], list[float] | None]:
        """Mean (and std) accuracy after each step over the complete seeds: x = classes seen."""
        runs = self.complete
        T = min(len(r.steps) for r in runs)
        xs = [runs[0].steps[t]["classes_seen"] for t in range(T)]
        means, stds = [], []
        for t in range(T):
            m, s = mean_std([r.steps[t][key] for r in runs])
            means.append(m)
            stds.append(s or 0.0)
        return xs, means, stds if len(runs) > 1 else None

    def mean_matrix(self, top5: bool = False) -> list[list[float]]:
        mats = [r.matrix5 if top5 else r.matrix for r in self.complete]
        mats = [m for m in mats if m]
        if not mats:
            return []
        T = min(len(m) for m in mats)
        return [[statistics.fmean(m[i][j] for m in mats) for j in range(min(len(m[i]) for m in mats))]
                for i in range(T)]

    def last_row(self) -> tuple[list[float], list[float] | None]:
        rows = [r.matrix[-1] for r in self.complete if r.matrix]
        if not rows:
            return [], None
        T = min(len(r) for r in rows)
        stats = [mean_std([r[j] for r in rows]) for j in range(T)]
        return [m for m, _ in stats], ([s or 0.0 for _, s in stats] if len(rows) > 1 else None)


def group_runs(runs: list[SeedRun]) -> dict[str, list[RunGroup]]:
    by_key: dict[tuple[str, str], list[SeedRun]] = {}
    for r in runs:
        by_key.setdefault((r.protocol, r.run_name), []).append(r)
    out: dict[str, list[RunGroup]] = {}
    for (proto, name), rs in sorted(by_key.items()):
        out.setdefault(proto, []).append(RunGroup(proto, name, sorted(rs, key=lambda r: r.seed)))
    return out


# --------------------------------------------------------------------------------------------------------
# Published reference numbers (results/reference/*.csv)

REF_FIELDS = ["source", "paper", "table", "protocol", "backbone", "class_order", "runs", "memory", "method",
              "match", "metric", "value", "spread", "spread_kind", "status", "note"]
CURVE_FIELDS = ["source", "paper", "provenance", "protocol", "backbone", "class_order", "runs", "memory",
                "method", "match", "metric", "step", "value", "status", "note"]
REF_METRICS = set(METRICS) | {"params_avg_m"}
STATUSES = {"ok", "not_reported", "unknown", "flagged", "unverified"}
MARKS = {"flagged": "†", "unverified": "‡"}


@dataclass
class RefValue:
    text: str            # the value as printed ("" when not available)
    spread: str
    spread_kind: str     # std | ci95 | ""
    status: str
    note: str

    @property
    def number(self) -> float | None:
        return float(self.text) if self.text and self.status in ("ok", "flagged", "unverified") else None


@dataclass
class RefRow:
    """One published method on one protocol (values from one or more tables of one paper)."""
    paper: str
    protocol: str
    backbone: str
    memory: str
    method: str
    match: str
    class_order: str
    runs: str
    tables: list[str] = field(default_factory=list)
    values: dict[str, RefValue] = field(default_factory=dict)

    @property
    def label(self) -> str:
        mem = f", {self.memory.replace('reservoir:', 'buffer ')}" if self.memory.startswith("reservoir") else ""
        return f"{self.method}{mem}"

    @property
    def spread_kind(self) -> str:
        kinds = {v.spread_kind for v in self.values.values() if v.spread_kind}
        return "/".join(sorted(kinds))

    @property
    def source(self) -> str:
        runs = (f"{self.runs} run{'' if self.runs == '1' else 's'}" if self.runs else "runs not stated")
        spread = {"std": ", ± std", "ci95": ", ± 95% CI"}.get(self.spread_kind, "")
        return f"{self.paper} {', '.join(self.tables)} ({runs}{spread})"

    def has_values(self) -> bool:
        return any(v.status != "not_reported" for v in self.values.values())

    def matches(self, group: RunGroup) -> bool:
        """Same protocol, same (standard-width) backbone, same memory where the paper fixes one, same method."""
        if not self.match or self.protocol != group.protocol:
            return False
        if self.match not in (group.method, group.run_name):
            return False
        if self.backbone != group.backbone_standard:
            return False
        return not self.memory or self.memory == group.memory


@dataclass
class RefCurve:
    paper: str
    protocol: str
    backbone: str
    method: str
    match: str
    metric: str          # top1 | top5
    provenance: str
    steps: list[int]
    values: list[float]
    note: str

    @property
    def full(self) -> bool:
        return self.steps == list(range(len(self.steps))) and len(self.steps) > 2


def _read_csv(path: Path, fields: list[str]) -> list[dict]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [f for f in fields if f not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; see results/reference/README.md")
        return list(reader)


def load_reference(ref_dir: Path | None = None) -> tuple[list[RefRow], list[RefCurve]]:
    """All published values and curves under ref_dir (default: the repository's results/reference)."""
    ref_dir = Path(ref_dir) if ref_dir is not None else REFERENCE_DIR
    if not ref_dir.is_dir():
        return [], []
    rows: dict[tuple, RefRow] = {}
    curves: dict[tuple, RefCurve] = {}
    for path in sorted(ref_dir.glob("*.csv")):
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if "step" in header:
            for line, r in enumerate(_read_csv(path, CURVE_FIELDS), start=2):
                if r["status"] != "ok" or not r["value"]:
                    continue
                try:
                    step, value = int(r["step"]), float(r["value"])
                except ValueError:
                    raise UserError(f"{path}:{line}: step and value must be numbers") from None
                key = (r["paper"], r["protocol"], r["backbone"], r["method"], r["metric"])
                c = curves.setdefault(key, RefCurve(r["paper"], r["protocol"], r["backbone"], r["method"],
                                                    r["match"], r["metric"], r["provenance"], [], [], r["note"]))
                c.steps.append(step)
                c.values.append(value)
            continue
        for line, r in enumerate(_read_csv(path, REF_FIELDS), start=2):
            if r["metric"] not in REF_METRICS:
                raise UserError(f"{path}:{line}: unknown metric '{r['metric']}'; known: "
                                f"{', '.join(sorted(REF_METRICS))}")
            if r["status"] not in STATUSES:
                raise UserError(f"{path}:{line}: status must be one of {', '.join(sorted(STATUSES))}")
            if r["value"]:
                try:
                    float(r["value"])
                except ValueError:
                    raise UserError(f"{path}:{line}: value '{r['value']}' is not a number") from None
            key = (r["paper"], r["protocol"], r["backbone"], r["memory"], r["method"])
            row = rows.setdefault(key, RefRow(r["paper"], r["protocol"], r["backbone"], r["memory"], r["method"],
                                              r["match"], r["class_order"], r["runs"]))
            if r["table"] not in row.tables:
                row.tables.append(r["table"])
            row.values[r["metric"]] = RefValue(r["value"], r["spread"], r["spread_kind"], r["status"], r["note"])
    for c in curves.values():
        order = sorted(range(len(c.steps)), key=lambda i: c.steps[i])
        c.steps = [c.steps[i] for i in order]
        c.values = [c.values[i] for i in order]
    return list(rows.values()), list(curves.values())


# --------------------------------------------------------------------------------------------------------
# Tables: one model, rendered as Markdown, LaTeX, CSV, HTML and on the terminal (rich)

@dataclass
class Stat:
    mean: float | None
    std: float | None = None
    text: str | None = None      # published values keep their printed form
    spread: str | None = None
    mark: str = ""               # † flagged as garbled/typo, ‡ unverified
    digits: int = 2
    signed: bool = False

    def fmt(self, pm: str = " ± ") -> str:
        if self.text is not None:
            core = self.text or "–"
            spread = f"{pm}{self.spread}" if self.spread else ""
            return f"{core}{spread}{self.mark}"
        if self.mean is None:
            return "–"
        sign = "+" if self.signed else ""
        core = f"{self.mean:{sign}.{self.digits}f}"
        if self.std is not None:
            core += f"{pm}{self.std:.{self.digits}f}"
        return core + self.mark


@dataclass
class Column:
    key: str
    label: str
    kind: str = "stat"           # text | stat
    latex: str | None = None
    group: str | None = None     # column group (summary table: protocol)


@dataclass
class Row:
    kind: str                    # ours | published | delta | incomplete
    cells: dict[str, Any]


@dataclass
class Table:
    title: str
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def cell_text(self, row: Row, col: Column, pm: str = " ± ") -> str:
        value = row.cells.get(col.key)
        if isinstance(value, Stat):
            return value.fmt(pm)
        return "" if value is None else str(value)


def _num_fmt(value: float | None, digits: int = 2) -> Stat:
    return Stat(value, None, digits=digits)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    cols = table.columns
    head = [(f"{c.group} {c.label}" if c.group else c.label) for c in cols]
    out = [f"### {table.title}", "", "| " + " | ".join(_md_escape(h) for h in head) + " |",
           "|" + "|".join(":---" if c.kind == "text" else "---:" for c in cols) + "|"]
    for row in table.rows:
        cells = []
        for i, c in enumerate(cols):
            text = _md_escape(table.cell_text(row, c))
            if i == 0 and row.kind == "published":
                text = f"_{text}_ (published)"
            elif i == 0 and row.kind == "delta":
                text = f"_{text}_"
            elif i == 0 and row.kind == "incomplete":
                text = f"~~{text}~~"
            cells.append(text)
        out.append("| " + " | ".join(cells) + " |")
    if table.notes:
        out.append("")
        out.extend(f"- {_md_escape(n)}" for n in table.notes)
    return "\n".join(out) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "–": "--", "†": r"$^\dagger$",
                  "‡": r"$^\ddagger$", "≤": r"$\leq$", "·": r"$\cdot$", "→": r"$\rightarrow$"}


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or (ch if ord(ch) < 128 else "?"))
    return "".join(out)


def to_latex(table: Table) -> str:
    cols = table.columns
    spec = "".join("l" if c.kind == "text" else "r" for c in cols)
    lines = [f"% {latex_escape(table.title)}", "% requires \\usepackage{booktabs}",
             f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
    groups = [c.group for c in cols]
    if any(groups):
        cells, rules, i = [], [], 0
        while i < len(cols):
            j = i
            while j + 1 < len(cols) and groups[j + 1] == groups[i]:
                j += 1
            width = j - i + 1
            if groups[i]:
                cells.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(groups[i])}}}")
                rules.append(f"\\cmidrule(lr){{{i + 1}-{j + 1}}}")
            else:
                cells.extend([""] * width)
            i = j + 1
        lines.append(" & ".join(cells) + " \\\\")
        lines.append(" ".join(rules))
    lines.append(" & ".join(latex_escape(c.latex or c.label) for c in cols) + " \\\\")
    lines.append("\\midrule")
    previous = None
    for row in table.rows:
        if previous is not None and row.kind != previous and row.kind in ("published", "incomplete") \
                and previous == "ours":
            lines.append("\\midrule")
        previous = row.kind if row.kind != "delta" else previous
        cells = []
        for i, c in enumerate(cols):
            text = latex_escape(table.cell_text(row, c))
            if i == 0 and row.kind in ("published", "delta"):
                text = f"\\textit{{{text}}}" + (" (published)" if row.kind == "published" else "")
            cells.append(text)
        lines.append(" & ".join(cells) + " \\\\")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    lines.extend(f"% {latex_escape(n)}" for n in table.notes)
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """Numbers unformatted: a stat column gives <key> and <key>_std."""
    header = ["kind"]
    for c in table.columns:
        name = c.key
        header += [name] if c.kind == "text" else [name, f"{name}_std"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        out = [row.kind]
        for c in table.columns:
            value = row.cells.get(c.key)
            if c.kind == "text":
                out.append("" if value is None else str(value))
            elif isinstance(value, Stat):
                if value.text is not None:
                    out += [value.text + value.mark, value.spread or ""]
                else:
                    out += ["" if value.mean is None else f"{value.mean:.4f}",
                            "" if value.std is None else f"{value.std:.4f}"]
            else:
                out += ["", ""]
        writer.writerow(out)
    return buf.getvalue()


def to_html(table: Table) -> str:
    cols = table.columns
    out = ['<table class="results">', "<thead>"]
    if any(c.group for c in cols):
        out.append("<tr>")
        i = 0
        while i < len(cols):
            j = i
            while j + 1 < len(cols) and cols[j + 1].group == cols[i].group:
                j += 1
            out.append(f'<th colspan="{j - i + 1}">{html.escape(cols[i].group or "")}</th>')
            i = j + 1
        out.append("</tr>")
    out.append("<tr>" + "".join(f"<th>{html.escape(c.label)}</th>" for c in cols) + "</tr>")
    out.append("</thead><tbody>")
    for row in table.rows:
        tds = []
        for i, c in enumerate(cols):
            text = html.escape(table.cell_text(row, c))
            if i == 0 and row.kind == "published":
                text += ' <span class="tag">published</span>'
            align = "" if c.kind == "text" else ' class="num"'
            tds.append(f"<td{align}>{text}</td>")
        out.append(f'<tr class="{row.kind}">' + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    if table.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(out)


def to_rich(table: Table):
    """The same table for the terminal (used by `cilbench run`'s summary)."""
    from rich.table import Table as RichTable
    styles = {"published": "italic cyan", "delta": "italic", "incomplete": "dim strike"}
    rt = RichTable(title=table.title, title_justify="left")
    for c in table.columns:
        label = f"{c.group} {c.label}" if c.group else c.label
        rt.add_column(label, justify="left" if c.kind == "text" else "right", overflow="fold")
    for row in table.rows:
        cells = [table.cell_text(row, c) for c in table.columns]
        if row.kind == "published":
            cells[0] += " (published)"
        rt.add_row(*cells, style=styles.get(row.kind))
    return rt


# --------------------------------------------------------------------------------------------------------
# The tables of the report

FOOTPRINT_COLUMNS = [
    Column("ext_last", "#Ext (last)"),
    Column("ext_avg", "#Ext (avg)"),
    Column("params_last", "#Params M (last)"),
    Column("params_avg", "#Params M (avg)"),
]


def status_text(run: SeedRun) -> str:
    if run.status in ("running", "interrupted", "failed") and run.tasks_total:
        text = f"{run.status} after {run.tasks_done}/{run.tasks_total} tasks"
    else:
        text = run.status
    if run.status == "running":
        text += " (or stopped without a clean exit)"
    return f"{text}: {run.reason}" if run.reason else text


def params_digits(groups: list[RunGroup]) -> int:
    """Decimals for the #params columns of one table: 3 when every model is below 1M parameters, else 2."""
    values = [g.footprint()["params_last"][0] for g in groups if g.n]
    return 3 if values and max(v for v in values if v is not None) < 1 else 2


def our_row(group: RunGroup, metrics: list[str], p_digits: int = 2) -> Row:
    fp = group.footprint()
    cells: dict[str, Any] = {"method": group.run_name, "backbone": group.backbone, "seeds": str(group.n)}
    for key, (mean, _std) in fp.items():
        if key.startswith("params"):
            digits = p_digits
        elif key == "ext_last":
            digits = 0 if mean is not None and float(mean).is_integer() else 2
        else:
            digits = 2
        cells[key] = _num_fmt(mean, digits)
    for key in metrics:
        mean, std, _n = group.metric(key)
        cells[key] = Stat(mean, std)
    parts = ["cilbench", group.epochs_cap_text()]
    mismatch = group.config_mismatch()
    if mismatch:
        parts.append(f"seeds differ in {', '.join(mismatch[:3])}" + ("…" if len(mismatch) > 3 else ""))
    cells["source"] = "; ".join(p for p in parts if p)
    return Row("ours", cells)


def published_row(ref: RefRow, metrics: list[str]) -> Row:
    cells: dict[str, Any] = {"method": ref.label, "backbone": ref.backbone, "seeds": ref.runs or "?"}
    pv = ref.values.get("params_avg_m")
    if pv is not None and pv.status != "not_reported":
        cells["params_avg"] = Stat(None, text=pv.text, mark=MARKS.get(pv.status, ""))
    for key in metrics:
        v = ref.values.get(key)
        if v is None:
            continue
        if v.status == "unknown":
            cells[key] = Stat(None, text="n/a")
        elif v.status == "not_reported":
            cells[key] = Stat(None, text="–")
        else:
            cells[key] = Stat(None, text=v.text, spread=v.spread or None, mark=MARKS.get(v.status, ""))
    cells["source"] = ref.source
    return Row("published", cells)


def delta_row(group: RunGroup, ref: RefRow, metrics: list[str], p_digits: int = 2) -> Row | None:
    cells: dict[str, Any] = {"method": f"Δ {group.run_name} − {ref.label}", "backbone": "", "seeds": ""}
    any_value = False
    for key in metrics + ["params_avg"]:
        ref_key = "params_avg_m" if key == "params_avg" else key
        v = ref.values.get(ref_key)
        if v is None or v.number is None:
            continue
        ours = group.footprint()["params_avg"][0] if key == "params_avg" else group.metric(key)[0]
        if ours is None:
            continue
        digits = p_digits if key == "params_avg" else 2
        cells[key] = Stat(ours - v.number, digits=digits, signed=True, mark=MARKS.get(v.status, ""))
        any_value = True
    if not any_value:
        return None
    cells["source"] = "ours − published (same protocol, backbone, memory)"
    return Row("delta", cells)


def _filter_refs_by_methods(refs: list[RefRow], groups: list[RunGroup], methods: list[str] | None) -> list[RefRow]:
    if not methods:
        return refs
    wanted = {m.lower() for m in methods} | {g.method.lower() for g in groups}
    return [r for r in refs if (r.match and r.match.lower() in wanted) or r.method.lower() in wanted]


def protocol_table(protocol: str, groups: list[RunGroup], refs: list[RefRow], metrics: list[str]) -> Table:
    """Our runs (mean ± std over complete seeds), published rows, differences, and runs not averaged."""
    cols = [Column("method", "Method", "text"), Column("backbone", "Backbone", "text"),
            Column("seeds", "Seeds", "text")] + FOOTPRINT_COLUMNS
    cols += [Column(k, METRICS[k].label, latex=METRICS[k].latex) for k in metrics]
    cols.append(Column("source", "Source", "text"))
    done = [g for g in groups if g.n]
    p_digits = params_digits(done)
    rows = [our_row(g, metrics, p_digits) for g in done]
    notes: list[str] = []
    budgets = {memory_label(g.protocol_cfg) for g in groups} | {g.memory for g in done}
    hidden = 0
    for ref in refs:
        if ref.protocol != protocol or not ref.has_values():
            continue
        if ref.memory and ref.memory != "none" and budgets and ref.memory not in budgets:
            hidden += 1                  # another memory budget is another protocol: kept out of the table
            continue
        rows.append(published_row(ref, metrics))
        for key, v in ref.values.items():
            if v.status in MARKS and (key in metrics or key == "params_avg_m"):
                label = METRICS[key].label if key in METRICS else "#Params"
                notes.append(f"{MARKS[v.status]} {ref.method}, {label} ({ref.paper} {', '.join(ref.tables)}): "
                             f"{v.note}")
        for g in done:
            if ref.matches(g):
                d = delta_row(g, ref, metrics, p_digits)
                if d:
                    rows.append(d)
    for g in groups:
        for run in g.incomplete:
            rows.append(Row("incomplete", {"method": f"{g.run_name} seed{run.seed}", "backbone": g.backbone,
                                           "seeds": "0", "source": f"not averaged: {status_text(run)}"}))
    if hidden:
        notes.append(f"{hidden} published row(s) for other memory budgets than {', '.join(sorted(budgets))} "
                     "are left out (see reference/*.csv).")
    first = (done or groups)[0] if (done or groups) else None
    desc = str(first.protocol_cfg.get("description") or "") if first else ""
    title = f"{protocol}" + (f": {desc}" if desc else "")
    notes.insert(0, "Our rows: mean ± sample std over the complete seeds (Seeds = how many). #Ext and #Params: "
                    "extractors and parameters at inference, at the last step and averaged over steps (millions). "
                    "Published rows are the papers' numbers as printed; Δ rows = ours − published, only where "
                    "protocol, backbone and memory match.")
    return Table(title, cols, rows, _dedupe(notes))


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


def summary_table(protocols: list[str], groups: dict[str, list[RunGroup]], refs: list[RefRow],
                  metrics: list[str]) -> Table:
    """Protocols as column groups (like the TSD paper's main tables); rows: run names, then the published
    rows that have a comparable run of ours somewhere in the table."""
    cols = [Column("method", "Method", "text")]
    for p in protocols:
        cols += [Column(f"{p}:{k}", METRICS[k].label, latex=METRICS[k].latex, group=p) for k in metrics]
    names: list[str] = []
    for p in protocols:
        for g in groups.get(p, []):
            if g.n and g.run_name not in names:
                names.append(g.run_name)
    rows = []
    for name in names:
        cells: dict[str, Any] = {"method": name}
        for p in protocols:
            g = next((g for g in groups.get(p, []) if g.run_name == name and g.n), None)
            for k in metrics:
                if g is not None:
                    mean, std, _ = g.metric(k)
                    cells[f"{p}:{k}"] = Stat(mean, std)
        rows.append(Row("ours", cells))
    pub: dict[tuple, dict[str, Any]] = {}
    for ref in refs:
        if ref.protocol not in protocols:
            continue
        if not any(ref.matches(g) for g in groups.get(ref.protocol, []) if g.n):
            continue
        key = (ref.paper, ref.method, ref.backbone, ref.memory)
        cells = pub.setdefault(key, {"method": f"{ref.label} [{ref.paper.split(' (')[0]}, {ref.backbone}]"})
        for k in metrics:
            v = ref.values.get(k)
            if v is not None and v.status not in ("not_reported",):
                cells[f"{ref.protocol}:{k}"] = (Stat(None, text="n/a") if v.status == "unknown" else
                                                Stat(None, text=v.text, spread=v.spread or None,
                                                     mark=MARKS.get(v.status, "")))
    rows += [Row("published", c) for c in pub.values()]
    notes = ["Mean ± sample std over complete seeds; published rows shown only where a run of ours matches "
             "their protocol, backbone and memory. † flagged as garbled or a likely typo in the source text, "
             "‡ not in the provided paper text (unverified); details in the protocol tables."]
    return Table("Summary across protocols", cols, rows, notes)


def runs_csv(runs: list[SeedRun]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["protocol", "run_name", "method", "seed", "status", "tasks_done", "tasks_total", "averaged",
                "reason", "path"])
    for r in runs:
        w.writerow([r.protocol, r.run_name, r.method, r.seed, r.status, r.tasks_done, r.tasks_total,
                    "yes" if r.ok else "no", r.reason, str(r.path)])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Plots of one protocol

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "x"


def protocol_plots(protocol: str, groups: list[RunGroup], refs: list[RefRow], curves: list[RefCurve],
                   plot_dir: Path, top5: bool) -> list[tuple[str, Path]]:
    from . import plots

    done = [g for g in groups if g.n]
    if not done:
        return []
    colours = {g.run_name: plots.colour(i) for i, g in enumerate(done)}
    out: list[tuple[str, Path]] = []
    slug = _slug(protocol)
    step_classes = {i: s["classes_seen"] for i, s in enumerate(done[0].complete[0].steps)}
    for metric, label in (("top1", "top-1"),) + ((("top5", "top-5"),) if top5 else ()):
        series = []
        for g in done:
            xs, ys, std = g.curve(metric)
            series.append(plots.Series(f"{g.run_name} (n={g.n})", xs, ys, std, colours[g.run_name], g.n))
        published = []
        for k, c in enumerate(x for x in curves if x.protocol == protocol and x.metric == metric):
            if not all(s in step_classes for s in c.steps):
                continue
            published.append(plots.Published(f"{c.method} published ({c.backbone})",
                                             [step_classes[s] for s in c.steps], c.values, c.full,
                                             ["#444444", "#999999", "#8c564b", "#bcbd22"][k % 4]))
        path = plots.plot_steps(plot_dir / f"{slug}_steps_{metric}.png",
                                f"{protocol}: {label} accuracy after each step", series, published,
                                f"{label} accuracy over seen classes (%)")
        out.append((f"{label} accuracy after each step", path))
    series = []
    for g in done:
        ys, std = g.last_row()
        if ys:
            series.append(plots.Series(g.run_name, list(range(len(ys))), ys, std, colours[g.run_name], g.n))
    if series:
        out.append(("Per-task accuracy after the last step",
                    plots.plot_per_task(plot_dir / f"{slug}_per_task.png",
                                        f"{protocol}: accuracy on each task after the last step", series)))
    for g in done:
        mat = g.mean_matrix()
        if mat:
            out.append((f"Accuracy matrix: {g.run_name}",
                        plots.plot_heatmap(plot_dir / f"{slug}_heatmap_{_slug(g.run_name)}.png",
                                           f"{protocol} / {g.run_name}: a[i][j] (mean of {g.n} seed(s))", mat)))
    by_base: dict[str, list[RunGroup]] = {}
    for g in done:
        by_base.setdefault(g.base_name, []).append(g)
    ext_groups = []
    for i, (base, gs) in enumerate(sorted(by_base.items())):
        rows = []
        for g in gs:
            x = g.footprint()["ext_last"][0]
            a, a_std, _ = g.metric("avg")
            la, la_std, _ = g.metric("last")
            if x is not None and a is not None and la is not None:
                rows.append((x, a, a_std, la, la_std, g.run_name))
        rows.sort()
        if rows:
            ext_groups.append(plots.Group(base, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                          [r[3] for r in rows], [r[4] for r in rows],
                                          colours[gs[0].run_name], [r[5] for r in rows]))
    if any(len(set(g.x)) > 1 for g in ext_groups):      # some method was run at several N
        out.append(("Accuracy against the number of extractors",
                    plots.plot_extractors(plot_dir / f"{slug}_extractors.png",
                                          f"{protocol}: accuracy vs #extractors", ext_groups)))
    points = []
    for g in done:
        x = g.footprint()["params_avg"][0]
        y, std, _ = g.metric("avg")
        if x is not None and y is not None:
            points.append(plots.Point(g.run_name, x, y, std, colours[g.run_name]))
    grey = ["#555555", "#999999", "#8c564b", "#bcbd22", "#17becf", "#7f7f7f"]
    papers = sorted({r.paper for r in refs})
    for ref in refs:
        if ref.protocol != protocol:
            continue
        p, a = ref.values.get("params_avg_m"), ref.values.get("avg")
        if p is None or a is None or p.number is None or a.number is None:
            continue
        points.append(plots.Point(f"published: {ref.paper.split(' (')[0]}, {ref.backbone}", p.number, a.number,
                                  None, grey[papers.index(ref.paper) % len(grey)], published=True,
                                  text=ref.method))
    if points:
        out.append(("Average accuracy against parameters",
                    plots.plot_params(plot_dir / f"{slug}_params.png",
                                      f"{protocol}: average accuracy vs #params", points,
                                      "average incremental accuracy (%)")))
    return out


# --------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1500px;
color:#222;padding:0 16px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
table.results{border-collapse:collapse;font-size:13px;margin:8px 0}
table.results th,table.results td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
table.results th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.published td{background:#eef6ff;font-style:italic}tr.delta td{background:#fafafa;color:#555;font-size:12px}
tr.incomplete td{color:#999;text-decoration:line-through}
span.tag{font-size:10px;background:#3178c6;color:#fff;border-radius:3px;padding:0 4px;font-style:normal}
ul.notes{font-size:12px;color:#555}.plots img{max-width:100%;border:1px solid #eee;margin:6px 0}
.plots figure{display:inline-block;margin:6px;vertical-align:top;max-width:48%}
figcaption{font-size:12px;color:#555}.links a{margin-right:10px;font-size:13px}
nav a{margin-right:12px}
"""


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def write_html(out_dir: Path, sections: list[dict], summary: dict | None, runs: list[SeedRun],
               ref_files: list[Path], runs_dir: Path) -> Path:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>cilbench report</title>", f"<style>{CSS}</style></head><body>",
             "<h1>cilbench report</h1>",
             f"<p>Runs from <code>{esc(str(runs_dir))}</code>: {sum(r.ok for r in runs)} complete seed run(s) "
             f"averaged, {sum(not r.ok for r in runs)} not complete (listed, never averaged).</p>"]
    links = "".join(f'<a href="#{esc(s["anchor"])}">{esc(s["protocol"])}</a>' for s in sections)
    parts.append("<nav>" + ('<a href="#summary">summary</a>' if summary else "") + links
                 + '<a href="#runs">all runs</a><a href="#reference">reference data</a></nav>')
    if summary:
        parts.append('<h2 id="summary">Summary across protocols</h2>')
        parts.append(summary["html"])
        parts.append('<p class="links">' + "".join(f'<a href="{esc(_rel(p, out_dir))}">{esc(p.suffix[1:])}</a>'
                                                   for p in summary["files"]) + "</p>")
    for s in sections:
        parts.append(f'<h2 id="{esc(s["anchor"])}">{esc(s["protocol"])}</h2>')
        parts.append(s["html"])
        parts.append('<p class="links">table as ' + "".join(
            f'<a href="{esc(_rel(p, out_dir))}">{esc(p.suffix[1:])}</a>' for p in s["files"]) + "</p>")
        if s["plots"]:
            parts.append('<div class="plots">')
            for caption, path in s["plots"]:
                rel = esc(_rel(path, out_dir))
                parts.append(f'<figure><a href="{rel}"><img src="{rel}" alt="{esc(caption)}" loading="lazy"></a>'
                             f"<figcaption>{esc(caption)}</figcaption></figure>")
            parts.append("</div>")
    parts.append('<h2 id="runs">All runs found</h2>')
    parts.append('<table class="results"><thead><tr><th>Protocol</th><th>Run</th><th>Seed</th><th>Status</th>'
                 "<th>Tasks</th><th>Averaged</th></tr></thead><tbody>")
    for r in runs:
        tasks = f"{r.tasks_done}/{r.tasks_total}" if r.tasks_total else ""
        cls = "ours" if r.ok else "incomplete"
        parts.append(f'<tr class="{cls}"><td>{esc(r.protocol)}</td><td>{esc(r.run_name)}</td><td>{r.seed}</td>'
                     f"<td>{esc(status_text(r))}</td><td>{esc(tasks)}</td><td>{'yes' if r.ok else 'no'}</td></tr>")
    parts.append('</tbody></table><p class="links"><a href="tables/runs.csv">runs.csv</a></p>')
    parts.append('<h2 id="reference">Published reference data</h2>')
    parts.append("<p>Numbers transcribed from the seed papers (DER, SEED, HPCR, EXACFS) with their source, "
                 "backbone, class order and number of runs; † = value the transcription flags as garbled or a "
                 "likely typo (kept as printed), ‡ = not in the provided paper text (external listing, unverified), "
                 "n/a = the number was lost from the text, – = not reported by the paper.</p>")
    parts.append('<p class="links">' + "".join(f'<a href="{esc(_rel(p, out_dir))}">{esc(p.name)}</a>'
                                               for p in ref_files) + "</p>")
    parts.append("</body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index


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


def _clear_outputs(out_dir: Path) -> None:
    """Remove the files a previous report wrote (only ours: tables/, plots/, reference/, index.html)."""
    for sub, patterns in (("tables", ("*.md", "*.tex", "*.csv")), ("plots", ("*.png",)), ("reference", ("*.csv",))):
        d = out_dir / sub
        if d.is_dir():
            for pattern in patterns:
                for f in d.glob(pattern):
                    f.unlink()


def build_report(runs_dir: Path, out_dir: Path, protocols=None, methods=None, metrics=None,
                 reference_dir: Path | None = None, include: Callable[[Path], bool] | None = None) -> Path:
    """Scan runs_dir, aggregate seeds, write tables/plots/index.html under out_dir; return index.html."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    chosen_metrics = resolve_metrics(list(metrics) if metrics else None)
    all_runs = [r for r in scan_runs(runs_dir) if include is None or include(r.path)]
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

    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_outputs(out_dir)
    tables_dir, plot_dir, ref_out = out_dir / "tables", out_dir / "plots", out_dir / "reference"
    for d in (tables_dir, plot_dir, ref_out):
        d.mkdir(exist_ok=True)

    sections = []
    for protocol, gs in groups.items():
        keys = chosen_metrics or default_metrics(gs[0].dataset, gs[0].regime)
        p_refs = _filter_refs_by_methods([r for r in refs if r.protocol == protocol], gs, methods)
        table = protocol_table(protocol, gs, p_refs, keys)
        slug = _slug(protocol)
        files = []
        for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv)):
            path = tables_dir / f"{slug}{suffix}"
            path.write_text(render(table), encoding="utf-8")
            files.append(path)
        top5 = any(k.endswith("top5") for k in keys)
        p_curves = [c for c in curves if not methods or c.match in {g.method for g in gs}]
        plot_files = protocol_plots(protocol, gs, p_refs, p_curves, plot_dir, top5)
        sections.append({"protocol": protocol, "anchor": f"p-{slug}", "html": to_html(table), "files": files,
                         "plots": plot_files})

    summary = None
    if groups:
        s_metrics = chosen_metrics or list(SUMMARY_DEFAULT)
        s_refs = _filter_refs_by_methods(refs, [g for gs in groups.values() for g in gs], methods)
        table = summary_table(list(groups), groups, s_refs, s_metrics)
        files = []
        for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv)):
            path = tables_dir / f"summary{suffix}"
            path.write_text(render(table), encoding="utf-8")
            files.append(path)
        summary = {"html": to_html(table), "files": files}
    (tables_dir / "runs.csv").write_text(runs_csv(shown_runs), encoding="utf-8")
    ref_files = []
    src_dir = Path(reference_dir) if reference_dir is not None else REFERENCE_DIR
    if src_dir.is_dir():
        for f in sorted(src_dir.glob("*.csv")):
            shutil.copyfile(f, ref_out / f.name)
            ref_files.append(ref_out / f.name)
    return write_html(out_dir, sections, summary, shown_runs, ref_files, runs_dir)
