"""EXACFS: exponentially averaged class-wise feature significance (Balasubramanian et al., 2024).

Per task t (the paper's Algorithm 2):
1. M^t <- M^{t-1}; keep a frozen snapshot of M^{t-1}'s extractor (t >= 1); add c^t classes to PODNet's
   local-similarity classifier (LSC), their proxies imprinted by k-means of normalised features (t >= 1);
   old-class proxies frozen (option).
2. Train on D^t u E^{0~t-1} with
       L^t = CL^t + alpha * tau * sum_j DL_j^t,    tau = sqrt(r^t / c^t)                         (Eq. 4)
   CL = LSC's NCA loss (learned scale; PODNet's released form by default); DL_j = significance-weighted
   squared change of the Frobenius-normalised stage-j maps of M^{t-1} and M^t (Eq. 3); old-class samples
   weigh their channels by S~^{t-1, y}, new-class samples by 1. No DL at t = 0.
3. Class-balanced fine-tuning of the classifier only (20 epochs; PODNet's undersampling recipe: the herded
   exemplars of every class, constant lr, extractor BN in train mode, gradients clamped to +-5).
4. (harness) herding, 20 exemplars per class.
5. Significance (Algorithm 1): per class, mean squared spatially-averaged gradient of CL w.r.t. every stage
   map, in eval mode on D^t u E^{0~t-1}; normalised; EMA with beta 0.4 (Eq. 2).
Every choice the paper leaves open is an option of EXACFSConfig (logged in the run's config.yaml).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch

from cilbench.kit import (
    STANDARD,
    Context,
    LocalSimilarityHead,
    OneNetworkMethod,
    Task,
    TrainConfig,
    UserError,
    class_gradient_significance,
    ema_significance,
    frozen_forward,
    kmeans,
    nca_margin_loss,
    normalise_significance,
    option,
    pack_module,
    phase_config,
    register,
    significance_distillation,
    significance_summary,
    significance_weights,
    snapshot,
    stage_channels,
    stage_outputs,
    uniform_like,
)


@dataclass
class EXACFSConfig:
    # --- distillation (Eqs. 3-4) ----------------------------------------------------------------------
    alpha: float = option(4.0, bounds=(0, None), help="weight of the feature distillation DL (4 CIFAR-100, "
                                                      "10 ImageNet-100)")
    stages: Optional[list[int]] = option(None, bounds=(1, None),
                                         help="1-based backbone stages distilled; null: every stage (the paper's "
                                              "four)")
    feature_norm: Literal["stage", "channel"] = option(
        "stage", help="DL's normalisation: stage = Frobenius norm of the stage tensor; channel = of each map")
    dl_samples: Literal["all", "exemplars_only"] = option(
        "all", help="samples in DL: all = every sample (new-class samples weigh every channel new_class_weight); "
                    "exemplars_only = old-class samples only")
    new_class_weight: float = option(1.0, bounds=(0, None),
                                     help="the fixed channel significance of new-class samples (paper: 1)")
    # --- significance (Eqs. 1-2, Algorithm 1) ---------------------------------------------------------
    ema_beta: float = option(0.4, bounds=(0, 1), help="beta, the EMA factor of the class-wise significance "
                                                      "(Eq. 2)")
    sig_norm: Literal["across_classes", "across_channels", "mean_one"] = option(
        "across_classes", help="significance normalisation: across_classes = each channel's values over the "
                               "classes sum to 1 (Algorithm 1, literal reading); across_channels = each class's "
                               "vector sums to 1; mean_one = each class's vector has mean 1")
    significance: Literal["class", "uniform"] = option(
        "class", help="class = class-wise significance; uniform = Figure 2's ablation (same total weight)")
    sig_after_cbf: bool = option(True, help="estimate the significance on the model after the balanced "
                                            "fine-tuning")
    # --- classifier: PODNet LSC -----------------------------------------------------------------------
    proxies_per_class: int = option(10, unit="proxies", bounds=(1, None),
                                    help="proxies per class of PODNet's local-similarity classifier")
    margin: float = option(0.6, bounds=(0, None), help="delta, the NCA loss's margin")
    scale_init: float = option(1.0, bounds=(1e-6, None),
                               help="initial value of the learned scale eta (PODNet's learned_scaling "
                                    "post-processor)")
    nca_form: Literal["code", "paper"] = option(
        "code", help="NCA loss: code = PODNet's released nca (eta (y - delta) on every class, positive zeroed in "
                     "the denominator, no hinge: delta cancels); paper = PODNet's printed LSC loss, margin on the "
                     "positive only, hinged")
    margin_placement: Literal["scaled", "paper"] = option(
        "scaled", help="with nca_form paper only: scaled = eta y_y - delta (the margin outside the learned scale; "
                       "ours, neither PODNet's code nor paper); paper = eta (y_y - delta), the margin grows with eta")
    freeze_old_proxies: bool = option(True, help="old classes' proxies frozen (PODNet's CIFAR config: old_weights "
                                                 "lr factor 0)")
    imprint: bool = option(True, help="new classes' proxies imprinted by k-means of normalised features (t >= 1)")
    kmeans_iters: int = option(30, unit="iterations", bounds=(0, None), help="Lloyd iterations of the imprinting "
                                                                             "k-means")
    # --- training budget ------------------------------------------------------------------------------
    backbone: Optional[str] = option(None, help="backbone; null: the card's (the CIFAR cards name "
                                                "resnet32_podnet)")
    epochs: Optional[int] = option(None, unit="epochs", bounds=(1, None),
                                   help="training epochs; null: the card's (paper: 160 CIFAR, 90 ImageNet)")
    lr: Optional[float] = option(None, bounds=(1e-6, None), help="learning rate; null: the card's (paper: 0.1)")
    weight_decay: Optional[float] = option(None, bounds=(0, None),
                                           help="weight decay; null: the card's (paper: 5e-4 CIFAR, 1e-4 ImageNet)")
    batch_size: Optional[int] = option(None, unit="images", bounds=(1, None),
                                       help="batch size; null: the card's (not in the paper; PODNet 128 / 64)")
    # --- class-balanced fine-tuning (PODNet recipe) -----------------------------------------------------
    cbf_epochs: int = option(20, unit="epochs", bounds=(0, None),
                             help="epochs of the class-balanced fine-tuning of the classifier; 0 turns it off")
    cbf_lr: float = option(0.05, bounds=(1e-6, None), help="learning rate of the balanced fine-tuning (0.05 CIFAR, "
                                                           "0.01 ImageNet)")
    cbf_per_class: Optional[int] = option(None, unit="images per class", bounds=(1, None),
                                          help="with cbf_samples random: images per class of the balanced subset; "
                                               "null: the smallest class count (new classes cut to memory's)")
    cbf_first_task: bool = option(False, help="run the balanced fine-tuning after the first task too")
    cbf_schedule: Literal["constant", "cosine"] = option(
        "constant", help="lr schedule of the balanced fine-tuning (the paper is silent): constant = PODNet's code "
                         "(no scheduler while fine-tuning); cosine = the card's cosine over the CBF epochs")
    cbf_samples: Literal["herded", "random"] = option(
        "herded", help="the balanced set: herded = the exemplars memory will hold after the task, new classes "
                       "herded on the trained model (PODNet's code: build_examplars, then the memory loader); "
                       "random = new classes cut to the exemplars per class at random")
    cbf_bn: Literal["train", "frozen"] = option(
        "train", help="the extractor's BatchNorm while fine-tuning: train = batch statistics, running statistics "
                      "updated (PODNet's code: the network stays in train mode, only the classifier is "
                      "optimised); frozen = eval mode, statistics untouched")
    cbf_train_scale: bool = option(False, help="train eta too while fine-tuning (PODNet fine-tunes the "
                                               "classifier's proxies only; eta stays fixed)")
    grad_clamp: Optional[float] = option(
        5.0, bounds=(0, None), help="clamp every element of every trained parameter's gradient to [-c, c] in both "
                                    "phases, before weight decay (PODNet's code: a hook clamping to +-5 in "
                                    "_train_task); null: no clamp")

    def validate(self, where: str) -> None:
        if self.backbone is not None and self.backbone not in STANDARD:
            raise UserError(f"{where}.backbone: unknown '{self.backbone}'; known: {', '.join(STANDARD)}")
        if self.cbf_per_class is not None and self.cbf_samples == "herded":
            raise UserError(f"{where}.cbf_per_class applies to cbf_samples=random only (herded takes the memory's "
                            "quota); set cbf_samples=random or drop cbf_per_class")


def adaptive_weight(n_seen: int, n_new: int) -> float:
    """tau of Eq. 4: sqrt(r^t / c^t) (PODNet's sqrt(seen / new))."""
    return math.sqrt(n_seen / n_new)


@register("exacfs")
class EXACFS(OneNetworkMethod):
    Config = EXACFSConfig
    uses_exemplars = True
    regimes = ("offline",)
    summary = "class-wise feature-significance distillation of stage maps, PODNet LSC, balanced fine-tuning"
    paper = "Balasubramanian et al. EXACFS - A CIL Method to Mitigate Catastrophic Forgetting. 2024"

    @classmethod
    def architecture(cls, cfg: EXACFSConfig, card_backbone: str) -> str:
        return cfg.backbone or card_backbone

    @classmethod
    def backbone_needs(cls, cfg: EXACFSConfig) -> dict[str, str]:
        return {"stage_maps": "its stage-map distillation"} if cfg.backbone is None else {}

    def __init__(self, cfg: EXACFSConfig, ctx: Context):
        super().__init__(cfg, ctx)
        self.backbone = ctx.new_backbone(cfg.backbone)
        n_stages = len(stage_channels(self.backbone))
        if cfg.stages is not None and (not cfg.stages or any(not 1 <= j <= n_stages for j in cfg.stages)):
            raise UserError(f"exacfs.stages: {cfg.stages} out of range; the backbone has stages 1..{n_stages}")
        self.stages = [j - 1 for j in cfg.stages] if cfg.stages is not None else list(range(n_stages))
        self.head = LocalSimilarityHead(self.backbone.out_dim, cfg.proxies_per_class, cfg.scale_init).to(ctx.device)
        self.significance: list[torch.Tensor] | None = None   # S~^{t-1}: per stage [r^{t-1}, d_j]
        self.log: list[dict] = []                              # per task: tau, significance statistics

    # --- the task (Algorithm 2) -------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        cfg = self.cfg
        previous = snapshot(self.backbone) if task.index > 0 else None
        self.add_classes(task, ctx)
        self.train_task(task, ctx, previous)
        del previous
        if not cfg.sig_after_cbf:
            self.update_significance(task, ctx)
        if cfg.cbf_epochs and (task.index > 0 or cfg.cbf_first_task):
            self.balanced_finetune(task, ctx)
        if cfg.sig_after_cbf:
            self.update_significance(task, ctx)

    def add_classes(self, task: Task, ctx: Context) -> None:
        centres = self.imprint(task, ctx) if (self.cfg.imprint and task.index > 0) else None
        self.head.add_classes(task.n_new, centres)
        self.head.freeze_old(self.cfg.freeze_old_proxies)

    @torch.no_grad()
    def imprint(self, task: Task, ctx: Context) -> torch.Tensor:
        """[c^t, K, d]: k-means centres of each new class's L2-normalised features (PODNet imprinting)."""
        self.backbone.eval()
        centres = []
        for label in task.classes:
            feats = ctx.engine.apply(self.backbone, ctx.stream.class_indices(label))
            centres.append(kmeans(torch.nn.functional.normalize(feats, dim=1), self.cfg.proxies_per_class,
                                  ctx.engine.order_gen, self.cfg.kmeans_iters))
        return torch.stack(centres)

    def train_config(self) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        changes = {k: v for k, v in (("epochs", cfg.epochs), ("lr", cfg.lr), ("weight_decay", cfg.weight_decay),
                                     ("batch_size", cfg.batch_size)) if v is not None}
        return phase_config(base, schedule="cosine", warmup_epochs=0, milestones=[], **changes)

    def classification_loss(self, features: torch.Tensor, y: torch.Tensor, reduction: str = "mean"):
        margin = self.cfg.margin * (self.head.scale if self.cfg.margin_placement == "paper" else 1.0)
        return nca_margin_loss(self.head(features), y, margin, form=self.cfg.nca_form, reduction=reduction)

    def train_task(self, task: Task, ctx: Context, previous) -> None:
        cfg, n_old = self.cfg, task.n_old
        weight = cfg.alpha * adaptive_weight(task.n_seen, task.n_new)
        sig = self.significance
        if sig is not None and cfg.significance == "uniform":
            sig = uniform_like(sig)
        new_value = cfg.new_class_weight if cfg.dl_samples == "all" else 0.0
        parts = {"old": torch.zeros((), device=ctx.device), "new": torch.zeros((), device=ctx.device), "n": 0}
        chunk = ctx.engine.frozen_chunk

        def loss_fn(batch):
            maps, features = stage_outputs(self.backbone, batch.x)
            loss = self.classification_loss(features, batch.y)
            if previous is None:
                return loss
            old_maps, _ = frozen_forward(lambda x: stage_outputs(previous, x), batch.x, chunk)
            weights = significance_weights([sig[j] for j in self.stages], batch.y, n_old, new_value)
            per_sample = significance_distillation([maps[j] for j in self.stages], [old_maps[j] for j in self.stages],
                                                   weights, cfg.feature_norm)
            is_old = batch.y < n_old
            count = len(batch.y) if cfg.dl_samples == "all" else max(int(is_old.sum()), 1)
            distill = per_sample.sum() / count
            parts["old"] += per_sample[is_old].detach().sum() / count
            parts["new"] += per_sample[~is_old].detach().sum() / count
            parts["n"] += 1
            return loss + weight * distill

        def epoch_extras() -> dict:
            if not parts["n"]:
                return {}
            out = {"dl_old": float(parts["old"]) / parts["n"], "dl_new": float(parts["new"]) / parts["n"],
                   "dl_weight": weight}
            parts.update(old=parts["old"] * 0, new=parts["new"] * 0, n=0)
            return out

        params = [p for p in (*self.backbone.parameters(), *self.head.parameters()) if p.requires_grad]
        ctx.engine.fit(params, loss_fn, ctx.train_indices(task), self.train_config(), phase="exacfs",
                       modules=[self.backbone, self.head], epoch_extras=epoch_extras,
                       before_step=self.gradient_clamp(params))
        self.log.append({"task": task.index, "tau": adaptive_weight(task.n_seen, task.n_new)})

    def balanced_finetune(self, task: Task, ctx: Context) -> None:
        """Classifier only (every proxy; the scale eta too with cbf_train_scale), CL only, on a class-balanced
        set; the extractor is not optimised (its BN statistics move with cbf_bn train)."""
        cfg, backbone, head = self.cfg, self.backbone, self.head
        backbone.eval()
        head.freeze_old(False)
        if cfg.cbf_samples == "herded":
            indices = ctx.exemplars_after(task, self.features)
        else:
            indices = ctx.balanced_indices(task, cfg.cbf_per_class)
        bn_train = cfg.cbf_bn == "train"

        def loss_fn(batch):
            # in BN train mode the extractor's statistics move with each batch: it runs inside the step (under
            # no_grad, the whole batch at once); frozen, the engine gives its features (fit's `frozen`)
            features = frozen_forward(backbone, batch.x) if bn_train else batch.x
            return self.classification_loss(features, batch.y)

        cbf = phase_config(self.train_config(), epochs=cfg.cbf_epochs, lr=cfg.cbf_lr, schedule=cfg.cbf_schedule)
        params = [p for p in head.parameters() if cfg.cbf_train_scale or p is not head.log_scale]
        ctx.engine.fit(params, loss_fn, indices, cbf, phase="exacfs_balanced",
                       modules=[backbone] if bn_train else [], before_step=self.gradient_clamp(params),
                       frozen=None if bn_train else backbone)
        backbone.eval()

    def gradient_clamp(self, params: list[torch.Tensor]):
        """The before_step hook that clamps each gradient element to +-grad_clamp (None when off)."""
        bound = self.cfg.grad_clamp
        if bound is None:
            return None

        def clamp(batch):
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-bound, bound)
        return clamp

    def update_significance(self, task: Task, ctx: Context) -> None:
        """Algorithm 1 on D^t u E^{0~t-1} with M^t in eval mode, then normalisation and the EMA."""
        self.backbone.eval()
        self.head.eval()
        current = normalise_significance(self.estimate_significance(task, ctx), self.cfg.sig_norm)
        self.significance = ema_significance(self.significance, current, self.cfg.ema_beta)
        self.log[-1]["significance"] = significance_summary(self.significance)

    def estimate_significance(self, task: Task, ctx: Context) -> list[torch.Tensor]:
        engine, data = ctx.engine, ctx.stream.train
        indices = ctx.train_indices(task)

        def batches():
            for idx in engine.batches(indices, engine.inference_batch_size(), shuffle=False):
                yield engine.test_transform(data.images[idx]).float(), data.labels[idx].to(ctx.device)

        def loss(features, y):
            return self.classification_loss(features, y, reduction="none")

        return class_gradient_significance(lambda x: stage_outputs(self.backbone, x), loss, batches(), task.n_seen)

    # --- inference: OneNetworkMethod (backbone + LSC head) -----------------------------------------------

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"backbone": pack_module(self.backbone), "head": self.head.state_dict(),
                "significance": [s.cpu() for s in self.significance] if self.significance is not None else None,
                "log": self.log}

    def load_state_dict(self, state: dict) -> None:
        self.backbone = self.ctx.restore(state["backbone"])
        self.head = LocalSimilarityHead.from_state(state["head"], self.cfg.proxies_per_class).to(self.ctx.device)
        self.head.freeze_old(self.cfg.freeze_old_proxies)
        sig = state["significance"]
        self.significance = [s.to(self.ctx.device) for s in sig] if sig is not None else None
        self.log = list(state["log"])
