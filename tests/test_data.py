"""Data loaders: tiny CIFAR copies in torchvision's on-disk format, an ImageNet-100 folder tree, digits and the
synthetic set; the errors a user gets for missing or corrupted data."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import yaml

from cilbench.data.datasets import (
    CIFAR_LAYOUT,
    load_cifar,
    load_dataset,
    load_digits,
    load_imagenet100,
    make_synthetic,
    md5sum,
)
from cilbench.data.protocol import DataConfig, SyntheticConfig, build_protocol
from cilbench.data.stream import Stream
from cilbench.errors import UserError

SEED1993_HEAD = [68, 56, 78, 8]


def _write_pickle(path, entry):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(entry, fh)


def _rows(labels, rng):
    return rng.randint(0, 256, size=(len(labels), 3072)).astype(np.uint8)


def write_cifar100(root, classes, train_per_class=5, test_per_class=2, seed=0):
    """A tiny cifar-100-python/{train,test} with the given fine labels."""
    rng = np.random.RandomState(seed)
    out = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in classes for _ in range(per)]
        data = _rows(labels, rng)
        _write_pickle(root / "cifar-100-python" / split,
                      {"data": data, "fine_labels": labels, "coarse_labels": [0] * len(labels)})
        out[split] = (data, labels)
    return out


def write_cifar10(root, per_batch=4, seed=0):
    rng = np.random.RandomState(seed)
    out = {"train": ([], [])}
    folder = root / "cifar-10-batches-py"
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        data = _rows(labels, rng)
        _write_pickle(folder / f"data_batch_{b}", {"data": data, "labels": labels})
        out["train"][0].append(data)
        out["train"][1].extend(labels)
    labels = list(range(10))
    data = _rows(labels, rng)
    _write_pickle(folder / "test_batch", {"data": data, "labels": labels})
    out["test"] = (data, labels)
    return out


# --- CIFAR ------------------------------------------------------------------------------------------------

def test_cifar100_tiny_copy_loads_without_verification(tmp_path):
    written = write_cifar100(tmp_path, classes=[3, 68, 99])
    ds = load_cifar("cifar100", tmp_path, verify=False)
    assert ds.num_classes == 100
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.train.images.shape == (15, 3, 32, 32) and ds.test.images.shape == (6, 3, 32, 32)
    data, labels = written["train"]
    assert ds.train.labels.tolist() == labels
    # row layout: 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    assert int(ds.train.images[4, 1, 2, 3]) == int(data[4, 1024 + 2 * 32 + 3])
    assert torch.equal(ds.train.images[7], torch.from_numpy(data[7].reshape(3, 32, 32)))
    assert torch.equal(ds.test.images.flatten(1), torch.from_numpy(written["test"][0]))


def test_cifar10_tiny_copy_loads_all_batches(tmp_path):
    written = write_cifar10(tmp_path)
    ds = load_cifar("cifar10", tmp_path, verify=False)
    assert ds.num_classes == 10
    assert len(ds.train) == 20 and len(ds.test) == 10
    assert ds.train.labels.tolist() == written["train"][1]
    assert torch.equal(ds.train.images.flatten(1), torch.from_numpy(np.concatenate(written["train"][0])))
    assert ds.test.labels.tolist() == list(range(10))


def test_cifar_layout_and_checksums_match_torchvision():
    import torchvision.datasets as tvd
    for name, cls in (("cifar10", tvd.CIFAR10), ("cifar100", tvd.CIFAR100)):
        layout = CIFAR_LAYOUT[name]
        assert layout["folder"] == cls.base_folder
        assert [list(f) for f in layout["train"]] == [list(f) for f in cls.train_list]
        assert [list(f) for f in layout["test"]] == [list(f) for f in cls.test_list]


def test_md5sum(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert md5sum(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"


def test_checksum_mismatch_is_a_user_error(tmp_path):
    write_cifar100(tmp_path, classes=[0, 1])
    with pytest.raises(UserError, match="checksum mismatch") as info:
        load_cifar("cifar100", tmp_path, verify=True)
    assert "verify_checksums=false" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_missing_cifar_says_how_to_get_it(tmp_path, name):
    with pytest.raises(UserError) as info:
        load_cifar(name, tmp_path, verify=True)
    msg = str(info.value)
    assert "not found" in msg and f"cilbench download {name}" in msg and "\n" not in msg


def test_partly_missing_cifar10_is_reported(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="not found"):
        load_cifar("cifar10", tmp_path, verify=False)


def _tiny_cifar_card(path, **changes):
    card = {"name": "cifar100_tiny", "description": "tiny CIFAR-100 copy", "dataset": "cifar100",
            "num_classes": 4, "base": 0, "step": 2, "tasks": 2, "class_order": "seed1993",
            "memory": {"policy": "fixed_total", "total": 8},
            "backbone": {"name": "resnet20", "width": 4},
            "train": {"epochs": 1, "batch_size": 8, "lr": 0.01},
            "augment": {"crop_padding": 4, "flip": True}, "eval_batch_size": 64}
    card.update(changes)
    path.write_text(yaml.safe_dump(card))
    return path


def test_cifar_copy_through_the_cli(tmp_path, run_cli, error_line, nothing_complete):
    data_root = tmp_path / "data"
    write_cifar100(data_root, classes=SEED1993_HEAD + [0])
    card = _tiny_cifar_card(tmp_path / "cifar100_tiny.yaml")
    out = tmp_path / "runs"

    # verification on (the default): the tiny copy is not the published file
    res = run_cli("replay", card, out, "--data-root", data_root, "--epochs", "1")
    assert res.exit_code == 2
    line = error_line(res)
    assert "checksum mismatch" in line and "cifar-100-python" in line
    assert nothing_complete(out)

    res = run_cli("replay", card, out, "--data-root", data_root, "--epochs", "1",
                  "--set", "data.verify_checksums=false")
    assert res.exit_code == 0, res.output
    run = out / "cifar100_tiny" / "replay" / "seed0"
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"
    steps = (run / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 2


def test_missing_cifar_through_the_cli(tmp_path, run_cli, error_line, nothing_complete):
    out = tmp_path / "runs"
    res = run_cli("replay", "cifar100_b50s2", out, "--data-root", tmp_path / "empty")
    assert res.exit_code == 2
    line = error_line(res)
    assert "not found" in line and "cilbench download cifar100" in line
    assert nothing_complete(out)
    assert not (out / "cifar100_b50s2").exists()        # no empty run directory is left behind


def test_copy_lacking_classes_of_the_order_is_a_user_error(tmp_path, run_cli, error_line, nothing_complete):
    data_root = tmp_path / "data"
    write_cifar100(data_root, classes=[0, 1, 2, 3])      # seed1993 needs 68, 56, 78, 8
    card = _tiny_cifar_card(tmp_path / "cifar100_tiny.yaml")
    res = run_cli("replay", card, tmp_path / "runs", "--data-root", data_root,
                  "--set", "data.verify_checksums=false")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert "68" in line and "no training samples" in line
    assert nothing_complete(tmp_path / "runs")


# --- ImageNet-100 folder tree --------------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet_tree(root, with_lists=True, per_class=(2, 1)):
    from PIL import Image
    base = root / "imagenet100"
    rng = np.random.RandomState(0)
    lists = {"train": [], "val": []}
    for split, n in zip(("train", "val"), per_class):
        for k, wnid in enumerate(WNIDS):
            folder = base / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                size = (40 + 4 * i, 30 + 2 * k)       # non-square, different sizes
                pixels = rng.randint(0, 256, size=(size[1], size[0], 3)).astype(np.uint8)
                name = f"{wnid}_{i}.JPEG"
                Image.fromarray(pixels).save(folder / name, format="JPEG")
                lists[split].append(f"{split}/{wnid}/{name} {k}")
    if with_lists:
        for split, lines in lists.items():
            (base / f"{split}_100.txt").write_text("\n".join(lines) + "\n")
    return base


def test_imagenet100_tree_with_split_lists_loads(tmp_path):
    base = write_imagenet_tree(tmp_path)
    ds = load_imagenet100(tmp_path, image_size=32)
    assert ds.num_classes == 100
    assert ds.train.images.dtype == torch.uint8
    assert ds.train.images.shape == (6, 3, 32, 32)           # train: whole image squashed to 32x32
    assert ds.test.images.shape == (3, 3, 28, 28)            # test: resize + centre crop 32 * 224/256
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.test.labels.tolist() == [0, 1, 2]
    # decoded once, then read from the cache
    cache = base / "cilbench_cache_32_lists.pt"          # keyed by size and by where the labels came from
    assert cache.exists()
    again = load_imagenet100(tmp_path, image_size=32)
    assert torch.equal(again.train.images, ds.train.images) and torch.equal(again.test.labels, ds.test.labels)


def test_imagenet100_tree_without_lists_uses_the_folders(tmp_path):
    write_imagenet_tree(tmp_path, with_lists=False)
    ds = load_imagenet100(tmp_path, image_size=16)
    assert ds.train.images.shape == (6, 3, 16, 16)
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_imagenet100_through_load_dataset_and_stream(tmp_path):
    write_imagenet_tree(tmp_path)
    card = {"name": "imagenet100_tiny", "dataset": "imagenet100", "num_classes": 3, "base": 0, "step": 1,
            "tasks": 3, "class_order": [2, 0, 1], "memory": {"policy": "fixed_total", "total": 3},
            "data": {"image_size": 24}}
    p = build_protocol(card, "test")
    ds = load_dataset(p, tmp_path)
    stream = Stream(p, ds, torch.device("cpu"))
    assert stream.image_shape == (3, 24, 24)
    # class 2 comes first in the order, so its images now carry label 0
    assert torch.equal(stream.train.images[stream.train.labels == 0], ds.train.images[ds.train.labels == 2])


def test_missing_imagenet100_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="imagenet100 not found"):
        load_imagenet100(tmp_path, image_size=32)


# --- embedded and generated sets -----------------------------------------------------------------------------

def test_digits_split_is_stratified_and_deterministic():
    ds = load_digits(DataConfig())
    assert ds.num_classes == 10
    assert len(ds.train) + len(ds.test) == 1797
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.train.images.dtype == torch.uint8
    assert int(ds.train.images.max()) == 255
    for c in range(10):
        n_test = int((ds.test.labels == c).sum())
        n_all = n_test + int((ds.train.labels == c).sum())
        assert n_test == round(n_all * 0.3)
    again = load_digits(DataConfig())
    assert torch.equal(again.test.images, ds.test.images) and torch.equal(again.train.labels, ds.train.labels)


def test_synthetic_set_follows_its_config_and_seed():
    cfg = DataConfig(synthetic=SyntheticConfig(classes=5, image_size=12, channels=3, train_per_class=7,
                                               test_per_class=2, seed=3))
    ds = make_synthetic(cfg)
    assert ds.num_classes == 5
    assert ds.train.images.shape == (35, 3, 12, 12) and ds.test.images.shape == (10, 3, 12, 12)
    assert ds.train.images.dtype == torch.uint8
    assert torch.bincount(ds.train.labels).tolist() == [7] * 5
    assert torch.equal(make_synthetic(cfg).train.images, ds.train.images)
    other = DataConfig(synthetic=SyntheticConfig(classes=5, image_size=12, channels=3, train_per_class=7,
                                                 test_per_class=2, seed=4))
    assert not torch.equal(make_synthetic(other).train.images, ds.train.images)


def test_imagenet100_split_lists_added_later_are_not_hidden_by_the_cache(tmp_path):
    """A first load from the folders caches folder labels; adding the split lists must give the lists' labels,
    not the stale cache."""
    base = write_imagenet_tree(tmp_path, with_lists=False)
    assert load_imagenet100(tmp_path, image_size=16).train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for split in ("train", "val"):   # lists whose labels run the other way round
        lines = [f"{split}/{f.parent.name}/{f.name} {2 - WNIDS.index(f.parent.name)}"
                 for f in sorted((base / split).glob("*/*.JPEG"))]
        (base / f"{split}_100.txt").write_text("\n".join(lines) + "\n")
    again = load_imagenet100(tmp_path, image_size=16)
    assert again.train.labels.tolist() == [2, 2, 1, 1, 0, 0]
    assert again.test.labels.tolist() == [2, 1, 0]
