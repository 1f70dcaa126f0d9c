"""The fit loop: schedules, epoch caps, batching, the NaN guard, frozen extractors, and exact resume."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch import nn

from cilbench.data.datasets import load_digits
from cilbench.data.protocol import TrainConfig, load_protocol
from cilbench.data.stream import Stream
from cilbench.errors import TrainingDiverged
from cilbench.kit.backbones import build_backbone
from cilbench.kit.nets import ExtractorStack
from cilbench.run.rundir import TIMING_METRICS
from cilbench.train.engine import Engine, RuntimeOptions, phase_config, schedule_factor

CPU = torch.device("cpu")


# --- schedules ------------------------------------------------------------------------------------------

def factors(cfg: TrainConfig, epochs: int | None = None) -> list[float]:
    epochs = epochs or cfg.epochs
    return [schedule_factor(cfg, epochs, e) for e in range(epochs)]


def test_cosine_schedule():
    cfg = TrainConfig(epochs=4, schedule="cosine")
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert factors(cfg) == pytest.approx(expected)
    assert factors(cfg) == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)


def test_constant_schedule():
    assert factors(TrainConfig(epochs=3, schedule="constant")) == [1.0, 1.0, 1.0]


def test_multistep_with_warmup_counts_milestones_after_warmup():
    cfg = TrainConfig(epochs=10, schedule="multistep", milestones=[3, 6], gamma=0.1, warmup_epochs=2)
    assert factors(cfg) == pytest.approx([0.5, 1.0,                # linear warm-up
                                          1.0, 1.0, 1.0,           # epochs 0-2 after warm-up
                                          0.1, 0.1, 0.1,           # from milestone 3 (epoch 5)
                                          0.01, 0.01])             # from milestone 6 (epoch 8)


def test_cosine_with_warmup():
    cfg = TrainConfig(epochs=6, schedule="cosine", warmup_epochs=2)
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)]
    assert factors(cfg) == pytest.approx(expected)


def test_capped_phase_keeps_the_schedule_shape():
    cfg = TrainConfig(epochs=170, schedule="multistep", milestones=[80, 120], gamma=0.1, warmup_epochs=10)
    # capped to 17 epochs: warm-up 1 epoch (half lr), milestones at 8 and 12 after it
    f = factors(cfg, 17)
    assert f[0] == pytest.approx(0.5)
    assert f[1:9] == pytest.approx([1.0] * 8)
    assert f[9:13] == pytest.approx([0.1] * 4)
    assert f[13:] == pytest.approx([0.01] * 4)
    cos = TrainConfig(epochs=170, schedule="cosine")
    assert factors(cos, 5) == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 5)) for e in range(5)])


def test_warmup_never_eats_a_whole_short_phase():
    cfg = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=10)
    assert factors(cfg, 1) == pytest.approx([1.0])
    f = factors(cfg, 10)
    assert f[:9] == pytest.approx([(e + 1) / 10 for e in range(9)])
    assert f[9] == pytest.approx(1.0)


@pytest.mark.parametrize("cap", [2, 3, 5, 16])
def test_capped_warmup_keeps_a_ramp_below_full_lr(cap):
    """DER's 10-of-170-epoch warm-up under --epochs caps below 17: it used to round to 0 epochs (no warm-up)
    or to 1 epoch at full lr."""
    cfg = TrainConfig(epochs=170, schedule="multistep", milestones=[100, 120], gamma=0.1, warmup_epochs=10)
    f = factors(cfg, cap)
    assert f[0] < 1.0
    assert f[1:] and max(f) == pytest.approx(1.0)
    ramp = [x for x in f if x < 1.0 - 1e-9][: max(1, round(10 * cap / 170))]
    assert ramp == sorted(ramp)
    assert factors(TrainConfig(epochs=4, warmup_epochs=0), 2)[0] == 1.0      # no warm-up asked: none added


def test_phase_config_derives_a_budget():
    base = TrainConfig(epochs=170, lr=0.1, weight_decay=5e-4)
    kd = phase_config(base, epochs=130, weight_decay=0.0)
    assert (kd.epochs, kd.weight_decay, kd.lr) == (130, 0.0, 0.1)
    assert base.epochs == 170 and base.weight_decay == 5e-4


# --- engine on the digits stream ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    p = load_protocol("digits_b0s2")
    return p, load_digits(p.data)


@pytest.fixture
def make_engine(digits):
    def make(**options):
        p, dataset = digits
        events: list[dict] = []
        stream = Stream(p, dataset, CPU)
        engine = Engine(stream, RuntimeOptions(device="cpu", **options), CPU, on_epoch=events.append)
        engine.begin_task(0, 0)
        return engine, events
    return make


class Linear(nn.Module):
    def __init__(self, d_in=64, d_out=10):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_fit_applies_the_schedule_and_reports_epochs(make_engine):
    engine, events = make_engine()
    model = Linear()
    cfg = TrainConfig(epochs=4, batch_size=50, lr=0.2, momentum=0.0, schedule="multistep", milestones=[2],
                      gamma=0.5, warmup_epochs=1, weight_decay=0.0)
    idx = engine.stream.task(0).train_idx
    applied = {}
    snap = {}

    def loss(batch):
        return nn.functional.cross_entropy(model(batch.x), batch.y)

    def before(batch):     # between backward and the optimiser step
        snap["w"], snap["g"] = model.fc.bias.detach().clone(), model.fc.bias.grad.detach().clone()

    def after(batch):      # the SGD step taken was -lr * grad
        if batch.step == 0:
            step = snap["w"] - model.fc.bias.detach()
            applied[batch.epoch] = float(step[snap["g"].abs().argmax()] / snap["g"][snap["g"].abs().argmax()])

    result = engine.fit(model.parameters(), loss, idx, cfg, phase="ce", modules=[model], before_step=before,
                        after_step=after)
    assert result.epochs == 4 and len(result.history) == 4
    assert [e["epoch"] for e in events] == [0, 1, 2, 3]
    assert {e["phase"] for e in events} == {"ce"} and {e["task"] for e in events} == {0}
    expected = [0.2 * f for f in factors(cfg)]
    assert expected == pytest.approx([0.1, 0.2, 0.2, 0.1])     # a one-epoch warm-up starts below full lr
    assert [e["lr"] for e in events] == pytest.approx(expected)
    assert [applied[e] for e in range(4)] == pytest.approx(expected, rel=1e-4)
    assert result.images == 4 * len(idx)
    assert [e["loss"] for e in events] == pytest.approx(result.history)
    assert all(math.isfinite(v) for v in result.history)


def test_epoch_cap_and_batching(make_engine):
    engine, events = make_engine(max_epochs=2)
    model = Linear()
    cfg = TrainConfig(epochs=8, batch_size=32)
    assert engine.epochs_for(cfg) == 2
    idx = engine.stream.task(1).train_idx
    seen: dict[int, list[torch.Tensor]] = {}
    steps = set()

    def loss(batch):
        seen.setdefault(batch.epoch, []).append(batch.idx)
        steps.add(batch.steps_per_epoch)
        assert batch.x.shape[1:] == (1, 8, 8) and batch.x.dtype == torch.float32
        assert torch.equal(batch.y, engine.stream.train.labels[batch.idx])
        return nn.functional.cross_entropy(model(batch.x), batch.y)

    result = engine.fit(model.parameters(), loss, idx, cfg)
    assert result.epochs == 2 and len(events) == 2
    assert steps == {math.ceil(len(idx) / 32)}
    for epoch, batches in seen.items():
        assert sorted(torch.cat(batches).tolist()) == sorted(idx.tolist())   # every sample once per epoch
    assert not torch.equal(torch.cat(seen[0]), torch.cat(seen[1]))            # reshuffled every epoch
    assert engine.epochs_for(TrainConfig(epochs=1)) == 1
    uncapped, _ = make_engine()
    assert uncapped.epochs_for(cfg) == 8


def test_batch_order_is_reseeded_per_task(make_engine):
    def first_batches(task):
        engine, _ = make_engine()
        engine.begin_task(3, task)
        return [b.clone() for b in engine.batches(torch.arange(100), 10, shuffle=True)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_clip_norm_bounds_the_update(make_engine):
    engine, _ = make_engine()
    model = Linear()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = TrainConfig(epochs=1, batch_size=2000, lr=1.0, momentum=0.0, weight_decay=0.0, clip_norm=1e-3,
                      schedule="constant")
    engine.fit(model.parameters(), lambda b: 1e3 * nn.functional.cross_entropy(model(b.x), b.y),
               engine.stream.task(0).train_idx, cfg)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    step = float(torch.linalg.vector_norm(after - before))
    assert 0 < step <= 1e-3 * 1.0001


def test_apply_runs_on_test_transformed_images(make_engine):
    engine, _ = make_engine()
    idx = engine.stream.task(2).test_idx
    out = engine.apply(lambda x: x.flatten(1), idx, split="test", batch_size=7)
    expected = engine.augmenter.test(engine.stream.test.images[idx]).flatten(1)
    assert torch.allclose(out, expected)
    assert engine.apply(lambda x: x, idx[:0], split="test").numel() == 0


# --- NaN guard ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_guard_names_task_and_epoch(make_engine, bad):
    engine, events = make_engine()
    engine.begin_task(0, 3)
    model = Linear()

    def loss(batch):
        base = nn.functional.cross_entropy(model(batch.x), batch.y)
        return base * bad if (batch.epoch == 1 and batch.step == 1) else base

    with pytest.raises(TrainingDiverged) as info:
        engine.fit(model.parameters(), loss, engine.stream.task(0).train_idx,
                   TrainConfig(epochs=3, batch_size=64), phase="kd")
    exc = info.value
    assert (exc.task, exc.epoch, exc.phase) == (3, 1, "kd")
    assert "task 4, epoch 2" in str(exc) and "kd" in str(exc)   # messages count from 1
    assert len(events) == 1                          # epoch 0 finished, epoch 1 did not


def test_diverged_run_is_marked_failed(tmp_path, run_cli, monkeypatch, nothing_complete):
    from cilbench.methods.baselines import Replay

    original = Replay.loss

    def loss(self, batch):
        value = original(self, batch)
        return value * float("nan") if self.head.out_features > 2 else value   # from task 1 on

    monkeypatch.setattr(Replay, "loss", loss)
    res = run_cli("replay", "digits_b0s2", tmp_path)
    assert res.exit_code == 1
    assert "task 2, epoch 1" in res.stderr        # the second task, its first epoch (1-based)
    run = tmp_path / "digits_b0s2" / "replay" / "seed0"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert "task 2, epoch 1" in manifest["error"]
    assert manifest["tasks_done"] == 1
    assert manifest["finished"] is not None
    assert nothing_complete(tmp_path)
    with open(run / "steps.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 1


# --- frozen extractors ----------------------------------------------------------------------------------------

def test_frozen_extractor_stays_in_eval_and_bit_identical(make_engine):
    engine, _ = make_engine()
    torch.manual_seed(0)
    old = build_backbone("resnet20", 1, 4)
    new = build_backbone("resnet20", 1, 4)
    with torch.no_grad():      # move the BN statistics away from their initial values first
        old.train()
        old(engine.augmenter.test(engine.stream.train.images[:64]))
    stack = ExtractorStack()
    stack.add(old, frozen=True)
    stack.add(new)
    head = nn.Linear(stack.out_dim, 10)
    frozen_before = {k: v.clone() for k, v in old.state_dict().items()}
    new_before = {k: v.clone() for k, v in new.state_dict().items()}
    modes = []

    def loss(batch):
        modes.append((all(not m.training for m in old.modules()), all(m.training for m in new.modules())))
        return nn.functional.cross_entropy(head(stack(batch.x)), batch.y)

    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, weight_decay=5e-4)
    # every parameter of the stack is handed to the optimiser: the frozen ones must still not move
    engine.fit([*stack.parameters(), *head.parameters()], loss, engine.stream.task(0).train_idx[:96], cfg,
               modules=[stack, head])
    assert modes and all(frozen_eval and new_train for frozen_eval, new_train in modes)
    assert all(not m.training for m in old.modules())
    for k, v in old.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen {k} changed"
    assert all(p.grad is None for p in old.parameters())
    changed = [k for k, v in new.state_dict().items() if not torch.equal(v, new_before[k])]
    assert any("running_mean" in k for k in changed) and any(k.endswith("conv1.weight") for k in changed)


@pytest.mark.parametrize("amp", [False, True])
def test_fit_on_a_frozen_network_trains_as_the_loss_would_batch_by_batch(make_engine, amp):
    """fit(frozen=f) sends blocks of augmented batches through f at once: the same images in the same order,
    the same steps (so the same head, to float rounding) and the generators left where a batch-by-batch fit
    leaves them; several blocks per epoch, a short last batch, two views, and under bf16 autocast (CUDA's path)."""
    heads, states, inputs = [], [], []
    for block_fit in (False, True):
        engine, _ = make_engine(inference_batch=64)     # 64 images per frozen forward: 2 batches per block
        engine.amp = amp
        torch.manual_seed(0)
        extractor = build_backbone("resnet20", 1, 4).eval()
        head = nn.Linear(extractor.out_dim, 10)
        seen = []

        def loss(batch):
            feats = batch.views if block_fit else [extractor(v).detach() for v in batch.views]
            seen.append([f.dtype for f in feats])
            inputs.append(torch.cat(feats).float())
            return sum(nn.functional.cross_entropy(head(f).float(), batch.y) for f in feats)

        idx = engine.stream.task(0).train_idx[:150]          # 5 batches of 32: the last has 22
        cfg = TrainConfig(epochs=2, batch_size=32, lr=0.1, weight_decay=5e-4)
        engine.fit(head.parameters(), loss, idx, cfg, views=2, frozen=extractor if block_fit else None)
        assert len(seen) == 10 and all(d == [torch.bfloat16 if amp else torch.float32] * 2 for d in seen)
        heads.append(head.state_dict())
        states.append([g.get_state() for g in (engine.order_gen, engine.augmenter.gen)] + [torch.get_rng_state()])
    batch_by_batch, blocks = inputs[:10], inputs[10:]
    tol = 2e-2 if amp else 1e-5          # bf16 convolutions round differently with the batch size
    for a, b in zip(batch_by_batch, blocks):
        assert a.shape == b.shape and torch.allclose(a, b, atol=tol, rtol=tol)
    for k in heads[0]:
        assert torch.allclose(heads[0][k], heads[1][k], atol=tol, rtol=tol), k
    assert all(torch.equal(a, b) for a, b in zip(*states))


def test_fit_refuses_a_frozen_network_in_train_mode(make_engine):
    engine, _ = make_engine()
    extractor = build_backbone("resnet20", 1, 4)          # train mode: BN would use each block's statistics
    head = nn.Linear(extractor.out_dim, 10)
    with pytest.raises(ValueError, match="'clf'.*train mode"):
        engine.fit(head.parameters(), lambda b: head(b.x).sum(), engine.stream.task(0).train_idx[:32],
                   TrainConfig(epochs=1, batch_size=32, lr=0.1), phase="clf", frozen=extractor)


def test_bench_bare_loop_of_a_frozen_call_reads_the_frozen_outputs(make_engine):
    """bench --method's bare window replays a fit(frozen=...) call as the engine runs it: features of a block
    of pre-made batches at once, then the method's own loss on them."""
    from cilbench.bench.methods import BareLoopRecorder

    engine, _ = make_engine(inference_batch=64)
    recorder = engine.recorder = BareLoopRecorder()
    torch.manual_seed(0)
    extractor = build_backbone("resnet20", 1, 4).eval()
    head = nn.Linear(extractor.out_dim, 10)
    shapes = []

    def loss(batch):
        shapes.append(tuple(batch.x.shape))
        return nn.functional.cross_entropy(head(batch.x), batch.y)

    idx = engine.stream.task(0).train_idx[:96]
    engine.fit(head.parameters(), loss, idx, TrainConfig(epochs=2, batch_size=32, lr=0.1), phase="clf",
               frozen=extractor)
    assert set(shapes) == {(32, extractor.out_dim)} and len(shapes) == 2 * 3 + 2 * 4   # harness + bare (+1 warm)
    (row,) = recorder.rows("m")
    assert row["name"] == "clf" and row["bare"] > 0


# --- resume -------------------------------------------------------------------------------------------------

def _events(path):
    return [(e["task"], e["phase"], e["epoch"], e["loss"])
            for e in map(json.loads, (path / "events.jsonl").read_text().splitlines())]


def _steps_without_times(path):
    with open(path / "steps.csv") as fh:
        return [{k: v for k, v in row.items() if not k.endswith("_seconds")} for row in csv.DictReader(fh)]


TIMING_KEYS = set(TIMING_METRICS)


def test_resume_gives_the_same_results_as_an_uninterrupted_run(tmp_path, run_cli):
    common = ("--deterministic", "--seed", "3")
    full_out, split_out = tmp_path / "full", tmp_path / "split"
    res = run_cli("replay", "digits_b0s2", full_out, *common)
    assert res.exit_code == 0, res.output

    res = run_cli("replay", "digits_b0s2", split_out, *common, "--stop-after", "2")
    assert res.exit_code == 0, res.output
    split = split_out / "digits_b0s2" / "replay" / "seed3"
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["tasks_done"] == 2
    assert not (split / "metrics.json").exists()
    assert (split / "checkpoint.pt").exists()
    assert len(_steps_without_times(split)) == 2

    res = run_cli("replay", "digits_b0s2", split_out, *common, "--resume")
    assert res.exit_code == 0, res.output
    full = full_out / "digits_b0s2" / "replay" / "seed3"
    m_full = json.loads((full / "metrics.json").read_text())
    m_split = json.loads((split / "metrics.json").read_text())
    assert set(m_full) == set(m_split)
    assert {k: v for k, v in m_full.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in m_split.items() if k not in TIMING_KEYS}
    assert (full / "acc_matrix.csv").read_text() == (split / "acc_matrix.csv").read_text()
    assert (full / "acc_matrix_top5.csv").read_text() == (split / "acc_matrix_top5.csv").read_text()
    assert _steps_without_times(full) == _steps_without_times(split)
    assert _events(full) == _events(split)
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["tasks_done"] == 5 and manifest["deterministic"]


def test_scores_and_herding_features_float32_under_bf16_training(make_engine):
    """CUDA trains under bf16 autocast; forced on here for CPU (the same code path). Training sees bf16,
    evaluation and herding features (Engine.apply) stay float32 and equal an amp-off engine bit for bit."""
    engine, _ = make_engine()
    engine.amp = True
    torch.manual_seed(0)
    model = Linear()
    seen = []

    def loss(batch):
        out = model(batch.x)
        seen.append(out.dtype)
        return nn.functional.cross_entropy(out.float(), batch.y)

    idx = engine.stream.task(0).train_idx
    engine.fit(model.parameters(), loss, idx, TrainConfig(epochs=1, batch_size=64, lr=0.01), modules=[model])
    assert set(seen) == {torch.bfloat16}
    model.eval()

    def scores(x):
        out = model(x)
        seen.append(out.dtype)
        return out

    seen.clear()
    amp_scores = engine.apply(scores, idx)
    assert set(seen) == {torch.float32}
    reference, _ = make_engine()
    assert torch.equal(amp_scores, reference.apply(model, idx))
    with engine.autocast():      # what the old apply computed: bf16 scores differ and tie
        bf16 = model(engine.augmenter.test(engine.stream.train.images[idx])).float()
    assert not torch.equal(bf16, amp_scores)
