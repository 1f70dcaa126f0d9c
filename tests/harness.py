"""Helpers for tests that drive a method task by task, as the runner does, on a card given as a dict."""
from __future__ import annotations

import torch

from cilbench.data import load_dataset
from cilbench.engine import Engine, RuntimeOptions
from cilbench.memory import make_memory
from cilbench.method import Context
from cilbench.protocol import build_protocol
from cilbench.stream import Stream


def tiny_context(card: dict, max_epochs: int | None = 1):
    """(ctx, stream, engine, memory) on the CPU for `card`, every training phase capped at max_epochs."""
    protocol = build_protocol(dict(card), "tiny")
    device = torch.device("cpu")
    stream = Stream(protocol, load_dataset(protocol, None), device)
    engine = Engine(stream, RuntimeOptions(device="cpu", max_epochs=max_epochs), device)
    memory = make_memory(protocol.memory, device)
    return Context(protocol, stream, engine, memory, device, seed=0), stream, engine, memory


def learn_and_remember(method, ctx, stream, engine, memory, t):
    """One harness step without evaluation: reseed, learn task t, herd exemplars on the method's features."""
    task = stream.task(t)
    engine.begin_task(0, t)
    method.learn(task, ctx)
    method.eval()
    memory.update(task.classes, stream.class_indices, lambda idx: engine.apply(method.features, idx),
                  engine.order_gen)
    return task
