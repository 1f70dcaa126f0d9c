"""SEED: Selection of Experts for Ensemble Diversification (Rypeść et al., "Divide and not forget: Ensemble of
selectively trained experts in Continual Learning", ICLR 2024, arXiv:2401.10191).

Exemplar-free. K experts (deep networks); every expert keeps one full-covariance Gaussian per class it has seen
(cilbench/kit/gaussians.py), fitted on the class's training images through the test transform plus their
horizontal flips (cilbench.train.engine.features_with_flips). Per task t:

- t <= K: create expert t (expert 1 from scratch; later ones a copy of expert 1, or fresh), train it with
  cross-entropy through a temporary linear head over the task's classes, discard the head; every existing
  expert fits the new classes' Gaussians.
- t > K: every expert fits the new classes' Gaussians; pick the expert whose new-class Gaussians overlap least
  (largest mean symmetric KL, eq. 2); fine-tune only that expert with (1 - alpha) CE + alpha feature
  distillation against its frozen pre-task copy, BN statistics frozen; refit its new-class Gaussians. Old
  classes' Gaussians are never refitted (no old data).

Inference: per expert the log-likelihoods of every class it holds (eq. 1), a softmax at temperature tau, the
mean over experts (over the experts that hold the class, or over all), argmax. Task-aware: the same restricted
to the sample's task.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    EPS_START,
    AugmentConfig,
    Context,
    Footprint,
    GaussianStore,
    Method,
    Task,
    TrainConfig,
    UserError,
    build_backbone,
    features_with_flips,
    freeze,
    frozen_forward,
    full_precision,
    linear_head,
    option,
    phase_config,
    register,
    standard_spec,
    tie_parameters,
)


@dataclass
class SEEDConfig:
    """Defaults: the official code (grypesc/SEED) where it and the paper differ; the paper's value in the help."""
    # --- ensemble and architecture (App. A.2)
    experts: int = option(5, bounds=(1, None), help="K, the number of experts")
    init: Literal["first", "random"] = option(
        "first", help="experts 2..K: first = a copy of expert 1 after task 1 (code); random = fresh (paper)")
    shared: int = option(0, unit="stages", bounds=(0, 4),
                         help="frozen layers shared by the experts: 1 = stem + stage 1, 2 = + stage 2, ... "
                              "(code: 0)")
    latent_dim: int | None = option(None, unit="channels", bounds=(1, None),
                                    help="S, the feature size; null: 64 (24 with backbone resnet20_low); a 1x1 conv "
                                         "maps the last stage to S channels where its width differs")
    backbone: Literal["card", "resnet20_low", "resnet18_imagenet", "resnet18_cifar", "resnet32"] = option(
        "card", help="card = the card's backbone; resnet20_low = ResNet-20 with a 48-wide last stage (App. A.4); "
                     "or a backbone by name (Table 2 cards: resnet18_imagenet, torchvision's ResNet-18 as "
                     "table2.sh runs it)")
    shortcut: Literal["conv", "card"] = option(
        "conv", help="conv = 1x1 conv + BN projection shortcuts (code: FACIL ResNet-32); card = the factory's own "
                     "(ResNet-32/20: parameter-free option A)")
    last_relu: bool = option(False, help="keep the final ReLU of the last stage's blocks (paper and code remove it)")
    # --- training a new expert (tasks 1..K)
    epochs: int = option(200, unit="epochs", bounds=(1, None), help="epochs of training a new expert")
    lr: float = option(0.05, bounds=(1e-6, None), help="learning rate of training a new expert")
    milestones: list[int] = option([60, 120, 160], unit="epochs", bounds=(0, None),
                                   help="lr milestones (x0.1) of training a new expert")
    weight_decay: float = option(5e-4, bounds=(0, None), help="weight decay of training a new expert")
    momentum: float = option(0.9, bounds=(0, 1), help="SGD momentum (new experts and fine-tuning)")
    batch_size: int | None = option(None, unit="images", bounds=(1, None),
                                    help="batch size; null: the card's (CIFAR cards: 128 = code)")
    clip_norm: float | None = option(1.0, bounds=(0, None),
                                     help="gradient-norm clipping (code: --clipping 1; paper: not stated); null: none")
    autoaugment: Literal["auto", "cifar10", "imagenet", "none"] = option(
        "auto", help="code: AutoAugment on top of the card's crop/flip/brightness (auto: the CIFAR-10 policy on "
                     "images up to 64 px, else ImageNet's; the code picks by data set: CIFAR-10's on CIFAR, "
                     "ImageNet's on ImageNet and DomainNet); paper: AugMix (not available); none = the card's "
                     "augmentation only")
    cutout: int = option(16, unit="px", bounds=(0, None),
                         help="code: Cutout (1 hole of this side) after AutoAugment; 0: none added (a cutout on the "
                              "card itself stays)")
    cutout_fill: Literal["black", "mean"] = option(
        "black", help="black: the hole is cut before normalisation (code: Cutout between ToTensor and "
                      "Normalize); mean: after it, a hole of 0 = the mean colour")
    autoaugment_ops: Literal["pil", "torchvision"] = option(
        "pil", help="AutoAugment's operations: pil = the code's PIL port (grey 128 fill, bicubic shears, "
                    "fractional translations, solarize thresholds from 256); torchvision = "
                    "torchvision.transforms.AutoAugment's (fill 0, nearest, cilbench before this option)")
    normalisation: Literal["code", "card"] = option(
        "code", help="code: on a card with the CIFAR-100 statistics, the code's (FACIL's dataset_config: mean "
                     "(0.5071, 0.4866, 0.4409), std (0.2009, 0.1984, 0.2023)); card: the card's (std (0.2675, "
                     "0.2565, 0.2761)); other cards keep theirs either way")
    # --- Gaussians (the eps regulariser, cilbench/kit/gaussians.py)
    eps_test: Literal["inverse", "cholesky"] = option(
        "inverse", help="eps x10 until: inverse = the float32 covariance's inverse has a Cholesky factor (code); "
                        "cholesky = the float32 covariance has one (cilbench before this option)")
    eps_carry: bool = option(True, help="a class starts at the eps the previous class of the task ended with in "
                                        "that expert (code); false: every class starts at 1e-8")
    # --- fine-tuning the selected expert (tasks > K)
    ft_epochs: int = option(100, unit="epochs", bounds=(0, None),
                            help="epochs of fine-tuning the selected expert (paper: 200); 0 = no fine-tuning "
                                 "(table2.sh)")
    ft_milestones: list[int] = option([30, 60, 80], unit="epochs", bounds=(0, None),
                                      help="lr milestones (x0.1) of fine-tuning (paper: [60, 120, 160])")
    ft_weight_decay: float = option(0.0, bounds=(0, None), help="weight decay of fine-tuning (paper: 5e-4)")
    ft_lr: float | None = option(None, bounds=(1e-6, None), help="learning rate of fine-tuning; null: lr")
    alpha: float = option(0.99, bounds=(0, 1), help="weight of the feature distillation while fine-tuning")
    kd: Literal["mse", "l2"] = option(
        "mse", help="feature distillation: mse = mean squared error over batch and S (code); l2 = mean per-sample "
                    "L2 norm (paper)")
    freeze_bn: bool = option(True, help="BN layers in eval mode while fine-tuning (code)")
    # --- expert selection (eq. 2, Fig. 6)
    selection: Literal["kl_max", "kl_min", "round_robin", "random"] = option(
        "kl_max", help="the expert fine-tuned at t > K: kl_max = the one whose new-class Gaussians overlap least "
                       "(largest mean symmetric KL, eq. 2); kl_min = most; round_robin; random (Fig. 6)")
    single_class: Literal["first", "round_robin"] = option(
        "first", help="a task of one class (no pairs, every overlap is 0): first = expert 1 (the code's argmax of "
                      "zeros); round_robin = expert 1 + ((t - 1) mod K)")
    # --- inference
    tau: float = option(3.0, bounds=(1e-6, None), help="softmax temperature of the experts' class likelihoods at "
                                                       "inference")
    average: Literal["holding", "all"] = option(
        "holding", help="divisor of the experts' average: holding = the experts holding the class (code); all = "
                        "every expert (paper)")


