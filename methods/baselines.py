"""Reference points that prove the contract serves every regime.

- finetune: one network trained on the new classes only (no memory): the lower bound.
- replay:   finetune on new data plus the protocol's exemplar memory.
- joint:    trains on every sample of every class seen so far: the upper bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.kit import Context, OneNetworkMethod, Task, expand_head, option, pack_module, register


@dataclass
class SingleNetConfig:
    inherit_head: bool = option(True, help="keep the old classes' head weights when the head grows")
    reinit: bool = option(False, help="joint only: train from scratch at every task instead of continuing")


class SingleNetwork(OneNetworkMethod):
    """One backbone and a linear head that grows with the classes, trained with cross-entropy."""
    Config = SingleNetConfig

    def __init__(self, cfg: SingleNetConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.backbone = ctx.new_backbone()
        self.head: torch.nn.Linear | None = None

    def training_indices(self, task: Task, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def learn(self, task: Task, ctx: Context) -> None:
        self.head = expand_head(self.head, self.backbone.out_dim, task.n_seen, self.cfg.inherit_head).to(ctx.device)
        params = [*self.backbone.parameters(), *self.head.parameters()]
        ctx.engine.fit(params, self.loss, self.training_indices(task, ctx), ctx.protocol.train,
                       phase="ce", modules=[self.backbone])

    def loss(self, batch) -> torch.Tensor:
        return F.cross_entropy(self.head(self.backbone(batch.x)), batch.y)

    def state_dict(self) -> dict:
        return {"backbone": pack_module(self.backbone), "head": pack_module(self.head)}

    def load_state_dict(self, state: dict) -> None:
        self.backbone = self.ctx.restore(state["backbone"])
        self.head = self.ctx.restore(state["head"], prepare=False)


@register("finetune")
class Finetune(SingleNetwork):
    uses_exemplars = False
    regimes = ("offline", "online")
    summary = "new classes only, no memory (lower bound)"

    def training_indices(self, task, ctx):
        return task.train_idx


@register("replay")
class Replay(SingleNetwork):
    uses_exemplars = True
    summary = "finetune on new data + exemplar memory"

    def training_indices(self, task, ctx):
        return ctx.train_indices(task)


@register("joint")
class Joint(SingleNetwork):
    uses_exemplars = False
    summary = "all data of all seen classes (upper bound)"

    def learn(self, task, ctx):
        if self.cfg.reinit:
            self.backbone, self.head = ctx.new_backbone(), None
        super().learn(task, ctx)

    def training_indices(self, task, ctx):
        return ctx.seen_indices(task)
