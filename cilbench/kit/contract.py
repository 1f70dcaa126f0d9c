"""The method contract: what a method implements (Method) and what it gets from the harness (Context).

A method is a class decorated with `@register("name")` (cilbench.kit.registry). It declares a typed config
(a dataclass whose fields are `option(...)`s with the paper's defaults), whether it uses exemplars and which
regimes it supports, and implements `learn`, `scores`, `features`, `networks`, `inference_footprint`,
`state_dict` / `load_state_dict`. The harness does evaluation, memory updates, checkpoints and metrics; a
method never evaluates itself, and it reaches the run only through its Context.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from cilbench.data.augment import Augmenter
from cilbench.data.protocol import AugmentConfig, Protocol
from cilbench.data.stream import Stream, Task
from cilbench.errors import UserError
from cilbench.kit.backbone_card import load_pretrained
from cilbench.kit.backbones import build_backbone, count_params
from cilbench.kit.nets import ExtractorStack, pack_module, unpack_module
from cilbench.train.engine import Engine
from cilbench.train.memory import ExemplarMemory, ReplayBatch, ReservoirMemory, class_balanced_subset


def option(default: Any = dataclasses.MISSING, *, help: str, unit: str | None = None,
           bounds: tuple[float | None, float | None] | None = None, default_factory: Any = dataclasses.MISSING):
    """A method option: a dataclass field that carries its help text, unit and inclusive bounds (None =
    unbounded), so validation, `cilbench show-method` and the docs' option tables come from one place."""
    meta = {"help": help, "unit": unit, "bounds": bounds}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict, set)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta)
    return field(default=default, metadata=meta)


