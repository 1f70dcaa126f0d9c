"""Aggregation over seeds: the metrics a table can show, mean ± std or 95% CI, readable method names and the
order papers use (lower bound first, upper bound last), and one RunGroup per (protocol, run name)."""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

from cilbench.config import flatten
from cilbench.errors import UserError
from cilbench.run.rundir import SeedRun

# --------------------------------------------------------------------------------------------------------
# Metrics a table can show


@dataclass(frozen=True)
class Metric:
    key: str          # name on the command line (--metric) and in CSV headers
    field: str        # key in metrics.json
    label: str        # column header
    latex: str
    higher_is_better: bool = True


METRICS: dict[str, Metric] = {m.key: m for m in [
    Metric("avg", "avg_acc", "Avg", "Avg"),
    Metric("last", "last_acc", "Last", "Last"),
    Metric("bwt", "bwt", "BWT", "BWT"),
    Metric("forgetting", "forgetting", "Forgetting", "Forg.", higher_is_better=False),
    Metric("avg_top5", "avg_acc_top5", "Avg top-5", "Avg top-5"),
    Metric("last_top5", "last_acc_top5", "Last top-5", "Last top-5"),
    Metric("bwt_top5", "bwt_top5", "BWT top-5", "BWT top-5"),
    Metric("forgetting_top5", "forgetting_top5", "Forgetting top-5", "Forg. top-5", higher_is_better=False),
    Metric("avg_task_mean", "avg_acc_task_mean", "Avg (task mean)", "Avg (task mean)"),
    Metric("last_task_mean", "last_acc_task_mean", "Last (task mean)", "Last (task mean)"),
]}
DEFAULT_METRICS = ("avg", "last", "bwt")
TOP5_DEFAULT = ("avg_top5", "last_top5")
ONLINE_DEFAULT = ("last", "last_task_mean", "avg", "avg_task_mean", "forgetting")
TASK_MEAN_DEFAULT = ("avg_task_mean", "last_task_mean")
SUMMARY_DEFAULT = ("avg", "last")
# methods whose papers report FACIL's / HPCR's task-mean accuracy: their tables show it by default
TASK_MEAN_METHODS = {"seed", "pcr", "hpcr"}


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


def default_metrics(dataset: str, regime: str = "offline", methods: set[str] | None = None) -> list[str]:
    """Avg, Last, BWT; + top-5 on ImageNet (as DER reports); online: per-sample and task-mean Last/Avg and
    forgetting (as HPCR reports); + task-mean Avg/Last where a method's paper reports them (SEED)."""
    if regime == "online":
        return list(ONLINE_DEFAULT)
    keys = list(DEFAULT_METRICS) + (list(TOP5_DEFAULT) if dataset.startswith("imagenet") else [])
    if methods and methods & TASK_MEAN_METHODS:
        keys += list(TASK_MEAN_DEFAULT)
    return keys


# --------------------------------------------------------------------------------------------------------
# Mean, std and the 95% confidence interval

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]


def t975(df: int) -> float:
    """Student's t quantile 0.975 (Cornish-Fisher expansion beyond the table: error below 1e-4)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2) \
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3)


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]


def mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    vals = _numbers(values)
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def mean_ci95(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95% CI, t_{0.975,n-1}·s/√n (as HPCR's code computes it)."""
    vals = _numbers(values)
    mean, std = mean_std(vals)
    if std is None:
        return mean, None
    return mean, t975(len(vals) - 1) * std / math.sqrt(len(vals))


# --------------------------------------------------------------------------------------------------------
# Method names and the order of rows

NAMES = {"finetune": "Finetune", "replay": "Replay", "er": "ER", "joint": "Joint", "der": "DER w/o P",
         "der_prune": "DER", "tsd_grc": "TSD-GRC", "tsd_fixed": "TSD-Fixed", "seed": "SEED", "pcr": "PCR",
         "hpcr": "HPCR", "exacfs": "EXACFS"}
FAMILIES = {"finetune": "baseline", "replay": "baseline", "er": "baseline", "joint": "baseline",
            "der": "der", "der_prune": "der", "tsd_grc": "tsd", "tsd_fixed": "tsd", "seed": "seed",
            "pcr": "pcr", "hpcr": "pcr", "exacfs": "exacfs", "foster": "foster", "memo": "memo", "dytox": "dytox"}
LOWER_BOUNDS = {"finetune"}
UPPER_BOUNDS = {"joint"}
_ORDER = ["finetune", "replay", "er", "der", "der_prune", "dytox", "foster", "memo", "seed", "pcr", "hpcr",
          "exacfs", "tsd_grc", "tsd_fixed"]


