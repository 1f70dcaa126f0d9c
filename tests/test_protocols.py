"""Protocol cards, class orders, strict config loading and the label remapping of the Stream."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import torch

from cilbench.config import apply_override, build, parse_override
from cilbench.data.datasets import make_synthetic
from cilbench.data.protocol import (
    PROTOCOL_DIR,
    build_protocol,
    known_protocols,
    load_card,
    load_protocol,
    resolve_class_order,
)
from cilbench.data.stream import Stream
from cilbench.errors import UserError

ALL_CARDS = known_protocols()
NAME_RULE = re.compile(r"^(?P<dataset>[a-z0-9]+?)(?P<online>_online)?_b(?P<base>\d+)s(?P<step>\d+)$")


# --- class orders -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order, head", [
    ("seed1993", [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89]),
    ("der_trial1", [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89]),
    ("der_trial0", [62, 54, 84, 20]),
    ("der_trial2", [87, 0, 52, 58, 44, 91]),
    ("podnet1", [87, 0, 52, 58, 44, 91]),
    ("der_trial3", [58, 30, 93, 69]),
    ("podnet2", [58, 30, 93, 69]),
])
def test_named_class_orders_start_as_published(order, head):
    full = resolve_class_order(order, 100, 100)
    assert full[: len(head)] == head
    assert sorted(full) == list(range(100))


@pytest.mark.parametrize("order", ["seed1993", "der_trial0", "der_trial1", "der_trial2", "der_trial3",
                                   "der_trial4", "podnet1", "podnet2", "podnet3", "natural"])
def test_every_named_order_is_a_permutation(order):
    assert sorted(resolve_class_order(order, 100, 100)) == list(range(100))


def test_order_aliases_are_the_same_lists():
    assert resolve_class_order("der_trial1", 100, 100) == resolve_class_order("seed1993", 100, 100)
    assert resolve_class_order("der_trial2", 100, 100) == resolve_class_order("podnet1", 100, 100)
    assert resolve_class_order("der_trial3", 100, 100) == resolve_class_order("podnet2", 100, 100)
    assert resolve_class_order("der_trial4", 100, 100) == resolve_class_order("podnet3", 100, 100)
    assert resolve_class_order("der_trial0", 100, 100) != resolve_class_order("seed1993", 100, 100)


def test_seed_order_is_numpy_legacy_permutation():
    import numpy as np
    np.random.seed(7)
    expected = np.random.permutation(10).tolist()
    assert resolve_class_order("seed7", 10, 10) == expected
    assert resolve_class_order("natural", 4, 10) == [0, 1, 2, 3]


def test_explicit_order_and_truncation():
    assert resolve_class_order([3, 1, 2, 0], 4, 4) == [3, 1, 2, 0]
    # a protocol over fewer classes than the data set uses the head of the order
    assert resolve_class_order("seed1993", 4, 100) == [68, 56, 78, 8]


@pytest.mark.parametrize("order, match", [
    ("seedling", "unknown order"),
    ([0, 1, 1, 2], "distinct"),
    ([0, 1, 2, 10], "distinct"),
    ([0, 1], "gives 2 classes"),
])
def test_bad_class_orders_are_user_errors(order, match):
    with pytest.raises(UserError, match=match):
        resolve_class_order(order, 4, 10)


def test_unknown_order_lists_the_known_ones():
    with pytest.raises(UserError) as info:
        resolve_class_order("podnet9", 100, 100)
    assert "seed1993" in str(info.value) and "der_trial0" in str(info.value)


# --- the cards in protocols/ -------------------------------------------------------------------------------

def test_cards_are_present():
    for name in ["cifar100_b0s10", "cifar100_b50s2", "cifar100_b50s25", "cifar100_b50s1", "imagenet100_b0s10",
                 "digits_b0s2", "digits_online_b0s2"]:
        assert name in ALL_CARDS


@pytest.mark.parametrize("name", ALL_CARDS)
def test_every_card_loads_and_adds_up(name):
    p = load_protocol(name)
    assert p.name == name == (PROTOCOL_DIR / f"{name}.yaml").stem
    m = NAME_RULE.match(name)
    assert m, f"{name} does not follow {{dataset}}_b{{base}}s{{step}}"
    assert m["dataset"] == p.dataset
    assert int(m["base"]) == p.base and int(m["step"]) == p.step
    assert (m["online"] is not None) == (p.regime == "online")
    sizes = p.task_sizes
    assert sum(sizes) == p.num_classes
    assert len(sizes) == p.tasks
    assert sizes[0] == (p.base if p.base else p.step)
    assert all(s == p.step for s in sizes[1:])
    order = resolve_class_order(p.class_order, p.num_classes, p.num_classes)
    assert sorted(order) == list(range(p.num_classes))
    # the card states its task count in its description
    assert p.description


@pytest.mark.parametrize("name", ALL_CARDS)
def test_every_card_follows_the_memory_policy(name):
    p = load_protocol(name)
    paper = p.dataset in ("cifar100", "imagenet100")
    if p.regime == "online":
        assert p.memory.policy == "reservoir"
        assert p.memory.size > 0
    elif p.base == 0:
        assert p.memory.policy == "fixed_total"
        if paper:
            assert p.memory.total == 2000
    else:
        assert p.memory.policy == "per_class"
        assert p.memory.per_class == 20


@pytest.mark.parametrize("name, tasks, sizes_head", [
    ("cifar100_b50s2", 26, [50, 2, 2]),
    ("cifar100_b50s25", 3, [50, 25, 25]),
    ("cifar100_b0s10", 10, [10, 10, 10]),
    ("cifar100_b50s1", 51, [50, 1, 1]),
    ("cifar100_b50s5", 11, [50, 5, 5]),
    ("cifar100_b50s10", 6, [50, 10, 10]),
    ("cifar100_b40s3", 21, [40, 3, 3]),
    ("cifar100_b0s2", 50, [2, 2, 2]),
    ("cifar100_b0s5", 20, [5, 5, 5]),
    ("cifar100_b0s20", 5, [20, 20, 20]),
    ("imagenet100_b0s10", 10, [10, 10, 10]),
    ("imagenet100_b50s5", 11, [50, 5, 5]),
    ("digits_b0s2", 5, [2, 2, 2]),
    ("digits_b4s2", 4, [4, 2, 2]),
])
def test_task_counts(name, tasks, sizes_head):
    p = load_protocol(name)
    assert p.tasks == tasks == len(p.task_sizes)
    assert p.task_sizes[:3] == sizes_head


def test_paper_cards_use_the_seed1993_order():
    for name in ALL_CARDS:
        if name.startswith(("cifar100", "imagenet100")):
            assert load_protocol(name).class_order == "seed1993", name


# --- card validation ------------------------------------------------------------------------------------------

def _card(**changes):
    card = load_card("digits_b0s2")
    card.update(changes)
    return card


def test_card_whose_classes_do_not_add_up():
    with pytest.raises(UserError, match="do not add up") as info:
        build_protocol(_card(step=3, tasks=4), "bad.yaml")
    assert str(info.value).startswith("bad.yaml")


def test_card_with_a_wrong_task_count():
    with pytest.raises(UserError, match="tasks is 4") as info:
        build_protocol(_card(tasks=4), "bad.yaml")
    assert "5 tasks" in str(info.value)


@pytest.mark.parametrize("changes, match", [
    (dict(colour="red"), "unknown key 'colour'"),
    (dict(base="four"), r"bad\.yaml: key 'base': expected int"),
    (dict(dataset="mnist"), r"bad\.yaml: key 'dataset': expected one of"),
    (dict(train={"lr": "fast"}), r"bad\.yaml: key 'train\.lr': expected float"),
    (dict(train={"epochs": 0}), "epochs and batch_size must be >= 1"),
    (dict(memory={"policy": "reservoir"}), "reservoir is for online"),
    (dict(regime="online"), "online protocols use memory.policy reservoir"),
    (dict(memory={"polcy": "none"}), r"bad\.yaml: unknown key 'memory\.polcy'"),
])
def test_bad_cards_name_the_culprit(changes, match):
    with pytest.raises(UserError, match=match):
        build_protocol(_card(**changes), "bad.yaml")


def test_card_from_a_yaml_path(tmp_path):
    path = tmp_path / "mycard.yaml"
    path.write_text((PROTOCOL_DIR / "digits_b0s2.yaml").read_text().replace("name: digits_b0s2\n", ""))
    p = load_protocol(str(path))
    assert p.name == "mycard"
    with pytest.raises(UserError, match="not found"):
        load_protocol(str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match="unknown protocol 'nope'; known: .*digits_b0s2"):
        load_protocol("nope")


# --- strict typed config ----------------------------------------------------------------------------------

@dataclass
class _Inner:
    k: int = 1


@dataclass
class _Opts:
    a: float = 1.0
    b: Optional[int] = None
    c: list[int] = field(default_factory=list)
    d: Literal["x", "y"] = "x"
    e: bool = False
    inner: _Inner = field(default_factory=_Inner)


def test_build_coerces_and_checks_types():
    o = build(_Opts, {"a": 2, "b": None, "c": [1, 2], "d": "y", "e": True, "inner": {"k": 3}}, "f.yaml")
    assert o.a == 2.0 and isinstance(o.a, float)
    assert o.b is None and o.c == [1, 2] and o.d == "y" and o.e is True and o.inner.k == 3
    bad = [({"a": "x"}, r"f\.yaml: key 'a'"), ({"b": 1.5}, r"f\.yaml: key 'b'"),
           ({"c": [1, "z"]}, r"f\.yaml: key 'c\[1\]'"), ({"d": "z"}, r"f\.yaml: key 'd'"),
           ({"e": 1}, r"f\.yaml: key 'e'"), ({"inner": {"q": 1}}, r"f\.yaml: unknown key 'inner\.q'"),
           ({"a": True}, r"f\.yaml: key 'a'")]
    for data, match in bad:
        with pytest.raises(UserError, match=match):
            build(_Opts, data, "f.yaml")


def test_overrides_are_parsed_as_yaml():
    assert parse_override("train.lr=0.05") == (["train", "lr"], 0.05)
    assert parse_override("train.milestones=[10, 20]") == (["train", "milestones"], [10, 20])
    assert parse_override("flip=true") == (["flip"], True)
    assert parse_override("name=abc") == (["name"], "abc")
    with pytest.raises(UserError, match="key=value"):
        parse_override("train.lr")
    tree = {"train": {"lr": 0.1}}
    apply_override(tree, ["train", "lr"], 0.5)
    apply_override(tree, ["memory", "total"], 10)
    assert tree == {"train": {"lr": 0.5}, "memory": {"total": 10}}
    with pytest.raises(UserError, match="not a section"):
        apply_override(tree, ["train", "lr", "x"], 1)


# --- the Stream ---------------------------------------------------------------------------------------------

def _synthetic_stream(order, num_classes=6, base=2, step=2, tasks=3):
    card = {"name": "synthetic_test", "dataset": "synthetic", "num_classes": num_classes, "base": base,
            "step": step, "tasks": tasks, "class_order": order, "memory": {"policy": "per_class"},
            "data": {"synthetic": {"classes": 8, "image_size": 8, "train_per_class": 6, "test_per_class": 3}}}
    p = build_protocol(card, "test")
    dataset = make_synthetic(p.data)
    return p, dataset, Stream(p, dataset, torch.device("cpu"))


def test_stream_remaps_labels_to_the_order():
    order = [5, 2, 7, 0, 3, 6]
    p, dataset, stream = _synthetic_stream(order)
    assert stream.order == order
    for k, original in enumerate(order):
        for split, remapped in ((dataset.train, stream.train), (dataset.test, stream.test)):
            expected = split.images[split.labels == original]
            got = remapped.images[remapped.labels == k]
            assert torch.equal(got, expected), f"label {k} should hold class {original}"
    # classes outside the protocol (1 and 4 of the 8) are dropped
    assert len(stream.train) == 6 * 6 and len(stream.test) == 6 * 3
    assert set(stream.train.labels.tolist()) == set(range(6))


def test_stream_tasks_cover_contiguous_label_ranges():
    order = [5, 2, 7, 0, 3, 6]
    p, dataset, stream = _synthetic_stream(order, base=2, step=2, tasks=3)
    tasks = list(stream)
    assert [t.index for t in tasks] == [0, 1, 2]
    assert [list(t.classes) for t in tasks] == [[0, 1], [2, 3], [4, 5]]
    assert [t.class_ids for t in tasks] == [[5, 2], [7, 0], [3, 6]]
    assert [(t.n_old, t.n_new, t.n_seen) for t in tasks] == [(0, 2, 2), (2, 2, 4), (4, 2, 6)]
    for t in tasks:
        train_labels = stream.train.labels[t.train_idx]
        assert set(train_labels.tolist()) == set(t.classes)
        assert len(t.train_idx) == 6 * t.n_new
        test_labels = stream.test.labels[t.test_idx]
        assert set(test_labels.tolist()) == set(range(t.n_seen))
        assert len(t.test_idx) == 3 * t.n_seen
    assert stream.task_of_label.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(stream.class_indices(3), torch.nonzero(stream.train.labels == 3).flatten())


def test_stream_with_a_base_task():
    _, _, stream = _synthetic_stream("natural", num_classes=8, base=4, step=2, tasks=3)
    assert stream.task_sizes == [4, 2, 2]
    assert list(stream.task(0).classes) == [0, 1, 2, 3]
    assert list(stream.task(2).classes) == [6, 7]


# --- class orders per seed, augmentation lineage (issue 11 item 4, issue 9) ---------------------------------

def resolved(method: str, protocol: str, seed: int, *sets: str):
    from cilbench.run.runner import RunRequest, resolve
    return resolve(RunRequest(method=method, protocol=protocol, seed=seed, overrides=list(sets)))


def test_class_orders_map_seed_k_to_the_kth_order():
    """A three-seed run is DER's three-order protocol; config.yaml records the order used and the list."""
    orders = "class_orders=[der_trial2,der_trial3,der_trial4]"
    for seed, name in enumerate(["der_trial2", "der_trial3", "der_trial4"]):
        r = resolved("finetune", "cifar100_b50s5", seed, orders)
        assert r.protocol.class_order == name
        assert r.config["protocol"]["class_order"] == name
        assert r.config["class_order"] == {"name": name, "rule": f"class_orders[{seed}]",
                                           "orders": ["der_trial2", "der_trial3", "der_trial4"]}
    plain = resolved("finetune", "cifar100_b50s5", 1)
    assert plain.protocol.class_order == "seed1993"
    assert plain.config["class_order"] == {"name": "seed1993", "rule": "class_order", "orders": []}


