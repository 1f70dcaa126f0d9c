"""The command line: end-to-end runs of every baseline, `list`, `show-protocol`, and every bad input
(exit code 2, one line, nothing that looks complete on disk)."""
from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml

from cilbench.data.protocol import PROTOCOL_DIR, known_protocols, load_protocol
from cilbench.kit.registry import get_method
from cilbench.run.metrics import bwt, forgetting, task_mean
from cilbench.run.rundir import STEP_FIELDS, read_matrix
from cilbench.train.memory import ExemplarMemory, ReservoirMemory

RUN_FILES = ["config.yaml", "manifest.json", "steps.csv", "acc_matrix.csv", "acc_matrix_top5.csv",
             "metrics.json", "events.jsonl", "checkpoint.pt"]
METRIC_KEYS = {"steps", "avg_acc", "last_acc", "bwt", "forgetting", "avg_acc_top5", "last_acc_top5", "bwt_top5",
               "forgetting_top5", "avg_acc_task_mean", "last_acc_task_mean", "params_avg", "params_last",
               "extractors_last", "train_seconds", "eval_seconds", "params_total_avg", "params_total_last",
               "params_backbone_avg", "params_backbone_last", "time_split"}


def _digits_counts(protocol_name, split):
    """Samples per task of a digits card in `split`, from the data itself."""
    from cilbench.data.datasets import load_digits
    from cilbench.data.stream import Stream
    p = load_protocol(protocol_name)
    stream = Stream(p, load_digits(p.data), torch.device("cpu"))
    labels = getattr(stream, split).labels
    return torch.bincount(stream.task_of_label[labels], minlength=stream.num_tasks).tolist()


def _expected_train_images(method, train_counts, memory_sizes):
    """Images per epoch each baseline trains on: new data, + the memory (replay), or all seen data (joint).
    ER counts its stream batches only (replay samples ride along)."""
    if method == "joint":
        return [sum(train_counts[: t + 1]) for t in range(len(train_counts))]
    if method == "replay":
        return [n + (memory_sizes[t - 1] if t else 0) for t, n in enumerate(train_counts)]
    return list(train_counts)


# --- end-to-end runs of the baselines ------------------------------------------------------------------------

# (method, protocol, memory class, memory_size per step, bytes per kept sample)
BASELINES = [
    ("finetune", "digits_b0s2", None, [0] * 5, 0),
    ("replay", "digits_b0s2", ExemplarMemory, [200, 200, 198, 200, 200], 64),     # 200 // seen per class
    ("joint", "digits_b0s2", None, [0] * 5, 0),
    ("er", "digits_online_b0s2", ReservoirMemory, [100] * 5, 64 + 16),            # reservoir of 100
    ("finetune", "digits_online_b0s2", None, [0] * 5, 0),
]


@pytest.mark.parametrize("method, protocol, memory_cls, memory_sizes, sample_bytes", BASELINES,
                         ids=[f"{m}-{p}" for m, p, *_ in BASELINES])