# ---------------------------------------------------------------------------------------------------------
# Pure helpers (tested directly)

# the cards' CIFAR-100 statistics (DER's / PyCIL's) and the ones SEED's code normalises with (FACIL's
# dataset_config 'cifar100*' entries)
CARD_CIFAR100_STD = (0.2675, 0.2565, 0.2761)
FACIL_CIFAR100_MEAN = (0.5071, 0.4866, 0.4409)
FACIL_CIFAR100_STD = (0.2009, 0.1984, 0.2023)


def is_cifar100_statistics(card: AugmentConfig) -> bool:
    """Whether a card normalises with the CIFAR-100 statistics the shipped CIFAR-100 cards use."""
    return len(card.std) == 3 and all(abs(a - b) < 1e-4 for a, b in zip(card.std, CARD_CIFAR100_STD))


def select_expert(overlaps: list[float], rule: str, task_index: int, generator: torch.Generator | None = None) -> int:
    """Index of the expert to fine-tune from each expert's new-class overlap; ties go to the lowest index."""
    k = len(overlaps)
    if rule == "round_robin":
        return task_index % k
    if rule == "random":
        return int(torch.randint(k, (1,), generator=generator))
    values = torch.tensor(overlaps, dtype=torch.float64)
    return int(torch.argmax(values if rule == "kl_max" else -values))   # argmax returns the first maximum


