"""Published reference numbers (results/reference/*.csv; columns in its README) and how they line up with ours:
a published row is compared (Δ) where protocol, backbone, memory and method match, and the comparison says
whether the class order (or set of orders) matches too."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from cilbench.errors import UserError
from cilbench.report.aggregate import METRICS, RunGroup, order_name

REFERENCE_DIR = Path(__file__).resolve().parent.parent.parent / "results" / "reference"

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


@dataclass(frozen=True)
class OrderCheck:
    status: str          # same | likely | differs | unknown
    text: str            # for the reader: what was compared


def parse_orders(spec: str) -> tuple[str, list[str], int | None]:
    """The `orders` column: 'seed1993', 'podnet1|podnet2|podnet3', 'likely:<names>', 'unknown[:N]', 'random:N'."""
    kind, sep, rest = spec.strip().partition(":")
    if not sep:
        kind, rest = (kind, "") if kind in ("unknown", "random", "") else ("exact", kind)
    kind = kind or "unknown"
    if kind in ("unknown", "random"):
        return kind, [], int(rest) if rest.isdigit() else None
    names = [order_name(n.strip()) for n in rest.split("|") if n.strip()]
    return (kind if kind == "likely" else "exact"), names, len(names)


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
    orders: str = "unknown"
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
        return f"{self.paper} {', '.join(self.tables)} ({runs}{spread}; class order: {self.order_text})"

    @property
    def order_text(self) -> str:
        kind, names, count = parse_orders(self.orders)
        if kind == "exact":
            return ", ".join(names)
        if kind == "likely":
            return f"{count} orders, likely {', '.join(names)} (not stated)"
        if kind == "random":
            return f"shuffled per run{f' ({count} runs)' if count else ''}"
        return f"{count} order(s), not stated" if count else "not stated"

    def has_values(self, keys: list[str] | None = None) -> bool:
        return any(v.status != "not_reported" for k, v in self.values.items() if keys is None or k in keys)

    def matches(self, group: RunGroup) -> bool:
        """Same protocol, same (standard-width) backbone, same memory where the paper fixes one, same method."""
        if not self.match or self.protocol != group.protocol:
            return False
        if self.match not in (group.method, group.run_name):
            return False
        if self.backbone != group.backbone_standard:
            return False
        return not self.memory or self.memory == group.memory

    def order_check(self, group: RunGroup) -> OrderCheck:
        """Does the set of class orders of our complete seeds equal the paper's?"""
        ours = group.orders()
        ours_text = ", ".join(ours) + (f" ({len(ours)} orders)" if len(ours) > 1 else "")
        kind, names, count = parse_orders(self.orders)
        if kind == "unknown":
            return OrderCheck("unknown", f"class order not stated by the paper; ours {ours_text}")
        if kind == "random":
            if len(ours) > 1 and len(ours) == group.n:
                return OrderCheck("likely", f"both shuffle the classes per run; ours {ours_text}")
            return OrderCheck("differs", f"class order differs: paper shuffles per run, ours {ours_text}")
        if sorted(ours) == sorted(names):
            if kind == "likely":
                return OrderCheck("likely", f"class orders {ours_text}, likely the paper's (not stated)")
            return OrderCheck("same", f"same class order(s): {ours_text}")
        return OrderCheck("differs", f"class order differs: ours {ours_text}, paper {self.order_text}")


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
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}); see results/reference/README.md") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
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
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
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
                                              r["match"], r["class_order"], r["runs"],
                                              r.get("orders") or "unknown"))
            if r["table"] not in row.tables:
                row.tables.append(r["table"])
            row.values[r["metric"]] = RefValue(r["value"], r["spread"], r["spread_kind"], r["status"], r["note"])
    for c in curves.values():
        order = sorted(range(len(c.steps)), key=lambda i: c.steps[i])
        c.steps = [c.steps[i] for i in order]
        c.values = [c.values[i] for i in order]
    return list(rows.values()), list(curves.values())


def filter_refs_by_methods(refs: list[RefRow], groups: list[RunGroup], methods: list[str] | None) -> list[RefRow]:
    if not methods:
        return refs
    wanted = {m.lower() for m in methods} | {g.method.lower() for g in groups}
    return [r for r in refs if (r.match and r.match.lower() in wanted) or r.method.lower() in wanted]
