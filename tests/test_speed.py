"""Speed machinery a user relies on: where a run's time went (time split), the CPU inference chunk, start-up
shortcuts that must not change data or behaviour, and `cilbench bench --method`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cilbench.bench import methods as speed
from cilbench.bench.methods import PhaseFigures, Window, phase_row
from cilbench.data.datasets import _digits_table
from cilbench.data.protocol import load_protocol
from cilbench.data.stream import Stream
from cilbench.kit.registry import known_methods
from cilbench.train import engine as engine_module
from cilbench.train.engine import Engine, RuntimeOptions, set_deterministic

SPLIT_KEYS = {"fit", "statistics", "herding", "eval", "checkpoint", "other", "wall", "first_step"}
PARTS = SPLIT_KEYS - {"wall", "first_step"}


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
    assert 0 < split["first_step"]                 # the age of this (test) process at the run's first step
    parts = sum(split[k] for k in PARTS)
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


def test_process_age_counts_from_the_process_start():
    import subprocess
    import sys
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.3); from cilbench.train.engine import "
                          "process_age; print(process_age())"], capture_output=True, text=True, check=True)
    age = float(out.stdout)
    assert 0.3 <= age <= time.perf_counter() - t0 + 0.02      # /proc counts in 10 ms ticks


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

def test_phase_figures_are_medians_over_windows_after_warm_up():
    figures = PhaseFigures("der", "der, task 5", [Window(50.0, 10.0, True), Window(90.0, 100.0, False),
                                                   Window(110.0, 100.0, False), Window(100.0, 125.0, False)])
    row = phase_row("der", figures)
    assert row["windows"] == 3 and row["name"] == "der"
    assert row["harness"] == 100.0 and row["bare"] == 100.0
    assert row["ratio"] == pytest.approx(0.9) and row["ratio_min"] == pytest.approx(0.8)
    assert row["ratio_max"] == pytest.approx(1.1)
    assert row["harness_spread"] == pytest.approx(0.1)
    only = phase_row("x", PhaseFigures("x", "x", [Window(40.0, 50.0, True)]))   # warm-up is all there is
    assert only["windows"] == 1 and only["ratio"] == pytest.approx(0.8) and only["bare_spread"] == 0


@pytest.fixture
def tiny_bench_cards(monkeypatch):
    """The bench cards at 8x8 pixels: the same phases at a sixteenth of the compute."""
    real = speed.offline_card

    def small(per_class):
        card = real(per_class)
        card["data"]["synthetic"]["image_size"] = 8
        return card
    monkeypatch.setattr(speed, "offline_card", small)


@pytest.mark.parametrize("name", known_methods())
def test_every_recorded_phase_of_every_method_gets_a_bare_figure(name, tmp_path, tiny_bench_cards):
    """A tiny bench card: each phase the run trains (events.jsonl) has a row with harness and bare figures."""
    result = speed.bench_method(name, "cpu", per_class=2, epochs=2, out=tmp_path)
    events = [json.loads(line) for line in (result["run"] / "events.jsonl").read_text().splitlines()]
    trained = {e["phase"] for e in events if "epoch" in e}
    rows = result["phases"]
    assert trained and {row["name"] for row in rows} == trained
    assert all(row["harness"] > 0 and row["bare"] > 0 and row["windows"] >= 1 for row in rows)
    assert set(result["time_split"]) == SPLIT_KEYS


def test_no_recorder_in_a_normal_run(tmp_path, run_cli, monkeypatch):
    """A run never builds a FitCall: the recorder is off unless bench attaches one."""
    def refuse(*args, **kwargs):
        raise AssertionError("a FitCall was recorded in a normal run")
    monkeypatch.setattr(engine_module, "FitCall", refuse)
    assert _engine("digits_b0s2").recorder is None
    res = run_cli("der", "digits_b0s2", tmp_path, "--epochs", "2")
    assert res.exit_code == 0, res.stderr


def test_the_bare_loop_runs_the_methods_own_loss(tmp_path, monkeypatch, tiny_bench_cards):
    """A spy on finetune's loss: a bench run calls it more often than the same run without a recorder, by
    exactly the bare windows' steps."""
    from cilbench.methods.baselines import SingleNetwork

    from cilbench.run.runner import RunRequest, execute
    calls = []
    real = SingleNetwork.loss
    monkeypatch.setattr(SingleNetwork, "loss", lambda self, batch: (calls.append(len(batch.y)), real(self, batch))[1])
    windows = []
    real_window = speed.bare_window
    monkeypatch.setattr(speed, "bare_window", lambda engine, call, batches, epoch: (
        windows.append(len(batches) + 1), real_window(engine, call, batches, epoch))[1])   # + its untimed step
    speed.bench_method("finetune", "cpu", per_class=2, epochs=2, out=tmp_path)
    bench_calls = len(calls)
    calls.clear()
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump(speed.offline_card(2)))
    execute(RunRequest(method="finetune", protocol=str(card), epochs=2, device="cpu", out=str(tmp_path / "plain"),
                       quiet=True, overrides=["runtime.divergence_factor=0"]))
    assert windows and bench_calls == len(calls) + sum(windows)


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
    assert run_cli("replay", "digits_b0s2", tmp_path, "--stop-after", "2").exit_code == 0
    run = tmp_path / "digits_b0s2" / "replay" / "seed0"
    config = yaml.safe_load((run / "config.yaml").read_text())
    del config["runtime"]["inference_batch"], config["runtime"]["tune_malloc"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # a run from before those options also predates run identities: neither file records one
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("identity")
    (run / "manifest.json").write_text(json.dumps(manifest))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state.pop("identity")
    torch.save(state, run / "checkpoint.pt")
    assert run_cli("replay", "digits_b0s2", tmp_path, "--resume", "--set", "runtime.tune_malloc=false").exit_code == 0
    res = run_cli("replay", "digits_b0s2", tmp_path / "c", "--stop-after", "2")
    assert res.exit_code == 0
    res = run_cli("replay", "digits_b0s2", tmp_path / "c", "--resume", "--set", "runtime.inference_batch=16")
    assert res.exit_code == 2                         # can change which exemplars herding picks


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
    # EXACFS's balanced fine-tuning by default keeps BN in train mode (PODNet's), where the extractor's forward
    # must see the whole batch: its frozen-BN variant is the one whose forwards are chunked
    extra = {"tsd_fixed": ["--set", "tsd_fixed.n_extractors=2"], "exacfs": ["--set", "exacfs.cbf_bn=frozen"]}
    res = run_cli(method, protocol, tmp_path, "--set", "runtime.inference_batch=5", "--set", "train.lr=0.01",
                  *extra.get(method, []))
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


# --- start-up: the engine's optimiser ----------------------------------------------------------------------
def _twins(torch_optimizer, engine_optimizer, **options):
    """Two copies of a small net, each with torch's optimiser or the engine's over two parameter groups (the
    second without weight decay, the last bias never getting a gradient)."""
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3),
                                        torch.nn.Linear(3, 2)))
    groups = [[{"params": [*net[0].parameters(), *net[3].parameters()]},
               {"params": list(net[2].parameters()), "weight_decay": 0.0}] for net in nets]
    return nets, (torch_optimizer(groups[0], lr=0.1, **options), engine_optimizer(groups[1], lr=0.1, **options))


