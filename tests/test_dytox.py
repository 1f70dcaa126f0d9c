"""DyTox: class attention by hand, frozen old tokens/classifiers, parameter growth per task, losses, a CLI run."""
from __future__ import annotations

import csv
import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from cilbench.methods.dytox import DyTox, DyToxConfig, bce_one_hot, kd_kl
from harness import learn_and_remember, tiny_card, tiny_context
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.config import build
from cilbench.kit import ClassAttention, ClassAttentionBlock, Context, PatchEncoder, SelfAttentionBlock, decay_groups
from cilbench.train.memory import ExemplarMemory, herding

CARD = tiny_card(name="tiny_dytox")
TINY = {"embed_dim": 8, "heads": 2, "sab_depth": 1, "patch_size": 2, "epochs": 2, "batch_size": 16,
        "warmup_epochs": 1, "ft_epochs": 1}


def dytox(ctx, **options):
    return DyTox(build(DyToxConfig, {**TINY, **options}, "test"), ctx)


def test_class_attention_is_softmax_qk_v_with_the_token_as_only_query():
    torch.manual_seed(0)
    d, heads, n = 6, 2, 5
    ca = ClassAttention(d, heads)
    x = torch.randn(3, n, d)
    out = ca(x)
    assert out.shape == (3, 1, d)
    # explicit computation, head by head: q from token 0 alone, keys/values from every token
    dh = d // heads
    q, k, v = x[:, :1] @ ca.q.weight.T, x @ ca.k.weight.T, x @ ca.v.weight.T
    parts = []
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        att = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(dh), dim=-1)   # [B, 1, n]
        parts.append(att @ v[..., s])
    expected = torch.cat(parts, dim=-1) @ ca.proj.weight.T + ca.proj.bias
    assert torch.allclose(out, expected, atol=1e-6)
    # the other tokens are keys/values only: permuting them changes nothing, changing token 0 changes the output
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(n - 1) + 1])
    assert torch.allclose(ca(x[:, perm]), out, atol=1e-6)
    y = x.clone()
    y[:, 0] += 1
    assert not torch.allclose(ca(y), out)


def test_class_attention_block_updates_the_token_only():
    torch.manual_seed(0)
    block = ClassAttentionBlock(8, 2).eval()
    token, patches = torch.randn(2, 1, 8), torch.randn(2, 4, 8)
    kept = patches.clone()
    out = block(token, patches)
    assert out.shape == (2, 1, 8) and torch.equal(patches, kept)
    xx = block.norm1(torch.cat([token, patches], 1))
    mid = token + block.attn(xx)
    assert torch.allclose(out, mid + block.mlp(block.norm2(mid)), atol=1e-6)


@pytest.mark.parametrize("kind", ["gpsa", "mhsa"])
def test_patch_encoder_shapes_and_gpsa_local_init(kind):
    enc = PatchEncoder(8, 3, 2, 8, 4, [0.0, 0.05], kind=kind)
    assert enc(torch.randn(2, 3, 8, 8)).shape == (2, 16, 8)
    if kind == "gpsa":
        assert torch.equal(enc.blocks[0].attn.v.weight, torch.eye(8))      # ConViT's local init
    with pytest.raises(ValueError, match="patch size"):
        PatchEncoder(8, 3, 3, 8, 4, [0.0])
    with pytest.raises(ValueError, match="divisible"):
        SelfAttentionBlock(6, 4)