def test_baseline_end_to_end(tmp_path, run_cli, monkeypatch, method, protocol, memory_cls, memory_sizes,
                             sample_bytes):
    cls = get_method(method).cls
    memories = []
    original_learn = cls.learn

    def spy(self, task, ctx):
        memories.append(ctx.memory)
        return original_learn(self, task, ctx)

    monkeypatch.setattr(cls, "learn", spy)
    res = run_cli(method, protocol, tmp_path)
    assert res.exit_code == 0, res.output + res.stderr
    assert "complete" in res.stdout and "Avg" in res.stdout

    run = tmp_path / protocol / method / "seed0"
    for name in RUN_FILES:
        assert (run / name).is_file(), f"{name} missing"
    assert not list(run.glob(".*.tmp")), "temporary files left behind"

    # the harness gives exemplar-free methods no memory at all
    assert len(memories) == 5
    if memory_cls is None:
        assert all(m is None for m in memories)
    else:
        assert all(isinstance(m, memory_cls) for m in memories) and len({id(m) for m in memories}) == 1

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["tasks_done"] == manifest["tasks_total"] == 5
    assert manifest["method"] == method and manifest["protocol"] == protocol and manifest["error"] is None
    assert manifest["device"] == "cpu" and manifest["deterministic"] is False
    assert manifest["finished"] is not None

    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["method"] == method and config["protocol"]["name"] == protocol
    assert config["runtime"]["max_epochs"] == 2

    with open(run / "steps.csv") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == STEP_FIELDS
        steps = list(reader)
    assert [int(s["step"]) for s in steps] == [0, 1, 2, 3, 4]
    assert [int(s["classes_seen"]) for s in steps] == [2, 4, 6, 8, 10]
    assert [int(s["memory_size"]) for s in steps] == memory_sizes
    assert [int(s["memory_bytes"]) for s in steps] == [n * sample_bytes for n in memory_sizes]
    assert all(int(s["extractors"]) == 1 for s in steps)
    params = [int(s["params"]) for s in steps]
    assert params == sorted(params) and params[0] < params[-1]          # the head grows with the classes
    # params = params_total (backbone + head); params_backbone is what the papers' #Params counts
    assert [int(s["params_total"]) for s in steps] == params
    backbone = {int(s["params_backbone"]) for s in steps}
    assert len(backbone) == 1 and backbone.pop() < params[0]
    top1 = [float(s["top1"]) for s in steps]
    top5 = [float(s["top5"]) for s in steps]
    assert all(0 <= a <= b <= 100 for a, b in zip(top1, top5))
    assert top5[0] == 100.0                                             # 2 classes: top-5 is everything

    a = read_matrix(run / "acc_matrix.csv")
    a5 = read_matrix(run / "acc_matrix_top5.csv")
    assert [len(row) for row in a] == [1, 2, 3, 4, 5]                   # lower triangle, T x T
    assert [len(row) for row in a5] == [1, 2, 3, 4, 5]
    assert all(0 <= v <= 100 for row in a for v in row)
    header = (run / "acc_matrix.csv").read_text().splitlines()[0]
    assert header == "after_task,task0,task1,task2,task3,task4"

    # A_i is the sample-weighted mean of row i of the matrix
    counts = _digits_counts(protocol, "test")
    for i, row in enumerate(a):
        weighted = sum(v * n for v, n in zip(row, counts)) / sum(counts[: i + 1])
        assert weighted == pytest.approx(top1[i], abs=1e-2)

    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics) == METRIC_KEYS
    assert metrics["steps"] == 5
    assert metrics["avg_acc"] == pytest.approx(sum(top1) / 5)
    assert metrics["last_acc"] == pytest.approx(top1[-1])
    assert metrics["avg_acc_top5"] == pytest.approx(sum(top5) / 5)
    assert metrics["bwt"] == pytest.approx(bwt(a), abs=1e-3)
    assert metrics["forgetting"] == pytest.approx(forgetting(a), abs=1e-3)
    assert metrics["bwt_top5"] == pytest.approx(bwt(a5), abs=1e-3)
    assert metrics["avg_acc_task_mean"] == pytest.approx(sum(task_mean(a)) / 5, abs=1e-3)
    assert metrics["params_last"] == params[-1] and metrics["extractors_last"] == 1
    assert metrics["params_total_last"] == params[-1] and metrics["params_total_avg"] == metrics["params_avg"]
    assert metrics["params_backbone_last"] == int(steps[-1]["params_backbone"])

    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    epochs = 1 if "online" in protocol else 2
    assert [(e["task"], e["epoch"]) for e in events] == [(t, e) for t in range(5) for e in range(epochs)]
    assert all(e["epochs"] == epochs for e in events)
    images = [round(e["images_per_s"] * e["seconds"]) for e in events if e["epoch"] == 0]
    assert images == _expected_train_images(method, _digits_counts(protocol, "train"), memory_sizes)

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["next_task"] == 5 and len(ckpt["acc"]) == 5
    assert (ckpt["memory"] is None) == (memory_cls is None)


def test_tag_seed_and_force(tmp_path, run_cli):
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--tag", "try", "--seed", "4", "--epochs", "1")
    assert res.exit_code == 0
    run = tmp_path / "digits_b0s2" / "finetune+try" / "seed4"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    (run / "stale.txt").write_text("x")
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--tag", "try", "--seed", "4", "--epochs", "1", "--force")
    assert res.exit_code == 0
    assert not (run / "stale.txt").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


# --- list and show-protocol ----------------------------------------------------------------------------------

def test_list_shows_methods_and_protocols(cli):
    res = cli("list")
    assert res.exit_code == 0
    out = res.stdout
    assert "methods:" in out and "protocols:" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "offline/online" in lines["finetune"] and "no exemplars" in lines["finetune"]
    assert "offline" in lines["replay"] and " exemplars" in lines["replay"]
    assert "no exemplars" in lines["joint"]
    assert "online" in lines["er"] and "offline" not in lines["er"]
    for name in known_protocols():
        p = load_protocol(name)
        assert name in lines, name
        assert f"{p.tasks:>3} tasks" in lines[name] and p.dataset in lines[name] and p.regime in lines[name]
    assert " 26 tasks" in lines["cifar100_b50s2"]
    assert "  3 tasks" in lines["cifar100_b50s25"]
    assert " 51 tasks" in lines["cifar100_b50s1"]


