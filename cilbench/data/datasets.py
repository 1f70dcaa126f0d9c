"""Data sets as uint8 NCHW tensors.

Every loader returns a `Dataset` of two `Split`s holding the whole image set as one uint8 tensor and the
original class ids. Nothing here does per-sample work at training time: the engine indexes these tensors
and augments batches on the device.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cilbench.errors import UserError
from cilbench.data.protocol import DataConfig, Protocol
from cilbench.safeio import atomic_write, load_data_pickle


@dataclass
class Split:
    images: torch.Tensor   # uint8 [N, C, H, W]
    labels: torch.Tensor   # int64 [N], original class ids

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    num_classes: int
    train: Split
    test: Split


def default_data_root() -> Path:
    env = os.environ.get("CILBENCH_DATA")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(cache) / "cilbench" / "data"


def load_dataset(protocol: Protocol, root: str | Path | None) -> Dataset:
    root = Path(root) if root else default_data_root()
    cfg = protocol.data
    if protocol.dataset in ("cifar10", "cifar100"):
        return load_cifar(protocol.dataset, root, verify=cfg.verify_checksums)
    if protocol.dataset == "imagenet100":
        return load_imagenet100(root, image_size=cfg.image_size or 256)
    if protocol.dataset == "digits":
        return load_digits(cfg)
    if protocol.dataset == "synthetic":
        return make_synthetic(cfg)
    raise UserError(f"unknown dataset {protocol.dataset!r}")


def image_side(protocol: Protocol) -> int:
    """The stored image side of the card's data set, known before it is loaded (digits 8, CIFAR 32,
    ImageNet-100 the stored side, synthetic its card value)."""
    cfg = protocol.data
    sides = {"digits": 8, "cifar10": 32, "cifar100": 32, "imagenet100": cfg.image_size or 256,
             "synthetic": cfg.synthetic.image_size}
    return sides[protocol.dataset]


def image_channels(protocol: Protocol) -> int:
    """Channels of the card's images, known before they are loaded (digits 1, synthetic its card value, else 3)."""
    return {"digits": 1, "synthetic": protocol.data.synthetic.channels}.get(protocol.dataset, 3)


