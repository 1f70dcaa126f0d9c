"""Losses shared by the methods (written once here, reused by every method file)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_soft_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               scale_t2: bool = False) -> torch.Tensor:
    """-(1/B) sum_b sum_c softmax(t/T)_c log_softmax(s/T)_c: soft cross-entropy (KL up to a constant),
    as PyCIL's _KD_loss / FOSTER. `scale_t2` multiplies by T^2 (Hinton et al.)."""
    target = F.softmax(teacher_logits.float() / temperature, dim=1)
    loss = -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()
    return loss * temperature ** 2 if scale_t2 else loss


def supcon_distinct(z: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor | None = None,
                    extra_negatives: torch.Tensor | None = None, temperature: float = 0.07,
                    base_temperature: float | None = None) -> torch.Tensor:
    """SupCon (Khosla et al. 2020; HobbitLong/SupContrast `SupConLoss`) with extra negatives: TSD's
    feature-distinctness loss.

    `z` [M, D]: L2-normalised embeddings of every view of every batch sample under the trainable extractor
    (views stacked along dim 0), `labels` [M]. `anchors` [M] bool picks the anchor rows I (default: all).
    `extra_negatives` [K, D]: L2-normalised embeddings that are negatives of every anchor (TSD: old-class
    samples embedded by each frozen extractor). For an anchor i, the positives P(i) are the other rows of `z`
    with its label; A(i) is every other row of `z` plus every extra negative; the loss is
        (tau / base_tau) * mean_{i in I} [ -1/|P(i)| sum_{p in P(i)}
                                              log(exp(z_i.z_p/tau) / sum_{a in A(i)} exp(z_i.z_a/tau)) ]
    Anchors without a positive are skipped (SupContrast would divide by zero). Returns 0 when no anchor has
    a positive. Computed in float32.
    """
    # float32 even under bf16 autocast: the logits reach 1/tau ~ 14 and bf16 would round them coarsely
    with torch.autocast(z.device.type, enabled=False):
        z = z.float()
        m = z.shape[0]
        base_temperature = temperature if base_temperature is None else base_temperature
        anchors = torch.ones(m, dtype=torch.bool, device=z.device) if anchors is None else anchors.bool()
        za = z[anchors]                                              # [I, D]
        if za.shape[0] == 0:
            return z.sum() * 0.0
        la = labels[anchors]
        sim = za @ z.T / temperature                                 # [I, M]
        rows = torch.nonzero(anchors).flatten()
        self_mask = torch.zeros_like(sim, dtype=torch.bool)
        self_mask[torch.arange(len(rows), device=z.device), rows] = True
        pos = (la[:, None] == labels[None, :]) & ~self_mask
        logits = sim.masked_fill(self_mask, float("-inf"))
        if extra_negatives is not None and extra_negatives.shape[0]:
            logits = torch.cat([logits, za @ extra_negatives.float().T / temperature], dim=1)
        log_denominator = torch.logsumexp(logits, dim=1, keepdim=True)   # max-subtracted internally
        log_prob = sim - log_denominator
        n_pos = pos.sum(dim=1)
        valid = n_pos > 0
        if not bool(valid.any()):
            return z.sum() * 0.0
        mean_log_prob_pos = (log_prob * pos).sum(dim=1)[valid] / n_pos[valid]
        return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def aux_labels(y: torch.Tensor, n_old: int) -> torch.Tensor:
    """Targets of DER's auxiliary classifier (|new| + 1 outputs on the new extractor): every old class -> 0,
    new class c -> c - n_old + 1."""
    return torch.where(y < n_old, torch.zeros_like(y), y - n_old + 1)


