"""The report's figures: matplotlib's Agg canvas directly (no pyplot state, no display), PNG of a fixed size.

Every function takes plain numbers (already aggregated over seeds by cilbench.report) and writes one PNG of
exactly SIZES[kind] pixels (figsize x DPI, no tight bounding box), so the HTML layout and the tests can rely on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
SIZES = {                      # kind -> (width, height) in pixels
    "steps": (900, 560),
    "per_task": (900, 560),
    "heatmap": (720, 620),
    "extractors": (1000, 460),
    "params": (900, 560),
}
_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#7f7f7f", "#bcbd22", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd"]


def colour(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


@dataclass
class Series:
    """One line: x values, mean y values and (optional) std over seeds."""
    label: str
    x: list[float]
    y: list[float]
    std: list[float] | None = None
    colour: str = "#1f77b4"
    n: int = 1


@dataclass
class Published:
    """A published curve or point set, drawn dashed / hollow."""
    label: str
    x: list[float]
    y: list[float]
    full: bool = True          # False: only some points are known; draw markers, no connecting line
    colour: str = "#555555"


@dataclass
class Point:
    label: str                 # legend entry (published points: one entry per paper and backbone)
    x: float
    y: float
    yerr: float | None = None
    colour: str = "#1f77b4"
    published: bool = False
    text: str = ""             # published points: the method's name, written beside the point


@dataclass
class Group:
    """Runs of one method at several numbers of extractors (x), with Avg and Last accuracy."""
    label: str
    x: list[float]
    avg: list[float]
    avg_std: list[float | None]
    last: list[float]
    last_std: list[float | None]
    colour: str = "#1f77b4"
    names: list[str] = field(default_factory=list)


def _figure(kind: str, ncols: int = 1):
    w, h = SIZES[kind]
    fig = Figure(figsize=(w / DPI, h / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _legend(ax, count: int) -> None:
    if count:
        ax.legend(fontsize=8 if count <= 8 else 6, ncols=1 if count <= 10 else 2, loc="best", framealpha=0.85)


def _band(ax, s: Series) -> None:
    if s.std and s.n > 1:
        lo = [m - d for m, d in zip(s.y, s.std)]
        hi = [m + d for m, d in zip(s.y, s.std)]
        ax.fill_between(s.x, lo, hi, color=s.colour, alpha=0.18, linewidth=0)


def plot_steps(path: Path, title: str, series: list[Series], published: list[Published], ylabel: str) -> Path:
    """Accuracy after each step, one line per method (mean, std band), published curves dashed."""
    fig, (ax,) = _figure("steps")
    for s in series:
        many = len(s.x) > 30
        ax.plot(s.x, s.y, marker=None if many else "o", markersize=4, color=s.colour, label=s.label)
        _band(ax, s)
    for p in published:
        if p.full:
            ax.plot(p.x, p.y, linestyle="--", marker=None if len(p.x) > 30 else "x", markersize=5,
                    color=p.colour, label=p.label)
        else:
            ax.plot(p.x, p.y, linestyle="none", marker="x", markersize=7, color=p.colour, label=p.label)
    ticks = sorted({x for s in series for x in s.x})
    if 1 < len(ticks) <= 26:
        ax.set_xticks(ticks)
    ax.set_xlabel("number of classes seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    _legend(ax, len(series) + len(published))
    return _save(fig, path)


def plot_per_task(path: Path, title: str, series: list[Series]) -> Path:
    """Accuracy on each task's classes after the last step (TSD Figure 5)."""
    fig, (ax,) = _figure("per_task")
    n_tasks = max((len(s.x) for s in series), default=0)
    width = 0.8 / max(1, len(series))
    bars = n_tasks <= 12 and len(series) <= 6
    for k, s in enumerate(series):
        if bars:
            xs = [x + (k - (len(series) - 1) / 2) * width for x in s.x]
            ax.bar(xs, s.y, width=width, color=s.colour, label=s.label,
                   yerr=s.std if s.std and s.n > 1 else None, capsize=2, error_kw={"elinewidth": 0.8})
        else:
            ax.plot(s.x, s.y, marker="o" if n_tasks <= 30 else None, markersize=3, color=s.colour, label=s.label)
            _band(ax, s)
    ax.set_xlabel("task (0 = first task)")
    ax.set_ylabel("top-1 accuracy after the last step (%)")
    if n_tasks <= 26:
        ax.set_xticks(range(n_tasks))
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=11)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, len(series))
    return _save(fig, path)


def plot_heatmap(path: Path, title: str, matrix: list[list[float]]) -> Path:
    """a[i][j] (rows: after task i, columns: task j), upper triangle blank."""
    import numpy as np

    fig, (ax,) = _figure("heatmap")
    T = len(matrix)
    grid = np.full((T, T), np.nan)
    for i, row in enumerate(matrix):
        grid[i, : len(row)] = row
    image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="accuracy (%)", shrink=0.9)
    if T <= 12:
        for i in range(T):
            for j in range(len(matrix[i])):
                v = grid[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 60 else "black")
    ticks = list(range(T)) if T <= 26 else list(range(0, T, max(1, T // 10)))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after learning task i")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def plot_extractors(path: Path, title: str, groups: list[Group]) -> Path:
    """Average and last accuracy against the number of extractors at the last step."""
    fig, axes = _figure("extractors", ncols=2)
    for ax, key, label in ((axes[0], "avg", "average incremental accuracy (%)"),
                           (axes[1], "last", "last accuracy (%)")):
        for g in groups:
            ys = g.avg if key == "avg" else g.last
            errs = g.avg_std if key == "avg" else g.last_std
            yerr = [e if e is not None else 0.0 for e in errs]
            ax.errorbar(g.x, ys, yerr=yerr if any(yerr) else None, marker="o", capsize=3, color=g.colour,
                        label=g.label, linestyle="-" if len(g.x) > 1 else "none")
        ax.set_xlabel("#extractors at inference (last step)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        xs = sorted({x for g in groups for x in g.x})
        if xs and all(float(x).is_integer() for x in xs) and len(xs) <= 20:
            ax.set_xticks(xs)
    axes[0].set_title(title, fontsize=11, loc="left")
    _legend(axes[1], len(groups))
    return _save(fig, path)


def plot_params(path: Path, title: str, points: list[Point], ylabel: str) -> Path:
    """Accuracy against parameters at inference (average over steps, millions); published points hollow."""
    fig, (ax,) = _figure("params")
    xs = [p.x for p in points if p.x and p.x > 0]
    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    seen: set[str] = set()
    shapes: dict[str, str] = {}
    for p in points:
        label = None if p.label in seen else p.label
        seen.add(p.label)
        if p.published:
            marker = shapes.setdefault(p.label, "sD^vPX<>"[len(shapes) % 8])
            ax.scatter([p.x], [p.y], s=55, facecolors="none", edgecolors=p.colour, marker=marker, label=label)
            if p.text:
                ax.annotate(p.text, (p.x, p.y), xytext=(5, 3), textcoords="offset points", fontsize=7,
                            color="#444444")
        else:
            ax.errorbar([p.x], [p.y], yerr=[p.yerr] if p.yerr else None, marker="o", markersize=7, capsize=3,
                        color=p.colour, label=label, linestyle="none")
    ax.set_xlabel("#params at inference, average over steps (M)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3, which="both")
    _legend(ax, len(seen))
    return _save(fig, path)
