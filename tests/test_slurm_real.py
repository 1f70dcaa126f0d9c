"""`cilbench sweep --backend slurm` against a real Slurm: a one-node cluster started by `make test-slurm`
(.ci/slurm/), never by `make test`, where these tests are skipped.

One tiny sweep (3 runs on the digits card, one epoch): submitted, submitted again while queued (nothing
new), one run cancelled part-way with scancel, submitted again (only that run, which resumes), a failing cell
that Slurm reports FAILED, metrics of the resumed run equal to an uninterrupted run's, and `report --sweep`.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.run.rundir import TIMING_METRICS
from cilbench.sweep import grid, slurm, state

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.environ.get("CILBENCH_SLURM_TEST") != "1" or not shutil.which("sbatch"),
                                reason="needs a real Slurm: run by `make test-slurm`")

SWEEP = dict(description="real-Slurm CI sweep", protocols=["digits_b0s2"], epochs=1, deterministic=True,
             device="cpu", set={"runtime.threads": 1},
             grids=[{"methods": ["finetune"], "seeds": [0, 1]},
                    {"methods": ["replay"], "seeds": [0], "set": {"train.lr": 1.0e+30}}])   # diverges: fails
SLURM_ARGS = ["--backend", "slurm", "--cpus-per-run", "1", "--mem-gb", "1", "--time", "10"]


def sweep(path: Path, *args: str):
    return CliRunner().invoke(app, ["sweep", str(path), *args], catch_exceptions=False)


def manifests(out: Path) -> dict[Path, dict]:
    found = {}
    for p in out.glob("*/*/seed*/manifest.json"):
        try:
            found[p.parent] = json.loads(p.read_text())
        except ValueError:    # being replaced right now
            pass
    return found


def wait_for(condition, what: str, timeout: float = 150, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}; squeue: {subprocess.getoutput('squeue')}")


def jobs_of(spec, cells) -> dict[Path, str]:
    record = slurm.JobRecord(grid.log_folder(spec))
    return {c.run_dir: record.get(c.run_dir).get("job_id") for c in cells}


def all_ended(spec, cells) -> bool:
    states = slurm.job_states(set(jobs_of(spec, cells).values()) - {None})
    return bool(states) and not any(slurm.is_active(s) for s in states.values())


def metrics_of(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


@pytest.fixture(scope="module")
def sweep_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    path = root / "ci_slurm.yaml"
    path.write_text(yaml.safe_dump({**SWEEP, "out": str(root / "runs")}, sort_keys=False))
    os.environ["PYTHONPATH"] = str(REPO)   # the jobs unpickle cilbench's job callable: this checkout's
    return path


def test_sweep_on_a_real_slurm(sweep_file, tmp_path):
    spec = grid.load_sweep(str(sweep_file))
    cells = grid.prepare(spec)
    out = Path(spec.out)
    first = sweep(sweep_file, *SLURM_ARGS)
    assert first.exit_code == 0 and "submitted 3 runs as Slurm job array" in first.output, first.output

    # submitted again while queued or running: nothing new
    again = sweep(sweep_file, *SLURM_ARGS)
    assert "nothing to start" in again.output and "not submitted again" in again.output, again.output
    assert len(list(grid.log_folder(spec).glob("array-*.txt"))) == 1

    # scancel a run part-way through
    def running_midway():
        return next((d for d, m in manifests(out).items() if m["status"] == "running"
                     and 0 < m["tasks_done"] < m["tasks_total"] - 1 and m.get("slurm_job_id")), None)
    victim = wait_for(running_midway, "a run part-way through")
    job = manifests(out)[victim]["slurm_job_id"]
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not slurm.is_active(slurm.job_states({job})[job]), f"job {job} to end")
    cancelled = state.read_state(victim)
    assert cancelled.state == "interrupted" and 0 < cancelled.tasks_done < cancelled.tasks_total, cancelled

    # submitted again: only the cancelled run (the others' jobs are still queued or running), which resumes
    resumed = sweep(sweep_file, *SLURM_ARGS)
    assert "submitted 1 run as Slurm job" in resumed.output, resumed.output
    wait_for(lambda: all_ended(spec, cells), "every job to end", every=0.5)

    status = sweep(sweep_file, "--status").output
    by_dir = {c.run_dir: state.read_state(c.run_dir) for c in cells}
    failing = next(c for c in cells if c.method == "replay")
    assert by_dir[failing.run_dir].state == "failed" and "non-finite" in by_dir[failing.run_dir].reason, status
    assert all(st.state == "complete" for d, st in by_dir.items() if d != failing.run_dir), status
    failed_job = jobs_of(spec, cells)[failing.run_dir]
    assert slurm.job_states({failed_job})[failed_job] == "FAILED"        # Slurm itself sees the failure
    assert failed_job in status and "log " in status

    # the resumed run ends where an uninterrupted one does
    ref = tmp_path / "ref"
    cell = next(c for c in cells if c.run_dir == victim)
    uninterrupted = CliRunner().invoke(app, ["run", "--method", cell.method, "--protocol", cell.protocol, "--seed",
                                             str(cell.seed), "--out", str(ref), "--epochs", "1", "--deterministic",
                                             "--device", "cpu", "--quiet", "--set", "runtime.threads=1"])
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert metrics_of(victim) == metrics_of(ref / cell.protocol / cell.method / f"seed{cell.seed}")

    report = CliRunner().invoke(app, ["report", "--sweep", str(sweep_file), "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    runs_csv = (tmp_path / "report" / "tables" / "runs.csv").read_text()
    assert "finetune" in runs_csv
