"""`cilbench bench --method M`: a method's training phases through the harness against bare loops built from the
same phase, and where the time of a short run goes.

For each method, one short run goes through the real runner (`cilbench run`'s code path) on a generated
CIFAR-100-shaped set (3x32x32, 100 classes, B0 with 5 tasks of 20 classes, ResNet-32, batch 128, herding;
methods whose first regime is online: 10 tasks of 10 classes, stream batch 10 + replay 10, reduced ResNet-18).
Every phase is capped at `epochs` epochs.

Nothing about a method is written here. A recorder attached to the run's engine sees every `Engine.fit` call (the
parameters, the method's own loss function, the modules, the views, the TrainConfig) and, right after each epoch
of a measured call, runs a bare window of that same phase: the same `loss_fn` over pre-made batches already on
the device (views augmented beforehand, labels, indices, epoch and step fields), a fresh optimiser of the
call's kind over the same parameters, forward, backward, the method's gradient surgery (`before_step`),
clipping, step. No batching, augmentation of the stream batch, events or `after_step` bookkeeping (online
buffer inserts). What the loss itself does (a replay draw, a second augmentation) is the method's work and is in
both. The networks, parameters, data positions and generators are put back after each window, so the run
continues as if no window had been run (BN statistics of networks the method puts in train mode itself
excepted: they only change the bench run's accuracy, never its work).

The windows interleave: harness epoch 1, bare window 1, harness epoch 2, bare window 2, ... The first pair of a
call is warm-up (one-off costs); a phase with one epoch per call (online) pools its calls over the tasks, the
first call being the warm-up. Each figure is the median over the windows with its spread, and the ratio the
median of the pairwise ratios with their range, so a ratio carries its noise. The harness figure is the epoch's
images/s as events.jsonl records it. Measured calls: a phase's first occurrence and every phase of the last
task (multi-epoch phases), every call (one-epoch phases).

The run's time split (fit, statistics, herding, eval, checkpoint, other) is read from its metrics.json; the
bare windows are not in it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from cilbench.errors import UserError
from cilbench.safeio import atomic_write
from cilbench.train.engine import Batch, Engine, FitCall, flat_params, make_optimizer

CIFAR_MEAN, CIFAR_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
CLASSES, TASKS = 100, 5
ONLINE_TASKS = 10


def offline_card(per_class: int) -> dict:
    step = CLASSES // TASKS
    return {
        "name": "bench_offline", "description": "CIFAR-100-shaped generated set for cilbench bench --method",
        "source": "cilbench bench", "dataset": "synthetic", "num_classes": CLASSES, "class_order": "natural",
        "base": 0, "step": step, "tasks": TASKS, "regime": "offline",
        "memory": {"policy": "fixed_total", "total": max(10 * per_class, 2 * CLASSES), "selection": "herding"},
        "backbone": {"name": "resnet32"},
        "train": {"epochs": 170, "batch_size": 128, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9,
                  "weight_decay": 5e-4, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
        "augment": {"crop_padding": 4, "flip": True, "brightness": 63 / 255, "mean": CIFAR_MEAN, "std": CIFAR_STD},
        "eval_batch_size": 1000,
        "data": {"synthetic": {"classes": CLASSES, "image_size": 32, "channels": 3, "train_per_class": per_class,
                               "test_per_class": max(per_class // 4, 1), "noise": 1.0, "seed": 0}},
        # SEED with K = 3 experts, so tasks 4-5 fine-tune a selected expert; EXACFS on PODNet's ResNet-32;
        # DyTox's encoder at a quarter width with 2 + 1 blocks (the paper's 384-wide, 5 + 1-block ConViT takes
        # minutes per epoch on a CPU; the code path, AdamW and all, is the same)
        "methods": {"seed": {"experts": 3}, "exacfs": {"backbone": "resnet32_podnet"},
                    "dytox": {"embed_dim": 96, "heads": 4, "sab_depth": 2, "tab_depth": 1, "patch_size": 4}},
    }


def online_card(per_class: int) -> dict:
    card = offline_card(per_class)
    card.update(name="bench_online", step=CLASSES // ONLINE_TASKS, tasks=ONLINE_TASKS, regime="online",
                memory={"policy": "reservoir", "size": 1000}, backbone={"name": "resnet18_reduced"},
                train={"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0,
                       "weight_decay": 0.0, "schedule": "constant", "milestones": [], "warmup_epochs": 0},
                online={"replay_batch": 10}, augment={"mean": [0.0] * 3, "std": [1.0] * 3})
    card.pop("methods")
    return card


def bench_card(method: str, per_class: int) -> dict:
    """The online card for a method whose first regime is online (ER, PCR, HPCR), else the offline one."""
    from cilbench.kit.registry import get_method
    online = get_method(method).cls.regimes[0] == "online"
    return online_card(per_class) if online else offline_card(per_class)


# ---------------------------------------------------------------------------------------------------------
# The bare loop: one window of a recorded phase's training step, outside the engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def premade_batches(engine: Engine, call: FitCall) -> list[Batch]:
    """One epoch of the call's batches, augmented beforehand, on the device (as the engine would make them)."""
    order = engine.batches(call.indices, call.cfg.batch_size, call.shuffle, call.drop_last)
    batches = []
    for step, idx in enumerate(order):
        views, labels = engine.train_views(idx, call.views)
        batches.append(Batch(views, labels, idx, 0, step, call.steps_per_epoch))
    return batches


