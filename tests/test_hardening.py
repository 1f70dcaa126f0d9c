"""A careful or hostile user's inputs (issue 14): data files never run code, nothing is written or removed
outside --out, one process per run directory, bounded YAML, divergence and SIGTERM end the run cleanly,
damaged run files and out-of-range values get one line and exit 2."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.data.protocol import PROTOCOL_DIR
from cilbench.errors import UserError
from cilbench.run.rundir import TIMING_METRICS
from cilbench.safeio import safe_yaml_load

REPO = Path(__file__).resolve().parent.parent


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _card(tmp_path: Path, name: str = "digits_custom", base: str = "digits_b0s2", **changes) -> Path:
    card = yaml.safe_load((PROTOCOL_DIR / f"{base}.yaml").read_text())
    card.update(name=name, **changes)
    path = tmp_path / "cards" / "card.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(card))
    return path


# --- 1. a crafted CIFAR pickle never runs ----------------------------------------------------------------

class _Payload:
    """Unpickling this calls open(marker, 'w'): the file exists afterwards if the code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_crafted_cifar_pickle_never_runs(tmp_path, run_cli, error_line, nothing_complete):
    marker = tmp_path / "pwned"
    folder = tmp_path / "data" / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = [0, 1, 2, 3]
    honest = {"data": np.zeros((4, 3072), np.uint8), "fine_labels": labels, "coarse_labels": [0] * 4}
    (folder / "test").write_bytes(pickle.dumps(honest))
    (folder / "train").write_bytes(pickle.dumps({**honest, "filenames": [_Payload(marker)]}))
    card = _card(tmp_path, name="cifar_evil", dataset="cifar100", num_classes=4, tasks=2, class_order="natural",
                 backbone={"name": "resnet20", "width": 4},
                 augment={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
                 data={"verify_checksums": False})   # a shared card may switch the md5 check off
    out = tmp_path / "runs"
    res = run_cli("replay", card, out, "--data-root", tmp_path / "data", "--epochs", "1")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert str(folder / "train") in line and "refused" in line
    assert not marker.exists()
    assert nothing_complete(out)


# --- 2. names that would leave --out ---------------------------------------------------------------------

@pytest.mark.parametrize("how, value", [
    ("tag", "../../escaped"), ("tag", "<tmp>/escaped_abs"), ("tag", ".."), ("tag", "a/b"),
    ("name", "../../escaped"), ("name", "<tmp>/escaped_abs"), ("name", "."),
])
def test_names_that_escape_out_are_refused(tmp_path, run_cli, error_line, how, value):
    value = value.replace("<tmp>", str(tmp_path))     # an absolute path
    out = tmp_path / "a" / "b" / "runs"
    if how == "tag":
        res = run_cli("replay", "digits_b0s2", out, "--tag", value, "--epochs", "1", "--force")
    else:
        res = run_cli("replay", _card(tmp_path, name=value), out, "--epochs", "1", "--force")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert repr(value) in line and "folder" in line
    assert not any(p.name in ("escaped", "escaped_abs") for p in _files_under(tmp_path))
    assert not out.exists()


def test_force_never_removes_outside_out(tmp_path, run_cli, error_line):
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    out = tmp_path / "runs"
    (out / "digits_b0s2" / "replay").mkdir(parents=True)
    (out / "digits_b0s2" / "replay" / "seed0").symlink_to(victim)     # a run directory linked elsewhere
    res = run_cli("replay", "digits_b0s2", out, "--force", "--epochs", "1")
    assert res.exit_code == 2, res.output
    assert "outside --out" in error_line(res)
    assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"]   # not even a lock file written there


# --- 4. one process per run directory ------------------------------------------------------------------------

def test_second_process_on_a_locked_run_is_refused(tmp_path, run_cli, error_line):
    out = tmp_path / "runs"
    run = out / "digits_b0s2" / "replay" / "seed0"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from cilbench.run.lock import RunLock; "
         "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)", str(run)],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--force"], ["--resume"]):
            res = run_cli("replay", "digits_b0s2", out, "--epochs", "1", *extra)
            assert res.exit_code == 2, res.output
            line = error_line(res)
            assert "in use by process" in line and str(holder.pid) in line
        assert [p.name for p in run.iterdir()] == [".lock"]     # the second process wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock file is stale and the next run takes it over
    assert (run / ".lock").read_text().splitlines()[0] == str(holder.pid)   # pid first, then host
    res = run_cli("replay", "digits_b0s2", out, "--epochs", "1", "--stop-after", "1")
    assert res.exit_code == 0, res.output
    assert not (run / ".lock").exists()                           # released at the end
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"


# --- 5. YAML alias bombs ----------------------------------------------------------------------------------

