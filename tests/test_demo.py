"""`make demo` (cilbench/bench/demo.py): runs in worker processes, output in DEMO_RUNS' order, one failing run
reported while the others finish."""
from __future__ import annotations

import io
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


def test_the_longest_runs_are_submitted_first_and_every_demo_method_has_a_time(tmp_path, monkeypatch):
    """What the demo hands to its workers, in order: the longest expected runs first (an unlisted method counts
    as a short run), so the two workers finish together."""
    from concurrent.futures import Future
    submitted = []

    class Recorder:                                  # stands in for the process pool: records, runs nothing
        def __init__(self, *args, **kwargs):
            pass

        def submit(self, fn, protocol, method, overrides, out, epochs):
            submitted.append(method)
            done = Future()
            done.set_result(("error", "not run", 0.0))
            return done

        def shutdown(self, **kwargs):
            pass
    monkeypatch.setattr(demo, "ProcessPoolExecutor", Recorder)
    monkeypatch.setattr(demo, "RUNS", tmp_path / "runs")
    rows, failed = demo._run_all(demo.Console(file=io.StringIO()), True, None)
    assert failed == len(demo.DEMO_RUNS) == len(submitted) and not rows
    times = [demo.EXPECTED_SECONDS.get(m, 10) for m in submitted]
    assert times == sorted(times, reverse=True)
    assert submitted[0] == max(demo.EXPECTED_SECONDS, key=demo.EXPECTED_SECONDS.get)
    assert submitted.index("der") < submitted.index("finetune")
    assert {"der", "dytox", "foster", "memo"} <= set(demo.EXPECTED_SECONDS)
