"""TSD: task-sharing distillation (Mitigating the Stability-Plasticity Trade-Off ... via Shared Extractors in
Class-Incremental Learning, Appl. Sci. 2025, doi:10.3390/app151910757). The paper's equations
and several values were not recoverable; the choices marked as reconstructions in docs/methods/tsd.md are ours.

Both variants grow DER-style concatenated extractors with one linear head, but cap the number of extractors
used at inference at N by consolidating task extractors into shared ones through logit distillation:

- tsd_grc   (grouped rolling consolidation): the T tasks are split into N contiguous groups. The
  first task of a group trains a new extractor; every later task of the group trains a temporary extractor,
  then a copy of the group's rolling extractor (the student) distils the teacher [frozen groups; rolling;
  temporary] and replaces the rolling one. The rolling extractor is frozen at the end of its group.
- tsd_fixed (fixed-size pool, similarity-based consolidation): the first N tasks each add an extractor; every
  later task trains a temporary extractor, picks the pool extractor whose own-class prototypes are most
  similar to the new classes' prototypes (balanced: the previous target is excluded for one step), and
  distils the teacher [pool; temporary] into the pool with that extractor replaced by a trainable copy.

Every cross-entropy phase adds lambda * L_con, a SupCon loss on a fresh projection head whose anchors are the
current task's samples in two views and whose extra negatives are old-class samples embedded by every frozen
extractor. Distillation phases use only the soft-CE KD loss at T = 2 with weight decay 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    ConcatExtractorMethod,
    Context,
    ExtractorStack,
    HeadInit,
    ProjectionHead,
    Task,
    UserError,
    aux_labels,
    freeze,
    frozen_forward,
    is_frozen,
    kd_soft_ce,
    linear_head,
    option,
    pack_module,
    phase_config,
    register,
    supcon_distinct,
    trainable_copy,
)

# ---------------------------------------------------------------------------------------------------------
# Options


@dataclass
class TSDConfig:
    """Options shared by both variants. Defaults: the paper's values where it states them, else our reconstruction."""
    n_extractors: int = option(3, bounds=(1, None),
                               help="N, extractors at inference (GRC: the number of groups, at most the number of "
                                    "tasks; Fixed: the pool size)")
    # --- new extractors / cross-entropy phases
    init: Literal["copy_last", "random"] = option(
        "copy_last", help="a new extractor: copy_last = a copy of the latest one (DER); random = fresh")
    first_task_epochs: int | None = option(None, unit="epochs", bounds=(1, None),
                                           help="cross-entropy epochs of task 1; null: the card's train.epochs "
                                                "(PyCIL uses 200)")
    head_bias: bool = option(True, help="linear heads with bias (PyCIL SimpleLinear; DER's official code: false)")
    head_init: HeadInit = option("pycil", help="heads' init: pycil = PyCIL SimpleLinear (TSD builds on PyCIL); "
                                               "torch = nn.Linear's default; der = kaiming_normal_")
    ce_head_init: Literal["inherit", "fresh"] = option(
        "inherit", help="the cross-entropy head: inherit = copies the old head's [old classes x kept extractors] "
                        "block (DER/PyCIL update_fc); fresh = starts anew")
    ce_views: Literal[1, 2] = option(1, help="cross-entropy on view 1 only (1) or averaged over both views (2)")
    aux_loss: bool = option(False, help="DER's auxiliary loss (n_new + 1 classes on the new extractor); off in TSD")
    aux_weight: float = option(1.0, bounds=(0, None), help="weight of the auxiliary loss (with aux_loss)")
    # --- feature-distinctness loss L_con (SupCon)
    con_weight: float = option(0.1, bounds=(0, None),
                               help="lambda, weight of L_con (the paper's value is lost; sweep 0.01/0.05/0.1/0.5/1.0)")
    con_temperature: float = option(0.07, bounds=(1e-6, None), help="SupCon temperature of L_con")
    con_base_temperature: float | None = option(None, bounds=(1e-6, None),
                                                help="SupContrast's base_temperature; null: = con_temperature")
    con_dim: int = option(128, unit="features", bounds=(1, None), help="projection head's output dimension")
    con_hidden: int = option(0, unit="features", bounds=(0, None),
                             help="projection head's hidden dimension; 0: the extractor's feature dimension d")
    con_first_task: bool = option(True, help="apply L_con at t = 1 as well (plain SupCon, no frozen negatives)")
    con_frozen_negatives: bool = option(True, help="old-class samples embedded by each frozen extractor serve as "
                                                   "negatives")
    detach_frozen_neg: bool = option(False, help="stop gradients into the projection head through those negatives")
    con_anchors: Literal["new", "all"] = option("new", help="L_con's anchors: new = current-task samples only; "
                                                            "all = every sample")
    reuse_projection: bool = option(False, help="keep one projection head across tasks instead of a fresh one per "
                                                "phase")
    # --- distillation (consolidation) phases
    kd_epochs: int = option(130, unit="epochs", bounds=(1, None),
                            help="epochs of each distillation phase (FOSTER's compression_epochs; not stated in the "
                                 "paper)")
    kd_temperature: float = option(2.0, bounds=(1e-6, None), help="distillation temperature")
    kd_weight_decay: float = option(0.0, bounds=(0, None), help="weight decay of the distillation phases")
    kd_t2_scale: bool = option(False, help="multiply the distillation loss by T^2 (Hinton)")
    kd_plus_ce: bool = option(False, help="add the ground-truth cross-entropy to the distillation loss")
    student_head_init: Literal["warm", "fresh"] = option(
        "warm", help="the student's head: warm = the teacher's head minus the temporary extractor's columns "
                     "(FOSTER copy_fc); fresh = starts anew")


