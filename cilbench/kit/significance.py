"""Class-wise feature significance (EXACFS, Balasubramanian et al. 2024, Eqs. 1-3 and Algorithm 1).

- `class_gradient_significance`: S_j^c = mean over the samples of class c of (spatial mean of
  d l_k / d f_j)^2, per channel, for every stage map f_j. Per-sample gradients come from one
  `autograd.grad` of the summed per-sample losses per batch (in eval mode a sample's loss depends on its own
  maps only, so the gradient of the sum w.r.t. its maps is its own gradient). Always float32.
- `normalise_significance`: Algorithm 1's normalisation (across classes per channel by default).
- `ema_significance`: Eq. 2's ageing; classes new at this task start at their own value.
- `significance_weights` and `significance_distillation`: Eq. 3's per-sample, per-channel weighted squared
  change of Frobenius-normalised stage maps between the previous and the current model.
"""
from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch

from cilbench.train.engine import full_precision

SigNorm = Literal["across_classes", "across_channels", "mean_one"]
FeatureNorm = Literal["stage", "channel"]

# forward(x) -> (stage maps [B, d_j, h_j, w_j] ..., similarities or logits); loss(out, y) -> per-sample losses
StageForward = Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]
PerSampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_gradient_significance(forward: StageForward, loss: PerSampleLoss,
                                batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                                n_classes: int) -> list[torch.Tensor]:
    """Per stage j, a [n_classes, d_j] tensor: Eq. 1 (the mean over the class's samples; Algorithm 1's sums
    would make 20-exemplar classes ~25x smaller than 500-sample ones). Classes without samples get zeros.
    The caller puts the network in eval mode; autocast is off here so the statistics are float32."""
    sums: list[torch.Tensor] | None = None
    counts = None
    with torch.enable_grad():
        for x, y in batches:
            with full_precision(x.device):
                maps, out = forward(x.float())
                grads = torch.autograd.grad(loss(out, y).sum(), maps)
            if sums is None:
                sums = [torch.zeros(n_classes, g.shape[1], device=g.device) for g in grads]
                counts = torch.zeros(n_classes, device=y.device)
            for s, g in zip(sums, grads):
                s.index_add_(0, y, g.float().mean(dim=(2, 3)) ** 2)
            counts.index_add_(0, y, torch.ones(len(y), device=y.device))
    if sums is None:
        raise ValueError("class_gradient_significance: no batches")
    return [s / counts.clamp_min(1)[:, None] for s in sums]


def normalise_significance(sig: list[torch.Tensor], mode: SigNorm = "across_classes") -> list[torch.Tensor]:
    """across_classes: each channel's values over the classes sum to 1 (Algorithm 1, literal reading);
    across_channels: each class's vector sums to 1; mean_one: each class's vector has mean 1 (then a new
    class's fixed weight 1 is the uniform weighting)."""
    out = []
    for s in sig:
        if mode == "across_classes":
            out.append(s / s.sum(dim=0, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny))
        elif mode == "across_channels":
            out.append(s / s.sum(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny))
        elif mode == "mean_one":
            out.append(s / s.mean(dim=1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny))
        else:
            raise ValueError(f"unknown significance normalisation {mode!r}")
    return out


def ema_significance(previous: list[torch.Tensor] | None, current: list[torch.Tensor],
                     beta: float = 0.4) -> list[torch.Tensor]:
    """Eq. 2: S~^{t,c} = beta S~^{t-1,c} + (1 - beta) S^{t,c} for the classes of `previous` (its rows);
    the rows after them (classes new at t) take S^{t,c}."""
    if previous is None:
        return [c.clone() for c in current]
    out = []
    for p, c in zip(previous, current):
        aged = c.clone()
        aged[: len(p)] = beta * p.to(c.device) + (1 - beta) * c[: len(p)]
        out.append(aged)
    return out


def significance_weights(sig: list[torch.Tensor], labels: torch.Tensor, n_old: int,
                         new_value: float = 1.0) -> list[torch.Tensor]:
    """Per stage, the [B, d_j] weight of each sample's channels: S~^{t-1, y} for old-class samples
    (labels < n_old) and `new_value` for new-class ones (the paper fixes 1; 0 = exemplars only)."""
    old = labels < n_old
    weights = []
    for s in sig:
        w = torch.full((len(labels), s.shape[1]), float(new_value), device=s.device)
        w[old] = s[labels[old]]
        weights.append(w)
    return weights


def normalise_maps(f: torch.Tensor, mode: FeatureNorm = "stage") -> torch.Tensor:
    """Frobenius normalisation (PODNet's heuristic): of each sample's whole stage tensor, or of each
    channel's h x w map."""
    f = f.float()
    if mode == "stage":
        return f / f.flatten(1).norm(dim=1).clamp_min(1e-8)[:, None, None, None]
    return f / f.flatten(2).norm(dim=2).clamp_min(1e-8)[:, :, None, None]


def significance_distillation(new_maps: list[torch.Tensor], old_maps: list[torch.Tensor],
                              weights: list[torch.Tensor], feature_norm: FeatureNorm = "stage") -> torch.Tensor:
    """Per-sample sum over stages j and channels q of w_jq * ||f_jq^t - f_jq^{t-1}||_F^2 on normalised maps
    (Eq. 3 before the batch average): a [B] tensor, float32."""
    total = None
    for f_new, f_old, w in zip(new_maps, old_maps, weights):
        delta = ((normalise_maps(f_new, feature_norm) - normalise_maps(f_old, feature_norm)) ** 2).sum(dim=(2, 3))
        term = (w * delta).sum(dim=1)
        total = term if total is None else total + term
    return total


def significance_summary(sig: list[torch.Tensor]) -> dict:
    """How peaked the significance is per class. Per stage, over the classes with any significance: the mean
    of the largest channel's share of the class vector, of the normalised entropy (1 = uniform over
    channels) and of the share of the top 10% channels; and how many classes have none at all (every sample
    past the NCA hinge, so a zero gradient)."""
    stats = []
    for s in sig:
        totals = s.sum(dim=1, keepdim=True)
        live = totals.flatten() > 0
        p = (s / totals.clamp_min(torch.finfo(s.dtype).tiny))[live]
        d = s.shape[1]
        entry = {"channels": d, "classes": len(s), "zero_classes": int((~live).sum())}
        if len(p):
            entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=1) / torch.log(torch.tensor(float(d)))
            top = max(1, d // 10)
            entry.update(max_share=round(float(p.max(dim=1).values.mean()), 4),
                         entropy=round(float(entropy.mean()), 4),
                         top10pct_share=round(float(p.topk(top, dim=1).values.sum(dim=1).mean()), 4))
        stats.append(entry)
    return {"stages": stats}


def uniform_like(sig: list[torch.Tensor]) -> list[torch.Tensor]:
    """The uniform-significance ablation: every class and channel of a stage gets that stage's mean weight
    (same total weight as `sig`, no class or channel selectivity)."""
    return [torch.full_like(s, float(s.mean())) for s in sig]


__all__ = ["class_gradient_significance", "normalise_significance", "ema_significance", "significance_weights",
           "normalise_maps", "significance_distillation", "significance_summary", "uniform_like"]
