"""The stream of tasks: the only place that knows the class order.

Labels are remapped so that the k-th class of the order gets label k; task t then owns a contiguous label
range. The images of the used classes are kept once, as uint8 tensors on the device (or host), and tasks
are index sets into them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cilbench.data.datasets import Dataset, Split
from cilbench.data.protocol import Protocol, resolve_class_order


@dataclass
class Task:
    index: int                  # 0-based task index
    classes: range              # new labels of this task
    class_ids: list[int]        # the same classes as original dataset ids
    train_idx: torch.Tensor     # indices into stream.train of this task's new-class samples
    test_idx: torch.Tensor      # indices into stream.test of all classes seen so far

    @property
    def n_old(self) -> int:
        """Number of classes learned before this task."""
        return self.classes.start

    @property
    def n_seen(self) -> int:
        return self.classes.stop

    @property
    def n_new(self) -> int:
        return len(self.classes)


class Stream:
    def __init__(self, protocol: Protocol, dataset: Dataset, device: torch.device):
        self.protocol = protocol
        self.order = resolve_class_order(protocol.class_order, protocol.num_classes, dataset.num_classes)
        storage = device if protocol.data.resident == "device" else torch.device("cpu")
        self.train = self._remap(dataset.train, storage)
        self.test = self._remap(dataset.test, storage)
        self.task_sizes = protocol.task_sizes
        bounds = [0]
        for size in self.task_sizes:
            bounds.append(bounds[-1] + size)
        self.bounds = bounds
        # task id of every label, for the accuracy matrix
        self.task_of_label = torch.repeat_interleave(torch.arange(len(self.task_sizes)),
                                                     torch.tensor(self.task_sizes))
        empty = [c for c in range(protocol.num_classes) if not bool((self.train.labels == c).any())]
        if empty:
            from cilbench.errors import UserError
            raise UserError(f"{protocol.name}: class ids {[self.order[c] for c in empty]} of the class order "
                            f"have no training samples in {dataset.name}")

    def _remap(self, split: Split, storage: torch.device) -> Split:
        # sized for the order too: a class of the order may be absent from this split (a partial copy)
        size = max(int(split.labels.max()) if len(split.labels) else -1, max(self.order)) + 1
        lookup = torch.full((size,), -1, dtype=torch.int64)
        lookup[torch.tensor(self.order)] = torch.arange(len(self.order))
        labels = lookup[split.labels]
        keep = labels >= 0
        return Split(split.images[keep].contiguous().to(storage), labels[keep].to(storage))

    @property
    def num_tasks(self) -> int:
        return len(self.task_sizes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    def task(self, t: int) -> Task:
        lo, hi = self.bounds[t], self.bounds[t + 1]
        train_idx = torch.nonzero((self.train.labels >= lo) & (self.train.labels < hi)).flatten()
        test_idx = torch.nonzero(self.test.labels < hi).flatten()
        return Task(t, range(lo, hi), self.order[lo:hi], train_idx, test_idx)

    def __iter__(self):
        return (self.task(t) for t in range(self.num_tasks))

    def class_indices(self, label: int) -> torch.Tensor:
        return torch.nonzero(self.train.labels == label).flatten()