def describe_options(config_cls: type) -> list[dict]:
    """Name, type, default, help, unit and bounds of every option of a method's config class."""
    rows = []
    for f in dataclasses.fields(config_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        bounds = f.metadata.get("bounds") or getattr(config_cls, "BOUNDS", {}).get(f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append({"name": f.name, "type": kind,
                     "default": default, "help": f.metadata.get("help", ""), "unit": f.metadata.get("unit"),
                     "bounds": tuple(bounds) if bounds else None})
    return rows


@dataclass
class NoOptions:
    """This method has no options of its own."""


@dataclass
class Context:
    """What a method gets from the harness: the protocol, the task stream, the engine (fit loops, inference,
    augmentation), the memory the protocol allows (None for exemplar-free methods), the device and seed."""
    protocol: Protocol
    stream: Stream
    engine: Engine
    memory: ExemplarMemory | ReservoirMemory | None
    device: torch.device
    seed: int
    log_sink: Callable[[str], None] | None = None   # set by the harness: progress output and events.jsonl
    extra: dict = field(default_factory=dict)
    selection_seconds: float = 0.0   # time in select_exemplars_now, which the run's timing counts as herding

    def log(self, message: str) -> None:
        """A progress message: printed with the run's progress and recorded in events.jsonl."""
        if self.log_sink is not None:
            self.log_sink(message)

    def new_backbone(self, name: str | None = None, init: str = "kaiming_fan_out") -> nn.Module:
        """The card's backbone (loaded with the card's `pretrained` weights file, if any), or the architecture
        `name` at the card's width; `init` as build_backbone's (a factory ResNet's conv weights from
        kaiming_normal fan_out, or PyTorch's default; a timm model keeps timm's own initialisation)."""
        card = self.protocol.backbone
        name = name or card.name
        own = name == card.name
        net = build_backbone(name, self.stream.image_shape[0], card.width, init, card.timm_kwargs if own else None)
        if card.pretrained:
            if not own:
                raise UserError(f"backbone.pretrained: {self.protocol.name}'s weights file is for '{card.name}', "
                                f"but the method builds '{name}'; remove backbone.pretrained or the method's "
                                "backbone option")
            load_pretrained(net, card.pretrained)
        return self.engine.prepare(net)

    # --- data ---------------------------------------------------------------------------------------
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

    def exemplars_after(self, task: Task, features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Train-split indices of the exemplars the memory would hold after this task if selected now, with
        `features` (a normalised batch -> features; run under engine.apply): the new classes picked by the
        memory's own selection (herding on these features), every class cut to the new quota. The memory is
        not changed (the harness still selects after learn()). PODNet's balanced fine-tuning trains on this set."""
        if not isinstance(self.memory, ExemplarMemory):
            raise TypeError("exemplars_after() needs the offline exemplar memory")
        return self.memory.preview(task.classes, self.stream.class_indices,
                                   lambda idx: self.engine.apply(features, idx), self.engine.order_gen)

    def select_exemplars_now(self, task: Task, features: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Update the exemplar memory for this task now, inside learn(), with `features` (as exemplars_after;
        call it with the networks in eval mode), and return the train-split indices it then holds. The harness
        keeps this selection and does not select again after learn(). For a method that trains on the updated
        memory before the task ends: DyTox fine-tunes on the memory herded with the model before fine-tuning."""
        if not isinstance(self.memory, ExemplarMemory):
            raise TypeError("select_exemplars_now() needs the offline exemplar memory")
        start = time.perf_counter()
        self.memory.update(task.classes, self.stream.class_indices,
                           lambda idx: self.engine.apply(features, idx), self.engine.order_gen)
        self.selection_seconds += time.perf_counter() - start
        return self.memory.indices()

    def fit_balanced(self, task: Task, params, loss_fn, cfg, *, phase: str, per_class: int | None = None,
                     frozen=None):
        """Class-balanced fine-tuning (EEIL/DER/PODNet): fit `params` (a classifier) on balanced_indices.
        The caller keeps the extractor frozen in eval mode, inside `loss_fn` or as `frozen` (Engine.fit)."""
        return self.engine.fit(params, loss_fn, self.balanced_indices(task, per_class), cfg, phase=phase,
                               frozen=frozen)

    def seen_indices(self, task: Task) -> torch.Tensor:
        """Every training sample of every class seen so far (the joint upper bound only)."""
        return torch.nonzero(self.stream.train.labels < task.n_seen).flatten()

    def train_images(self, idx: torch.Tensor) -> torch.Tensor:
        """The uint8 training images at `idx` (for a method's own augmentation)."""
        return self.stream.train.images[idx]

    def augmenter(self, cfg: AugmentConfig) -> Augmenter:
        """An augmentation of the method's own (e.g. PCR's strong view), drawn from the run's generator."""
        return self.engine.augmenter_for(cfg)

    # --- memory -------------------------------------------------------------------------------------
    def replay_batch(self, n: int, payload: tuple[str, ...] | None = None) -> ReplayBatch | None:
        """n memory entries drawn uniformly without replacement from the run's device generator, with their
        stored payload (all keys, or those named); None while the memory is empty."""
        if self.memory is None:
            return None
        if isinstance(self.memory, ExemplarMemory):
            return self.memory.draw(n, self.engine.device_gen, payload or ())
        return self.memory.draw(n, self.engine.device_gen, payload)

    def remember(self, idx: torch.Tensor, labels: torch.Tensor, payload: dict[str, torch.Tensor] | None = None):
        """Online regime: offer stream samples (and their payload) to the reservoir buffer."""
        if not isinstance(self.memory, ReservoirMemory):
            raise TypeError("remember() needs the online regime's reservoir memory")
        self.memory.add(idx, labels, self.engine.device_gen, payload=payload)

    def exemplar_budget(self) -> int | None:
        """The offline memory's total exemplar budget now (fixed_total policy; None for any other memory)."""
        if isinstance(self.memory, ExemplarMemory) and self.memory.cfg.policy == "fixed_total":
            return self.memory.cfg.total
        return None

    def set_exemplar_budget(self, total: int) -> None:
        """Offline fixed_total memory: the total exemplar budget of the next selection (per class: total // seen
        classes), e.g. lowered by what a growing model stores beyond one backbone (MEMO's memory-aligned
        comparison). The card's protocol is untouched; a method calls this in every `learn`, so a resumed run
        sets it again before the next selection."""
        if self.exemplar_budget() is None:
            raise UserError("an exemplar budget can only be set on a fixed_total memory; use a card with "
                            "memory: {policy: fixed_total}")
        self.memory.cfg = dataclasses.replace(self.memory.cfg, total=max(0, int(total)))

    def exemplar_classes(self) -> list[int]:
        """Labels that have exemplars in the offline memory (none without one)."""
        return self.memory.classes() if isinstance(self.memory, ExemplarMemory) else []

    def class_exemplars(self, label: int) -> torch.Tensor:
        """Train-split indices of a class's kept exemplars, in herding order."""
        return self.memory.class_exemplars(label)

    def classes_without_payload(self, key: str) -> list[int]:
        """Offline memory: classes whose exemplars have no payload `key` yet (just selected)."""
        return self.memory.labels_without(key) if isinstance(self.memory, ExemplarMemory) else []

    def write_payload(self, label: int, values: dict[str, torch.Tensor]) -> None:
        """Offline memory: per-exemplar payload of a class (aligned with class_exemplars), kept with it."""
        self.memory.write_payload(label, values)

    # --- checkpoints --------------------------------------------------------------------------------
    def restore(self, packed: dict | None, prepare: bool = True) -> nn.Module | None:
        """A module from its `pack_module` form, on the run's device and (`prepare`) made ready for it as
        engine.prepare does (channels_last on CUDA, compile if asked); frozen modules come back frozen."""
        module = unpack_module(packed, self.device)
        if module is None or not prepare:
            return module
        if isinstance(module, ExtractorStack):
            for ext in module.extractors:
                self.engine.prepare(ext)
            return module
        return self.engine.prepare(module)


@dataclass
class Footprint:
    extractors: int
    params: int
    params_backbone: int | None = None  # extractors only (no classifier), as the papers count #Params


class Method:
    """Base of every method. Class attributes declare what the harness must know before the first task."""
    name: ClassVar[str] = ""                   # set by @register
    family: ClassVar[str] = ""                 # config section shared by aliases (der_prune -> der)
    display_name: ClassVar[str] = ""           # the name in report tables (default: the registered name)
    Config: ClassVar[type] = NoOptions
    uses_exemplars: ClassVar[bool] = True      # False: the harness never gives this method a memory
    regimes: ClassVar[tuple[str, ...]] = ("offline",)
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""                  # citation shown by `cilbench show-method`

    def __init__(self, cfg: Any, ctx: Context):
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def run_tag(cls, cfg: Any) -> str | None:
        """A tag that belongs in the run name (e.g. the pool size of TSD: 'N3')."""
        return None

    @classmethod
    def architecture(cls, cfg: Any, card_backbone: str) -> str:
        """The network this method, so configured, runs, named as the papers' tables name it: the card's
        backbone unless the method builds its own (a transformer, a backbone option). Recorded in config.yaml
        (`method_backbone`); the report shows it and compares published rows only where it matches."""
        return card_backbone

    @classmethod
    def backbone_needs(cls, cfg: Any) -> dict[str, str]:
        """What this method, so configured, needs from the card's backbone beyond pooled features:
        {capability: the option or part that needs it}, capabilities as backbone_card.CAPABILITIES ("factory":
        one of cilbench's own ResNets, e.g. for physical pruning; "stage_maps": stage_outputs/stage_channels),
        plus "no_pretrained" for a method that builds its networks without ctx.new_backbone (a card's weights
        file cannot apply). Checked when the run is resolved, so a backbone that lacks one is refused before
        anything runs."""
        return {}

    @classmethod
    def augmentation(cls, cfg: Any, card: AugmentConfig, image_side: int) -> AugmentConfig:
        """The training augmentation this method trains with, given the card's (SEED adds AutoAugment and
        Cutout). Resolved with the config, so config.yaml records it."""
        return card

    def learn(self, task: Task, ctx: Context) -> None:
        raise NotImplementedError

    def after_memory_update(self, task: Task, ctx: Context) -> None:
        """Called after this task's exemplars were selected (offline memory; by the harness after learn(), or by
        the method inside it with ctx.select_exemplars_now): write their payload."""

    def networks(self) -> list[nn.Module]:
        """Modules put in eval mode before evaluation and herding."""
        raise NotImplementedError

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Scores over all seen classes for a normalised batch."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Features herding selects exemplars on (DER: the concatenated super-feature)."""
        raise NotImplementedError

    def scores_with_task_aware(self, x: torch.Tensor,
                               bounds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What evaluation reads, from one forward of each network: the scores over all seen classes and the
        task-aware scores, where column block j (bounds[j]:bounds[j + 1]) scores the batch among task j's classes
        alone (SEED: each expert's softmax over that task's classes). The harness reads each sample's own task's
        block for `top1_task_aware`. None (the default): the method has no task-aware view."""
        return self.scores(x), None

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


class ConcatExtractorMethod(Method):
    """A method that infers with extractors whose features are concatenated (`self.stack`, an ExtractorStack)
    and one linear head over them (`self.head`): DER and TSD. Herding uses the concatenated feature; #params
    counts stack and head, the stack alone as params_backbone; #extractors is the stack's length."""
    stack: ExtractorStack
    head: nn.Module

    def networks(self) -> list[nn.Module]:
        return [self.stack, self.head]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stack(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stack(x)

    def inference_footprint(self) -> Footprint:
        return Footprint(len(self.stack), count_params(self.stack, self.head), count_params(self.stack))

    def pack_inference(self) -> dict:
        return {"stack": pack_module(self.stack), "head": pack_module(self.head)}

    def restore_inference(self, state: dict) -> None:
        self.stack, self.head = self.ctx.restore(state["stack"]), self.ctx.restore(state["head"])
