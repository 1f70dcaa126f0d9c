"""DyTox: Transformers for Continual Learning with DYnamic TOken eXpansion (Douillard, Ramé, Couairon, Cord;
CVPR 2022, arXiv:2111.11326).

One network for the whole stream:
- a shared encoder: patch embedding + positional embedding + self-attention blocks (SABs; ConViT's GPSA blocks
  in the authors' code);
- a shared task-attention block (TAB): class attention whose only query is a task token;
- one learned task token per task: token theta_i attends over the encoder's patch tokens through the TAB and
  gives the task embedding e_i; every e_1..e_t is computed at inference;
- one classifier per task (LayerNorm + linear, the code's `ind_clf 1-1`) on e_i alone, predicting task i's
  classes; the logits are concatenated in task order.
Per task t:
- the new token and classifier are added; with `freeze_old` the old tokens and classifiers are frozen (the
  code's `freeze_task: [old_task_tokens, old_heads]`); encoder and TAB keep training;
- loss: (1 - a) * L_clf + a * L_kd + div_weight * L_div, with a = |C_1:t-1| / |C_1:t| (the code's `auto_kd`),
  L_clf a binary cross-entropy on every logit, L_kd the KL divergence between the old model's and the current
  model's old-class logits at temperature tau, L_div the divergence head's loss: a classifier on e_t over the
  new classes + one "old" class (label 0), trained only while the task trains and dropped afterwards;
- fine-tuning (the code's `finetuning: balanced`) on the memory after this task's herding, herded before
  fine-tuning: encoder frozen in eval mode, TAB, every token and every classifier trained with L_clf alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit import (
    ClassAttentionBlock,
    Context,
    Footprint,
    Method,
    PatchEncoder,
    Task,
    TrainConfig,
    UserError,
    aux_labels,
    count_params,
    decay_groups,
    drop_path_rates,
    freeze,
    frozen_forward,
    option,
    phase_config,
    register,
    snapshot,
)


@dataclass
class DyToxConfig:
    # --- architecture (options/model/cifar_dytox.yaml) ------------------------------------------------
    embed_dim: int = option(384, bounds=(1, 4096), help="token width D")
    sab_depth: int = option(5, bounds=(1, 64), help="self-attention blocks of the encoder (the code's "
                                                    "local_up_to_layer)")
    tab_depth: int = option(1, bounds=(1, 16), help="task-attention blocks (the code's depth - local_up_to_layer)")
    heads: int = option(12, bounds=(1, 256), help="attention heads")
    patch_size: int = option(4, unit="pixels", bounds=(1, 512), help="patch side (CIFAR 4, ImageNet 16)")
    mlp_ratio: float = option(4.0, bounds=(0.25, 16), help="MLP hidden width / D")
    qkv_bias: bool = option(False, help="bias on the attention's q, k, v projections (code: none)")
    sab_kind: Literal["gpsa", "mhsa"] = option(
        "gpsa", help="encoder block: gpsa = ConViT's gated positional self-attention (the code); mhsa = plain "
                     "multi-head self-attention (the paper's description of a SAB)")
    locality_strength: float = option(1.0, bounds=(0, None), help="ConViT's locality strength of GPSA's init")
    drop_path: float = option(0.1, bounds=(0, 1), help="stochastic depth of the last block, linear from 0 "
                                                       "over SABs + TABs (DeiT's rule; code default 0.1)")
    image_size: Optional[int] = option(None, unit="pixels", bounds=(1, 1024),
                                       help="input side; null: the card's (random-resized-crop side, else the "
                                            "stored image side)")
    # --- training recipe (main.py defaults + the model yaml) -----------------------------------------
    recipe: Literal["dytox", "card"] = option(
        "dytox", help="dytox = the code's AdamW + warm-up + cosine below; card = the card's train block")
    epochs: int = option(500, unit="epochs", bounds=(1, None), help="epochs per task (base and incremental)")
    batch_size: int = option(128, bounds=(1, None), help="batch size (per process in the code; the paper's "
                                                         "CIFAR runs used 2 processes)")
    lr: float = option(5e-4, bounds=(0, None), help="AdamW lr for a batch of 512: the lr used is "
                                                    "lr * batch_size / 512 (the code's linear scaling)")
    weight_decay: float = option(1e-6, bounds=(0, None), help="AdamW weight decay (none on biases and norms)")
    warmup_epochs: int = option(5, unit="epochs", bounds=(0, None), help="linear warm-up epochs")
    warmup_lr: float = option(1e-6, bounds=(0, None), help="lr at the start of the warm-up (not scaled)")
    min_lr: float = option(1e-5, bounds=(0, None), help="cosine floor (not scaled)")
    # --- losses -------------------------------------------------------------------------------------
    clf_loss: Literal["bce", "ce"] = option(
        "bce", help="classification loss: bce = sigmoid BCE on one-hot targets, mean over batch x classes (the "
                    "model yaml's bce_loss, the paper's sigmoid activation); ce = label-smoothed cross-entropy "
                    "(main.py's default without the yaml)")
    label_smoothing: float = option(0.1, bounds=(0, 1), help="ce only: label smoothing")
    kd: Literal["auto", "none"] = option(
        "auto", help="auto = (1 - a) L_clf + a L_kd with a = old / seen classes (the code's auto_kd); none")
    kd_temperature: float = option(1.0, bounds=(0.01, 100), help="tau of the distillation (code: 1)")
    kd_reduction: Literal["mean", "batchmean"] = option(
        "mean", help="KL reduction: mean = over batch x old classes (the code's F.kl_div(reduction='mean')); "
                     "batchmean = per sample, the KL divergence as the paper writes it")
    div_weight: float = option(0.1, bounds=(0, None), help="lambda of the divergence head's loss (code: "
                                                           "head_div 0.1; 0: no divergence head)")
    div_in_finetuning: bool = option(False, help="also train the divergence head during fine-tuning (code: "
                                                 "head_div_mode tr, i.e. not)")
    freeze_old: bool = option(True, help="freeze old task tokens and old classifiers while a new task trains")
    # --- fine-tuning on a balanced set -----------------------------------------------------------------
    finetune: bool = option(True, help="balanced fine-tuning after each incremental task (code: finetuning "
                                       "balanced); none without an exemplar memory, as in the code")
    ft_epochs: int = option(20, unit="epochs", bounds=(0, None), help="fine-tuning epochs")
    ft_lr: float = option(5e-5, bounds=(0, None), help="fine-tuning AdamW lr for a batch of 512 (scaled like "
                                                       "lr; constant, the code makes no scheduler there)")
    ft_set: Literal["memory", "balanced"] = option(
        "memory", help="what fine-tuning trains on: memory = the memory after this task's herding, herded with the "
                       "model before fine-tuning (the code's get_finetuning_dataset: the budget over every class "
                       "seen); balanced = the memory before the update plus as many random new images per class")
    ft_freeze_old: bool = option(False, help="keep old tokens and classifiers frozen during fine-tuning too "
                                             "(the code trains them: its freeze_ft is [sab] alone)")
    herding_features: Literal["all", "last"] = option(
        "all", help="features exemplars are herded on: all = the concatenated task embeddings (the code's "
                    "icarl_all); last = the newest task embedding")


class DyToxNet(nn.Module):
    """Encoder + TAB(s) + one task token and one classifier per task. forward(x) -> logits over seen classes."""

    def __init__(self, cfg: DyToxConfig, image_size: int, in_chans: int):
        super().__init__()
        rates = drop_path_rates(cfg.drop_path, cfg.sab_depth + cfg.tab_depth)
        self.encoder = PatchEncoder(image_size, in_chans, cfg.patch_size, cfg.embed_dim, cfg.heads,
                                    rates[:cfg.sab_depth], cfg.mlp_ratio, cfg.qkv_bias, cfg.sab_kind,
                                    cfg.locality_strength)
        self.tabs = nn.ModuleList([ClassAttentionBlock(cfg.embed_dim, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, r)
                                   for r in rates[cfg.sab_depth:]])
        self.tokens = nn.ParameterList()
        self.heads = nn.ModuleList()
        self.dim = cfg.embed_dim

    def add_task(self, n_classes: int) -> None:
        token = nn.Parameter(torch.zeros(1, 1, self.dim, device=self.encoder.pos_embed.device))
        nn.init.trunc_normal_(token, std=0.02, a=-2.0, b=2.0)     # timm's trunc_normal_ (absolute bounds)
        self.tokens.append(token)
        self.heads.append(task_classifier(self.dim, n_classes).to(token.device))

    @property
    def classes_per_task(self) -> list[int]:
        return [h[1].out_features for h in self.heads]

    def embeddings(self, x: torch.Tensor) -> list[torch.Tensor]:
        """e_1..e_t: each task token through the TAB(s) over the shared patch tokens."""
        patches = self.encoder(x)
        out = []
        for token in self.tokens:
            t = token.expand(len(x), -1, -1)
            for tab in self.tabs:
                t = tab(t, patches)
            out.append(t[:, 0])
        return out

    def classify(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([head(e) for head, e in zip(self.heads, embeddings)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.embeddings(x))


def task_classifier(dim: int, n_classes: int) -> nn.Sequential:
    """The code's ContinualClassifier: LayerNorm then a linear layer (PyTorch's default init)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_classes))