def _same_steps(nets, optimizers):
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    before = nets[1][0].weight.detach().clone()
    for step in range(6):
        for net, optimizer in zip(nets, optimizers):
            for group in optimizer.param_groups:
                group["lr"] = 0.1 * 0.5 ** (step // 3)        # the fit loop's per-epoch schedule
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net[:3](x), y).backward()     # net[3] gets no gradient
            optimizer.step()
    for a, b in zip(*(net.parameters() for net in nets)):
        assert torch.equal(a, b)
    assert torch.equal(nets[1][3].weight, nets[0][3].weight)     # untouched by both
    assert not torch.equal(nets[1][0].weight, before)            # it did train


@pytest.mark.parametrize("options", [{"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
                                     {"momentum": 0.9, "weight_decay": 5e-4}, {}])
def test_engine_sgd_moves_parameters_as_torch_sgd_bit_for_bit(options):
    _same_steps(*_twins(torch.optim.SGD, engine_module.SGD, **options))


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_engine_adam_and_adamw_move_parameters_as_torch_bit_for_bit(name, weight_decay):
    """DyTox's AdamW (and Adam) through torch's functional update: same parameters as torch.optim's classes."""
    torch_optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    def engine_optimizer(params, **options):
        return engine_module.Adam(params, decoupled=name == "adamw", **options)
    _same_steps(*_twins(torch_optimizer, engine_optimizer, weight_decay=weight_decay))


def test_engine_sgd_refuses_a_parameter_in_two_groups():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        engine_module.SGD([{"params": [p]}, {"params": [p]}], lr=0.1)


OPTIONAL_LIBRARIES = ("matplotlib", "pandas", "sklearn", "scipy", "submitit", "timm", "torchvision")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_cpu_run_imports_neither_torch_dynamo_nor_optional_libraries(tmp_path, optimizer):
    """torch.optim.Optimizer imports torch._dynamo (and sympy) on its first call, 1.5-2 s of a process's
    start-up; a run through the engine's SGD or AdamW (clipping included) does not, nor does it load the libraries only
    reports, sweeps or other data sets need."""
    code = ("import atexit, sys\n"
            f"atexit.register(lambda: print(sorted(m for m in ('torch._dynamo', *{OPTIONAL_LIBRARIES!r}) "
            "if m in sys.modules)))\n"
            "from cilbench.cli import main\n"
            "sys.argv = ['cilbench', 'run', '--method', 'replay', '--protocol', 'digits_b0s2', '--device', 'cpu', "
            f"'--epochs', '1', '--quiet', '--set', 'train.clip_norm=1.0', '--set', 'train.optimizer={optimizer}', "
            f"'--out', {str(tmp_path)!r}]\n"
            "main()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    split = json.loads((tmp_path / "digits_b0s2" / "replay" / "seed0" / "metrics.json").read_text())["time_split"]
    assert 0 < split["first_step"]


# --- every network's forward once per answer -----------------------------------------------------------------
def _count_images(modules, counts, key, active=lambda: True):
    """Forward hooks adding each call's batch size to counts[key(i)]; returns the handles."""
    def hook(i):
        def add(module, args, out):
            if active():
                counts[key(i)] = counts.get(key(i), 0) + len(args[0])
        return add
    return [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def test_der_herds_and_evaluates_with_one_forward_of_each_extractor():
    """Herding reads the concatenated super-feature: each extractor sees each new-class image once; evaluation
    each test image once."""
    from cilbench.methods.der import DER, DERConfig
    from harness import tiny_card, tiny_context

    from cilbench.config import build
    from cilbench.run.runner import evaluate
    ctx, stream, engine, memory = tiny_context(tiny_card())
    method = DER(build(DERConfig, {"balanced_epochs": 1}, "test"), ctx)
    for t in range(2):
        task = stream.task(t)
        engine.begin_task(0, t)
        method.learn(task, ctx)
        method.eval()
        counts: dict = {}
        handles = _count_images(method.stack.extractors, counts, lambda i: ("herding", i))
        memory.update(task.classes, stream.class_indices, lambda idx: engine.apply(method.features, idx),
                      engine.order_gen)
        for h in handles:
            h.remove()
        handles = _count_images(method.stack.extractors, counts, lambda i: ("eval", i))
        evaluate(method, stream, engine, task)
        for h in handles:
            h.remove()
        assert counts == {**{("herding", i): len(task.train_idx) for i in range(t + 1)},
                          **{("eval", i): len(task.test_idx) for i in range(t + 1)}}


def test_seed_statistics_forward_each_expert_once_per_state_it_is_fitted_in(monkeypatch):
    """Outside training, an expert sees each of the task's images twice (itself and its flip) per Gaussian fit:
    every expert once per task, and the fine-tuned expert once more after fine-tuning (its features changed)."""
    from cilbench.methods.seed import SEED, SEEDConfig
    from harness import tiny_card, tiny_context

    from cilbench.config import build
    ctx, stream, engine, _ = tiny_context(tiny_card())
    method = SEED(build(SEEDConfig, {"experts": 2, "latent_dim": 8}, "test"), ctx)
    in_fit = []
    real_fit = engine.fit

    def fit(*args, **kwargs):
        in_fit.append(True)
        try:
            return real_fit(*args, **kwargs)
        finally:
            in_fit.pop()

    monkeypatch.setattr(engine, "fit", fit)
    for t in range(3):
        task = stream.task(t)
        engine.begin_task(0, t)
        counts: dict = {}
        real_new = method.new_expert

        def new_expert(ctx, real_new=real_new, counts=counts):   # the expert created in this task is hooked too
            net = real_new(ctx)
            net._forward_hooks.clear()            # a copy of expert 1 carries a copy of its hook
            _count_images([net], counts, lambda i, k=len(method.experts): k, lambda: not in_fit)
            return net

        monkeypatch.setattr(method, "new_expert", new_expert)
        handles = _count_images(method.experts, counts, lambda i: i, lambda: not in_fit)
        method.learn(task, ctx)
        for h in handles:
            h.remove()
        for net in method.experts:
            net._forward_hooks.clear()
        two_n = 2 * len(task.train_idx)
        expected = {k: two_n for k in range(len(method.experts))}
        if method.log[-1]["mode"] == "finetune":
            expected[method.log[-1]["expert"]] += two_n
        assert counts == expected, (t, counts)


def test_der_prune_evaluates_physically_pruned_extractors_without_masks():
    """After pruning, inference runs smaller networks (the kept channels only), not full ones with mask hooks."""
    from cilbench.methods.der import DER, DERConfig
    from harness import tiny_card, tiny_context

    from cilbench.config import build
    from cilbench.kit.backbones import count_params
    from cilbench.run.runner import evaluate
    ctx, stream, engine, memory = tiny_context(tiny_card(), max_epochs=2)
    method = DER(build(DERConfig, {"prune": True, "sparsity_weight": 3.0, "balanced_epochs": 1}, "test"), ctx)
    for t in range(2):
        engine.begin_task(0, t)
        method.learn(stream.task(t), ctx)
    evaluate(method, stream, engine, stream.task(1))
    for ext, log in zip(method.stack.extractors, method.log):
        assert count_params(ext) == log["params_after"] < log["params_before"]
        assert ext.out_dim == log["out_dim"]
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ext.modules())
    assert method.head.in_features == sum(log["out_dim"] for log in method.log)
