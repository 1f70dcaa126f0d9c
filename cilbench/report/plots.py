"""The report's figures: matplotlib's Agg canvas directly (no pyplot state, no display).

Every function takes plain numbers (already aggregated over seeds by cilbench.report) and writes one PNG of
exactly pixel_size(kind) pixels (SIZES[kind] CSS pixels at SCALE times the density, so legends stay sharp
where the page shows the figure at its CSS size) and the same figure as vector PDFs beside it, sized for a
paper: `<name>.pdf` 6.9 in wide (double column) and `<name>_1col.pdf` 3.3 in wide (single column; not for a
run's two-panel training curves), without the title (the page and the paper's caption say it) and with
TrueType (Type 42) fonts, which IEEE and ACM checkers accept where they flag Type 3. Error bars and bands are
clipped to [0, 100].
Every text given is drawn literally: a '$' in a run name never starts matplotlib's math mode.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cilbench.safeio import atomic_write

DPI = 100                      # CSS pixels per inch of figure size
SCALE = 2                      # PNG pixels per CSS pixel
SIZES = {                      # kind -> (width, height) in CSS pixels, the size the page shows
    "steps": (1100, 480),
    "per_task": (900, 460),
    "heatmap": (900, 340),     # per row of small multiples
    "extractors": (1000, 440),
    "params": (900, 520),
    "training": (900, 320),
}
# distinguishable colours (Okabe-Ito first, then tab10 and darker variants)
_PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8c564b",
            "#7f7f7f", "#bcbd22", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#17becf"]
FAMILY_MARKERS = {"baseline": "s", "der": "o", "tsd": "^", "seed": "D", "pcr": "v", "exacfs": "P", "other": "X"}


def colour(index: int) -> str:
    return _PALETTE[index % len(_PALETTE)]


def marker(family: str) -> str:
    return FAMILY_MARKERS.get(family, "X")


def pixel_size(kind: str, rows: int = 1) -> tuple[int, int]:
    w, h = SIZES[kind]
    return w * SCALE, h * rows * SCALE


def literal(text: str) -> str:
    """Text for matplotlib drawn as is: escape the '$' that would open math mode."""
    return str(text).replace("$", r"\$")


@dataclass
class Series:
    """One line: x values, mean y values and (optional) std over seeds."""
    label: str
    x: list[float]
    y: list[float]
    std: list[float] | None = None
    colour: str = "#0072B2"
    n: int = 1
    marker: str = "o"
    lower_bound: bool = False  # left out of the zoomed panel's scale


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
    colour: str = "#0072B2"
    published: bool = False
    text: str = ""             # published points: the method's name, written beside the point
    marker: str = "o"


@dataclass
class Group:
    """Runs of one method at several numbers of extractors (x), with Avg and Last accuracy."""
    label: str
    x: list[float]
    avg: list[float]
    avg_std: list[float | None]
    last: list[float]
    last_std: list[float | None]
    colour: str = "#0072B2"
    names: list[str] = field(default_factory=list)
    marker: str = "o"


def ignore_interrupts() -> None:
    """A figure worker's start: Ctrl-C is for the report's main process, which then lets the workers finish."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _figure(kind: str, nrows: int = 1, ncols: int = 1, rows_scale: int = 1):
    w, h = SIZES[kind]
    fig = Figure(figsize=(w / DPI, h * rows_scale / DPI), dpi=DPI * SCALE, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(nrows * ncols)]
    return fig, axes


PDF_RC = {"pdf.fonttype": 42, "ps.fonttype": 42}      # TrueType, not Type 3
PDF_WIDTHS = {"": 6.9, "_1col": 3.3}                  # inches: double- and single-column figures
PDF_MIN_HEIGHT = 2.4                                  # inches: a single-column figure keeps room for its axes


def _title(fig: Figure, artist):
    """Mark a figure's main title: the PNG (shown under its caption on the page) keeps it, the PDFs do not."""
    fig._cilbench_titles = getattr(fig, "_cilbench_titles", []) + [artist]
    return artist


TRAINING_PDF_WIDTHS = {"": PDF_WIDTHS[""]}         # a two-panel diagnostic: no single-column version


def pdf_paths(path: Path, widths: dict[str, float] = PDF_WIDTHS) -> list[Path]:
    """The PDFs written beside a PNG: double column first."""
    return [path.with_name(path.stem + suffix + ".pdf") for suffix in widths]


