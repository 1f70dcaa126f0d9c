"""`cilbench bench --method M`: a method's training phases through the harness against bare loops, and where
the time of a short run goes.

For each method, one short run goes through the real runner (`cilbench run`'s code path) on a generated
CIFAR-100-shaped set (3x32x32, 100 classes, B0 with 5 tasks of 20 classes, ResNet-32, batch 128, herding;
the online methods: 10 tasks of 10 classes, stream batch 10 + replay 10, reduced ResNet-18). Every phase is
capped at `epochs` epochs. A phase's harness speed is its best epoch after the first (the first pays one-off
costs) in the task where it is measured; the bare loop's is its best of three windows of as many steps
(best-of timing, as timeit: interference on a shared machine only slows a window down).

The bare loop runs the same networks (architectures, frozen/trainable split, heads, loss terms, optimiser)
at the same batch shapes over pre-made tensors already on the device: no batching, augmentation, memory,
events or method glue, and frozen networks over the whole batch, as one would write it. Loss terms come
from cilbench's loss functions, so the ratio measures what the harness and the method code add around the
networks' own compute, not the maths of the losses. Images count stream samples, as the harness does
(replayed samples and second views are extra work inside a step).

The run's time split (fit, statistics, herding, eval, checkpoint, other) is read from its metrics.json.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from cilbench.errors import UserError
from cilbench.kit.backbones import build_backbone, standard_spec
from cilbench.kit.losses import aux_labels, kd_soft_ce, nca_margin_loss, pcr_loss, supcon_distinct
from cilbench.kit.nets import LocalSimilarityHead, ProjectionHead, freeze
from cilbench.safeio import atomic_write

CIFAR_MEAN, CIFAR_STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]
CLASSES, TASKS = 100, 5
ONLINE_TASKS = 10
ONLINE_METHODS = ("er", "pcr", "hpcr")     # benched on the online card (PCR/HPCR also run offline)


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
        # SEED with K = 3 experts, so tasks 4-5 fine-tune a selected expert; EXACFS on PODNet's ResNet-32
        "methods": {"seed": {"experts": 3}, "exacfs": {"backbone": "resnet32_podnet"}},
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


# ---------------------------------------------------------------------------------------------------------
# Bare loops: each returns a step function (called with a step number) over pre-made tensors


@dataclass
class Shapes:
    batch: int
    n_seen: int
    n_old: int
    device: torch.device
    specs: list[dict] | None = None    # the run's extractors as built (DER: pruned ones are smaller)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


def _inputs(shapes: Shapes, steps: int, rows: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-made normalised inputs and labels; a third of each batch is old classes (memory), as in the runs."""
    rows = rows or shapes.batch
    fmt = torch.channels_last if shapes.cuda else torch.contiguous_format   # as the harness feeds CUDA
    xs = [torch.randn(rows, 3, 32, 32, device=shapes.device).contiguous(memory_format=fmt) for _ in range(steps)]
    n_old_rows = rows // 3 if shapes.n_old else 0
    ys = []
    for _ in range(steps):
        old = torch.randint(0, max(shapes.n_old, 1), (n_old_rows,))
        new = torch.randint(shapes.n_old, shapes.n_seen, (rows - n_old_rows,))
        ys.append(torch.cat([old, new]).to(shapes.device))
    return xs, ys


def _sgd(params, lr=0.1, momentum=0.9, weight_decay=5e-4) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _on(module: nn.Module, shapes: Shapes) -> nn.Module:
    """On the device, channels_last on CUDA (as Engine.prepare)."""
    module = module.to(shapes.device)
    return module.to(memory_format=torch.channels_last) if shapes.cuda else module


def _net(shapes: Shapes, name: str = "resnet32") -> nn.Module:
    return _on(build_backbone(name), shapes)


def _frozen(n: int, shapes: Shapes, name: str = "resnet32") -> list[nn.Module]:
    """n frozen extractors: the run's own architectures where known (shapes.specs), else `name`."""
    specs = (shapes.specs or [])[:n]
    nets = [build_backbone(spec) for spec in specs] + [build_backbone(name) for _ in range(n - len(specs))]
    return [freeze(_on(net, shapes)) for net in nets]


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: list | None = None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(clip[0], clip[1])
    opt.step()


def bare_one_network(shapes: Shapes, steps: int, name: str = "resnet32"):
    """finetune / replay / joint: backbone + linear head, CE."""
    net = _net(shapes, name).train()
    head = nn.Linear(net.out_dim, shapes.n_seen).to(shapes.device)
    opt = _sgd([*net.parameters(), *head.parameters()])
    xs, ys = _inputs(shapes, steps)
    return lambda i: _step(opt, F.cross_entropy(head(net(xs[i])), ys[i]))


