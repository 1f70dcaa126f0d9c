"""The sweep file and its grid: which runs a sweep is made of, each resolved before anything is submitted.

A sweep file names the grid (methods × protocols × seeds × `set` values; a list value in `set` is an axis,
a list-valued option is written as a list of lists) and the options every run shares. Every cell is
resolved exactly as `cilbench run` resolves its options, so a bad cell is refused before any job exists.
"""
from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from cilbench.config import build, load_yaml, parse_override
from cilbench.errors import UserError


@dataclass
class SweepSpec:
    """A sweep file: the grid and the options every run of it shares."""
    name: str = ""                       # default: the file's stem; names the log folder
    description: str = ""
    methods: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    set: dict[str, Any] = field(default_factory=dict)   # --set key -> value, or a list of values (an axis)
    epochs: int | None = None
    deterministic: bool = False
    device: str = "auto"
    out: str = "results/runs"
    data_root: str | None = None
    tag: str | None = None
    grids: list[dict] = field(default_factory=list)     # parts of the grid, each overriding the keys above
    skip_invalid: bool = False                          # skip (and list) cells that do not validate
    slurm: dict = field(default_factory=dict)           # Slurm options (see backends.SlurmOptions)
    source: str = field(default="", init=False)        # the file it came from (for messages)
    skipped: list[tuple[str, str]] = field(default_factory=list, init=False)   # (cell, reason) under skip_invalid


@dataclass
class GridPart:
    """One part of a sweep's grid (e.g. one protocol with its own N): unset keys come from the file's top
    level; `set` entries are added to the top level's."""
    methods: list[str] | None = None
    protocols: list[str] | None = None
    seeds: list[int] | None = None
    set: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: what `cilbench run` is given, and (after validation) where it writes."""
    method: str
    protocol: str
    seed: int
    overrides: tuple[str, ...] = ()      # --set texts: fixed options, then this cell's axis values
    axes: tuple[tuple[str, Any], ...] = ()
    tag: str | None = None
    run_dir: Path | None = None

    @property
    def label(self) -> str:
        values = " ".join(f"{k}={yaml_value(v)}" for k, v in self.axes)
        return f"{self.method} on {self.protocol}, seed {self.seed}" + (f" ({values})" if values else "")


# --------------------------------------------------------------------------------------------------------
# Loading and expanding the grid

def load_sweep(path: str | None, methods=None, protocols=None, seeds=None, sets=(), **fixed) -> SweepSpec:
    """The sweep file (if any) with the command line's grid and options on top (the command line wins)."""
    if path is not None:
        data = load_yaml(path)
        data.setdefault("name", Path(path).stem)
        spec = build(SweepSpec, data, path)
        spec.source = path
    else:
        spec = SweepSpec()
    for key, value in (("methods", methods), ("protocols", protocols), ("seeds", seeds)):
        if value:   # the command line's grid replaces the file's, in every part
            setattr(spec, key, list(value))
            for part in spec.grids:
                part.pop(key, None)
    for text in sets:   # the command line's --set wins over the file's, in every part
        path_, value = parse_override(text)
        key = ".".join(path_)
        spec.set[key] = value
        for part in spec.grids:
            if isinstance(part.get("set"), dict):
                part["set"].pop(key, None)
    for key, value in fixed.items():
        if value is not None:
            setattr(spec, key, value)
    spec.name = spec.name or _grid_name(spec)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", spec.name or ""):
        raise UserError(f"sweep name {spec.name!r} must be one word of letters, digits, '.', '_' or '-'")
    return spec


def _grid_name(spec: SweepSpec) -> str:
    """A grid given on the command line: named by its content, so two such sweeps never share a log folder."""
    grid = yaml_value([spec.methods, spec.protocols, spec.seeds, spec.set, spec.grids])
    return "grid-" + hashlib.sha1(grid.encode()).hexdigest()[:8]


