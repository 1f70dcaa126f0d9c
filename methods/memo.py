"""MEMO: Memory-efficient Expandable MOdel (Zhou, Wang, Ye, Zhan. "A Model or 603 Exemplars: Towards
Memory-Efficient Class-Incremental Learning", ICLR 2023, arXiv:2205.13218).

The backbone is cut at a stage boundary (kit.split_backbone): the shallow "generalized blocks" (stem + the first
stages) are shared by every task, the deep "specialized blocks" (the last stage) are expanded per task.
Per task t:
- t = 1: generalized blocks + specialized block S_1 + a linear classifier, trained with cross-entropy.
- t > 1: every old specialized block is frozen (parameters off, BN statistics fixed); a new block S_t starts as
  a copy of S_{t-1}; the features [S_1(g(x)), ..., S_t(g(x))] feed a classifier over all seen classes whose
  old block is inherited (DER-like expansion), and an auxiliary classifier on S_t(g(x)) alone predicts
  |new classes| + 1 labels (every old class is label 0). Loss: CE + aux_weight * CE_aux. The generalized blocks
  g keep training with every task (the authors' code, `train_base: true`), or stay frozen after task 1.
  Gradients reach g through every block, the frozen old ones included, as in the code.
- after training, weight aligning (the code's `weight_align`): the new classes' weight rows are rescaled to
  the old rows' mean norm.
Herding runs on the concatenated features. Only one copy of g exists, so #params counts it once;
#extractors is the number of specialized blocks. The model's memory is reported in bytes (float32) and in
exemplars of the card's image size (uint8), the paper's memory-aligned unit (one ResNet-32 = 603 CIFAR images).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    Context,
    ExtractorStack,
    Footprint,
    HeadInit,
    Method,
    Task,
    TrainConfig,
    UserError,
    aux_labels,
    count_params,
    default_shared_stages,
    expand_head,
    freeze,
    frozen_forward,
    is_frozen,
    linear_head,
    option,
    pack_module,
    phase_config,
    register,
    split_backbone,
)

BYTES_PER_PARAM = 4   # float32 weights, as the paper counts a model's memory


@dataclass
class MEMOConfig:
    # --- network -----------------------------------------------------------------------------------
    shared_stages: Optional[int] = option(
        None, bounds=(0, None),
        help="stages (after the stem) in the shared generalized blocks; null: every stage but the last (the "
             "code's memo_resnet32: stem + stages 1-2, stage 3 specialized; memo_resnet18: stem + layers 1-3, "
             "layer 4 specialized)")
    train_shared: bool = option(True, help="code (train_base: true): the generalized blocks keep training in every "
                                           "task; false: frozen after the first task")
    train_old_specialized: bool = option(False, help="code's train_adaptive: false freezes every old specialized "
                                                     "block; true keeps training them")
    aux_weight: float = option(1.0, bounds=(0, None),
                               help="alpha_aux, weight of the auxiliary classifier's loss (0 turns it off); never "
                                    "applied at t=1")
    weight_align: bool = option(True, help="code: weight aligning of the new classes' classifier rows after each "
                                           "incremental task; false: none")
    head_init: HeadInit = option("pycil", help="classifier init: pycil = the code's SimpleLinear; der; torch")
    # --- schedule -----------------------------------------------------------------------------------
    schedule: Literal["code", "paper", "card"] = option(
        "code", help="code: first task base_epochs at base_milestones, later tasks recipe_epochs at milestones; "
                     "paper: every task recipe_epochs at paper_milestones (Sec. 5.1); card: the card's schedule. "
                     "code/paper are scaled to the card's epochs (card epochs / recipe_epochs)")
    recipe_epochs: int = option(170, unit="epochs", bounds=(1, None),
                                help="the incremental tasks' epochs in the recipe the schedule is scaled from")
    base_epochs: int = option(200, unit="epochs", bounds=(1, None), help="schedule code: the first task's epochs")
    base_milestones: list[int] = option([60, 120, 170], unit="epochs", bounds=(0, None),
                                        help="schedule code: the first task's lr milestones (x0.1)")
    milestones: list[int] = option([80, 120, 150], unit="epochs", bounds=(0, None),
                                   help="schedule code: the incremental tasks' lr milestones (x0.1)")
    paper_milestones: list[int] = option([80, 150], unit="epochs", bounds=(0, None),
                                         help="schedule paper: lr milestones (x0.1) of every task")
    incremental_weight_decay: Optional[float] = option(
        2e-4, bounds=(0, None), help="weight decay of the incremental tasks (code: 2e-4; the first task keeps the "
                                     "card's, 5e-4 on CIFAR); null: the card's")
    # --- memory-aligned comparison ------------------------------------------------------------------
    memory_alignment: Literal["none", "one_backbone", "der_final"] = option(
        "none", help="fixed_total budget in exemplars of the card's image size (float32 parameters, uint8 images): "
                     "none = the card's; one_backbone = the card's minus what the model stores beyond one backbone, "
                     "step by step; der_final = the authors' 'fair' setting: the card's plus what MEMO's final "
                     "model saves against DER's (one backbone per task), e.g. 3312 on CIFAR-100 B0-10")


def _scaled(epochs: float, f: float) -> int:
    return int(round(epochs * f))


def aligned_budget(mode: str, total: int, shared: int, specialized: int, blocks: int, tasks: int,
                   image_bytes: int) -> int:
    """The exemplar budget under a memory alignment, from parameter counts (generalized blocks `shared`, one
    specialized block `specialized`, `blocks` of them now, `tasks` in the stream):
    - one_backbone: total - ceil(bytes beyond one backbone / image bytes), at least 0;
    - der_final: total + floor(bytes DER's final model (tasks backbones) needs beyond MEMO's final model / image
      bytes), the authors' fair2exemplar."""
    backbone = shared + specialized
    if mode == "one_backbone":
        extra = BYTES_PER_PARAM * (shared + blocks * specialized - backbone)
        return max(0, total - math.ceil(extra / image_bytes))
    if mode == "der_final":
        saved = BYTES_PER_PARAM * (tasks * backbone - (shared + tasks * specialized))
        return total + math.floor(saved / image_bytes)
    return total