def bare_der(extractors: int, prune: bool = False):
    def build(shapes: Shapes, steps: int):
        from cilbench.kit.pruning import ChannelMasks, anneal
        frozen = _frozen(extractors - 1, shapes)
        new = _net(shapes).train()
        head = nn.Linear(sum(f.out_dim for f in frozen) + new.out_dim, shapes.n_seen).to(shapes.device)
        aux = nn.Linear(64, shapes.n_seen - shapes.n_old + 1).to(shapes.device) if shapes.n_old else None
        params = [*new.parameters(), *head.parameters(), *(aux.parameters() if aux else [])]
        masks = ChannelMasks(new, init_mean=1.0, init_std=0.5).attach() if prune else None
        groups = [{"params": params}] + ([{"params": list(masks.parameters()), "weight_decay": 0.0}] if masks else [])
        opt = _sgd(groups)
        xs, ys = _inputs(shapes, steps)

        def step(i):
            if masks is not None:
                masks.s = anneal(i % 5, 5, masks.s_max)
            with torch.no_grad():
                feats = [f(xs[i]) for f in frozen]
            f_new = new(xs[i])
            loss = F.cross_entropy(head(torch.cat([*feats, f_new], 1)), ys[i])
            if aux is not None:
                loss = loss + F.cross_entropy(aux(f_new), aux_labels(ys[i], shapes.n_old))
            if masks is not None:
                loss = loss + 0.75 * masks.sparsity()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if masks is not None:
                masks.compensate("hat", 50.0)
            opt.step()
            if masks is not None:
                masks.clamp_(6.0)
        return step
    return build


def bare_der_classifier(extractors: int):
    def build(shapes: Shapes, steps: int):
        frozen = _frozen(extractors, shapes)
        head = nn.Linear(sum(f.out_dim for f in frozen), shapes.n_seen).to(shapes.device)
        opt = _sgd(head.parameters())
        xs, ys = _inputs(shapes, steps)

        def step(i):
            with torch.no_grad():
                u = torch.cat([f(xs[i]) for f in frozen], 1)
            _step(opt, F.cross_entropy(head(u) / 5.0, ys[i]))
        return step
    return build


def bare_tsd_ce(frozen_count: int):
    """CE over [frozen; new] on view 1 + 0.1 SupCon on both views of the new extractor, frozen negatives."""
    def build(shapes: Shapes, steps: int):
        frozen = _frozen(frozen_count, shapes)
        new = _net(shapes).train()
        head = nn.Linear(64 * (frozen_count + 1), shapes.n_seen).to(shapes.device)
        proj = ProjectionHead(64, 128).to(shapes.device)
        opt = _sgd([*new.parameters(), *head.parameters(), *proj.parameters()])
        xs, ys = _inputs(shapes, steps)
        views2 = [torch.randn_like(x) for x in xs]

        def step(i):
            x1, x2, y = xs[i], views2[i], ys[i]
            f_all = new(torch.cat([x1, x2]))
            f1 = f_all[: len(y)]
            with torch.no_grad():
                feats = [f(x1) for f in frozen]
            loss = F.cross_entropy(head(torch.cat([*feats, f1], 1)), y)
            labels = torch.cat([y, y])
            old = y < shapes.n_old
            extra = proj(torch.cat([f[old] for f in feats])) if feats and shapes.n_old else None
            loss = loss + 0.1 * supcon_distinct(proj(f_all), labels, labels >= shapes.n_old, extra, 0.07)
            _step(opt, loss)
        return step
    return build


def bare_tsd_kd(teacher_count: int):
    """Soft-CE KD at T = 2: teacher = `teacher_count` frozen extractors; the student shares all but the last
    of them minus one (the slot being consolidated, a trainable copy), so the frozen forwards run once."""
    def build(shapes: Shapes, steps: int):
        teacher = _frozen(teacher_count, shapes)
        shared = teacher[: teacher_count - 2]
        copy = _net(shapes).train()
        t_head = freeze(nn.Linear(64 * teacher_count, shapes.n_seen).to(shapes.device))
        s_head = nn.Linear(64 * (teacher_count - 1), shapes.n_seen).to(shapes.device)
        opt = _sgd([*copy.parameters(), *s_head.parameters()], weight_decay=0.0)
        xs, _ = _inputs(shapes, steps)

        def step(i):
            with torch.no_grad():
                t_feats = [f(xs[i]) for f in teacher]
                t_logits = t_head(torch.cat(t_feats, 1))
            s_logits = s_head(torch.cat([*t_feats[: len(shared)], copy(xs[i])], 1))
            _step(opt, kd_soft_ce(s_logits, t_logits, 2.0))
        return step
    return build