@dataclass
class GRCConfig(TSDConfig):
    group_sizes: list[int] | None = option(None, unit="tasks", bounds=(1, None),
                                           help="explicit group sizes, tasks per group (must sum to the number of "
                                                "tasks, one per extractor); null: from group_rule")
    group_rule: Literal["ceil_then_balanced", "balanced"] = option(
        "ceil_then_balanced", help="how tasks are grouped: ceil_then_balanced = ceil(T/N) tasks per group, the "
                                   "rest balanced; balanced = always balanced")
    grc_teacher: Literal["rolling", "all_group"] = option(
        "rolling", help="the distillation teacher: rolling = [rolling; temporary]; all_group = every "
                        "task extractor of the current group, kept until the group ends")

    def validate(self, where: str) -> None:
        if self.group_sizes is not None:
            if not self.group_sizes:
                raise UserError(f"{where}.group_sizes: a non-empty list of positive task counts, "
                                f"got {self.group_sizes}")
            if len(self.group_sizes) != self.n_extractors:
                raise UserError(f"{where}.group_sizes: {len(self.group_sizes)} groups but n_extractors is "
                                f"{self.n_extractors}; set n_extractors={len(self.group_sizes)} as well")


@dataclass
class FixedConfig(TSDConfig):
    balanced: bool = option(True, help="exclude the previous merge target for one step (Table 9's ablation)")
    selection: Literal["similarity", "random", "round_robin"] = option(
        "similarity", help="which extractor a task merges into (Table 14's ablation)")
    own_tasks: Literal["all_assigned", "original"] = option(
        "all_assigned", help="an extractor's own classes: all_assigned = every task merged into it; original = "
                             "only the task that created it")
    sim_reduce: Literal["max", "mean"] = option(
        "max", help="s_{j,c}: max or mean cosine over the extractor's own classes")
    proto_normalize: bool = option(True, help="L2-normalise features before averaging them into prototypes")


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (tested directly)


