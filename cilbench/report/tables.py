"""Tables: one model (Table of Rows of Stats), the report's tables built from run groups and published rows,
and its formats: Markdown, LaTeX (wide and a compact one-column table), CSV, HTML and the terminal (rich).

Best and second-best values of our rows (bounds excluded) are marked in every format: bold and underlined
(Markdown `**x**` / `<ins>x</ins>`, LaTeX `\\textbf` / `\\underline`, HTML `<b>` / `<u>`, CSV `<key>_mark`)."""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field
from typing import Any

from cilbench.report.aggregate import METRICS, RunGroup, mean_std, memory_label
from cilbench.report.reference import MARKS, RefCurve, RefRow
from cilbench.run.rundir import SeedRun

# --------------------------------------------------------------------------------------------------------
# The model


@dataclass
class Stat:
    mean: float | None
    std: float | None = None
    text: str | None = None      # published values keep their printed form
    spread: str | None = None
    mark: str = ""               # † flagged as garbled/typo, ‡ unverified
    digits: int = 2
    signed: bool = False
    rank: int = 0                # 1 best, 2 second best among our rows (0: not ranked)

    def core(self) -> str:
        if self.text is not None:
            return self.text or "–"
        if self.mean is None:
            return "–"
        return f"{self.mean:{'+' if self.signed else ''}.{self.digits}f}"

    def spread_text(self) -> str:
        if self.text is not None:
            return self.spread or ""
        return "" if self.std is None or self.mean is None else f"{self.std:.{self.digits}f}"

    def fmt(self, pm: str = " ± ") -> str:
        spread = self.spread_text()
        return f"{self.core()}{pm + spread if spread else ''}{self.mark}"


@dataclass
class Column:
    key: str
    label: str
    kind: str = "stat"           # text | stat
    latex: str | None = None
    group: str | None = None     # column group (summary table: protocol)
    better: str = ""             # higher | lower: rank our rows on this column


@dataclass
class Row:
    kind: str                    # ours | published | delta | incomplete
    cells: dict[str, Any]
    bound: str = ""              # lower | upper (our rows of finetune / joint)


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


def rank_rows(table: Table) -> None:
    """Mark the best and second-best mean of our non-bound rows in every ranked column."""
    for col in table.columns:
        if not col.better:
            continue
        cells = [r.cells.get(col.key) for r in table.rows if r.kind == "ours" and not r.bound]
        stats = [c for c in cells if isinstance(c, Stat) and c.mean is not None]
        values = sorted({round(s.mean, 10) for s in stats}, reverse=col.better == "higher")
        if len(stats) < 2:
            continue
        for s in stats:
            pos = values.index(round(s.mean, 10))
            s.rank = pos + 1 if pos < 2 else 0


# --------------------------------------------------------------------------------------------------------
# Markdown

_MD_ALWAYS = set("\\`*[]<>|~$")


def md_escape(text: str) -> str:
    """Escape Markdown (and GitHub math) syntax; `_` only where it could start or end emphasis."""
    out = []
    for i, ch in enumerate(text):
        if ch in _MD_ALWAYS:
            out.append("\\" + ch)
        elif ch == "_":
            inner = 0 < i < len(text) - 1 and text[i - 1].isalnum() and text[i + 1].isalnum()
            out.append("_" if inner else "\\_")
        else:
            out.append(ch)
    return "".join(out)


def _md_cell(table: Table, row: Row, col: Column, first: bool) -> str:
    value = row.cells.get(col.key)
    text = md_escape(table.cell_text(row, col))
    if isinstance(value, Stat) and value.rank == 1:
        text = f"**{text}**"
    elif isinstance(value, Stat) and value.rank == 2:
        text = f"<ins>{text}</ins>"
    if first and row.kind == "published":
        text = f"_{text}_ (published)"
    elif first and row.kind == "delta":
        text = f"_{text}_"
    elif first and row.kind == "incomplete":
        text = f"~~{text}~~"
    return text