def display_name(run_name: str, method: str | None = None, declared: str | None = None) -> str:
    """'tsd_grc+N2' -> 'TSD-GRC (N=2)'; a plug-in's own display name (`declared`, from config.yaml), else its
    registered name; other tags in brackets."""
    base, *tags = run_name.split("+")
    method = method or base
    own = declared if isinstance(declared, str) and declared.strip() else None
    name = NAMES.get(method) or own or NAMES.get(base, base)
    ns = [t[1:] for t in tags if re.fullmatch(r"N\d+", t)]
    rest = [t for t in tags if not re.fullmatch(r"N\d+", t)]
    if ns:
        name += f" (N={ns[0]})"
    if rest:
        name += f" [{'+'.join(rest)}]"
    return name


def family(method: str) -> str:
    return FAMILIES.get(method, "other")


def bound(method: str) -> str:
    """'lower' (finetune), 'upper' (joint) or ''."""
    return "lower" if method in LOWER_BOUNDS else "upper" if method in UPPER_BOUNDS else ""


def sort_key(method: str, run_name: str) -> tuple:
    """Lower bound first, known methods in a fixed order, unknown ones by name, upper bound last; N ascending."""
    rank = 1000 if method in UPPER_BOUNDS else (_ORDER.index(method) if method in _ORDER else 500)
    ns = [int(t[1:]) for t in run_name.split("+")[1:] if re.fullmatch(r"N\d+", t)]
    return rank, method, strip_n_tag(run_name), ns[0] if ns else 0, run_name


def strip_n_tag(run_name: str) -> str:
    """'tsd_grc+N3' -> 'tsd_grc'; 'tsd_fixed+N3+long' -> 'tsd_fixed+long'."""
    parts = run_name.split("+")
    return "+".join([parts[0]] + [p for p in parts[1:] if not re.fullmatch(r"N\d+", p)])


# --------------------------------------------------------------------------------------------------------
# Class orders: one canonical name per order, so that equal orders compare equal

_ALIASES = {"der_trial1": "seed1993", "der_trial2": "podnet1", "der_trial3": "podnet2", "der_trial4": "podnet3"}


def order_name(order: Any, num_classes: int | None = None) -> str:
    """Canonical name of a class order (a name, or a list matched against the named orders)."""
    if isinstance(order, str):
        return _ALIASES.get(order, order)
    if isinstance(order, list):
        from cilbench.data.protocol import NAMED_ORDERS, seed_permutation
        n = len(order)
        candidates = {name: full for name, full in NAMED_ORDERS.items() if not name.startswith("der_trial")}
        if isinstance(num_classes, int) and 0 < num_classes <= 100:
            candidates["seed1993"] = seed_permutation(1993, 100)
        for name, full in sorted(candidates.items()):
            if list(full[:n]) == list(order):
                return name
        return "explicit list"
    return str(order)


def memory_label(protocol_cfg: dict) -> str:
    mem = protocol_cfg.get("memory") if isinstance(protocol_cfg.get("memory"), dict) else {}
    policy = mem.get("policy")
    if policy == "fixed_total":
        return f"fixed_total:{mem.get('total')}"
    if policy == "per_class":
        return f"per_class:{mem.get('per_class')}"
    if policy == "reservoir":
        return f"reservoir:{mem.get('size')}"
    return "none" if policy == "none" else ""


def _flat(d: Any) -> dict:
    """Dotted keys -> comparable text of the leaf values."""
    return {k: json.dumps(v, sort_keys=True, default=str) for k, v in flatten(d).items()}


# --------------------------------------------------------------------------------------------------------
# All seeds of one run name on one protocol

