"""TSD-GRC and TSD-Fixed (methods/tsd.py): group schedules, extractor counts, pool bound, balanced selection,
frozen extractors, the feature-distinctness loss, distillation, every option, resume, and CLI runs.

CPU only; the reduced digits card with 1-epoch caps keeps the whole file short.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cilbench.methods.tsd import TSDGRC, GRCConfig, group_schedule, select_target
from typer.testing import CliRunner

from cilbench.cli import app
from cilbench.config import build
from cilbench.data.datasets import load_dataset
from cilbench.data.protocol import build_protocol, load_card
from cilbench.data.stream import Stream
from cilbench.errors import UserError
from cilbench.kit import Context
from cilbench.kit.losses import kd_soft_ce, supcon_distinct
from cilbench.kit.nets import ProjectionHead, freeze
from cilbench.kit.registry import get_method
from cilbench.train.engine import Engine, RuntimeOptions
from cilbench.train.memory import make_memory

CPU = torch.device("cpu")
CARD = "digits_b0s2"          # 5 tasks of 2 classes


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# helpers: a harness in-process (what runner.execute does, without the run store)


def make_ctx(card: str = CARD, epochs: int | None = 1, seed: int = 0) -> Context:
    protocol = build_protocol(load_card(card), card)
    stream = Stream(protocol, load_dataset(protocol, None), CPU)
    engine = Engine(stream, RuntimeOptions(device="cpu", max_epochs=epochs), CPU)
    return Context(protocol, stream, engine, make_memory(protocol.memory, CPU), CPU, seed)


def make_method(name: str, ctx: Context, **options):
    entry = get_method(name)
    section = {**ctx.protocol.methods.get(entry.cls.family, {}), **options}
    cfg = build(entry.cls.Config, {**entry.defaults, **section}, "test")
    ctx.engine.begin_task(ctx.seed, 0)
    return entry.cls(cfg, ctx)


def learn_task(method, ctx: Context, t: int) -> None:
    """One harness step: learn, then herd exemplars on the method's features."""
    task = ctx.stream.task(t)
    ctx.engine.begin_task(ctx.seed, t)
    method.learn(task, ctx)
    method.eval()
    ctx.memory.update(task.classes, ctx.stream.class_indices,
                      lambda idx: ctx.engine.apply(method.features, idx), ctx.engine.order_gen)


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli_run(out: Path, method: str, *extra: str, epochs: int = 1):
    result = CliRunner().invoke(app, ["run", "--method", method, "--protocol", CARD, "--out", str(out),
                                      "--device", "cpu", "--quiet", "--epochs", str(epochs),
                                      "--set", "runtime.threads=1", "--set", "train.clip_norm=1.0", *extra],
                             catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_steps(run: Path) -> list[dict]:
    with open(run / "steps.csv") as fh:
        return list(csv.DictReader(fh))


def grc_expected_counts(sizes: list[int]) -> list[int]:
    """Inference extractors after each task: frozen groups + the current (rolling) one."""
    return [k + 1 for k, size in enumerate(sizes) for _ in range(size)]


# ---------------------------------------------------------------------------------------------------------
# group schedule (spec §2.1, the whole table)


@pytest.mark.parametrize("tasks, n, sizes", [
    (10, 3, [4, 4, 2]),
    (10, 4, [3, 3, 3, 1]),
    (10, 5, [2] * 5),
    (10, 6, [2, 2, 2, 2, 1, 1]),          # fallback
    (11, 4, [3, 3, 3, 2]),
    (11, 6, [2, 2, 2, 2, 2, 1]),
    (11, 7, [2, 2, 2, 2, 1, 1, 1]),       # fallback
    (26, 7, [4, 4, 4, 4, 4, 4, 2]),
    (20, 12, [2] * 8 + [1] * 4),          # fallback
    (10, 10, [1] * 10),                   # N = T: one extractor per task
    (5, 1, [5]),
])
def test_group_schedule_table(tasks, n, sizes):
    assert group_schedule(tasks, n) == sizes
    assert sum(sizes) == tasks and len(sizes) == n


def test_group_schedule_balanced_rule_and_explicit_sizes():
    assert group_schedule(10, 3, "balanced") == [4, 3, 3]
    assert group_schedule(10, 4, "balanced") == [3, 3, 2, 2]
    cfg = build(GRCConfig, {"n_extractors": 3, "group_sizes": [1, 3, 1]}, "test")
    assert TSDGRC.resolve_schedule(cfg, 5) == [1, 3, 1]
    assert TSDGRC.run_tag(cfg) == "N3g1-3-1"
    with pytest.raises(UserError, match="sum to"):
        TSDGRC.resolve_schedule(cfg, 6)
    with pytest.raises(UserError, match="n_extractors"):
        build(GRCConfig, {"n_extractors": 2, "group_sizes": [1, 3, 1]}, "test")
    with pytest.raises(UserError, match="1..5"):
        group_schedule(5, 6)


# ---------------------------------------------------------------------------------------------------------
# balanced selection


def test_select_target_excludes_previous_target():
    scores = [0.1, 0.9, 0.2]
    assert select_target(scores, -1, 3, True, "similarity") == (1, [0, 1, 2])
    assert select_target(scores, 1, 3, True, "similarity") == (2, [0, 2])      # best (1) excluded once
    assert select_target(scores, 1, 3, False, "similarity") == (1, [0, 1, 2])  # unbalanced ablation
    assert select_target([0.5], 0, 1, True, "similarity") == (0, [0])          # N = 1: nothing to exclude
    assert select_target([1.0, 1.0, 0.0], -1, 3, True, "similarity")[0] == 0   # ties: lowest slot
    assert [select_target(None, p, 3, True, "round_robin")[0] for p in (-1, 0, 1, 2)] == [0, 1, 2, 0]
    gen = torch.Generator().manual_seed(0)
    picks = {select_target(None, 2, 3, True, "random", gen)[0] for _ in range(50)}
    assert picks == {0, 1}                                                     # never the previous target


# ---------------------------------------------------------------------------------------------------------
# feature-distinctness loss


def test_supcon_distinct_matches_hand_computation():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 4), dim=1)           # 3 samples x 2 views, stacked by view
    labels = torch.tensor([2, 2, 0, 2, 2, 0])           # label 2: current task, label 0: old exemplar
    anchors = labels >= 2
    neg = F.normalize(torch.randn(3, 4), dim=1)         # old sample under frozen extractors
    tau = 0.07
    got = supcon_distinct(z, labels, anchors, neg, tau)

    total, count = 0.0, 0
    for i in range(6):
        if not anchors[i]:
            continue
        others = [j for j in range(6) if j != i]
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in others)
        denom += sum(math.exp(float(z[i] @ n) / tau) for n in neg)
        pos = [p for p in others if labels[p] == labels[i]]
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
        count += 1
    assert got.item() == pytest.approx(total / count, rel=1e-5)

    # no extra negatives and every row an anchor: plain SupCon; base temperature scales the loss
    plain = supcon_distinct(z, labels, None, None, tau)
    assert supcon_distinct(z, labels, None, None, tau, base_temperature=2 * tau).item() == \
        pytest.approx(plain.item() / 2, rel=1e-6)
    # gradients reach the embeddings; an anchor-less batch gives 0
    zg = z.clone().requires_grad_(True)
    supcon_distinct(zg, labels, anchors, neg, tau).backward()
    assert zg.grad.abs().sum() > 0
    assert supcon_distinct(z, labels, torch.zeros(6, dtype=torch.bool), neg, tau).item() == 0.0


