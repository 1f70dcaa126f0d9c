"""One contract test for every registered method, built-in or plug-in (parametrised over the registry).

What the harness relies on from any method: scores as wide as the seen classes, a footprint that adds up,
a state that round-trips, a resumed run equal to an uninterrupted one, no memory for exemplar-free methods,
and one pass over the stream for online methods. Method-specific resume points (SEED after a fine-tuned
task, TSD mid-group) are extra cases of the same test.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from harness import learn_and_remember, tiny_card, tiny_context

from cilbench.config import build
from cilbench.data.datasets import load_dataset
from cilbench.data.protocol import build_protocol
from cilbench.data.stream import Stream
from cilbench.kit import Context, Method
from cilbench.kit.registry import known_methods
from cilbench.train.engine import Engine

# options a method needs on the tiny card (8x8 images, resnet20 at width 4: 16 output channels)
TINY_SETS = {"seed": {"latent_dim": 8},
             "dytox": {"embed_dim": 8, "heads": 2, "sab_depth": 1, "patch_size": 2}}

OFFLINE = tiny_card(name="contract_offline")
ONLINE = tiny_card(name="contract_online", regime="online", memory={"policy": "reservoir", "size": 24},
                   train={"epochs": 1, "batch_size": 8, "schedule": "constant"}, online={"replay_batch": 8})

METHODS = sorted(known_methods())


def card_for(cls: type[Method], regime: str | None = None) -> dict:
    regime = regime or ("offline" if "offline" in cls.regimes else "online")
    return OFFLINE if regime == "offline" else ONLINE


METHOD_REGIMES = [(name, regime) for name in METHODS for regime in known_methods()[name].cls.regimes]


def make(name: str, card: dict):
    entry = known_methods()[name]
    cls = entry.cls
    ctx, stream, engine, memory = tiny_context(card)
    if not cls.uses_exemplars:
        ctx.memory = memory = None
    cfg = build(cls.Config, {**entry.defaults, **TINY_SETS.get(cls.family, {})}, "test")
    engine.begin_task(0, 0)
    return cls(cfg, ctx), ctx, stream, engine, memory


def step(method, ctx, stream, engine, memory, t):
    if memory is not None and hasattr(memory, "update"):       # offline memory: herding, then payload
        task = learn_and_remember(method, ctx, stream, engine, memory, t)
        method.after_memory_update(task, ctx)
        return task
    task = stream.task(t)
    engine.begin_task(0, t)
    method.learn(task, ctx)
    return task


@pytest.mark.parametrize("name", METHODS)
def test_scores_footprint_and_state_round_trip(name):
    cls = known_methods()[name].cls
    card = card_for(cls)
    method, ctx, stream, engine, memory = make(name, card)
    x = engine.test_transform(stream.test.images[:7])
    for t in range(2):
        task = step(method, ctx, stream, engine, memory, t)
        method.eval()
        with torch.no_grad():
            scores = method.scores(x)
        assert scores.shape == (7, task.n_seen), f"{name}: scores must cover exactly the seen classes"
        assert torch.isfinite(scores).all()
        foot = method.inference_footprint()
        assert foot.extractors >= 1 and foot.params > 0
        assert foot.params_backbone is None or 0 < foot.params_backbone <= foot.params
        assert method.features(x).shape[0] == 7

    state = method.state_dict()
    fresh, *_ = make(name, card)
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.scores(x), scores), f"{name}: a loaded state must score as the saved one"
    assert fresh.inference_footprint() == method.inference_footprint()


@pytest.mark.parametrize("name, regime", METHOD_REGIMES)
def test_memory_and_stream_as_the_regime_allows(name, regime, tmp_path, cli, monkeypatch):
    """Exemplar-free methods never get a memory; online methods see each stream sample exactly once."""
    cls = known_methods()[name].cls
    card = card_for(cls, regime)
    seen_memory, stream_batches = [], []
    learn = cls.learn

    def spy(self, task, ctx: Context):
        seen_memory.append(ctx.memory)
        stream_batches.append([])
        return learn(self, task, ctx)

    batches = Engine.batches

    def record(self, indices, *args, **kwargs):
        for idx in batches(self, indices, *args, **kwargs):
            if stream_batches:
                stream_batches[-1].append(idx.clone())
            yield idx

    monkeypatch.setattr(cls, "learn", spy)
    monkeypatch.setattr(Engine, "batches", record)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    sets = [f"{cls.family}.{k}={v}" for k, v in TINY_SETS.get(cls.family, {}).items()]
    args = ["run", "--method", name, "--protocol", str(path), "--out", str(tmp_path / "runs"), "--device", "cpu",
            "--quiet", "--epochs", "1"] + [a for s in sets for a in ("--set", s)]
    result = cli(*args)
    assert result.exit_code == 0, result.output + result.stderr
    assert len(seen_memory) == card["tasks"]
    if not cls.uses_exemplars:
        assert all(m is None for m in seen_memory)
    if card["regime"] == "online":
        protocol = build_protocol(dict(card), "tiny")
        stream = Stream(protocol, load_dataset(protocol, None), torch.device("cpu"))
        for t, fed in enumerate(stream_batches):
            seen = torch.sort(torch.cat(fed)).values
            assert torch.equal(seen, torch.sort(stream.task(t).train_idx).values), f"{name}: task {t}"


# method-specific resume points beside the default (after task 1 of 3)
RESUME_EXTRA = [
    ("seed", 2, ("--set", "seed.experts=2")),                       # after the last new expert's task
    ("tsd_grc", 1, ("--set", "tsd_grc.n_extractors=2", "--set", "tsd_grc.grc_teacher=all_group")),
    ("tsd_fixed", 2, ("--set", "tsd_fixed.n_extractors=2")),        # after a merge: previous target set
    ("der_prune", 2, ()),
]
RESUME_CASES = [(name, 1, ()) for name in METHODS] + [c for c in RESUME_EXTRA if c[0] in METHODS]
TIMING = {"train_seconds", "eval_seconds", "time_split"}


def _run_files(run) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    steps = [line.split(",") for line in (run / "steps.csv").read_text().splitlines()]
    keep = [i for i, h in enumerate(steps[0]) if not h.endswith("_seconds")]
    return {"metrics": {k: v for k, v in metrics.items() if k not in TIMING},
            "steps": [[row[i] for i in keep] for row in steps],
            "matrix": (run / "acc_matrix.csv").read_text(), "matrix5": (run / "acc_matrix_top5.csv").read_text()}


@pytest.mark.parametrize("name, stop, extra", RESUME_CASES)
def test_a_resumed_run_equals_an_uninterrupted_one(name, stop, extra, tmp_path, cli):
    cls = known_methods()[name].cls
    card = card_for(cls)
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump(card))
    sets = [f"{cls.family}.{k}={v}" for k, v in TINY_SETS.get(cls.family, {}).items()]
    base = ["run", "--method", name, "--protocol", str(path), "--device", "cpu", "--quiet", "--epochs", "1",
            "--deterministic", "--set", "runtime.threads=1", *[a for s in sets for a in ("--set", s)], *extra]
    full = cli(*base, "--out", str(tmp_path / "full"))
    assert full.exit_code == 0, full.output + full.stderr
    part = cli(*base, "--out", str(tmp_path / "part"), "--stop-after", str(stop))
    assert part.exit_code == 0, part.output + part.stderr
    run_name = next((tmp_path / "part" / card["name"]).iterdir()).name
    run = tmp_path / "part" / card["name"] / run_name / "seed0"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["tasks_done"] == stop
    resumed = cli(*base, "--out", str(tmp_path / "part"), "--resume")
    assert resumed.exit_code == 0, resumed.output + resumed.stderr
    assert _run_files(run) == _run_files(tmp_path / "full" / card["name"] / run_name / "seed0")
