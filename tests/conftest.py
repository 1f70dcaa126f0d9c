"""Shared test helpers: run the `cilbench` CLI in-process and inspect what a run left on disk.

Everything runs on CPU; training-heavy tests use the reduced digits cards with `--epochs` caps.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cilbench.cli import app

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# The test networks are tiny: one intra-op thread is as fast as several on an idle machine and avoids the
# large slow-downs of OpenMP spin-waiting when the CPU cores are shared with other processes.
torch.set_num_threads(1)


@pytest.fixture
def cli():
    """`cli(*args)` invokes `cilbench <args>` in-process and returns click's Result
    (exit_code, stdout, stderr)."""
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)

    return invoke


@pytest.fixture
def run_cli(cli):
    """`run_cli(method, protocol, out, *extra)`: `cilbench run` on CPU, quiet, with a 2-epoch cap unless
    `--epochs` is in `extra`."""

    def run(method: str, protocol: str, out, *extra: str):
        args = ["run", "--method", method, "--protocol", protocol, "--out", str(out), "--device", "cpu",
                "--quiet"]
        if "--epochs" not in extra:
            args += ["--epochs", "2"]
        return cli(*args, *extra)

    return run


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """A `--deterministic` run switches torch's global deterministic mode on; switch it back afterwards so
    one test does not change how the next one runs."""
    threads = torch.get_num_threads()
    yield
    if torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def _error_line(result) -> str:
    """The single line a bad input must produce on stderr (asserts it is exactly one line)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got: {result.stderr!r} (stdout {result.stdout!r})"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def _nothing_complete(root: Path) -> bool:
    """True when no run under `root` looks complete (no metrics.json, no manifest with status complete)."""
    root = Path(root)
    if not root.exists():
        return True
    if any(root.rglob("metrics.json")):
        return False
    for manifest in root.rglob("manifest.json"):
        if json.loads(manifest.read_text()).get("status") == "complete":
            return False
    return True


@pytest.fixture
def error_line():
    """`error_line(result)`: the one stderr line of a failed command (asserts there is exactly one)."""
    return _error_line


@pytest.fixture
def nothing_complete():
    """`nothing_complete(root)`: no run under root has metrics.json or a manifest with status complete."""
    return _nothing_complete