def _generators(engine: Engine) -> list[torch.Generator]:
    return [engine.order_gen, engine.augmenter.gen, engine.device_gen]


@contextlib.contextmanager
def put_back(engine: Engine, call: FitCall):
    """Whatever a bare window changes comes back afterwards: the parameters' values, the buffers of the call's
    modules (BN statistics), the engine's generators and torch's global one, and no gradients are left."""
    params = flat_params(call.params)
    values = [p.detach().clone() for p in params]
    buffers = [(b, b.detach().clone()) for m in call.modules for b in m.buffers()]
    gens = [(g, g.get_state()) for g in _generators(engine)]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if engine.cuda else None
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
                p.grad = None
            for b, v in buffers:
                b.copy_(v)
        for g, state in gens:
            g.set_state(state)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def bare_step(engine: Engine, call: FitCall, optimizer, batch: Batch) -> None:
    """The phase's training step with nothing around it: the method's loss, backward, gradient surgery,
    clipping, the optimiser's step (under the engine's autocast, as the harness runs it)."""
    with engine.autocast():
        loss = call.loss_fn(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if call.before_step is not None:
        call.before_step(batch)
    if call.cfg.clip_norm:
        torch.nn.utils.clip_grad_norm_(flat_params(call.params), call.cfg.clip_norm)
    optimizer.step()


def through_frozen(engine: Engine, call: FitCall, batches: list[Batch]) -> list[Batch]:
    """A fit(frozen=...) call's loss reads the frozen network's outputs: one forward for the block of batches."""
    if call.frozen is None:
        return batches
    outputs = engine.frozen_views(call.frozen, [b.views for b in batches])
    return [dataclasses.replace(b, views=out) for b, out in zip(batches, outputs)]


def bare_window(engine: Engine, call: FitCall, batches: list[Batch], epoch: int) -> float:
    """Images/s of one bare pass over `batches` (stream samples, as the harness counts them). One untimed step
    first: a fresh optimiser allocates its state in its first step."""
    batches = [dataclasses.replace(b, epoch=epoch) for b in batches]
    with put_back(engine, call):
        groups = [dict(g) if isinstance(g, dict) else g for g in call.params]   # the harness's groups stay its own
        optimizer = make_optimizer(groups, call.cfg)
        for m in call.modules:
            m.train()
        bare_step(engine, call, optimizer, through_frozen(engine, call, batches[:1])[0])
        _sync(engine.device)
        t0 = time.perf_counter()
        per_block = engine.frozen_block_batches(call.cfg.batch_size) if call.frozen else len(batches)
        for start in range(0, len(batches), per_block):
            for batch in through_frozen(engine, call, batches[start:start + per_block]):
                bare_step(engine, call, optimizer, batch)
        _sync(engine.device)
        seconds = time.perf_counter() - t0
    return sum(len(b.idx) for b in batches) / max(seconds, 1e-9)


# ---------------------------------------------------------------------------------------------------------
# The recorder: which calls are measured, and their interleaved windows


@dataclass
class Window:
    harness: float       # images/s of the harness's epoch (its events.jsonl figure)
    bare: float          # images/s of the bare window that followed it
    warm_up: bool        # a call's first epoch, or a one-epoch phase's first call


@dataclass
class PhaseFigures:
    phase: str           # the engine's phase name (events.jsonl)
    label: str
    windows: list[Window] = field(default_factory=list)

    def timed(self) -> list[Window]:
        """The windows after warm-up (all of them when warm-up is all there is)."""
        return [w for w in self.windows if not w.warm_up] or self.windows


def describe_call(call: FitCall) -> str:
    trained = sum(p.numel() for p in flat_params(call.params) if p.requires_grad)
    views = f", {call.views} views" if call.views > 1 else ""
    return f"{trained / 1e6:.2f}M trained{views}"


class BareLoopRecorder:
    """Attached to the engine of bench's short run (Engine.recorder): after each epoch of a measured fit call, a
    bare window of the same call. One call is active at a time; its pre-made batches live while it does."""

    def __init__(self):
        self.phases: dict[tuple, PhaseFigures] = {}
        self.seen: set[str] = set()            # phase names met so far
        self.counts: dict[tuple, int] = {}     # calls per (task, phase): a phase may train twice in a task
        self.active: tuple[FitCall, tuple, list[Batch]] | None = None

    def after_epoch(self, engine: Engine, call: FitCall, event: dict) -> None:
        if self.active is None or self.active[0] is not call:
            self.active = self._start(engine, call)
        _, key, batches = self.active
        if key is None:
            return
        bare = bare_window(engine, call, batches, event["epoch"])
        figures = self.phases[key]
        warm_up = event["epoch"] == 0 and (call.epochs > 1 or len(figures.windows) == 0)
        figures.windows.append(Window(event["images_per_s"], bare, warm_up))

    def _start(self, engine: Engine, call: FitCall) -> tuple[FitCall, tuple | None, list[Batch]]:
        """A new call: decide whether it is measured, under which row, and pre-make its batches if so."""
        n = self.counts[(call.task, call.phase)] = self.counts.get((call.task, call.phase), 0) + 1
        first = call.phase not in self.seen
        self.seen.add(call.phase)
        last_task = call.task == engine.stream.num_tasks - 1
        if call.epochs == 1:      # online: one pass per task, pooled over the tasks
            key, label = (call.phase,), f"{call.phase}, one epoch per task, pooled ({describe_call(call)})"
        elif first or last_task:
            nth = f" #{n}" if n > 1 else ""
            key = (call.phase, call.task, n)
            label = f"{call.phase}{nth}, task {call.task + 1} ({describe_call(call)})"
        else:
            return call, None, []
        self.phases.setdefault(key, PhaseFigures(call.phase, label))
        with put_back(engine, call):          # making the batches draws from the run's generators
            batches = premade_batches(engine, call)
        return call, key, batches

    def rows(self, method: str) -> list[dict]:
        return [phase_row(method, figures) for figures in self.phases.values()]


def spread(values: list[float]) -> float:
    """Half the range over the median: a figure's relative noise (0 for one window)."""
    middle = statistics.median(values)
    return (max(values) - min(values)) / 2 / middle if middle else 0.0


def phase_row(method: str, figures: PhaseFigures) -> dict:
    windows = figures.timed()
    harness, bare = [w.harness for w in windows], [w.bare for w in windows]
    ratios = [w.harness / w.bare for w in windows]
    return {"method": method, "phase": figures.label, "name": figures.phase, "windows": len(windows),
            "harness": statistics.median(harness), "harness_spread": spread(harness),
            "bare": statistics.median(bare), "bare_spread": spread(bare),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


# ---------------------------------------------------------------------------------------------------------
# Running


def bench_method(name: str, device: str, per_class: int, epochs: int, out: Path) -> dict:
    from cilbench.run.runner import RunRequest, execute
    card = bench_card(name, per_class)
    card_file = out / f"{card['name']}.yaml"
    atomic_write(card_file, yaml.safe_dump(card, sort_keys=False))
    recorder = BareLoopRecorder()
    run = execute(RunRequest(method=name, protocol=str(card_file), epochs=epochs, device=device, out=str(out),
                             quiet=True, force=True, overrides=["runtime.divergence_factor=0"]), recorder=recorder)
    metrics = json.loads((run / "metrics.json").read_text())
    return {"method": name, "phases": recorder.rows(name), "time_split": metrics["time_split"], "run": run}


def run_method_bench(methods: list[str], device: str = "auto", per_class: int = 32, epochs: int = 6) -> list[dict]:
    from cilbench.kit.registry import known_methods
    names = sorted(known_methods()) if "all" in methods else list(dict.fromkeys(methods))
    unknown = [m for m in names if m not in known_methods()]
    if unknown:
        raise UserError(f"bench --method {unknown[0]}: unknown method; known: {', '.join(known_methods())} "
                        "(or all)")
    if epochs < 2:
        raise UserError(f"bench --epochs {epochs}: need >= 2 (the first epoch of a phase is warm-up)")
    if per_class < 1:
        raise UserError(f"bench --per-class {per_class}: need >= 1 training image per class")
    results = []
    with tempfile.TemporaryDirectory(prefix="cilbench-bench-") as tmp:
        for name in names:
            result = bench_method(name, device, per_class, epochs, Path(tmp))
            results.append(result)
            print_result(result)
    return results


def print_result(result: dict) -> None:
    for row in result["phases"]:
        print(f"{row['method']:<10} {row['phase']:<52} harness {row['harness']:7.1f} img/s "
              f"±{row['harness_spread']:4.0%}   bare loop {row['bare']:7.1f} img/s ±{row['bare_spread']:4.0%}   "
              f"{row['ratio']:4.0%} "
              f"[{row['ratio_min']:.0%}-{row['ratio_max']:.0%}] over {row['windows']} window(s)", flush=True)
    split = result["time_split"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k not in ("wall", "first_step"))
    print(f"{result['method']:<10} short run {split['wall']:.1f} s: {parts}", flush=True)