def nca_margin_loss(similarities: torch.Tensor, labels: torch.Tensor, margin: float | torch.Tensor = 0.6,
                    scale: float = 1.0,
                    form: str = "paper", reduction: str = "mean") -> torch.Tensor:
    """PODNet's NCA loss on class logits y (the LSC output), positive excluded from the denominator.

    paper: l = [ -log( exp(s (y_y - delta)) / sum_{c != y} exp(s y_c) ) ]_+     (PODNet's LSC loss)
    code:  PODNet's released `nca`: s (y - delta) for every class, the positive's entry zeroed (not removed)
           in the denominator after a max shift, no hinge.
    `scale` s is the outer NCA scale. PODNet's trainer passes its learned eta there, on unscaled y; our LSC
    puts eta inside y, so s = 1 here, and the paper's eta (y_y - delta) is margin = eta * delta. Computed in
    float32; `reduction` "none" gives the per-sample losses (significance needs them)."""
    with torch.autocast(similarities.device.type, enabled=False):
        sims = similarities.float()
        rows = torch.arange(len(sims), device=sims.device)
        positive = torch.zeros_like(sims, dtype=torch.bool)
        positive[rows, labels] = True
        if form == "paper":
            numerator = scale * (sims[rows, labels] - margin)
            others = (scale * sims).masked_fill(positive, float("-inf"))
            losses = F.relu(torch.logsumexp(others, dim=1) - numerator)
        elif form == "code":
            shifted = scale * (sims - margin)
            shifted = shifted - shifted.max(dim=1, keepdim=True).values   # as released (not detached)
            losses = torch.logsumexp(shifted.masked_fill(positive, 0.0), dim=1) - shifted[rows, labels]
        else:
            raise ValueError(f"nca form must be 'paper' or 'code', got {form!r}")
    return losses.mean() if reduction == "mean" else losses


# --- PCR / HPCR (Lin et al., CVPR 2023 / TNNLS) ---------------------------------------------------------------

