"""The plots of one protocol, and one run's training curves, from run groups (drawing is in cilbench.report.plots)."""
from __future__ import annotations

from pathlib import Path

from cilbench.report.aggregate import RunGroup, family
from cilbench.report.reference import RefCurve, RefRow

PUBLISHED_GREYS = ["#444444", "#999999", "#8c564b", "#bcbd22", "#17becf", "#7f7f7f"]


def protocol_plots(protocol: str, slug: str, groups: list[RunGroup], refs: list[RefRow], curves: list[RefCurve],
                   plot_dir: Path, top5: bool) -> list[tuple[str, Path]]:
    """(caption, png path) of every plot of one protocol; a PDF is written beside each PNG."""
    from cilbench.report import plots

    done = [g for g in groups if g.n]
    if not done:
        return []
    colours = {g.run_name: plots.colour(i) for i, g in enumerate(done)}
    markers = {g.run_name: plots.marker(family(g.method)) for g in done}
    out: list[tuple[str, Path]] = []
    step_classes = {i: s["classes_seen"] for i, s in enumerate(done[0].complete[0].steps)}
    for metric, label in (("top1", "top-1"),) + ((("top5", "top-5"),) if top5 else ()):
        series = []
        for g in done:
            xs, ys, std = g.curve(metric)
            series.append(plots.Series(g.name, xs, ys, std, colours[g.run_name], g.n,
                                       markers[g.run_name], g.bound == "lower"))
        published = []
        for k, c in enumerate(x for x in curves if x.protocol == protocol and x.metric == metric):
            if not all(s in step_classes for s in c.steps):
                continue
            published.append(plots.Published(f"{c.method} published ({c.backbone})",
                                             [step_classes[s] for s in c.steps], c.values, c.full,
                                             PUBLISHED_GREYS[k % len(PUBLISHED_GREYS)]))
        path = plots.plot_steps(plot_dir / f"{slug}_steps_{metric}.png",
                                f"{protocol}: {label} accuracy after each step", series, published,
                                f"{label} accuracy over seen classes (%)")
        out.append((f"{label} accuracy after each step (left: all methods; right: zoomed on the methods)", path))
    series = []
    for g in done:
        ys, std = g.last_row()
        if ys:
            series.append(plots.Series(g.name, list(range(len(ys))), ys, std, colours[g.run_name], g.n,
                                       markers[g.run_name]))
    if series:
        out.append(("Per-task accuracy after the last step",
                    plots.plot_per_task(plot_dir / f"{slug}_per_task.png",
                                        f"{protocol}: accuracy on each task after the last step", series)))
    panels = [(g.name, g.mean_matrix()) for g in done]
    panels = [(name, m) for name, m in panels if m]
    if panels:
        scale = [g.mean_matrix() for g in done if g.bound != "lower" and g.mean_matrix()] or [m for _, m in panels]
        out.append(("Accuracy matrices a[i][j] (row: after task i; column: task j), one shared colour scale",
                    plots.plot_heatmaps(plot_dir / f"{slug}_heatmaps.png",
                                        f"{protocol}: accuracy matrix a[i][j], mean over seeds", panels, scale)))
    ext = _extractor_groups(done, colours, markers)
    if any(len(set(g.x)) > 1 for g in ext):      # some method was run at several N
        out.append(("Accuracy against the number of extractors",
                    plots.plot_extractors(plot_dir / f"{slug}_extractors.png",
                                          f"{protocol}: accuracy vs #extractors", ext)))
    points, backbone = _param_points(protocol, done, refs, colours, markers)
    if points and params_differ(points, backbone):
        what = "backbone" if backbone else "total (ours; the published points count the backbone)"
        out.append((f"Average accuracy against parameters at inference: {what}",
                    plots.plot_params(plot_dir / f"{slug}_params.png",
                                      f"{protocol}: average accuracy vs #params", points,
                                      "average incremental accuracy (%)",
                                      f"#params at inference, {what.split(' (')[0]}, average over steps (M)")))
    return out


PARAMS_SPREAD = 1.15    # totals (heads included) closer than this ratio: one shared backbone, no plot


def params_differ(points: list, backbone: bool) -> bool:
    """Whether accuracy against #params says anything. Backbone counts: they must differ at all (every method
    on one shared backbone gives one column of markers). Totals only: by more than a head's worth."""
    ours = [p.x for p in points if not p.published and p.x and p.x > 0]
    if len(ours) < 2:
        return False
    return max(ours) / min(ours) > (1.001 if backbone else PARAMS_SPREAD)


def _extractor_groups(done: list[RunGroup], colours: dict, markers: dict) -> list:
    from cilbench.report import plots
    by_base: dict[str, list[RunGroup]] = {}
    for g in done:
        by_base.setdefault(g.base_name, []).append(g)
    groups = []
    for base, gs in by_base.items():
        rows = []
        for g in gs:
            x = g.footprint()["ext_last"][0]
            a, a_std, _ = g.metric("avg")
            la, la_std, _ = g.metric("last")
            if x is not None and a is not None and la is not None:
                rows.append((x, a, a_std, la, la_std, g.run_name))
        rows.sort()
        if rows:
            label = gs[0].name.split(" (N=")[0]
            groups.append(plots.Group(label, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                                      [r[3] for r in rows], [r[4] for r in rows], colours[gs[0].run_name],
                                      [r[5] for r in rows], markers[gs[0].run_name]))
    return groups


def _param_points(protocol: str, done: list[RunGroup], refs: list[RefRow], colours: dict,
                  markers: dict) -> tuple[list, bool]:
    """Our runs at their backbone #params when every run records it (as the papers count), else the total."""
    from cilbench.report import plots
    points = []
    key = "params_bb_avg" if all(g.footprint()["params_bb_avg"][0] is not None for g in done) else "params_avg"
    for g in done:
        x = g.footprint()[key][0]
        y, std, _ = g.metric("avg")
        if x is not None and y is not None:
            points.append(plots.Point(g.name, x, y, std, colours[g.run_name], marker=markers[g.run_name]))
    papers = sorted({r.paper for r in refs})
    for ref in refs:
        if ref.protocol != protocol:
            continue
        p, a = ref.values.get("params_avg_m"), ref.values.get("avg")
        if p is None or a is None or p.number is None or a.number is None:
            continue
        points.append(plots.Point(f"published: {ref.paper.split(' (')[0]}, {ref.backbone}", p.number, a.number,
                                  None, PUBLISHED_GREYS[papers.index(ref.paper) % len(PUBLISHED_GREYS)],
                                  published=True, text=ref.method))
    return points, key == "params_bb_avg"
