"""Speed machinery a user relies on: where a run's time went (time split), the CPU inference chunk, start-up
shortcuts that must not change data or behaviour, and `cilbench bench --method`."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cilbench.bench import methods as speed
from cilbench.bench.methods import PHASES, Phase, Shapes, harness_speed
from cilbench.data.datasets import _digits_table
from cilbench.data.protocol import load_protocol
from cilbench.data.stream import Stream
from cilbench.kit.registry import known_methods
from cilbench.train import engine as engine_module
from cilbench.train.engine import Engine, RuntimeOptions, set_deterministic

SPLIT_KEYS = {"fit", "statistics", "herding", "eval", "checkpoint", "other", "wall"}


def _run_dir(root, protocol, method):
    return root / protocol / method / "seed0"


# --- time split --------------------------------------------------------------------------------------------

def test_time_split_accounts_for_the_run(tmp_path, run_cli):
    res = run_cli("der", "digits_b0s2", tmp_path)
    assert res.exit_code == 0, res.stderr
    run = _run_dir(tmp_path, "digits_b0s2", "der")
    split = json.loads((run / "metrics.json").read_text())["time_split"]
    assert set(split) == SPLIT_KEYS
    assert all(v >= 0 for v in split.values())
    parts = sum(v for k, v in split.items() if k != "wall")
    assert parts == pytest.approx(split["wall"], abs=0.01)   # other = wall - the named parts
    assert split["fit"] > 0 and split["herding"] > 0 and split["eval"] > 0 and split["checkpoint"] > 0
    steps = (run / "steps.csv").read_text().splitlines()
    header = steps[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in steps[1:]]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for row in rows:
        # fit + statistics + herding is the task's training time as the table reports it
        total = float(row["fit_seconds"]) + float(row["statistics_seconds"]) + float(row["herding_seconds"])
        assert total == pytest.approx(float(row["train_seconds"]), abs=0.005)
        # fit covers every epoch of the task's phases (DER: stage 1 and, after the first task, stage 2)
        epochs = sum(e["seconds"] for e in events if e["task"] == int(row["step"]))
        assert epochs <= float(row["fit_seconds"]) + 0.002
        assert float(row["fit_seconds"]) - epochs < 0.5 or int(row["step"]) == 0   # the first imports dynamo
    assert split["fit"] == pytest.approx(sum(float(r["fit_seconds"]) for r in rows), abs=0.01)
    assert split["eval"] == pytest.approx(sum(float(r["eval_seconds"]) for r in rows), abs=0.01)


def test_time_split_of_a_resumed_run_covers_both_processes(tmp_path, run_cli):
    assert run_cli("replay", "digits_b0s2", tmp_path, "--stop-after", "2").exit_code == 0
    run = _run_dir(tmp_path, "digits_b0s2", "replay")
    first = torch.load(run / "checkpoint.pt", weights_only=False)["timing"]
    assert run_cli("replay", "digits_b0s2", tmp_path, "--resume").exit_code == 0
    split = json.loads((run / "metrics.json").read_text())["time_split"]
    header, *lines = (run / "steps.csv").read_text().splitlines()
    rows = [dict(zip(header.split(","), line.split(","))) for line in lines]
    assert len(rows) == 5 and first["fit"] > 0
    # fit is every task's, the first process's included (not just the resumed three)
    assert split["fit"] == pytest.approx(sum(float(r["fit_seconds"]) for r in rows), abs=0.01)
    resumed = sum(float(r["train_seconds"]) + float(r["eval_seconds"]) for r in rows[2:])
    assert split["wall"] >= first["wall"] + resumed


# --- inference chunk ---------------------------------------------------------------------------------------

def _engine(protocol: str, **options) -> Engine:
    from cilbench.data.datasets import load_dataset
    p = load_protocol(protocol)
    stream = Stream(p, load_dataset(p, None), torch.device("cpu"))
    return Engine(stream, RuntimeOptions(device="cpu", **options), torch.device("cpu"))


def test_cpu_inference_chunk_follows_image_size_and_options():
    digits = _engine("digits_b0s2")                  # 8x8: the card's batch fits the pixel budget
    assert digits.inference_batch_size() == min(digits.stream.protocol.eval_batch_size, 1024)
    assert digits.inference_batch_size(16) == 16     # an explicit request wins
    assert _engine("digits_b0s2", inference_batch=7).inference_batch_size() == 7
    synthetic = _engine("synthetic_b0s2")            # 16x16: 256 images
    assert synthetic.inference_batch_size() == 256
    synthetic.cuda = True                            # on CUDA the card's eval batch size stands
    assert synthetic.inference_batch_size() == synthetic.stream.protocol.eval_batch_size


def test_scores_do_not_depend_on_the_inference_chunk():
    from cilbench.kit.backbones import build_backbone
    engine = _engine("synthetic_b0s2")
    torch.manual_seed(0)
    net = build_backbone("resnet20", 3, 8).eval()
    idx = torch.arange(300)
    chunked = engine.apply(net, idx, split="train")                 # auto: 256 per chunk
    whole = engine.apply(net, idx, split="train", batch_size=300)
    assert chunked.shape == whole.shape == (300, net.out_dim)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)


def test_inference_batch_is_a_checked_runtime_option(run_cli, tmp_path, error_line):
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--set", "runtime.inference_batch=-1")
    assert res.exit_code == 2
    assert "inference_batch" in error_line(res)


# --- start-up shortcuts ------------------------------------------------------------------------------------

def test_digits_read_without_sklearn_equal_sklearn():
    from sklearn.datasets import load_digits
    pixels, labels = _digits_table()
    bunch = load_digits()
    np.testing.assert_array_equal(pixels, bunch.data)
    np.testing.assert_array_equal(labels, bunch.target)


def test_set_deterministic_only_touches_torch_when_the_mode_changes(monkeypatch):
    torch.use_deterministic_algorithms(False)         # whatever an earlier in-process run left
    calls = []
    real = torch.use_deterministic_algorithms
    monkeypatch.setattr(engine_module.torch, "use_deterministic_algorithms",
                        lambda mode, **kw: (calls.append(mode), real(mode, **kw)))
    set_deterministic(False)
    assert calls == []                                # already off: nothing to do
    set_deterministic(True)
    assert calls == [True] and torch.are_deterministic_algorithms_enabled()
    set_deterministic(False)
    assert calls == [True, False] and not torch.are_deterministic_algorithms_enabled()


# --- bench --method ------------------------------------------------------------------------------------------

def test_every_registered_method_has_bench_phases():
    assert set(PHASES) == set(known_methods())


def test_harness_speed_is_the_best_epoch_after_the_first():
    events = [{"task": 1, "phase": "der", "epoch": 0, "seconds": 4.0, "images_per_s": 100.0},
              {"task": 1, "phase": "der", "epoch": 1, "seconds": 2.0, "images_per_s": 300.0},
              {"task": 1, "phase": "der", "epoch": 2, "seconds": 3.0, "images_per_s": 200.0},
              {"task": 1, "phase": "der_classifier", "epoch": 0, "seconds": 1.0, "images_per_s": 50.0},
              {"task": 0, "phase": "der", "epoch": 1, "seconds": 1.0, "images_per_s": 999.0}]
    phase = Phase("der", 1, "stage 1", speed.bare_one_network)
    rate, images = harness_speed(events, phase)
    assert rate == 300.0 and images == 600          # the best epoch after the first (epoch 1)
    only = Phase("der_classifier", 1, "stage 2", speed.bare_one_network)
    assert harness_speed(events, only) == (pytest.approx(50.0), 50)   # a single epoch is all there is
    with pytest.raises(RuntimeError, match="no 'kd' epochs in task 2"):
        harness_speed(events, Phase("kd", 1, "kd", speed.bare_one_network))


@pytest.mark.parametrize("name", sorted(PHASES))
def test_every_bare_loop_runs_at_its_shapes(name):
    """Each declared bare loop builds its networks for the task it is measured at and runs training steps."""
    online = name in speed.ONLINE_METHODS
    step = speed.CLASSES // (speed.ONLINE_TASKS if online else speed.TASKS)
    for phase in PHASES[name]:
        shapes = Shapes(10 if online else 16, step * (phase.task + 1), step * phase.task, torch.device("cpu"))
        torch.manual_seed(0)
        run = phase.bare(shapes, 2)
        run(0)
        run(1)


def test_bench_method_cli_prints_phases_and_split(cli):
    res = cli("bench", "--device", "cpu", "--method", "finetune", "--per-class", "4", "--epochs", "2")
    assert res.exit_code == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any("finetune" in line and "bare loop" in line and "%" in line for line in lines)
    assert any("short run" in line and "fit" in line and "eval" in line for line in lines)


def test_bench_method_rejects_unknown_methods_and_one_epoch(cli, error_line):
    res = cli("bench", "--method", "nope")
    assert res.exit_code == 2 and "nope" in error_line(res)
    res = cli("bench", "--method", "finetune", "--epochs", "1")
    assert res.exit_code == 2 and "--epochs" in error_line(res)
    res = cli("bench", "--method", "finetune", "--per-class", "0")
    assert res.exit_code == 2 and "--per-class" in error_line(res)


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off(tmp_path, run_cli, monkeypatch):
    import platform

    from cilbench.run import runner
    from cilbench.train.engine import tune_malloc
    if platform.libc_ver()[0] == "glibc":
        assert tune_malloc() is True
    calls = []
    monkeypatch.setattr(runner, "tune_malloc", lambda: calls.append(1))
    assert run_cli("finetune", "digits_b0s2", tmp_path / "a", "--epochs", "1").exit_code == 0
    assert calls == [1]
    res = run_cli("finetune", "digits_b0s2", tmp_path / "b", "--set", "runtime.tune_malloc=false", "--epochs", "1")
    assert res.exit_code == 0, res.stderr
    assert calls == [1]                               # not called again


def test_a_run_from_before_a_new_runtime_option_resumes(tmp_path, run_cli):
    """Runtime options added later (at their defaults) and speed-only ones do not block --resume."""
    import yaml
    assert run_cli("replay", "digits_b0s2", tmp_path, "--stop-after", "2").exit_code == 0
    config_file = tmp_path / "digits_b0s2" / "replay" / "seed0" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    del config["runtime"]["inference_batch"], config["runtime"]["tune_malloc"]
    config_file.write_text(yaml.safe_dump(config))
    assert run_cli("replay", "digits_b0s2", tmp_path, "--resume", "--set", "runtime.tune_malloc=false").exit_code == 0
    res = run_cli("replay", "digits_b0s2", tmp_path / "c", "--stop-after", "2")
    assert res.exit_code == 0
    res = run_cli("replay", "digits_b0s2", tmp_path / "c", "--resume", "--set", "runtime.inference_batch=16")
    assert res.exit_code == 2                         # can change which exemplars herding picks


@pytest.mark.parametrize("name", sorted(PHASES))
def test_every_declared_phase_occurs_in_the_bench_run(name, tmp_path):
    """The (phase, task) pairs PHASES names are where the method really trains (a tiny bench-card run)."""
    import yaml

    from cilbench.run.runner import RunRequest, execute
    card = speed.online_card(2) if name in speed.ONLINE_METHODS else speed.offline_card(2)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    run = execute(RunRequest(method=name, protocol=str(path), epochs=1, device="cpu", out=str(tmp_path),
                             quiet=True, overrides=["runtime.divergence_factor=0"]))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    for phase in PHASES[name]:
        rate, images = harness_speed(events, phase)
        assert rate > 0 and images > 0
    specs = speed.run_specs(run)          # DER's bare loops rebuild the run's own (pruned) extractors
    if name in ("der", "der_prune"):
        assert len(specs) == speed.TASKS and all("stages" in spec for spec in specs)
    else:
        assert specs is None


# --- frozen networks in chunks -----------------------------------------------------------------------------

def test_frozen_forward_in_chunks_equals_one_pass_without_a_graph():
    from cilbench.kit.backbones import build_backbone, stage_outputs
    from cilbench.kit.nets import freeze, frozen_forward
    torch.manual_seed(0)
    net = freeze(build_backbone("resnet20", 3, 4))
    x = torch.randn(10, 3, 8, 8)
    whole = frozen_forward(net, x)
    chunked = frozen_forward(net, x, chunk=3)                        # 3 + 3 + 3 + 1
    torch.testing.assert_close(chunked, net(x), rtol=1e-4, atol=1e-5)
    assert not whole.requires_grad and not chunked.requires_grad
    maps, feats = frozen_forward(lambda v: stage_outputs(net, v), x, chunk=4)   # (list of maps, tensor)
    ref_maps, ref_feats = stage_outputs(net, x)
    assert isinstance(maps, list) and len(maps) == len(ref_maps)
    for a, b in zip(maps, ref_maps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-5)


def test_frozen_chunk_is_the_cpu_inference_chunk_and_off_on_cuda():
    engine = _engine("synthetic_b0s2")
    assert engine.frozen_chunk == engine.inference_batch_size() == 256
    engine.cuda = True
    assert engine.frozen_chunk == 0


@pytest.mark.parametrize("method,protocol,module", [
    ("der", "digits_b0s2", "cilbench.kit.nets"), ("tsd_fixed", "digits_b0s2", "cilbench.methods.tsd"),
    ("seed", "digits_b0s2", "cilbench.methods.seed"), ("exacfs", "digits_b4s2", "cilbench.methods.exacfs")])
def test_methods_run_their_frozen_networks_in_the_engine_chunk(method, protocol, module, run_cli, tmp_path,
                                                               monkeypatch):
    """Training steps hand frozen forwards the engine's chunk (forced to 5 here) and still complete."""
    import importlib
    target = importlib.import_module(module)
    real, chunks = target.frozen_forward, []
    monkeypatch.setattr(target, "frozen_forward", lambda fn, x, chunk=0: (chunks.append((chunk, len(x))),
                                                                          real(fn, x, chunk))[1])
    res = run_cli(method, protocol, tmp_path, "--set", "runtime.inference_batch=5", "--set", "train.lr=0.01",
                  *(["--set", "tsd_fixed.n_extractors=2"] if method == "tsd_fixed" else []))
    assert res.exit_code == 0, res.stderr
    # every frozen forward over more images than the chunk (training batches; inference arrives pre-chunked)
    # was handed the chunk, so it was split
    big = [chunk for chunk, n in chunks if n > 5]
    assert big and all(chunk == 5 for chunk in big)


def test_piped_run_tables_are_not_squeezed_to_80_columns(run_cli, tmp_path):
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--epochs", "1")
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert any(len(line) > 80 for line in lines)
    assert not any(line.strip("│ ") == "" and "│" in line for line in lines)   # no rows of wrapped fragments