def _alias_bomb(levels: int = 8) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bombs_are_refused_quickly(tmp_path, run_cli, error_line):
    card = tmp_path / "bomb.yaml"
    card.write_text((PROTOCOL_DIR / "digits_b0s2.yaml").read_text() + _alias_bomb())
    start = time.perf_counter()
    with pytest.raises(UserError, match="alias"):
        safe_yaml_load(card)
    assert time.perf_counter() - start < 1.0
    res = run_cli("replay", card, tmp_path / "runs")
    assert res.exit_code == 2
    assert "bomb.yaml" in error_line(res) and "alias" in error_line(res)

    recursive = tmp_path / "loop.yaml"
    recursive.write_text("a: &a [1, *a]\n")
    with pytest.raises(UserError, match="refers to itself"):
        safe_yaml_load(recursive)

    # a run's config.yaml is read through the same bound on --resume
    out = tmp_path / "runs"
    assert run_cli("replay", "digits_b0s2", out, "--epochs", "1", "--stop-after", "1").exit_code == 0
    config = out / "digits_b0s2" / "replay" / "seed0" / "config.yaml"
    config.write_text(config.read_text() + _alias_bomb())
    start = time.perf_counter()
    res = run_cli("replay", "digits_b0s2", out, "--epochs", "1", "--resume")
    assert time.perf_counter() - start < 10     # (most of it is importing and resolving, not YAML)
    assert res.exit_code == 2
    assert "config.yaml" in error_line(res) and "alias" in error_line(res)


# --- 6. a finite but exploding loss ----------------------------------------------------------------------

def test_exploding_loss_fails_the_run(tmp_path, run_cli, monkeypatch, nothing_complete):
    from cilbench.methods.baselines import Replay

    original = Replay.loss

    def loss(self, batch):
        value = original(self, batch)
        if self.head.out_features > 2 and batch.epoch == 1:    # task 2, second epoch: the value explodes
            return value + value.detach() * 1e27                # (gradients unchanged, so no NaN first)
        return value

    monkeypatch.setattr(Replay, "loss", loss)
    res = run_cli("replay", "digits_b0s2", tmp_path / "on")
    assert res.exit_code == 1, res.output
    assert "loss diverged in task 2, epoch 2" in res.stderr
    manifest = json.loads((tmp_path / "on" / "digits_b0s2" / "replay" / "seed0" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "task 2, epoch 2" in manifest["error"]
    assert manifest["tasks_done"] == 1
    assert nothing_complete(tmp_path / "on")

    # the check can be turned off
    res = run_cli("replay", "digits_b0s2", tmp_path / "off", "--set", "runtime.divergence_factor=0",
                  "--stop-after", "2")
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "off" / "digits_b0s2" / "replay" / "seed0" / "manifest.json").read_text())
    assert manifest["tasks_done"] == 2 and manifest["error"].startswith("stopped after task 2")


# --- 7. SIGTERM ---------------------------------------------------------------------------------------------

def test_sigterm_leaves_a_resumable_run_equal_to_an_uninterrupted_one(tmp_path, run_cli, monkeypatch):
    from cilbench.methods.baselines import Replay

    common = ("--deterministic", "--epochs", "1")
    full_out, split_out = tmp_path / "full", tmp_path / "split"
    assert run_cli("replay", "digits_b0s2", full_out, *common).exit_code == 0

    original = Replay.learn

    def preempted(self, task, ctx):
        if task.index == 2:
            os.kill(os.getpid(), signal.SIGTERM)     # the scheduler pre-empts the job in task 3
        return original(self, task, ctx)

    monkeypatch.setattr(Replay, "learn", preempted)
    handler_before = signal.getsignal(signal.SIGTERM)
    res = run_cli("replay", "digits_b0s2", split_out, *common)
    assert res.exit_code == 143, res.output
    assert "SIGTERM" in res.stderr and "--resume" in res.stderr
    assert signal.getsignal(signal.SIGTERM) == handler_before   # the previous handler is back
    split = split_out / "digits_b0s2" / "replay" / "seed0"
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["tasks_done"] == 2
    assert not (split / ".lock").exists()

    monkeypatch.setattr(Replay, "learn", original)
    assert run_cli("replay", "digits_b0s2", split_out, *common, "--resume").exit_code == 0
    full = full_out / "digits_b0s2" / "replay" / "seed0"
    drop = set(TIMING_METRICS)
    m_full, m_split = (json.loads((d / "metrics.json").read_text()) for d in (full, split))
    assert {k: v for k, v in m_full.items() if k not in drop} == {k: v for k, v in m_split.items() if k not in drop}
    assert (full / "acc_matrix.csv").read_text() == (split / "acc_matrix.csv").read_text()
    assert json.loads((split / "manifest.json").read_text())["status"] == "complete"


# --- 9. damaged run files -------------------------------------------------------------------------------------

def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def _stopped_run(out: Path, method: str) -> Path:
    res = _invoke("run", "--method", method, "--protocol", "digits_b0s2", "--out", out, "--device", "cpu",
                  "--quiet", "--epochs", "1", "--stop-after", "1", "--tag", "t")
    assert res.exit_code == 0, res.output
    return out / "digits_b0s2" / f"{method}+t" / "seed0"


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """A replay run and a finetune run, each stopped after its first task (resumable)."""
    out = tmp_path_factory.mktemp("stopped")
    return _stopped_run(out, "replay"), _stopped_run(out, "finetune")