def test_kd_soft_ce_matches_foster_kd_loss_written_out():
    """TSD's distillation loss against FOSTER/PyCIL's _KD_loss, written out element by element in float64:
    -(1/B) sum_b sum_c softmax(t_b / T)_c log softmax(s_b / T)_c; T^2 scaling with kd_t2_scale."""
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3, 2.0
    total = 0.0
    for b in range(5):
        zs = [math.exp(float(v) / temp) for v in s[b]]
        zt = [math.exp(float(v) / temp) for v in t[b]]
        total -= sum(zt[c] / sum(zt) * math.log(zs[c] / sum(zs)) for c in range(7))
    assert kd_soft_ce(s, t, temp).item() == pytest.approx(total / 5, rel=1e-5)
    assert kd_soft_ce(s, t, temp, scale_t2=True).item() == pytest.approx(temp ** 2 * total / 5, rel=1e-5)


def test_projection_head_shape_and_norm():
    head = ProjectionHead(16)
    out = head(torch.randn(5, 16))
    assert out.shape == (5, 128)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    assert head.net[0].out_features == 16                   # hidden width = input dim


# ---------------------------------------------------------------------------------------------------------
# distillation


def test_distillation_brings_student_logits_to_teacher():
    """A fixed random teacher [A; B] + head; the student [A; copy(B)] with a warm head learns its logits."""
    ctx = make_ctx(epochs=None)
    method = make_method("tsd_fixed", ctx, n_extractors=2, kd_epochs=12)
    task = ctx.stream.task(0)
    a, b = freeze(ctx.new_backbone()), freeze(ctx.new_backbone())
    perturbed = freeze(ctx.new_backbone())                   # the student starts from a different network
    teacher_head = torch.nn.Linear(a.out_dim + b.out_dim, task.n_seen)
    with torch.no_grad():
        teacher_head.weight.mul_(5.0)                        # confident teacher
    freeze(teacher_head)
    teacher = [a, b]

    def gap(student_modules, student_head):
        idx = task.train_idx
        t = ctx.engine.apply(lambda x: teacher_head(torch.cat([m(x) for m in teacher], 1)), idx)
        s = ctx.engine.apply(lambda x: student_head(torch.cat([m(x) for m in student_modules], 1)), idx)
        centred = (s - s.mean(1, keepdim=True)) - (t - t.mean(1, keepdim=True))   # softmax ignores shifts
        return (kd_soft_ce(s, t, 2.0) - kd_soft_ce(t, t, 2.0)).item(), centred.abs().mean().item()

    student, head, info = method._consolidate(task, teacher, teacher_head, [a, perturbed], 1)
    start = [a, perturbed]
    warm = method._derive_head(teacher_head, teacher, [a, perturbed], task.n_seen, True,
                               alias={id(perturbed): id(b)})
    for m in (student, head, a, perturbed):
        m.eval()
    kl_before, l1_before = gap(start, warm)
    kl_after, l1_after = gap([a, student], head)
    assert info["kd_epochs"] == 12 and info["kd_loss"] < info["kd_loss_first"]
    assert kl_after < 0.2 * kl_before and l1_after < 0.5 * l1_before
    assert not any(p.requires_grad for p in student.parameters())   # frozen after consolidation


