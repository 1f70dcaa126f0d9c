"""`cilbench bench`: throughput figures for the data pipeline and the training step.

(1) Data pipeline alone: the engine's batched on-device augmentation against a torchvision DataLoader with
    per-sample PIL transforms (RandomCrop(32, 4), flip, ColorJitter(brightness=63/255), ToTensor, Normalize),
    which is how PyCIL/DER feed CIFAR.
(2) Full ResNet-32 training steps on 32x32 data through `Engine.fit` against a bare PyTorch loop over the
    same model and pre-made, already-augmented tensors on the device (the ceiling).
(3) Online regime: HPCR steps (stream batch 10 + replay 10, two views each, reduced ResNet-18, CIFAR-100
    shapes, second task so PCD and SCD are on) through the harness (reservoir draws and inserts with payload,
    on-device strong augmentation) against a bare loop doing the same forward/backward on pre-made tensors.
Nothing is downloaded: images are random uint8 CIFAR-shaped arrays (throughput does not depend on content).
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from cilbench.config import build
from cilbench.data.datasets import Dataset, Split
from cilbench.data.protocol import Protocol
from cilbench.data.stream import Stream
from cilbench.kit.backbones import build_backbone
from cilbench.train.engine import Engine, RuntimeOptions, resolve_device

CIFAR_MEAN, CIFAR_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bench_stream(n: int, device: torch.device, classes: int = 100) -> Stream:
    card = {"name": "bench", "dataset": "synthetic", "num_classes": classes, "base": 0, "step": classes,
            "tasks": 1, "memory": {"policy": "none"},
            "augment": {"crop_padding": 4, "flip": True, "brightness": 63 / 255, "mean": list(CIFAR_MEAN),
                        "std": list(CIFAR_STD)}}
    protocol = build(Protocol, card, "bench")
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % classes
    return Stream(protocol, Dataset("bench", classes, Split(images, labels), Split(images[:classes], labels[:classes])),
                  device)


def pipeline_engine(stream: Stream, engine: Engine, batch: int) -> float:
    idx = torch.arange(len(stream.train.labels), device=stream.train.labels.device)
    for b in engine.batches(idx[: batch * 2], batch, shuffle=True):   # warm-up
        engine.train_views(b)
    _sync(engine.device)
    t0 = time.perf_counter()
    for b in engine.batches(idx, batch, shuffle=True):
        views, _ = engine.train_views(b)
    _sync(engine.device)
    return len(idx) / (time.perf_counter() - t0)


def pipeline_pil(images: np.ndarray, labels: np.ndarray, batch: int, workers: int) -> float:
    from PIL import Image
    from torchvision import transforms

    class PILDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                          transforms.ColorJitter(brightness=63 / 255), transforms.ToTensor(),
                                          transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])

        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return self.tf(Image.fromarray(images[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(PILDataset(), batch_size=batch, shuffle=True, num_workers=workers,
                                         pin_memory=torch.cuda.is_available(), persistent_workers=False)
    t0 = time.perf_counter()
    count = 0
    for x, _ in loader:
        count += len(x)
    return count / (time.perf_counter() - t0)


def train_engine(stream: Stream, engine: Engine, batch: int, steps: int) -> float:
    from cilbench.data.protocol import TrainConfig
    net = engine.prepare(build_backbone("resnet32"))
    head = engine.prepare(torch.nn.Linear(net.out_dim, 100))
    idx = torch.arange(batch * steps, device=stream.train.labels.device)
    cfg = TrainConfig(epochs=1, batch_size=batch, schedule="constant")

    def loss_fn(b):
        return F.cross_entropy(head(net(b.x)), b.y)

    params = [*net.parameters(), *head.parameters()]
    engine.fit(params, loss_fn, idx[: batch * 3], cfg, modules=[net])    # warm-up (and compile, if on)
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.fit(params, loss_fn, idx, cfg, modules=[net])
    _sync(engine.device)
    return steps / (time.perf_counter() - t0)


def train_bare(engine: Engine, batch: int, steps: int) -> float:
    """The ceiling: the same model, optimiser and precision settings over pre-made device tensors."""
    device = engine.device
    net = engine.prepare(build_backbone("resnet32"))
    head = engine.prepare(torch.nn.Linear(net.out_dim, 100))
    fmt = torch.channels_last if engine.channels_last else torch.contiguous_format
    xs = torch.randn(steps, batch, 3, 32, 32, device=device).contiguous(memory_format=torch.contiguous_format)
    xs = [x.contiguous(memory_format=fmt) for x in xs]
    ys = torch.randint(0, 100, (steps, batch), device=device)
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    net.train()

    def step(x, y):
        with engine.autocast():
            loss = F.cross_entropy(head(net(x)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(3):
        step(xs[i], ys[i])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(xs[i], ys[i])
    _sync(device)
    return steps / (time.perf_counter() - t0)


ONLINE_CARD = {"name": "bench_online", "dataset": "synthetic", "num_classes": 100, "class_order": "natural",
               "base": 0, "step": 50,
               "tasks": 2, "regime": "online", "memory": {"policy": "reservoir", "size": 1000},
               "backbone": {"name": "resnet18_reduced"},
               "train": {"epochs": 1, "batch_size": 10, "optimizer": "sgd", "lr": 0.1, "momentum": 0.0,
                         "weight_decay": 0.0, "schedule": "constant"},
               "online": {"replay_batch": 10}, "augment": {"mean": [0.0] * 3, "std": [1.0] * 3}}


def _online_setup(device_name: str, steps: int):
    """A two-task CIFAR-100-shaped online stream of `steps` stream batches per task, and an HPCR on it."""
    if steps < 5:
        from cilbench.errors import UserError
        raise UserError(f"--online-steps {steps}: need >= 5 so that each of the 50 classes of a task has a sample")
    from cilbench.kit.contract import Context
    from cilbench.kit.registry import get_method
    from cilbench.train.memory import make_memory
    protocol = build(Protocol, ONLINE_CARD, "bench")
    device = resolve_device(device_name)
    n = 2 * 10 * steps
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.cat([torch.arange(n // 2) % 50, 50 + torch.arange(n // 2) % 50])   # task t: classes of t
    stream = Stream(protocol, Dataset("bench", 100, Split(images, labels), Split(images[:100], labels[:100])), device)
    engine = Engine(stream, RuntimeOptions(device=device_name), device)
    engine.begin_task(0, 0)
    ctx = Context(protocol, stream, engine, make_memory(protocol.memory, device), device, seed=0)
    hpcr = get_method("hpcr")             # through the registry, as a run finds it: core never imports a plug-in
    return hpcr.cls(build(hpcr.cls.Config, dict(hpcr.defaults), "bench"), ctx), ctx


def online_engine(device_name: str, steps: int) -> float:
    """HPCR steps/s through the harness on the second task (the first fills the reservoir)."""
    method, ctx = _online_setup(device_name, steps)
    method.learn(ctx.stream.task(0), ctx)
    ctx.engine.begin_task(0, 1)
    _sync(ctx.device)
    t0 = time.perf_counter()
    method.learn(ctx.stream.task(1), ctx)
    _sync(ctx.device)
    return steps / (time.perf_counter() - t0)


def online_bare(device_name: str, steps: int) -> float:
    """The ceiling: HPCR's two forward passes (stream views, replay views), its loss and an SGD step over
    pre-made tensors of the same shapes, with stored payload already at hand."""
    method, ctx = _online_setup(device_name, steps)
    device, engine = ctx.device, ctx.engine
    method.task_index = 1
    fmt = torch.channels_last if engine.channels_last else torch.contiguous_format
    xs = [torch.randn(20, 3, 32, 32, device=device).contiguous(memory_format=fmt) for _ in range(2 * steps)]
    ys = torch.randint(0, 100, (2 * steps, 10), device=device)
    stored = {"logits": torch.randn(10, 100, device=device), "features": torch.randn(10, 160, device=device)}
    opt = torch.optim.SGD([*method.backbone.parameters(), method.head.weight], lr=0.1)
    method.backbone.train()

    def step(i):
        with engine.autocast():
            logits, feats, (o_m, z_m) = method.forward_both(xs[2 * i], xs[2 * i + 1])
            labels = torch.cat([ys[2 * i + 1].repeat(2), ys[2 * i].repeat(2)])
            loss = method.objective(logits, feats, labels, (o_m, z_m, stored), i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(min(3, steps)):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    _sync(device)
    return steps / (time.perf_counter() - t0)


def run_bench(device_name: str = "auto", images: int = 10000, steps: int = 30, batch: int = 128,
              compile: bool = False, online_steps: int = 200) -> dict:
    device = resolve_device(device_name)
    workers = min(4, os.cpu_count() or 1)
    stream = _bench_stream(images, device)
    engine = Engine(stream, RuntimeOptions(device=device_name, compile=compile), device)
    engine.begin_task(0, 0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; batch {batch}; "
          f"bf16 autocast {engine.cuda and engine.options.amp}; channels_last {engine.channels_last}; "
          f"compile {compile}")
    cpu_images = stream.train.images.cpu().permute(0, 2, 3, 1).numpy()
    cpu_labels = stream.train.labels.cpu().numpy()
    fast = pipeline_engine(stream, engine, batch)
    slow = pipeline_pil(cpu_images, cpu_labels, batch, workers)
    print(f"(1) data pipeline: engine {fast:,.0f} img/s; PIL DataLoader ({workers} workers) {slow:,.0f} img/s; "
          f"speed-up x{fast / slow:.1f} (target >= 5)")
    eng = train_engine(stream, engine, batch, steps)
    bare = train_bare(engine, batch, steps)
    print(f"(2) ResNet-32 training: engine {eng:.1f} steps/s ({eng * batch:,.0f} img/s); bare loop over pre-made "
          f"tensors {bare:.1f} steps/s; engine at {100 * eng / bare:.0f}% of the bare loop (target >= 90%)")
    online, online_ceiling = online_engine(device_name, online_steps), online_bare(device_name, online_steps)
    print(f"(3) online HPCR (batch 10 + replay 10, two views, reduced ResNet-18): harness {online:.1f} steps/s; "
          f"bare loop over pre-made tensors {online_ceiling:.1f} steps/s; harness at "
          f"{100 * online / online_ceiling:.0f}% of the bare loop (target >= 75%)")
    return {"device": name, "pipeline_engine": fast, "pipeline_pil": slow, "train_engine": eng, "train_bare": bare,
            "online_engine": online, "online_bare": online_ceiling}
