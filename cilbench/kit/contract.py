"""The method plug-in contract and registry.

A method is a class in methods/<name>.py decorated with `@register("name")`. It declares a typed config
(dataclass with the paper's defaults), whether it uses exemplars and which regimes it supports, and
implements `learn`, `scores`, `inference_footprint`, `state_dict` / `load_state_dict`. The harness does
evaluation, memory updates, checkpoints and metrics; a method never evaluates itself.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from cilbench.data.protocol import Protocol
from cilbench.data.stream import Stream, Task
from cilbench.errors import UserError
from cilbench.kit.backbones import build_backbone, count_params
from cilbench.train.engine import Engine
from cilbench.train.memory import ExemplarMemory, ReservoirMemory, class_balanced_subset


@dataclass
class NoOptions:
    """This method has no options of its own."""


@dataclass
class Context:
    """What a method gets from the harness."""
    protocol: Protocol
    stream: Stream
    engine: Engine
    memory: ExemplarMemory | ReservoirMemory | None
    device: torch.device
    seed: int
    log: Any = None           # callable(str) for progress messages
    extra: dict = field(default_factory=dict)

    def new_backbone(self, name: str | None = None) -> nn.Module:
        """The card's backbone, or the factory architecture `name` at the card's width."""
        spec = self.protocol.backbone
        return self.engine.prepare(build_backbone(name or spec.name, self.stream.image_shape[0], spec.width))

    def train_indices(self, task: Task) -> torch.Tensor:
        """New-class samples plus the exemplars this protocol and method are allowed."""
        if self.memory is None or not len(self.memory):
            return task.train_idx
        return torch.cat([task.train_idx, self.memory.indices().to(task.train_idx.device)])

    def balanced_indices(self, task: Task, per_class: int | None = None) -> torch.Tensor:
        """train_indices undersampled to the same count per class (the smallest class count by default:
        with a per-class memory, new classes are cut to the exemplars per class)."""
        indices = self.train_indices(task)
        return class_balanced_subset(indices, self.stream.train.labels[indices], self.engine.order_gen, per_class)

    def fit_balanced(self, task: Task, params, loss_fn, cfg, *, phase: str, per_class: int | None = None):
        """Class-balanced fine-tuning (EEIL/DER/PODNet): fit `params` (a classifier) on balanced_indices.
        The caller keeps the extractor frozen in eval mode inside `loss_fn`."""
        return self.engine.fit(params, loss_fn, self.balanced_indices(task, per_class), cfg, phase=phase)

    def seen_indices(self, task: Task) -> torch.Tensor:
        """Every training sample of every class seen so far (the joint upper bound only)."""
        return torch.nonzero(self.stream.train.labels < task.n_seen).flatten()


@dataclass
class Footprint:
    extractors: int
    params: int
    params_backbone: int | None = None  # extractors only (no classifier), as the papers count #Params


class Method:
    name: ClassVar[str] = ""
    family: ClassVar[str] = ""                 # config section shared by aliases (der_prune -> der)
    Config: ClassVar[type] = NoOptions
    uses_exemplars: ClassVar[bool] = True
    regimes: ClassVar[tuple[str, ...]] = ("offline",)
    summary: ClassVar[str] = ""

    def __init__(self, cfg: Any, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def run_tag(cls, cfg: Any) -> str | None:
        """A tag that belongs in the run name (e.g. the pool size of TSD: 'N3')."""
        return None

    def learn(self, task: Task, ctx: Context) -> None:
        raise NotImplementedError

    def after_memory_update(self, task: Task, ctx: Context) -> None:
        """Called after the harness selected this task's exemplars (offline memory): write their payload."""

    def networks(self) -> list[nn.Module]:
        """Modules put in eval mode before evaluation and herding."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over all seen classes for a normalised batch."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features herding selects exemplars on (DER: the concatenated super-feature)."""
        raise NotImplementedError

    def inference_footprint(self) -> Footprint:
        raise NotImplementedError

    def step_record(self) -> dict:
        """Extra per-task fields for steps.csv (e.g. SEED: the expert trained, Gaussian parameter count)."""
        return {}

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def eval(self) -> None:
        for net in self.networks():
            net.eval()



class OneNetworkMethod(Method):
    """A method that infers with one backbone and one head (`self.backbone`, `self.head`): finetune, replay,
    joint, ER, PCR/HPCR, EXACFS. Herding uses the backbone's feature; #params counts both, the backbone alone
    as params_backbone."""
    backbone: nn.Module
    head: nn.Module

    def networks(self) -> list[nn.Module]:
        return [self.backbone, self.head]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def inference_footprint(self) -> Footprint:
        return Footprint(1, count_params(self.backbone, self.head), count_params(self.backbone))

@dataclass
class Entry:
    cls: type[Method]
    defaults: dict


REGISTRY: dict[str, Entry] = {}


def register(name: str, **defaults):
    """Class decorator: `@register("der")`; `register("der_prune", prune=True)(DER)` adds an alias."""
    def wrap(cls: type[Method]) -> type[Method]:
        if not cls.name:
            cls.name = name
        if not cls.family:
            cls.family = cls.name
        REGISTRY[name] = Entry(cls, defaults)
        return cls
    return wrap


def load_plugins() -> None:
    """Import every module of the plug-in package `cilbench.methods` (the repository's methods/ folder)."""
    import cilbench.methods as plugins
    for info in pkgutil.iter_modules(plugins.__path__):
        importlib.import_module(f"{plugins.__name__}.{info.name}")


def get_method(name: str) -> Entry:
    load_plugins()
    if name not in REGISTRY:
        from cilbench.config import did_you_mean
        raise UserError(f"unknown method '{name}'{did_you_mean(name, REGISTRY)}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def known_methods() -> dict[str, Entry]:
    load_plugins()
    return dict(sorted(REGISTRY.items()))