def feature_distillation(features: torch.Tensor, old: torch.Tensor, form: str) -> torch.Tensor:
    """L_KD: 'mse' = mean over batch and dimensions of squared differences (code); 'l2' = mean over the batch of
    the per-sample Euclidean distance (paper)."""
    diff = features.float() - old.float()
    return diff.pow(2).mean() if form == "mse" else diff.norm(dim=1).mean()


def shared_modules(net: nn.Module, shared: int) -> list[nn.Module]:
    """The modules of f: the stem and the first `shared` stages (none when shared = 0)."""
    return [net.stem, *net.stages[:shared]] if shared else []


def alias_shared(dst: nn.Module, src: nn.Module, shared: int) -> None:
    """Make dst's shared layers use src's parameter tensors (BN running buffers stay dst's own) and freeze them."""
    for d_part, s_part in zip(shared_modules(dst, shared), shared_modules(src, shared)):
        tie_parameters(d_part, s_part)


def unique_params(modules) -> int:
    """Parameters counted once even where experts alias shared layers (|theta_f| + K |theta_g|)."""
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def _train_mode(net: nn.Module, bn_frozen: bool) -> None:
    net.train()
    if bn_frozen:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


# ---------------------------------------------------------------------------------------------------------
# The method


@register("seed")
class SEED(Method):
    Config = SEEDConfig
    uses_exemplars = False
    regimes = ("offline",)
    summary = "exemplar-free ensemble of K experts, per-class Gaussians, KL-selected expert fine-tuned per task"
    paper = ("Rypeść et al. Divide and not forget: Ensemble of selectively trained experts in Continual Learning."
             " ICLR 2024, arXiv:2401.10191")

    @classmethod
    def architecture(cls, cfg: SEEDConfig, card_backbone: str) -> str:
        return card_backbone if cfg.backbone == "card" else cfg.backbone

    @classmethod
    def backbone_needs(cls, cfg: SEEDConfig) -> dict[str, str]:
        needs = {"no_pretrained": "builds its experts itself (shared stages, latent layer, last_relu)"}
        if cfg.backbone == "card":
            needs["factory"] = "seed.backbone=card (experts extend the card's ResNet spec)"
        return needs

    def __init__(self, cfg: SEEDConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.spec = self.expert_spec(ctx)
        n_stages = len(self.spec["stages"])
        if cfg.shared > n_stages:
            raise UserError(f"seed.shared: the backbone has {n_stages} stages, got shared={cfg.shared}")
        self.experts: list[nn.Module] = []
        self.gaussians: list[GaussianStore] = []
        self.n_seen = 0
        self.log: list[dict] = []          # per task: expert trained, how, overlaps, eps used

    # --- architecture ------------------------------------------------------------------------------------
    def expert_spec(self, ctx: Context) -> dict:
        cfg, card = self.cfg, ctx.protocol.backbone
        low = cfg.backbone == "resnet20_low"
        name = {"card": card.name, "resnet20_low": "resnet20"}.get(cfg.backbone, cfg.backbone)
        base_width = card.width if cfg.backbone in ("card", "resnet20_low") else 0   # named: its standard width
        spec = standard_spec(name, ctx.stream.image_shape[0], base_width)
        if low:    # App. A.4: the third stage's kernels reduced 64 -> 48 (at base width 16)
            spec["stages"][-1] = [[3 * spec["stem"], 3 * spec["stem"]] for _ in spec["stages"][-1]]
        if cfg.shortcut == "conv":
            spec["shortcut"] = "B"
        spec["last_relu"] = cfg.last_relu
        width = spec["stages"][-1][-1][1]
        s = cfg.latent_dim or (24 if low else 64)
        if s > width:
            raise UserError(f"seed.latent_dim: S={s} exceeds the backbone's {width} output channels, so every "
                            f"class covariance would be singular; set seed.latent_dim <= {width}")
        if s != width:
            spec["latent"] = s
        return spec

    @classmethod
    def augmentation(cls, cfg: SEEDConfig, card: AugmentConfig, image_side: int) -> AugmentConfig:
        """The card's augmentation plus SEED's own (code: AutoAugment with its PIL operations, then Cutout on
        the [0, 1] image before normalisation, so the hole is black; `cutout_fill: mean` cuts after normalisation
        instead) and, on CIFAR-100 cards, the code's normalisation statistics."""
        policy = {"none": card.autoaugment, "auto": "cifar10" if image_side <= 64
                  else "imagenet"}.get(cfg.autoaugment, cfg.autoaugment)
        aug = replace(card, autoaugment=policy, autoaugment_ops=cfg.autoaugment_ops)
        if cfg.normalisation == "code" and is_cifar100_statistics(card):
            aug = replace(aug, mean=list(FACIL_CIFAR100_MEAN), std=list(FACIL_CIFAR100_STD))
        if not cfg.cutout:           # no cutout of SEED's own: the card's stays as the card has it
            return aug
        return replace(aug, cutout=cfg.cutout, cutout_normalised=cfg.cutout_fill == "mean")

    def new_expert(self, ctx: Context) -> nn.Module:
        """Expert 1 from scratch; experts 2..K a copy of expert 1 ('first') or fresh ('random'), shared layers
        aliased to expert 1's and frozen."""
        if self.experts and self.cfg.init == "first":
            net = ctx.engine.prepare(copy.deepcopy(self.experts[0]))   # prepare: a deep copy drops compile()
        else:
            net = ctx.engine.prepare(build_backbone(self.spec))
        for p in net.parameters():
            p.requires_grad_(True)
        if self.experts:
            alias_shared(net, self.experts[0], self.cfg.shared)
        return net

    # --- schedules ---------------------------------------------------------------------------------------
    def expert_config(self, finetune: bool) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        return phase_config(base, optimizer="sgd", momentum=cfg.momentum, nesterov=False, schedule="multistep",
                            gamma=0.1, warmup_epochs=0, clip_norm=cfg.clip_norm,
                            batch_size=cfg.batch_size or base.batch_size,
                            epochs=cfg.ft_epochs if finetune else cfg.epochs,
                            lr=(cfg.ft_lr or cfg.lr) if finetune else cfg.lr,
                            milestones=list(cfg.ft_milestones if finetune else cfg.milestones),
                            weight_decay=cfg.ft_weight_decay if finetune else cfg.weight_decay)

    # --- the task ----------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        cfg = self.cfg
        record = {"task": task.index, "overlaps": []}
        if len(self.experts) < cfg.experts:                   # tasks 1..K: a new expert, CE only
            k = len(self.experts)
            self.experts.append(self.new_expert(ctx))
            self.gaussians.append(GaussianStore(self.experts[k].out_dim, ctx.device))
            self.train_expert(k, task, ctx, distill=False)
            if k == 0:                                        # f is frozen after the first task
                for m in shared_modules(self.experts[0], cfg.shared):
                    freeze(m)
            fitted = {j: self.class_gaussians(j, task, ctx) for j in range(len(self.experts))}
            record["mode"] = "new"
        else:                                                 # tasks > K: select, fine-tune, refit
            fitted = {j: self.class_gaussians(j, task, ctx) for j in range(len(self.experts))}
            overlaps = [fitted[j][0].overlap() for j in range(len(self.experts))]
            record["overlaps"] = [round(v, 4) for v in overlaps]
            k = self.select(overlaps, task)
            if self.expert_config(finetune=True).epochs > 0:
                self.train_expert(k, task, ctx, distill=True)
                fitted[k] = self.class_gaussians(k, task, ctx)
            record["mode"] = "finetune"
        for j, (store, eps) in fitted.items():
            for label, mean, cov, e in zip(store.labels, store.means, store.covs, store.eps):
                self.gaussians[j].add(label, mean, cov, e)
        record.update(expert=k, eps_max=max(max(eps) for _, eps in fitted.values()))
        self.n_seen = task.n_seen
        self.log.append(record)
        ctx.log(f"seed: task {task.index + 1} {record['mode']} expert {k + 1}"
                + (f", overlaps {record['overlaps']}" if record["overlaps"] else ""))

    def select(self, overlaps: list[float], task: Task) -> int:
        cfg = self.cfg
        rule = cfg.selection
        if task.n_new == 1 and rule in ("kl_max", "kl_min"):
            rule = "round_robin" if cfg.single_class == "round_robin" else "first"
        if rule == "first":
            return 0
        gen = torch.Generator().manual_seed(self.ctx.seed * 100_003 + task.index)
        return select_expert(overlaps, rule, task.index, gen)

    def train_expert(self, k: int, task: Task, ctx: Context, distill: bool) -> None:
        """CE through a temporary head over the task's classes; with `distill`, (1 - alpha) CE + alpha L_KD
        against the expert's frozen pre-task copy, BN statistics frozen (code)."""
        cfg, expert = self.cfg, self.experts[k]
        head = ctx.engine.prepare(linear_head(expert.out_dim, task.n_new))
        teacher = freeze(copy.deepcopy(expert)) if distill else None
        offset = task.n_old
        chunk = ctx.engine.frozen_chunk

        def loss_fn(batch):
            features = expert(batch.x)
            ce = F.cross_entropy(head(features).float(), batch.y - offset)
            if teacher is None:
                return ce
            old = frozen_forward(teacher, batch.x, chunk)
            return (1 - cfg.alpha) * ce + cfg.alpha * feature_distillation(features, old, cfg.kd)

        params = [p for p in expert.parameters() if p.requires_grad] + list(head.parameters())
        _train_mode(expert, bn_frozen=distill and cfg.freeze_bn)
        # task.train_idx only: SEED is exemplar-free and must never see an old-class sample
        ctx.engine.fit(params, loss_fn, task.train_idx, self.expert_config(finetune=distill),
                       phase="seed_finetune" if distill else "seed_expert")
        expert.eval()

    @torch.no_grad()
    def class_gaussians(self, k: int, task: Task, ctx: Context) -> tuple[GaussianStore, list[float]]:
        """Gaussians of the task's classes in expert k (not yet added to its store) and the eps each needed."""
        expert = self.experts[k]
        expert.eval()
        idx = task.train_idx
        features = features_with_flips(ctx.engine, expert, idx)
        labels = ctx.stream.train.labels[idx].to(features.device).repeat(2)
        store = GaussianStore(features.shape[1], ctx.device)
        eps = self.fit_classes(store, features, labels, task.classes)
        return store, eps

    def fit_classes(self, store: GaussianStore, features, labels, classes) -> list[float]:
        """Fit each class in order; with `eps_carry` a class's eps starts where the previous one's ended (code:
        eps is set once per expert and task in create_distributions)."""
        used, start = [], EPS_START
        for c in classes:
            used.append(store.fit(c, features[labels == c], start, self.cfg.eps_test))
            start = used[-1] if self.cfg.eps_carry else EPS_START
        return used

    # --- inference ---------------------------------------------------------------------------------------
    def networks(self):
        return list(self.experts)

    def expert_log_likelihoods(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert that holds a class: (its labels, log-likelihoods of x under each of them), one forward each,
        in float32 even under autocast. Every inference view is derived from these."""
        out = []
        with full_precision(x.device):
            for expert, store in zip(self.experts, self.gaussians):
                if store.labels:
                    labels = torch.tensor(store.labels, device=x.device)
                    out.append((labels, store.log_likelihood(expert(x.float()))))
        return out

    def restrict(self, lls, classes: range | None, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per expert that holds any of `classes` (all seen when None): (labels, softmax(l / tau)) over those
        classes, in float64."""
        out = []
        with full_precision(device):
            for labels, ll in lls:
                keep = torch.ones_like(labels, dtype=torch.bool) if classes is None else \
                    (labels >= classes.start) & (labels < classes.stop)
                if bool(keep.any()):
                    probs = torch.softmax(ll[:, keep.to(ll.device)] / self.cfg.tau, dim=1)
                    out.append((labels[keep], probs.to(device)))
        return out

    def expert_probabilities(self, x: torch.Tensor, classes: range | None = None):
        return self.restrict(self.expert_log_likelihoods(x), classes, x.device)

    def combine(self, per_expert, n_classes: int, offset: int, batch: int, device) -> torch.Tensor:
        total = torch.zeros(batch, n_classes, dtype=torch.float64, device=device)
        holders = torch.zeros(n_classes, dtype=torch.float64, device=device)
        for labels, probs in per_expert:
            total[:, labels - offset] += probs
            holders[labels - offset] += 1
        divisor = holders.clamp_min(1) if self.cfg.average == "holding" else float(len(self.experts))
        return torch.log((total / divisor).clamp_min(1e-300)).float()   # log of the ensemble probability

    def scores(self, x):
        return self.combine(self.expert_probabilities(x), self.n_seen, 0, len(x), x.device)

    def task_aware_scores(self, x, classes: range):
        """Scores over one task's classes only (the task-aware variant)."""
        return self.combine(self.expert_probabilities(x, classes), len(classes), classes.start, len(x), x.device)

    def scores_with_task_aware(self, x, bounds):
        """Both views from one forward of each expert: the ensemble over every seen class, and per task block the
        ensemble of each expert's softmax over that task's classes alone."""
        lls, n, device = self.expert_log_likelihoods(x), len(x), x.device
        scores = self.combine(self.restrict(lls, None, device), self.n_seen, 0, n, device)
        blocks = [self.combine(self.restrict(lls, range(lo, hi), device), hi - lo, lo, n, device)
                  for lo, hi in zip(bounds, bounds[1:])]
        return scores, torch.cat(blocks, dim=1)

    def features(self, x):
        return torch.cat([expert(x) for expert in self.experts], dim=1)

    def inference_footprint(self) -> Footprint:
        nets = unique_params(self.experts)
        return Footprint(len(self.experts), nets + self.gaussian_params(), params_backbone=nets)

    def gaussian_params(self) -> int:
        return sum(store.params() for store in self.gaussians)

    def step_record(self) -> dict:
        last = self.log[-1] if self.log else {}
        return {"expert": last.get("expert", -1) + 1, "expert_mode": last.get("mode", ""),
                "overlaps": ";".join(f"{v:g}" for v in last.get("overlaps", [])),
                "params_networks": unique_params(self.experts), "params_gaussians": self.gaussian_params()}

    # --- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"spec": copy.deepcopy(self.spec), "experts": [e.state_dict() for e in self.experts],
                "gaussians": [g.state_dict() for g in self.gaussians], "n_seen": self.n_seen,
                "log": copy.deepcopy(self.log)}

    def load_state_dict(self, state: dict) -> None:
        ctx, cfg = self.ctx, self.cfg
        self.spec = copy.deepcopy(state["spec"])
        self.experts = []
        for weights in state["experts"]:
            net = ctx.engine.prepare(build_backbone(self.spec))
            net.load_state_dict(weights)
            if self.experts:
                alias_shared(net, self.experts[0], cfg.shared)
            self.experts.append(net.eval())
        for m in shared_modules(self.experts[0], cfg.shared) if self.experts else []:
            freeze(m)
        self.gaussians = [GaussianStore.from_state(g, ctx.device) for g in state["gaussians"]]
        self.n_seen = int(state["n_seen"])
        self.log = copy.deepcopy(state["log"])