def batch_class_counts(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """k_c: how often class c occurs in `labels` (a scatter-add, so no host sync on CUDA, unlike bincount)."""
    ones = torch.ones_like(labels, dtype=torch.float32)
    return torch.zeros(classes, device=labels.device).scatter_add_(0, labels, ones)


def pcr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 9: mean over anchors i of -log(exp(o_{i,y_i}) / sum_c k_c exp(o_{i,c})), k_c = count of class c in
    the batch (views included), o = cos(z, w)/tau over all classes [N, C].

    Closed form: log sum_c k_c exp(o_c) = logsumexp_c(o_c + log k_c); log 0 = -inf drops absent classes, whose
    proxies therefore get exactly zero gradient (Theorem 1)."""
    with torch.autocast(logits.device.type, enabled=False):
        logits = logits.float()
        log_k = batch_class_counts(labels, logits.shape[1]).log()
        own = logits.gather(1, labels[:, None]).squeeze(1)
        return (torch.logsumexp(logits + log_k, dim=1) - own).mean()


def pcr_hc_loss(logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 18 with s(N) = 1: anchor-to-proxy plus anchor-to-sample pairs. For anchor i, P = other samples of
    its class, J = every other sample, sim_ij = cos(z_i, z_j)/tau:
        -1/|P| sum_{p in P} log((exp(o_y) + exp(sim_ip)) / (sum_c k_c exp(o_c) + sum_{j in J} exp(sim_ij))).
    An anchor with empty P keeps the numerator exp(o_y) over the same denominator."""
    with torch.autocast(logits.device.type, enabled=False):
        logits, z = logits.float(), F.normalize(features.float(), dim=1)
        n = len(labels)
        eye = torch.eye(n, dtype=torch.bool, device=z.device)
        sim = (z @ z.T / tau).masked_fill(eye, float("-inf"))
        log_k = batch_class_counts(labels, logits.shape[1]).log()
        log_den = torch.logsumexp(torch.cat([logits + log_k, sim], dim=1), dim=1)
        own = logits.gather(1, labels[:, None]).squeeze(1)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        n_pos = pos.sum(1)
        log_num = torch.logaddexp(own[:, None], sim).masked_fill(~pos, 0.0).sum(1)
        log_num = torch.where(n_pos > 0, log_num / n_pos.clamp(min=1), own)
        return (log_den - log_num).mean()


def pcd_loss(current: torch.Tensor, stored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 24 (sign fixed): sum_c k_c (o_c - o*_c)^2 over the memory rows, k_c counted over the whole batch's
    `labels` (views included). Normalised as the code's F.mse_loss(o[:, labels], o*[:, labels]): a mean over
    rows and over the len(labels) selected columns."""
    with torch.autocast(current.device.type, enabled=False):
        k = batch_class_counts(labels, current.shape[1])
        return ((current.float() - stored.float()) ** 2 * k).sum(1).mean() / len(labels)


def scd_loss(current: torch.Tensor, stored: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 25 in the code's direction: the softmax of the stored features' cosine similarities to the other
    rows (self excluded) is the target of the current features' log-softmax:
        mean_i -sum_{j != i} q*_ij log q_ij."""
    with torch.autocast(current.device.type, enabled=False):
        eye = torch.eye(len(current), dtype=torch.bool, device=current.device)

        def log_relations(f):
            f = F.normalize(f.float(), dim=1)
            return F.log_softmax((f @ f.T / tau).masked_fill(eye, float("-inf")), dim=1).masked_fill(eye, 0.0)

        target = log_relations(stored).exp().masked_fill(eye, 0.0)
        return -(target * log_relations(current)).sum(1).mean()


def ht_multiplier(step: int, mode: str = "code", tau: float = 0.09, tau_min: float = 0.05, tau_max: float = 0.16,
                  period: int = 500) -> float:
    """HT's loss multiplier tau / tau(s) at optimiser step s: 0.5625 at s = 0, 1.8 at s = S/2, period S.
    `paper`: tau(s) follows the cosine of eq. 21; `code`: the multiplier itself follows the cosine
    (agents/hpcr.py); `off`: 1."""
    if mode == "off":
        return 1.0
    wave = 0.5 * (1 - math.cos(2 * math.pi * step / period))      # 0 at s = 0, 1 at s = S/2
    if mode == "paper":
        return tau / (tau_max - (tau_max - tau_min) * wave)
    lo, hi = tau / tau_max, tau / tau_min
    return (hi - lo) * wave + lo


# --- class-imbalance weights and balanced objectives (FOSTER, Wang et al., ECCV 2022) -------------------------

def effective_number_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-class weights from the effective number of samples (Cui et al., CVPR 2019), as FOSTER uses them:
    w_c = (1 - beta) / (1 - beta^{n_c}), rescaled so the weights sum to the number of classes. A class with few
    samples (an old class kept as exemplars) gets a large weight. `counts` [C] > 0; float32 result."""
    counts = counts.double()
    if bool((counts <= 0).any()):
        raise ValueError("effective_number_weights: every class needs at least one sample")
    w = (1.0 - beta) / (1.0 - torch.pow(torch.full_like(counts, beta), counts))
    return (w / w.sum() * len(counts)).float()


def logit_adjusted_ce(logits: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits divided column-wise by per-class weights, CE(o / w, y): FOSTER's
    logits-adjusted loss for the old/new imbalance of boosting (w from effective_number_weights; a large w
    shrinks that class's logit during training, so the model learns to score it higher). Float32."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float() / class_weights.float(), labels)


def balanced_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                class_weights: torch.Tensor) -> torch.Tensor:
    """FOSTER's balanced distillation: the teacher's softened distribution re-weighted per class and
    renormalised, p_c = w_c softmax(t/T)_c / sum_k w_k softmax(t/T)_k, then -(1/B) sum_b sum_c p_c
    log_softmax(s/T)_c. With all w equal it is kd_soft_ce. Float32."""
    with torch.autocast(student_logits.device.type, enabled=False):
        target = F.softmax(teacher_logits.float() / temperature, dim=1) * class_weights.float()
        target = target / target.sum(dim=1, keepdim=True)
        return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(dim=1).mean()