def _damage(run: Path, other: Path, kind: str) -> str:
    """Break one file of `run`; returns the file name the error must name."""
    ckpt = run / "checkpoint.pt"
    if kind == "empty checkpoint":
        ckpt.write_bytes(b"")
    elif kind == "truncated checkpoint":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif kind == "checkpoint of another method":
        shutil.copy(other / "checkpoint.pt", ckpt)
    elif kind == "missing checkpoint":
        ckpt.unlink()
    elif kind == "truncated manifest":
        text = (run / "manifest.json").read_text()
        (run / "manifest.json").write_text(text[: len(text) // 2])
        return "manifest.json"
    elif kind == "binary config":
        (run / "config.yaml").write_bytes(bytes(range(256)) * 4)
        return "config.yaml"
    return "checkpoint.pt"


DAMAGES = ["empty checkpoint", "truncated checkpoint", "checkpoint of another method", "missing checkpoint",
           "truncated manifest", "binary config"]


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_run_files_get_one_line(tmp_path, stopped_runs, error_line, kind):
    replay, finetune = stopped_runs
    out = tmp_path / "runs"
    run = out / "digits_b0s2" / "replay+t" / "seed0"
    shutil.copytree(replay, run)
    name = _damage(run, finetune, kind)
    res = _invoke("run", "--method", "replay", "--protocol", "digits_b0s2", "--out", out, "--device", "cpu",
                  "--quiet", "--epochs", "1", "--tag", "t", "--resume")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert str(run / name) in line and "--force" in line
    assert "weights_only" not in res.output
    assert not (run / "metrics.json").exists()


def test_torn_last_event_line_is_dropped_on_resume(tmp_path, stopped_runs):
    replay, _ = stopped_runs
    out = tmp_path / "runs"
    run = out / "digits_b0s2" / "replay+t" / "seed0"
    shutil.copytree(replay, run)
    with open(run / "events.jsonl", "a") as fh:
        fh.write('{"task": 1, "phase": "tr')                       # killed mid-write
    res = _invoke("run", "--method", "replay", "--protocol", "digits_b0s2", "--out", out, "--device", "cpu",
                  "--quiet", "--epochs", "1", "--tag", "t", "--resume")
    assert res.exit_code == 0, res.output
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["task"] for e in events] == [0, 1, 2, 3, 4]


def test_out_that_is_a_file_and_a_card_that_is_not_utf8(tmp_path, run_cli, error_line):
    target = tmp_path / "results.txt"
    target.write_text("not a folder")
    res = run_cli("replay", "digits_b0s2", target)
    assert res.exit_code == 2
    assert "--out" in error_line(res) and "is a file" in error_line(res)
    assert target.read_text() == "not a folder"

    card = tmp_path / "latin1.yaml"
    card.write_bytes((PROTOCOL_DIR / "digits_b0s2.yaml").read_bytes() + "description: 'caf\u00e9'\n".encode("latin-1"))
    res = run_cli("replay", card, tmp_path / "runs")
    assert res.exit_code == 2
    assert "latin1.yaml" in error_line(res) and "UTF-8" in error_line(res)


# --- 10. values out of range -------------------------------------------------------------------------------

BAD_VALUES = [
    ("digits_b0s2", ["--set", "memory.total=-5"], "memory.total"),
    ("digits_b0s2", ["--set", "eval_batch_size=0"], "eval_batch_size"),
    ("digits_b0s2", ["--set", "backbone.width=-1"], "backbone.width"),
    ("digits_b0s2", ["--set", "class_order=seed99999999999"], "class_order"),
    ("synthetic_b0s2", ["--set", "data.synthetic.seed=-1"], "data.synthetic.seed"),
    ("digits_b0s2", ["--seed", "100000000000000000000"], "--seed"),
    ("digits_b0s2", ["--seed", "1e20"], "--seed"),
    ("digits_b0s2", ["--set", "train.lr=.nan"], "train.lr"),
    ("digits_b0s2", ["--set", "train.momentum=-.inf"], "train.momentum"),
    ("digits_b0s2", ["--set", "runtime.divergence_factor=-1"], "runtime.divergence_factor"),
]


@pytest.mark.parametrize("protocol, extra, key", BAD_VALUES, ids=[" ".join(e) for _, e, _ in BAD_VALUES])
def test_out_of_range_values_are_refused_before_training(tmp_path, run_cli, protocol, extra, key):
    res = run_cli("replay", protocol, tmp_path / "runs", *extra)
    assert res.exit_code == 2, res.output
    assert key in res.stderr
    assert not (tmp_path / "runs").exists()      # refused before anything was written


# --- 11. the plug-ins are cilbench.methods, never a top-level `methods` ----------------------------------------

def test_plugins_are_namespaced_and_a_foreign_methods_package_is_never_imported(tmp_path):
    from cilbench.kit.registry import get_method
    assert get_method("replay").cls.__module__ == "cilbench.methods.baselines"
    foreign = tmp_path / "methods"
    foreign.mkdir()
    marker = tmp_path / "foreign_imported"
    (foreign / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('wrong methods')\n")
    res = subprocess.run([sys.executable, "-m", "cilbench.cli", "list"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "der" in res.stdout and "replay" in res.stdout and "digits_b0s2" in res.stdout
    assert not marker.exists()
