"""SEED (methods/seed.py) and its shared pieces: the Gaussian store (cilbench/gaussians.py), the float32
flip-augmented feature helper (cilbench/engine.py) and the backbone variant (cilbench/backbones.py). CPU, small."""
from __future__ import annotations

import copy
import csv
import json
import math

import cilbench.methods.seed as seed_mod
import pytest
import torch
from cilbench.methods.seed import SEED, SEEDConfig, feature_distillation, select_expert, unique_params
from scipy.stats import multivariate_normal
from typer.testing import CliRunner

import cilbench.train.engine as engine_mod
from cilbench.cli import app
from cilbench.config import build
from cilbench.data.datasets import load_dataset
from cilbench.data.protocol import build_protocol, load_card
from cilbench.data.stream import Stream
from cilbench.errors import UserError
from cilbench.kit import Context
from cilbench.kit.backbones import build_backbone, standard_spec
from cilbench.kit.gaussians import GaussianStore, fit_gaussian, kl_divergence, pairwise_kl, symmetric_kl
from cilbench.train.engine import Engine, RuntimeOptions, features_with_flips

CARD = "digits_b0s2"


def random_spd(s: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(s, s, generator=gen, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(s, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Gaussians


def test_log_likelihood_matches_scipy():
    gen = torch.Generator().manual_seed(0)
    store = GaussianStore(5)
    for label in range(3):
        store.fit(label, torch.randn(40, 5, generator=gen, dtype=torch.float64) * (label + 1) + label)
    z = torch.randn(7, 5, generator=gen, dtype=torch.float64) * 2
    ours = store.log_likelihood(z)
    assert ours.shape == (7, 3)
    for c in range(3):
        ref = multivariate_normal(store.means[c].numpy(), store.covs[c].numpy()).logpdf(z.numpy())
        assert torch.allclose(ours[:, c], torch.as_tensor(ref), rtol=1e-9, atol=1e-9)


def test_fit_is_the_mle_plus_eps():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    mean, cov, eps = fit_gaussian(x)
    assert eps == 1e-8
    assert torch.allclose(mean, x.mean(0))
    mle = torch.cov(x.T, correction=0)
    assert torch.allclose(cov, mle + 1e-8 * torch.eye(4, dtype=torch.float64))


def test_eps_grows_tenfold_until_cholesky_succeeds():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(30, 3, generator=gen, dtype=torch.float64)
    x = torch.cat([base, base[:, :1]], dim=1)          # 4th feature duplicates the 1st: exactly singular
    x = x.float()                                      # float32 features, as a network gives them
    mean, cov, eps = fit_gaussian(x)
    assert eps > 1e-8
    assert math.log10(eps / 1e-8) == pytest.approx(round(math.log10(eps / 1e-8)))   # 1e-8 * 10^k
    assert torch.linalg.cholesky_ex(cov).info == 0
    smaller = torch.cov(x.double().T, correction=0) + eps / 10 * torch.eye(4, dtype=torch.float64)
    assert torch.linalg.cholesky_ex(smaller.float()).info != 0     # the previous eps was not enough (float32)
    store = GaussianStore(4)
    assert store.fit(0, x) == eps and torch.isfinite(store.log_likelihood(x)).all()
    one = GaussianStore(3)                             # a single sample: covariance 0, rescued by eps
    assert one.fit(0, torch.ones(1, 3)) >= 1e-8 and torch.isfinite(one.logdet).all()


def test_symmetric_kl_closed_form_hand_case():
    # N(0, I) vs N(m, s^2 I) in 2-D:
    #   KL01 = 1/2 [2/s^2 + |m|^2/s^2 - 2 + 2 ln s^2],  KL10 = 1/2 [2 s^2 + |m|^2 - 2 - 2 ln s^2]
    m = torch.tensor([1.0, 2.0], dtype=torch.float64)
    s2 = 4.0
    eye = torch.eye(2, dtype=torch.float64)
    kl01 = 0.5 * (2 / s2 + 5 / s2 - 2 + 2 * math.log(s2))
    kl10 = 0.5 * (2 * s2 + 5 - 2 - 2 * math.log(s2))
    zero = torch.zeros(2, dtype=torch.float64)
    assert float(kl_divergence(zero, eye, m, s2 * eye)) == pytest.approx(kl01, rel=1e-12)
    assert float(kl_divergence(m, s2 * eye, zero, eye)) == pytest.approx(kl10, rel=1e-12)
    assert float(symmetric_kl(zero, eye, m, s2 * eye)) == pytest.approx(kl01 + kl10, rel=1e-12)
    assert float(kl_divergence(m, s2 * eye, m, s2 * eye)) == pytest.approx(0.0, abs=1e-12)


def test_kl_matches_monte_carlo():
    gen = torch.Generator().manual_seed(3)
    m0, m1 = torch.randn(3, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
    c0, c1 = random_spd(3, gen), random_spd(3, gen)
    p = torch.distributions.MultivariateNormal(m0, c0)
    q = torch.distributions.MultivariateNormal(m1, c1)
    torch.manual_seed(0)
    x = p.sample((200_000,))
    mc = float((p.log_prob(x) - q.log_prob(x)).mean())
    assert float(kl_divergence(m0, c0, m1, c1)) == pytest.approx(mc, rel=0.03, abs=0.01)
    # the pairwise matrix holds KL(q_i || q_j) with zeros on the diagonal
    kl = pairwise_kl(torch.stack([m0, m1]), torch.stack([c0, c1]))
    assert torch.allclose(torch.diagonal(kl), torch.zeros(2, dtype=torch.float64), atol=1e-10)
    assert float(kl[0, 1]) == pytest.approx(float(kl_divergence(m0, c0, m1, c1)))


def test_store_state_round_trip_and_eq3_params():
    gen = torch.Generator().manual_seed(4)
    store = GaussianStore(4)
    for c in (3, 5):
        store.fit(c, torch.randn(20, 4, generator=gen))
    back = GaussianStore.from_state(copy.deepcopy(store.state_dict()), "cpu")
    z = torch.randn(6, 4, generator=gen)
    assert back.labels == [3, 5] and torch.equal(back.log_likelihood(z), store.log_likelihood(z))
    assert store.params() == 2 * (4 + 4 * 5 // 2)     # S + S(S+1)/2 per class


# ---------------------------------------------------------------------------------------------------------
# Expert selection


def constructed_store(separation: float, gen) -> GaussianStore:
    store = GaussianStore(2)
    for c in range(3):
        centre = torch.tensor([c * separation, 0.0], dtype=torch.float64)
        store.fit(c, centre + torch.randn(200, 2, generator=gen, dtype=torch.float64))
    return store


def test_selection_picks_the_least_overlapping_expert():
    gen = torch.Generator().manual_seed(5)
    overlaps = [constructed_store(sep, gen).overlap() for sep in (0.5, 6.0, 2.0)]
    assert overlaps[1] > overlaps[2] > overlaps[0] > 0
    assert select_expert(overlaps, "kl_max", 7) == 1
    assert select_expert(overlaps, "kl_min", 7) == 0
    assert select_expert(overlaps, "round_robin", 7) == 7 % 3
    assert select_expert([2.0, 5.0, 5.0], "kl_max", 0) == 1           # ties: the lowest index
    assert select_expert([0.0, 0.0, 0.0], "kl_max", 0) == 0
    r = [select_expert(overlaps, "random", 0, torch.Generator().manual_seed(s)) for s in range(20)]
    assert set(r) <= {0, 1, 2} and len(set(r)) > 1


def test_single_class_task_rule():
    ctx = make_ctx()
    method = make_method(ctx, experts=2)
    task = type("T", (), {"n_new": 1, "index": 4})()
    assert method.select([0.0, 0.0], task) == 0
    method.cfg.single_class = "round_robin"
    assert method.select([0.0, 0.0], task) == 4 % 2


def test_feature_distillation_forms():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.zeros(2, 2)
    assert float(feature_distillation(a, b, "mse")) == pytest.approx(25 / 4)
    assert float(feature_distillation(a, b, "l2")) == pytest.approx(5 / 2)


# ---------------------------------------------------------------------------------------------------------
# Backbone variant and the float32 feature helper


def test_backbone_variant_no_final_relu_and_latent_conv():
    spec = standard_spec("resnet20", 3, 8)
    spec.update(last_relu=False, latent=16)
    net = build_backbone(spec).eval()
    assert net.out_dim == 16 and net.latent.kernel_size == (1, 1) and net.latent.bias is not None
    assert all(not b.relu_out for b in net.stages[-1]) and all(b.relu_out for b in net.stages[0])
    plain = build_backbone(standard_spec("resnet20", 3, 8)).eval()
    x = torch.randn(4, 3, 16, 16)
    assert (plain(x) >= 0).all() and (net(x) < 0).any()           # features can be negative now
    again = build_backbone(copy.deepcopy(net.spec))                 # rebuildable from its spec (checkpoints)
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.eval()(x), net(x))


def test_expert_spec_options():
    ctx = make_ctx()
    m = make_method(ctx)
    assert m.spec["last_relu"] is False and "latent" not in m.spec and m.spec["shortcut"] == "B"
    low = make_method(ctx, backbone="resnet20_low", latent_dim=None)
    assert low.spec["stages"][-1][0] == [24, 24] and "latent" not in low.spec     # 3 x base width 8, S = 24
    assert make_method(ctx, latent_dim=12).spec["latent"] == 12
    with pytest.raises(UserError, match="latent_dim"):
        make_method(ctx, latent_dim=64)                              # 64 > the 32 channels of resnet20 width 8


def test_features_with_flips_are_float32_under_bf16_autocast():
    ctx = make_ctx()
    net = build_backbone(standard_spec("resnet20", 1, 4)).eval()
    idx = ctx.stream.task(0).train_idx[:10]
    plain = features_with_flips(ctx.engine, net, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = features_with_flips(ctx.engine, net, idx)
    assert plain.dtype == mixed.dtype == torch.float32 and plain.shape == (20, net.out_dim)
    assert torch.equal(plain, mixed)
    x = ctx.engine.augmenter.test(ctx.stream.train.images[idx])
    with torch.no_grad():
        assert torch.allclose(plain[10:], net(torch.flip(x, dims=(3,))), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The method, driven directly


def make_ctx(max_epochs=1):
    protocol = build_protocol(load_card(CARD), CARD)
    device = torch.device("cpu")
    stream = Stream(protocol, load_dataset(protocol, None), device)
    engine = Engine(stream, RuntimeOptions(device="cpu", max_epochs=max_epochs), device)
    return Context(protocol, stream, engine, None, device, seed=0)


def make_method(ctx, **options):
    base = dict(load_card(CARD)["methods"]["seed"])
    base.update(options)
    return SEED(build(SEEDConfig, base, "test"), ctx)


def learn(method, ctx, t):
    task = ctx.stream.task(t)
    ctx.engine.begin_task(0, t)
    method.learn(task, ctx)
    method.eval()
    return task


def official_scores(method, x, average="holding"):
    """The official code's predict_class_bayes, class by class: -1e8 for classes an expert lacks, softmax(l/tau)
    per expert, sum / (#experts holding the class) or / K."""
    n, k = method.n_seen, len(method.experts)
    log_probs = torch.full((len(x), k, n), -1e8, dtype=torch.float64)
    mask = torch.zeros(len(x), k, n, dtype=torch.bool)
    for e, (expert, store) in enumerate(zip(method.experts, method.gaussians)):
        z = expert(x).double()
        for i, c in enumerate(store.labels):
            dist = torch.distributions.MultivariateNormal(store.means[i], covariance_matrix=store.covs[i])
            log_probs[:, e, c] = dist.log_prob(z)
            mask[:, e, c] = True
    probs = torch.softmax(log_probs / method.cfg.tau, dim=2).sum(dim=1)
    return probs / (mask.sum(dim=1) if average == "holding" else k)


@pytest.fixture(scope="module")
def trained():
    """K = 2 experts over 3 tasks: two new experts, then one selection + fine-tuning."""
    torch.set_num_threads(1)
    ctx = make_ctx()
    method = make_method(ctx, experts=2)
    for t in range(3):
        learn(method, ctx, t)
    return method, ctx


@pytest.mark.parametrize("average", ["holding", "all"])
def test_batched_inference_equals_slow_reference(trained, average):
    method, ctx = trained
    method.cfg.average = average
    try:
        idx = ctx.stream.task(2).test_idx[:40]
        x = ctx.engine.augmenter.test(ctx.stream.test.images[idx])
        with torch.no_grad():
            ours = method.scores(x)
            ref = official_scores(method, x, average)
        assert ours.shape == (40, 6)
        assert torch.equal(ours.argmax(1), ref.argmax(1))
        assert torch.allclose(ours.double().exp(), ref, atol=1e-6)
        # task-aware: softmax among task 1's classes only, averaged over the experts that hold them
        aware = method.task_aware_scores(x, range(2, 4)).double().exp()
        lp = torch.stack([store.log_likelihood(e(x))[:, [store.labels.index(c) for c in (2, 3)]]
                          for e, store in zip(method.experts, method.gaussians)])
        assert torch.allclose(aware, torch.softmax(lp / method.cfg.tau, dim=2).mean(0), atol=1e-6)
    finally:
        method.cfg.average = "holding"


def test_scores_stay_float32_under_bf16_autocast(trained):
    method, ctx = trained
    x = ctx.engine.augmenter.test(ctx.stream.test.images[:32])
    with torch.no_grad():
        plain = method.scores(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = method.scores(x)
    assert mixed.dtype == torch.float32 and torch.equal(plain, mixed)


def test_gaussians_held_and_footprint(trained):
    method, _ = trained
    assert [g.labels for g in method.gaussians] == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5]]
    fp = method.inference_footprint()
    s = method.experts[0].out_dim
    assert fp.extractors == 2
    assert fp.params_backbone == sum(p.numel() for e in method.experts for p in e.parameters())
    assert fp.params == fp.params_backbone + 10 * (s + s * (s + 1) // 2)          # eq. 3
    rec = method.step_record()
    assert rec["expert_mode"] == "finetune" and rec["expert"] in (1, 2) and len(rec["overlaps"].split(";")) == 2


def test_finetuning_keeps_teacher_and_bn_statistics_bit_identical(monkeypatch):
    ctx = make_ctx(max_epochs=2)
    method = make_method(ctx, experts=1)
    learn(method, ctx, 0)
    before = {k: v.clone() for k, v in method.experts[0].state_dict().items()}
    teachers = []
    real_freeze = seed_mod.freeze

    def spy(module):
        frozen = real_freeze(module)
        teachers.append((frozen, {k: v.clone() for k, v in frozen.state_dict().items()}))
        return frozen

    monkeypatch.setattr(seed_mod, "freeze", spy)
    learn(method, ctx, 1)
    assert method.log[-1]["mode"] == "finetune" and len(teachers) == 1
    teacher, at_start = teachers[0]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, at_start[k]) and torch.equal(v, before[k]), k
    after = method.experts[0].state_dict()
    for k, v in before.items():
        if "running_" in k or "num_batches_tracked" in k:
            assert torch.equal(after[k], v), k                   # BN statistics frozen while fine-tuning
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.endswith("conv1.weight"))


def test_only_the_selected_expert_changes_and_shared_layers_stay_aliased_and_frozen():
    ctx = make_ctx()
    method = make_method(ctx, experts=2, shared=1)
    learn(method, ctx, 0)
    learn(method, ctx, 1)
    e0, e1 = method.experts
    assert e0.stem[0].weight is e1.stem[0].weight and not e0.stem[0].weight.requires_grad
    shared = e0.stem[0].weight.detach().clone()
    assert unique_params(method.experts) < sum(p.numel() for e in method.experts for p in e.parameters())
    snap = [{k: v.clone() for k, v in e.state_dict().items()} for e in method.experts]
    learn(method, ctx, 2)
    k = method.log[-1]["expert"]
    for j, e in enumerate(method.experts):
        same = all(torch.equal(v, snap[j][n]) for n, v in e.state_dict().items())
        assert same == (j != k), j
    assert torch.equal(e0.stem[0].weight, shared)
    # checkpoints restore the aliasing
    state = copy.deepcopy(method.state_dict())
    other = make_method(ctx, experts=2, shared=1)
    other.load_state_dict(state)
    assert other.experts[0].stem[0].weight is other.experts[1].stem[0].weight
    x = ctx.engine.augmenter.test(ctx.stream.test.images[:16])
    with torch.no_grad():
        assert torch.equal(other.scores(x), method.scores(x))


def test_bad_options_are_one_line_errors():
    with pytest.raises(UserError, match="alpha"):
        build(SEEDConfig, {"alpha": 1.5}, "card")
    with pytest.raises(UserError, match="shared"):
        make_method(make_ctx(), shared=4)                          # resnet20 has 3 stages


# ---------------------------------------------------------------------------------------------------------
# CLI end to end


def cli_run(out, method, card=CARD, *extra):
    result = CliRunner().invoke(app, ["run", "--method", method, "--protocol", card, "--device", "cpu",
                                      "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out / card / method / "seed0"


def read_steps(run):
    with open(run / "steps.csv") as fh:
        return list(csv.DictReader(fh))


def test_no_exemplar_ever_reaches_the_method(tmp_path, monkeypatch):
    seen = []
    real_fit, real_learn = engine_mod.Engine.fit, SEED.learn

    def fit(self, params, loss_fn, indices, cfg, **kw):
        labels = self.stream.train.labels[indices]
        seen.append(("fit", self.task, int(labels.min()), int(labels.max())))
        return real_fit(self, params, loss_fn, indices, cfg, **kw)

    def learn_spy(self, task, ctx):
        seen.append(("learn", task.index, ctx.memory, task.classes))
        return real_learn(self, task, ctx)

    monkeypatch.setattr(engine_mod.Engine, "fit", fit)
    monkeypatch.setattr(SEED, "learn", learn_spy)
    run = cli_run(tmp_path, "seed", CARD, "--epochs", "1", "--set", "seed.experts=2")
    learns = [s for s in seen if s[0] == "learn"]
    assert len(learns) == 5 and all(memory is None for _, _, memory, _ in learns)
    for _, t, lo, hi in (s for s in seen if s[0] == "fit"):
        classes = learns[t][3]
        assert classes.start <= lo and hi < classes.stop           # only the task's own classes
    steps = read_steps(run)
    assert all(int(s["memory_size"]) == 0 for s in steps)


def two_pass_reference(method, stream, engine, task):
    """What evaluation computed before it shared forwards: scores over the test set, then every task's samples
    again through task_aware_scores (top-1, top-5, task-aware top-1, percent)."""
    idx = task.test_idx
    labels = stream.test.labels[idx]
    topk = engine.apply(method.scores, idx, split="test").topk(min(5, task.n_seen), dim=1).indices
    top1 = 100 * float((topk[:, 0] == labels).float().mean())
    top5 = 100 * float((topk == labels[:, None]).any(dim=1).float().mean())
    correct = 0.0
    for j in range(task.index + 1):
        lo, hi = stream.bounds[j], stream.bounds[j + 1]
        own = idx[(labels >= lo) & (labels < hi)]
        aware = engine.apply(lambda x, lo=lo, hi=hi: method.task_aware_scores(x, range(lo, hi)), own, split="test")
        correct += float((aware.argmax(dim=1) + lo == stream.test.labels[own]).sum())
    return top1, top5, 100 * correct / max(len(idx), 1)


def test_evaluation_forwards_each_expert_once_with_the_two_pass_metrics(tmp_path, monkeypatch):
    """Every view (top-1, top-5, task-aware) comes from one forward of each expert over the test set: half the
    expert images of the two-pass path, and steps.csv holds exactly the two-pass path's figures."""
    from cilbench.run import runner
    real_evaluate, per_step = runner.evaluate, []

    def spying_evaluate(method, stream, engine, task):
        images = []
        hooks = [e.register_forward_hook(lambda m, args, out: images.append(len(args[0]))) for e in method.experts]
        try:
            result = real_evaluate(method, stream, engine, task)
            one_pass = sum(images)
            images.clear()
            reference = two_pass_reference(method, stream, engine, task)
            per_step.append((one_pass, sum(images), len(task.test_idx) * len(method.experts), reference))
        finally:
            for hook in hooks:
                hook.remove()
        return result

    monkeypatch.setattr(runner, "evaluate", spying_evaluate)
    run = cli_run(tmp_path, "seed", CARD, "--epochs", "1", "--set", "seed.experts=2")
    steps = read_steps(run)
    assert len(steps) == len(per_step) == 5
    for step, (one_pass, two_pass, test_images_x_experts, (top1, top5, aware)) in zip(steps, per_step):
        assert one_pass == test_images_x_experts and two_pass == 2 * one_pass
        assert float(step["top1"]) == round(top1, 4) and float(step["top5"]) == round(top5, 4)
        assert float(step["top1_task_aware"]) == round(aware, 4)


@pytest.mark.parametrize("card", ["digits_b0s2", "synthetic_b0s2"])
def test_cli_beats_finetune_on_reduced_cards(tmp_path, card):
    runs = {m: cli_run(tmp_path, m, card, "--epochs", "3") for m in ("seed", "finetune")}
    metrics = {m: json.loads((r / "metrics.json").read_text()) for m, r in runs.items()}
    assert metrics["seed"]["avg_acc"] > metrics["finetune"]["avg_acc"] + 10
    assert metrics["seed"]["last_acc"] > metrics["finetune"]["last_acc"] + 10
    steps = read_steps(runs["seed"])
    assert [s["expert_mode"] for s in steps] == ["new"] * 3 + ["finetune"] * 2      # card: K = 3
    assert [int(s["extractors"]) for s in steps] == [1, 2, 3, 3, 3]
    assert all(int(s["params"]) == int(s["params_networks"]) + int(s["params_gaussians"]) for s in steps)
    assert all(float(s["top1_task_aware"]) >= float(s["top1"]) for s in steps)
    phases = {e["phase"] for e in map(json.loads, (runs["seed"] / "events.jsonl").read_text().splitlines())
              if "epoch" in e}
    assert phases == {"seed_expert", "seed_finetune"}


def test_report_shows_seed_beside_its_published_average_with_task_mean(tmp_path):
    from test_report import make_run, read_csv

    from cilbench.report import build_report
    for s, avg in ((0, 60.0), (1, 62.0)):
        make_run(tmp_path / "runs", "cifar100_b0s10", "seed", s, avg=avg, memory_size=0)   # exemplar-free
    build_report(tmp_path / "runs", tmp_path / "out", metrics=["avg", "avg_task_mean"])
    rows = read_csv(tmp_path / "out" / "tables" / "cifar100_b0s10.csv")
    published = [r for r in rows if r["kind"] == "published" and r["method"] == "SEED"]
    assert published and published[0]["avg_task_mean"] == "61.7‡"   # ‡: unverified; SEED reports task-mean
    delta = [r for r in rows if r["kind"] == "delta"]
    assert len(delta) == 1 and float(delta[0]["avg_task_mean"]) == pytest.approx(61.0 - 61.7)
    ours = next(r for r in rows if r["kind"] == "ours")
    assert ours["method"] == "seed" and "avg_task_mean" in ours and float(ours["avg_task_mean"]) == 61.0


# ---------------------------------------------------------------------------------------------------------
# AutoAugment with torchvision's operations, batched per sample (the code's PIL ones: test_seed_fidelity.py)


def test_autoaugment_magnitudes_and_ops():
    from cilbench.data.autoaugment import apply_op, magnitude
    assert [magnitude("Posterize", b, 32, 32) for b in (0, 9)] == [8.0, 4.0]
    assert magnitude("Solarize", 0, 32, 32) == 255.0 and magnitude("Solarize", 9, 32, 32) == 0.0
    assert magnitude("Rotate", 9, 32, 32) == 30.0 and magnitude("TranslateX", 9, 32, 331) == pytest.approx(150.0)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_op(x, "Invert", 0.0), 255 - x)
    assert torch.equal(apply_op(x, "Rotate", 0.0), x) and torch.equal(apply_op(x, "ShearX", 0.0), x)


def test_autoaugment_batched_equals_per_sample_reference():
    from torchvision.transforms import AutoAugment, AutoAugmentPolicy

    from cilbench.data.autoaugment import SIGNED, apply_op, auto_augment, magnitude
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = auto_augment(x, "cifar10", torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.float32 and 0 <= float(out.min()) <= float(out.max()) <= 1
    assert torch.equal(out, auto_augment(x, "cifar10", torch.Generator().manual_seed(7)))    # seeded
    policies = AutoAugment(AutoAugmentPolicy.CIFAR10).policies
    gen = torch.Generator().manual_seed(7)
    choice = torch.randint(len(policies), (24,), generator=gen)
    draws = [(torch.rand(24, generator=gen), torch.rand(24, generator=gen) < 0.5) for _ in range(2)]
    img = (x * 255).round().to(torch.uint8)
    for i in range(24):                         # one sample at a time
        sample = img[i:i + 1]
        for slot, (coin, negative) in enumerate(draws):
            op, prob, level = policies[int(choice[i])][slot]
            if coin[i] < prob:
                m = magnitude(op, level, 16, 16)
                sample = apply_op(sample, op, -m if (bool(negative[i]) and op in SIGNED) else m)
        assert torch.equal(out[i], sample[0].float() / 255), i
    assert not torch.equal(out, img.float() / 255)


def test_seed_adds_the_official_augmentation_on_paper_cards():
    """SEED's AutoAugment + Cutout are resolved with the config, so config.yaml records what SEED trained with."""
    from cilbench.run.runner import RunRequest, resolve
    resolved = resolve(RunRequest(method="seed", protocol=CARD, overrides=["seed.autoaugment=auto", "seed.cutout=16"]))
    aug = resolved.protocol.augment
    assert (aug.autoaugment, aug.cutout, aug.crop_padding) == ("cifar10", 16, 1)      # on top of the card's
    assert aug.cutout_normalised is False       # the code's Cutout sits before Normalize: a black hole
    assert resolved.config["protocol"]["augment"]["cutout_normalised"] is False
    assert resolved.config["protocol"]["augment"]["autoaugment"] == "cifar10"       # recorded in config.yaml
    stream = Stream(resolved.protocol, load_dataset(resolved.protocol, None), torch.device("cpu"))
    engine = Engine(stream, RuntimeOptions(device="cpu"), torch.device("cpu"))
    engine.begin_task(0, 0)
    batch = engine.train_transform(stream.train.images[:8])
    assert batch.shape == (8, 1, 8, 8) and torch.isfinite(batch).all()
    plain = resolve(RunRequest(method="seed", protocol="digits_b0s2"))
    assert plain.protocol.augment.autoaugment == "none"                               # reduced card: none
