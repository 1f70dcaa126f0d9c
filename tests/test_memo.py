"""MEMO (methods/memo.py) and the kit's backbone split (kit.split_backbone). CPU, small: a 6-class synthetic card."""
from __future__ import annotations

import csv
import json

import pytest
import torch
from cilbench.methods.memo import MEMO, MEMOConfig, aligned_budget
from harness import learn_and_remember, randomize_bn, state_of, tiny_card, tiny_context

from cilbench.config import build
from cilbench.errors import UserError
from cilbench.kit import (
    BackbonePart,
    build_backbone,
    count_params,
    default_shared_stages,
    pack_module,
    split_backbone,
    unpack_module,
)

TINY_CARD = tiny_card(name="tiny_memo")


def memo(ctx, **options):
    return MEMO(build(MEMOConfig, options, "test"), ctx)


# --- the kit's split ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,split", [("resnet32", 2), ("resnet32", 1), ("resnet32", 0),
                                        ("resnet18_cifar", 3), ("resnet18_imagenet", 2), ("resnet32_podnet", 3)])
def test_trunk_then_tail_equals_the_unsplit_backbone(name, split):
    torch.manual_seed(0)
    net = build_backbone(name, 3, 4)
    randomize_bn(net)
    net.eval()
    trunk, tail = split_backbone(net, split)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tail.eval()(trunk.eval()(x)), net(x))
        assert trunk(x).shape[1] == trunk.out_dim and tail.out_dim == net.out_dim
    assert count_params(trunk) + count_params(tail) == count_params(net)
    # packed and rebuilt (checkpoints, ExtractorStack): the same function
    rebuilt = unpack_module(pack_module(tail), "cpu").eval()
    assert isinstance(rebuilt, BackbonePart)
    with torch.no_grad():
        assert torch.equal(rebuilt(trunk(x)), tail(trunk(x)))


def test_default_split_is_the_codes_and_bad_splits_say_which_are_valid():
    assert default_shared_stages(build_backbone("resnet32").spec) == 2        # stage 3 specialised
    assert default_shared_stages(build_backbone("resnet18_imagenet").spec) == 3   # layer 4 specialised
    trunk, tail = split_backbone(build_backbone("resnet32"), 2)
    # the memo_resnet32 of the authors' code: generalized 112,016 + specialized 351,488 = 463,504 (ResNet-32)
    assert (count_params(trunk), count_params(tail)) == (112016, 351488)
    with pytest.raises(UserError, match=r"0\.\.2"):
        split_backbone(build_backbone("resnet32"), 3)


# --- the method --------------------------------------------------------------------------------------

def test_old_blocks_frozen_shared_blocks_train_and_params_count_shared_once():
    ctx, stream, engine, memory = tiny_context(TINY_CARD)
    method = memo(ctx)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    first, trunk0 = state_of(method.tails.extractors[0]), state_of(method.trunk)
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    assert method.tails.frozen == [True, False]
    for k, v in state_of(method.tails.extractors[0]).items():
        assert torch.equal(v, first[k]), k                    # weights and BN statistics of the old block
    assert not torch.equal(state_of(method.trunk)["stem.0.weight"], trunk0["stem.0.weight"])   # train_base
    # the new block started as a copy of the old one, then trained
    assert not torch.equal(state_of(method.tails.extractors[1])["stages.0.0.conv1.weight"],
                           first["stages.0.0.conv1.weight"])
    trunk_p, tail_p = count_params(method.trunk), count_params(method.tails.extractors[0])
    fp = method.inference_footprint()
    assert fp.extractors == 2
    assert fp.params_backbone == trunk_p + 2 * tail_p
    assert fp.params == trunk_p + 2 * tail_p + count_params(method.head)
    assert method.head.in_features == 2 * method.tails.extractors[0].out_dim and method.head.out_features == 4
    rec = method.step_record()
    assert rec["params_shared"] == trunk_p and rec["params_specialized"] == 2 * tail_p
    assert rec["model_bytes"] == 4 * fp.params_backbone
    assert rec["model_exemplars"] == pytest.approx(4 * fp.params_backbone / (3 * 8 * 8), abs=0.01)


def test_frozen_shared_blocks_stay_bit_identical_after_task_1():
    ctx, stream, engine, memory = tiny_context(TINY_CARD)
    method = memo(ctx, train_shared=False)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    trunk0 = state_of(method.trunk)
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    learn_and_remember(method, ctx, stream, engine, memory, 2)
    after = state_of(method.trunk)
    assert trunk0.keys() == after.keys()
    for k, v in trunk0.items():
        assert torch.equal(v, after[k]), k
    assert not any(p.requires_grad for p in method.trunk.parameters())


