"""Reliability round 3 (issue 22): nothing written through links, resume only into its own run, bounded
inputs, float notations, and liveness judged by the lock. Each test reproduces one probe that got through."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.config import build
from cilbench.data.protocol import PROTOCOL_DIR, build_protocol
from cilbench.errors import UserError
from cilbench.run.lock import RunLock, lock_owner
from cilbench.run.runner import RunRequest, resolve
from cilbench.safeio import append_line, atomic_write, safe_yaml_load
from cilbench.sweep import backends, grid
from cilbench.sweep import state as sweep_state

REPO = Path(__file__).resolve().parent.parent
VICTIM_TEXT = "a user's file outside --out"


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def _run(out: Path, *extra):
    return _invoke("run", "--method", "replay", "--protocol", "digits_b0s2", "--out", out, "--device", "cpu",
                   "--quiet", "--epochs", "1", *extra)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """replay on digits_b0s2 stopped after its first task, seeds 0 and 1 (resumable); copy before use."""
    out = tmp_path_factory.mktemp("stopped")
    for seed in ("0", "1"):
        assert _run(out, "--stop-after", "1", "--seed", seed).exit_code == 0
    return out / "digits_b0s2" / "replay"


def _copy_run(stopped: Path, tmp_path: Path, seed: int = 0) -> tuple[Path, Path]:
    out = tmp_path / "runs"
    run = out / "digits_b0s2" / "replay" / f"seed{seed}"
    shutil.copytree(stopped / f"seed{seed}", run)
    return out, run


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "home" / "notes.txt"
    victim.parent.mkdir(exist_ok=True)
    victim.write_text(VICTIM_TEXT)
    return victim


# --- 1. links planted in a run directory, a report folder, sweep logs -------------------------------------------

PLANTED = [".lock", ".manifest.json.tmp", "manifest.json", "events.jsonl", "checkpoint.pt", "steps.csv"]


@pytest.mark.parametrize("name", PLANTED)
@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_links_planted_in_a_run_directory_are_refused(tmp_path, stopped, error_line, name, kind):
    out, run = _copy_run(stopped, tmp_path)
    victim = _victim(tmp_path)
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim) if kind == "symlink" else os.link(victim, run / name)
    res = _run(out, "--resume")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert str(run / name) in line and "link" in line
    assert victim.read_text() == VICTIM_TEXT and not (run / "metrics.json").exists()


def test_a_lock_link_in_a_new_run_directory_is_refused(tmp_path, error_line):
    out = tmp_path / "runs"
    run = out / "digits_b0s2" / "replay" / "seed0"
    run.mkdir(parents=True)
    victim = _victim(tmp_path)
    (run / ".lock").symlink_to(victim)
    res = _run(out, "--stop-after", "1")
    assert res.exit_code == 2, res.output
    assert str(run / ".lock") in error_line(res)
    assert victim.read_text() == VICTIM_TEXT


def test_a_fifo_in_a_run_directory_is_refused(tmp_path, stopped, error_line):
    out, run = _copy_run(stopped, tmp_path)
    (run / "events.jsonl").unlink()
    os.mkfifo(run / "events.jsonl")
    res = _run(out, "--resume")
    assert res.exit_code == 2, res.output
    assert str(run / "events.jsonl") in error_line(res)


def test_writers_never_follow_a_link(tmp_path):
    victim = _victim(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(UserError, match="link"):
        append_line(link, "x")
    atomic_write(link, "replaced")                 # the link itself is replaced, its target never written
    assert victim.read_text() == VICTIM_TEXT and not link.is_symlink() and link.read_text() == "replaced"
    (tmp_path / "sub").symlink_to(victim.parent)
    with pytest.raises(UserError, match="link"):
        atomic_write(tmp_path / "sub" / "x.txt", "through a linked folder", root=tmp_path)
    assert not (victim.parent / "x.txt").exists()


def _report(runs: Path, out: Path):
    # one process: the tests below patch the figure functions with lambdas, which a worker could not receive
    return _invoke("report", "--runs", runs, "--out", out, "--metric", "avg", "--workers", "1")


@pytest.fixture(scope="module")
def report_runs(stopped):
    return stopped.parent.parent


def test_report_never_writes_through_a_linked_subfolder(tmp_path, report_runs, error_line, monkeypatch):
    monkeypatch.setattr("cilbench.report.build.protocol_plots", lambda *a, **k: [])   # tables suffice here
    monkeypatch.setattr("cilbench.report.build._training_jobs", lambda *a, **k: [])
    out = tmp_path / "report"
    assert _report(report_runs, out).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(out / "tables")
    (out / "tables").symlink_to(elsewhere)
    res = _report(report_runs, out)
    assert res.exit_code == 2, res.output
    assert "tables" in error_line(res) and "link" in error_line(res)
    assert list(elsewhere.iterdir()) == []


def test_report_out_with_dotdot_is_resolved_before_the_guard(tmp_path, report_runs, error_line):
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "index.html").write_text("my own page")
    res = _report(report_runs, f"{user}/missing/..")
    assert res.exit_code == 2, res.output
    assert "not empty" in error_line(res)
    assert sorted(p.name for p in user.iterdir()) == ["index.html"]
    assert (user / "index.html").read_text() == "my own page"


def test_sweep_log_folder_with_a_link_is_refused(tmp_path, error_line):
    spec = grid.load_sweep(None, methods=["replay"], protocols=["digits_b0s2"], seeds=[0], out=str(tmp_path))
    logs = grid.log_folder(spec)
    logs.mkdir(parents=True)
    victim = _victim(tmp_path)
    (logs / "controllers.err").symlink_to(victim)
    with pytest.raises(UserError, match="controllers.err"):
        backends.make_executor(backends.Backend("local"), spec)
    assert victim.read_text() == VICTIM_TEXT


# --- 3. a checkpoint of another run ---------------------------------------------------------------------------

def test_a_checkpoint_of_another_run_is_refused_on_resume(tmp_path, stopped, error_line):
    out, run = _copy_run(stopped, tmp_path)
    shutil.copy(stopped / "seed1" / "checkpoint.pt", run / "checkpoint.pt")     # same method, another seed
    res = _run(out, "--resume")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert str(run / "checkpoint.pt") in line and "another run" in line
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize("next_task", [99, 0, -3, 2])
def test_a_checkpoint_at_the_wrong_task_is_refused(tmp_path, stopped, error_line, next_task):
    out, run = _copy_run(stopped, tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["next_task"] = next_task
    torch.save(state, run / "checkpoint.pt")
    res = _run(out, "--resume")
    assert res.exit_code == 2, res.output
    assert str(run / "checkpoint.pt") in error_line(res)
    assert not (run / "metrics.json").exists()


def test_the_identity_is_recorded_in_checkpoint_and_manifest(stopped):
    state = torch.load(stopped / "seed0" / "checkpoint.pt", weights_only=True)
    manifest = json.loads((stopped / "seed0" / "manifest.json").read_text())
    assert state["identity"]["protocol"] == "digits_b0s2" and state["identity"]["seed"] == 0
    assert state["identity"]["method"] == "replay" and len(state["identity"]["config_sha256"]) == 64
    assert {k: v for k, v in state["identity"].items() if k != "task"} == manifest["identity"]
    assert state["identity"]["task"] == 1


# --- 4. a card that is not a regular file ---------------------------------------------------------------------

def test_a_device_or_fifo_as_a_card_is_refused(tmp_path, error_line):
    fifo = tmp_path / "card.yaml"
    os.mkfifo(fifo)
    for card in ("/dev/zero", fifo):
        with pytest.raises(UserError, match="not a regular file"):
            safe_yaml_load(card)
        res = _run(tmp_path / "runs", "--protocol", card)
        assert res.exit_code == 2, res.output
        assert str(card) in error_line(res) and "regular file" in error_line(res)


# --- 5. bounds on typed options --------------------------------------------------------------------------------

HUGE = [("runtime.threads=100000", "runtime.threads"), ("runtime.inference_batch=100000000", "inference_batch"),
        ("runtime.max_epochs=100000000", "max_epochs"), ("backbone.width=100000000", "backbone.width"),
        ("train.momentum=2.0", "train.momentum"), ("augment.jitter_p=3", "augment.jitter_p"),
        ("augment.hue=0.9", "augment.hue"), ("train.batch_size=10000000000", "train.batch_size"),
        ("augment.random_resized_crop=100000", "random_resized_crop"),
        ("augment.crop_padding=100000", "crop_padding")]


@pytest.mark.parametrize("override, key", HUGE, ids=[o for o, _ in HUGE])
def test_out_of_range_options_are_refused(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        resolve(RunRequest(method="replay", protocol="digits_b0s2", overrides=[override], device="cpu"))


def test_huge_thread_count_is_one_line(tmp_path, error_line):
    res = _run(tmp_path / "runs", "--set", "runtime.threads=100000")
    assert res.exit_code == 2, res.output
    assert "runtime.threads" in error_line(res)
    assert not (tmp_path / "runs").exists()


# --- 6. float notations ------------------------------------------------------------------------------------------

NOTATIONS = {"1e-3": 1e-3, "1E-3": 1e-3, ".5": 0.5, "5.": 5.0, "1.5e3": 1500.0, "+2e-4": 2e-4, "3": 3.0}


@pytest.mark.parametrize("text", list(NOTATIONS))
def test_float_keys_take_every_ordinary_notation(tmp_path, text):
    resolved = resolve(RunRequest(method="replay", protocol="digits_b0s2", overrides=[f"train.lr={text}"]))
    assert resolved.protocol.train.lr == NOTATIONS[text]
    card = yaml.safe_load((PROTOCOL_DIR / "digits_b0s2.yaml").read_text())
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card).replace("lr: 0.05", f"lr: {text}"))
    assert build_protocol(safe_yaml_load(path), str(path)).train.lr == NOTATIONS[text]


@pytest.mark.parametrize("text", ["1e-3x", "e3", "0x10", "nan", "1_000.5"])
def test_strings_that_are_not_numbers_stay_refused(text):
    from cilbench.data.protocol import TrainConfig
    with pytest.raises(UserError, match="train.lr"):
        build(TrainConfig, {"lr": text}, "--set", prefix="train.")


# --- 7. liveness by the lock ----------------------------------------------------------------------------------

def _holder(run: Path, env: dict | None = None) -> subprocess.Popen:
    code = ("import sys, time; from pathlib import Path; from cilbench.run.lock import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_owner_names_host_pid_and_slurm_job_and_dies_with_the_process(tmp_path):
    run = tmp_path / "run"
    holder = _holder(run, {"SLURM_JOB_ID": "4242"})
    try:
        owner = lock_owner(run)
        assert (owner.host, owner.pid, owner.slurm_job, owner.alive) == (socket.gethostname(), holder.pid,
                                                                           "4242", True)
    finally:
        holder.kill()
        holder.wait()
    owner = lock_owner(run)                       # the lock file stays, the lock went with the process
    assert owner.pid == holder.pid and owner.alive is False
    assert lock_owner(tmp_path / "never-run") is None


def _running_manifest(run: Path, **fields) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / "manifest.json").write_text(json.dumps({"status": "running", "tasks_done": 1, "tasks_total": 5,
                                                    "host": socket.gethostname(), "pid": os.getpid(), **fields}))


def test_a_reused_pid_does_not_keep_a_run_running(tmp_path):
    run = tmp_path / "run"
    _running_manifest(run)                        # the pid is alive (this test), but nobody holds the lock
    (run / ".lock").write_text(f"{os.getpid()}\nhost={socket.gethostname()}\n")
    state = sweep_state.read_state(run)
    assert state.state == "interrupted" and state.orphaned
    with RunLock(run):                            # a held lock is a live run
        assert sweep_state.read_state(run).state == "running"


def test_a_run_on_another_host_is_not_trusted_by_pid(tmp_path):
    run = tmp_path / "run"
    _running_manifest(run, host="node-elsewhere")
    (run / ".lock").write_text(f"{os.getpid()}\nhost=node-elsewhere\nslurm_job=77\n")
    owner = lock_owner(run)
    assert (owner.host, owner.slurm_job, owner.alive) == ("node-elsewhere", "77", None)   # ask the scheduler
    state = sweep_state.read_state(run)
    assert "node-elsewhere" in state.reason
