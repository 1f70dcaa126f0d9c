"""Helpers for tests that drive a method task by task, as the runner does, on a card given as a dict."""
from __future__ import annotations

import torch

from cilbench.data.datasets import load_dataset
from cilbench.data.protocol import build_protocol
from cilbench.data.stream import Stream
from cilbench.kit import Context
from cilbench.train.engine import Engine, RuntimeOptions
from cilbench.train.memory import make_memory

BASE_CARD = {
    "name": "tiny", "dataset": "synthetic", "num_classes": 6, "class_order": "natural", "base": 0,
    "step": 2, "tasks": 3, "regime": "offline",
    "memory": {"policy": "fixed_total", "total": 24, "selection": "herding"},
    "backbone": {"name": "resnet20", "width": 4},
    "train": {"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
              "weight_decay": 0.0005, "schedule": "cosine", "milestones": [], "warmup_epochs": 0},
    "augment": {"crop_padding": 1, "flip": True, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "eval_batch_size": 200,
    "data": {"synthetic": {"classes": 6, "image_size": 8, "channels": 3, "train_per_class": 24,
                           "test_per_class": 8, "noise": 0.3, "seed": 0}},
}


def tiny_card(**changes) -> dict:
    """A 6-class 8x8 synthetic card (3 tasks, resnet20 at width 4) with `changes` merged in, nested dicts
    key by key (tiny_card(name="x", train={"epochs": 4})); `memory` is replaced whole, its keys depend on
    the policy."""
    def merge(base: dict, extra: dict) -> dict:
        out = dict(base)
        for key, value in extra.items():
            nested = isinstance(value, dict) and isinstance(base.get(key), dict) and key != "memory"
            out[key] = merge(base[key], value) if nested else value
        return out
    return merge(BASE_CARD, changes)


def tiny_context(card: dict, max_epochs: int | None = 1):
    """(ctx, stream, engine, memory) on the CPU for `card`, every training phase capped at max_epochs."""
    protocol = build_protocol(dict(card), "tiny")
    device = torch.device("cpu")
    stream = Stream(protocol, load_dataset(protocol, None), device)
    engine = Engine(stream, RuntimeOptions(device="cpu", max_epochs=max_epochs), device)
    memory = make_memory(protocol.memory, device)
    return Context(protocol, stream, engine, memory, device, seed=0), stream, engine, memory


def learn_and_remember(method, ctx, stream, engine, memory, t):
    """One harness step without evaluation: reseed, learn task t, herd exemplars on the method's features
    (unless the method selected them in learn(), as the runner does)."""
    task = stream.task(t)
    engine.begin_task(0, t)
    method.learn(task, ctx)
    method.eval()
    if not memory.holds(task.classes):
        memory.update(task.classes, stream.class_indices, lambda idx: engine.apply(method.features, idx),
                      engine.order_gen)
    return task


def state_of(module) -> dict:
    """A copy of every weight and buffer, to compare with later (frozen parts must stay bit-identical)."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(before: dict, module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k            # weights and BN buffers (num_batches_tracked too)


def randomize_bn(net) -> None:
    """BatchNorm statistics and affine parameters away from their identity start, so a wrong BN mode shows."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
