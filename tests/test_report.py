"""`cilbench report` and the run summary, from run directories written directly (no training)."""
from __future__ import annotations

import csv
import json
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.config import to_dict
from cilbench.data.protocol import PROTOCOL_DIR, known_protocols, load_protocol
from cilbench.errors import UserError
from cilbench.report import (
    REFERENCE_DIR,
    build_report,
    group_runs,
    load_reference,
    plots,
    resolve_metrics,
    scan_runs,
    strip_n_tag,
)
from cilbench.report.summary import print_run_summary
from cilbench.run.rundir import RunStore, run_dir

# --------------------------------------------------------------------------------------------------------
# Building run directories with known numbers


def make_run(root: Path, protocol: str, run_name: str, seed: int, *, status: str = "complete",
             avg: float = 70.0, last: float = 60.0, bwt: float = -5.0, top1: list[float] | None = None,
             extractors: list[int] | None = None, params: list[int] | None = None, tasks_done: int | None = None,
             memory_size: int = 20, max_epochs: int | None = None, write_metrics: bool | None = None,
             params_backbone: list[int] | None = None, protocol_changes: dict | None = None,
             task_mean: tuple[float, float] | None = None, protocol_dir: str | None = None) -> Path:
    """A run directory as cilbench.run.runner writes it, with the numbers given (metrics.json is not recomputed
    from the steps on purpose: the report must take the summary numbers as written). `params_backbone` adds
    that steps.csv column (runs record it from issue 11 on); `protocol_changes` edits the resolved card (e.g.
    class_order / class_orders); `protocol_dir` files the run under another protocol folder name."""
    p = load_protocol(protocol)
    T = p.tasks
    top1 = top1 or [round(90 - 30 * t / max(1, T - 1), 4) for t in range(T)]
    extractors = extractors or [1] * T
    params = params or [464_154] * T
    done = T if tasks_done is None else tasks_done
    sizes = p.task_sizes
    store = RunStore(run_dir(root, protocol_dir or protocol, run_name, seed))
    store.create(force=True)
    method = run_name.split("+")[0]
    store.write_config({"method": method, "run_name": run_name, "seed": seed,
                        "protocol": {**to_dict(p), **(protocol_changes or {})},
                        "method_config": {}, "runtime": {"device": "cpu", "max_epochs": max_epochs}})
    steps, matrix, matrix5 = [], [], []
    for t in range(done):
        steps.append({"step": t, "classes_seen": sum(sizes[: t + 1]), "top1": top1[t], "top5": min(100, top1[t] + 15),
                      "extractors": extractors[t], "params": params[t], "memory_size": memory_size,
                      "memory_bytes": 0, "train_seconds": 1.0, "eval_seconds": 0.1})
        matrix.append([max(0.0, top1[t] - 5 * (t - j)) for j in range(t + 1)])
        matrix5.append([min(100.0, v + 15) for v in matrix[-1]])
    store.write_steps(steps)
    if params_backbone:
        with open(store.path / "steps.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=[*steps[0], "params_backbone"])
            writer.writeheader()
            writer.writerows({**row, "params_backbone": params_backbone[t]} for t, row in enumerate(steps))
    store.write_matrix("acc_matrix.csv", matrix)
    store.write_matrix("acc_matrix_top5.csv", matrix5)
    store.write_manifest({"status": status, "method": method, "run_name": run_name, "protocol": protocol,
                          "seed": seed, "tasks_done": done, "tasks_total": T,
                          "error": None if status == "complete" else f"test {status}"})
    if write_metrics if write_metrics is not None else status == "complete":
        store.write_metrics({"steps": done, "avg_acc": avg, "last_acc": last, "bwt": bwt, "forgetting": -bwt,
                             "avg_acc_top5": avg + 15, "last_acc_top5": last + 15, "bwt_top5": bwt / 2,
                             "forgetting_top5": -bwt / 2,
                             "avg_acc_task_mean": task_mean[0] if task_mean else avg,
                             "last_acc_task_mean": task_mean[1] if task_mean else last,
                             "params_avg": sum(params[:done]) / done, "params_last": params[done - 1],
                             "extractors_last": extractors[done - 1]})
    return store.path


def make_runs(root: Path) -> Path:
    """der on cifar100_b50s25 (3 tasks, resnet32): 3 complete seeds, one failed, one still running;
    tsd_grc at N=2 and N=3 on the same protocol; replay on digits_b0s2."""
    ext, par = [1, 2, 3], [460_000, 920_000, 1_380_000]
    for seed, (a, la, b) in enumerate([(70.0, 60.0, -5.0), (72.0, 61.0, -6.0), (74.0, 62.0, -7.0)]):
        make_run(root, "cifar100_b50s25", "der", seed, avg=a, last=la, bwt=b, extractors=ext, params=par)
    make_run(root, "cifar100_b50s25", "der", 3, status="failed", tasks_done=1, avg=0.0)
    make_run(root, "cifar100_b50s25", "der", 4, status="running", tasks_done=2, avg=0.0)
    make_run(root, "cifar100_b50s25", "tsd_grc+N2", 0, avg=71.0, last=63.0, extractors=[1, 2, 2],
             params=[460_000, 920_000, 920_000])
    make_run(root, "cifar100_b50s25", "tsd_grc+N3", 0, avg=73.0, last=64.0, extractors=ext, params=par)
    make_run(root, "digits_b0s2", "replay", 0, avg=95.0, last=88.0, memory_size=200)
    make_run(root, "digits_b0s2", "replay", 1, avg=97.0, last=90.0, memory_size=200)
    return root


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    return make_runs(tmp_path / "runs")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """The report of make_runs() with default options, built once for the tests that only read it."""
    base = tmp_path_factory.mktemp("report")
    build_report(make_runs(base / "runs"), base / "out")
    return base / "out"


def read_csv(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# --------------------------------------------------------------------------------------------------------
# Tables


def test_protocol_table_values_std_seeds_and_excluded_runs(built):
    rows = read_csv(built / "tables" / "cifar100_b50s25.csv")
    der = next(r for r in rows if r["kind"] == "ours" and r["method"] == "der")
    assert der["seeds"] == "3"                                   # failed and running seeds not counted
    assert float(der["avg"]) == pytest.approx(72.0) and float(der["avg_std"]) == pytest.approx(2.0)
    assert float(der["last"]) == pytest.approx(61.0) and float(der["last_std"]) == pytest.approx(1.0)
    assert float(der["bwt"]) == pytest.approx(-6.0) and float(der["bwt_std"]) == pytest.approx(1.0)
    assert float(der["ext_last"]) == 3 and float(der["ext_avg"]) == pytest.approx(2.0)
    assert float(der["params_last"]) == pytest.approx(1.38) and float(der["params_avg"]) == pytest.approx(0.92)
    single = next(r for r in rows if r["kind"] == "ours" and r["method"] == "tsd_grc+N2")
    assert single["seeds"] == "1" and single["avg_std"] == ""    # no std from one seed
    incomplete = {r["method"]: r["source"] for r in rows if r["kind"] == "incomplete"}
    assert set(incomplete) == {"der seed3", "der seed4"}
    assert "failed after 1/3 tasks" in incomplete["der seed3"]
    assert "running after 2/3 tasks" in incomplete["der seed4"]
    md = (built / "tables" / "cifar100_b50s25.md").read_text()
    assert "| DER w/o P | resnet32 | 3 | 3 | 2.00 | 1.38 | 0.92 | – | <ins>72.00 ± 2.00</ins> | 61.00 ± 1.00 |" in md
    assert "~~DER w/o P seed3~~" in md


def test_complete_without_metrics_or_broken_manifest_is_not_averaged(runs, tmp_path):
    make_run(runs, "digits_b0s2", "replay", 2, avg=10.0, write_metrics=False)     # says complete, no metrics
    bad = run_dir(runs, "digits_b0s2", "replay", 3)
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text("{not json")
    build_report(runs, tmp_path / "out", plots=False)
    rows = read_csv(tmp_path / "out" / "tables" / "digits_b0s2.csv")
    replay = next(r for r in rows if r["kind"] == "ours")
    assert replay["seeds"] == "2" and float(replay["avg"]) == pytest.approx(96.0)
    statuses = {r["seed"]: r["status"] for r in read_csv(tmp_path / "out" / "tables" / "runs.csv")
                if r["protocol"] == "digits_b0s2"}
    assert statuses == {"0": "complete", "1": "complete", "2": "incomplete", "3": "unreadable"}


def test_summary_table_has_protocols_as_column_groups(built):
    rows = read_csv(built / "tables" / "summary.csv")
    header = list(rows[0].keys())
    assert "cifar100_b50s25:avg" in header and "digits_b0s2:last_std" in header
    replay = next(r for r in rows if r["method"] == "replay")
    assert float(replay["digits_b0s2:avg"]) == pytest.approx(96.0) and replay["cifar100_b50s25:avg"] == ""
    tex = (built / "tables" / "summary.tex").read_text()
    assert "\\multicolumn{2}{c}{cifar100\\_b50s25}" in tex
    # the published DER rows whose protocol, backbone and memory match a run of ours are in the summary
    assert any(r["kind"] == "published" and r["method"].startswith("DER w/o P") for r in rows)


def test_imagenet_protocol_gets_top5_columns(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "imagenet100_b0s10", "der", 0, avg=70.0, last=60.0, memory_size=2000)
    build_report(root, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "tables" / "imagenet100_b0s10.csv")
    der = next(r for r in rows if r["kind"] == "ours")
    assert float(der["avg_top5"]) == pytest.approx(85.0) and float(der["last_top5"]) == pytest.approx(75.0)
    # DER Table 3 (resnet18_imagenet, 2000 exemplars) matches: `der` is DER w/o P (top-5 Avg 93.23)
    delta = next(r for r in rows if r["kind"] == "delta" and r["method"] == "Δ der − DER w/o P")
    assert float(delta["avg_top5"]) == pytest.approx(85.0 - 93.23)
    assert float(delta["last"]) == pytest.approx(60.0 - 66.70)
    assert (tmp_path / "out" / "plots" / "imagenet100_b0s10_steps_top5.png").exists()


def test_latex_tables_have_balanced_rows_and_columns(built):
    texs = sorted((built / "tables").glob("*.tex"))
    assert len(texs) == 7               # 2 protocols x (wide, compact, per step) + summary
    for tex in texs:
        text = tex.read_text()
        assert text.count("\\begin{tabular}") == text.count("\\end{tabular}") == 1
        spec = re.search(r"\\begin\{tabular\}\{(?:@\{\})?([lrc]+)(?:@\{\})?\}", text).group(1)
        body = text[text.index("\\begin{tabular}"): text.index("\\end{tabular}")]
        rows = [line for line in body.splitlines() if line.rstrip().endswith("\\\\")]
        assert len(rows) >= 2
        for line in rows:
            cells = re.split(r"(?<!\\)&", line.rstrip()[:-2])
            width = sum(int(m) for m in re.findall(r"\\multicolumn\{(\d+)\}", line)) + \
                sum(1 for c in cells if "\\multicolumn" not in c)
            assert width == len(spec), f"{tex.name}: {line}"
            assert line.count("{") - line.count("\\{") == line.count("}") - line.count("\\}"), line
        assert "±" not in text and "Δ" not in text                      # unicode replaced by math


def test_markdown_table_rows_have_the_header_width(built):
    for md in (built / "tables").glob("*.md"):
        lines = [x for x in md.read_text().splitlines() if x.startswith("|")]
        widths = {len(re.split(r"(?<!\\)\|", x)) for x in lines}
        assert len(widths) == 1, md.name


# --------------------------------------------------------------------------------------------------------
# Published reference numbers


def test_reference_rows_shown_and_differences_only_where_backbone_matches(built):
    rows = read_csv(built / "tables" / "cifar100_b50s25.csv")
    published = [r for r in rows if r["kind"] == "published"]
    sources = {r["source"] for r in published}
    assert any("Table 2" in s for s in sources) and any("Table 8" in s for s in sources)
    wo_p_t8 = next(r for r in published if r["method"] == "DER w/o P" and r["backbone"] == "resnet32")
    assert wo_p_t8["avg"] == "70.18" and wo_p_t8["params_bb_avg"] == "0.92" and wo_p_t8["seeds"] == "?"
    wo_p_t2 = next(r for r in published if r["method"] == "DER w/o P" and r["backbone"] == "resnet18_cifar")
    assert wo_p_t2["avg"] == "74.61" and wo_p_t2["avg_std"] == "0.52"
    deltas = {r["method"]: r for r in rows if r["kind"] == "delta"}
    # `der` (no pruning) is compared with DER w/o P of Table 8 (resnet32 = ours), not with Table 2 (ResNet-18)
    # nor with pruned DER (that is `der_prune`); tsd_grc has no published row
    assert set(deltas) == {"Δ der − DER w/o P"}
    assert float(deltas["Δ der − DER w/o P"]["avg"]) == pytest.approx(72.0 - 70.18)
    assert deltas["Δ der − DER w/o P"]["params_bb_avg"] == ""     # these runs record no backbone count



def test_memo_published_rows_compare_only_the_memory_aligned_run(tmp_path):
    """MEMO's Table 14 row (3312 exemplars, memory aligned with DER) is compared with `memo+der_final` only; a
    plain `memo` run (the card's 2000) gets no Δ; MEMO's DER row (2000 exemplars, no pruning) compares with `der`."""
    root = tmp_path / "runs"
    make_run(root, "cifar100_b0s10", "memo", 0, avg=70.0, last=58.0, memory_size=2000)
    make_run(root, "cifar100_b0s10", "memo+der_final", 0, avg=73.0, last=62.5, memory_size=3312)
    make_run(root, "cifar100_b0s10", "der", 0, avg=71.0, last=60.0, memory_size=2000)
    build_report(root, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "tables" / "cifar100_b0s10.csv")
    published = {(r["method"], r["source"].split(" (")[0]) for r in rows if r["kind"] == "published"}
    assert ("MEMO", "MEMO") in published and ("DER", "MEMO") in published
    deltas = {r["method"]: r for r in rows if r["kind"] == "delta"}
    memo = [k for k in deltas if "MEMO" in k]
    assert len(memo) == 1 and "der_final" in memo[0], deltas.keys()
    assert float(deltas[memo[0]]["avg"]) == pytest.approx(73.0 - 72.37)
    assert float(deltas[memo[0]]["last"]) == pytest.approx(62.5 - 61.98)
    der = [k for k in deltas if k.startswith("Δ der") and k.endswith("− DER")]
    assert len(der) == 1 and float(deltas[der[0]]["avg"]) == pytest.approx(71.0 - 71.47)

def test_reference_files_load_with_provenance_and_marks():
    refs, curves = load_reference()
    papers = {r.paper.split(" (")[0] for r in refs}
    assert papers == {"DER", "SEED", "HPCR", "EXACFS", "DyTox", "FOSTER", "MEMO"}
    for r in refs:
        assert r.backbone and r.class_order and r.tables, r
    by = {(r.paper.split(" (")[0], ",".join(r.tables), r.protocol, r.backbone, r.memory, r.method): r for r in refs}
    assert by[("DER", "Table 7", "cifar100_b0s10", "resnet32", "fixed_total:2000", "DER w/o P")].values["avg"].text \
        == "71.29"
    assert by[("EXACFS", "Table 1", "cifar100_b50s2", "resnet32_podnet", "per_class:20", "EXACFS")].values["avg"].text \
        == "62.75"
    hpcr = by[("HPCR", "Table III,Table V,Table VI", "cifar100_online_b0s10", "resnet18_reduced", "reservoir:1000",
               "HPCR")]
    assert hpcr.values["last_task_mean"].text == "29.1" and hpcr.values["last_task_mean"].spread_kind == "ci95"
    assert hpcr.values["avg_task_mean"].text == "40.1" and hpcr.values["forgetting"].text == "15.7"
    assert hpcr.runs == "10" and hpcr.orders == "random:10"
    seed = by[("SEED", "Table 1", "cifar100_b0s10", "resnet32", "none", "SEED")]
    seed_avg = seed.values["avg_task_mean"]                       # SEED reports FACIL's task-mean accuracy
    assert seed_avg.status == "unverified" and "Papers-with-Code" in seed_avg.note
    assert seed.orders == "seed1993"
    lwf = by[("SEED", "Table 1", "cifar100_b0s10", "resnet32", "none", "LwF*")]
    lost = lwf.values["avg_task_mean"]
    assert lost.status == "unknown" and lost.text == ""   # lost: no number invented
    assert "14.7 pp" in lost.note
    # MEMO's Appendix A.3 tables: every method aligned to DER's memory; MEMO's row is its memory-aligned run
    memo = by[("MEMO", "Table 14", "cifar100_b0s10", "resnet32", "fixed_total:2000", "MEMO")]
    assert (memo.values["avg"].text, memo.values["last"].text) == ("72.37", "61.98")
    assert memo.match == "memo+der_final" and "3312" in memo.values["avg"].note and memo.orders == "seed1993"
    memo_in = by[("MEMO", "Table 17", "imagenet100_b50s5", "resnet18_imagenet", "fixed_total:2000", "MEMO")]
    assert (memo_in.values["avg"].text, memo_in.values["last"].text) == ("77.27", "71.54")
    assert by[("MEMO", "Table 14", "cifar100_b0s10", "resnet32", "fixed_total:7431", "Replay")].match == "replay"
    lost_memo = by[("MEMO", "Table 13", "cifar100_b0s5", "resnet32", "fixed_total:2000", "MEMO")].values["avg"]
    assert lost_memo.status == "unknown" and lost_memo.text == ""
    der_t3 = by[("DER", "Table 3", "imagenet100_b50s5", "resnet18_imagenet", "per_class:20", "DER w/o P")]
    assert der_t3.values["last"].status == "flagged" and "72.92" in der_t3.values["last"].note
    # per-step curves: complete ones reproduce the table averages they come from
    c = next(c for c in curves if c.protocol == "cifar100_b50s25" and c.method == "DER")
    assert c.values == [81.20, 74.01, 68.50] and c.full
    partial = next(c for c in curves if c.protocol == "cifar100_b0s2")
    assert partial.steps == [0, 49] and not partial.full


def test_reference_csv_rules():
    """Protocol names follow {dataset}_b{base}s{step}; every value row is a number or explicitly not a number."""
    cards = set(known_protocols())
    no_card = {"imagenet1000_b0s100", "miniimagenet_online_b0s10", "tinyimagenet_online_b0s10",
               "imagenet100_b50s1", "imagenet100_b50s2", "imagenet100_b50s10"}
    files = sorted(REFERENCE_DIR.glob("*.csv"))
    assert {f.name for f in files} >= {"der.csv", "der_curves.csv", "seed.csv", "hpcr.csv", "exacfs.csv"}
    for f in files:
        for row in read_csv(f):
            assert re.fullmatch(r"[a-z0-9]+(_online)?_b\d+s\d+", row["protocol"]), row
            assert row["protocol"] in cards or row["protocol"] in no_card, row["protocol"]
            if row["status"] in ("ok", "flagged", "unverified"):
                float(row["value"])
            else:
                assert row["status"] in ("unknown", "not_reported") and row["value"] == "", row
            if row["status"] == "flagged":
                assert row["note"], row
    for card in cards & {r["protocol"] for f in files for r in read_csv(f)}:
        assert (PROTOCOL_DIR / f"{card}.yaml").exists()


def test_reference_task_counts_match_cards():
    """DER's 'B50, 2 steps' is cifar100_b50s25 (3 tasks): curve lengths equal the cards' task counts."""
    _, curves = load_reference()
    for c in curves:
        if c.full and (PROTOCOL_DIR / f"{c.protocol}.yaml").exists():
            assert len(c.values) == load_protocol(c.protocol).tasks, c.protocol


# --------------------------------------------------------------------------------------------------------
# Plots and HTML


def test_every_plot_is_a_non_blank_png_of_the_expected_size_with_a_pdf_beside_it(built):
    pngs = sorted((built / "plots").glob("*.png"))
    names = {p.name for p in pngs}
    assert {"cifar100_b50s25_steps_top1.png", "cifar100_b50s25_per_task.png", "cifar100_b50s25_heatmaps.png",
            "cifar100_b50s25_extractors.png", "cifar100_b50s25_params.png", "digits_b0s2_steps_top1.png",
            "digits_b0s2_heatmaps.png"} <= names
    assert "digits_b0s2_extractors.png" not in names         # no method run at several N on digits_b0s2
    kinds = ["steps", "per_task", "heatmaps", "extractors", "params"]
    for png in pngs:
        kind = next(k for k in kinds if f"_{k}" in png.name)
        w, h = png_size(png)
        if kind == "heatmaps":                                # small multiples: rows of 3 panels
            assert w == plots.pixel_size("heatmap")[0] and h % plots.pixel_size("heatmap")[1] == 0, png.name
        else:
            assert (w, h) == plots.pixel_size(kind), png.name
        with Image.open(png) as im:
            im = im.convert("RGB")
            colours = im.getcolors(maxcolors=1 << 22)
            assert colours is not None and len(colours) > 20, f"{png.name} looks blank"
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 100, f"{png.name} has no contrast"
        for path in plots.pdf_paths(png):                      # the page links both column widths
            pdf = path.read_bytes()
            assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF") and b"/Page" in pdf, path.name


def test_figures_drawn_by_worker_processes_equal_those_drawn_in_place(runs, tmp_path):
    """The report draws its figures in a pool of processes when there are enough of them: the same files, the
    same PNGs byte for byte and the same page as one process drawing them all."""
    events = [{"task": t, "phase": "ce", "epoch": e, "epochs": 3, "loss": 2.0 / (1 + e + t), "lr": 0.1}
              for t in range(2) for e in range(3)]
    for seed in (0, 1):
        (runs / "digits_b0s2" / "replay" / f"seed{seed}" / "events.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in events))
    pooled, in_place = tmp_path / "pooled", tmp_path / "in_place"
    build_report(runs, pooled, protocols=["digits_b0s2"], plot_workers=2)
    build_report(runs, in_place, protocols=["digits_b0s2"], plot_workers=1)
    files = sorted(p.relative_to(pooled) for p in pooled.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(in_place) for p in in_place.rglob("*") if p.is_file())
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) >= 4 and sum(f.parts[:2] == ("plots", "training") for f in pngs) == 2
    assert all((pooled / f).read_bytes() == (in_place / f).read_bytes() for f in pngs)

    def page(root):
        return re.sub(r"Made \d{4}-\d\d-\d\d \d\d:\d\d UTC", "", (root / "index.html").read_text())
    assert page(pooled) == page(in_place)


def test_figure_workers_leave_ctrl_c_to_the_main_process():
    """A terminal's Ctrl-C reaches the whole process group: the figure workers ignore it, so the report's main
    process decides (it waits for the figures in progress and lists them) and no figure is left torn."""
    import signal

    from cilbench.report.build import FigurePool
    with FigurePool(8, 2) as pool:
        assert pool.pool is not None
        assert pool.submit(signal.getsignal, signal.SIGINT).result() == signal.SIG_IGN


def test_an_interrupted_report_lists_what_it_wrote_and_the_next_one_replaces_it(runs, tmp_path, monkeypatch):
    """Ctrl-C while the workers draw (after the protocol figures were handed to them, before their results were
    collected) or before anything was written: the folder keeps a manifest marked incomplete that lists every
    file written, the workers' figures included, and no page; the next report into it runs and leaves exactly
    its own files."""
    import cilbench.report.build as build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def files_of(out):
        return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())

    for where in ("summary_table", "_training_jobs"):
        out = tmp_path / where
        (out / "notes").mkdir(parents=True)
        (out / "notes" / "mine.txt").write_text("not the report's")      # a user's file: never listed
        (out / ".cilbench-report.json").write_text('{"files": []}')
        monkeypatch.setattr(build, where, interrupted)
        with pytest.raises(KeyboardInterrupt):
            build_report(runs, out, protocols=["digits_b0s2"], plot_workers=2)
        monkeypatch.undo()
        manifest = json.loads((out / ".cilbench-report.json").read_text())
        assert manifest["complete"] is False and not (out / "index.html").exists()
        assert sorted(manifest["files"] + [".cilbench-report.json", "notes/mine.txt"]) == files_of(out)
        if where == "summary_table":                                   # figures drawn by the workers are listed
            assert any(f.startswith("plots/digits_b0s2") and f.endswith(".png") for f in manifest["files"])

        build_report(runs, out, protocols=["cifar100_b50s25"], plot_workers=1)
        manifest = json.loads((out / ".cilbench-report.json").read_text())
        assert manifest["complete"] is True
        assert sorted(manifest["files"] + [".cilbench-report.json", "notes/mine.txt"]) == files_of(out)
        assert not any("digits_b0s2" in f for f in files_of(out))      # nothing left of the interrupted one


def test_extractor_plot_groups_runs_by_name_without_n_tag(runs):
    assert strip_n_tag("tsd_grc+N3") == "tsd_grc" and strip_n_tag("tsd_fixed+N3+long") == "tsd_fixed+long"
    groups = group_runs(scan_runs(runs))["cifar100_b50s25"]
    assert sorted({g.base_name for g in groups}) == ["der", "tsd_grc"]
    xs = sorted(g.footprint()["ext_last"][0] for g in groups if g.base_name == "tsd_grc")
    assert xs == [2, 3]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src") and value:
                self.links.append(value)


def test_html_references_only_existing_local_files(built):
    index = built / "index.html"
    parser = _Links()
    parser.feed(index.read_text())
    assert "script" not in parser.tags and "link" not in parser.tags     # nothing fetched from anywhere
    files = [x for x in parser.links if not x.startswith("#")]
    assert any(x.endswith(".png") for x in files) and any(x.endswith(".tex") for x in files)
    for link in files:
        assert "://" not in link and not link.startswith("/"), link
        assert (index.parent / link).exists(), link
    anchors = {x[1:] for x in parser.links if x.startswith("#")}
    text = index.read_text()
    for a in anchors:
        assert f'id="{a}"' in text
    # every plot written is shown
    for png in (built / "plots").glob("*.png"):
        assert f"plots/{png.name}" in text


def test_rerun_removes_stale_outputs(runs, tmp_path):
    out = tmp_path / "out"
    build_report(runs, out, protocols=["digits_b0s2"])
    assert list((out / "plots").glob("digits*.pdf"))
    build_report(runs, out, protocols=["cifar100_b50s25"], plots=False)
    assert not list((out / "plots").glob("digits*")) and not (out / "tables" / "digits_b0s2.md").exists()
    assert (out / "tables" / "cifar100_b50s25.md").exists()


# --------------------------------------------------------------------------------------------------------
# Filters and bad input


def test_filters_protocol_methods_metric(runs, tmp_path):
    out = tmp_path / "out"
    build_report(runs, out, protocols=["cifar100_b50s25"], methods=["tsd_grc"], metrics=["avg", "forgetting"],
                 plots=False)
    assert sorted(p.name for p in (out / "tables").glob("*.md")) == ["cifar100_b50s25.md", "cifar100_b50s25_steps.md",
                                                                     "summary.md"]
    rows = read_csv(out / "tables" / "cifar100_b50s25.csv")
    assert {r["method"] for r in rows if r["kind"] == "ours"} == {"tsd_grc+N2", "tsd_grc+N3"}
    assert not [r for r in rows if r["kind"] in ("published", "incomplete")]   # no DER rows without der
    assert "forgetting" in rows[0] and "last" not in rows[0] and "bwt" not in rows[0]
    build_report(runs, out, methods=["der"], metrics=["last_acc"], plots=False)  # metrics.json names accepted
    rows = read_csv(out / "tables" / "cifar100_b50s25.csv")
    assert {r["method"] for r in rows if r["kind"] == "ours"} == {"der"}
    assert "last" in rows[0] and "avg" not in rows[0]
    assert any(r["kind"] == "published" for r in rows)
    assert not (out / "tables" / "digits_b0s2.md").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"metrics": ["accuracy"]}, "unknown metric 'accuracy'"),
    ({"protocols": ["cifar100_b0s10"]}, "no runs for cifar100_b0s10"),
    ({"methods": ["podnet"]}, "no runs named podnet"),
])
def test_bad_filters_are_user_errors(runs, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        build_report(runs, tmp_path / "out", **kwargs)


def test_missing_or_empty_runs_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no runs under"):
        build_report(tmp_path / "empty", tmp_path / "out")
    assert resolve_metrics(None) is None and resolve_metrics(["avg,bwt"]) == ["avg", "bwt"]


def test_cli_report_and_errors(runs, tmp_path):
    cli = CliRunner()
    result = cli.invoke(app, ["report", "--runs", str(runs), "--out", str(tmp_path / "out"),
                              "--protocol", "digits_b0s2", "--metric", "avg"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "index.html").exists()
    result = cli.invoke(app, ["report", "--runs", str(runs), "--out", str(tmp_path / "out"), "--metric", "nope"])
    assert result.exit_code == 2 and "unknown metric 'nope'" in result.output
    result = cli.invoke(app, ["report", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_report_workers_reach_the_figure_pool_and_zero_is_refused(runs, tmp_path, monkeypatch):
    from cilbench.report import build
    asked = []
    real = build.FigurePool.__init__
    monkeypatch.setattr(build.FigurePool, "__init__",
                        lambda self, figures, workers: asked.append(workers) or real(self, figures, workers))
    cli = CliRunner()
    result = cli.invoke(app, ["report", "--runs", str(runs), "--out", str(tmp_path / "out"), "--protocol",
                              "digits_b0s2", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert asked == [1]
    result = cli.invoke(app, ["report", "--runs", str(runs), "--out", str(tmp_path / "zero"), "--workers", "0"])
    assert result.exit_code == 2 and "--workers" in result.output
    assert not (tmp_path / "zero").exists()


def test_reference_csv_errors_name_file_and_line(runs, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    with open(REFERENCE_DIR / "exacfs.csv") as fh:
        lines = fh.read().splitlines()
    (ref / "x.csv").write_text("\n".join(lines[:2] + [lines[2].replace(",avg,", ",accuracy,")]) + "\n")
    with pytest.raises(UserError, match=r"x\.csv:3: unknown metric 'accuracy'"):
        build_report(runs, tmp_path / "out", reference_dir=ref)


# --------------------------------------------------------------------------------------------------------
# The run summary of `cilbench run`


def test_run_summary_uses_the_report_columns(tmp_path):
    root = tmp_path / "runs"
    path = make_run(root, "cifar100_b50s25", "der", 0, avg=70.0, last=60.0, bwt=-5.0,
                    extractors=[1, 2, 3], params=[460_000, 920_000, 1_380_000])
    console = Console(record=True, width=100)
    print_run_summary(path, console)
    text = console.export_text()
    for header in ("#Ext", "#Params M", "(backbone, avg)", "Avg", "Last", "BWT", "Forgetting"):
        assert header in text
    assert "Seeds" not in text and "(avg)" not in text.replace("(backbone, avg)", "")   # one run: said once
    assert "70.00" in text and "-5.00" in text and "1.38" in text
    assert "(published)" in text and "Δ DER w/o P" in text          # names wrap inside the 100 columns
    assert "backbone: resnet32" in text and "DER w/o P: cilbench" in text      # the Source, under the table
    assert max(len(line) for line in text.splitlines()) <= 100


def test_run_summary_of_an_interrupted_run(tmp_path):
    path = make_run(tmp_path / "runs", "digits_b0s2", "replay", 0, status="interrupted", tasks_done=2)
    console = Console(record=True, width=200)
    print_run_summary(path, console)
    text = console.export_text()
    assert "interrupted after 2/5 tasks" in text and "Top-1" in text


def test_config_files_written_by_the_fixture_match_the_store_layout(runs):
    seed0 = run_dir(runs, "cifar100_b50s25", "der", 0)
    assert {p.name for p in seed0.iterdir()} >= {"config.yaml", "manifest.json", "steps.csv", "acc_matrix.csv",
                                                  "acc_matrix_top5.csv", "metrics.json"}
    assert yaml.safe_load((seed0 / "config.yaml").read_text())["protocol"]["backbone"]["name"] == "resnet32"
    assert json.loads((seed0 / "manifest.json").read_text())["status"] == "complete"


def test_pruned_der_runs_are_compared_with_pruned_der(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "cifar100_b0s10", "der_prune", 0, avg=68.0, last=55.0, memory_size=200)
    build_report(root, tmp_path / "out", plots=False)
    rows = read_csv(tmp_path / "out" / "tables" / "cifar100_b0s10.csv")
    deltas = {r["method"]: r for r in rows if r["kind"] == "delta"}
    assert set(deltas) == {"Δ der_prune − DER"}                     # Table 7 (resnet32): DER = 69.41
    assert float(deltas["Δ der_prune − DER"]["avg"]) == pytest.approx(68.0 - 69.41)
    assert any(r["kind"] == "published" and r["method"] == "SEED" and r["avg_task_mean"] == "61.7‡" for r in rows)


def test_epoch_capped_and_mixed_config_seeds_are_flagged(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "digits_b0s2", "replay", 0, max_epochs=2)
    make_run(root, "digits_b0s2", "replay", 1)
    build_report(root, tmp_path / "out", plots=False)
    row = next(r for r in read_csv(tmp_path / "out" / "tables" / "digits_b0s2.csv") if r["kind"] == "ours")
    assert "epochs capped at 2 (1/2 seeds)" in row["source"] and "runtime.max_epochs" in row["source"]
    page = (tmp_path / "out" / "index.html").read_text()
    assert "Replay: seeds differ in runtime.max_epochs (seed0: 2, seed1: null)" in page


def test_der_curves_reproduce_the_table_averages():
    refs, curves = load_reference()
    checked = 0
    for c in curves:
        if not c.full:
            continue
        row = next(r for r in refs if r.paper == c.paper and r.protocol == c.protocol and r.backbone == c.backbone
                   and r.method == c.method)
        table_avg = float(row.values["avg" if c.metric == "top1" else "avg_top5"].text)
        assert sum(c.values) / len(c.values) == pytest.approx(table_avg, abs=0.011), (c.method, c.protocol)
        checked += 1
    assert checked == 13 + 10      # DER's official curves; MEMO's Tables 14-18 (DER and MEMO rows)


# a run name whose tag a method option produces: (method, tag) -> the option values that give it
RUN_TAG_OPTIONS = {("foster", "teacher"): {"infer_with": "teacher"},
                   ("memo", "der_final"): {"memory_alignment": "der_final"}}


def test_every_reference_match_is_a_run_name_cilbench_can_produce():
    """`match` names a registered method, or method+tag where the tag is the method's own run tag for some
    option (foster+teacher, memo+der_final); the default options give no tag, so a plain run never matches a
    tagged row."""
    from cilbench.config import build
    from cilbench.kit.registry import get_method
    matches = {r["match"] for f in REFERENCE_DIR.glob("*.csv") for r in read_csv(f) if r["match"]}
    assert {"der", "der_prune", "joint", "foster+teacher", "memo+der_final", "replay"} <= matches
    for match in sorted(matches):
        method, _, tag = match.partition("+")
        entry = get_method(method)
        plain = build(entry.cls.Config, entry.defaults, "test")
        assert entry.cls.run_tag(plain) is None, match
        if tag:
            assert (method, tag) in RUN_TAG_OPTIONS, f"{match}: no known option gives the tag '{tag}'"
            cfg = build(entry.cls.Config, {**entry.defaults, **RUN_TAG_OPTIONS[(method, tag)]}, "test")
            assert entry.cls.run_tag(cfg) == tag, match


def test_out_must_be_a_folder_outside_the_runs(runs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        build_report(runs, tmp_path / "file")
    with pytest.raises(UserError, match="inside the runs directory"):
        build_report(runs, runs / "report")


# --------------------------------------------------------------------------------------------------------
# Issue 13: the page and the tables a paper needs


def make_ranked_runs(root: Path) -> Path:
    """digits_b0s2 (5 tasks): finetune (lower bound), der (2 seeds), tsd_grc+N2, joint (upper bound), with
    known per-step accuracies: joint is best everywhere but is a bound, so tsd is best and der second."""
    make_run(root, "digits_b0s2", "finetune", 0, avg=40.0, last=20.0, bwt=-50.0, top1=[99, 50, 33, 25, 20])
    make_run(root, "digits_b0s2", "der", 0, avg=90.0, last=84.0, bwt=-8.0, top1=[99, 94, 90, 86, 82],
             params=[100_000 * (t + 1) for t in range(5)])
    make_run(root, "digits_b0s2", "der", 1, avg=92.0, last=86.0, bwt=-6.0, top1=[99, 96, 92, 88, 86],
             params=[100_000 * (t + 1) for t in range(5)])
    make_run(root, "digits_b0s2", "tsd_grc+N2", 0, avg=94.0, last=90.0, bwt=-4.0, top1=[99, 97, 95, 92, 90])
    make_run(root, "digits_b0s2", "joint", 0, avg=99.0, last=98.0, bwt=-1.0, top1=[100, 99, 99, 98, 98])
    return root


def test_rows_in_paper_order_with_best_and_second_marked_in_every_format(tmp_path):
    out = tmp_path / "out"
    build_report(make_ranked_runs(tmp_path / "runs"), out, plots=False)
    rows = [r for r in read_csv(out / "tables" / "digits_b0s2.csv") if r["kind"] == "ours"]
    assert [r["method"] for r in rows] == ["finetune", "der", "tsd_grc+N2", "joint"]     # run names kept in CSV
    assert [r["name"] for r in rows] == ["Finetune", "DER w/o P", "TSD-GRC (N=2)", "Joint"]
    marks = {r["method"]: (r["avg_mark"], r["last_mark"], r["bwt_mark"]) for r in rows}
    assert marks == {"finetune": ("", "", ""), "der": ("second",) * 3, "tsd_grc+N2": ("best",) * 3,
                     "joint": ("", "", "")}                                                # bounds not ranked
    md = (out / "tables" / "digits_b0s2.md").read_text()
    assert "| TSD-GRC (N=2) |" in md and "| **94.00** | **90.00** | **-4.00** |" in md
    assert "<ins>91.00 ± 1.41</ins>" in md and "| 99.00 | 98.00 | -1.00 |" in md
    assert md.index("| Finetune |") < md.index("| DER w/o P |") < md.index("| Joint |")
    tex = (out / "tables" / "digits_b0s2.tex").read_text()
    assert "\\textbf{94.00}" in tex and "\\underline{91.00 $\\pm$ 1.41}" in tex
    page = (out / "index.html").read_text()
    assert "<b>94.00</b>" in page and "<u>91.00 ± 1.41</u>" in page
    # the per-step table: every step's mean ± std, marks on the right cells, in md, tex and csv
    steps = {r["method"]: r for r in read_csv(out / "tables" / "digits_b0s2_steps.csv")}
    assert float(steps["der"]["step1"]) == pytest.approx(95.0) and float(steps["der"]["step1_std"]) == \
        pytest.approx(1.41421, abs=1e-4)
    assert steps["tsd_grc+N2"]["step4_mark"] == "best" and steps["der"]["step4_mark"] == "second"
    assert steps["joint"]["step4_mark"] == "" and float(steps["joint"]["step4"]) == 98.0
    smd = (out / "tables" / "digits_b0s2_steps.md").read_text()
    assert "| DER w/o P | **99.00 ± 0.00** | <ins>95.00 ± 1.41</ins> | <ins>91.00 ± 1.41</ins>" in smd   # tie
    assert "**97.00**" in smd
    stex = (out / "tables" / "digits_b0s2_steps.tex").read_text()
    assert "\\underline{95.00 $\\pm$ 1.41}" in stex and "\\textbf{90.00}" in stex


def test_compact_latex_table_fits_a_paper_column(tmp_path):
    out = tmp_path / "out"
    build_report(make_ranked_runs(tmp_path / "runs"), out, plots=False)
    tex = (out / "tables" / "digits_b0s2_compact.tex").read_text()
    body = tex[tex.index("\\begin{tabular}"): tex.index("\\end{tabular}")]
    assert "\\toprule" in body and "\\bottomrule" in tex
    assert "Method & Avg & Last & BWT & \\#Params (M) \\\\" in body
    lines = [x for x in body.splitlines() if x.endswith("\\\\")]
    assert [x.split(" & ")[0] for x in lines] == ["Method", "Finetune", "DER w/o P", "TSD-GRC (N=2)", "Joint"]
    for line in lines:
        assert len(re.split(r"(?<!\\)&", line)) == 5, line
        assert line.count("{") - line.count("\\{") == line.count("}") - line.count("\\}"), line
        assert line.count("$") % 2 == 0, line
    all_lines = body.splitlines()
    # \midrule after the header, after the lower bound and before the upper bound
    assert all_lines[all_lines.index(lines[1]) + 1] == "\\midrule"
    assert all_lines[all_lines.index(lines[4]) - 1] == "\\midrule"
    assert "$\\mathbf{94.00}$" in body and "$\\underline{91.00}_{\\pm 1.41}$" in body
    assert "$-50.00$" in body and "±" not in tex                     # a real minus sign, ± as a subscript


class _Page(HTMLParser):
    """Text, links and images of index.html, and the text inside each <dt>."""

    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.dts: list[str] = []
        self._in_dt = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._in_dt = tag == "dt"
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        self.text.append(data)
        if self._in_dt:
            self.dts.append(data.strip())
            self._in_dt = False


def test_page_has_legend_protocol_settings_run_links_and_header(built):
    page = _Page()
    page.feed((built / "index.html").read_text())
    text = " ".join(page.text)
    assert {"Avg", "Last", "BWT", "Forgetting", "task mean"} <= set(page.dts)
    assert "base step included" in text
    assert re.search(r"Made \d{4}-\d\d-\d\d \d\d:\d\d UTC by cilbench \d+\.\d+", text)
    # protocol description and resolved settings
    assert "CIFAR-100: 50 base classes, then 2 tasks of 25" in text
    for word in ("class order(s)", "seed1993", "per_class:20", "resnet32", "170 epochs"):
        assert word in text, word
    # every seed directory is linked with its config, and every link and image resolves from the report folder
    for seed in range(5):
        assert f"../runs/cifar100_b50s25/der/seed{seed}/config.yaml" in page.links
    for link in page.links + page.images:
        if not link.startswith("#"):
            assert (built / link).exists(), link
    assert all(img.endswith(".png") for img in page.images) and len(page.images) >= 8


def test_training_curves_from_events_are_plotted_and_linked(tmp_path):
    root = tmp_path / "runs"
    path = make_run(root, "digits_b0s2", "replay", 0)
    events = [{"task": t, "phase": "train", "epoch": e, "epochs": 2, "loss": 2.0 / (1 + e + t), "lr": 0.1 / (1 + e)}
              for t in range(5) for e in range(2)]
    (path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"task": 4, "lo')
    out = tmp_path / "out"
    build_report(root, out)
    png = out / "plots" / "training" / "digits_b0s2_replay_seed0.png"
    assert png.exists() and png.with_suffix(".pdf").read_bytes().startswith(b"%PDF-")
    assert not png.with_name(png.stem + "_1col.pdf").exists()     # a two-panel diagnostic: double column only
    assert "plots/training/digits_b0s2_replay_seed0.png" in (out / "index.html").read_text()


# --------------------------------------------------------------------------------------------------------
# Issue 14: the output folder and bad run directories


def test_report_out_removes_only_its_own_files(runs, tmp_path):
    out = tmp_path / "out"
    build_report(runs, out, protocols=["digits_b0s2"], plots=False)
    mine = [out / "tables" / "notes.md", out / "tables" / "x.csv", out / "reference" / "mine.csv", out / "a.txt"]
    for f in mine:
        f.write_text("user data")
    build_report(runs, out, protocols=["cifar100_b50s25"], plots=False)
    assert all(f.read_text() == "user data" for f in mine)
    assert not (out / "tables" / "digits_b0s2.md").exists() and (out / "tables" / "cifar100_b50s25.md").exists()
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("keep me")
    (foreign / "tables").mkdir()
    (foreign / "tables" / "main.csv").write_text("keep me too")
    with pytest.raises(UserError, match="not empty and is not a previous report"):
        build_report(runs, foreign, plots=False)
    assert (foreign / "draft.tex").read_text() == "keep me" and (foreign / "tables" / "main.csv").exists()
    # a report written before manifests existed is overwritten, nothing of it removed
    legacy = tmp_path / "legacy"
    (legacy / "tables").mkdir(parents=True)
    (legacy / "index.html").write_text("<html><head><title>cilbench report</title></head></html>")
    (legacy / "tables" / "old.csv").write_text("kept")
    build_report(runs, legacy, protocols=["digits_b0s2"], plots=False)
    assert (legacy / "tables" / "old.csv").read_text() == "kept" and (legacy / ".cilbench-report.json").exists()
    # a manifest naming files outside the folder removes nothing there
    victim = tmp_path / "victim.txt"
    victim.write_text("x")
    (out / ".cilbench-report.json").write_text(json.dumps({"files": ["../victim.txt", str(victim)]}))
    build_report(runs, out, plots=False)
    assert victim.exists()


def _bad_runs(root: Path) -> dict[str, str]:
    """One good replay seed on digits_b0s2 and one run directory of each bad kind; -> run name: reason part."""
    make_run(root, "digits_b0s2", "replay", 0, avg=95.0, last=88.0)
    bad = {}

    def broken(name: str, reason: str, edit) -> None:
        path = make_run(root, "digits_b0s2", name, 0, avg=1.0)
        edit(path)
        bad[name] = reason

    broken("inf", "not a finite number",
           lambda p: (p / "metrics.json").write_text((p / "metrics.json").read_text()
                                                     .replace('"avg_acc": 1.0', '"avg_acc": Infinity')))
    broken("nan", "not a finite number",
           lambda p: (p / "metrics.json").write_text((p / "metrics.json").read_text()
                                                     .replace('"bwt": -5.0', '"bwt": NaN')))
    broken("list", "metrics.json is a list", lambda p: (p / "metrics.json").write_text("[1, 2]"))
    broken("scalar", "config.yaml holds a str", lambda p: (p / "config.yaml").write_text("just a string\n"))
    broken("binary", "not UTF-8", lambda p: (p / "config.yaml").write_bytes(b"\xff\xfe\x00\x81binary"))
    broken("short", "steps.csv line 3", lambda p: (p / "steps.csv").write_text(
        "\n".join((p / "steps.csv").read_text().splitlines()[:2] + ["1,4,90.0"]) + "\n"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    broken("bomb", "through aliases", lambda p: (p / "config.yaml").write_text(bomb))
    make_run(root, "digits_b0s2", "cost$1$", 0, avg=1.0, status="failed", tasks_done=2)   # '$' is matplotlib math
    make_run(root, "digits_b0s2", "dollar$x$", 0, avg=50.0, last=40.0)
    make_run(root, "digits_b0s2", "odd", 0, avg=30.0, protocol_changes={   # ill-typed but a mapping: shown
        "num_classes": "ten", "backbone": "tiny", "memory": 3, "train": [], "class_order": {"a": 1}})
    (root / "digits_b0s2" / "replay" / "seed7").mkdir()                                      # an empty seed dir
    return bad


def test_bad_run_directories_are_listed_and_never_averaged(tmp_path):
    import time
    root = tmp_path / "runs"
    bad = _bad_runs(root)
    out = tmp_path / "out"
    t0 = time.perf_counter()
    build_report(root, out)                                               # completes, plots included
    assert time.perf_counter() - t0 < 60
    listed = {(r["run_name"], r["seed"]): r for r in read_csv(out / "tables" / "runs.csv")}
    for name, reason in bad.items():
        assert listed[(name, "0")]["averaged"] == "no" and reason in listed[(name, "0")]["reason"], name
    assert listed[("replay", "7")]["status"] == "empty"                   # empty seed dirs are listed too
    assert listed[("cost$1$", "0")]["status"] == "failed"
    rows = read_csv(out / "tables" / "digits_b0s2.csv")
    ours = {r["method"]: r for r in rows if r["kind"] == "ours"}
    assert set(ours) == {"replay", "dollar$x$", "odd"}                     # no bad run is averaged
    assert ours["replay"]["seeds"] == "1" and float(ours["replay"]["avg"]) == 95.0
    assert {r["method"] for r in rows if r["kind"] == "incomplete"} >= {f"{n} seed0" for n in bad}
    assert (out / "plots" / "digits_b0s2_steps_top1.png").exists()


def test_a_nan_metric_keeps_the_run_out_of_seeds_and_mean(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "digits_b0s2", "der", 0, avg=90.0, bwt=-4.0)
    nan = make_run(root, "digits_b0s2", "der", 1, avg=80.0, bwt=-6.0)
    (nan / "metrics.json").write_text((nan / "metrics.json").read_text().replace('"bwt": -6.0', '"bwt": NaN'))
    build_report(root, tmp_path / "out", plots=False)
    der = next(r for r in read_csv(tmp_path / "out" / "tables" / "digits_b0s2.csv") if r["kind"] == "ours")
    assert der["seeds"] == "1" and float(der["avg"]) == 90.0 and float(der["bwt"]) == -4.0


def test_protocols_whose_names_slug_alike_keep_their_own_files(tmp_path):
    root = tmp_path / "runs"
    for k, name in enumerate(["a b", "a_b", "summary"]):
        make_run(root, "digits_b0s2", "replay", 0, avg=10.0 + k, protocol_dir=name)
    out = tmp_path / "out"
    build_report(root, out, plots=False)
    csvs = sorted(p.name for p in (out / "tables").glob("*.csv") if "_steps" not in p.name)
    assert len(csvs) == 5 and "summary.csv" in csvs and "runs.csv" in csvs
    avgs = sorted(float(next(r for r in read_csv(out / "tables" / f) if r["kind"] == "ours")["avg"])
                  for f in csvs if f not in ("summary.csv", "runs.csv"))
    assert avgs == [10.0, 11.0, 12.0]
    summary = read_csv(out / "tables" / "summary.csv")
    assert {"a b:avg", "a_b:avg", "summary:avg"} <= set(summary[0])


def test_markdown_escapes_text_from_run_names(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "digits_b0s2", "x|y*z*+[l](u)", 0)
    build_report(root, tmp_path / "out", plots=False)
    md = (tmp_path / "out" / "tables" / "digits_b0s2.md").read_text()
    assert "| x\\|y\\*z\\* \\[\\[l\\](u)\\] |" in md            # name 'x|y*z* [[l](u)]' (tag in brackets)
    lines = [x for x in md.splitlines() if x.startswith("|")]
    assert len({len(re.split(r"(?<!\\)\|", x)) for x in lines}) == 1


def test_run_names_are_printed_literally_on_the_terminal(tmp_path):
    path = make_run(tmp_path / "runs", "digits_b0s2", "x[bold]y[/bold]", 0)
    console = Console(record=True, width=250)
    print_run_summary(path, console)
    assert "x[bold]y[/bold]" in console.export_text()
    failed = make_run(tmp_path / "runs", "digits_b0s2", "[red]z", 0, status="failed", tasks_done=1)
    manifest = json.loads((failed / "manifest.json").read_text())
    (failed / "manifest.json").write_text(json.dumps({**manifest, "error": "boom [link=x]y[/link]"}))
    console = Console(record=True, width=250)
    print_run_summary(failed, console)
    text = console.export_text()
    assert "[red]z" in text and "boom [link=x]y[/link]" in text


def test_include_keeps_only_the_seed_directories_it_accepts(runs, tmp_path):
    seen = []

    def include(seed_dir: Path) -> bool:
        seen.append(seed_dir)
        return seed_dir.name != "seed1"

    build_report(runs, tmp_path / "out", protocols=["digits_b0s2"], include=include, plots=False)
    replay = next(r for r in read_csv(tmp_path / "out" / "tables" / "digits_b0s2.csv") if r["kind"] == "ours")
    assert replay["seeds"] == "1" and float(replay["avg"]) == 95.0
    assert all(p.is_dir() and p.name.startswith("seed") for p in seen)
    assert "seed1" not in {r["seed"] for r in read_csv(tmp_path / "out" / "tables" / "runs.csv")}


# --------------------------------------------------------------------------------------------------------
# Issue 11: backbone #Params and class orders in the comparisons


def test_backbone_params_are_labelled_and_compared_with_the_published_count(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "cifar100_b50s25", "der", 0, avg=72.0, extractors=[1, 2, 3],
             params=[470_000, 940_000, 1_410_000], params_backbone=[400_000, 800_000, 1_200_000])
    build_report(root, tmp_path / "out", plots=False)
    rows = read_csv(tmp_path / "out" / "tables" / "cifar100_b50s25.csv")
    der = next(r for r in rows if r["kind"] == "ours")
    assert float(der["params_avg"]) == pytest.approx(0.94) and float(der["params_bb_avg"]) == pytest.approx(0.8)
    delta = next(r for r in rows if r["kind"] == "delta" and r["method"] == "Δ der − DER w/o P")
    assert float(delta["params_bb_avg"]) == pytest.approx(0.8 - 0.92) and delta["params_avg"] == ""
    md = (tmp_path / "out" / "tables" / "cifar100_b50s25.md").read_text()
    assert "#Params M total (avg)" in md.replace("\\#", "#") and "#Params M backbone (avg)" in md.replace("\\#", "#")


def test_delta_rows_say_whether_the_class_orders_match(tmp_path):
    root = tmp_path / "runs"
    orders = ["podnet1", "podnet2", "podnet3"]
    for seed in range(3):   # class_orders maps seed k to the k-th order: the papers' three-order protocol
        make_run(root, "cifar100_b50s25", "der+3orders", seed, avg=70.0 + seed,
                 protocol_changes={"class_orders": orders, "class_order": orders[seed]})
    make_run(root, "cifar100_b50s25", "der", 0, avg=71.0)                            # seed1993 only
    make_run(root, "cifar100_b0s10", "seed", 0, avg=60.0, task_mean=(61.0, 50.0), memory_size=0)
    out = tmp_path / "out"
    build_report(root, out, plots=False)
    deltas = {r["method"]: r for r in read_csv(out / "tables" / "cifar100_b50s25.csv") if r["kind"] == "delta"}
    assert "≠ class order" not in deltas["Δ der+3orders − DER w/o P"]["name"]
    assert "likely the paper's" in deltas["Δ der+3orders − DER w/o P"]["source"]
    assert deltas["Δ der − DER w/o P"]["name"].endswith("(≠ class order)")
    assert "ours seed1993, paper 3 orders" in deltas["Δ der − DER w/o P"]["source"]
    runs = {(r["run_name"], r["seed"]): r["class_order"] for r in read_csv(out / "tables" / "runs.csv")}
    assert runs[("der+3orders", "2")] == "podnet3" and runs[("der", "0")] == "seed1993"
    # SEED reports FACIL's task-mean accuracy with the seed-1993 order: compared on our task-mean Avg
    rows = read_csv(out / "tables" / "cifar100_b0s10.csv")
    seed = next(r for r in rows if r["kind"] == "ours")
    assert seed["name"] == "SEED" and float(seed["avg_task_mean"]) == 61.0 and float(seed["avg"]) == 60.0
    delta = next(r for r in rows if r["kind"] == "delta")
    assert float(delta["avg_task_mean"]) == pytest.approx(61.0 - 61.7) and "≠" not in delta["name"]
    assert "same class order(s): seed1993" in delta["source"]


# --------------------------------------------------------------------------------------------------------
# Issue 9: online tables in the papers' form


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    from cilbench.report.aggregate import t975
    for df in (1, 2, 4, 9, 29, 30, 31, 50, 200):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df


def test_online_tables_show_task_mean_forms_with_95_ci_beside_published_hpcr(tmp_path):
    root = tmp_path / "runs"
    lasts = [28.0, 30.0, 31.0]
    for seed, last in enumerate(lasts):
        make_run(root, "cifar100_online_b0s10", "hpcr", seed, avg=40.0 + seed, last=last - 1, bwt=-10.0 - seed,
                 task_mean=(41.0 + seed, last), memory_size=1000)
    out = tmp_path / "out"
    build_report(root, out, plots=False)
    rows = read_csv(out / "tables" / "cifar100_online_b0s10.csv")
    ours = next(r for r in rows if r["kind"] == "ours")
    assert list(ours).index("last") < list(ours).index("last_task_mean") < list(ours).index("forgetting")
    n, mean = 3, sum(lasts) / 3
    sd = (sum((x - mean) ** 2 for x in lasts) / (n - 1)) ** 0.5
    assert float(ours["last_task_mean"]) == pytest.approx(mean, abs=1e-4)
    assert float(ours["last_task_mean_std"]) == pytest.approx(4.302653 * sd / n ** 0.5, abs=1e-4)   # 95% CI
    assert float(ours["forgetting"]) == pytest.approx(11.0)
    hpcr = next(r for r in rows if r["kind"] == "published" and r["method"] == "HPCR, buffer 1000")
    assert hpcr["last_task_mean"] == "29.1" and hpcr["last_task_mean_std"] == "0.7" and hpcr["last"] == ""
    assert hpcr["avg_task_mean"] == "40.1" and hpcr["forgetting"] == "15.7"
    delta = next(r for r in rows if r["kind"] == "delta")
    assert float(delta["last_task_mean"]) == pytest.approx(mean - 29.1, abs=1e-4)
    assert float(delta["forgetting"]) == pytest.approx(11.0 - 15.7)
    md = (out / "tables" / "cifar100_online_b0s10.md").read_text()
    assert "95% CI" in md
    compact = (out / "tables" / "cifar100_online_b0s10_compact.tex").read_text()
    assert "Last (task mean) & Avg (task mean) & Forg." in compact


def test_yaml_alias_bomb_is_refused_within_a_second():
    import time

    from cilbench.report import load_yaml_bounded
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))   # 10^9 nodes
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="through aliases"):
        load_yaml_bounded(bomb)
    assert time.perf_counter() - t0 < 1.0
    with pytest.raises(ValueError, match="refers to itself"):
        load_yaml_bounded("a: &a [1, *a]\n")
    assert load_yaml_bounded("a: &x {k: 1}\nb: *x\n") == {"a": {"k": 1}, "b": {"k": 1}}   # small aliases are fine


def test_the_report_names_the_network_a_method_ran_not_the_cards():
    """DyTox builds a transformer and EXACFS/SEED may pick their own ResNet: config.yaml records the network
    (`method_backbone`), the report shows it, and only that network matches a paper's backbone."""
    from cilbench.kit.registry import known_methods
    from cilbench.report.aggregate import RunGroup
    from cilbench.run.rundir import SeedRun
    from cilbench.run.runner import RunRequest, resolve

    dytox = known_methods()["dytox"].cls
    assert dytox.architecture(dytox.Config(), "resnet32") == "convit_dytox"
    assert dytox.architecture(dytox.Config(patch_size=16), "resnet18_imagenet") == "convit_dytox_p16"
    reduced = resolve(RunRequest(method="dytox", protocol="digits_b0s2")).config["method_backbone"]
    assert reduced.startswith("dytox_gpsa (width") and "patch 4" in reduced
    assert resolve(RunRequest(method="exacfs", protocol="cifar100_b50s5")).config["method_backbone"] == \
        "resnet32_podnet"
    assert resolve(RunRequest(method="seed", protocol="cifar100_b50s5")).config["method_backbone"] == \
        "resnet18_imagenet"
    assert resolve(RunRequest(method="der", protocol="digits_b0s2")).config["method_backbone"] == "resnet20"

    def group(method_backbone, card_backbone):
        config = {"protocol": {"backbone": card_backbone}, "method_backbone": method_backbone}
        run = SeedRun(Path("x"), "cifar100_b0s10", "dytox", 0, "complete", method="dytox", config=config)
        return RunGroup("cifar100_b0s10", "dytox", [run])

    own = group("convit_dytox", {"name": "resnet32", "width": 8, "pretrained": "w.pth"})
    assert own.backbone == own.backbone_standard == "convit_dytox"     # the card's width/weights are not its
    card = group("resnet32", {"name": "resnet32", "width": 8})
    assert card.backbone == "resnet32 (width 8)" and card.backbone_standard is None
    old = group(None, {"name": "resnet32"})                              # a run from before the field existed
    assert old.backbone == old.backbone_standard == "resnet32"
