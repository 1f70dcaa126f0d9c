"""CIL metrics from per-step accuracies and the accuracy matrix (DESIGN.md section 8).

a[i][j] is the accuracy on task j's test samples after learning task i (prediction over all seen classes),
defined for j <= i. A_i is the top-1 accuracy after task i over all seen classes' test samples.
"""
from __future__ import annotations

import math


def average_incremental(acc: list[float]) -> float:
    """(1/T) sum_i A_i, base step included."""
    return sum(acc) / len(acc)


def bwt(a: list[list[float]]) -> float | None:
    """(1/(T-1)) sum_{j<T} (a[T][j] - a[j][j]); None for a single task."""
    T = len(a)
    if T < 2:
        return None
    return sum(a[T - 1][j] - a[j][j] for j in range(T - 1)) / (T - 1)


def forgetting(a: list[list[float]]) -> float | None:
    """(1/(T-1)) sum_{j<T} (max_{i<T} a[i][j] - a[T][j]); None for a single task."""
    T = len(a)
    if T < 2:
        return None
    return sum(max(a[i][j] for i in range(j, T - 1)) - a[T - 1][j] for j in range(T - 1)) / (T - 1)


def task_mean(a: list[list[float]]) -> list[float]:
    """Per step, the mean over seen tasks of a[i][j] (FACIL's task-averaged accuracy, HPCR's metric)."""
    return [sum(row[: i + 1]) / (i + 1) for i, row in enumerate(a)]


def summarize(top1: list[float], top5: list[float], a: list[list[float]], a5: list[list[float]]) -> dict:
    """Every summary number a run reports (percentages in, percentages out)."""
    if not top1:
        raise ValueError("no finished steps to summarize")
    tm = task_mean(a)
    return {
        "steps": len(top1),
        "avg_acc": average_incremental(top1),
        "last_acc": top1[-1],
        "bwt": bwt(a),
        "forgetting": forgetting(a),
        "avg_acc_top5": average_incremental(top5),
        "last_acc_top5": top5[-1],
        "bwt_top5": bwt(a5),
        "forgetting_top5": forgetting(a5),
        "avg_acc_task_mean": average_incremental(tm),
        "last_acc_task_mean": tm[-1],
    }


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