def to_markdown(table: Table) -> str:
    cols = table.columns
    head = [(f"{c.group} {c.label}" if c.group else c.label) for c in cols]
    out = [f"### {md_escape(table.title)}", "", "| " + " | ".join(md_escape(h) for h in head) + " |",
           "|" + "|".join(":---" if c.kind == "text" else "---:" for c in cols) + "|"]
    for row in table.rows:
        out.append("| " + " | ".join(_md_cell(table, row, c, i == 0) for i, c in enumerate(cols)) + " |")
    if table.notes:
        out.append("")
        out.extend(f"- {md_escape(n)}" for n in table.notes)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------------
# LaTeX

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_LATEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "–": "--", "†": r"$^\dagger$",
                  "‡": r"$^\ddagger$", "≤": r"$\leq$", "·": r"$\cdot$", "→": r"$\rightarrow$", "≠": r"$\neq$"}


def latex_escape(text: str) -> str:
    out = []
    for ch in str(text):
        out.append(_LATEX_SPECIAL.get(ch) or _LATEX_UNICODE.get(ch) or (ch if ord(ch) < 128 else "?"))
    return "".join(out)


def _latex_cell(table: Table, row: Row, col: Column, first: bool) -> str:
    value = row.cells.get(col.key)
    text = latex_escape(table.cell_text(row, col))
    if isinstance(value, Stat) and value.rank == 1:
        text = f"\\textbf{{{text}}}"
    elif isinstance(value, Stat) and value.rank == 2:
        text = f"\\underline{{{text}}}"
    if first and row.kind in ("published", "delta"):
        text = f"\\textit{{{text}}}" + (" (published)" if row.kind == "published" else "")
    return text


def to_latex(table: Table) -> str:
    """The wide table (booktabs)."""
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
        lines.append(" & ".join(_latex_cell(table, row, c, i == 0) for i, c in enumerate(cols)) + " \\\\")
    lines.append("\\bottomrule")
    lines.append("\\end{tabular}")
    lines.extend(f"% {latex_escape(n)}" for n in table.notes)
    return "\n".join(lines) + "\n"


def _latex_math_cell(value: Any) -> str:
    """'$\\mathbf{72.00}_{\\pm 2.00}$': ± as a subscript, a real minus sign, bold / underline for the best two."""
    if not isinstance(value, Stat) or value.core() == "–":
        return "--"
    core = value.core().replace("−", "-")
    if not re.fullmatch(r"[+-]?\d+(\.\d+)?", core):
        return latex_escape(value.fmt())
    core = {1: f"\\mathbf{{{core}}}", 2: f"\\underline{{{core}}}"}.get(value.rank, core)
    spread = value.spread_text()
    mark = {"†": "^{\\dagger}", "‡": "^{\\ddagger}"}.get(value.mark, "")
    return f"${core}{mark}" + (f"_{{\\pm {spread}}}" if spread else "") + "$"


def to_latex_compact(table: Table, keys: list[str], caption: str = "") -> str:
    """Method | the given stat columns, our rows only, one paper column wide: the lower bound, \\midrule, the
    methods, \\midrule, the upper bound. Columns whose cells are all the same are dropped."""
    rows = [r for r in table.rows if r.kind == "ours"]
    by_key = {c.key: c for c in table.columns}
    cols = [by_key[k] for k in keys if k in by_key]
    cols = [c for c in cols if len({table.cell_text(r, c) for r in rows}) > 1 or len(rows) == 1]
    heads = ["#Params (M)" if c.key.startswith("params") else (c.latex or c.label) for c in cols]
    lines = [f"% {latex_escape(table.title)}" + (f": {latex_escape(caption)}" if caption else ""),
             "% requires \\usepackage{booktabs}; the spread is the subscript",
             f"\\begin{{tabular}}{{@{{}}l{'r' * len(cols)}@{{}}}}", "\\toprule",
             " & ".join(["Method"] + [latex_escape(h) for h in heads]) + " \\\\", "\\midrule"]
    previous = None
    for row in rows:
        section = {"lower": 0, "upper": 2}.get(row.bound, 1)
        if previous is not None and section != previous:
            lines.append("\\midrule")
        previous = section
        cells = [latex_escape(str(row.cells.get("name", "")))] + [_latex_math_cell(row.cells.get(c.key))
                                                                   for c in cols]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# CSV, HTML, terminal