def bce_one_hot(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sigmoid BCE against one-hot targets, mean over batch x classes (the code's bce_with_logits)."""
    return F.binary_cross_entropy_with_logits(logits, F.one_hot(y, logits.shape[1]).to(logits.dtype))


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float, reduction: str) -> torch.Tensor:
    """tau^2 KL(softmax(teacher / tau) || softmax(student / tau)); reduction "mean" divides the summed KL by
    batch x classes (the code's kl_div(reduction="mean"), computed from the sum so torch does not warn that its
    "mean" will change), "batchmean" by the batch only."""
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                  reduction="sum", log_target=True) * tau ** 2
    return kl / (student.numel() if reduction == "mean" else student.shape[0])


@register("dytox")
class DyTox(Method):
    Config = DyToxConfig
    display_name = "DyTox"
    uses_exemplars = True
    regimes = ("offline",)
    summary = "transformer with a shared encoder/decoder and one task token + classifier per task"
    paper = ("Douillard, Ramé, Couairon, Cord. DyTox: Transformers for Continual Learning with DYnamic TOken "
             "eXpansion. CVPR 2022, arXiv:2111.11326")

    @classmethod
    def architecture(cls, cfg: DyToxConfig, card_backbone: str) -> str:
        """The paper's network (5 GPSA + 1 task-attention block, 384 wide, 12 heads) is `convit_dytox` with 4x4
        patches (CIFAR) and `convit_dytox_p16` with 16x16 (ImageNet); any other size is spelled out."""
        if (cfg.embed_dim, cfg.sab_depth, cfg.tab_depth, cfg.heads, cfg.sab_kind) == (384, 5, 1, 12, "gpsa") \
                and cfg.patch_size in (4, 16):
            return "convit_dytox" + ("_p16" if cfg.patch_size == 16 else "")
        return (f"dytox_{cfg.sab_kind} (width {cfg.embed_dim}, {cfg.sab_depth}+{cfg.tab_depth} blocks, "
                f"{cfg.heads} heads, patch {cfg.patch_size})")

    def __init__(self, cfg: DyToxConfig, ctx: Context):
        super().__init__(cfg, ctx)
        if cfg.embed_dim % cfg.heads:
            raise UserError(f"dytox.embed_dim={cfg.embed_dim} is not divisible by dytox.heads={cfg.heads}: "
                            "choose heads that divide the embedding width")
        side = self.image_size()
        if side % cfg.patch_size:
            raise UserError(f"dytox.patch_size={cfg.patch_size} does not divide the {side}-pixel input: set "
                            f"dytox.patch_size to a divisor of {side}")
        self.net: DyToxNet | None = None
        self.div_params = 0          # the last divergence head's parameters (training only)

    def image_size(self) -> int:
        crop = self.ctx.protocol.augment.random_resized_crop
        return self.cfg.image_size or crop or self.ctx.stream.image_shape[-1]

    def new_net(self) -> DyToxNet:
        return DyToxNet(self.cfg, self.image_size(), self.ctx.stream.image_shape[0]).to(self.ctx.device)

    # --- schedules -------------------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        cfg, base = self.cfg, self.ctx.protocol.train
        if cfg.recipe == "card":
            return base
        return phase_config(base, optimizer="adamw", lr=cfg.lr * cfg.batch_size / 512, batch_size=cfg.batch_size,
                            epochs=cfg.epochs, weight_decay=cfg.weight_decay, schedule="cosine", milestones=[],
                            warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                            clip_norm=None)

    def finetune_config(self) -> TrainConfig:
        cfg, base = self.cfg, self.train_config()
        return phase_config(base, epochs=cfg.ft_epochs, lr=cfg.ft_lr * base.batch_size / 512, schedule="constant",
                            warmup_epochs=0, warmup_lr=None, min_lr=0.0)

    # --- losses ----------------------------------------------------------------------------------------
    def clf_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.clf_loss == "bce":
            return bce_one_hot(logits, y)
        return F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)

    # --- the task --------------------------------------------------------------------------------------
    def learn(self, task: Task, ctx: Context) -> None:
        cfg = self.cfg
        teacher = snapshot(self.net) if self.net is not None and cfg.kd == "auto" else None
        if self.net is None:
            self.net = self.new_net()
        net = self.net
        net.add_task(task.n_new)
        n_old, n_seen = task.n_old, task.n_seen
        net.requires_grad_(True)                  # frozen after the previous task: encoder and TAB train again
        for i in range(len(net.tokens) - 1):
            net.tokens[i].requires_grad_(not cfg.freeze_old)
            net.heads[i].requires_grad_(not cfg.freeze_old)
        div = None
        if n_old > 0 and cfg.div_weight > 0:
            div = task_classifier(cfg.embed_dim, task.n_new + 1).to(ctx.device)
            self.div_params = count_params(div)
        alpha = n_old / n_seen if teacher is not None else 0.0
        chunk = ctx.engine.frozen_chunk

        def loss_fn(batch):
            emb = net.embeddings(batch.x)
            logits = net.classify(emb)
            loss = (1 - alpha) * self.clf_loss(logits, batch.y)
            if teacher is not None:
                old = frozen_forward(teacher, batch.x, chunk)
                loss = loss + alpha * kd_kl(logits[:, :n_old], old, cfg.kd_temperature, cfg.kd_reduction)
            if div is not None:
                loss = loss + cfg.div_weight * self.clf_loss(div(emb[-1]), aux_labels(batch.y, n_old))
            return loss

        groups = decay_groups([*net.named_parameters(), *(div.named_parameters() if div is not None else [])],
                              self.train_config().weight_decay)
        ctx.engine.fit(groups, loss_fn, ctx.train_indices(task), self.train_config(), phase="dytox",
                       modules=[net] + ([div] if div is not None else []))
        if cfg.finetune and task.index > 0 and cfg.ft_epochs > 0 and ctx.memory is not None:   # code: "and memory"
            self.finetune(task, ctx, div if cfg.div_in_finetuning else None)
        freeze(net)

    def finetune(self, task: Task, ctx: Context, div: nn.Module | None) -> None:
        """Balanced fine-tuning: encoder frozen (eval mode, no gradient), TAB + tokens + classifiers trained with
        the classification loss on the fine-tuning set (finetune_indices)."""
        cfg, net, n_old = self.cfg, self.net, task.n_old
        for p in net.parameters():
            p.requires_grad_(True)
        net.encoder.requires_grad_(False)
        if cfg.ft_freeze_old:
            for i in range(len(net.tokens) - 1):
                net.tokens[i].requires_grad_(False)
                net.heads[i].requires_grad_(False)
        net.encoder.eval()

        def loss_fn(batch):
            patches = batch.x                       # the frozen encoder's output (fit's `frozen`)
            emb = []
            for token in net.tokens:
                t = token.expand(len(batch.x), -1, -1)
                for tab in net.tabs:
                    t = tab(t, patches)
                emb.append(t[:, 0])
            loss = self.clf_loss(net.classify(emb), batch.y)
            if div is not None:
                loss = loss + cfg.div_weight * self.clf_loss(div(emb[-1]), aux_labels(batch.y, n_old))
            return loss

        named = [(n, p) for n, p in net.named_parameters() if not n.startswith("encoder.")]
        if div is not None:
            named += list(div.named_parameters())
        groups = decay_groups(named, self.finetune_config().weight_decay)
        ctx.engine.fit(groups, loss_fn, self.finetune_indices(task, ctx), self.finetune_config(),
                       phase="dytox_finetune", frozen=net.encoder)
        net.encoder.train()

    def finetune_indices(self, task: Task, ctx: Context) -> torch.Tensor:
        """The fine-tuning set. The code's: this task's herding runs now, with the model before fine-tuning, and
        fine-tuning trains on the memory it leaves (the harness keeps that selection)."""
        if self.cfg.ft_set == "balanced":
            return ctx.balanced_indices(task)
        training = [(m, m.training) for m in self.net.modules()]
        self.net.eval()
        indices = ctx.select_exemplars_now(task, self.features)
        for module, mode in training:
            module.train(mode)
        return indices

    # --- inference -------------------------------------------------------------------------------------
    def networks(self) -> list[nn.Module]:
        return [self.net]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def scores_with_task_aware(self, x, bounds):
        """Each classifier's block is its own task's classes, so the task-aware view is the same logits."""
        scores = self.net(x)
        return scores, scores

    def features(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.net.embeddings(x)
        return torch.cat(emb, dim=1) if self.cfg.herding_features == "all" else emb[-1]

    def inference_footprint(self) -> Footprint:
        net = self.net
        backbone = count_params(net.encoder, net.tabs) + sum(t.numel() for t in net.tokens)
        return Footprint(1, count_params(net), backbone)

    def step_record(self) -> dict:
        net = self.net
        return {"task_tokens": len(net.tokens), "params_encoder": count_params(net.encoder),
                "params_tab": count_params(net.tabs), "params_tokens": sum(t.numel() for t in net.tokens),
                "params_classifiers": count_params(net.heads), "params_div_head": self.div_params}

    # --- checkpoints -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        net = self.net
        return {"classes_per_task": net.classes_per_task, "div_params": self.div_params,
                "weights": {k: v.detach().cpu() for k, v in net.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        net = self.new_net()
        for n in state["classes_per_task"]:
            net.add_task(n)
        net.load_state_dict(state["weights"])
        self.net = freeze(net)
        self.div_params = state["div_params"]

