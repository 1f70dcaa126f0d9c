"""ER: online experience replay (Chaudhry et al. 2019; the base of PCR/HPCR).

Each stream batch is trained on together with a replay batch drawn from the reservoir buffer; the stream
batch then enters the reservoir. One pass over the stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cilbench.errors import UserError
from cilbench.kit.contract import Context, register
from cilbench.kit.nets import expand_head
from cilbench.train.memory import ReservoirMemory

from .baselines import SingleNetwork


@register("er")
class ExperienceReplay(SingleNetwork):
    uses_exemplars = True
    regimes = ("online",)
    summary = "online experience replay with a reservoir buffer"

    def __init__(self, cfg, ctx: Context):
        if not isinstance(ctx.memory, ReservoirMemory):
            raise UserError(f"er replays from a reservoir buffer, but protocol '{ctx.protocol.name}' has "
                            f"memory.policy {ctx.protocol.memory.policy}; use --set memory.policy=reservoir")
        super().__init__(cfg, ctx)

    def learn(self, task, ctx: Context) -> None:
        self.head = expand_head(self.head, self.backbone.out_dim, task.n_seen, self.cfg.inherit_head).to(ctx.device)
        params = [*self.backbone.parameters(), *self.head.parameters()]
        memory, engine = ctx.memory, ctx.engine

        def loss(batch):
            x, y = batch.x, batch.y
            pos = memory.sample(ctx.protocol.online.replay_batch, engine.device_gen)
            if pos is not None:
                (x_mem,), y_mem = engine.train_views(memory.idx[pos])
                x, y = torch.cat([x, x_mem]), torch.cat([y, y_mem])
            return F.cross_entropy(self.head(self.backbone(x)), y)

        def remember(batch):
            memory.add(batch.idx, batch.y, engine.device_gen)

        engine.fit(params, loss, task.train_idx, ctx.protocol.train, phase="online", modules=[self.backbone],
                   after_step=remember)