def to_csv(table: Table) -> str:
    """Numbers unformatted: a stat column gives <key>, <key>_std and, where ranked, <key>_mark (best/second)."""
    header = ["kind", "method"]
    for c in table.columns:
        if c.key == "method":
            continue
        header += [c.key] if c.kind == "text" else [c.key, f"{c.key}_std"] + ([f"{c.key}_mark"] if c.better else [])
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in table.rows:
        out = [row.kind, row.cells.get("method", row.cells.get("name", ""))]
        for c in table.columns:
            if c.key == "method":
                continue
            value = row.cells.get(c.key)
            if c.kind == "text":
                out.append("" if value is None else str(value))
                continue
            if isinstance(value, Stat) and value.text is not None:
                out += [value.text + value.mark, value.spread or ""]
            elif isinstance(value, Stat):
                out += ["" if value.mean is None else f"{value.mean:.4f}",
                        "" if value.std is None else f"{value.std:.4f}"]
            else:
                out += ["", ""]
            if c.better:
                out.append({1: "best", 2: "second"}.get(value.rank, "") if isinstance(value, Stat) else "")
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
            value = row.cells.get(c.key)
            text = html.escape(table.cell_text(row, c))
            if isinstance(value, Stat) and value.rank:
                text = f"<b>{text}</b>" if value.rank == 1 else f"<u>{text}</u>"
            if i == 0 and row.kind == "published":
                text += ' <span class="tag">published</span>'
            if i == 0 and row.cells.get("method") and row.cells.get("method") != row.cells.get("name"):
                text = f'<span title="{html.escape(str(row.cells["method"]))}">{text}</span>'
            align = "" if c.kind == "text" else ' class="num"'
            tds.append(f"<td{align}>{text}</td>")
        out.append(f'<tr class="{row.kind}{" bound" if row.bound else ""}">' + "".join(tds) + "</tr>")
    out.append("</tbody></table>")
    if table.notes:
        out.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in table.notes) + "</ul>")
    return "\n".join(out)


def to_rich(table: Table):
    """The same table for the terminal; every cell is literal text (no rich markup is interpreted)."""
    from rich.table import Table as RichTable
    from rich.text import Text
    styles = {"published": "italic cyan", "delta": "italic", "incomplete": "dim strike"}
    rt = RichTable(title=Text(table.title), title_justify="left")
    for c in table.columns:
        label = f"{c.group} {c.label}" if c.group else c.label
        rt.add_column(Text(label), justify="left" if c.kind == "text" else "right", overflow="fold")
    for row in table.rows:
        cells = []
        for i, c in enumerate(table.columns):
            value = row.cells.get(c.key)
            text = table.cell_text(row, c) + (" (published)" if i == 0 and row.kind == "published" else "")
            style = {1: "bold", 2: "underline"}.get(value.rank, "") if isinstance(value, Stat) else ""
            cells.append(Text(text, style=style))
        rt.add_row(*cells, style=styles.get(row.kind))
    return rt


# --------------------------------------------------------------------------------------------------------
# The tables of the report

FOOTPRINT_COLUMNS = [
    Column("ext_last", "#Ext (last)"),
    Column("ext_avg", "#Ext (avg)"),
    Column("params_last", "#Params M total (last)", latex="#Params M total (last)"),
    Column("params_avg", "#Params M total (avg)", latex="#Params M total (avg)"),
    Column("params_bb_avg", "#Params M backbone (avg)", latex="#Params M backbone (avg)"),
]
SPREAD_TEXT = {"std": "mean ± sample std", "ci95": "mean ± 95% CI (t-distribution)"}


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
    values = [v for v in values if v is not None]
    return 3 if values and max(values) < 1 else 2


def metric_column(key: str) -> Column:
    m = METRICS[key]
    return Column(key, m.label, latex=m.latex, better="higher" if m.higher_is_better else "lower")


