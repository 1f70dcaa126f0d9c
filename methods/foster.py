"""FOSTER: Feature Boosting and Compression for Class-Incremental Learning (Wang, Zhou, Ye, Zhan; ECCV 2022,
arXiv:2204.04662). Reference behaviour: the authors' code (G-U-N/ECCV22-FOSTER, also PyCIL's models/foster.py).

Task 1: one extractor F and a linear head, plain CE (its own epochs, lr and weight decay).
Task t > 1, two stages:
- boosting: the model M_{t-1} = (F_old, W_old) is frozen (parameters, BN statistics, eval mode); a new
  extractor F_new (a copy of F_old) is added; the head W over [F_old(x), F_new(x)] covers all seen classes and
  inherits W_old in its old-class x old-feature block. Loss =
      CE(W(x) / w1, y)                                    logits-adjusted CE, w1 = effective-number weights (beta1)
    + fe_weight * CE(W_fe(F_new(x)), y)                   the new feature's own classifier over all seen classes
    + lambda_okd * KD(W(x)[:, :old], W_old(F_old(x)), T)   distillation of the old model's logits
  `oofc: az` keeps the new classes' weights on the old feature at zero; `teacher_wa` weight-aligns W afterwards.
- compression: a single student extractor S (initialised from F_old) with a head over all seen classes (old
  block from W_old) learns the two-extractor teacher's logits by balanced KD (beta2 weights), no weight decay.
  The student becomes M_t: one extractor at inference; the teacher's extractors are dropped (`infer_with:
  teacher` keeps the teacher for inference and herding instead, as the authors' evaluation does).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    AugmentConfig,
    Context,
    ExtractorStack,
    Footprint,
    Method,
    Task,
    TrainConfig,
    UserError,
    balanced_kd,
    count_params,
    effective_number_weights,
    expand_head,
    freeze,
    kd_soft_ce,
    linear_head,
    logit_adjusted_ce,
    option,
    pack_module,
    phase_config,
    register,
    trainable_copy,
    weight_align,
)


@dataclass
class FOSTERConfig:
    # --- balance and distillation (the authors' configs: exps/foster.json and configs/cifar/*.json) --------
    beta1: float = option(0.96, bounds=(0, 0.999999),
                          help="beta of the boosting stage's effective-number class weights (logits-adjusted CE); "
                               "the cards set the authors' per-setting value")
    beta1_per_task: list[float] = option(
        [], help="beta1 for task 2, 3, ... (the authors' B0 5- and 10-step configs decay it per task); empty: beta1 "
                 "for every task")
    beta2: float = option(0.97, bounds=(0, 0.999999),
                          help="beta of the compression stage's class weights (balanced KD)")
    temperature: float = option(2.0, bounds=(1e-6, None), help="T of both distillations")
    lambda_okd: float = option(1.0, bounds=(0, None), help="weight of the KD term on the old classes' logits")
    fe_weight: float = option(1.0, bounds=(0, None),
                              help="weight of the new feature's own classifier loss (the code adds it unweighted)")
    oofc: Literal["ft", "az"] = option(
        "ft", help="the new classes' weights on the old feature: ft = trained like the rest (code default); az = "
                   "kept at zero (initialised and gradient zeroed)")
    teacher_wa: bool = option(False, help="weight aligning of the teacher's head after boosting (is_teacher_wa)")
    student_wa: bool = option(False, help="weight aligning of the student's head after compression (is_student_wa)")
    wa_value: float = option(1.0, bounds=(0, None),
                             help="weight aligning's extra factor value^(n_old / n_new) (PyCIL's wa_value)")
    augment: Literal["pycil", "official"] = option(
        "pycil", help="pycil = the card's augmentation (PyCIL: crop, flip, brightness 63/255); official = the "
                      "authors' repository (ECCV22-FOSTER), which adds AutoAugment (CIFAR-10 policy up to 64 px, "
                      "else ImageNet's) and, up to 64 px, Cutout 16 before normalisation")
    # --- what infers ----------------------------------------------------------------------------------
    infer_with: Literal["student", "teacher"] = option(
        "student", help="student = the compressed single-extractor model (the paper's final model); teacher = "
                        "the two-extractor boosted model, as the authors' code evaluates and herds (the student "
                        "still starts the next task)")
    # --- budgets (the authors' config: 200 / 170 / 130 epochs, lr 0.1, wd 5e-4, batch from the card) -----
    init_epochs: int = option(200, unit="epochs", bounds=(1, None), help="first task's epochs")
    boosting_epochs: int = option(170, unit="epochs", bounds=(1, None), help="boosting stage's epochs")
    compression_epochs: int = option(130, unit="epochs", bounds=(1, None), help="compression stage's epochs")
    init_lr: Optional[float] = option(None, bounds=(0, None), help="first task's lr; null: the card's (0.1)")
    lr: Optional[float] = option(None, bounds=(0, None), help="boosting and compression lr; null: the card's (0.1)")
    init_weight_decay: Optional[float] = option(None, bounds=(0, None),
                                                help="first task's weight decay; null: the card's (5e-4)")
    weight_decay: Optional[float] = option(None, bounds=(0, None),
                                           help="boosting's weight decay; null: the card's (5e-4)")
    compression_weight_decay: float = option(0.0, bounds=(0, None),
                                             help="compression's weight decay (the code's optimiser has none)")

    def validate(self, where: str) -> None:
        if any(not 0 <= b < 1 for b in self.beta1_per_task):
            raise UserError(f"{where}.beta1_per_task: every beta must lie in [0, 1); got {self.beta1_per_task}")


@register("foster")
class FOSTER(Method):
    Config = FOSTERConfig
    display_name = "FOSTER"
    uses_exemplars = True
    regimes = ("offline",)
    summary = "feature boosting (a second extractor, logits-adjusted CE, KD) then compression to one extractor"
    paper = ("Wang, Zhou, Ye, Zhan. FOSTER: Feature Boosting and Compression for Class-Incremental Learning."
             " ECCV 2022, arXiv:2204.04662")

    def __init__(self, cfg: FOSTERConfig, ctx: Context):
        super().__init__(cfg, ctx)
        tasks = ctx.protocol.tasks
        if cfg.beta1_per_task and len(cfg.beta1_per_task) < tasks - 1:
            raise UserError(f"foster.beta1_per_task: {len(cfg.beta1_per_task)} values for {tasks - 1} incremental "
                            f"tasks; give one per task after the first, or [] to use beta1 throughout")
        self.backbone: nn.Module | None = None     # M_t's extractor: the student after compression
        self.head: nn.Linear | None = None
        self.teacher: ExtractorStack | None = None  # kept only to infer with it (infer_with: teacher)
        self.teacher_head: nn.Linear | None = None
        self.record: dict = {}

    @classmethod
    def run_tag(cls, cfg: FOSTERConfig) -> str | None:
        """Teacher inference (two extractors) is a different model from the default student: its own run name."""
        return "teacher" if cfg.infer_with == "teacher" else None

    @classmethod
    def augmentation(cls, cfg: FOSTERConfig, card: AugmentConfig, image_side: int) -> AugmentConfig:
        """The card's augmentation, or the authors' repository's: brightness 63/255, AutoAugment with its PIL
        operations (grey 128 fill, bicubic shear; the same port SEED's code uses) and (CIFAR-sized images)
        Cutout 16 cut on the [0, 1] image, as its ToTensor-Cutout-Normalize chain does."""
        if cfg.augment == "pycil":
            return card
        small = image_side <= 64
        official = replace(card, brightness=card.brightness or 63 / 255,
                           autoaugment="cifar10" if small else "imagenet", autoaugment_ops="pil")
        return replace(official, cutout=16, cutout_normalised=False) if small else official

    # --- phases ----------------------------------------------------------------------------------------
    def phase(self, epochs: int, lr: float | None, weight_decay: float | None) -> TrainConfig:
        """A phase of the card's budget (batch, momentum) with FOSTER's epochs, lr, weight decay and cosine
        schedule over the phase (CosineAnnealingLR, T_max = epochs, no warm-up)."""
        base = self.ctx.protocol.train
        return phase_config(base, epochs=epochs, lr=base.lr if lr is None else lr,
                            weight_decay=base.weight_decay if weight_decay is None else weight_decay,
                            schedule="cosine", warmup_epochs=0, milestones=[])

    def class_counts(self, task: Task) -> torch.Tensor:
        """Training samples per seen class in this task's data (new data + exemplars): the prior both stages'
        class weights are computed from (the code: 500 per new CIFAR class, the memory's per-class size for old
        classes; the same numbers on the CIFAR cards)."""
        labels = self.ctx.stream.train.labels[self.ctx.train_indices(task)]
        counts = torch.bincount(labels.long().cpu(), minlength=task.n_seen)[:task.n_seen]
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            raise UserError(f"foster: classes {empty} have no training sample in task {task.index + 1} (the "
                            f"memory keeps fewer exemplars than seen classes); raise memory.total or memory.per_class")
        return counts

    def beta1_for(self, task: Task) -> float:
        return self.cfg.beta1_per_task[task.index - 1] if self.cfg.beta1_per_task else self.cfg.beta1

    # --- the task --------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        self.teacher = self.teacher_head = None
        if self.backbone is None:
            self.initial(task, ctx)
            self.record = {"stage": "initial"}
            return
        counts = self.class_counts(task)
        stack, head, boost_info = self.boost(task, ctx, counts)
        self.record = {"stage": "boost+compress", **boost_info, "teacher_extractors": len(stack),
                       "teacher_params": count_params(stack, head)}
        student, student_head, info = self.compress(task, ctx, stack, head, counts)
        self.record.update(info)
        self.backbone, self.head = student, student_head
        if self.cfg.infer_with == "teacher":
            self.teacher, self.teacher_head = stack, head

    def initial(self, task: Task, ctx: Context) -> None:
        """Task 1: a fresh extractor and head, plain CE."""
        cfg = self.cfg
        backbone = ctx.new_backbone()
        head = ctx.engine.prepare(linear_head(backbone.out_dim, task.n_seen, init="pycil"))

        def loss_fn(batch):
            return F.cross_entropy(head(backbone(batch.x)), batch.y)

        ctx.engine.fit([*backbone.parameters(), *head.parameters()], loss_fn, ctx.train_indices(task),
                       self.phase(cfg.init_epochs, cfg.init_lr, cfg.init_weight_decay), phase="foster_init",
                       modules=[backbone, head])
        self.backbone, self.head = backbone, head

    def boost(self, task: Task, ctx: Context, counts: torch.Tensor) -> tuple[ExtractorStack, nn.Linear, dict]:
        """Feature boosting: [F_old frozen, F_new] with a head over all seen classes. Returns the teacher (stack
        with both extractors frozen after training, head frozen) and what to record."""
        cfg, engine, n_old = self.cfg, ctx.engine, task.n_old
        old_extractor, old_head = freeze(self.backbone), freeze(self.head)     # M_{t-1}, frozen in place
        new = trainable_copy(old_extractor)
        stack = ExtractorStack()
        stack.add(old_extractor, frozen=True)
        stack.add(new)
        old_dim = old_extractor.out_dim
        head = engine.prepare(expand_head(old_head, stack.out_dim, task.n_seen, init="pycil"))
        fe_head = engine.prepare(linear_head(new.out_dim, task.n_seen, init="pycil"))
        if cfg.oofc == "az":
            with torch.no_grad():
                head.weight[n_old:, :old_dim] = 0.0
        beta1 = self.beta1_for(task)
        w1 = effective_number_weights(counts, beta1).to(ctx.device)
        chunk = engine.frozen_chunk

        def loss_fn(batch):
            f_old, f_new = stack.features_each(batch.x, chunk)
            logits = head(torch.cat([f_old, f_new], dim=1))
            loss = logit_adjusted_ce(logits, batch.y, w1)
            if cfg.fe_weight:
                loss = loss + cfg.fe_weight * F.cross_entropy(fe_head(f_new), batch.y)
            if cfg.lambda_okd:
                with torch.no_grad():
                    old_logits = old_head(f_old)
                loss = loss + cfg.lambda_okd * kd_soft_ce(logits[:, :n_old], old_logits, cfg.temperature)
            return loss

        def keep_zero(batch):      # oofc az: the new classes never read the old feature
            if head.weight.grad is not None:
                head.weight.grad[n_old:, :old_dim] = 0.0

        params = [*new.parameters(), *head.parameters(), *fe_head.parameters()]
        engine.fit(params, loss_fn, ctx.train_indices(task), self.phase(cfg.boosting_epochs, cfg.lr, cfg.weight_decay),
                   phase="foster_boost", modules=[stack, head, fe_head],
                   before_step=keep_zero if cfg.oofc == "az" else None)
        gamma = weight_align(head, n_old, cfg.wa_value) if cfg.teacher_wa else None
        stack.freeze(1)
        freeze(head)
        info = {"beta1": beta1}
        if gamma is not None:
            info["teacher_wa_gamma"] = gamma
        ctx.log(f"foster: task {task.index + 1} boosted ({len(stack)} extractors, {count_params(stack, head)} params)")
        return stack, head, info

    def compress(self, task: Task, ctx: Context, teacher: ExtractorStack, teacher_head: nn.Linear,
                 counts: torch.Tensor) -> tuple[nn.Module, nn.Linear, dict]:
        """Feature compression: a student extractor initialised from F_old (the teacher's first extractor) and
        a head whose old block is W_old learn the teacher's logits by balanced KD."""
        cfg, engine = self.cfg, ctx.engine
        old_extractor = teacher.extractors[0]
        student = engine.prepare(trainable_copy(old_extractor))
        student_head = engine.prepare(expand_head(self.head, student.out_dim, task.n_seen, init="pycil"))
        w2 = effective_number_weights(counts, cfg.beta2).to(ctx.device)
        chunk = engine.frozen_chunk
        teacher.eval()

        def loss_fn(batch):
            with torch.no_grad():
                target = teacher_head(torch.cat(teacher.features_each(batch.x, chunk), dim=1))
            return balanced_kd(student_head(student(batch.x)), target, cfg.temperature, w2)

        phase = self.phase(cfg.compression_epochs, cfg.lr, cfg.compression_weight_decay)
        result = engine.fit([*student.parameters(), *student_head.parameters()], loss_fn, ctx.train_indices(task),
                            phase, phase="foster_compress", modules=[student, student_head])
        info = {"compression_loss": result.final_loss}
        if cfg.student_wa:
            info["student_wa_gamma"] = weight_align(student_head, task.n_old, cfg.wa_value)
        ctx.log(f"foster: task {task.index + 1} compressed to 1 extractor ({count_params(student, student_head)} "
                f"params)")
        return student, student_head, info

    # --- inference -------------------------------------------------------------------------------------
    def inference_model(self) -> tuple[nn.Module, nn.Linear]:
        if self.teacher is not None:
            return self.teacher, self.teacher_head
        return self.backbone, self.head

    def networks(self) -> list[nn.Module]:
        return list(self.inference_model())

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        extractor, head = self.inference_model()
        return head(extractor(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.inference_model()[0](x)

    def inference_footprint(self) -> Footprint:
        extractor, head = self.inference_model()
        n = len(extractor) if isinstance(extractor, ExtractorStack) else 1
        return Footprint(n, count_params(extractor, head), count_params(extractor))

    def step_record(self) -> dict:
        return dict(self.record)

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"backbone": pack_module(self.backbone), "head": pack_module(self.head),
                "teacher": pack_module(self.teacher), "teacher_head": pack_module(self.teacher_head),
                "record": dict(self.record)}

    def load_state_dict(self, state: dict) -> None:
        self.backbone = self.ctx.restore(state["backbone"])
        self.head = self.ctx.restore(state["head"], prepare=False)
        self.teacher = self.ctx.restore(state["teacher"])
        self.teacher_head = self.ctx.restore(state["teacher_head"], prepare=False)
        self.record = dict(state.get("record", {}))