def test_phase_budgets_defaults_and_epoch_cap():
    """CE: the card's budget, two views (L_con); KD: wd 0, kd_epochs, one view; --epochs caps both."""
    ctx = make_ctx(epochs=1)
    method = make_method("tsd_grc", ctx, n_extractors=1)
    cfg = method.cfg
    assert (cfg.kd_temperature, cfg.kd_weight_decay, cfg.con_temperature, cfg.con_weight) == (2.0, 0.0, 0.07, 0.1)
    defaults = build(GRCConfig, {}, "test")
    assert (defaults.kd_epochs, defaults.n_extractors) == (130, 3)     # the spec's defaults
    assert cfg.kd_epochs == 24                                         # the digits card's own budget
    phases = []
    fit = ctx.engine.fit

    def spy(params, loss_fn, indices, train_cfg, **kw):
        phases.append((kw["phase"], train_cfg.epochs, train_cfg.weight_decay, kw.get("views", 1),
                       ctx.engine.epochs_for(train_cfg)))
        return fit(params, loss_fn, indices, train_cfg, **kw)

    ctx.engine.fit = spy
    learn_task(method, ctx, 0)
    learn_task(method, ctx, 1)
    card = ctx.protocol.train
    assert phases == [("ce", card.epochs, card.weight_decay, 2, 1), ("ce", card.epochs, card.weight_decay, 2, 1),
                      ("kd", 24, 0.0, 1, 1)]


# ---------------------------------------------------------------------------------------------------------
# frozen extractors, pool bookkeeping (in-process harness)


def test_grc_frozen_group_extractor_stays_bit_identical():
    ctx = make_ctx()
    method = make_method("tsd_grc", ctx, n_extractors=2)      # groups [3, 2]
    counts = []
    rolling = []
    for t in range(5):
        learn_task(method, ctx, t)
        counts.append(len(method.stack))
        rolling.append(weights(method.stack.extractors[-1]))
        if t == 2:
            group0 = weights(method.stack.extractors[0])
        if t > 2:
            assert same(weights(method.stack.extractors[0]), group0)   # frozen group extractor
    assert counts == grc_expected_counts([3, 2])
    assert not same(rolling[0], rolling[1]) and not same(rolling[1], rolling[2])  # consolidation updates R
    assert same(rolling[2], group0)
    assert all(not p.requires_grad for p in method.stack.parameters())
    assert [r["consolidated"] for r in method.records] == [0, 1, 1, 0, 1]
    assert method.inference_footprint().extractors == 2