def _seed_expert(shapes: Shapes) -> nn.Module:
    spec = standard_spec("resnet32")
    spec.update(shortcut="B", last_relu=False)
    return _on(build_backbone(spec), shapes)


def bare_seed(finetune: bool):
    """An expert + a head over the task's classes, CE, gradient clipping at 1; fine-tuning: BN in eval mode and
    0.01 CE + 0.99 MSE to the expert's frozen pre-task copy, no weight decay."""
    def build(shapes: Shapes, steps: int):
        expert = _seed_expert(shapes).train()
        n_new = shapes.n_seen - shapes.n_old
        head = nn.Linear(expert.out_dim, n_new).to(shapes.device)
        teacher = freeze(_seed_expert(shapes)) if finetune else None
        if finetune:
            for m in expert.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        params = [*expert.parameters(), *head.parameters()]
        opt = _sgd(params, lr=0.05, weight_decay=0.0 if finetune else 5e-4)
        xs, ys = _inputs(Shapes(shapes.batch, n_new, 0, shapes.device), steps)

        def step(i):
            feats = expert(xs[i])
            loss = F.cross_entropy(head(feats), ys[i])
            if teacher is not None:
                with torch.no_grad():
                    old = teacher(xs[i])
                loss = 0.01 * loss + 0.99 * (feats - old).pow(2).mean()
            _step(opt, loss, clip=[params, 1.0])
        return step
    return build


