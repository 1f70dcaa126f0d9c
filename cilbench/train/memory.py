"""Exemplar memory: herding or random selection under a fixed total or per-class budget, and a reservoir
buffer (with per-entry payload) for the online regime.

Offline memory stores, per class, the indices of its selected samples in selection order. The order is
computed once, when the class is new; a shrinking quota keeps the first m (iCaRL/PyCIL/DER truncation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from cilbench.data.protocol import MemoryConfig


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


@dataclass
class ReplayBatch:
    """Drawn memory entries: train-split indices, labels, and the payload stored with each entry."""
    idx: torch.Tensor
    labels: torch.Tensor
    payload: dict[str, torch.Tensor] = field(default_factory=dict)


class ExemplarMemory:
    """Offline exemplar memory, filled by the harness after each task."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg
        self.order: dict[int, torch.Tensor] = {}   # label -> train-split indices, selection order
        self.quota = 0
        # key -> label -> per-exemplar payload aligned with order[label] (HPCR offline: logits, features)
        self.payload: dict[str, dict[int, torch.Tensor]] = {}
        self._flat: dict = {}     # payload keys -> (indices, labels, payload) while the memory is unchanged

    def per_class(self, n_seen: int) -> int:
        if self.cfg.policy == "fixed_total":
            return self.cfg.total // n_seen   # the remainder stays unused, as in DER/PyCIL
        return self.cfg.per_class

    def update(self, labels: range, class_indices: Callable[[int], torch.Tensor],
               features: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator) -> None:
        """Select exemplars for the new classes `labels`, then shrink every class to the new quota."""
        self.quota = self.per_class(labels.stop)
        self._flat = {}
        for label in labels:
            self.order[label] = self._select(class_indices(label), features, generator, self.quota)

    def _select(self, idx: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor],
                generator: torch.Generator, m: int) -> torch.Tensor:
        """The first m of a class's samples `idx` in this memory's selection order."""
        if self.cfg.selection == "herding":
            return idx[herding(features(idx), m).to(idx.device)]
        return idx[torch.randperm(len(idx), generator=generator)[:m].to(idx.device)]

    def holds(self, labels: range) -> bool:
        """Whether `labels` were already selected (a method selected them during learn())."""
        return all(label in self.order for label in labels)

    def preview(self, labels: range, class_indices: Callable[[int], torch.Tensor],
                features: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The indices `update(labels, ...)` would keep with these `features`, without changing the memory:
        the new classes selected now, every class cut to the new quota (old ones in their selection order)."""
        quota = self.per_class(labels.stop)
        kept = [self.order[c][:quota] for c in sorted(self.order) if c not in labels]
        kept += [self._select(class_indices(label), features, generator, quota) for label in labels]
        if not kept:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat(kept)

    def class_exemplars(self, label: int) -> torch.Tensor:
        return self.order[label][: self.quota]

    def classes(self) -> list[int]:
        """Labels that have exemplars, ascending."""
        return sorted(self.order)

    def indices(self) -> torch.Tensor:
        if not self.order:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([self.class_exemplars(c) for c in sorted(self.order)])

    def exemplar_labels(self) -> torch.Tensor:
        """The label of every kept exemplar, aligned with `indices()`."""
        if not self.order:
            return torch.empty(0, dtype=torch.int64)
        return torch.cat([torch.full((len(self.class_exemplars(c)),), c, dtype=torch.int64,
                                     device=self.order[c].device) for c in sorted(self.order)])

    def draw(self, n: int, generator: torch.Generator, payload: tuple[str, ...] = ()) -> ReplayBatch | None:
        """n kept exemplars drawn uniformly without replacement (None while empty), with the payload `keys`."""
        if not len(self):
            return None
        if payload not in self._flat:   # a replay batch per training step: concatenate once per memory state
            self._flat[payload] = (self.indices(), self.exemplar_labels(), {k: self.payload_tensor(k) for k in payload})
        idx, labels, stored = self._flat[payload]
        pos = torch.randperm(len(idx), generator=generator, device=generator.device)[:n].to(idx.device)
        return ReplayBatch(idx[pos], labels[pos], {k: v[pos.to(v.device)] for k, v in stored.items()})

    def __len__(self) -> int:
        return sum(min(len(v), self.quota) for v in self.order.values())

    def write_payload(self, label: int, values: dict[str, torch.Tensor]) -> None:
        """Payload of a class's exemplars in selection order, written once when the class is selected;
        shrinking the quota truncates it together with the exemplars."""
        for key, value in values.items():
            self.payload.setdefault(key, {})[label] = value.detach()
        self._flat = {}

    def labels_without(self, key: str) -> list[int]:
        return [c for c in sorted(self.order) if c not in self.payload.get(key, {})]

    def payload_tensor(self, key: str) -> torch.Tensor:
        """The payload `key` of every kept exemplar, aligned with `indices()`."""
        return torch.cat([self.payload[key][c][: self.quota] for c in sorted(self.order)])

    def payload_nbytes(self) -> int:
        return sum(min(len(v), self.quota) * v.element_size() * v[0].numel()
                   for per_label in self.payload.values() for v in per_label.values())

    def nbytes(self, bytes_per_sample: int) -> int:
        return len(self) * bytes_per_sample + self.payload_nbytes()

    def state_dict(self) -> dict:
        return {"quota": self.quota, "labels": sorted(self.order),
                "order": [self.order[c].cpu() for c in sorted(self.order)],
                "payload": {k: {"labels": sorted(v), "values": [v[c].cpu() for c in sorted(v)]}
                            for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict, device) -> None:
        self.quota = state["quota"]
        self.order = {c: idx.to(device) for c, idx in zip(state["labels"], state["order"])}
        self._flat = {}
        self.payload = {k: {c: v.to(device) for c, v in zip(p["labels"], p["values"])}
                        for k, p in state.get("payload", {}).items()}


class ReservoirMemory:
    """Reservoir sampling over the stream (Vitter's algorithm R): after n samples, each is kept with
    probability size/n. Entries carry an index into the train split, its label, and optional payload
    tensors (stored logits, features, ...) registered on first use.

    Everything lives in preallocated device tensors with one spare row: `add` is a few vectorised ops with no
    host sync (the fill level is a function of the host-side count `seen`), and a draw that keeps nothing is
    written to the spare row instead of being filtered out."""

    def __init__(self, size: int, device):
        self.size = size
        self.device = device
        self._idx = torch.zeros(size + 1, dtype=torch.int64, device=device)
        self._labels = torch.zeros(size + 1, dtype=torch.int64, device=device)
        self._payload: dict[str, torch.Tensor] = {}
        self.seen = 0

    def __len__(self) -> int:
        return min(self.seen, self.size)

    @property
    def idx(self) -> torch.Tensor:
        return self._idx[: len(self)]

    @property
    def labels(self) -> torch.Tensor:
        return self._labels[: len(self)]

    @property
    def payload(self) -> dict[str, torch.Tensor]:
        return {k: v[: len(self)] for k, v in self._payload.items()}

    def slots_for(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Buffer slot of each of the next n stream samples (`size` = not kept), as the sequential algorithm
        assigns them: sample number s (1-based) fills slot s-1 while the buffer fills, then replaces slot
        j = floor(u * s) when j < size. Of several samples sent to one slot only the last is kept."""
        number = torch.arange(self.seen + 1, self.seen + n + 1, device=generator.device, dtype=torch.float64)
        u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
        draw = torch.floor(u * number).long()
        slot = torch.where(number <= self.size, number.long() - 1, draw).clamp(max=self.size)
        order = torch.arange(n, device=slot.device)
        overwritten = ((slot[:, None] == slot[None, :]) & (order[None, :] > order[:, None])).any(dim=1)
        return torch.where(overwritten, self.size, slot).to(self.device)

    def add(self, idx: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
            payload: dict[str, torch.Tensor] | None = None) -> None:
        payload = payload or {}
        slot = self.slots_for(len(idx), generator)
        self.seen += len(idx)
        self._idx[slot] = idx.to(self.device)
        self._labels[slot] = labels.to(self.device)
        for key, value in payload.items():
            if key not in self._payload:   # entries stored before this key appeared hold zeros
                self._payload[key] = torch.zeros((self.size + 1, *value.shape[1:]), dtype=value.dtype,
                                                 device=self.device)
            store = self._payload[key]
            store[slot] = value.detach().to(self.device, store.dtype)

    def sample(self, n: int, generator: torch.Generator):
        """A random batch (without replacement) of buffer positions, or None while the buffer is empty."""
        if not len(self):
            return None
        return torch.randperm(len(self), generator=generator, device=generator.device)[:n].to(self.device)

    def draw(self, n: int, generator: torch.Generator, payload: tuple[str, ...] | None = None) -> ReplayBatch | None:
        """n entries drawn uniformly without replacement (None while empty), with their payload (all keys
        unless `payload` names some)."""
        pos = self.sample(n, generator)
        if pos is None:
            return None
        stored = self.payload if payload is None else {k: self.payload[k] for k in payload}
        return ReplayBatch(self.idx[pos], self.labels[pos], {k: v[pos] for k, v in stored.items()})

    def indices(self) -> torch.Tensor:
        return self.idx

    def payload_nbytes(self) -> int:
        return len(self) * sum(v.element_size() * v[0].numel() for v in self._payload.values())

    def nbytes(self, bytes_per_sample: int) -> int:
        return len(self) * (bytes_per_sample + 16) + self.payload_nbytes()

    def state_dict(self) -> dict:
        return {"idx": self.idx.cpu(), "labels": self.labels.cpu(), "seen": self.seen,
                "payload": {k: v.cpu() for k, v in self.payload.items()}}

    def load_state_dict(self, state: dict, device) -> None:
        self.device = device
        self.seen = state["seen"]
        n = len(state["idx"])
        self._idx = torch.zeros(self.size + 1, dtype=torch.int64, device=device)
        self._labels = torch.zeros(self.size + 1, dtype=torch.int64, device=device)
        self._idx[:n], self._labels[:n] = state["idx"].to(device), state["labels"].to(device)
        self._payload = {}
        for key, value in state["payload"].items():
            self._payload[key] = torch.zeros((self.size + 1, *value.shape[1:]), dtype=value.dtype, device=device)
            self._payload[key][:n] = value.to(device)


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
