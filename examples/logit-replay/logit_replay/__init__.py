"""Replay with logit distillation: an example cilbench method written outside the package.

Per task: the head grows to the seen classes; the network trains on new data plus the exemplar memory with
cross-entropy, plus a distillation term that keeps the old classes' logits close to those of the network as it
was before the task (Hinton et al.'s soft cross-entropy at temperature T, as in LwF and iCaRL's variants).
The harness selects the exemplars (herding on `features`), evaluates, checkpoints and writes the results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilbench.kit import (
    Context,
    OneNetworkMethod,
    Task,
    expand_head,
    frozen_forward,
    kd_soft_ce,
    option,
    pack_module,
    register,
    snapshot,
)


@dataclass
class LogitReplayConfig:
    kd_weight: float = option(1.0, help="weight of the distillation term on the old classes' logits",
                              bounds=(0, None))
    temperature: float = option(2.0, help="distillation temperature T", bounds=(0.01, 100))


@register("logit_replay")
class LogitReplay(OneNetworkMethod):
    Config = LogitReplayConfig
    display_name = "Replay + logit KD"
    summary = "replay with logit distillation from the previous model (example plug-in)"
    uses_exemplars = True
    regimes = ("offline",)

    def __init__(self, cfg: LogitReplayConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.backbone = ctx.new_backbone()
        self.head: torch.nn.Linear | None = None

    def learn(self, task: Task, ctx: Context) -> None:
        teacher = None
        if self.head is not None and self.cfg.kd_weight > 0:      # the model before this task, frozen
            teacher = (snapshot(self.backbone), snapshot(self.head))
        self.head = expand_head(self.head, self.backbone.out_dim, task.n_seen).to(ctx.device)
        n_old = task.n_old

        def loss(batch):
            logits = self.head(self.backbone(batch.x))
            total = F.cross_entropy(logits, batch.y)
            if teacher is not None:
                old = frozen_forward(lambda x: teacher[1](teacher[0](x)), batch.x, ctx.engine.frozen_chunk)
                total = total + self.cfg.kd_weight * kd_soft_ce(logits[:, :n_old], old, self.cfg.temperature)
            return total

        params = [*self.backbone.parameters(), *self.head.parameters()]
        ctx.engine.fit(params, loss, ctx.train_indices(task), ctx.protocol.train, phase="ce",
                       modules=[self.backbone])
        ctx.log(f"logit_replay: task {task.index + 1} trained on {len(ctx.train_indices(task))} samples")

    def state_dict(self) -> dict:
        return {"backbone": pack_module(self.backbone), "head": pack_module(self.head)}

    def load_state_dict(self, state: dict) -> None:
        self.backbone = self.ctx.restore(state["backbone"])
        self.head = self.ctx.restore(state["head"], prepare=False)