def yaml_value(value: Any) -> str:
    """A value as `--set` reads it back (YAML flow style)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[:-4].strip() if text.endswith("\n...") or text.endswith(" ...") else text


def _family(method: str) -> str:
    from cilbench.kit.registry import REGISTRY, load_plugins
    load_plugins()
    entry = REGISTRY.get(method)
    return entry.cls.family if entry is not None else method


def _known_method_heads() -> set[str]:
    from cilbench.kit.registry import REGISTRY, load_plugins
    load_plugins()
    return set(REGISTRY) | {entry.cls.family for entry in REGISTRY.values()}


def expand(spec: SweepSpec) -> list[Cell]:
    """Every cell of the grid, part by part, protocol-major."""
    where = spec.source or "the command line"
    parts = [build(GridPart, g, where, prefix=f"grids[{i}].") for i, g in enumerate(spec.grids)] or [GridPart()]
    cells = []
    for i, part in enumerate(parts):
        name = f"{spec.name}" + (f" grids[{i}]" if spec.grids else "")
        cells += _expand_part(name, part.methods or spec.methods, part.protocols or spec.protocols,
                              spec.seeds if part.seeds is None else part.seeds, {**spec.set, **part.set}, spec.tag)
    return cells


def _expand_part(name: str, methods: list[str], protocols: list[str], seeds: list[int], sets: dict,
                 tag: str | None) -> list[Cell]:
    """A `set` key headed by a method (or its family) applies only to that method's cells; any other key
    (card, runtime) applies to all. A list value is an axis."""
    for what, values in (("methods", methods), ("protocols", protocols), ("seeds", seeds)):
        if not values:
            raise UserError(f"sweep {name}: the grid is empty: no {what} given (in the file or --{what})")
    heads = _known_method_heads() | set(methods)
    families = {m: _family(m) for m in methods}
    for key, value in sets.items():
        head = key.split(".")[0]
        if head in heads and head not in set(methods) | set(families.values()):
            raise UserError(f"sweep {name}: set key '{key}' is an option of '{head}', which is not in the "
                            f"grid's methods ({', '.join(methods)}); remove it or add the method")
        if value == []:
            raise UserError(f"sweep {name}: set key '{key}' is an empty list, so the grid is empty; "
                            "give at least one value")
    cells = []
    for protocol in protocols:
        for method in methods:
            keys = [k for k in sets if k.split(".")[0] not in heads or k.split(".")[0] in (method, families[method])]
            fixed = [f"{k}={yaml_value(sets[k])}" for k in keys if not isinstance(sets[k], list)]
            axis_keys = [k for k in keys if isinstance(sets[k], list)]
            for values in itertools.product(*(sets[k] for k in axis_keys)):
                axes = tuple(zip(axis_keys, values))
                overrides = tuple(fixed + [f"{k}={yaml_value(v)}" for k, v in axes])
                for seed in seeds:
                    cells.append(Cell(method, protocol, int(seed), overrides, axes, tag))
    return cells


# --------------------------------------------------------------------------------------------------------
# Validation: every cell resolved as `cilbench run` would, before anything is submitted

def _request(spec: SweepSpec, cell: Cell, **extra):
    from cilbench.run.runner import RunRequest
    return RunRequest(method=cell.method, protocol=cell.protocol, seed=cell.seed, overrides=list(cell.overrides),
                      epochs=spec.epochs, device=spec.device, data_root=spec.data_root, out=spec.out,
                      tag=cell.tag, deterministic=spec.deterministic, **extra)


def _locate(spec: SweepSpec, cell: Cell) -> Cell:
    from cilbench.run.rundir import run_dir
    from cilbench.run.runner import resolve
    try:
        resolved = resolve(_request(spec, cell))
    except UserError as exc:
        raise UserError(f"sweep {spec.name}: cell {cell.label}: {exc}") from None
    return replace(cell, run_dir=run_dir(spec.out, resolved.protocol.name, resolved.run_name, cell.seed))


def _axis_tag(cell: Cell, keys: list[str]) -> str:
    parts = [re.sub(r"[^A-Za-z0-9._-]", "", f"{k.split('.')[-1]}{yaml_value(v)}") for k, v in cell.axes if k in keys]
    return "_".join(p for p in [cell.tag, *parts] if p)


def validate(spec: SweepSpec, cells: list[Cell]) -> list[Cell]:
    """Resolve every cell (raising on the first that does not validate, naming it) and give each its run
    directory. Cells that differ only in options absent from the run name get those values as a tag."""
    if spec.epochs is not None and spec.epochs < 1:
        raise UserError(f"sweep {spec.name}: epochs must be >= 1, got {spec.epochs}")
    if any(c.seed < 0 for c in cells):
        raise UserError(f"sweep {spec.name}: seeds must be >= 0, got {spec.seeds}")
    if spec.skip_invalid:    # a grid pairing, say, an offline-only method with an online card: run the rest
        located, spec.skipped = [], []
        for c in cells:
            try:
                located.append(_locate(spec, c))
            except UserError as exc:
                spec.skipped.append((c.label, str(exc).split(f"cell {c.label}: ", 1)[-1]))
        if not located:
            raise UserError(f"sweep {spec.name}: no cell validates (first: {spec.skipped[0][0]}: "
                            f"{spec.skipped[0][1]})" if spec.skipped else f"sweep {spec.name}: the grid is empty")
    else:
        located = [_locate(spec, c) for c in cells]
    groups: dict[Path, list[int]] = {}
    for i, cell in enumerate(located):
        groups.setdefault(cell.run_dir, []).append(i)
    for members in (m for m in groups.values() if len(m) > 1):
        differing = [k for k, _ in located[members[0]].axes
                     if len({yaml_value(dict(located[i].axes)[k]) for i in members}) > 1]
        for i in members:
            located[i] = _locate(spec, replace(located[i], tag=_axis_tag(located[i], differing) or None))
    seen: dict[Path, Cell] = {}
    for cell in located:
        if cell.run_dir in seen:
            raise UserError(f"sweep {spec.name}: cells {seen[cell.run_dir].label} and {cell.label} would both "
                            f"write {cell.run_dir}; remove the duplicate from the grid")
        seen[cell.run_dir] = cell
    return located


def prepare(spec: SweepSpec) -> list[Cell]:
    return validate(spec, expand(spec))

def include_filter(cells: list[Cell]) -> Callable[[Path], bool]:
    """For `build_report(include=...)`: a seed directory belongs to the sweep when a cell writes it."""
    wanted = {c.run_dir.resolve() for c in cells}
    return lambda seed_dir: Path(seed_dir).resolve() in wanted


def default_report_dir(spec: SweepSpec) -> Path:
    return Path(spec.out).parent / "report" / spec.name

def log_folder(spec: SweepSpec) -> Path:
    """submitit's folder for this sweep, beside the runs."""
    return Path(spec.out).resolve() / "sweep-logs" / spec.name
