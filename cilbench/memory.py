"""Exemplar memory: herding or random selection under a fixed total or per-class budget, and a reservoir
buffer (with per-entry payload) for the online regime.

Offline memory stores, per class, the indices of its selected samples in selection order. The order is
computed once, when the class is new; a shrinking quota keeps the first m (iCaRL/PyCIL/DER truncation).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .protocol import MemoryConfig


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """iCaRL herding on L2-normalised features: positions (into `features`) in selection order.

    Step k picks the sample whose addition brings the mean of the chosen set closest to the class mean;
    each sample is chosen at most once.
    """
    feats = F.normalize(features.float(), dim=1)
    mu = feats.mean(0)
    m = min(m, len(feats))
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(feats), dtype=torch.bool, device=feats.device)
    for k in range(1, m + 1):
        dist = torch.linalg.vector_norm(mu[None] - (running[None] + feats) / k, dim=1)
        dist[~available] = float("inf")
        i = int(torch.argmin(dist))
        chosen.append(i)
        available[i] = False
        running += feats[i]
    return torch.tensor(chosen, dtype=torch.int64)


class ExemplarMemory:
    """Offline exemplar memory, filled by the harness after each task."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg
        self.order: dict[int, torch.Tensor] = {}   # label -> train-split indices, selection order
        self.quota = 0

    def per_class(self, n_seen: int) -> int:
        if self.cfg.policy == "fixed_total":
            return self.cfg.total // n_seen   # the remainder stays unused, as in DER/PyCIL
        return self.cfg.per_class

    def update(self, labels: range, class_indices: Callable[[int], torch.Tensor],
               features: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator) -> None:
        """Select exemplars for the new classes `labels`, then shrink every class to the new quota."""
        self.quota = self.per_class(labels.stop)
        for label in labels:
            idx = class_indices(label)
            if self.cfg.selection == "herding":
                picks = herding(features(idx), self.quota).to(idx.device)
            else:
                picks = torch.randperm(len(idx), generator=generator)[: self.quota].to(idx.device)
            self.order[label] = idx[picks]

    def class_exemplars(self, label: int) -> torch.Tensor:
        return self.order[label][: self.quota]

    def indices(self) -> torch.Tensor:
        if not self.order:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([self.class_exemplars(c) for c in sorted(self.order)])

    def __len__(self) -> int:
        return sum(min(len(v), self.quota) for v in self.order.values())

    def nbytes(self, bytes_per_sample: int) -> int:
        return len(self) * bytes_per_sample

    def state_dict(self) -> dict:
        return {"quota": self.quota, "labels": sorted(self.order),
                "order": [self.order[c].cpu() for c in sorted(self.order)]}

    def load_state_dict(self, state: dict, device) -> None:
        self.quota = state["quota"]
        self.order = {c: idx.to(device) for c, idx in zip(state["labels"], state["order"])}


class ReservoirMemory:
    """Reservoir sampling over the stream (Vitter's algorithm R): after n samples, each is kept with
    probability size/n. Entries carry an index into the train split, its label, and optional payload
    tensors (stored logits, features, ...) registered on first use."""

    def __init__(self, size: int, device):
        self.size = size
        self.device = device
        self.idx = torch.empty(0, dtype=torch.int64, device=device)
        self.labels = torch.empty(0, dtype=torch.int64, device=device)
        self.payload: dict[str, torch.Tensor] = {}
        self.seen = 0

    def __len__(self) -> int:
        return len(self.idx)

    def add(self, idx: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
            payload: dict[str, torch.Tensor] | None = None) -> None:
        payload = payload or {}
        slots, sources = [], []
        filled = len(self.idx)
        draws = torch.rand(len(idx), generator=generator).tolist()
        for i, u in enumerate(draws):
            self.seen += 1
            if filled < self.size:
                slots.append(filled)
                filled += 1
                sources.append(i)
            else:
                j = int(u * self.seen)
                if j < self.size:
                    slots.append(j)
                    sources.append(i)
        if not slots:
            return
        grow = filled - len(self.idx)
        if grow:
            self.idx = torch.cat([self.idx, torch.zeros(grow, dtype=torch.int64, device=self.device)])
            self.labels = torch.cat([self.labels, torch.zeros(grow, dtype=torch.int64, device=self.device)])
        # every payload tensor (registered earlier or first seen now) spans the whole buffer
        for key in [*self.payload, *(k for k in payload if k not in self.payload)]:
            ref = payload[key] if key in payload else self.payload[key]
            old = self.payload.get(key)
            have = 0 if old is None else len(old)
            if have < filled:
                pad = torch.zeros((filled - have, *ref.shape[1:]), dtype=ref.dtype, device=self.device)
                self.payload[key] = pad if old is None else torch.cat([old, pad])
        # later samples overwrite earlier ones in the same slot, as the sequential algorithm does
        last = {s: src for s, src in zip(slots, sources)}
        slot_t = torch.tensor(list(last), dtype=torch.int64, device=self.device)
        src_t = torch.tensor(list(last.values()), dtype=torch.int64, device=idx.device)
        self.idx[slot_t] = idx[src_t].to(self.device)
        self.labels[slot_t] = labels[src_t].to(self.device)
        for key, value in payload.items():
            store = self.payload[key]
            store[slot_t] = value[src_t].detach().to(self.device, store.dtype)

    def sample(self, n: int, generator: torch.Generator):
        """A random batch (without replacement) of buffer positions, or None while the buffer is empty."""
        if not len(self.idx):
            return None
        pos = torch.randperm(len(self.idx), generator=generator)[:n].to(self.device)
        return pos

    def indices(self) -> torch.Tensor:
        return self.idx

    def nbytes(self, bytes_per_sample: int) -> int:
        extra = sum(v.element_size() * v[0].numel() for v in self.payload.values()) if len(self) else 0
        return len(self) * (bytes_per_sample + 16 + extra)

    def state_dict(self) -> dict:
        return {"idx": self.idx.cpu(), "labels": self.labels.cpu(), "seen": self.seen,
                "payload": {k: v.cpu() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict, device) -> None:
        self.idx, self.labels = state["idx"].to(device), state["labels"].to(device)
        self.seen = state["seen"]
        self.payload = {k: v.to(device) for k, v in state["payload"].items()}


def make_memory(cfg: MemoryConfig, device) -> ExemplarMemory | ReservoirMemory | None:
    if cfg.policy == "none":
        return None
    if cfg.policy == "reservoir":
        return ReservoirMemory(cfg.size, device)
    return ExemplarMemory(cfg)


def class_balanced_subset(indices: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                          per_class: int | None = None) -> torch.Tensor:
    """Subsample `indices` (with their `labels`) without replacement to the same count per class: the
    smallest class count unless `per_class` is given (DER / EEIL balanced fine-tuning)."""
    classes, counts = torch.unique(labels, return_counts=True)
    take = int(counts.min()) if per_class is None else per_class
    picks = []
    for c in classes.tolist():
        members = indices[labels == c]
        order = torch.randperm(len(members), generator=generator)[:take].to(members.device)
        picks.append(members[order])
    return torch.cat(picks)
