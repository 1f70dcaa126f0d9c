"""`cilbench sweep`: grid expansion and validation, the local backend (idempotent, resumable after a kill,
failures reported), --status from the run directories, the Slurm backend through a stub sbatch, and
`cilbench report --sweep`.

Runs are tiny (reduced digits cards, one epoch) but each is a process of its own, so the tests that start
runs through the local backend are few and share their grid."""
from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.errors import UserError
from cilbench.run.lock import RunLock
from cilbench.run.rundir import TIMING_METRICS
from cilbench.sweep import backends, grid, job, launch, state

REPO = Path(__file__).resolve().parent.parent

PYTHON = sys.executable
SWEEPS_DIR = REPO / "protocols" / "sweeps"
# one CPU thread, as the in-process reference runs (tests/conftest.py): float reductions differ with the thread
# count, so runs compared bit for bit must use the same one
CI_GRID = dict(methods=["finetune", "replay"], protocols=["digits_b0s2", "digits_b4s2"], seeds=[0, 1], epochs=1,
               deterministic=True, device="cpu", set={"runtime.threads": 1})


def write_sweep(path: Path, **data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def metrics_of(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}


def job_folders(out: Path) -> list[Path]:
    logs = out / "sweep-logs"
    return sorted(p for p in logs.rglob("*_submitted.pkl")) if logs.exists() else []


# --------------------------------------------------------------------------------------------------------
# Grid expansion and validation

def test_grid_expands_axes_per_method_and_names_each_run(tmp_path):
    spec = grid.SweepSpec(name="t", methods=["finetune", "tsd_fixed"], protocols=["digits_b4s2"], seeds=[0, 1],
                            set={"tsd_fixed.n_extractors": [1, 2], "train.lr": 0.01}, out=str(tmp_path))
    cells = grid.prepare(spec)
    assert len(cells) == 2 + 2 * 2            # the N axis multiplies only tsd_fixed's cells
    finetune = [c for c in cells if c.method == "finetune"]
    assert all(c.overrides == ("train.lr=0.01",) for c in finetune)
    names = sorted({c.run_dir.relative_to(tmp_path).as_posix() for c in cells})
    assert names == ["digits_b4s2/finetune/seed0", "digits_b4s2/finetune/seed1",
                     "digits_b4s2/tsd_fixed+N1/seed0", "digits_b4s2/tsd_fixed+N1/seed1",
                     "digits_b4s2/tsd_fixed+N2/seed0", "digits_b4s2/tsd_fixed+N2/seed1"]


def test_axis_absent_from_run_name_becomes_a_tag(tmp_path):
    spec = grid.SweepSpec(name="t", methods=["finetune"], protocols=["digits_b4s2"], seeds=[0],
                            set={"train.lr": [0.05, 0.1]}, out=str(tmp_path))
    assert sorted(c.run_dir.parent.name for c in grid.prepare(spec)) == ["finetune+lr0.05", "finetune+lr0.1"]


def test_list_valued_option_is_written_as_a_list_of_lists(tmp_path):
    spec = grid.SweepSpec(name="t", methods=["finetune"], protocols=["digits_b4s2"], seeds=[0],
                            set={"augment.mean": [[0.3]]}, out=str(tmp_path))
    (cell,) = grid.prepare(spec)
    assert cell.overrides == ("augment.mean=[0.3]",)


def test_unknown_key_in_sweep_file_is_refused_naming_file_and_key(cli, error_line, tmp_path):
    path = write_sweep(tmp_path / "s.yaml", **CI_GRID, seed=[3])
    result = cli("sweep", path, "--out", tmp_path / "runs")
    assert result.exit_code == 2
    line = error_line(result)
    assert str(path) in line and "'seed'" in line and "seeds" in line


@pytest.mark.parametrize("change, culprit", [
    ({"methods": ["finetune", "nosuch"]}, "unknown method 'nosuch'"),
    ({"protocols": ["digits_b4s2", "nosuch_card"]}, "unknown protocol 'nosuch_card'"),
    ({"set": {"train.lr": [0.05, "fast"]}}, "cell finetune on digits_b0s2, seed 0 (train.lr=fast)"),
    ({"set": {"der.aux_weight": [0.5]}}, "'der'"),
    ({"seeds": []}, "grid is empty"),
    ({"methods": ["er"]}, "online"),          # an online-only method on offline cards
])
def test_bad_grid_is_refused_before_anything_is_submitted(cli, error_line, tmp_path, change, culprit):
    path = write_sweep(tmp_path / "bad.yaml", **{**CI_GRID, **change})
    out = tmp_path / "runs"
    result = cli("sweep", path, "--out", out)
    assert result.exit_code == 2
    line = error_line(result)
    assert culprit in line
    if "set" not in change and "seeds" not in change:
        assert "cell " in line                # the cell is named
    assert not out.exists()                   # nothing submitted, nothing written


def test_grid_parts_take_their_own_protocols_and_options(tmp_path):
    path = write_sweep(tmp_path / "p.yaml", methods=["tsd_grc", "finetune"], seeds=[0], epochs=1, grids=[
        {"protocols": ["digits_b0s2"], "set": {"tsd_grc.n_extractors": 2}},
        {"protocols": ["digits_b4s2"], "set": {"tsd_grc.n_extractors": [3, 4]}, "seeds": [1]}])
    cells = grid.prepare(grid.load_sweep(str(path), out=str(tmp_path)))
    assert sorted(c.run_dir.relative_to(tmp_path).as_posix() for c in cells) == [
        "digits_b0s2/finetune/seed0", "digits_b0s2/tsd_grc+N2/seed0",
        "digits_b4s2/finetune/seed1", "digits_b4s2/tsd_grc+N3/seed1", "digits_b4s2/tsd_grc+N4/seed1"]
    overridden = grid.prepare(grid.load_sweep(str(path), sets=["tsd_grc.n_extractors=[2,5]"], out=str(tmp_path)))
    assert sorted({c.run_dir.parent.name for c in overridden}) == ["finetune", "tsd_grc+N2", "tsd_grc+N5"]
    bad = write_sweep(tmp_path / "bad.yaml", methods=["finetune"], grids=[{"protocol": ["digits_b0s2"]}])
    with pytest.raises(UserError, match=r"bad.yaml: unknown key 'grids\[0\]\.protocol'"):
        grid.expand(grid.load_sweep(str(bad)))


def test_grid_from_the_command_line_matches_the_file(tmp_path):
    path = write_sweep(tmp_path / "s.yaml", **CI_GRID)
    from_file = grid.prepare(grid.load_sweep(str(path), out=str(tmp_path)))
    from_cli = grid.prepare(grid.load_sweep(None, ["finetune", "replay"], ["digits_b0s2", "digits_b4s2"], [0, 1],
                                                epochs=1, deterministic=True, device="cpu", out=str(tmp_path)))
    assert [c.run_dir for c in from_file] == [c.run_dir for c in from_cli]


@pytest.mark.parametrize("path", sorted(SWEEPS_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_files_validate(path, tmp_path):
    spec = grid.load_sweep(str(path), out=str(tmp_path))
    cells = grid.expand(spec)
    assert cells
    grid.validate(spec, cells)


# --------------------------------------------------------------------------------------------------------
# The local backend

def _sweep_process(args: list, cwd: Path = REPO) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # SIGINT back to its default in the child: a test session started in the background by a shell inherits
    # SIGINT ignored, and the Ctrl-C this test sends would then never arrive
    return subprocess.Popen([PYTHON, "-m", "cilbench.cli", "sweep", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_half_done(out: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until one run is complete and another has finished a task but not all of them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        manifests = [json.loads(p.read_text()) for p in out.glob("*/*/seed*/manifest.json")]
        done = sum(m["status"] == "complete" for m in manifests)
        mid = any(m["status"] == "running" and 0 < m["tasks_done"] < m["tasks_total"] for m in manifests)
        if done >= 1 and mid:
            return
        time.sleep(0.03)
    raise AssertionError(f"the sweep never reached a half-done state; output: {proc.communicate()[0]}")


@pytest.fixture(scope="module")
def killed_then_finished(tmp_path_factory):
    """The CI grid run through the local backend, killed (Ctrl-C) part-way, then invoked again to the end."""
    root = tmp_path_factory.mktemp("sweep")
    path = write_sweep(root / "ci.yaml", **CI_GRID)
    out = root / "runs"
    proc = _sweep_process([path, "--out", out, "--jobs", "2", "--no-report"])
    _wait_for_half_done(out, proc)
    os.killpg(proc.pid, signal.SIGINT)                       # a Ctrl-C reaches the whole process group
    killed_output = proc.communicate(timeout=120)[0]
    spec = grid.load_sweep(str(path), out=str(out))
    cells = grid.prepare(spec)
    states_after_kill = {c.run_dir: state.read_state(c.run_dir) for c in cells}
    status_after_kill = state.status_table(spec, cells)
    second = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--jobs", "2"])
    return dict(path=path, out=out, cells=cells, killed_rc=proc.returncode, killed_output=killed_output,
                states_after_kill=states_after_kill, status_after_kill=status_after_kill,
                second_rc=second.exit_code, second_output=second.output)


def test_killed_sweep_continues_to_metrics_equal_to_uninterrupted_runs(killed_then_finished, run_cli, tmp_path):
    k = killed_then_finished
    assert k["killed_rc"] == 130, k["killed_output"]
    after_kill = k["states_after_kill"]
    resumed = [d for d, st in after_kill.items() if st.state == "interrupted" and st.tasks_done > 0]
    assert resumed, k["status_after_kill"]                   # killed in the middle of a run
    assert any(st.state == "complete" for st in after_kill.values())
    assert any(st.state != "complete" for st in after_kill.values())
    assert k["second_rc"] == 0, k["second_output"]
    assert all(state.read_state(c.run_dir).state == "complete" for c in k["cells"])
    # the resumed runs end where uninterrupted ones do
    for cell in k["cells"]:
        if cell.run_dir in resumed:
            ref = tmp_path / "ref"
            assert run_cli(cell.method, cell.protocol, ref, "--seed", str(cell.seed), "--epochs", "1",
                           "--deterministic").exit_code == 0
            assert metrics_of(cell.run_dir) == metrics_of(ref / cell.protocol / cell.method / f"seed{cell.seed}")
    report = k["out"].parent / "report" / "ci" / "index.html"
    assert report.exists() and str(report) in k["second_output"]


def test_second_invocation_of_a_finished_sweep_starts_nothing(killed_then_finished, cli):
    k = killed_then_finished
    before = job_folders(k["out"])
    result = cli("sweep", k["path"], "--out", k["out"], "--no-report")
    assert result.exit_code == 0, result.output
    assert "8 of 8 runs complete, skipped" in result.output and "nothing to start" in result.output
    assert job_folders(k["out"]) == before


def test_a_failing_cell_is_reported_while_the_others_complete(cli, tmp_path):
    path = write_sweep(tmp_path / "f.yaml", methods=["finetune"], protocols=["digits_b4s2"], seeds=[0],
                       set={"train.lr": [0.05, 1.0e+30]}, epochs=1, device="cpu")
    out = tmp_path / "runs"
    result = cli("sweep", path, "--out", out, "--jobs", "2", "--no-report")
    assert result.exit_code == 1
    assert "failed" in result.stderr and "non-finite loss" in result.stderr      # the progress line
    assert "failed: finetune on digits_b4s2, seed 0 (train.lr=1.0e+30): non-finite loss" in result.stdout
    assert "--retry-failed" in result.stdout
    assert state.read_state(out / "digits_b4s2" / "finetune+lr0.05" / "seed0").state == "complete"
    assert state.read_state(out / "digits_b4s2" / "finetune+lr1.0e30" / "seed0").state == "failed"
    again = cli("sweep", path, "--out", out, "--no-report")   # a failed run is left alone without --retry-failed
    assert "nothing to start" in again.output


# --------------------------------------------------------------------------------------------------------
# --status and report --sweep, on runs made in-process

@pytest.fixture(scope="module")
def half_done(tmp_path_factory):
    """A 4-cell sweep: one run complete, one stopped after a task, one failed, one not started; plus a run
    outside the sweep."""
    runner = CliRunner()

    def run_cli(method, protocol, out, *extra):
        args = ["run", "--method", method, "--protocol", protocol, "--out", str(out), "--device", "cpu", "--quiet"]
        return runner.invoke(app, args + list(extra))

    tmp_path = tmp_path_factory.mktemp("half")
    out = tmp_path / "runs"
    path = write_sweep(tmp_path / "half.yaml", methods=["finetune"], protocols=["digits_b4s2"], seeds=[0, 1],
                       set={"train.lr": [0.05, 1.0e+30]}, epochs=1, device="cpu", out=str(out))
    assert run_cli("finetune", "digits_b4s2", out, "--epochs", "1", "--tag", "lr0.05").exit_code == 0
    assert run_cli("finetune", "digits_b4s2", out, "--epochs", "1", "--tag", "lr0.05", "--seed", "1",
                   "--stop-after", "1").exit_code == 0
    assert run_cli("finetune", "digits_b4s2", out, "--epochs", "1", "--tag", "lr1.0e30",
                   "--set", "train.lr=1.0e+30").exit_code == 1
    assert run_cli("replay", "digits_b4s2", out, "--epochs", "1").exit_code == 0        # not in the sweep
    return path, out


def test_status_of_a_half_done_sweep(half_done, cli):
    path, out = half_done
    result = cli("sweep", path, "--status")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "sweep half: 4 runs: 1 complete, 0 running, 1 interrupted, 1 failed, 1 pending"
    rows = {tuple(line.split()[:4]) for line in lines[3:]}
    assert rows == {("digits_b4s2", "finetune+lr0.05", "0", "complete"),
                    ("digits_b4s2", "finetune+lr0.05", "1", "interrupted"),
                    ("digits_b4s2", "finetune+lr1.0e30", "0", "failed"),
                    ("digits_b4s2", "finetune+lr1.0e30", "1", "pending")}
    failed = next(line for line in lines if " failed " in line)
    assert "1/4" not in failed and "non-finite loss" in failed
    interrupted = next(line for line in lines if " interrupted " in line)
    assert " 1/4 " in interrupted


def test_only_unfinished_runs_are_started_and_failed_ones_on_request(half_done):
    path, out = half_done
    spec = grid.load_sweep(str(path))
    cells = grid.prepare(spec)
    names = lambda cs: sorted((c.run_dir.parent.name, c.seed) for c in cs)   # noqa: E731
    start, skipped = launch.to_start(cells, retry_failed=False)
    assert names(start) == [("finetune+lr0.05", 1), ("finetune+lr1.0e30", 1)]     # interrupted, pending
    assert names(skipped["complete"]) == [("finetune+lr0.05", 0)]
    assert names(skipped["failed"]) == [("finetune+lr1.0e30", 0)]
    start, _ = launch.to_start(cells, retry_failed=True)
    assert ("finetune+lr1.0e30", 0) in names(start)


def test_status_reads_a_run_whose_process_died_as_interrupted(half_done, cli):
    path, out = half_done
    manifest_path = out / "digits_b4s2" / "finetune+lr0.05" / "seed1" / "manifest.json"
    original = manifest_path.read_text()
    manifest = json.loads(original)
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    manifest.update(status="running", pid=dead.pid, error=None)
    manifest_path.write_text(json.dumps(manifest))
    dead_state = state.read_state(manifest_path.parent)
    assert dead_state.state == "interrupted" and "gone" in dead_state.reason
    manifest.update(pid=os.getpid())                          # a live pid alone proves nothing (reused)...
    manifest_path.write_text(json.dumps(manifest))
    assert state.read_state(manifest_path.parent).state == "interrupted"
    with RunLock(manifest_path.parent):                       # ...a held lock is a live owner: left alone
        assert state.read_state(manifest_path.parent).state == "running"
    manifest_path.write_text(original)


def test_report_of_a_sweep_shows_only_its_runs(half_done, cli, tmp_path):
    path, out = half_done
    result = cli("report", "--sweep", path, "--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    runs_csv = (tmp_path / "report" / "tables" / "runs.csv").read_text()
    assert "finetune+lr0.05" in runs_csv and "replay" not in runs_csv


# --------------------------------------------------------------------------------------------------------
# The Slurm backend, through a stub sbatch that records what it is given

def _script(path: Path, text: str) -> None:
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)


@pytest.fixture
def stub_sbatch(tmp_path, monkeypatch):
    """sbatch records each job script and answers job 4242; squeue answers every job asked about with the
    state in `<record>/../squeue-state` (none: Slurm does not know the job); sacct knows nothing."""
    bin_dir, record = tmp_path / "bin", tmp_path / "sbatch-record"
    bin_dir.mkdir()
    record.mkdir()
    _script(bin_dir / "sbatch", f'n=$(ls {record} | wc -l)\ncp "$1" {record}/script$n.sh\n'
                                'echo "Submitted batch job 4242"\n')
    _script(bin_dir / "srun", "exit 0\n")   # submitit checks that srun exists
    _script(bin_dir / "squeue", f'state=$(cat {tmp_path}/squeue-state 2>/dev/null)\n'
                                'while [ $# -gt 0 ]; do [ "$1" = "-j" ] && ids=$2; shift; done\n'
                                '[ -z "$state" ] && { echo "slurm_load_jobs error: Invalid job id specified" >&2; '
                                'exit 1; }\n'
                                'for i in $(echo "$ids" | tr , " "); do echo "$i $state"; done\n')
    _script(bin_dir / "sacct", 'echo "Slurm accounting storage is disabled" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def squeue_says(record: Path, state: str | None) -> None:
    path = record.parent / "squeue-state"
    path.write_text(state) if state else path.unlink(missing_ok=True)


def test_slurm_backend_submits_one_job_array_of_resumable_runs(cli, stub_sbatch, tmp_path):
    path = write_sweep(tmp_path / "ci.yaml", **CI_GRID)
    out = tmp_path / "runs"
    result = cli("sweep", path, "--out", out, "--backend", "slurm", "--partition", "gpu", "--device", "auto",
                 "--time", "12:00:00", "--cpus-per-run", "8", "--mem-gb", "32", "--account", "lab",
                 "--sbatch", "qos=high")
    assert result.exit_code == 0, result.output
    assert "job array 4242" in result.output and "--status" in result.output
    (script,) = stub_sbatch.iterdir()                         # one sbatch call: one job array
    text = script.read_text()
    for flag in ("--array=0-7%8", "--partition=gpu", "--gpus-per-node=1", "--time=720", "--cpus-per-task=8",
                 "--mem=32GB", "--account=lab", "--qos=high", "--signal=USR2@90", "--open-mode=append"):
        assert f"#SBATCH {flag}\n" in text, (flag, text)
    assert str(out.resolve() / "sweep-logs" / "ci") in text  # the log folder sits beside the runs
    pickles = sorted((out / "sweep-logs" / "ci").glob("4242_*/4242_*_submitted.pkl"))
    assert len(pickles) == 8
    commands = []
    for p in pickles:
        with open(p, "rb") as fh:
            delayed = pickle.load(fh)
        assert isinstance(delayed.function, job.RunCell)   # checkpointable: requeued on pre-emption
        command, run_dir = delayed.args
        assert command[command.index("--out") + 1] in run_dir     # the job checks that run's state at its end
        commands.append(command)
    for i, command in enumerate(commands):
        assert command[1:4] == ["-m", "cilbench.cli", "run"] and "--resume" in command
        assert f"# array task {i}: cilbench run --method " in text
    assert text.count(" --resume\n") == 8
    assert sorted((c[c.index("--method") + 1], c[c.index("--protocol") + 1], c[c.index("--seed") + 1])
                  for c in commands) == sorted((m, p, str(s)) for p in CI_GRID["protocols"]
                                               for m in CI_GRID["methods"] for s in CI_GRID["seeds"])


def test_preempted_job_stops_its_run_and_requeues_the_same_command():
    """submitit calls `checkpoint` from its USR2 handler, in the thread that waits for the run."""
    cell = job.RunCell()
    command = [PYTHON, "-c", "import time; time.sleep(60)"]
    requeued = {}
    previous = signal.signal(signal.SIGUSR2, lambda *_: requeued.update(job=cell.checkpoint(command)))

    def preempt():
        while cell._child is None:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)

    threading.Thread(target=preempt).start()
    t0 = time.monotonic()
    try:
        code = cell(command)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert code == -signal.SIGTERM and time.monotonic() - t0 < 20    # stopped by SIGTERM, not left to the kill
    again = requeued["job"]
    assert isinstance(again.function, job.RunCell) and again.args == (command,)
    pickle.dumps(again)                                        # submitit pickles it for the requeued job


def test_bad_backend_options_are_refused(cli, error_line, tmp_path):
    path = write_sweep(tmp_path / "ci.yaml", **CI_GRID)
    for args, culprit in ((["--time", "soon"], "--time"), (["--jobs", "3", "--gpus", "0", "--runs-per-gpu", "2"],
                                                            "--jobs 3")):
        result = cli("sweep", path, "--out", tmp_path / "runs", *args)
        assert result.exit_code == 2 and culprit in error_line(result)
    with pytest.raises(UserError):
        backends.parse_time("12h")
    assert backends.parse_time("1-00:30:00") == 1470 and backends.parse_time("90") == 90


def _sbatch_script(record: Path, n: int = 0) -> str:
    return (record / f"script{n}.sh").read_text()


def test_cpu_sweep_asks_for_no_gpu_and_takes_setup_lines_flags_and_file_options(cli, stub_sbatch, tmp_path):
    path = write_sweep(tmp_path / "cpu.yaml", **{**CI_GRID, "set": {}}, slurm={"setup": ["module load python"],
                                                                              "partition": "cpu", "qos": "low"})
    result = cli("sweep", path, "--out", tmp_path / "runs", "--backend", "slurm", "--qos", "normal",
                 "--setup", "source /opt/venv/bin/activate", "--sbatch", "requeue=", "--sbatch", "mail-type=FAIL",
                 "--constraint", "avx2", "--cpus-per-run", "2")
    assert result.exit_code == 0, result.output
    text = _sbatch_script(stub_sbatch)
    assert "--gpus" not in text and "--gres" not in text and "--wckey" not in text
    for line in ("#SBATCH --partition=cpu", "#SBATCH --qos=normal", "#SBATCH --requeue", "#SBATCH --mail-type=FAIL",
                 "#SBATCH --constraint=avx2", "#SBATCH --cpus-per-task=2"):
        assert line + "\n" in text, (line, text)
    assert text.index("module load python") < text.index("source /opt/venv/bin/activate") < text.index("srun ")
    assert text.count("--set runtime.threads=2 ") == 8               # each run's torch threads pinned to its CPUs


def test_sbatch_refusal_is_one_line_naming_the_option_and_leaves_nothing(cli, error_line, stub_sbatch, tmp_path):
    _script(tmp_path / "bin" / "sbatch", 'echo "sbatch: error: invalid partition specified: nosuch" >&2\n'
                                          'echo "sbatch: error: Batch job submission failed: Invalid partition name '
                                          'specified" >&2\nexit 1\n')
    path = write_sweep(tmp_path / "ci.yaml", **CI_GRID)
    out = tmp_path / "runs"
    result = cli("sweep", path, "--out", out, "--backend", "slurm", "--partition", "nosuch")
    assert result.exit_code == 2
    line = error_line(result)
    assert "Invalid partition name" in line and "--partition" in line
    assert not out.exists()                                           # no log folder, pickles or job scripts


def test_resubmission_skips_runs_whose_job_is_still_queued(cli, stub_sbatch, tmp_path):
    path = write_sweep(tmp_path / "ci.yaml", **CI_GRID)
    args = ("sweep", path, "--out", tmp_path / "runs", "--backend", "slurm")
    assert cli(*args).exit_code == 0
    squeue_says(stub_sbatch, "PENDING")
    again = cli(*args)
    assert again.exit_code == 0, again.output
    assert "8 of 8 runs queued or running in Slurm already" in again.output and "nothing to start" in again.output
    assert len(list(stub_sbatch.iterdir())) == 1
    status = cli("sweep", path, "--out", tmp_path / "runs", "--status").stdout
    assert "4242_3" in status and "queued: Slurm job 4242_3 is pending" in status
    squeue_says(stub_sbatch, None)                                    # the jobs ended without starting the runs
    assert "submitted 8 runs" in cli(*args).output and len(list(stub_sbatch.iterdir())) == 2


def test_options_of_the_other_backend_are_refused(cli, error_line, tmp_path):
    path = write_sweep(tmp_path / "ci.yaml", **CI_GRID)
    for args, culprit in ((["--backend", "slurm", "--runs-per-gpu", "2"], "--runs-per-gpu"),
                          (["--backend", "slurm", "--jobs", "2"], "--jobs"),
                          (["--partition", "gpu"], "--partition"), (["--setup", "module load x"], "--setup"),
                          (["--backend", "slurm", "--gpus-per-run", "1"], "--gpus-per-run 1 with device cpu")):
        result = cli("sweep", path, "--out", tmp_path / "runs", *args)
        assert result.exit_code == 2 and culprit in error_line(result), args


def test_job_marks_a_killed_run_failed_and_fails_itself(tmp_path):
    run_dir = tmp_path / "p" / "m" / "seed0"
    run_dir.mkdir(parents=True)
    kill_self = ("import json, os, signal, socket, sys; d = sys.argv[1]; "
                 "json.dump(dict(status='running', pid=os.getpid(), host=socket.gethostname(), tasks_done=1, "
                 "tasks_total=2), open(d + '/manifest.json', 'w')); os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(job.RunNotComplete, match="is failed: its process was killed by SIGKILL"):
        job.RunCell()([PYTHON, "-c", kill_self, str(run_dir)], str(run_dir))
    st = state.read_state(run_dir)
    assert st.state == "failed" and "SIGKILL" in st.reason and "--retry-failed" in st.reason
    assert not (run_dir / ".lock").exists()


def test_run_owned_by_another_host_is_alive_while_its_slurm_job_is(stub_sbatch, tmp_path):
    run_dir = tmp_path / "seed0"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps(dict(status="running", host="node-7", pid=1, tasks_done=1,
                                                           tasks_total=2, slurm_job_id="77_1")))
    squeue_says(stub_sbatch, "RUNNING")
    assert state.read_state(run_dir).state == "running"
    squeue_says(stub_sbatch, "CANCELLED")
    assert state.read_state(run_dir).state == "interrupted"
    squeue_says(stub_sbatch, None)                                    # purged: ended long ago
    st = state.read_state(run_dir)
    assert st.state == "interrupted" and "Slurm job 77_1 ended" in st.reason


def test_cpus_per_run_pins_threads_unless_the_cell_sets_them(tmp_path):
    spec = grid.SweepSpec(name="t", methods=["finetune"], protocols=["digits_b4s2"], seeds=[0],
                          set={"train.lr": [0.05, 0.1]}, out=str(tmp_path))
    plain, _ = grid.prepare(spec)
    assert "runtime.threads=3" in job.run_command(spec, plain, threads=3)
    assert not any("runtime.threads" in a for a in job.run_command(spec, plain))
    spec.set["runtime.threads"] = 1
    pinned, _ = grid.prepare(spec)
    command = job.run_command(spec, pinned, threads=3)
    assert "runtime.threads=1" in command and "runtime.threads=3" not in command


def test_grid_on_the_command_line_gets_its_own_name_and_a_runnable_follow_up(cli, stub_sbatch, tmp_path):
    out = tmp_path / "runs"
    grid_args = ["--methods", "finetune", "--protocols", "digits_b4s2", "--seeds", "0", "--out", str(out)]
    result = cli("sweep", *grid_args, "--epochs", "1", "--device", "cpu", "--backend", "slurm")
    assert result.exit_code == 0, result.output
    assert "submitted 1 run as Slurm job 4242;" in result.output
    (folder,) = (out / "sweep-logs").iterdir()
    assert folder.name.startswith("grid-")
    follow_up = result.output.split("follow it with: ")[1].strip()
    assert follow_up == shlex.join(["cilbench", "sweep", *grid_args, "--status"])
    status = cli(*shlex.split(follow_up)[1:])
    assert status.exit_code == 0 and status.stdout.startswith(f"sweep {folder.name}: 1 runs"), status.output


def test_skip_invalid_skips_and_lists_the_cells_that_do_not_validate(cli, tmp_path):
    cells_grid = {"methods": ["er", "finetune"], "protocols": ["digits_b0s2", "digits_online_b0s2"], "seeds": [0]}
    path = write_sweep(tmp_path / "mixed.yaml", **cells_grid, skip_invalid=True)
    spec = grid.load_sweep(str(path), out=str(tmp_path / "runs"))
    cells = grid.prepare(spec)
    assert sorted((c.method, c.protocol) for c in cells) == [
        ("er", "digits_online_b0s2"), ("finetune", "digits_b0s2"), ("finetune", "digits_online_b0s2")]
    assert [label for label, _ in spec.skipped] == ["er on digits_b0s2, seed 0"]
    assert "online" in spec.skipped[0][1]
    plain = write_sweep(tmp_path / "plain.yaml", **cells_grid)
    result = cli("sweep", plain, "--out", tmp_path / "runs", "--status", "--skip-invalid")
    assert result.exit_code == 0, result.output
    assert "skipped (invalid): er on digits_b0s2, seed 0" in result.stderr
    assert cli("sweep", plain, "--out", tmp_path / "runs", "--status").exit_code == 2
