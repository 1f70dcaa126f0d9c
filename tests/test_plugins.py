"""A method written outside cilbench (examples/logit-replay) runs like a built-in one: loaded by --plugin,
by $CILBENCH_PLUGINS or by an installed entry point, through run, --resume, sweep and report.

Every command runs in its own process, as a user's would, so the plug-in never leaks into the registry of
the test session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "logit-replay"
PLUGIN = EXAMPLE / "logit_replay"


def cilbench(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "CILBENCH_PLUGINS"}
    environment.update(OMP_NUM_THREADS="1", **(env or {}))
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environment.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "cilbench.cli", *map(str, args)], capture_output=True, text=True,
                          env=environment, cwd=cwd or REPO, timeout=600)


def quick(*extra):
    return ["--protocol", "digits_b0s2", "--device", "cpu", "--quiet", "--epochs", "1", "--set",
            "runtime.threads=1", *extra]


def test_plugin_by_path_runs_resumes_and_records_its_source(tmp_path):
    out = tmp_path / "runs"
    part = cilbench("run", "--plugin", PLUGIN, "--method", "logit_replay", *quick("--out", out, "--stop-after", "2"))
    assert part.returncode == 0, part.stderr
    run = out / "digits_b0s2" / "logit_replay" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    done = cilbench("run", "--plugin", PLUGIN, "--method", "logit_replay", *quick("--out", out, "--resume"))
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method_display"] == "Replay + logit KD"
    source = config["method_source"]
    assert source["kind"] == "path" and source["file"] == str(PLUGIN) and len(source["sha256"]) == 12
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["message"] for e in events if e.get("kind") == "message"][-1].startswith("logit_replay: task 5")

    report = cilbench("report", "--runs", out, "--out", tmp_path / "report")
    assert report.returncode == 0, report.stderr
    table = (tmp_path / "report" / "tables").rglob("*.md")
    assert any("Replay + logit KD" in p.read_text() for p in table)
    assert "plug-in" in (tmp_path / "report" / "index.html").read_text()


def test_plugin_runs_in_every_run_a_local_sweep_starts(tmp_path):
    sweep = tmp_path / "plug.yaml"
    sweep.write_text(yaml.safe_dump({"methods": ["logit_replay"], "protocols": ["digits_b0s2"], "seeds": [0, 1],
                                     "epochs": 1, "device": "cpu", "set": {"runtime.threads": 1}}))
    res = cilbench("sweep", sweep, "--plugin", PLUGIN, "--out", tmp_path / "runs", "--jobs", "1", "--no-report")
    assert res.returncode == 0, res.stdout + res.stderr
    for seed in (0, 1):
        manifest = tmp_path / "runs" / "digits_b0s2" / "logit_replay" / f"seed{seed}" / "manifest.json"
        assert json.loads(manifest.read_text())["status"] == "complete"


def test_plugin_from_the_environment_variable_and_show_method(tmp_path):
    res = cilbench("show-method", "logit_replay", env={"CILBENCH_PLUGINS": str(PLUGIN)})
    assert res.returncode == 0, res.stderr
    assert "kd_weight = 1.0" in res.stdout and "distillation temperature T" in res.stdout
    assert f"plug-in: {PLUGIN}" in res.stdout


def test_an_installed_entry_point_is_found_without_any_flag(tmp_path):
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(EXAMPLE)], capture_output=True, text=True, timeout=600)
    if pip.returncode != 0:
        pytest.fail(f"installing the example plug-in failed: {pip.stderr[-2000:]}")
    env = {"PYTHONPATH": str(target)}
    listed = cilbench("list", env=env)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.strip().startswith("logit_replay"))
    assert "plug-in: cilbench-logit-replay 0.1.0" in line
    res = cilbench("run", "--method", "logit_replay", *quick("--out", tmp_path / "runs"), env=env)
    assert res.returncode == 0, res.stderr
    config = yaml.safe_load((tmp_path / "runs" / "digits_b0s2" / "logit_replay" / "seed0" / "config.yaml").read_text())
    assert config["method_source"]["package"] == "cilbench-logit-replay"


def test_a_plugin_name_that_clashes_with_a_builtin_is_one_line(tmp_path):
    clash = tmp_path / "clash.py"
    clash.write_text("from cilbench.kit import OneNetworkMethod, register\n\n\n"
                     "@register('der')\nclass NotDER(OneNetworkMethod):\n    pass\n")
    res = cilbench("--plugin", clash, "list")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "method name 'der'" in lines[0] and "already registered" in lines[0]


def test_a_plugin_that_fails_to_import_is_one_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_anywhere\n")
    res = cilbench("run", "--plugin", broken, "--method", "x", *quick("--out", tmp_path))
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "failed to import" in lines[0] and "ModuleNotFoundError" in lines[0]


def test_a_plugin_path_that_is_not_a_python_file_is_one_line(tmp_path):
    for bad in (tmp_path / "missing.py", tmp_path):                      # absent; a folder without __init__.py
        res = cilbench("--plugin", bad, "list")
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(lines) == 1 and str(bad) in lines[0], res.stderr