def test_weight_aligning_equalises_new_and_old_row_norms():
    ctx, stream, engine, memory = tiny_context(TINY_CARD)
    method = memo(ctx)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    norms = method.head.weight.detach().norm(dim=1)
    assert float(norms[2:].mean()) == pytest.approx(float(norms[:2].mean()), rel=1e-5)


def test_memory_alignment_takes_the_extra_specialized_blocks_out_of_the_budget():
    card = tiny_card(name="tiny_memo", memory={"policy": "fixed_total", "total": 2000, "selection": "herding"})
    ctx, stream, engine, memory = tiny_context(card)
    method = memo(ctx, memory_alignment="one_backbone")
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    assert ctx.exemplar_budget() == 2000                        # one backbone: nothing extra yet
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    tail_bytes = 4 * count_params(method.tails.extractors[1])
    expected = 2000 - -(-tail_bytes // (3 * 8 * 8))             # ceil
    assert ctx.exemplar_budget() == expected == method.step_record()["exemplar_budget"]
    assert memory.quota == expected // 4
    assert ctx.protocol.memory.total == 2000                    # the card itself is untouched


def test_the_authors_fair_budget_on_cifar100_b0_10_is_3312():
    # the authors' README trains MEMO with -ms 3312: 2000 + floor(4 * (10 * 463504 - (112016 + 10 * 351488)) / 3072)
    trunk, tail = split_backbone(build_backbone("resnet32"), 2)
    budget = aligned_budget("der_final", 2000, count_params(trunk), count_params(tail), 1, 10, 32 * 32 * 3)
    assert budget == 3312
    assert aligned_budget("one_backbone", 2000, 112016, 351488, 1, 10, 3072) == 2000
    assert aligned_budget("one_backbone", 2000, 112016, 351488, 3, 10, 3072) == 2000 - 916   # ceil(2*351488*4/3072)


def test_an_imagenet_exemplar_counts_at_the_training_crop_as_the_authors_do():
    """fair2exemplar counts an ImageNet image at 224x224x3 (the crop), not at the stored 256 side: the
    authors' budget on ImageNet-100 B50 in 5 steps (11 tasks) is 2000 + 739."""
    from types import SimpleNamespace

    from cilbench.run.runner import RunRequest, resolve
    protocol = resolve(RunRequest(method="memo", protocol="imagenet100_b50s5")).protocol
    ctx = SimpleNamespace(protocol=protocol, stream=SimpleNamespace(image_shape=(3, 256, 256)))
    assert MEMO.exemplar_bytes(ctx) == 224 * 224 * 3
    trunk, tail = split_backbone(build_backbone("resnet18_imagenet"), 3)
    assert aligned_budget("der_final", 2000, count_params(trunk), count_params(tail), 1, 11, 224 * 224 * 3) == 2739


def test_memory_alignment_needs_a_fixed_total_memory():
    card = tiny_card(name="tiny_memo", memory={"policy": "per_class", "per_class": 4, "selection": "herding"})
    ctx, *_ = tiny_context(card)
    with pytest.raises(UserError, match="fixed_total"):
        memo(ctx, memory_alignment="one_backbone")


def test_schedules_scale_the_codes_recipe_to_the_card():
    ctx, stream, *_ = tiny_context(tiny_card(name="tiny_memo", train={"epochs": 170}))
    method = memo(ctx)
    first, later = method.train_config(stream.task(0)), method.train_config(stream.task(1))
    assert (first.epochs, first.milestones, first.weight_decay) == (200, [60, 120, 170], 0.0005)
    assert (later.epochs, later.milestones, later.weight_decay) == (170, [80, 120, 150], 0.0002)
    paper = memo(ctx, schedule="paper").train_config(stream.task(0))
    assert (paper.epochs, paper.milestones) == (170, [80, 150])


def test_cli_run_on_digits(tmp_path, run_cli):
    result = run_cli("memo", "digits_b0s2", tmp_path, "--epochs", "1")
    assert result.exit_code == 0, result.output
    run = tmp_path / "digits_b0s2" / "memo" / "seed0"
    rows = list(csv.DictReader(open(run / "steps.csv")))
    assert [int(r["extractors"]) for r in rows] == [1, 2, 3, 4, 5]
    shared = {int(r["params_shared"]) for r in rows}
    assert len(shared) == 1                                     # one copy of the generalized blocks
    for r in rows:
        assert int(r["params_backbone"]) == int(r["params_shared"]) + int(r["params_specialized"])
        assert int(r["model_bytes"]) == 4 * int(r["params_backbone"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["extractors_last"] == 5
