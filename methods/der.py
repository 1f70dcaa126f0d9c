"""DER: Dynamically Expandable Representation for class-incremental learning (Yan, Xie, He; CVPR 2021).

Per task t:
- stage 1 (representation learning): every old extractor is frozen (parameters, BN statistics, eval mode,
  no_grad; nets.ExtractorStack); a new extractor F_t initialised from F_{t-1} is added; the super-feature
  [F_1(x), ..., F_t(x)] feeds a linear classifier over all seen classes whose old block is inherited; an
  auxiliary classifier on F_t(x) alone predicts |new classes| + 1 labels (every old class is label 0).
  Loss: CE + aux_weight * CE_aux (+ sparsity_weight * L_S with pruning).
- with pruning (`prune: true`, alias `der_prune`): HAT-style channel masks sigma(s * e) on F_t, s annealed
  within each epoch, gradient compensation (HAT's, with the s_max factor, by default: eq. 9 as printed cannot
  move a mask off its initial sign), mask embeddings on plain SGD as in HAT's code, sparsity loss; after
  stage 1 the masks are binarised and F_t is physically pruned (cilbench/kit/pruning.py); the classifier's
  columns of removed feature channels are dropped.
- stage 2 (classifier learning): the classifier is re-initialised and retrained on a class-balanced subset
  of new data + memory with a temperature, extractors frozen in eval mode (train augmentation still on).
  Weight aligning (PyCIL) is an alternative. The next task inherits the stage-2 head's old block
  (`inherit_from: stage1` inherits the stage-1 head instead).
Herding then runs on the concatenated super-features (features()).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    ChannelMasks,
    ConcatExtractorMethod,
    Context,
    ExtractorStack,
    HeadInit,
    Task,
    TrainConfig,
    UserError,
    anneal,
    aux_labels,
    build_backbone,
    count_params,
    describe,
    drop_columns,
    expand_head,
    linear_head,
    option,
    pack_module,
    phase_config,
    prune,
    register,
    regrow,
    warmup_length,
)


@dataclass
class DERConfig:
    # --- model -------------------------------------------------------------------------------------
    aux_weight: float = option(1.0, bounds=(0, None),
                               help="lambda_a, weight of the auxiliary classifier's loss (0 turns it off); "
                                    "never applied at t=1")
    inherit_head: bool = option(True, help="paper: the new classifier inherits the old classes' block; "
                                           "false: C-DER's re-initialisation")
    inherit_from: Literal["stage2", "stage1"] = option(
        "stage2", help="which head's old block is inherited: stage2, the one used at inference (trained on "
                       "logits/delta; C-DER), or stage1, the previous task's stage-1 head (trained on plain logits)")
    head_bias: bool = option(True, help="linear heads with bias, the aux classifier's too; C-DER: false "
                                        "(use_bias: False)")
    head_init: HeadInit = option("pycil", help="heads' init: pycil = PyCIL SimpleLinear (with head_bias, PyCIL's "
                                               "DER); der = C-DER's kaiming_normal_ (use with head_bias false); "
                                               "torch = nn.Linear's default")
    reset_head_after_warmup: bool = option(False, help="C-DER: the classifier and the aux classifier are "
                                                       "re-initialised after the warm-up")
    # --- stage-1 schedule ---------------------------------------------------------------------------
    schedule: Literal["paper", "card"] = option(
        "paper", help="paper: warm-up + multistep, scaled to the card's epochs; card: the card's own schedule")
    warmup_epochs: int = option(10, unit="epochs", bounds=(0, None),
                                help="paper recipe's warm-up, in epochs of a recipe_epochs-long run")
    milestones: list[int] = option([100, 120], unit="epochs", bounds=(0, None),
                                   help="paper recipe's lr milestones (x0.1), counted after the warm-up, in epochs "
                                        "of a recipe_epochs-long run")
    recipe_epochs: int = option(170, unit="epochs", bounds=(1, None),
                                help="the recipe's total length the schedule is scaled from (CIFAR 10 + 160; "
                                     "ImageNet 10 + 120)")
    epochs: Optional[int] = option(None, unit="epochs", bounds=(1, None),
                                   help="stage-1 epochs; null: the card's budget (ImageNet cards: 130)")
    base_schedule: Literal["paper", "code"] = option(
        "paper", help="first task of a B50 card: paper = the stage-1 schedule; code = C-DER's base-task schedule "
                      "(base_epochs, base_milestones, no warm-up)")
    base_epochs: int = option(200, unit="epochs", bounds=(1, None),
                              help="base_schedule code: the base task's epochs (scaled like the recipe)")
    base_milestones: list[int] = option([60, 120, 160], unit="epochs", bounds=(0, None),
                                        help="base_schedule code: the base task's lr milestones (scaled like the "
                                             "recipe)")
    # --- stage 2: classifier learning ---------------------------------------------------------------
    classifier_stage: Literal["balanced", "wa", "none"] = option(
        "balanced", help="stage 2: balanced = the paper's classifier re-training on a class-balanced subset; "
                         "wa = PyCIL's weight aligning; none = no stage 2")
    classifier_stage_first_task: bool = option(False, help="run stage 2 at t=1 too (C-DER skips it)")
    balanced_reinit: bool = option(True, help="paper: re-initialise the classifier before stage 2")
    balanced_temperature: float = option(5.0, bounds=(1e-6, None),
                                         help="delta, the stage-2 logit temperature (CIFAR 5, ImageNet 1; the "
                                              "card sets it)")
    balanced_epochs: int = option(30, unit="epochs", bounds=(0, None), help="stage-2 epochs")
    balanced_lr: Optional[float] = option(None, bounds=(0, None),
                                          help="stage-2 lr; null (or 0): the card's lr (0.1 on the CIFAR/ImageNet "
                                               "cards)")
    balanced_milestones: list[int] = option([15], unit="epochs", bounds=(0, None),
                                            help="stage-2 lr milestones (x0.1)")
    balanced_per_class: Optional[int] = option(None, unit="images per class", bounds=(1, None),
                                               help="size of the class-balanced stage-2 subset; null: the smallest "
                                                    "class count (C-DER)")
    # --- pruning ------------------------------------------------------------------------------------
    prune: bool = option(False, help="HAT-style channel masks and pruning of each new extractor (alias der_prune)")
    sparsity_weight: float = option(0.75, bounds=(0, None), help="lambda_s, weight of the sparsity loss (the card "
                                                                 "sets it)")
    mask_scope: Literal["shared", "internal"] = option(
        "shared", help="which channels the masks cover: shared = the residual streams plus inner convolutions; "
                       "internal = inner convolutions and stem")
    s_max: float = option(400.0, bounds=(1e-6, None), help="HAT's s_max: the mask scale s is annealed up to it "
                                                            "within each epoch")
    sparsity_kernel: Literal["area", "side"] = option(
        "area", help="kernel factor K_l of the sparsity loss: area = k*k, side = k")
    # Default: masks that learn. Eq. 9 as printed ("paper") leaves e's gradient ~1e-4, so with HAT's N(0, 1)
    # init no mask changes sign and the kept set is the random initial one; HAT's compensation (times s_max)
    # with every channel starting kept lets the sparsity loss switch off what the task loss does not defend.
    # The printed variant: grad_comp=paper mask_init_mean=0 mask_init_std=1.
    grad_comp: Literal["paper", "hat", "none"] = option(
        "hat", help="mask-gradient compensation: hat = HAT's code (times s_max; masks that learn); paper = eq. 9 "
                    "as printed (leaves e's gradient ~1e-4, so no mask leaves its initial sign); none")
    clamp_cosh: Optional[float] = option(50.0, bounds=(0, None),
                                         help="HAT's thres_cosh: clamp of s*e inside cosh; null: unclamped")
    clamp_mask: Optional[float] = option(6.0, bounds=(0, None),
                                         help="HAT's thres_emb: clamp of e after each step; null: unclamped")
    mask_init_mean: float = option(1.0, help="e ~ N(mean, std^2): 1 starts every channel kept (HAT: N(0, 1))")
    mask_init_std: float = option(0.5, bounds=(0, None), help="standard deviation of e's initialisation (HAT: 1)")
    mask_weight_decay: float = option(0.0, bounds=(0, None), help="weight decay on the mask embeddings e")
    mask_momentum: Optional[float] = option(
        0.0, bounds=(0, 1), help="SGD momentum of the mask embeddings e: 0 = HAT's code (plain SGD); null: the "
                                 "card's momentum (it carries each epoch's first, s = 1/s_max step on for ~10 steps "
                                 "and prunes 17-23% of channels at sparsity_weight 0)")
    random_keep: Optional[float] = option(
        None, bounds=(0, 1), help="a baseline, not DER: each masked group keeps a random round(f c) of its c "
                                  "channels (at least 1), drawn before stage 1 and fixed (hard masks, no sparsity "
                                  "loss); compares learned masks with random ones of a set size; null: DER's masks")
    prune_init: Literal["full", "regrow", "pruned"] = option(
        "full", help="F_t initialised from: full = F_{t-1} before pruning; regrow = its surviving channels + "
                     "fresh rest; pruned = the pruned F_{t-1}^P")


    def validate(self, where: str) -> None:
        if self.random_keep is not None and not self.prune:
            raise UserError(f"{where}.random_keep needs pruning: set prune=true (or use der_prune)")


def _scaled(epochs: float, f: float) -> int:
    return int(round(epochs * f))


@register("der")
class DER(ConcatExtractorMethod):
    Config = DERConfig
    uses_exemplars = True
    regimes = ("offline",)
    summary = "dynamically expandable representation: one frozen extractor per task, aux loss, balanced head"
    paper = ("Yan, Xie, He. DER: Dynamically Expandable Representation for Class Incremental Learning."
             " CVPR 2021, arXiv:2103.16788")

    @classmethod
    def backbone_needs(cls, cfg: DERConfig) -> dict[str, str]:
        return {"factory": "prune (physical channel pruning of the extractors)"} if cfg.prune else {}

    def __init__(self, cfg: DERConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.stack = ExtractorStack()
        self.head: nn.Linear | None = None
        self.stage1_head: nn.Linear | None = None   # inherit_from: stage1 -- the last stage-1 head
        self.prev_full: dict | None = None   # pruning: {"spec", "weights"} of the last extractor before pruning
        self.prev_keep: dict | None = None   # pruning: surviving channels of each group of that extractor
        self.log: list[dict] = []            # per task: pruning statistics

    # --- schedules -------------------------------------------------------------------------------------
    def stage1_config(self, task: Task) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        if cfg.epochs is not None:
            base = phase_config(base, epochs=cfg.epochs)
        f = base.epochs / cfg.recipe_epochs
        if task.index == 0 and self.ctx.protocol.base > 0 and cfg.base_schedule == "code":
            return phase_config(base, epochs=max(1, _scaled(cfg.base_epochs, f)), schedule="multistep",
                                warmup_epochs=0, milestones=[_scaled(m, f) for m in cfg.base_milestones],
                                gamma=0.1)
        if cfg.schedule == "card":
            return base
        return phase_config(base, schedule="multistep", warmup_epochs=_scaled(cfg.warmup_epochs, f),
                            milestones=[_scaled(m, f) for m in cfg.milestones], gamma=0.1)

    def stage2_config(self) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        return phase_config(base, epochs=cfg.balanced_epochs, lr=cfg.balanced_lr or base.lr,
                            schedule="multistep", milestones=list(cfg.balanced_milestones), gamma=0.1,
                            warmup_epochs=0)

    # --- building blocks -------------------------------------------------------------------------------
    def new_extractor(self, ctx: Context) -> nn.Module:
        """F_1: a fresh backbone; F_t: initialised from F_{t-1} (with pruning: see prune_init)."""
        cfg = self.cfg
        if not len(self.stack):
            return ctx.new_backbone()
        if cfg.prune and self.prev_full is not None and cfg.prune_init in ("full", "regrow"):
            full = build_backbone(self.prev_full["spec"]).to(ctx.device)
            full.load_state_dict(self.prev_full["weights"])
            if cfg.prune_init == "regrow":
                graph = describe(full, cfg.mask_scope, cfg.sparsity_kernel)
                keep = {g: k.to(ctx.device) for g, k in self.prev_keep.items()}
                full = regrow(build_backbone(self.prev_full["spec"]).to(ctx.device), full, graph, keep)
            net = full
        else:
            net = copy.deepcopy(self.stack.extractors[-1])
        for p in net.parameters():
            p.requires_grad_(True)
        return ctx.engine.prepare(net.train())

    def expand(self, task: Task) -> nn.Linear:
        """The classifier over all seen classes and the current super-feature (old block inherited)."""
        old = self.stage1_head if self.cfg.inherit_from == "stage1" else self.head
        inherit = self.cfg.inherit_head and old is not None
        head = expand_head(old if inherit else None, self.stack.out_dim, task.n_seen, inherit=inherit,
                           bias=self.cfg.head_bias, init=self.cfg.head_init)
        return self.ctx.engine.prepare(head)

    def balanced_indices(self, task: Task, ctx: Context) -> torch.Tensor:
        return ctx.balanced_indices(task, self.cfg.balanced_per_class)

    # --- the task --------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        cfg, engine = self.cfg, ctx.engine
        for i in range(len(self.stack)):
            if not self.stack.frozen[i]:
                self.stack.freeze(i)
        new = self.new_extractor(ctx)
        old_dim = self.stack.out_dim
        slot = self.stack.add(new)
        head = self.expand(task)
        n_old = task.n_old
        aux = None
        if n_old > 0 and cfg.aux_weight > 0:
            aux = engine.prepare(linear_head(new.out_dim, task.n_new + 1, cfg.head_bias, cfg.head_init))
        masks = None
        if cfg.prune:
            masks = ChannelMasks(new, cfg.mask_scope, cfg.s_max, cfg.sparsity_kernel, cfg.mask_init_mean,
                                 cfg.mask_init_std).attach()
            if cfg.random_keep is not None:
                self.fix_random_masks(masks, cfg.random_keep, engine.order_gen)
        learn_masks = masks is not None and cfg.random_keep is None

        params = [*new.parameters(), *head.parameters()] + ([*aux.parameters()] if aux is not None else [])
        groups = [{"params": params}]
        if learn_masks:
            group = {"params": list(masks.parameters()), "weight_decay": cfg.mask_weight_decay}
            if cfg.mask_momentum is not None:
                group["momentum"] = cfg.mask_momentum
            groups.append(group)
        train_cfg = self.stage1_config(task)
        epochs = engine.epochs_for(train_cfg)
        warmup = warmup_length(train_cfg, epochs)

        def loss_fn(batch):
            if learn_masks:
                masks.s = anneal(batch.step, batch.steps_per_epoch, cfg.s_max)
            if cfg.reset_head_after_warmup and warmup and batch.epoch == warmup and batch.step == 0:
                with torch.no_grad():
                    for layer in (head, aux):
                        if layer is not None:
                            layer.reset_parameters()
            feats = self.stack.features_each(batch.x, engine.frozen_chunk)
            loss = F.cross_entropy(head(torch.cat(feats, dim=1)), batch.y)
            if aux is not None:
                loss = loss + cfg.aux_weight * F.cross_entropy(aux(feats[-1]), aux_labels(batch.y, n_old))
            if learn_masks and cfg.sparsity_weight:
                loss = loss + cfg.sparsity_weight * masks.sparsity()
            return loss

        before = after = None
        if learn_masks:
            def before(batch):
                masks.compensate(cfg.grad_comp, cfg.clamp_cosh)

            def after(batch):
                masks.clamp_(cfg.clamp_mask)

        engine.fit(groups, loss_fn, ctx.train_indices(task), train_cfg, phase="der", modules=[self.stack],
                   before_step=before, after_step=after)

        if masks is not None:
            masks.detach()
            keep = masks.keep()
            self.prev_full = {"spec": copy.deepcopy(new.spec),
                              "weights": {k: v.detach().clone() for k, v in new.state_dict().items()}}
            self.prev_keep = {g: k.clone() for g, k in keep.items()}
            pruned = engine.prepare(prune(new, masks.graph, keep))
            self.stack.replace(slot, pruned, frozen=False)
            cols = torch.cat([torch.arange(old_dim), old_dim + keep[masks.graph.out]]).to(head.weight.device)
            head = drop_columns(head, cols)
            self.log.append({"task": task.index, "params_before": count_params(new),
                             "params_after": count_params(pruned), "out_dim": pruned.out_dim,
                             "kept": {g: len(k) for g, k in keep.items()}, **masks.stats()})
            ctx.log(f"der: task {task.index + 1} extractor pruned {count_params(new)} -> {count_params(pruned)} "
                    f"params, feature dim {new.out_dim} -> {pruned.out_dim}")
        self.stack.freeze(slot)
        self.head = head
        if cfg.inherit_from == "stage1":
            self.stage1_head = copy.deepcopy(head)

        if task.index > 0 or cfg.classifier_stage_first_task:
            if cfg.classifier_stage == "balanced":
                self.balanced_finetune(task, ctx)
            elif cfg.classifier_stage == "wa":
                self.weight_align(task)

    @staticmethod
    @torch.no_grad()
    def fix_random_masks(masks: ChannelMasks, fraction: float, generator: torch.Generator) -> None:
        """random_keep: hard masks keeping a random round(fraction c) channels (at least 1) of every group."""
        for e in masks.e.values():
            keep = torch.randperm(len(e), generator=generator)[:max(1, round(fraction * len(e)))]
            e.fill_(-1.0)
            e[keep.to(e.device)] = 1.0
            e.requires_grad_(False)
        masks.initial = {g: (e.detach() > 0).cpu() for g, e in masks.e.items()}
        masks.binary = True

    def balanced_finetune(self, task: Task, ctx: Context) -> None:
        """Stage 2: (re-initialised) classifier on a class-balanced subset, CE(logits / delta), extractors
        frozen in eval mode, train augmentation applied."""
        cfg = self.cfg
        if cfg.balanced_reinit:
            self.head = ctx.engine.prepare(linear_head(self.stack.out_dim, task.n_seen, cfg.head_bias,
                                                       cfg.head_init))
        head, stack = self.head, self.stack
        subset = self.balanced_indices(task, ctx)
        stack.eval()

        def super_feature(x):                       # every extractor is frozen here
            return torch.cat(stack.features_each(x), dim=1)

        def loss_fn(batch):                         # batch.x: the super-feature of the augmented images
            return F.cross_entropy(head(batch.x) / cfg.balanced_temperature, batch.y)

        ctx.engine.fit(head.parameters(), loss_fn, subset, self.stage2_config(), phase="der_classifier",
                       frozen=super_feature)

    @torch.no_grad()
    def weight_align(self, task: Task) -> None:
        """PyCIL's weight aligning: new-class weight rows rescaled to the old rows' mean norm. Nothing to align
        with before there are old classes (classifier_stage_first_task): skipped, as PyCIL does."""
        w = self.head.weight
        n_old = task.n_old
        if n_old == 0:
            return
        gamma = w[:n_old].norm(dim=1).mean() / w[n_old:].norm(dim=1).mean()
        w[n_old:] *= gamma

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {**self.pack_inference(), "stage1_head": pack_module(self.stage1_head), "log": copy.deepcopy(self.log)}
        if self.prev_full is not None:
            state["prev_full"] = {"spec": copy.deepcopy(self.prev_full["spec"]),
                                  "weights": {k: v.cpu() for k, v in self.prev_full["weights"].items()}}
            state["prev_keep"] = {g: k.cpu() for g, k in self.prev_keep.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        device = self.ctx.device
        self.restore_inference(state)
        self.stage1_head = self.ctx.restore(state["stage1_head"])
        self.log = copy.deepcopy(state.get("log", []))
        if "prev_full" in state:
            self.prev_full = {"spec": copy.deepcopy(state["prev_full"]["spec"]),
                              "weights": {k: v.to(device) for k, v in state["prev_full"]["weights"].items()}}
            self.prev_keep = {g: k.clone() for g, k in state["prev_keep"].items()}
        else:
            self.prev_full = self.prev_keep = None


register("der_prune", prune=True)(DER)
