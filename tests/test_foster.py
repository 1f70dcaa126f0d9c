"""FOSTER (Wang et al., ECCV 2022): the kit's losses on hand-computed tensors, boosting's frozen old model, the
compressed single extractor, and a CLI run on the digits card."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from cilbench.methods.foster import FOSTER, FOSTERConfig
from harness import assert_same_state, learn_and_remember, state_of, tiny_card, tiny_context
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.config import build
from cilbench.errors import UserError
from cilbench.kit import (
    ExtractorStack,
    balanced_kd,
    count_params,
    effective_number_weights,
    is_frozen,
    kd_soft_ce,
    logit_adjusted_ce,
    weight_align,
)

CARD = tiny_card(name="tiny_foster")


def foster(ctx, **options):
    return FOSTER(build(FOSTERConfig, options, "test"), ctx)


# --- the kit's pieces on hand-computed tensors ------------------------------------------------------------

def test_effective_number_weights_by_hand():
    # beta 0.5: (1 - .5) / (1 - .5^1) = 1, (1 - .5) / (1 - .5^2) = 2/3; rescaled to sum 2: 1.2, 0.8
    w = effective_number_weights(torch.tensor([1, 2]), 0.5)
    assert torch.allclose(w, torch.tensor([1.2, 0.8]))
    assert math.isclose(float(effective_number_weights(torch.tensor([20, 20, 500]), 0.97).sum()), 3, rel_tol=1e-6)
    with pytest.raises(ValueError):
        effective_number_weights(torch.tensor([0, 3]), 0.9)


def test_logit_adjusted_ce_by_hand():
    # logits [2, 1] / w [1, 2] = [2, 0.5]; label 0: -log(e^2 / (e^2 + e^0.5)) = log(1 + e^-1.5)
    loss = logit_adjusted_ce(torch.tensor([[2.0, 1.0]]), torch.tensor([0]), torch.tensor([1.0, 2.0]))
    assert math.isclose(float(loss), math.log(1 + math.exp(-1.5)), rel_tol=1e-6)
    # unit weights: plain cross-entropy
    logits, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    assert torch.allclose(logit_adjusted_ce(logits, y, torch.ones(4)), torch.nn.functional.cross_entropy(logits, y))


def test_balanced_kd_by_hand():
    # teacher [0, 0] at T = 1 -> [.5, .5]; weights [1, 3] -> target [.25, .75]; student [0, ln 3] -> log [.25, .75]
    loss = balanced_kd(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]]), 1.0, torch.tensor([1.0, 3.0]))
    assert math.isclose(float(loss), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel_tol=1e-6)
    s, t = torch.randn(6, 5), torch.randn(6, 5)
    assert torch.allclose(balanced_kd(s, t, 2.0, torch.full((5,), 0.7)), kd_soft_ce(s, t, 2.0))


def test_weight_align_by_hand():
    head = torch.nn.Linear(2, 3, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 5.0], [0.0, 2.5]]))   # old norms 5, 5; new 2.5
    bias = head.bias.detach().clone()
    assert math.isclose(weight_align(head, 2), 2.0, rel_tol=1e-6)
    assert torch.allclose(head.weight[2], torch.tensor([0.0, 5.0])) and torch.equal(head.bias, bias)
    assert weight_align(head, 0) == 1.0


# --- the method ------------------------------------------------------------------------------------------

def test_boosting_keeps_the_old_model_bit_identical_and_trains_the_rest():
    ctx, stream, engine, memory = tiny_context(CARD)
    method = foster(ctx, init_epochs=1, boosting_epochs=1, compression_epochs=1, oofc="az")
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    old_extractor, old_head = state_of(method.backbone), state_of(method.head)
    assert any("running_mean" in k for k in old_extractor)
    task = stream.task(1)
    engine.begin_task(0, 1)
    stack, head, _ = method.boost(task, ctx, method.class_counts(task))
    assert stack.extractors[0] is method.backbone and len(stack) == 2
    assert_same_state(old_extractor, stack.extractors[0])
    assert_same_state(old_head, method.head)
    new = stack.extractors[1].state_dict()
    assert any(not torch.equal(v, new[k]) for k, v in old_extractor.items() if v.is_floating_point())
    old_dim = stack.dims[0]
    assert head.weight.shape == (4, 2 * old_dim)
    assert torch.count_nonzero(head.weight[2:, :old_dim]) == 0                  # oofc az: still 0 after training
    assert torch.count_nonzero(head.weight[2:, old_dim:]) > 0
    assert is_frozen(stack) and is_frozen(head)                                  # the teacher, for compression


def test_compression_leaves_one_extractor_and_drops_the_teacher():
    ctx, stream, engine, memory = tiny_context(CARD)
    method = foster(ctx, init_epochs=1, boosting_epochs=1, compression_epochs=1)
    for t in range(3):
        learn_and_remember(method, ctx, stream, engine, memory, t)
        fp = method.inference_footprint()
        assert fp.extractors == 1 and method.teacher is None and method.teacher_head is None
        assert not isinstance(method.backbone, ExtractorStack)
        assert fp.params == count_params(method.backbone, method.head) and method.head.out_features == 2 * (t + 1)
    assert method.step_record()["teacher_extractors"] == 2
    assert method.step_record()["teacher_params"] > fp.params
    assert method.state_dict()["teacher"] is None
    assert method.scores(stream.test.images[:4].float()).shape == (4, 6)


def test_infer_with_teacher_keeps_two_extractors():
    ctx, stream, engine, memory = tiny_context(CARD)
    method = foster(ctx, init_epochs=1, boosting_epochs=1, compression_epochs=1, infer_with="teacher",
                    teacher_wa=True)
    for t in range(2):
        learn_and_remember(method, ctx, stream, engine, memory, t)
    fp = method.inference_footprint()
    assert fp.extractors == 2 and fp.params == count_params(method.teacher, method.teacher_head)
    assert "teacher_wa_gamma" in method.step_record()
    assert method.backbone is not None          # the student still starts the next task


def test_a_seen_class_without_samples_is_one_line_naming_the_memory():
    """A fixed total smaller than the seen classes leaves an old class without exemplars: FOSTER's class weights
    are undefined there (PyCIL divides by zero); the run stops with the fix instead."""
    ctx, stream, engine, memory = tiny_context(tiny_card(name="tiny_foster_small",
                                                         memory={"policy": "fixed_total", "total": 1,
                                                                 "selection": "herding"}))
    method = foster(ctx, init_epochs=1, boosting_epochs=1, compression_epochs=1)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    with pytest.raises(UserError, match="no training sample in task 2.*memory.total"):
        learn_and_remember(method, ctx, stream, engine, memory, 1)


def test_the_official_augmentation_uses_the_authors_pil_autoaugment_and_teacher_runs_have_their_own_name():
    from cilbench.data.protocol import AugmentConfig
    official = FOSTER.augmentation(build(FOSTERConfig, {"augment": "official"}, "test"), AugmentConfig(), 32)
    assert (official.autoaugment, official.autoaugment_ops, official.cutout) == ("cifar10", "pil", 16)
    assert FOSTER.augmentation(build(FOSTERConfig, {}, "test"), AugmentConfig(), 32) == AugmentConfig()
    assert FOSTER.run_tag(build(FOSTERConfig, {"infer_with": "teacher"}, "test")) == "teacher"
    assert FOSTER.run_tag(build(FOSTERConfig, {}, "test")) is None


def test_beta1_schedule_must_cover_every_incremental_task():
    ctx, *_ = tiny_context(CARD)
    with pytest.raises(UserError, match="beta1_per_task"):
        foster(ctx, beta1_per_task=[0.9])         # 3 tasks: 2 incremental
    with pytest.raises(UserError, match="beta1_per_task"):
        build(FOSTERConfig, {"beta1_per_task": [0.9, 1.5]}, "test")


def test_cli_run_on_digits(tmp_path):
    result = CliRunner().invoke(app, ["run", "--method", "foster", "--protocol", "digits_b0s2", "--epochs", "1",
                                      "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "digits_b0s2" / "foster" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    with open(run / "steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    assert [int(s["extractors"]) for s in steps] == [1] * 5
    assert [s["teacher_extractors"] for s in steps] == [""] + ["2"] * 4
    params = [int(s["params"]) for s in steps]
    backbone = [int(s["params_backbone"]) for s in steps]
    assert len(set(backbone)) == 1                                     # one extractor of the same size
    dim = 32                                                           # resnet20 at width 8: 4 x 8 channels
    assert [p - b for p, b in zip(params, backbone)] == [(dim + 1) * 2 * (i + 1) for i in range(5)]   # the head
    assert all(int(s["teacher_params"]) > int(s["params"]) for s in steps[1:])
    phases = {e["phase"] for e in map(json.loads, (run / "events.jsonl").read_text().splitlines()) if "epoch" in e}
    assert phases == {"foster_init", "foster_boost", "foster_compress"}
