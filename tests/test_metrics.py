"""Metrics on hand-computed accuracy matrices (DESIGN.md section 8)."""
from __future__ import annotations

import pytest

from cilbench.run.metrics import average_incremental, bwt, forgetting, summarize, task_mean

# a[i][j]: accuracy on task j's classes after learning task i (j <= i)
A3 = [[90.0],
      [70.0, 80.0],
      [50.0, 60.0, 70.0]]
TOP1_3 = [90.0, 75.0, 60.0]


def test_average_incremental_includes_the_base_step():
    assert average_incremental([90.0, 75.0, 60.0]) == pytest.approx(75.0)
    # leaving out the base step would give 67.5
    assert average_incremental([100.0, 50.0]) == pytest.approx(75.0)


def test_bwt_on_hand_matrix():
    # ((50 - 90) + (60 - 80)) / 2
    assert bwt(A3) == pytest.approx(-30.0)


def test_forgetting_on_hand_matrix():
    # ((max(90, 70) - 50) + (max(80) - 60)) / 2
    assert forgetting(A3) == pytest.approx(30.0)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    a = [[60.0],
         [80.0, 50.0],
         [70.0, 40.0, 90.0]]
    # task 0 peaked after task 1 (80), not right after learning it (60)
    assert forgetting(a) == pytest.approx(((80 - 70) + (50 - 40)) / 2)   # 10
    assert bwt(a) == pytest.approx(((70 - 60) + (40 - 50)) / 2)          # 0


def test_forgetting_max_excludes_the_last_row():
    # the final accuracy is above every earlier one: forgetting is negative, not clipped at zero
    a = [[50.0],
         [60.0, 70.0]]
    assert forgetting(a) == pytest.approx(-10.0)
    assert bwt(a) == pytest.approx(10.0)


def test_task_mean_rows():
    assert task_mean(A3) == pytest.approx([90.0, 75.0, 60.0])
    assert task_mean([[100.0], [0.0, 50.0]]) == pytest.approx([100.0, 25.0])


def test_single_task_has_no_bwt_or_forgetting():
    assert bwt([[80.0]]) is None
    assert forgetting([[80.0]]) is None
    m = summarize([80.0], [95.0], [[80.0]], [[95.0]])
    assert m["steps"] == 1
    assert m["avg_acc"] == m["last_acc"] == pytest.approx(80.0)
    assert m["avg_acc_top5"] == m["last_acc_top5"] == pytest.approx(95.0)
    assert m["bwt"] is None and m["forgetting"] is None
    assert m["bwt_top5"] is None and m["forgetting_top5"] is None


def test_summarize_all_variants():
    a5 = [[100.0],
          [90.0, 95.0],
          [80.0, 85.0, 99.0]]
    top5 = [100.0, 92.0, 88.0]
    # sample-weighted A_i differ from the task mean of the row (unequal test-set sizes)
    top1 = [90.0, 74.0, 62.0]
    m = summarize(top1, top5, A3, a5)
    assert m["steps"] == 3
    assert m["avg_acc"] == pytest.approx(sum(top1) / 3)
    assert m["last_acc"] == pytest.approx(62.0)
    assert m["bwt"] == pytest.approx(-30.0)
    assert m["forgetting"] == pytest.approx(30.0)
    assert m["avg_acc_top5"] == pytest.approx((100 + 92 + 88) / 3)
    assert m["last_acc_top5"] == pytest.approx(88.0)
    assert m["bwt_top5"] == pytest.approx(((80 - 100) + (85 - 95)) / 2)          # -15
    assert m["forgetting_top5"] == pytest.approx(((100 - 80) + (95 - 85)) / 2)   # 15
    assert m["avg_acc_task_mean"] == pytest.approx((90 + 75 + 60) / 3)
    assert m["last_acc_task_mean"] == pytest.approx(60.0)


def test_summarize_refuses_an_empty_run():
    with pytest.raises(ValueError):
        summarize([], [], [], [])
