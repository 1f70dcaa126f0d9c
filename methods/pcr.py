"""PCR (Lin et al., CVPR 2023) and HPCR (Lin et al., TNNLS): proxy-based contrastive replay.

Online, for every stream batch B (the papers and the official agents/pcr.py and agents/hpcr.py):
  1. two views of B: the card's train transform (none on the online cards: the raw image, as the code's
     ToTensor) and one strong augmentation; forward them and keep the raw view's logits and feature, taken
     before the update, as B's reservoir payload (HPCR);
  2. draw B_M from the reservoir (from the first step of task 1 on) and forward its two views;
  3. loss over every view of B and B_M as an anchor:
       PCR:  L_PCR (eq. 9), anchor-to-proxy pairs over the batch's classes weighted by their counts k_c;
       HPCR: HT(s) * (L_PCR, or eq. 18 with anchor-to-sample pairs when s(N) = 1)
             + alpha * PCD(B_M) + beta * SCD(B_M) from the second task on (eq. 26);
  4. one optimiser step; B enters the reservoir with its payload.
Offline (our extension; the papers are online only): the same step over the task's batches for the card's
epochs, with a replay batch drawn beside each from the harness's exemplar memory; an exemplar's payload
(eval-mode logits and feature of its raw image) is written when the harness selects it, at the end of the
task that learned its class.
Inference: the cosine logits of the seen classes (eq. 10).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cilbench.kit import (
    AugmentConfig,
    Augmenter,
    Context,
    ExemplarMemory,
    Footprint,
    OneNetworkMethod,
    ReservoirMemory,
    Task,
    UserError,
    count_params,
    ht_multiplier,
    option,
    pack_module,
    pcd_loss,
    pcr_hc_loss,
    pcr_loss,
    proxy_head,
    register,
    scd_loss,
)

PAYLOAD = ("logits", "features")


@dataclass
class PCRConfig:
    tau: float = option(0.09, bounds=(1e-6, None), help="proxy-classifier temperature: logits = cos(z, w_c) / tau")
    backbone_init: Literal["torch", "kaiming_fan_out"] = option(
        "torch", help="conv weights of the backbone at the start: torch = PyTorch's nn.Conv2d default, as the "
                      "code's reduced ResNet-18; kaiming_fan_out = kaiming_normal(fan_out), the other methods' init "
                      "(factory ResNets; a timm backbone keeps timm's init)")
    two_views: bool = option(True, help="each sample as its raw view plus one strong augmentation (code)")
    crop_scale_min: float = option(0.2, bounds=(1e-6, 1),
                                   help="the strong view's RandomResizedCrop area range is [crop_scale_min, 1]")
    separate_forward: bool = option(True, help="stream and replay views in two forward passes, BN statistics per "
                                               "pass (code)")
    replay_batch: int = option(0, unit="images", bounds=(0, None),
                               help="replay batch size; 0: the card's online.replay_batch (online), "
                                    "train.batch_size (offline)")


@dataclass
class HPCRConfig(PCRConfig):
    hc: Literal["auto", "on", "off"] = option(
        "off", help="anchor-to-sample pairs (eq. 18): auto = s(N) of eq. 19, on when the N anchors >= hc_n_min; "
                    "off = the code's default pcr_type 'proxy' (no such pairs); online (N = 40) auto and off agree")
    hc_n_min: int = option(60, unit="anchors", bounds=(1, None),
                           help="N_min of eq. 19 (Fig. 5: pairs help from batches of ~60)")
    ht_mode: Literal["code", "paper", "off"] = option(
        "code", help="HT's cyclic loss multiplier tau / tau(s): code = the multiplier follows the cosine "
                     "(agents/hpcr.py); paper = tau(s) follows the cosine of eq. 21; off = 1")
    ht_tau_min: float = option(0.05, bounds=(1e-6, None), help="HT's lowest temperature tau(s) (below ht_tau_max)")
    ht_tau_max: float = option(0.16, bounds=(1e-6, None), help="HT's highest temperature tau(s)")
    ht_cycle_steps: int = option(500, unit="steps", bounds=(1, None), help="S of eq. 21, in optimiser steps")
    ht_reset: Literal["task", "epoch", "never"] = option(
        "task", help="when HT's step s restarts: code: s is the loader's batch index, i.e. per task online (one "
                     "epoch); offline we keep the per-task reset")
    pcd_alpha: float = option(0.1, bounds=(0, None),
                              help="alpha, weight of PCD (code: 0.1 CIFAR-100 / Mini-ImageNet, 0.01 CIFAR-10)")
    scd_beta: float = option(0.5, bounds=(0, None), help="beta, weight of SCD")
    scd_tau: float = option(0.09, bounds=(1e-6, None), help="temperature of SCD")
    distill_from_task: int = option(1, bounds=(0, None), help="PCD and SCD from this 0-based task on (code: 1)")


def strong_augmenter(ctx: Context, crop_scale_min: float) -> Augmenter:
    """The code's transforms_aug: RandomResizedCrop(side, scale (crop_scale_min = 0.2)-1), flip,
    ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale p 0.2; normalised like the card. It draws from the
    engine's augmentation generator, so the engine's per-task reseeding covers it."""
    card = ctx.protocol.augment
    side = card.random_resized_crop or ctx.stream.image_shape[-1]   # ImageNet: the card's 224 crop, not 256
    cfg = AugmentConfig(random_resized_crop=side, rrc_scale=[crop_scale_min, 1.0], flip=True,
                        brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2,
                        mean=card.mean, std=card.std)
    return ctx.augmenter(cfg)


@register("pcr")
class PCR(OneNetworkMethod):
    Config = PCRConfig
    uses_exemplars = True
    regimes = ("online", "offline")
    summary = "proxy-based contrastive replay (online; offline variant on exemplar memory)"
    paper = "Lin et al. PCR: Proxy-based Contrastive Replay for Online Class-Incremental Continual Learning. CVPR 2023"
    stores_payload = False

    def __init__(self, cfg: PCRConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.validate(cfg, ctx)
        self.online = ctx.protocol.regime == "online"
        self.backbone = ctx.new_backbone(init=cfg.backbone_init)
        self.head = ctx.engine.prepare(proxy_head(self.backbone.out_dim, ctx.protocol.num_classes, cfg.tau))
        self.strong = strong_augmenter(ctx, cfg.crop_scale_min)
        self.n_seen = 0
        self.task_index = 0
        self.steps_done = 0          # optimiser steps over the whole run

    def validate(self, cfg: PCRConfig, ctx: Context) -> None:
        wanted = ReservoirMemory if ctx.protocol.regime == "online" else ExemplarMemory
        if not isinstance(ctx.memory, wanted):
            policy = "reservoir" if wanted is ReservoirMemory else "fixed_total or per_class"
            raise UserError(f"{self.name} replays from memory, but protocol '{ctx.protocol.name}' has memory.policy "
                            f"{ctx.protocol.memory.policy}; use --set memory.policy={policy.split()[0]}")

    # --- the network ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits over every class of the protocol (cos / tau) and the feature z."""
        z = self.backbone(x)
        return self.head(z), z

    def views(self, idx: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
        """The views of train samples `idx`, stacked view by view: the card's train transform, then the strong
        augmentation. `first` is the first view when the engine already made it."""
        images = self.ctx.train_images(idx)
        first = self.ctx.engine.train_transform(images) if first is None else first
        return torch.cat([first, self.strong.train(images)]) if self.cfg.two_views else first

    # --- replay --------------------------------------------------------------------------------------
    def replay_size(self, ctx: Context) -> int:
        if self.cfg.replay_batch:
            return self.cfg.replay_batch
        return ctx.protocol.online.replay_batch if self.online else ctx.protocol.train.batch_size

    def replay_source(self, ctx: Context):
        """A function drawing one replay batch (None while memory is empty), uniformly without replacement:
        from the reservoir with every entry's payload (online), from the exemplars (offline)."""
        n = self.replay_size(ctx)
        if self.online:
            return lambda: ctx.replay_batch(n)
        keys = PAYLOAD if self.stores_payload else ()
        return lambda: ctx.replay_batch(n, payload=keys)

    # --- training ------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        self.n_seen, self.task_index = task.n_seen, task.index
        draw = self.replay_source(ctx)
        fresh: dict[str, torch.Tensor] = {}

        def loss(batch):
            x_new, labels = self.views(batch.idx, batch.x), batch.y.repeat(self.n_views)
            replay = draw()
            if replay is None:
                logits, feats = self.forward(x_new)
                mem = None
            else:
                logits, feats, (o_mem, z_mem) = self.forward_both(x_new, self.views(replay.idx))
                labels = torch.cat([replay.labels.repeat(self.n_views), labels])   # memory anchors first (code)
                mem = (o_mem, z_mem, replay.payload)
            start = len(logits) - len(x_new)
            raw = slice(start, start + len(batch.idx))                          # B's raw view: its payload
            fresh.update(logits=logits[raw].detach().float(), features=feats[raw].detach().float())
            return self.objective(logits, feats, labels, mem, self.ht_step(batch))

        def remember(batch):
            self.steps_done += 1
            if self.online:
                ctx.remember(batch.idx, batch.y, payload=dict(fresh) if self.stores_payload else None)

        params = [*self.backbone.parameters(), self.head.weight]
        ctx.engine.fit(params, loss, task.train_idx, ctx.protocol.train, phase=self.name, modules=[self.backbone],
                       after_step=remember)

    @property
    def n_views(self) -> int:
        return 2 if self.cfg.two_views else 1

    def forward_both(self, x_new: torch.Tensor, x_mem: torch.Tensor):
        """Logits and features of every anchor (memory views first) and the memory part on its own."""
        if self.cfg.separate_forward:
            o_new, z_new = self.forward(x_new)
            o_mem, z_mem = self.forward(x_mem)
            return torch.cat([o_mem, o_new]), torch.cat([z_mem, z_new]), (o_mem, z_mem)
        logits, feats = self.forward(torch.cat([x_mem, x_new]))
        return logits, feats, (logits[:len(x_mem)], feats[:len(x_mem)])

    def ht_step(self, batch) -> int:
        return batch.step

    def objective(self, logits, feats, labels, mem, step: int) -> torch.Tensor:
        """Eq. 9 over every anchor of B and B_M."""
        return pcr_loss(logits, labels)

    # --- harness hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def after_memory_update(self, task: Task, ctx: Context) -> None:
        if not self.stores_payload or not isinstance(ctx.memory, ExemplarMemory):
            return
        for label in ctx.classes_without_payload(PAYLOAD[0]):
            feats = ctx.engine.apply(self.backbone, ctx.class_exemplars(label))
            ctx.write_payload(label, {"logits": self.head(feats).float(), "features": feats})

    def scores(self, x):
        return self.head(self.backbone(x))[:, : self.n_seen]

    def inference_footprint(self) -> Footprint:
        backbone = count_params(self.backbone)
        return Footprint(1, backbone + self.n_seen * self.backbone.out_dim, params_backbone=backbone)

    def state_dict(self) -> dict:
        return {"backbone": pack_module(self.backbone), "head": self.head.state_dict(),
                "n_seen": self.n_seen, "task_index": self.task_index, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.backbone = self.ctx.restore(state["backbone"])
        self.head.load_state_dict(state["head"])
        self.n_seen, self.task_index, self.steps_done = state["n_seen"], state["task_index"], state["steps_done"]


@register("hpcr")
class HPCR(PCR):
    name = "hpcr"
    family = "hpcr"
    Config = HPCRConfig
    summary = "holistic PCR: + conditional anchor-to-sample pairs, cyclic loss scale, PCD + SCD distillation"
    paper = "Lin et al. HPCR: Holistic Proxy-based Contrastive Replay for Online Continual Learning. IEEE TNNLS"
    stores_payload = True

    def validate(self, cfg: HPCRConfig, ctx: Context) -> None:
        super().validate(cfg, ctx)
        if not cfg.ht_tau_min < cfg.ht_tau_max:
            raise UserError(f"hpcr.ht_tau_min: must be below ht_tau_max, got {cfg.ht_tau_min} >= {cfg.ht_tau_max}")

    def hc_active(self, anchors: int) -> bool:
        """s(N) of eq. 19, N = the number of anchor rows (views included)."""
        return self.cfg.hc == "on" or (self.cfg.hc == "auto" and anchors >= self.cfg.hc_n_min)

    def ht_step(self, batch) -> int:
        if self.cfg.ht_reset == "epoch":
            return batch.step
        if self.cfg.ht_reset == "task":
            return batch.epoch * batch.steps_per_epoch + batch.step
        return self.steps_done

    def objective(self, logits, feats, labels, mem, step: int) -> torch.Tensor:
        cfg = self.cfg
        if self.hc_active(len(labels)):
            contrast = pcr_hc_loss(logits, feats, labels, cfg.tau)
        else:
            contrast = pcr_loss(logits, labels)
        loss = ht_multiplier(step, cfg.ht_mode, cfg.tau, cfg.ht_tau_min, cfg.ht_tau_max, cfg.ht_cycle_steps) * contrast
        if mem is not None and self.task_index >= cfg.distill_from_task:
            mem_logits, mem_feats, stored = mem
            views = len(mem_logits) // len(stored["logits"])     # the raw image's payload teaches every view
            loss = loss + cfg.pcd_alpha * pcd_loss(mem_logits, stored["logits"].repeat(views, 1), labels)
            loss = loss + cfg.scd_beta * scd_loss(mem_feats, stored["features"].repeat(views, 1), cfg.scd_tau)
        return loss