def our_row(group: RunGroup, metrics: list[str], p_digits: int = 2, spread: str = "std") -> Row:
    fp = group.footprint()
    cells: dict[str, Any] = {"name": group.name, "method": group.run_name, "backbone": group.backbone,
                             "seeds": str(group.n)}
    for key, (mean, _std) in fp.items():
        if key.startswith("params"):
            digits = p_digits
        elif key == "ext_last":
            digits = 0 if mean is not None and float(mean).is_integer() else 2
        else:
            digits = 2
        cells[key] = Stat(mean, digits=digits)
    partial = []
    for key in metrics:
        mean, s, n = group.metric(key, spread)
        cells[key] = Stat(mean, s)
        if 0 < n < group.n:
            partial.append(f"{METRICS[key].label} from {n}/{group.n} seeds")
    parts = ["cilbench", group.epochs_cap_text(), *partial, group.device_text()]
    mismatch = group.config_mismatch()
    if mismatch:
        parts.append(f"seeds differ in {', '.join(mismatch[:3])}" + ("…" if len(mismatch) > 3 else ""))
    cells["source"] = "; ".join(p for p in parts if p)
    return Row("ours", cells, group.bound)


def _ref_stat(v) -> Stat | None:
    if v is None:
        return None
    if v.status == "unknown":
        return Stat(None, text="n/a")
    if v.status == "not_reported":
        return Stat(None, text="–")
    return Stat(None, text=v.text, spread=v.spread or None, mark=MARKS.get(v.status, ""))


def published_row(ref: RefRow, metrics: list[str]) -> Row:
    cells: dict[str, Any] = {"name": ref.label, "method": ref.label, "backbone": ref.backbone,
                             "seeds": ref.runs or "?"}
    pv = ref.values.get("params_avg_m")
    if pv is not None and pv.status != "not_reported":
        cells["params_bb_avg"] = Stat(None, text=pv.text, mark=MARKS.get(pv.status, ""))
    for key in metrics:
        stat = _ref_stat(ref.values.get(key))
        if stat is not None:
            cells[key] = stat
    cells["source"] = ref.source
    return Row("published", cells)


def delta_row(group: RunGroup, ref: RefRow, metrics: list[str], p_digits: int = 2) -> Row | None:
    """Ours − published, for every value both have; the published #Params is the backbone count."""
    check = ref.order_check(group)
    differs = check.status in ("differs", "unknown")
    label = f"Δ {group.name} − {ref.label}" + (" (≠ class order)" if differs else "")
    cells: dict[str, Any] = {"name": label, "method": f"Δ {group.run_name} − {ref.label}", "backbone": "",
                             "seeds": ""}
    any_value = False
    bb = group.footprint()["params_bb_avg"][0]
    for key in metrics + ["params_bb_avg"]:
        v = ref.values.get("params_avg_m" if key == "params_bb_avg" else key)
        if v is None or v.number is None:
            continue
        ours = bb if key == "params_bb_avg" else group.metric(key)[0]
        if ours is None:
            continue
        digits = p_digits if key == "params_bb_avg" else 2
        cells[key] = Stat(ours - v.number, digits=digits, signed=True, mark=MARKS.get(v.status, ""))
        any_value = True
    if not any_value:
        return None
    cells["source"] = f"ours − published (same protocol, backbone, memory); {check.text}"
    cells["order_match"] = check.status
    return Row("delta", cells)