def test_show_protocol_prints_the_resolved_card(cli):
    res = cli("show-protocol", "cifar100_b50s2")
    assert res.exit_code == 0
    card = yaml.safe_load(res.stdout)
    assert card["name"] == "cifar100_b50s2" and card["dataset"] == "cifar100"
    assert card["tasks"] == 26 and card["task_sizes"] == [50] + [2] * 25
    assert card["class_order"]["name"] == "seed1993" and card["class_order"]["classes"][:4] == [68, 56, 78, 8]
    assert card["memory"]["policy"] == "per_class" and card["memory"]["per_class"] == 20
    assert card["train"]["epochs"] == 170 and card["augment"]["crop_padding"] == 4
    # defaults are filled in: the whole resolved card, not just the file
    assert "warmup_epochs" in card["train"] and "verify_checksums" in card["data"]


def test_show_protocol_of_a_path(cli):
    res = cli("show-protocol", str(PROTOCOL_DIR / "digits_online_b0s2.yaml"))
    assert res.exit_code == 0
    card = yaml.safe_load(res.stdout)
    assert card["regime"] == "online" and card["memory"]["policy"] == "reservoir"
    assert card["task_sizes"] == [2] * 5


def test_show_protocol_unknown(cli, error_line):
    res = cli("show-protocol", "cifar100_b50s3")
    assert res.exit_code == 2
    assert "unknown protocol 'cifar100_b50s3'" in error_line(res) and "cifar100_b50s2" in error_line(res)


# --- bad input: exit 2, one line, nothing complete -------------------------------------------------------------

def _bad_card(tmp_path, name="digits_custom", **changes):
    card = yaml.safe_load((PROTOCOL_DIR / "digits_b0s2.yaml").read_text())
    card["name"] = name
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(card.get(key), dict):
            card[key].update(value)
        else:
            card[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(card))
    return path


BAD_SETS = [
    (["--set", "train.lrr=0.1"], ["unknown key 'train.lrr'", "digits_b0s2.yaml"]),
    (["--set", "train.lr=fast"], ["train.lr", "expected float", "digits_b0s2.yaml"]),
    (["--set", "colour=red"], ["unknown key 'colour'"]),
    (["--set", "memory.policy=everything"], ["memory.policy", "expected one of"]),
    (["--set", "replay.nope=1"], ["unknown key 'replay.nope'"]),
    (["--set", "replay.inherit_head=maybe"], ["replay.inherit_head", "expected bool"]),
    (["--set", "runtime.turbo=true"], ["unknown key 'runtime.turbo'"]),
    (["--set", "train.lr"], ["key=value"]),
    (["--set", "methods.replay.x=1"], ["replay.<key>"]),
    (["--set", "class_order=podnet9"], ["unknown order 'podnet9'"]),
    (["--set", "tasks=4"], ["tasks is 4"]),
    (["--epochs", "0"], ["--epochs"]),
    (["--device", "tpu"], ["--device"]),
]


@pytest.mark.parametrize("extra, expected", BAD_SETS, ids=[" ".join(e) for e, _ in BAD_SETS])
def test_bad_options_fail_cleanly(tmp_path, run_cli, error_line, nothing_complete, extra, expected):
    res = run_cli("replay", "digits_b0s2", tmp_path, *extra)
    assert res.exit_code == 2, res.output
    line = error_line(res)
    for text in expected:
        assert text in line, (text, line)
    assert nothing_complete(tmp_path)