def test_fixed_pool_bound_selection_and_untouched_slots():
    ctx = make_ctx()
    method = make_method("tsd_fixed", ctx, n_extractors=2)
    prev = None
    for t in range(5):
        before = [weights(e) for e in method.stack.extractors]
        learn_task(method, ctx, t)
        after = [weights(e) for e in method.stack.extractors]
        assert len(method.stack) == min(t + 1, 2) == method.inference_footprint().extractors
        rec = method.records[-1]
        if t >= 2:
            target = rec["slot"]
            assert len(rec["scores"]) == 2 and prev not in rec["candidates"] and target != prev
            for j in range(2):
                assert same(before[j], after[j]) == (j != target)        # only the target changes
            prev = target
        else:
            assert all(same(b, a) for b, a in zip(before, after[: len(before)]))
    assert sorted(sum(method.owner, [])) == [0, 1, 2, 3, 4]
    assert method.prev_target == prev
    n_params = sum(p.numel() for p in method.stack.parameters()) + sum(p.numel() for p in method.head.parameters())
    assert method.inference_footprint().params == n_params
    assert method.inference_footprint().params_backbone == sum(p.numel() for p in method.stack.parameters())


def test_fixed_similarity_uses_exemplars_of_own_classes():
    ctx = make_ctx()
    method = make_method("tsd_fixed", ctx, n_extractors=2, own_tasks="original")
    for t in range(2):
        learn_task(method, ctx, t)
    assert method.own_classes(0) == [0, 1] and method.own_classes(1) == [2, 3]
    scores = method.similarity(ctx.stream.task(2))
    assert len(scores) == 2 and all(-2.0 <= s <= 2.0 for s in scores)   # sum of 2 cosines
    method.cfg.sim_reduce = "mean"
    assert len(method.similarity(ctx.stream.task(2))) == 2


# ---------------------------------------------------------------------------------------------------------
# every option runs


@pytest.mark.parametrize("name, options", [
    ("tsd_grc", dict(n_extractors=2, grc_teacher="all_group", ce_views=2, aux_loss=True, detach_frozen_neg=True,
                     reuse_projection=True, kd_t2_scale=True, kd_plus_ce=True)),
    ("tsd_grc", dict(n_extractors=3, group_sizes=[1, 3, 1], init="random", ce_head_init="fresh",
                     student_head_init="fresh", con_anchors="all", con_first_task=False, first_task_epochs=1,
                     con_hidden=8, con_dim=16, head_bias=False)),
    ("tsd_grc", dict(n_extractors=3, group_rule="balanced", con_weight=0.0)),
    ("tsd_fixed", dict(n_extractors=2, balanced=False, own_tasks="original", sim_reduce="mean",
                       proto_normalize=False, con_frozen_negatives=False)),
    ("tsd_fixed", dict(n_extractors=2, selection="random", con_base_temperature=1.0)),
    ("tsd_fixed", dict(n_extractors=3, selection="round_robin", con_weight=0.0, kd_temperature=4.0)),
])
def test_every_option_runs(name, options):
    ctx = make_ctx()
    # option plumbing, not convergence: at one epoch per task some combinations blow up with PyCIL's head init
    # (CE ~30-800 from task 2 on), which the divergence check would rightly stop
    ctx.engine.options.divergence_factor = 0
    method = make_method(name, ctx, **options)
    for t in range(ctx.stream.num_tasks):
        learn_task(method, ctx, t)
        scores = method.scores(ctx.engine.augmenter.test(ctx.stream.test.images[:4]))
        assert scores.shape == (4, ctx.stream.task(t).n_seen) and torch.isfinite(scores).all()
    n = options["n_extractors"]
    assert len(method.stack) == n if name == "tsd_grc" else len(method.stack) == min(5, n)
    if name == "tsd_fixed":
        targets = [r["slot"] for r in method.records if r["consolidated"]]
        if options.get("selection") == "round_robin":
            assert targets == [0, 1]
        if options.get("balanced", True):
            assert all(a != b for a, b in zip(targets, targets[1:]))
    if options.get("grc_teacher") == "all_group":
        assert method.records[2]["frozen_negative_extractors"] == 2     # φ_1, φ_2 of group 0 as teachers


def test_contrastive_loss_is_used_only_in_ce_phases():
    ctx = make_ctx()
    method = make_method("tsd_grc", ctx, n_extractors=1)
    calls = []
    import cilbench.methods.tsd as tsd
    original = tsd.supcon_distinct

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    phases = []
    ctx.engine.on_epoch = lambda e: phases.append((e["phase"], len(calls)))
    tsd.supcon_distinct = spy
    try:
        learn_task(method, ctx, 0)
        learn_task(method, ctx, 1)
    finally:
        tsd.supcon_distinct = original
    # ce (t=0), ce (t=1) add calls; the kd epoch adds none
    assert [p for p, _ in phases] == ["ce", "ce", "kd"]
    assert phases[1][1] > phases[0][1] > 0 and phases[2][1] == phases[1][1]