def protocol_table(protocol: str, groups: list[RunGroup], refs: list[RefRow], metrics: list[str],
                   spread: str = "std") -> Table:
    """Our runs (mean ± spread over complete seeds), published rows, differences, and runs not averaged."""
    cols = [Column("name", "Method", "text"), Column("backbone", "Backbone", "text"),
            Column("seeds", "Seeds", "text")] + FOOTPRINT_COLUMNS
    cols += [metric_column(k) for k in metrics]
    cols.append(Column("source", "Source", "text"))
    done = [g for g in groups if g.n]
    p_digits = params_digits(done)
    rows = [our_row(g, metrics, p_digits, spread) for g in done]
    notes: list[str] = []
    budgets = {memory_label(g.protocol_cfg) for g in groups} | {g.memory for g in done}
    hidden = 0
    for ref in refs:
        if ref.protocol != protocol or not ref.has_values(metrics + ["params_avg_m"]):
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
            rows.append(Row("incomplete", {"name": f"{g.name} seed{run.seed}", "method": f"{g.run_name} seed{run.seed}",
                                           "backbone": g.backbone, "seeds": "0",
                                           "source": f"not averaged: {status_text(run)}"}))
    if hidden:
        notes.append(f"{hidden} published row(s) for other memory budgets than {', '.join(sorted(budgets))} "
                     "are left out (see reference/*.csv).")
    first = (done or groups)[0] if (done or groups) else None
    desc = str(first.protocol_cfg.get("description") or "") if first else ""
    title = f"{protocol}" + (f": {desc}" if desc else "")
    notes.insert(0, f"Our rows: {SPREAD_TEXT[spread]} over the complete seeds (Seeds = how many); best and second "
                    "best of our rows (bounds excluded) in bold and underlined. #Ext and #Params: extractors and "
                    "parameters at inference, at the last step and averaged over steps (millions); total = "
                    "backbone(s) + classifier, backbone = extractors only (as the papers count #Params). "
                    "Published rows are the papers' numbers as printed; Δ rows = ours − published, only where "
                    "protocol, backbone and memory match, marked (≠ class order) where the class orders differ "
                    "or the paper does not state them.")
    table = Table(title, cols, rows, _dedupe(notes))
    rank_rows(table)
    return table


def steps_table(protocol: str, groups: list[RunGroup], curves: list[RefCurve], metric: str = "top1") -> Table:
    """Accuracy after every step (mean ± std over seeds), one row per method: DER's and PyCIL's standard table."""
    done = [g for g in groups if g.n]
    T = min(min(len(r.steps) for r in g.complete) for g in done)
    classes = [done[0].complete[0].steps[t]["classes_seen"] for t in range(T)]
    cols = [Column("name", "Method", "text")]
    cols += [Column(f"step{t}", str(classes[t]), better="higher") for t in range(T)]
    rows = []
    for g in done:
        cells: dict[str, Any] = {"name": g.name, "method": g.run_name}
        for t in range(T):
            cells[f"step{t}"] = Stat(*mean_std([r.steps[t][metric] for r in g.complete]))
        rows.append(Row("ours", cells, g.bound))
    for c in curves:
        if c.protocol != protocol or c.metric != metric or not c.full or len(c.values) != T:
            continue
        cells = {"name": f"{c.method} ({c.backbone})", "method": c.method}
        cells.update({f"step{t}": Stat(None, text=f"{v:.2f}") for t, v in enumerate(c.values)})
        rows.append(Row("published", cells))
    label = "top-1" if metric == "top1" else "top-5"
    table = Table(f"{protocol}: {label} accuracy (%) after each step (columns: classes seen)", cols, rows,
                  [f"Mean ± sample std over the complete seeds of {label} accuracy over all classes seen so far; "
                   "published curves as decoded from the official code."])
    rank_rows(table)
    return table


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


