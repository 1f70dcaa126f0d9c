"""`make demo` (cilbench/bench/demo.py): runs in worker processes, output in DEMO_RUNS' order, one failing run
reported while the others finish."""
from __future__ import annotations

import json

from cilbench.bench import demo

RUNS = [
    ("digits_b0s2", "replay", [], "replay"),
    ("digits_b0s2", "finetune", ["finetune.no_such_option=1"], "finetune"),     # fails: unknown option
    ("digits_online_b0s2", "er", [], "er"),
]


def test_demo_runs_in_workers_keeps_its_order_and_reports_a_failed_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_RUNS", RUNS)
    monkeypatch.setattr(demo, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(demo, "REPORT", tmp_path / "report")
    monkeypatch.setenv("DEMO_EPOCHS", "1")
    monkeypatch.setenv("DEMO_WORKERS", "2")
    assert demo.main() == 2                                   # a run failed: the demo says so in its status
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    progress = [line for line in lines if line.startswith("digits_")]
    assert [line.split()[1] for line in progress] == ["replay", "finetune", "er"]      # DEMO_RUNS' order
    assert "failed:" in progress[1] and "no_such_option" in progress[1]
    assert "1 of 3 runs failed" in out
    for protocol, name in (("digits_b0s2", "replay"), ("digits_online_b0s2", "er")):
        manifest = json.loads((tmp_path / "runs" / protocol / name / "seed0" / "manifest.json").read_text())
        assert manifest["status"] == "complete"
    table = [line for line in lines if line.startswith("│ digits_")]
    assert [row.split("│")[2].strip() for row in table] == ["replay", "er"]
    assert (tmp_path / "report" / "index.html").exists()


def test_demo_reuses_complete_runs_without_starting_workers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_RUNS", RUNS[:1])
    monkeypatch.setattr(demo, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(demo, "REPORT", tmp_path / "report")
    monkeypatch.setenv("DEMO_EPOCHS", "1")
    assert demo.main() == 0
    capsys.readouterr()

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started although every run is complete")

    monkeypatch.setattr(demo, "ProcessPoolExecutor", no_pool)
    assert demo.main() == 0
    assert "reused" in capsys.readouterr().out


def test_demo_workers_default_to_two_and_never_exceed_the_cores(monkeypatch):
    monkeypatch.delenv("DEMO_WORKERS", raising=False)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 16)
    assert demo.workers() == 2
    monkeypatch.setenv("DEMO_WORKERS", "8")
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo.workers() == 2


def test_a_bad_worker_count_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("DEMO_WORKERS", "two")
    assert demo.main() == 2
    out = capsys.readouterr().out
    assert "DEMO_WORKERS='two'" in out and "Traceback" not in out


def test_the_longest_runs_are_submitted_first_and_every_demo_method_has_a_time():
    from cilbench.bench import demo
    order = sorted(range(len(demo.DEMO_RUNS)), key=lambda i: demo._longest_first(demo.DEMO_RUNS[i][1]))
    methods = [demo.DEMO_RUNS[i][1] for i in order]
    times = [demo.EXPECTED_SECONDS.get(m, 10) for m in methods]
    assert times == sorted(times, reverse=True)                 # the longest first, whatever the figures are
    assert methods[0] == max(demo.EXPECTED_SECONDS, key=demo.EXPECTED_SECONDS.get)
    assert methods.index("der") < methods.index("finetune")     # an unlisted method counts as a short run
    assert {"der", "dytox", "foster", "memo"} <= set(demo.EXPECTED_SECONDS)