def group_schedule(tasks: int, n: int, rule: str = "ceil_then_balanced") -> list[int]:
    """Tasks per group: groups of ceil(T/N) tasks, the last one possibly smaller; when that does
    not give N groups, the balanced contiguous split (the first T mod N groups one task larger)."""
    if n < 1 or n > tasks:
        raise UserError(f"tsd_grc: n_extractors must be in 1..{tasks} (the number of tasks), got {n}")
    if rule == "ceil_then_balanced":
        size = math.ceil(tasks / n)
        sizes = [size] * (tasks // size) + ([tasks % size] if tasks % size else [])
        if len(sizes) == n:
            return sizes
    base, extra = divmod(tasks, n)
    return [base + 1] * extra + [base] * (n - extra)


def select_target(scores: list[float] | None, prev: int, n: int, balanced: bool, selection: str,
                  generator: torch.Generator | None = None) -> tuple[int, list[int]]:
    """The pool slot to consolidate into and the candidates it was chosen from.

    `prev` is the previous merge target (-1: none yet). Balanced selection drops it from the candidates for
    this one step (never when N = 1). similarity: argmax of `scores` (ties: lowest slot); random: uniform
    over the candidates from `generator`; round_robin: the slot after `prev`, cyclically (slot 0 first)."""
    candidates = list(range(n))
    if balanced and prev >= 0 and n > 1:
        candidates.remove(prev)
    if selection == "similarity":
        best = max(candidates, key=lambda j: (scores[j], -j))
    elif selection == "random":
        best = candidates[int(torch.randint(len(candidates), (1,), generator=generator))]
    elif selection == "round_robin":
        best = (prev + 1) % n
        if best not in candidates:
            best = candidates[0]
    else:
        raise UserError(f"tsd_fixed.selection: unknown rule {selection!r}")
    return best, candidates


def _offsets(dims: list[int]) -> list[int]:
    out, acc = [], 0
    for d in dims:
        out.append(acc)
        acc += d
    return out


# ---------------------------------------------------------------------------------------------------------
# Shared machinery


class TSDBase(ConcatExtractorMethod):
    """What both variants share: the inference pool + head, the CE(+L_con) phase, the KD phase, state."""
    uses_exemplars = True
    regimes = ("offline",)

    def __init__(self, cfg: TSDConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.stack = ExtractorStack()         # the inference pool (all frozen between tasks)
        self.head: nn.Linear | None = None    # inference head over the pool's concatenated features
        self.tasks_done = 0
        self.proj: ProjectionHead | None = None   # only kept across tasks with reuse_projection
        self.records: list[dict] = []         # per task: what was trained / selected (kept in the checkpoint)

    @classmethod
    def run_tag(cls, cfg: TSDConfig) -> str:
        return f"N{cfg.n_extractors}"

    # --- building blocks ------------------------------------------------------------------------------
    def _new_extractor(self, source: nn.Module | None) -> nn.Module:
        """A trainable extractor: a copy of `source` (init=copy_last) or a fresh random one."""
        ext = self.ctx.new_backbone()        # always drawn, so the RNG stream does not depend on `init`
        if source is not None and self.cfg.init == "copy_last":
            ext.load_state_dict(source.state_dict())
        for p in ext.parameters():
            p.requires_grad_(True)
        return ext.train()

    def _derive_head(self, old: nn.Linear | None, old_modules: list[nn.Module], new_modules: list[nn.Module],
                     n_out: int, warm: bool, alias: dict[int, int] | None = None) -> nn.Linear:
        """A head over `new_modules`' concatenated features and `n_out` classes. When `warm`, every column
        block of an extractor present in `old_modules` (by identity, or through `alias`: id(copy) ->
        id(source)) copies the old head's weights for the old head's classes, and the bias is copied; the
        other entries keep the default (Kaiming-uniform) initialisation."""
        new_dims = [m.out_dim for m in new_modules]
        head = linear_head(sum(new_dims), n_out, self.cfg.head_bias, self.cfg.head_init).to(self.ctx.device)
        if old is None or not warm:
            return head
        alias = alias or {}
        old_keys = [id(m) for m in old_modules]
        old_off = _offsets([m.out_dim for m in old_modules])
        rows = min(old.out_features, n_out)
        with torch.no_grad():
            for m, off, dim in zip(new_modules, _offsets(new_dims), new_dims):
                key = alias.get(id(m), id(m))
                if key in old_keys:
                    src = old_off[old_keys.index(key)]
                    head.weight[:rows, off:off + dim].copy_(old.weight[:rows, src:src + dim])
            if head.bias is not None and old.bias is not None:
                head.bias[:rows].copy_(old.bias[:rows])
        return head

    def _feats(self, modules: list[nn.Module], x: torch.Tensor, cache: dict) -> list[torch.Tensor]:
        """Features of each module on x; a module seen before in `cache` (teacher and student share the
        frozen extractors) is not run again. Frozen modules run under no_grad (frozen_forward)."""
        out = []
        for m in modules:
            key = id(m)
            if key not in cache:
                cache[key] = frozen_forward(m, x, self.ctx.engine.frozen_chunk) if is_frozen(m) else m(x)
            out.append(cache[key])
        return out

    def _projection(self, dim: int) -> ProjectionHead:
        cfg = self.cfg
        if cfg.reuse_projection and self.proj is not None:
            return self.proj
        proj = self.ctx.engine.prepare(ProjectionHead(dim, cfg.con_dim, cfg.con_hidden or None))
        if cfg.reuse_projection:
            self.proj = proj
        return proj

    def _train_new(self, task: Task, frozen: list[nn.Module], new: nn.Module, head: nn.Linear) -> dict:
        """CE phase: train `new`, `head` (and the projection head) with
        CE(head([frozen; new](x)), y) + lambda L_con over D_t + M; everything in `frozen` stays fixed."""
        cfg, ctx = self.cfg, self.ctx
        n_old = task.n_old
        use_con = cfg.con_weight > 0 and (task.index > 0 or cfg.con_first_task)
        views = 2 if (use_con or cfg.ce_views == 2) else 1
        ce_views = cfg.ce_views if views == 2 else 1
        proj = self._projection(new.out_dim) if use_con else None
        aux = None
        if cfg.aux_loss and n_old > 0:
            aux = ctx.engine.prepare(linear_head(new.out_dim, task.n_new + 1, cfg.head_bias, cfg.head_init))
        frozen_negs = use_con and cfg.con_frozen_negatives and len(frozen) > 0
        modules = [*frozen, new]

        def loss_fn(batch):
            y = batch.y
            b = y.shape[0]
            xs = batch.views
            # the trainable extractor sees both views in one forward (BN statistics over 2B, as SupContrast)
            f_new_all = new(torch.cat(xs)) if views == 2 else new(xs[0])
            f_new = list(f_new_all.split(b)) if views == 2 else [f_new_all]
            caches = []
            loss = torch.zeros((), device=y.device)
            for v in range(ce_views):
                cache = {id(new): f_new[v]}
                feats = self._feats(modules, xs[v], cache)
                caches.append(cache)
                loss = loss + F.cross_entropy(head(torch.cat(feats, dim=1)), y) / ce_views
                if aux is not None:
                    loss = loss + cfg.aux_weight * F.cross_entropy(aux(f_new[v]), aux_labels(y, n_old)) / ce_views
            if use_con:
                labels = torch.cat([y] * views)
                z = proj(f_new_all)
                anchors = labels >= n_old if cfg.con_anchors == "new" else None
                extra = None
                old = y < n_old
                if frozen_negs and bool(old.any()):
                    # one negative per (old-class sample, frozen extractor) pair, from view 1,
                    # whose frozen features the CE term already computed
                    extra = proj(torch.cat([caches[0][id(m)][old] for m in frozen]))
                    if cfg.detach_frozen_neg:
                        extra = extra.detach()
                loss = loss + cfg.con_weight * supcon_distinct(z, labels, anchors, extra, cfg.con_temperature,
                                                               cfg.con_base_temperature)
            return loss

        params = [*new.parameters(), *head.parameters()]
        train_modules = [new, head]
        for extra_net in (proj, aux):
            if extra_net is not None:
                params += list(extra_net.parameters())
                train_modules.append(extra_net)
        base = ctx.protocol.train
        train_cfg = (phase_config(base, epochs=cfg.first_task_epochs)
                     if task.index == 0 and cfg.first_task_epochs else base)
        result = ctx.engine.fit(params, loss_fn, ctx.train_indices(task), train_cfg, phase="ce", views=views,
                                modules=train_modules)
        return {"ce_epochs": result.epochs, "ce_loss": result.final_loss, "con": int(use_con),
                "frozen_negative_extractors": len(frozen) if frozen_negs else 0}

    def _distill(self, task: Task, teacher: list[nn.Module], teacher_head: nn.Linear,
                 student: list[nn.Module], student_head: nn.Linear) -> dict:
        """KD phase: the trainable members of `student` and `student_head` minimise the soft CE
        between student and teacher logits at temperature kd_temperature, weight decay kd_weight_decay, over
        D_t + M. The teacher (frozen) runs in eval mode; frozen extractors shared by both run once per batch."""
        cfg, ctx = self.cfg, self.ctx
        trainable = [m for m in student if not is_frozen(m)]

        def loss_fn(batch):
            cache: dict = {}
            with torch.no_grad():
                t_logits = teacher_head(torch.cat(self._feats(teacher, batch.x, cache), dim=1))
            s_logits = student_head(torch.cat(self._feats(student, batch.x, cache), dim=1))
            loss = kd_soft_ce(s_logits, t_logits, cfg.kd_temperature, cfg.kd_t2_scale)
            if cfg.kd_plus_ce:
                loss = loss + F.cross_entropy(s_logits, batch.y)
            return loss

        kd_cfg = phase_config(ctx.protocol.train, epochs=cfg.kd_epochs, weight_decay=cfg.kd_weight_decay)
        params = [p for m in trainable for p in m.parameters()] + list(student_head.parameters())
        result = ctx.engine.fit(params, loss_fn, ctx.train_indices(task), kd_cfg, phase="kd",
                                modules=[*trainable, student_head])
        return {"kd_epochs": result.epochs, "kd_loss_first": result.history[0] if result.history else None,
                "kd_loss": result.final_loss}

    def _consolidate(self, task: Task, teacher: list[nn.Module], teacher_head: nn.Linear,
                     student_base: list[nn.Module], slot: int) -> tuple[nn.Module, nn.Linear, dict]:
        """Copy `student_base[slot]` into a trainable student, give the student a head (warm: the teacher
        head without the columns of extractors the student lacks), distil, freeze and return both."""
        source = student_base[slot]
        copy = trainable_copy(source)
        student = list(student_base)
        student[slot] = copy
        head = self._derive_head(teacher_head, teacher, student, teacher_head.out_features,
                                 warm=self.cfg.student_head_init == "warm", alias={id(copy): id(source)})
        info = self._distill(task, teacher, teacher_head, student, head)
        freeze(copy)
        freeze(head)
        return copy, head, info

    def _ce_step(self, task: Task, frozen: list[nn.Module], source: nn.Module | None):
        """New extractor (copy of `source` or random) + head over [frozen; new], trained, then frozen."""
        new = self._new_extractor(source)
        head = self._derive_head(self.head, list(self.stack.extractors), [*frozen, new], task.n_seen,
                                 warm=self.cfg.ce_head_init == "inherit")
        info = self._train_new(task, frozen, new, head)
        freeze(new)
        freeze(head)
        return new, head, info

    # --- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"variant": self.name, "tasks_done": self.tasks_done, **self.pack_inference(),
                "proj": pack_module(self.proj), "records": self.records}

    def load_state_dict(self, state: dict) -> None:
        if state.get("variant") != self.name:
            raise UserError(f"{self.name}: checkpoint was written by {state.get('variant')!r}")
        self.tasks_done = int(state["tasks_done"])
        self.stack = self.ctx.restore(state["stack"])
        self.head = self.ctx.restore(state["head"], prepare=False)
        self.records = list(state.get("records", []))
        self.proj = self.ctx.restore(state["proj"])


# ---------------------------------------------------------------------------------------------------------
# TSD-GRC


@register("tsd_grc")
class TSDGRC(TSDBase):
    Config = GRCConfig
    summary = "TSD grouped rolling consolidation: N groups of tasks share one distilled extractor each"
    paper = ("Mitigating the Stability-Plasticity Trade-Off in Neural Networks via Shared Extractors in "
             "Class-Incremental Learning. Appl. Sci. 2025, doi:10.3390/app151910757")

    def __init__(self, cfg: GRCConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.schedule = self.resolve_schedule(cfg, ctx.stream.num_tasks)
        self.group_members: list[nn.Module] = []   # grc_teacher=all_group: the current group's task extractors

    @classmethod
    def run_tag(cls, cfg: GRCConfig) -> str:
        tag = f"N{cfg.n_extractors}"
        if cfg.group_sizes is not None:
            tag += "g" + "-".join(str(s) for s in cfg.group_sizes)
        return tag

    @staticmethod
    def resolve_schedule(cfg: GRCConfig, tasks: int) -> list[int]:
        if cfg.group_sizes is not None:
            if sum(cfg.group_sizes) != tasks:
                raise UserError(f"tsd_grc.group_sizes {cfg.group_sizes} sum to {sum(cfg.group_sizes)}, "
                                f"the protocol has {tasks} tasks")
            return list(cfg.group_sizes)
        return group_schedule(tasks, cfg.n_extractors, cfg.group_rule)

    def position(self, t: int) -> tuple[int, int, int]:
        """(group index k, position of task t in its group, group size), 0-based."""
        start = 0
        for k, size in enumerate(self.schedule):
            if t < start + size:
                return k, t - start, size
            start += size
        raise IndexError(t)

    def learn(self, task: Task, ctx: Context) -> None:
        k, pos, size = self.position(task.index)
        record = {"task": task.index, "group": k, "position": pos, "group_size": size}
        earlier = list(self.stack.extractors)
        if pos == 0:                                       # first task of a group
            frozen, source = earlier, (earlier[-1] if earlier else None)
            new, head, info = self._ce_step(task, frozen, source)
            self.stack.add(new, frozen=True)
            self.head = head
            self.group_members = [new] if self.cfg.grc_teacher == "all_group" else []
            record.update(info, consolidated=0)
        else:                                              # later task: temporary extractor + consolidation
            rolling, groups = earlier[-1], earlier[:-1]
            members = self.group_members if self.cfg.grc_teacher == "all_group" else [rolling]
            frozen = [*groups, *members]
            new, head, info = self._ce_step(task, frozen, rolling)
            student, g, kd = self._consolidate(task, [*frozen, new], head, earlier, len(earlier) - 1)
            self.stack.replace(len(earlier) - 1, student, frozen=True)
            self.head = g
            if self.cfg.grc_teacher == "all_group":
                self.group_members.append(new)
            record.update(info, **kd, consolidated=1)
        if pos == size - 1:                                # end of the group: the rolling extractor is frozen
            self.group_members = []
        record["inference_extractors"] = len(self.stack)
        self.records.append(record)
        self.tasks_done = task.index + 1

    def state_dict(self) -> dict:
        state = super().state_dict()
        rolling = self.stack.extractors[-1] if len(self.stack) else None
        state["schedule"] = list(self.schedule)
        state["group_members"] = [pack_module(m) for m in self.group_members]
        state["member_is_rolling"] = [int(m is rolling) for m in self.group_members]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if list(state["schedule"]) != self.schedule:
            raise UserError(f"tsd_grc: checkpoint group schedule {state['schedule']} differs from {self.schedule}")
        members = [self.ctx.restore(m) for m in state["group_members"]]
        # keep identity with the rolling extractor where it was the same network (the CE head inherits it)
        self.group_members = [self.stack.extractors[-1] if flag else m
                              for m, flag in zip(members, state["member_is_rolling"])]


# ---------------------------------------------------------------------------------------------------------
# TSD-Fixed


@register("tsd_fixed")
class TSDFixed(TSDBase):
    Config = FixedConfig
    summary = "TSD fixed-size pool: N extractors, later tasks distilled into the most similar one"
    paper = ("Mitigating the Stability-Plasticity Trade-Off in Neural Networks via Shared Extractors in "
             "Class-Incremental Learning. Appl. Sci. 2025, doi:10.3390/app151910757")

    def __init__(self, cfg: FixedConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.owner: list[list[int]] = []     # per pool slot: the tasks it holds (creating task first)
        self.prev_target = -1                # slot chosen at the previous merge (-1: none yet)
        self.last_updated = -1               # slot trained most recently (init source of the next extractor)

    def learn(self, task: Task, ctx: Context) -> None:
        n = self.cfg.n_extractors
        pool = list(self.stack.extractors)
        source = pool[self.last_updated] if pool else None
        record = {"task": task.index}
        if len(pool) < n:                                  # t <= N: a new pool extractor
            new, head, info = self._ce_step(task, pool, source)
            self.stack.add(new, frozen=True)
            self.head = head
            self.owner.append([task.index])
            self.last_updated = len(self.stack) - 1
            record.update(info, consolidated=0, slot=self.last_updated)
        else:                                              # t > N: temporary extractor, select, consolidate
            temp, head, info = self._ce_step(task, pool, source)
            scores = self.similarity(task) if self.cfg.selection == "similarity" else None
            target, candidates = select_target(scores, self.prev_target, n, self.cfg.balanced,
                                               self.cfg.selection, ctx.engine.order_gen)
            student, g, kd = self._consolidate(task, [*pool, temp], head, pool, target)
            self.stack.replace(target, student, frozen=True)
            self.head = g
            self.owner[target].append(task.index)
            self.prev_target = self.last_updated = target
            record.update(info, **kd, consolidated=1, slot=target, candidates=candidates,
                          scores=[float(s) for s in scores] if scores is not None else [])
            self.ctx.log(f"tsd_fixed: task {task.index + 1} merged into extractor {target + 1} (scores {scores})")
        record["inference_extractors"] = len(self.stack)
        self.records.append(record)
        self.tasks_done = task.index + 1

    def own_classes(self, slot: int) -> list[int]:
        tasks = self.owner[slot] if self.cfg.own_tasks == "all_assigned" else self.owner[slot][:1]
        bounds = self.ctx.stream.bounds
        return [c for t in tasks for c in range(bounds[t], bounds[t + 1])]

    @torch.no_grad()
    def similarity(self, task: Task) -> list[float]:
        """S_j = sum_{c in Y_t} reduce_{c' own by j} cos(p_{j,c}, q_{j,c'}): p from the
        task's training data, q from the exemplars of j's own classes, both on extractor j (test transform)."""
        ctx, cfg = self.ctx, self.cfg
        kept = {c for c in ctx.exemplar_classes() if len(ctx.class_exemplars(c))}
        if not kept:
            raise UserError("tsd_fixed: selection=similarity needs exemplars (memory.policy is none or the "
                            "memory is empty); use selection=round_robin or random")
        engine, stream = ctx.engine, ctx.stream
        scores = []
        for j, ext in enumerate(self.stack.extractors):
            ext.eval()

            def embed(x, ext=ext):
                f = ext(x).float()
                return F.normalize(f, dim=1) if cfg.proto_normalize else f

            p = torch.stack([engine.apply(embed, stream.class_indices(c)).mean(0) for c in task.classes])
            qs = [engine.apply(embed, ctx.class_exemplars(c)).mean(0) for c in self.own_classes(j) if c in kept]
            if not qs:
                scores.append(float("-inf"))
                continue
            cos = F.normalize(p, dim=1) @ F.normalize(torch.stack(qs), dim=1).T   # [new classes, own classes]
            s = cos.max(dim=1).values if cfg.sim_reduce == "max" else cos.mean(dim=1)
            scores.append(float(s.sum()))
        return scores

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(owner=[list(o) for o in self.owner], prev_target=self.prev_target,
                     last_updated=self.last_updated)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.owner = [list(o) for o in state["owner"]]
        self.prev_target = int(state["prev_target"])
        self.last_updated = int(state["last_updated"])