def summary_table(protocols: list[str], groups: dict[str, list[RunGroup]], refs: list[RefRow],
                  metrics: list[str]) -> Table:
    """Protocols as column groups (like the TSD paper's main tables); rows: run names, then the published
    rows that have a comparable run of ours somewhere in the table."""
    from cilbench.report.aggregate import sort_key
    cols = [Column("name", "Method", "text")]
    for p in protocols:
        cols += [Column(f"{p}:{k}", METRICS[k].label, latex=METRICS[k].latex, group=p,
                        better="higher" if METRICS[k].higher_is_better else "lower") for k in metrics]
    found: dict[str, RunGroup] = {}
    for p in protocols:
        for g in groups.get(p, []):
            if g.n and g.run_name not in found:
                found[g.run_name] = g
    rows = []
    for name, first in sorted(found.items(), key=lambda kv: sort_key(kv[1].method, kv[0])):
        cells: dict[str, Any] = {"name": first.name, "method": name}
        for p in protocols:
            g = next((g for g in groups.get(p, []) if g.run_name == name and g.n), None)
            for k in metrics:
                if g is not None:
                    mean, std, _ = g.metric(k)
                    cells[f"{p}:{k}"] = Stat(mean, std)
        rows.append(Row("ours", cells, first.bound))
    pub: dict[tuple, dict[str, Any]] = {}
    for ref in refs:
        if ref.protocol not in protocols:
            continue
        if not any(ref.matches(g) for g in groups.get(ref.protocol, []) if g.n):
            continue
        key = (ref.paper, ref.method, ref.backbone, ref.memory)
        label = f"{ref.label} [{ref.paper.split(' (')[0]}, {ref.backbone}]"
        cells = pub.setdefault(key, {"name": label, "method": label})
        for k in metrics:
            v = ref.values.get(k)
            if v is not None and v.status not in ("not_reported",):
                cells[f"{ref.protocol}:{k}"] = _ref_stat(v)
    rows += [Row("published", c) for c in pub.values()]
    notes = ["Mean ± sample std over complete seeds; best and second best of our rows (bounds excluded) in bold "
             "and underlined; published rows shown only where a run of ours matches their protocol, backbone and "
             "memory. † flagged as garbled or a likely typo in the source text, ‡ not readable in the paper, "
             "from an outside listing "
             "(unverified); details in the protocol tables."]
    table = Table("Summary across protocols", cols, rows, notes)
    rank_rows(table)
    return table


RUNS_CSV_FIELDS = ["protocol", "run_name", "name", "method", "seed", "status", "tasks_done", "tasks_total",
                   "averaged", "reason", "class_order", "cilbench_version", "cilbench_commit", "torch", "device",
                   "started", "finished", "train_seconds", "eval_seconds", "method_source", "path"]


def method_source(config: dict) -> str:
    """Where a run's method came from: 'built-in', a plug-in package and version, or a plug-in file (with its
    git commit or content hash), as config.yaml records it."""
    src = config.get("method_source")
    if not isinstance(src, dict) or src.get("kind") in (None, "builtin"):
        return "built-in"
    if src.get("package"):
        return f"plug-in {src['package']} {src.get('version') or ''}".strip()
    stamp = src.get("git_commit") or src.get("sha256") or ""
    return f"plug-in {src.get('file') or src.get('module')}" + (f" @ {stamp}" if stamp else "")


def run_info(r: SeedRun) -> dict[str, Any]:
    """One seed run as the runs table shows it."""
    from cilbench.report.aggregate import display_name, order_name
    m = r.manifest
    train = sum(s["train_seconds"] for s in r.steps) if r.steps else None
    evals = sum(s["eval_seconds"] for s in r.steps) if r.steps else None
    device = m.get("device_name") or m.get("device") or ""
    if m.get("device") and m.get("device_name") and m.get("device") not in str(m.get("device_name")):
        device = f"{m.get('device')} ({m.get('device_name')})"
    name = display_name(r.run_name, r.method, r.config.get("method_display"))
    return {"protocol": r.protocol, "run_name": r.run_name, "name": name,
            "method": r.method, "seed": r.seed, "status": r.status, "tasks_done": r.tasks_done,
            "tasks_total": r.tasks_total, "averaged": "yes" if r.ok else "no", "reason": r.reason,
            "class_order": order_name(r.class_order, r.protocol_cfg.get("num_classes")) if r.config else "",
            "cilbench_version": m.get("cilbench_version") or "", "cilbench_commit": m.get("cilbench_commit") or "",
            "torch": m.get("torch") or "", "device": device, "started": m.get("started") or "",
            "finished": m.get("finished") or "", "train_seconds": "" if train is None else f"{train:.1f}",
            "eval_seconds": "" if evals is None else f"{evals:.1f}", "method_source": method_source(r.config),
            "path": str(r.path)}


def runs_csv(runs: list[SeedRun]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=RUNS_CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in runs:
        w.writerow({k: ("" if v is None else v) for k, v in run_info(r).items()})
    return buf.getvalue()