def test_class_order_shuffle_draws_one_order_per_seed():
    r = [resolved("finetune", "digits_b0s2", seed, "class_order=shuffle") for seed in (0, 1)]
    assert [x.protocol.class_order for x in r] == ["seed0", "seed1"]
    assert r[1].config["class_order"]["rule"] == "shuffle"
    assert resolve_class_order("seed0", 10, 10) != resolve_class_order("seed1", 10, 10)


@pytest.mark.parametrize("sets, seed, match", [
    (["class_orders=[podnet1,podnet2,podnet3]"], 3, r"class_orders lists 3 orders, for seeds 0\.\.2; got --seed 3"),
    (["class_orders=[podnet1,podnet9]"], 0, r"class_orders\[1\]: unknown order 'podnet9'"),
    (["class_order=shuffle", "class_orders=[podnet1]"], 0, "exclude each other"),
    (["method_augment.der.brightnes=0.2"], 0, r"unknown key 'method_augment\.der\.brightnes'"),
])
def test_bad_class_orders_and_method_augment_are_user_errors(sets, seed, match):
    with pytest.raises(UserError, match=match):
        resolved("der", "cifar100_b50s5", seed, *sets)


def test_cli_out_of_range_seed_exits_2(tmp_path, run_cli, error_line, nothing_complete):
    res = run_cli("finetune", "digits_b0s2", tmp_path, "--seed", "2", "--set", "class_orders=[seed1,seed2]")
    assert res.exit_code == 2 and "class_orders lists 2 orders" in error_line(res)
    assert nothing_complete(tmp_path)


def test_method_augment_gives_each_lineage_its_augmentation():
    """ImageNet-100: DER/PyCIL/TSD published rows train without brightness jitter, PODNet/EXACFS with it."""
    for card in ("imagenet100_b0s10", "imagenet100_b50s5"):
        for method in ("der", "der_prune", "tsd_grc", "tsd_fixed", "finetune"):
            assert resolved(method, card, 0).protocol.augment.brightness == 0.0
        assert load_protocol(card).method_augment["exacfs"] == {"brightness": 0.247059}
    r = resolved("der_prune", "digits_b0s2", 0, "method_augment.der.brightness=0.2",
                 "method_augment.der_prune.flip=false")
    assert (r.protocol.augment.brightness, r.protocol.augment.flip) == (0.2, False)
    assert r.config["protocol"]["augment"]["brightness"] == 0.2           # recorded as run
    assert resolved("finetune", "digits_b0s2", 0, "method_augment.der.brightness=0.2").protocol.augment.brightness == 0