def _save(fig: Figure, path: Path, widths: dict[str, float] = PDF_WIDTHS) -> Path:
    """PNG at the fixed pixel size, and the same figure as PDFs (vector) at the given column widths, untitled."""
    path.parent.mkdir(parents=True, exist_ok=True)   # the report made its folders link-free already
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=DPI * SCALE))
    for artist in getattr(fig, "_cilbench_titles", []):
        artist.set_visible(False)
    w, h = fig.get_size_inches()
    for target, width in zip(pdf_paths(path, widths), widths.values()):
        fig.set_size_inches(width, max(width * h / w, PDF_MIN_HEIGHT))
        with matplotlib.rc_context(PDF_RC), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)     # constrained layout on a narrow page may give up
            atomic_write(target, lambda fh: fig.savefig(fh, format="pdf"))
    return path


def clip_err(y: list[float], err: list[float] | None) -> list[list[float]] | None:
    """Asymmetric error bars that stay inside [0, 100]: accuracy never leaves it, nor should its bar."""
    if not err:
        return None
    lower = [max(0.0, min(e, v)) for v, e in zip(y, err)]
    upper = [max(0.0, min(e, 100.0 - v)) for v, e in zip(y, err)]
    return [lower, upper]


def _legend(ax, count: int, **kwargs) -> None:
    if count:
        ax.legend(fontsize=8 if count <= 8 else 7, ncols=1 if count <= 10 else 2, framealpha=0.85,
                  **({"loc": "best"} | kwargs))


def _band(ax, s: Series) -> None:
    if s.std and s.n > 1:
        lo = [max(0.0, m - d) for m, d in zip(s.y, s.std)]
        hi = [min(100.0, m + d) for m, d in zip(s.y, s.std)]
        ax.fill_between(s.x, lo, hi, color=s.colour, alpha=0.15, linewidth=0)


def _zoom_limits(series: list[Series], published: list[Published]) -> tuple[float, float] | None:
    """The band where the methods are: every series but the lower bound (with its std), plus a margin."""
    lows, highs = [], []
    for s in series:
        if s.lower_bound:
            continue
        std = s.std if s.std and s.n > 1 else [0.0] * len(s.y)
        lows += [max(0.0, y - d) for y, d in zip(s.y, std)]
        highs += [min(100.0, y + d) for y, d in zip(s.y, std)]
    if not lows:
        return None
    lo, hi = min(lows), max(highs)
    margin = max(1.0, 0.08 * (hi - lo))
    return max(lo - margin, -1.0), min(hi + margin, 101.0)


def plot_steps(path: Path, title: str, series: list[Series], published: list[Published], ylabel: str) -> Path:
    """Accuracy after each step: all methods (left, full scale) and the band where the methods are (right,
    zoomed, the lower bound no longer decides the scale); mean line with a std band, published curves dashed."""
    fig, axes = _figure("steps", ncols=2)
    ticks = sorted({x for s in series for x in s.x})
    for ax in axes:
        for s in series:
            many = len(s.x) > 30
            ax.plot(s.x, s.y, marker=None if many else s.marker, markersize=5, color=s.colour,
                    label=literal(s.label), linewidth=1.6)
            _band(ax, s)
        for p in published:
            ax.plot(p.x, p.y, linestyle="--" if p.full else "none", marker=None if len(p.x) > 30 else "x",
                    markersize=6, color=p.colour, label=literal(p.label))
        if 1 < len(ticks) <= 26:
            ax.set_xticks(ticks if len(ticks) <= 13 else ticks[::2])
        ax.set_xlabel("number of classes seen")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(literal(ylabel))
    axes[0].set_title("all methods", fontsize=10)
    limits = _zoom_limits(series, published)
    if limits:
        axes[1].set_ylim(*limits)
    axes[1].set_title("zoom: without the lower bound's range", fontsize=10)
    _title(fig, fig.suptitle(literal(title), fontsize=12))
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def plot_per_task(path: Path, title: str, series: list[Series]) -> Path:
    """Accuracy on each task's classes after the last step (TSD Figure 5): grouped bars (few tasks) or
    offset markers (many), with the axis opened past 0 and 100 so nothing is clipped."""
    fig, (ax,) = _figure("per_task")
    n_tasks = max((len(s.x) for s in series), default=0)
    k_series = max(1, len(series))
    width = 0.8 / k_series
    bars = n_tasks <= 12
    tops, bottoms = [100.0], [0.0]
    for k, s in enumerate(series):
        offset = (k - (k_series - 1) / 2) * width
        xs = [x + offset for x in s.x]
        err = clip_err(s.y, s.std) if s.std and s.n > 1 else None
        if bars:
            ax.bar(xs, s.y, width=width * 0.95, color=s.colour, label=literal(s.label), yerr=err, capsize=2,
                   error_kw={"elinewidth": 0.8})
            ax.plot(xs, s.y, linestyle="none", marker="_", markersize=max(4.0, 160 * width / max(n_tasks, 1)),
                    markeredgewidth=2.5, color=s.colour)          # a bar at 0 stays visible
        else:
            ax.errorbar(xs, s.y, yerr=err, marker=s.marker, markersize=4, linestyle="none", color=s.colour,
                        label=literal(s.label), elinewidth=0.8)
        tops += [y + (err[1][i] if err else 0) for i, y in enumerate(s.y)]
        bottoms += [y - (err[0][i] if err else 0) for i, y in enumerate(s.y)]
    ax.set_xlabel("task")
    ax.set_ylabel("top-1 after the last task (%)")
    if n_tasks <= 26:       # tasks are numbered from 1
        ax.set_xticks(range(n_tasks), [str(k + 1) for k in range(n_tasks)])
    ax.set_ylim(min(bottoms) - 4, max(tops) + 4)
    ax.axhline(0, color="#888888", linewidth=0.6)
    ax.axhline(100, color="#888888", linewidth=0.6, linestyle=":")
    _title(fig, ax.set_title(literal(title), fontsize=11))
    ax.grid(True, axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, framealpha=0.85)
    return _save(fig, path)