def bare_exacfs(balanced: bool):
    """PODNet ResNet-32 + LSC head (10 proxies per class), NCA loss; main phase: + class-weighted distillation
    of the four stage maps against the frozen previous model."""
    def build(shapes: Shapes, steps: int):
        from cilbench.kit.backbones import stage_outputs
        from cilbench.kit.significance import significance_distillation, significance_weights
        net = _net(shapes, "resnet32_podnet")
        head = LocalSimilarityHead(net.out_dim, 10).to(shapes.device)
        for _ in range(TASKS):
            head.add_classes(CLASSES // TASKS, None)
        previous = freeze(_net(shapes, "resnet32_podnet"))
        sig = [torch.rand(shapes.n_old, c, device=shapes.device) for c in (16, 32, 64, 64)]
        xs, ys = _inputs(shapes, steps)
        if balanced:
            freeze(net)
            opt = _sgd([p for p in head.parameters() if p is not head.log_scale], lr=0.05)
        else:
            net.train()
            opt = _sgd([*net.parameters(), *head.parameters()])

        def step(i):
            x, y = xs[i], ys[i]
            if balanced:
                with torch.no_grad():
                    feats = net(x)
                _step(opt, nca_margin_loss(head(feats), y, 0.6))
                return
            maps, feats = stage_outputs(net, x)
            loss = nca_margin_loss(head(feats), y, 0.6)
            with torch.no_grad():
                old_maps, _ = stage_outputs(previous, x)
            per_sample = significance_distillation(maps, old_maps, significance_weights(sig, y, shapes.n_old))
            _step(opt, loss + per_sample.sum() / len(y))
        return step
    return build


def bare_er(shapes: Shapes, steps: int):
    """Reduced ResNet-18 + linear head, CE over stream batch + replay batch in one forward."""
    net = _net(shapes, "resnet18_reduced").train()
    head = nn.Linear(net.out_dim, shapes.n_seen).to(shapes.device)
    opt = _sgd([*net.parameters(), *head.parameters()], momentum=0.0, weight_decay=0.0)
    xs, ys = _inputs(shapes, steps, rows=2 * shapes.batch)
    return lambda i: _step(opt, F.cross_entropy(head(net(xs[i])), ys[i]))


def _two_forwards(net: nn.Module, x: torch.Tensor, batch: int) -> torch.Tensor:
    """PCR's separate_forward (the default, as the code): the replay rows (two views) in one pass, the stream
    rows in another, BN statistics per pass; memory rows first."""
    m = 2 * batch
    return torch.cat([net(x[:m]), net(x[m:])])


def bare_pcr(shapes: Shapes, steps: int):
    """PCR: two views of the replay batch, then of the stream batch (two forwards), proxy logits
    (cosine / 0.09), closed-form loss."""
    net = _net(shapes, "resnet18_reduced").train()
    proxies = nn.Parameter(torch.randn(CLASSES, net.out_dim, device=shapes.device))
    opt = _sgd([*net.parameters(), proxies], momentum=0.0, weight_decay=0.0)
    xs, ys = _inputs(shapes, steps, rows=4 * shapes.batch)

    def step(i):
        z = _two_forwards(net, xs[i], shapes.batch)
        logits = F.linear(F.normalize(z, dim=1), F.normalize(proxies, dim=1)) / 0.09
        _step(opt, pcr_loss(logits, ys[i]))
    return step


def bare_hpcr(shapes: Shapes, steps: int):
    """HPCR on the second task and later: PCR's two forwards plus its loss scale, PCD and SCD on the replayed
    rows against stored logits and features."""
    from cilbench.kit.losses import ht_multiplier, pcd_loss, scd_loss
    net = _net(shapes, "resnet18_reduced").train()
    proxies = nn.Parameter(torch.randn(CLASSES, net.out_dim, device=shapes.device))
    opt = _sgd([*net.parameters(), proxies], momentum=0.0, weight_decay=0.0)
    xs, ys = _inputs(shapes, steps, rows=4 * shapes.batch)
    stored_logits = torch.randn(shapes.batch, CLASSES, device=shapes.device)
    stored_feats = torch.randn(shapes.batch, net.out_dim, device=shapes.device)

    def step(i):
        z = _two_forwards(net, xs[i], shapes.batch)
        logits = F.linear(F.normalize(z, dim=1), F.normalize(proxies, dim=1)) / 0.09
        m = 2 * shapes.batch                                   # memory anchors first: two views of B_M
        loss = ht_multiplier(i) * pcr_loss(logits, ys[i])
        loss = loss + pcd_loss(logits[:m], stored_logits.repeat(2, 1), ys[i])
        loss = loss + 0.5 * scd_loss(z[:m], stored_feats.repeat(2, 1), 0.09)
        _step(opt, loss)
    return step


# ---------------------------------------------------------------------------------------------------------
# What is measured for each method


@dataclass
class Phase:
    phase: str             # the engine's phase name (events.jsonl)
    task: int              # 0-based task whose epochs are timed
    label: str
    bare: Callable[[Shapes, int], Callable[[int], None]]


PHASES: dict[str, list[Phase]] = {
    "finetune": [Phase("ce", 4, "CE, task 5", bare_one_network)],
    "replay": [Phase("ce", 4, "CE over new data + memory, task 5", bare_one_network)],
    "joint": [Phase("ce", 4, "CE over every seen class, task 5", bare_one_network)],
    "der": [Phase("der", 0, "stage 1, 1 extractor", bare_der(1)),
            Phase("der", 4, "stage 1, 5 extractors (4 frozen)", bare_der(5)),
            Phase("der_classifier", 4, "stage 2 classifier, 5 extractors", bare_der_classifier(5))],
    "der_prune": [Phase("der", 0, "stage 1 + masks, 1 extractor", bare_der(1, prune=True)),
                  Phase("der", 4, "stage 1 + masks, 5 extractors", bare_der(5, prune=True)),
                  Phase("der_classifier", 4, "stage 2 classifier, 5 extractors", bare_der_classifier(5))],
    "tsd_fixed": [Phase("ce", 4, "CE + L_con, 3 frozen + 1 new (N=3)", bare_tsd_ce(3)),
                  Phase("kd", 4, "KD, teacher 4 -> student 3", bare_tsd_kd(4))],
    "tsd_grc": [Phase("ce", 3, "CE + L_con, 2 frozen + 1 new (N=3)", bare_tsd_ce(2)),
                Phase("kd", 3, "KD, teacher 3 -> student 2", bare_tsd_kd(3))],
    "seed": [Phase("seed_expert", 0, "new expert, CE (task 1)", bare_seed(False)),
             Phase("seed_finetune", 4, "selected expert, CE + feature KD (task 5)", bare_seed(True))],
    "exacfs": [Phase("exacfs", 4, "NCA + significance distillation (task 5)", bare_exacfs(False)),
               Phase("exacfs_balanced", 4, "balanced classifier fine-tuning (task 5)", bare_exacfs(True))],
    "er": [Phase("online", ONLINE_TASKS - 1, "stream 10 + replay 10 (last task)", bare_er)],
    "pcr": [Phase("pcr", ONLINE_TASKS - 1, "two views of 10 + 10 (last task)", bare_pcr)],
    "hpcr": [Phase("hpcr", ONLINE_TASKS - 1, "two views of 10 + 10, PCD + SCD (last task)", bare_hpcr)],
}


# ---------------------------------------------------------------------------------------------------------
# Running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare(phase: Phase, shapes: Shapes, steps: int, repeats: int = 3, warmup: int = 5) -> float:
    """Images/s of the bare loop: `warmup` steps, then the best of `repeats` windows of `steps` steps (as
    timeit does: on a shared machine interference only ever slows a window down)."""
    bare = phase.bare(shapes, steps + warmup)

    def step(i):
        with torch.autocast(shapes.device.type, dtype=torch.bfloat16, enabled=shapes.cuda):   # as the harness
            bare(i)
    for i in range(warmup):
        step(i)
    best = 0.0
    for _ in range(repeats):
        _sync(shapes.device)
        t0 = time.perf_counter()
        for i in range(warmup, steps + warmup):
            step(i)
        _sync(shapes.device)
        best = max(best, steps * shapes.batch / (time.perf_counter() - t0))
    return best


def harness_speed(events: list[dict], phase: Phase) -> tuple[float, int]:
    """Images/s of a phase in its task, the best epoch after the first (the first pays one-off costs; the only
    epoch when there is one), and the images of that epoch (the bare loop runs as many)."""
    rows = [e for e in events if e.get("task") == phase.task and e.get("phase") == phase.phase]
    if not rows:
        raise RuntimeError(f"bench: no '{phase.phase}' epochs in task {phase.task + 1}")
    best = max(rows[1:] or rows, key=lambda e: e["images_per_s"])
    return best["images_per_s"], round(best["images_per_s"] * best["seconds"])


def bench_method(name: str, device: str, per_class: int, epochs: int, out: Path) -> dict:
    from cilbench.kit.registry import get_method
    from cilbench.run.runner import RunRequest, execute
    from cilbench.train.engine import resolve_device
    get_method(name)
    if name not in PHASES:
        raise UserError(f"bench: no phases declared for method '{name}'; add them to cilbench/bench/methods.py PHASES")
    online = name in ONLINE_METHODS
    card = online_card(per_class) if online else offline_card(per_class)
    card_file = out / f"{card['name']}.yaml"
    atomic_write(card_file, yaml.safe_dump(card, sort_keys=False))
    run = execute(RunRequest(method=name, protocol=str(card_file), epochs=epochs, device=device, out=str(out),
                             quiet=True, force=True, overrides=["runtime.divergence_factor=0"]))
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    metrics = json.loads((run / "metrics.json").read_text())
    dev = resolve_device(device)
    step = card["step"]
    specs = run_specs(run)
    rows = []
    for phase in PHASES[name]:
        harness, images = harness_speed(events, phase)
        batch = card["train"]["batch_size"]
        shapes = Shapes(batch, step * (phase.task + 1), step * phase.task, dev, specs)
        bare = time_bare(phase, shapes, max(images // batch, 5 if not online else 50))
        rows.append({"method": name, "phase": phase.label, "harness": harness, "bare": bare,
                     "ratio": harness / bare})
    return {"method": name, "phases": rows, "time_split": metrics["time_split"]}


def run_specs(run: Path) -> list[dict] | None:
    """The extractors a DER-family run ended with (pruned ones are smaller), from its checkpoint."""
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["method"]
    stack = state.get("stack") if isinstance(state, dict) else None     # pack_module of an ExtractorStack
    return stack["specs"] if isinstance(stack, dict) and stack.get("kind") == "stack" else None


def run_method_bench(methods: list[str], device: str = "auto", per_class: int = 32, epochs: int = 3) -> list[dict]:
    from cilbench.kit.registry import known_methods
    names = sorted(PHASES) if "all" in methods else list(dict.fromkeys(methods))
    unknown = [m for m in names if m not in known_methods()]
    if unknown:
        raise UserError(f"bench --method {unknown[0]}: unknown method; known: {', '.join(known_methods())} "
                        "(or all)")
    if epochs < 2:
        raise UserError(f"bench --epochs {epochs}: need >= 2 (the first epoch of a phase is not timed)")
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
        print(f"{row['method']:<10} {row['phase']:<48} harness {row['harness']:7.1f} img/s   bare loop "
              f"{row['bare']:7.1f} img/s   {100 * row['ratio']:4.0f}%", flush=True)
    split = result["time_split"]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if k != "wall")
    print(f"{result['method']:<10} short run {split['wall']:.1f} s: {parts}", flush=True)