# ---------------------------------------------------------------------------------------------------------
# CLI end to end, resume


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Both variants at N = 2 and 3 on the digits card, 1 epoch per phase."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tsd_runs")
    runs = {}
    for method in ("tsd_grc", "tsd_fixed"):
        for n in (2, 3):
            cli_run(out, method, "--set", f"{method}.n_extractors={n}")
            runs[(method, n)] = out / CARD / f"{method}+N{n}" / "seed0"
    return runs


@pytest.mark.parametrize("method, n", [("tsd_grc", 2), ("tsd_grc", 3), ("tsd_fixed", 2), ("tsd_fixed", 3)])
def test_cli_run_names_and_extractor_counts(cli_runs, method, n):
    run = cli_runs[(method, n)]
    assert run.is_dir(), f"expected run directory {run.parent.name}"
    steps = read_steps(run)
    counts = [int(s["extractors"]) for s in steps]
    if method == "tsd_grc":
        assert counts == grc_expected_counts(group_schedule(5, n))
    else:
        assert counts == [min(t + 1, n) for t in range(5)]
        assert max(counts) <= n
    state = torch.load(run / "checkpoint.pt", weights_only=True)["method"]
    assert len(state["stack"]["specs"]) == counts[-1]
    if method == "tsd_fixed":
        targets = [r["slot"] for r in state["records"] if r["consolidated"]]
        assert len(targets) == 5 - n and all(a != b for a, b in zip(targets, targets[1:]))
        assert sorted(t for owned in state["owner"] for t in owned) == list(range(5))


def test_rejected_pool_size_is_a_one_line_error_and_leaves_no_run(tmp_path):
    from typer.testing import CliRunner

    from cilbench.cli import app
    res = CliRunner().invoke(app, ["run", "--method", "tsd_grc", "--protocol", CARD, "--device", "cpu", "--quiet",
                                   "--out", str(tmp_path), "--set", "tsd_grc.n_extractors=9"])
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "n_extractors" in lines[0] and "1..5" in lines[0]
    assert not any(tmp_path.iterdir())          # no empty run directory behind the error


def test_contrastive_loss_stays_float32_under_bf16_autocast():
    z = torch.nn.functional.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    plain = supcon_distinct(z, labels, temperature=0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = supcon_distinct(z, labels, temperature=0.07)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_one_frozen_negative_per_old_sample_and_frozen_extractor():
    """Spec section 4: negatives (ii) are one embedding per (old-class sample in the batch, frozen extractor)."""
    ctx = make_ctx()
    method = make_method("tsd_fixed", ctx, n_extractors=3)
    import cilbench.methods.tsd as tsd
    original = tsd.supcon_distinct
    seen = []

    def spy(z, labels, anchors=None, extra_negatives=None, *args, **kwargs):
        old_in_batch = int((labels < ctx.stream.task(2).n_old).sum()) // 2      # labels cover both views
        seen.append((old_in_batch, 0 if extra_negatives is None else extra_negatives.shape[0]))
        return original(z, labels, anchors, extra_negatives, *args, **kwargs)

    learn_task(method, ctx, 0)
    learn_task(method, ctx, 1)
    tsd.supcon_distinct = spy
    try:
        learn_task(method, ctx, 2)      # two frozen pool extractors
    finally:
        tsd.supcon_distinct = original
    assert seen and any(old for old, _ in seen)
    assert all(negatives == 2 * old for old, negatives in seen)


def test_aux_head_honours_head_bias_and_uses_ders_aux_labels(monkeypatch):
    """The optional DER auxiliary head (aux_loss) follows head_bias like every other head, and its targets
    come from the one shared mapping (cilbench.kit.losses.aux_labels)."""
    import cilbench.methods.tsd as tsd_module

    from cilbench.kit.losses import aux_labels

    calls = []

    def spy_labels(y, n_old):
        calls.append(n_old)
        return aux_labels(y, n_old)

    monkeypatch.setattr(tsd_module, "aux_labels", spy_labels)
    ctx = make_ctx()
    method = make_method("tsd_grc", ctx, n_extractors=2, aux_loss=True, head_bias=False, con_weight=0.0)
    trained = []
    fit = ctx.engine.fit

    def spy(params, loss_fn, indices, train_cfg, **kw):
        if kw["phase"] == "ce":
            trained.append([tuple(p.shape) for p in params])
        return fit(params, loss_fn, indices, train_cfg, **kw)

    ctx.engine.fit = spy
    learn_task(method, ctx, 0)
    learn_task(method, ctx, 1)
    n_aux = ctx.stream.task(1).n_new + 1
    assert any(len(s) == 2 and s[0] == n_aux for s in trained[1])   # the aux head trains in the CE phase
    assert (n_aux,) not in trained[1]                 # no aux bias with head_bias false
    assert calls and set(calls) == {2}