@dataclass
class RunGroup:
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
    def name(self) -> str:
        return display_name(self.run_name, self.method, self._first().config.get("method_display"))

    @property
    def base_name(self) -> str:
        return strip_n_tag(self.run_name)

    @property
    def bound(self) -> str:
        return bound(self.method)

    @property
    def protocol_cfg(self) -> dict:
        return self._first().protocol_cfg

    @property
    def dataset(self) -> str:
        return str(self.protocol_cfg.get("dataset") or self.protocol.split("_")[0])

    @property
    def regime(self) -> str:
        return str(self.protocol_cfg.get("regime") or ("online" if "_online" in self.protocol else "offline"))

    def _backbone_card(self) -> tuple[str, dict]:
        """The network the runs used and the card's backbone block when it is that network (None: the method
        built its own, so the card's width and weights file do not describe it)."""
        bb = self.protocol_cfg.get("backbone") if isinstance(self.protocol_cfg.get("backbone"), dict) else {}
        card_name = str(bb.get("name") or "?")
        used = self._first().config.get("method_backbone") or card_name
        return used, (bb if used == card_name else {})

    @property
    def backbone(self) -> str:
        name, bb = self._backbone_card()
        name = f"{name} (width {bb['width']})" if bb.get("width") else name
        return f"{name}, pretrained" if bb.get("pretrained") else name

    @property
    def backbone_standard(self) -> str | None:
        """The backbone name when it has its standard width and starts from scratch (only then can it match a
        paper's)."""
        name, bb = self._backbone_card()
        return None if bb.get("width") or bb.get("pretrained") or name == "?" else name

    @property
    def memory(self) -> str:
        """The memory the method actually used: 'none' when it kept no exemplars at any step."""
        run = self._first()
        if run.steps and all(s["memory_size"] == 0 for s in run.steps):
            return "none"
        return memory_label(run.protocol_cfg)

    def orders(self) -> list[str]:
        """Canonical class-order names of the complete seeds, in seed order, distinct."""
        out: list[str] = []
        for r in self.complete:
            name = order_name(r.class_order, r.protocol_cfg.get("num_classes"))
            if name not in out:
                out.append(name)
        return out

    def epochs_cap_text(self) -> str:
        """'' when no complete seed ran under --epochs, else e.g. 'epochs capped at 2 (1/3 seeds)'."""
        caps = [(r.config.get("runtime") or {}).get("max_epochs") if isinstance(r.config.get("runtime"), dict)
                else None for r in self.complete]
        used = [c for c in caps if c is not None]
        if not used:
            return ""
        text = f"epochs capped at {'/'.join(str(c) for c in sorted(set(map(str, used))))}"
        return text + (f" ({len(used)}/{len(caps)} seeds)" if len(used) < len(caps) else "")

    def device_text(self) -> str:
        """The device of the complete seeds and why it was chosen, e.g. 'device auto → cpu: no CUDA device'."""
        seen: list[str] = []
        for r in self.complete:
            text = str(r.manifest.get("device_reason") or r.manifest.get("device") or "")
            if text and text not in seen:
                seen.append(text)
        return ("device " + " / ".join(seen)) if seen else ""

    def config_mismatch(self) -> list[str]:
        """Config keys (other than seed, device and the per-seed class order) that differ between the seeds."""
        flats = [_flat(r.config) for r in self.complete]
        keys = set().union(*flats) if flats else set()
        ignore = {"seed", "runtime.device", "protocol.description", "protocol.source"}
        if any("class_orders" in k for k in keys):
            ignore.add("protocol.class_order")
        differ = [k for k in keys if k not in ignore and not k.startswith("protocol.methods.")
                  and len({f.get(k) for f in flats}) > 1]
        order = ("method_config.", "runtime.", "protocol.")
        return sorted(differ, key=lambda k: (next((i for i, p in enumerate(order) if k.startswith(p)), 3), k))

    def metric(self, key: str, spread: str = "std") -> tuple[float | None, float | None, int]:
        """Mean, spread (sample std or 95% CI half-width) and how many seeds hold a value."""
        vals = _numbers([r.metrics.get(METRICS[key].field) for r in self.complete])
        mean, s = mean_ci95(vals) if spread == "ci95" else mean_std(vals)
        return mean, s, len(vals)

    def footprint(self) -> dict[str, tuple[float | None, float | None]]:
        """#extractors and #params (millions; total and backbone only) at the last step and averaged."""
        runs = self.complete
        backbone = [r for r in runs if all(s["params_backbone"] is not None for s in r.steps)]
        return {
            "ext_last": mean_std([r.steps[-1]["extractors"] for r in runs]),
            "ext_avg": mean_std([statistics.fmean(s["extractors"] for s in r.steps) for r in runs]),
            "params_last": mean_std([r.steps[-1]["params"] / 1e6 for r in runs]),
            "params_avg": mean_std([statistics.fmean(s["params"] for s in r.steps) / 1e6 for r in runs]),
            "params_bb_avg": mean_std([statistics.fmean(s["params_backbone"] for s in r.steps) / 1e6
                                       for r in backbone]) if len(backbone) == len(runs) else (None, None),
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
    """Protocol -> its run groups, in paper order (lower bound first, upper bound last)."""
    by_key: dict[tuple[str, str], list[SeedRun]] = {}
    for r in runs:
        by_key.setdefault((r.protocol, r.run_name), []).append(r)
    out: dict[str, list[RunGroup]] = {}
    for (proto, name), rs in sorted(by_key.items()):
        out.setdefault(proto, []).append(RunGroup(proto, name, sorted(rs, key=lambda r: r.seed)))
    for proto in out:
        out[proto].sort(key=lambda g: sort_key(g.method, g.run_name))
    return out