def test_decay_groups_skip_biases_and_norms():
    block = SelfAttentionBlock(8, 2, kind="mhsa")
    decay, no_decay = decay_groups(block.named_parameters(), 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


@pytest.mark.parametrize("finetune", [False, True])
def test_old_tokens_and_classifiers_frozen_encoder_trains(finetune):
    ctx, stream, engine, memory = tiny_context(CARD, max_epochs=2)
    method = dytox(ctx, finetune=finetune)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    token0 = method.net.tokens[0].detach().clone()
    head0 = {k: v.clone() for k, v in method.net.heads[0].state_dict().items()}
    enc = {k: v.clone() for k, v in method.net.encoder.state_dict().items()}
    tab = {k: v.clone() for k, v in method.net.tabs.state_dict().items()}
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    same_head = all(torch.equal(v, method.net.heads[0].state_dict()[k]) for k, v in head0.items())
    same_token = torch.equal(token0, method.net.tokens[0])
    # frozen while the task trains; the code's balanced fine-tuning (encoder frozen) trains them again
    assert same_head == same_token == (not finetune)
    assert any(not torch.equal(v, method.net.encoder.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(v, method.net.tabs.state_dict()[k]) for k, v in tab.items())


def fine_tuning_sets(engine, check=None):
    """Record the indices every fine-tuning fit trains on; `check()` runs just before it trains."""
    sets, fit = [], engine.fit

    def recording_fit(params, loss_fn, indices, cfg, *, phase="train", **kw):
        if phase == "dytox_finetune":
            sets.append(indices.clone())
            if check is not None:
                check()
        return fit(params, loss_fn, indices, cfg, phase=phase, **kw)
    engine.fit = recording_fit
    return sets


def test_fine_tuning_trains_on_the_memory_herded_before_it_which_the_harness_keeps():
    ctx, stream, engine, memory = tiny_context(CARD, max_epochs=1)
    method = dytox(ctx)
    herded_before = []

    def herd_with_the_model_as_it_is():
        # fine-tuning's modes after herding: the frozen encoder in eval, the TAB training
        assert not method.net.encoder.training and method.net.tabs.training
        # the memory already holds the new classes, herded with the model before fine-tuning
        modes = [(m, m.training) for m in method.net.modules()]
        method.eval()
        for c in range(2, 4):
            feats = engine.apply(method.features, stream.class_indices(c))
            herded_before.append(torch.equal(memory.class_exemplars(c),
                                             stream.class_indices(c)[herding(feats, memory.quota)]))
        for m, mode in modes:
            m.train(mode)

    sets = fine_tuning_sets(engine, herd_with_the_model_as_it_is)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    before = memory.indices().clone()
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    assert herded_before == [True, True]
    assert len(sets) == 1 and torch.equal(sets[0], memory.indices())    # not selected again after fine-tuning
    labels = stream.train.labels[sets[0]]
    assert torch.bincount(labels).tolist() == [24 // 4] * 4                 # the budget over every seen class
    assert set(sets[0].tolist()) < set(before.tolist()) | set(stream.task(1).train_idx.tolist())


def test_fine_tuning_on_the_balanced_set_leaves_herding_to_the_harness():
    ctx, stream, engine, memory = tiny_context(CARD, max_epochs=1)
    method = dytox(ctx, ft_set="balanced")
    sets = fine_tuning_sets(engine)
    learn_and_remember(method, ctx, stream, engine, memory, 0)
    before = memory.indices().clone()
    learn_and_remember(method, ctx, stream, engine, memory, 1)
    labels = stream.train.labels[sets[0]]
    assert torch.bincount(labels).tolist() == [24 // 2] * 4             # old quota; as many new per class
    old = sets[0][labels < 2]
    assert sorted(old.tolist()) == sorted(before.tolist())
    method.eval()                                                        # the harness herded after fine-tuning
    for c in range(2, 4):
        feats = engine.apply(method.features, stream.class_indices(c))
        assert torch.equal(memory.class_exemplars(c), stream.class_indices(c)[herding(feats, memory.quota)])


def test_no_fine_tuning_without_a_memory():
    card = tiny_card(name="tiny_dytox_no_memory", memory={"policy": "none"})
    ctx, stream, engine, memory = tiny_context(card, max_epochs=1)
    assert memory is None
    method = dytox(ctx)
    sets = fine_tuning_sets(engine)
    for t in range(2):
        engine.begin_task(0, t)
        method.learn(stream.task(t), ctx)
    assert sets == []


def test_params_grow_by_one_token_and_one_classifier_per_task():
    ctx, stream, engine, memory = tiny_context(CARD, max_epochs=1)
    method = dytox(ctx)
    d = 8
    feet, records = [], []
    for t in range(3):
        learn_and_remember(method, ctx, stream, engine, memory, t)
        feet.append(method.inference_footprint())
        records.append(method.step_record())
    n_new = 2
    classifier = 2 * d + d * n_new + n_new           # LayerNorm + linear
    token = d
    assert all(f.extractors == 1 for f in feet)
    assert [b.params - a.params for a, b in zip(feet, feet[1:])] == [token + classifier] * 2
    assert [b.params_backbone - a.params_backbone for a, b in zip(feet, feet[1:])] == [token] * 2
    assert [r["task_tokens"] for r in records] == [1, 2, 3]
    # the divergence head (training only): new classes + 1 "old" output, none at the first task
    assert [r["params_div_head"] for r in records] == [0] + [2 * d + d * (n_new + 1) + n_new + 1] * 2
    # scores: one block per task, concatenated; state round trip gives identical scores
    x = engine.test_transform(stream.test.images[:5])
    method.eval()
    with torch.no_grad():
        scores = method.scores(x)
    assert scores.shape == (5, 6)
    other = dytox(ctx)
    other.load_state_dict(method.state_dict())
    with torch.no_grad():
        assert torch.equal(other.scores(x), scores)


def test_losses_match_their_definitions():
    logits, y = torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([2])
    by_hand = -(math.log(1 - torch.sigmoid(torch.tensor(2.0))) + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
                + math.log(torch.sigmoid(torch.tensor(0.5)))) / 3
    assert bce_one_hot(logits, y).item() == pytest.approx(float(by_hand), rel=1e-6)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    p, log_q = F.softmax(t / 2, 1), F.log_softmax(s / 2, 1)
    kl = (p * (p.log() - log_q)).sum()
    assert kd_kl(s, t, 2.0, "mean").item() == pytest.approx(4 * kl.item() / 12, rel=1e-5)       # code: / (B x C)
    assert kd_kl(s, t, 2.0, "batchmean").item() == pytest.approx(4 * kl.item() / 4, rel=1e-5)


def test_bad_patch_size_is_one_line():
    ctx, *_ = tiny_context(CARD)
    with pytest.raises(Exception, match="dytox.patch_size=3"):
        dytox(ctx, patch_size=3)


def test_cli_run_on_digits(tmp_path, monkeypatch):
    selections, update, select_now = [], ExemplarMemory.update, Context.select_exemplars_now

    def counted_update(memory, labels, *args):
        selections.append(labels)
        return update(memory, labels, *args)

    def counted_select_now(ctx, task, features):
        selections.append(f"learn {task.index}")

        def slow_features(x):          # a selection that takes >= 0.2 s, to find it in the run's time split
            time.sleep(0.1)
            return features(x)
        return select_now(ctx, task, slow_features)
    monkeypatch.setattr(ExemplarMemory, "update", counted_update)
    monkeypatch.setattr(Context, "select_exemplars_now", counted_select_now)
    result = CliRunner().invoke(app, ["run", "--method", "dytox", "--protocol", "digits_b0s2", "--epochs", "1",
                                      "--device", "cpu", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    run = tmp_path / "digits_b0s2" / "dytox" / "seed0"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["last_acc"] <= 100
    with open(run / "steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    assert [int(s["task_tokens"]) for s in steps] == [1, 2, 3, 4, 5]
    assert all(int(s["extractors"]) == 1 for s in steps)
    # each task's classes selected once: by the harness after task 1, by fine-tuning after the others
    assert selections == [range(0, 2)] + [x for t in range(1, 5) for x in (f"learn {t}", range(2 * t, 2 * t + 2))]
    # a selection made inside learn() is herding time, not statistics (the rest of learn outside fit)
    assert all(float(s["herding_seconds"]) >= 0.2 > float(s["statistics_seconds"]) for s in steps[1:])


def test_code_recipe_adamw_warmup_from_warmup_lr_cosine_to_min_lr():
    from cilbench.train.engine import make_optimizer, schedule_factor
    ctx, *_ = tiny_context(CARD)
    cfg = DyTox(build(DyToxConfig, {}, "test"), ctx).train_config()      # the code's defaults
    assert (cfg.optimizer, cfg.epochs, cfg.batch_size, cfg.warmup_epochs) == ("adamw", 500, 128, 5)
    assert cfg.lr == pytest.approx(5e-4 * 128 / 512)                          # linear scaling by batch / 512
    lrs = [cfg.lr * schedule_factor(cfg, 500, e) for e in range(500)]
    # timm's warm-up: warmup_lr + e (lr - warmup_lr) / 5 from epoch 0; then cosine from lr down to min_lr
    assert lrs[0] == pytest.approx(1e-6) and lrs[4] == pytest.approx(1e-6 + 4 * (cfg.lr - 1e-6) / 5)
    assert lrs[5] == pytest.approx(cfg.lr)
    assert lrs[-1] == pytest.approx(1e-5 + (cfg.lr - 1e-5) * 0.5 * (1 + math.cos(math.pi * 494 / 495)))
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)      # torch.optim.AdamW's update
    assert optimizer.param_groups[0]["decoupled_weight_decay"] is True
    ft = DyTox(build(DyToxConfig, {}, "test"), ctx).finetune_config()
    assert (ft.schedule, ft.epochs) == ("constant", 20) and ft.lr == pytest.approx(5e-5 * 128 / 512)