@register("memo")
class MEMO(Method):
    Config = MEMOConfig
    display_name = "MEMO"
    uses_exemplars = True
    regimes = ("offline",)
    summary = "shared generalized blocks + one specialized deep stage per task, aux loss, weight aligning"
    paper = ("Zhou, Wang, Ye, Zhan. A Model or 603 Exemplars: Towards Memory-Efficient Class-Incremental Learning."
             " ICLR 2023, arXiv:2205.13218")

    @classmethod
    def run_tag(cls, cfg: MEMOConfig) -> str | None:
        """A memory-aligned budget keeps more exemplars than the card's: its own run name (memo+der_final,
        memo+one_backbone), so the paper's memory-aligned rows are compared with it and not with a plain run."""
        return None if cfg.memory_alignment == "none" else cfg.memory_alignment

    def __init__(self, cfg: MEMOConfig, ctx: Context):
        super().__init__(cfg, ctx)
        if cfg.memory_alignment != "none" and ctx.exemplar_budget() is None:
            raise UserError("memo.memory_alignment needs a fixed_total memory; use a B0 card or set "
                            "memo.memory_alignment=none")
        self.trunk: nn.Module | None = None          # generalized blocks, shared
        self.tails = ExtractorStack()                # specialized blocks, one per task
        self.head: nn.Linear | None = None
        self.image_bytes = self.exemplar_bytes(ctx)

    @staticmethod
    def exemplar_bytes(ctx: Context) -> int:
        """One exemplar in uint8 at the size the network trains on (the authors' fair2exemplar counts an
        ImageNet image at 224x224x3, the training crop, not the stored 256 side)."""
        aug, shape = ctx.protocol.augment, ctx.stream.image_shape
        side = aug.random_resized_crop or aug.crop or aug.resize or shape[-1]
        return int(shape[0]) * int(side) * int(side)

    # --- schedules -------------------------------------------------------------------------------------
    def train_config(self, task: Task) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        if task.index > 0 and cfg.incremental_weight_decay is not None:
            base = phase_config(base, weight_decay=cfg.incremental_weight_decay)
        if cfg.schedule == "card":
            return base
        f = base.epochs / cfg.recipe_epochs
        if cfg.schedule == "paper":
            epochs, milestones = base.epochs, cfg.paper_milestones
        elif task.index == 0:
            epochs, milestones = max(1, _scaled(cfg.base_epochs, f)), cfg.base_milestones
        else:
            epochs, milestones = base.epochs, cfg.milestones
        return phase_config(base, epochs=epochs, schedule="multistep", warmup_epochs=0, gamma=0.1,
                            milestones=[_scaled(m, f) for m in milestones])

    # --- building blocks -------------------------------------------------------------------------------
    def expand(self, ctx: Context) -> nn.Module:
        """The task's new specialized block: split off a fresh backbone at t=1, a copy of the last one after."""
        if self.trunk is None:
            net = ctx.new_backbone()
            net = getattr(net, "_orig_mod", net)
            split = self.cfg.shared_stages
            if split is None:
                split = default_shared_stages(net.spec)
            trunk, tail = split_backbone(net, split)
            self.trunk = ctx.engine.prepare(trunk)
            return ctx.engine.prepare(tail)
        if not self.cfg.train_shared and not is_frozen(self.trunk):
            self.trunk = freeze(self.trunk)
        for i in range(len(self.tails)):
            if not self.cfg.train_old_specialized and not self.tails.frozen[i]:
                self.tails.freeze(i)
        tail = copy.deepcopy(getattr(self.tails.extractors[-1], "_orig_mod", self.tails.extractors[-1]))
        for p in tail.parameters():
            p.requires_grad_(True)
        return ctx.engine.prepare(tail.train())

    def shared_map(self, x: torch.Tensor) -> torch.Tensor:
        if is_frozen(self.trunk):
            return frozen_forward(self.trunk, x, self.ctx.engine.frozen_chunk)
        return self.trunk(x)

    def features_each(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every specialized block's feature. With trainable generalized blocks the frozen blocks still pass
        gradients back to them (the code runs them without no_grad); with frozen ones nothing needs a graph."""
        base = self.shared_map(x)
        if is_frozen(self.trunk):
            return self.tails.features_each(base, self.ctx.engine.frozen_chunk)
        return [tail(base) for tail in self.tails.extractors]

    # --- the task --------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        cfg = self.cfg
        new = self.expand(ctx)
        self.tails.add(new)
        self.head = ctx.engine.prepare(expand_head(self.head, self.tails.out_dim, task.n_seen,
                                                   init=cfg.head_init).to(ctx.device))
        head, n_old = self.head, task.n_old
        aux = None
        if n_old > 0 and cfg.aux_weight > 0:
            aux = ctx.engine.prepare(linear_head(new.out_dim, task.n_new + 1, init=cfg.head_init).to(ctx.device))
        self.align_exemplar_budget(ctx)

        def loss_fn(batch):
            feats = self.features_each(batch.x)
            loss = F.cross_entropy(head(torch.cat(feats, dim=1)), batch.y)
            if aux is not None:
                loss = loss + cfg.aux_weight * F.cross_entropy(aux(feats[-1]), aux_labels(batch.y, n_old))
            return loss

        modules = [self.tails] + ([] if is_frozen(self.trunk) else [self.trunk])
        params = [p for m in (self.trunk, self.tails, head, aux) if m is not None
                  for p in m.parameters() if p.requires_grad]
        ctx.engine.fit(params, loss_fn, ctx.train_indices(task), self.train_config(task), phase="memo",
                       modules=modules)
        if n_old > 0 and cfg.weight_align:
            self.align_weights(n_old)
        ctx.log(f"memo: task {task.index + 1}: {len(self.tails)} specialized block(s), "
                f"{self.step_record()['model_exemplars']:.1f} exemplars' worth of model")

    @torch.no_grad()
    def align_weights(self, n_old: int) -> None:
        """Weight aligning: the new rows are rescaled to the old rows' mean norm (weights only, as the code)."""
        w = self.head.weight
        w[n_old:] *= w[:n_old].norm(dim=1).mean() / w[n_old:].norm(dim=1).mean()

    # --- memory accounting -----------------------------------------------------------------------------
    def model_bytes(self) -> int:
        """Extractor parameters as float32 (classifier excluded, as the paper counts a backbone)."""
        return BYTES_PER_PARAM * count_params(self.trunk, self.tails)

    def align_exemplar_budget(self, ctx: Context) -> None:
        if self.cfg.memory_alignment == "none":
            return
        budget = aligned_budget(self.cfg.memory_alignment, ctx.protocol.memory.total, count_params(self.trunk),
                                count_params(self.tails.extractors[0]), len(self.tails), ctx.stream.num_tasks,
                                self.image_bytes)
        ctx.set_exemplar_budget(budget)
        if budget == 0:
            ctx.log("memo: the model's extra memory exceeds the exemplar budget: no exemplars are kept")

    def step_record(self) -> dict:
        model_bytes = self.model_bytes()
        record = {"params_shared": count_params(self.trunk), "params_specialized": count_params(self.tails),
                  "model_bytes": model_bytes, "model_exemplars": round(model_bytes / self.image_bytes, 2)}
        budget = self.ctx.exemplar_budget()
        if budget is not None:
            record["exemplar_budget"] = budget
        return record

    # --- inference ---------------------------------------------------------------------------------------
    def networks(self) -> list[nn.Module]:
        return [self.trunk, self.tails, self.head]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tails(self.trunk(x))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def inference_footprint(self) -> Footprint:
        return Footprint(len(self.tails), count_params(self.trunk, self.tails, self.head),
                         count_params(self.trunk, self.tails))

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"trunk": pack_module(self.trunk), "tails": pack_module(self.tails), "head": pack_module(self.head)}

    def load_state_dict(self, state: dict) -> None:
        self.trunk = self.ctx.restore(state["trunk"])
        self.tails = self.ctx.restore(state["tails"])
        self.head = self.ctx.restore(state["head"])