def heatmap_scale(matrices: list[list[list[float]]]) -> tuple[float, float]:
    """A shared colour range tight enough to tell 90 from 99: from the 10th percentile of all entries
    (rounded down to 5) to the largest; lower entries saturate (the colour bar says so)."""
    values = sorted(v for m in matrices for row in m for v in row)
    if not values:
        return 0.0, 100.0
    lo = values[int(0.1 * (len(values) - 1))]
    hi = values[-1]
    vmin = 5 * math.floor(lo / 5)
    vmax = max(vmin + 5.0, 100.0 if hi > 95 else 5 * math.ceil(hi / 5))
    return float(vmin), float(vmax)


def plot_heatmaps(path: Path, title: str, panels: list[tuple[str, list[list[float]]]],
                  scale_from: list[list[list[float]]] | None = None) -> Path:
    """a[i][j] of several methods as small multiples with one shared colour scale (upper triangle blank)."""
    import numpy as np

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure("heatmap", nrows=nrows, ncols=ncols, rows_scale=nrows)
    vmin, vmax = heatmap_scale(scale_from if scale_from else [m for _, m in panels])
    image = None
    for ax, (name, matrix) in zip(axes, panels):
        T = len(matrix)
        grid = np.full((T, T), np.nan)
        for i, row in enumerate(matrix):
            grid[i, : len(row)] = row
        image = ax.imshow(grid, vmin=vmin, vmax=vmax, cmap="viridis", aspect="equal", interpolation="nearest")
        if T <= 10:
            for i in range(T):
                for j in range(len(matrix[i])):
                    v = grid[i, j]
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7 if T > 6 else 8,
                            color="white" if v < (vmin + vmax) / 2 else "black")
        ticks = list(range(T)) if T <= 12 else list(range(0, T, max(1, T // 6)))
        ax.set_xticks(ticks, [str(k + 1) for k in ticks])      # tasks are numbered from 1
        ax.set_yticks(ticks, [str(k + 1) for k in ticks])
        ax.tick_params(labelsize=7)
        ax.set_title(literal(name), fontsize=9)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    for ax in axes[::ncols]:
        ax.set_ylabel("after task i", fontsize=8)
    for ax in axes[-ncols:]:
        ax.set_xlabel("evaluated on task j", fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.9, extend="min" if vmin > 0 else "neither")
    _title(fig, fig.suptitle(literal(title), fontsize=11))
    return _save(fig, path)


def _dodge(groups: list[Group]) -> list[float]:
    """x offsets so that groups at the same number of extractors do not hide each other."""
    k = len(groups)
    return [(i - (k - 1) / 2) * min(0.12, 0.5 / max(k, 1)) for i in range(k)]


def plot_extractors(path: Path, title: str, groups: list[Group]) -> Path:
    """Average and last accuracy against the number of extractors at the last step; title and legend over
    the whole figure, groups at the same x offset sideways and each point labelled with its run."""
    fig, axes = _figure("extractors", ncols=2)
    offsets = _dodge(groups)
    for ax, key, label in ((axes[0], "avg", "average incremental accuracy (%)"),
                           (axes[1], "last", "last accuracy (%)")):
        for g, dx in zip(groups, offsets):
            ys = g.avg if key == "avg" else g.last
            errs = g.avg_std if key == "avg" else g.last_std
            yerr = [e if e is not None else 0.0 for e in errs]
            xs = [x + dx for x in g.x]
            ax.errorbar(xs, ys, yerr=clip_err(ys, yerr) if any(yerr) else None, marker=g.marker, capsize=3,
                        color=g.colour, label=literal(g.label), linestyle="-" if len(g.x) > 1 else "none")
        ax.set_xlabel("#extractors at inference (last step)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        xs = sorted({x for g in groups for x in g.x})
        if xs and all(float(x).is_integer() for x in xs) and len(xs) <= 20:
            ax.set_xticks(xs)
    _title(fig, fig.suptitle(literal(title), fontsize=12))
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    return _save(fig, path)


def plot_params(path: Path, title: str, points: list[Point], ylabel: str,
                xlabel: str = "#params at inference, average over steps (M)") -> Path:
    """Accuracy against parameters at inference (average over steps, millions); published points hollow."""
    fig, (ax,) = _figure("params")
    xs = [p.x for p in points if p.x and p.x > 0]
    if xs and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    seen: set[str] = set()
    shapes: dict[str, str] = {}
    for p in points:
        label = None if p.label in seen else literal(p.label)
        seen.add(p.label)
        if p.published:
            shape = shapes.setdefault(p.label, "sD^vPX<>"[len(shapes) % 8])
            ax.scatter([p.x], [p.y], s=55, facecolors="none", edgecolors=p.colour, marker=shape, label=label)
            if p.text:
                ax.annotate(literal(p.text), (p.x, p.y), xytext=(5, 3), textcoords="offset points", fontsize=7,
                            color="#444444")
        else:
            ax.errorbar([p.x], [p.y], yerr=clip_err([p.y], [p.yerr]) if p.yerr else None, marker=p.marker, markersize=7,
                        capsize=3, color=p.colour, label=label, linestyle="none")
    ax.set_xlabel(literal(xlabel))
    ax.set_ylabel(literal(ylabel))
    _title(fig, ax.set_title(literal(title), fontsize=11))
    ax.grid(True, alpha=0.3, which="both")
    _legend(ax, len(seen))
    return _save(fig, path)


def plot_training(path: Path, title: str, events: list[dict]) -> Path:
    """Loss (log scale) and learning rate per epoch, epochs of all tasks and phases one after the other,
    coloured by task."""
    fig, axes = _figure("training", ncols=2)
    tasks = sorted({int(e["task"]) for e in events})
    segments: list[tuple[int, list[tuple[int, float, float]]]] = []    # one line per (task, phase) run
    previous = None
    for x, e in enumerate(events, start=1):
        key = (int(e["task"]), e.get("phase"))
        if key != previous:
            segments.append((key[0], []))
        previous = key
        segments[-1][1].append((x, float(e["loss"]), float(e["lr"])))
    phases = []
    previous = None
    for e in events:
        key = (int(e["task"]), e.get("phase"))
        if key != previous:
            phases.append(key)
        previous = key
    by_task: dict[int, list] = {}
    for task, pts in segments:
        c = colour(tasks.index(task))
        first = task not in by_task
        by_task.setdefault(task, []).extend(pts)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=c,
                     label=f"task {task + 1}" if first else None)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker=".", color=c)
    if all(p[1] > 0 for pts in by_task.values() for p in pts):
        axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (epoch mean)")
    axes[1].set_ylabel("learning rate")
    starts = [pts[0][0] for _, pts in segments]
    for ax in axes:        # each phase starts at a dotted line, named at the top when there are few enough
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        for x0, (task, phase) in zip(starts, phases):
            if x0 > 1:
                ax.axvline(x0 - 0.5, color="#999999", linewidth=0.6, linestyle=":")
            if len(starts) <= 16:
                ax.annotate(literal(f"{task + 1}: {phase}" if phase else f"task {task + 1}"), (x0 - 0.4, 1.0),
                            xycoords=("data", "axes fraction"), xytext=(1, -2), textcoords="offset points",
                            rotation=90, va="top", ha="left", fontsize=6, color="#555555")
    fig.supxlabel("epoch (tasks and phases in order; one line per phase)", fontsize=9)
    _title(fig, fig.suptitle(literal(title), fontsize=11))
    _legend(axes[0], len(tasks) if len(tasks) <= 12 else 0)
    return _save(fig, path, TRAINING_PDF_WIDTHS)
