"""ER: online experience replay (Chaudhry et al. 2019; the base of PCR/HPCR).

Each stream batch is trained on together with a replay batch drawn from the reservoir buffer; the stream
batch then enters the reservoir. One pass over the stream.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cilbench.kit import Context, ReservoirMemory, UserError, expand_head, register

from .baselines import SingleNetwork


@register("er")
class ExperienceReplay(SingleNetwork):
    uses_exemplars = True
    regimes = ("online",)
    summary = "online experience replay with a reservoir buffer"
    paper = "Chaudhry et al. On Tiny Episodic Memories in Continual Learning. 2019, arXiv:1902.10486"

    def __init__(self, cfg, ctx: Context):
        if not isinstance(ctx.memory, ReservoirMemory):
            raise UserError(f"er replays from a reservoir buffer, but protocol '{ctx.protocol.name}' has "
                            f"memory.policy {ctx.protocol.memory.policy}; use --set memory.policy=reservoir")
        super().__init__(cfg, ctx)

    def learn(self, task, ctx: Context) -> None:
        self.head = expand_head(self.head, self.backbone.out_dim, task.n_seen, self.cfg.inherit_head).to(ctx.device)
        params = [*self.backbone.parameters(), *self.head.parameters()]

        def loss(batch):
            x, y = batch.x, batch.y
            replay = ctx.replay_batch(ctx.protocol.online.replay_batch, payload=())
            if replay is not None:
                (x_mem,), y_mem = ctx.engine.train_views(replay.idx)
                x, y = torch.cat([x, x_mem]), torch.cat([y, y_mem])
            return F.cross_entropy(self.head(self.backbone(x)), y)

        def remember(batch):
            ctx.remember(batch.idx, batch.y)

        ctx.engine.fit(params, loss, task.train_idx, ctx.protocol.train, phase="online", modules=[self.backbone],
                       after_step=remember)
