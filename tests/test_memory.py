"""Exemplar memory: herding, budgets per policy, random selection, reservoir sampling, byte accounting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cilbench.data.protocol import MemoryConfig
from cilbench.train.memory import ExemplarMemory, ReservoirMemory, class_balanced_subset, herding, make_memory


def _gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --- herding -------------------------------------------------------------------------------------------

# Four unit vectors; their mean is (0.52, 0.64). Worked by hand:
#   k=1: distances to the mean 0.80, 0.63, 0.28, 0.40          -> f2
#   k=2: |mu - (f2 + f)/2| = 0.51 (f0), 0.20 (f1), 0.14 (f3)    -> f3
#   k=3: |mu - (f2 + f3 + f)/3| = 0.21 (f0), 0.27 (f1)          -> f0, then f1
TOY = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.28, 0.96]])


def test_herding_order_on_a_hand_checked_example():
    assert herding(TOY, 4).tolist() == [2, 3, 0, 1]
    assert herding(TOY, 2).tolist() == [2, 3]


def test_herding_first_pick_is_closest_to_the_mean():
    feats = torch.randn(50, 6, generator=_gen(1))
    normed = F.normalize(feats, dim=1)
    closest = int(torch.linalg.vector_norm(normed - normed.mean(0), dim=1).argmin())
    assert int(herding(feats, 5)[0]) == closest


def test_herding_works_on_normalised_features():
    scaled = TOY * torch.tensor([[5.0], [0.1], [2.0], [7.0]])
    assert herding(scaled, 4).tolist() == [2, 3, 0, 1]


def test_herding_picks_are_distinct_even_with_duplicates():
    feats = torch.cat([TOY, TOY[2:3], TOY[2:3]])        # f2 three times
    picks = herding(feats, 6).tolist()
    assert len(picks) == 6 and sorted(picks) == list(range(6))
    many = herding(torch.randn(30, 4, generator=_gen(2)), 100)
    assert sorted(many.tolist()) == list(range(30))      # capped at the number of samples


def test_herding_mean_approaches_the_class_mean():
    feats = F.normalize(torch.randn(200, 8, generator=_gen(3)), dim=1)
    mu = feats.mean(0)
    picks = herding(feats, 20)
    herd_err = float(torch.linalg.vector_norm(feats[picks].mean(0) - mu))
    rand_err = float(torch.linalg.vector_norm(feats[:20].mean(0) - mu))
    assert herd_err < rand_err / 3


# --- offline memory ------------------------------------------------------------------------------------------

class ToyStream:
    """Label c owns train indices [10c, 10c + n); fixed random 3-d features per index."""

    def __init__(self, n=10, seed=0):
        self.n = n
        self.features = torch.randn(10 * 20, 3, generator=_gen(seed))
        self.calls = []

    def class_indices(self, label):
        return torch.arange(10 * label, 10 * label + self.n)

    def feats(self, idx):
        self.calls.append(idx.clone())
        return self.features[idx]


def test_fixed_total_quota_is_floor_of_total_over_seen():
    mem = ExemplarMemory(MemoryConfig(policy="fixed_total", total=2000))
    assert [mem.per_class(n) for n in (10, 20, 30, 50, 100)] == [200, 100, 66, 40, 20]
    assert ExemplarMemory(MemoryConfig(policy="per_class", per_class=20)).per_class(73) == 20


def test_fixed_total_shrinks_by_truncation_keeping_herding_order():
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy="fixed_total", total=12, selection="herding"))
    mem.update(range(0, 2), toy.class_indices, toy.feats, _gen())
    assert mem.quota == 6 and len(mem) == 12
    first = {c: mem.class_exemplars(c).clone() for c in (0, 1)}
    for c in (0, 1):
        expected = toy.class_indices(c)[herding(toy.features[toy.class_indices(c)], 6)]
        assert torch.equal(first[c], expected)
    n_calls = len(toy.calls)

    mem.update(range(2, 4), toy.class_indices, toy.feats, _gen())
    assert mem.quota == 3 and len(mem) == 12
    assert len(toy.calls) == n_calls + 2                 # only the new classes are herded
    for c in (0, 1):
        assert torch.equal(mem.class_exemplars(c), first[c][:3])
    mem.update(range(4, 5), toy.class_indices, toy.feats, _gen())
    assert mem.quota == 2 and len(mem) == 10             # 12 // 5 = 2, the remainder stays unused
    for c in (0, 1):
        assert torch.equal(mem.class_exemplars(c), first[c][:2])
    idx = mem.indices()
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    for c in range(5):
        assert set(mem.class_exemplars(c).tolist()) <= set(toy.class_indices(c).tolist())
    assert mem.nbytes(3 * 32 * 32) == 10 * 3 * 32 * 32


def test_holds_tells_whether_a_task_was_selected_already():
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy="fixed_total", total=12, selection="herding"))
    assert not mem.holds(range(0, 2))
    mem.update(range(0, 2), toy.class_indices, toy.feats, _gen())
    assert mem.holds(range(0, 2)) and not mem.holds(range(2, 4)) and not mem.holds(range(1, 3))


def test_per_class_memory_grows_with_the_classes():
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy="per_class", per_class=4))
    sizes = []
    for lo, hi in ((0, 5), (5, 7), (7, 9)):
        mem.update(range(lo, hi), toy.class_indices, toy.feats, _gen())
        sizes.append(len(mem))
        assert all(len(mem.class_exemplars(c)) == 4 for c in range(hi))
    assert sizes == [20, 28, 36]


def test_replay_draws_follow_every_change_of_the_memory():
    """draw() concatenates the exemplars once per memory state; an update, new payload or a loaded state must
    show in the very next draw (labels, indices and payload aligned)."""
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy="fixed_total", total=20))
    mem.update(range(0, 2), toy.class_indices, toy.feats, _gen())
    for c in range(2):
        mem.write_payload(c, {"logits": torch.full((10, 1), float(c))})
    first = mem.draw(100, _gen(), payload=("logits",))
    assert sorted(first.labels.tolist()) == [0] * 10 + [1] * 10
    assert torch.equal(first.payload["logits"].flatten(), first.labels.float())
    mem.update(range(2, 4), toy.class_indices, toy.feats, _gen())      # quota 10 -> 5, two more classes
    for c in range(2, 4):
        mem.write_payload(c, {"logits": torch.full((10, 1), float(c))})
    after = mem.draw(100, _gen(), payload=("logits",))
    assert sorted(after.labels.tolist()) == sorted([0, 1, 2, 3] * 5)
    assert torch.equal(after.payload["logits"].flatten(), after.labels.float())
    assert torch.equal(after.labels, after.idx // 10)                   # each index is its class's sample
    restored = ExemplarMemory(MemoryConfig(policy="fixed_total", total=20))
    restored.draw(5, _gen())
    restored.load_state_dict(mem.state_dict(), torch.device("cpu"))
    assert len(restored.draw(100, _gen()).idx) == 20


def test_small_classes_are_kept_whole():
    toy = ToyStream(n=3)
    mem = ExemplarMemory(MemoryConfig(policy="per_class", per_class=5))
    mem.update(range(0, 2), toy.class_indices, toy.feats, _gen())
    assert len(mem) == 6 and len(mem.indices()) == 6


def test_random_selection_is_seeded():
    toy = ToyStream(n=10)

    def picks(seed):
        mem = ExemplarMemory(MemoryConfig(policy="per_class", per_class=4, selection="random"))
        mem.update(range(0, 3), toy.class_indices, toy.feats, _gen(seed))
        return mem.indices()

    a, b, c = picks(0), picks(0), picks(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(set(a.tolist())) == 12
    assert toy.calls == []                                 # random selection needs no features


def test_exemplar_memory_state_dict_round_trip(tmp_path):
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy="fixed_total", total=12))
    mem.update(range(0, 2), toy.class_indices, toy.feats, _gen())
    mem.update(range(2, 4), toy.class_indices, toy.feats, _gen())
    torch.save(mem.state_dict(), tmp_path / "m.pt")
    other = ExemplarMemory(MemoryConfig(policy="fixed_total", total=12))
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True), "cpu")
    assert other.quota == mem.quota and len(other) == len(mem)
    assert torch.equal(other.indices(), mem.indices())


def test_make_memory_per_policy():
    assert make_memory(MemoryConfig(policy="none"), "cpu") is None
    res = make_memory(MemoryConfig(policy="reservoir", size=7), "cpu")
    assert isinstance(res, ReservoirMemory) and res.size == 7
    assert isinstance(make_memory(MemoryConfig(policy="per_class"), "cpu"), ExemplarMemory)
    assert isinstance(make_memory(MemoryConfig(policy="fixed_total"), "cpu"), ExemplarMemory)


# --- reservoir ----------------------------------------------------------------------------------------------

def test_reservoir_keeps_everything_while_filling():
    mem = ReservoirMemory(10, "cpu")
    g = _gen()
    mem.add(torch.arange(4), torch.arange(4) % 2, g)
    assert mem.indices().tolist() == [0, 1, 2, 3]
    mem.add(torch.arange(4, 10), torch.arange(4, 10) % 2, g)
    assert mem.indices().tolist() == list(range(10))
    assert mem.labels.tolist() == [i % 2 for i in range(10)]
    assert mem.seen == 10


def test_reservoir_size_is_never_exceeded():
    mem = ReservoirMemory(10, "cpu")
    g = _gen(1)
    for start in range(0, 300, 7):
        idx = torch.arange(start, start + 7)
        mem.add(idx, idx % 5, g)
        assert len(mem) == min(10, start + 7)
        assert len(mem.labels) == len(mem)
    assert mem.seen == 301
    kept = mem.indices().tolist()
    assert len(set(kept)) == 10 and all(0 <= i < 301 for i in kept)
    assert torch.equal(mem.labels, mem.indices() % 5)           # labels travel with their entries
    assert max(kept) >= 10                                       # later samples did get in


def test_reservoir_is_uniform_over_the_stream():
    trials, n, size = 400, 60, 6
    counts = torch.zeros(n)
    g = _gen(2)
    for _ in range(trials):
        mem = ReservoirMemory(size, "cpu")
        for start in range(0, n, 10):
            idx = torch.arange(start, start + 10)
            mem.add(idx, idx, g)
        counts[mem.indices()] += 1
    p = size / n                                                # every sample kept with probability 0.1
    expected, sd = trials * p, math.sqrt(trials * p * (1 - p))
    assert (counts - expected).abs().max() < 5 * sd
    early, late = counts[:size].mean(), counts[-size:].mean()  # no bias towards the filling phase
    assert abs(float(early - late)) < 4 * sd


def test_reservoir_stores_payload_with_its_entries(tmp_path):
    mem = ReservoirMemory(8, "cpu")
    g = _gen(3)
    for start in range(0, 50, 5):
        idx = torch.arange(start, start + 5)
        logits = idx[:, None].float() * torch.tensor([[1.0, -1.0, 0.5]])
        feats = (idx[:, None] * 10 + torch.arange(4)).to(torch.int32)
        mem.add(idx, idx % 3, g, payload={"logits": logits, "feats": feats})
        assert mem.payload["logits"].shape == (len(mem), 3)
    assert torch.equal(mem.payload["logits"][:, 0], mem.idx.float())
    assert torch.equal(mem.payload["logits"][:, 1], -mem.idx.float())
    assert torch.equal(mem.payload["feats"][:, 0], (mem.idx * 10).to(torch.int32))
    # bytes: image bytes + index/label (16) + the payload of each entry
    assert mem.nbytes(64) == 8 * (64 + 16 + 3 * 4 + 4 * 4)


def test_reservoir_payload_registered_after_the_first_add():
    # payload first given once the buffer is partly filled, then once it is full, then left out
    mem = ReservoirMemory(6, "cpu")
    g = _gen(5)
    mem.add(torch.arange(3), torch.zeros(3, dtype=torch.int64), g)
    mem.add(torch.arange(3, 8), torch.zeros(5, dtype=torch.int64), g,
            payload={"logits": torch.arange(3, 8)[:, None].float()})
    assert mem.payload["logits"].shape == (6, 1)
    for pos in range(6):
        # entries that came without payload have zeros; the others carry their own
        expected = float(mem.idx[pos]) if int(mem.idx[pos]) >= 3 else 0.0
        assert float(mem.payload["logits"][pos, 0]) == expected
    for start in range(8, 40, 4):
        idx = torch.arange(start, start + 4)
        mem.add(idx, idx % 2, g, payload={"logits": idx[:, None].float(), "feats": idx[:, None].float() * 2})
        mem.add(idx + 100, idx % 2, g)
        assert len(mem) == 6
        assert mem.payload["logits"].shape == (6, 1) and mem.payload["feats"].shape == (6, 1)


def test_reservoir_state_dict_round_trip(tmp_path):
    mem = ReservoirMemory(8, "cpu")
    g = _gen(4)
    for start in range(0, 40, 5):
        idx = torch.arange(start, start + 5)
        mem.add(idx, idx % 3, g, payload={"logits": idx[:, None].float().repeat(1, 2)})
    torch.save(mem.state_dict(), tmp_path / "r.pt")
    other = ReservoirMemory(8, "cpu")
    other.load_state_dict(torch.load(tmp_path / "r.pt", weights_only=True), "cpu")
    assert torch.equal(other.idx, mem.idx) and torch.equal(other.labels, mem.labels)
    assert other.seen == mem.seen == 40
    assert torch.equal(other.payload["logits"], mem.payload["logits"])
    # a restored buffer continues exactly like the original
    state = g.get_state()
    g2 = torch.Generator()
    g2.set_state(state)
    more = torch.arange(40, 60)
    mem.add(more, more % 3, g, payload={"logits": more[:, None].float().repeat(1, 2)})
    other.add(more, more % 3, g2, payload={"logits": more[:, None].float().repeat(1, 2)})
    assert torch.equal(other.idx, mem.idx) and other.seen == mem.seen == 60


def test_reservoir_sample_is_seeded_and_within_the_buffer():
    mem = ReservoirMemory(20, "cpu")
    assert mem.sample(5, _gen()) is None
    mem.add(torch.arange(30), torch.zeros(30, dtype=torch.int64), _gen())
    a, b = mem.sample(5, _gen(7)), mem.sample(5, _gen(7))
    assert torch.equal(a, b) and len(set(a.tolist())) == 5 and int(a.max()) < 20
    assert len(mem.sample(50, _gen())) == 20


def test_class_balanced_subset():
    indices = torch.arange(100, 110)
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    sub = class_balanced_subset(indices, labels, _gen())
    sub_labels = labels[sub - 100]
    assert torch.bincount(sub_labels).tolist() == [2, 2, 2]      # the smallest class count
    assert len(set(sub.tolist())) == 6
    two = class_balanced_subset(indices, labels, _gen(), per_class=1)
    assert torch.bincount(labels[two - 100]).tolist() == [1, 1, 1]
    assert torch.equal(class_balanced_subset(indices, labels, _gen(5)), class_balanced_subset(indices, labels, _gen(5)))


@pytest.mark.parametrize("policy", ["fixed_total", "per_class"])
def test_memory_len_matches_indices(policy):
    toy = ToyStream(n=10)
    mem = ExemplarMemory(MemoryConfig(policy=policy, total=9, per_class=3))
    mem.update(range(0, 3), toy.class_indices, toy.feats, _gen())
    assert len(mem) == len(mem.indices()) == 9