def test_unknown_method_lists_known_ones(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("finetuned", "digits_b0s2", tmp_path)
    assert res.exit_code == 2
    line = error_line(res)
    assert "unknown method 'finetuned'" in line
    for name in ("finetune", "replay", "joint", "er"):
        assert name in line
    assert nothing_complete(tmp_path)


def test_unknown_protocol_lists_known_ones(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("replay", "digits_b9s9", tmp_path)
    assert res.exit_code == 2
    line = error_line(res)
    assert "unknown protocol 'digits_b9s9'" in line
    for name in ("digits_b0s2", "cifar100_b50s2", "imagenet100_b0s10"):
        assert name in line
    assert nothing_complete(tmp_path)


def test_method_of_another_regime(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("er", "digits_b0s2", tmp_path)
    assert res.exit_code == 2
    assert "online" in error_line(res)
    res = run_cli("replay", "digits_online_b0s2", tmp_path)
    assert res.exit_code == 2
    assert "offline" in error_line(res)
    assert nothing_complete(tmp_path)


def test_er_without_a_reservoir(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("er", "digits_online_b0s2", tmp_path, "--set", "memory.policy=none")
    assert res.exit_code == 2, res.output
    assert "memory.policy" in error_line(res) and "reservoir" in error_line(res)
    assert nothing_complete(tmp_path)


@pytest.mark.parametrize("changes, expected", [
    (dict(colour="red"), ["unknown key 'colour'"]),
    (dict(train={"lr": "fast"}), ["train.lr", "expected float"]),
    (dict(train={"warmup": 3}), ["unknown key 'train.warmup'"]),
    (dict(methods={"replay": {"inherit_head": "maybe"}}), ["methods.replay", "inherit_head"]),
    (dict(methods={"replay": {"nope": 1}}), ["unknown key 'methods.replay.nope'"]),
    (dict(step=3, tasks=4), ["classes do not add up"]),
    (dict(tasks=6), ["tasks is 6", "5 tasks"]),
], ids=["unknown-key", "ill-typed", "nested-unknown", "method-ill-typed", "method-unknown", "classes", "tasks"])
def test_bad_card_file_names_file_and_key(tmp_path, run_cli, error_line, nothing_complete, changes, expected):
    card = _bad_card(tmp_path, **changes)
    out = tmp_path / "runs"
    res = run_cli("replay", card, out)
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert str(card) in line
    for text in expected:
        assert text in line, (text, line)
    assert nothing_complete(out)


def test_card_file_that_is_not_yaml(tmp_path, run_cli, error_line):
    card = tmp_path / "broken.yaml"
    card.write_text("name: [unclosed\n")
    res = run_cli("replay", card, tmp_path / "runs")
    assert res.exit_code == 2
    assert "broken.yaml" in error_line(res) and "YAML" in error_line(res)


def test_existing_run_directory(tmp_path, run_cli, error_line):
    res = run_cli("replay", "digits_b0s2", tmp_path, "--stop-after", "1")
    assert res.exit_code == 0
    run = tmp_path / "digits_b0s2" / "replay" / "seed0"
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert json.loads(before["manifest.json"])["status"] == "interrupted"

    res = run_cli("replay", "digits_b0s2", tmp_path)
    assert res.exit_code == 2
    line = error_line(res)
    assert "already exists" in line and "--resume" in line and "--force" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before      # left untouched
    assert not (run / "metrics.json").exists()

    # resuming with other options is refused, naming the option
    res = run_cli("replay", "digits_b0s2", tmp_path, "--resume", "--set", "train.lr=0.01")
    assert res.exit_code == 2
    assert "train.lr" in error_line(res)
    assert not (run / "metrics.json").exists()

    res = run_cli("replay", "digits_b0s2", tmp_path, "--resume")
    assert res.exit_code == 0
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    with open(run / "steps.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 5

    res = run_cli("replay", "digits_b0s2", tmp_path, "--resume")
    assert res.exit_code == 2
    assert "already complete" in error_line(res)


def test_run_interrupted_in_its_first_task_resumes(tmp_path, run_cli, monkeypatch):
    """Ctrl-C before any task finished leaves config + manifest but no checkpoint; --resume starts over."""
    from cilbench.methods.baselines import Replay

    original = Replay.learn

    def interrupted(self, task, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Replay, "learn", interrupted)
    res = run_cli("replay", "digits_b0s2", tmp_path)
    assert res.exit_code == 130
    run = tmp_path / "digits_b0s2" / "replay" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run / "checkpoint.pt").exists()
    monkeypatch.setattr(Replay, "learn", original)
    res = run_cli("replay", "digits_b0s2", tmp_path, "--resume")
    assert res.exit_code == 0, res.output
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def test_unexpected_error_marks_the_run_failed(tmp_path, run_cli, monkeypatch, nothing_complete):
    from cilbench.methods.baselines import Replay

    def broken(self, task, ctx):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Replay, "learn", broken)
    res = run_cli("replay", "digits_b0s2", tmp_path)
    assert res.exit_code != 0
    manifest = json.loads((tmp_path / "digits_b0s2" / "replay" / "seed0" / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "out of memory" in manifest["error"]
    assert nothing_complete(tmp_path)


def test_negative_seed_is_rejected(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("replay", "digits_b0s2", tmp_path, "--seed", "-1")
    assert res.exit_code == 2
    assert "--seed must be >= 0" in error_line(res)
    assert not any(tmp_path.iterdir())