# --- CIFAR, in torchvision's on-disk format -----------------------------------------------------------------
# Folder, files and md5 sums exactly as torchvision.datasets.CIFAR10/CIFAR100 lay them out and check them.
CIFAR_LAYOUT = {
    "cifar10": dict(folder="cifar-10-batches-py", label_key="labels", num_classes=10,
                    train=[("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                           ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                           ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                           ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                           ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
                    test=[("test_batch", "40351d587109b95175f43aff81a1287e")]),
    "cifar100": dict(folder="cifar-100-python", label_key="fine_labels", num_classes=100,
                     train=[("train", "16019d7e3df5f24257cddd939b257f8d")],
                     test=[("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")]),
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cifar_files(folder: Path, files: list[tuple[str, str]], label_key: str, verify: bool) -> Split:
    images, labels = [], []
    for name, md5 in files:
        path = folder / name
        if verify and md5sum(path) != md5:
            raise UserError(f"checksum mismatch for {path}: re-download it, or pass "
                            "--set data.verify_checksums=false for a custom copy in the same format")
        entry = load_data_pickle(path, "CIFAR file")   # never plain pickle.load: a data file must not run code
        if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
            raise UserError(f"{path}: not a CIFAR file (no 'data' / '{label_key}'); replace it with the "
                            "original download")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    return Split(torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64))


def load_cifar(name: str, root: Path, verify: bool = True) -> Dataset:
    layout = CIFAR_LAYOUT[name]
    folder = root / layout["folder"]
    missing = [f for f, _ in layout["train"] + layout["test"] if not (folder / f).exists()]
    if missing:
        raise UserError(f"{name} not found in {folder}: run `cilbench download {name} --data-root {root}` "
                        "on a machine with internet, or point --data-root / CILBENCH_DATA at a copy")
    train = _read_cifar_files(folder, layout["train"], layout["label_key"], verify)
    test = _read_cifar_files(folder, layout["test"], layout["label_key"], verify)
    return Dataset(name, layout["num_classes"], train, test)


def download(name: str, root: Path) -> Path:
    """Fetch a data set into `root` with torchvision's own downloader (needs internet)."""
    import torchvision
    if name == "cifar10":
        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    elif name == "cifar100":
        torchvision.datasets.CIFAR100(str(root), train=True, download=True)
    else:
        raise UserError("cilbench download supports cifar10 and cifar100; for imagenet100 see the README")
    return root


# --- ImageNet-100 from a folder tree plus the standard split list --------------------------------------------

def _read_split_list(path: Path) -> list[tuple[str, int]]:
    entries = []
    for line in path.read_text().splitlines():
        if line.strip():
            rel, label = line.split()
            entries.append((rel, int(label)))
    return entries


def _imagenet_split(base: Path, split: str) -> list[tuple[str, int]]:
    """The PODNet/DER list `{split}_100.txt` (lines 'train/n0144.../x.JPEG 0') if present, else the folder."""
    listed = base / f"{split}_100.txt"
    if listed.exists():
        return _read_split_list(listed)
    folder = base / split
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    return [(f"{split}/{c}/{f.name}", k) for k, c in enumerate(classes)
            for f in sorted((folder / c).iterdir()) if f.is_file()]


def _decode_resized(path: Path, side: int, train: bool) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as img:
        img = img.convert("RGB")
        if train:   # keep the whole image, squashed to side x side (random-resized crop happens later)
            img = img.resize((side, side), Image.BILINEAR)
        else:       # Resize(side * 256/224 short edge) + CenterCrop(side), the standard test transform
            test_side = int(round(side * 224 / 256))
            scale = side / min(img.size)
            img = img.resize((max(side, round(img.size[0] * scale)), max(side, round(img.size[1] * scale))),
                             Image.BILINEAR)
            left, top = (img.size[0] - test_side) // 2, (img.size[1] - test_side) // 2
            img = img.crop((left, top, left + test_side, top + test_side))
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def load_imagenet100(root: Path, image_size: int = 256) -> Dataset:
    base = root / "imagenet100"
    if not (base / "train").is_dir() or not (base / "val").is_dir():
        raise UserError(f"imagenet100 not found in {base}: put the 100-class ImageFolder tree there "
                        "(train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) with train_100.txt / val_100.txt, see README")
    source = "lists" if (base / "train_100.txt").exists() else "folders"   # labels differ between the two
    cache = base / f"cilbench_cache_{image_size}_{source}.pt"
    if cache.exists():
        blob = torch.load(cache, weights_only=True)
        return Dataset("imagenet100", 100, Split(blob["train_x"], blob["train_y"]),
                       Split(blob["test_x"], blob["test_y"]))
    splits = {}
    for split, train in (("train", True), ("val", False)):
        entries = _imagenet_split(base, split)
        if not entries:
            raise UserError(f"imagenet100: no images found for split '{split}' in {base}")
        images = np.stack([_decode_resized(base / rel, image_size, train) for rel, _ in entries])
        labels = torch.tensor([label for _, label in entries], dtype=torch.int64)
        splits[split] = Split(torch.from_numpy(images), labels)
    labels = torch.cat([splits["train"].labels, splits["val"].labels])
    if labels.min() < 0 or labels.max() >= 100:
        raise UserError(f"imagenet100: labels must be 0..99, found {labels.min()}..{labels.max()}")
    blob = {"train_x": splits["train"].images, "train_y": splits["train"].labels,
            "test_x": splits["val"].images, "test_y": splits["val"].labels}
    atomic_write(cache, lambda fh: torch.save(blob, fh))
    return Dataset("imagenet100", 100, splits["train"], splits["val"])


# --- embedded and generated sets (no download) ------------------------------------------------------------------

def _digits_table() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (0..16) and labels of scikit-learn's digits, read from the file it ships (digits.csv.gz) without
    importing scikit-learn (a second of start-up per run); sklearn.datasets.load_digits if the file moved."""
    import gzip
    from importlib.util import find_spec
    spec = find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits as sk_digits
        bunch = sk_digits()
        return bunch.data, bunch.target.astype(np.int64)
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def load_digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), stratified deterministic train/test split."""
    pixels, labels = _digits_table()
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[:, None]   # [N, 1, 8, 8]
    rng = np.random.RandomState(0)
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        test_mask[rng.permutation(idx)[: int(round(len(idx) * cfg.test_fraction))]] = True
    to_split = lambda m: Split(torch.from_numpy(images[m]), torch.from_numpy(labels[m]))  # noqa: E731
    return Dataset("digits", 10, to_split(~test_mask), to_split(test_mask))


def make_synthetic(cfg: DataConfig) -> Dataset:
    """Classes defined by smooth random templates; samples are shifted, contrast-jittered, noisy copies.

    Deterministic from `synthetic.seed`; any number of classes and image size. Classes share structure
    (templates are mixtures of a few common bases), so the task is learnable but not trivially separable.
    """
    s = cfg.synthetic
    rng = np.random.RandomState(s.seed)
    side, n_bases = s.image_size, max(4, s.classes // 2)
    coarse = rng.randn(n_bases, s.channels, 4, 4)
    bases = torch.nn.functional.interpolate(torch.tensor(coarse, dtype=torch.float32), size=(side, side),
                                            mode="bicubic", align_corners=False).numpy()
    mixing = rng.dirichlet(np.full(n_bases, 0.5), size=s.classes)
    templates = np.einsum("kb,bchw->kchw", mixing, bases)
    templates /= templates.std(axis=(1, 2, 3), keepdims=True) + 1e-8

    def sample(per_class: int) -> Split:
        n = per_class * s.classes
        labels = np.repeat(np.arange(s.classes), per_class)
        x = templates[labels]
        shifts = rng.randint(-side // 8, side // 8 + 1, size=(n, 2))
        x = np.stack([np.roll(img, tuple(sh), axis=(1, 2)) for img, sh in zip(x, shifts)])
        x = x * rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)) + rng.randn(n, s.channels, side, side) * s.noise * 2
        pixels = np.clip(128 + 40 * x, 0, 255).astype(np.uint8)
        order = rng.permutation(n)
        return Split(torch.from_numpy(pixels[order]), torch.from_numpy(labels[order].astype(np.int64)))

    return Dataset("synthetic", s.classes, sample(s.train_per_class), sample(s.test_per_class))
