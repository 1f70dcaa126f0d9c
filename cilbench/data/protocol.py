"""Protocol cards: what a CIL benchmark setting is, as validated data.

A card is a YAML file in protocols/ named `{dataset}_b{base}s{step}` where `step` is the number of classes
per incremental task (TSD naming: cifar100_b50s2 = 50 base classes, then 25 tasks of 2 = 26 tasks).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from cilbench.config import build, load_yaml
from cilbench.config import to_dict as config_dict
from cilbench.errors import UserError
from cilbench.safeio import check_component

SEED_MAX = 2 ** 32 - 1    # numpy's RandomState takes seeds below 2**32
# upper bounds of card values: far above any benchmark, far below what exhausts memory or time before a run
# can fail with a message
MAX_EPOCHS, MAX_BATCH, MAX_SAMPLES = 100_000, 1 << 20, 100_000_000
MAX_SIDE = 4096           # image side in pixels (crops, cutout, padding, stored size)
MAX_CLASSES = 100_000

_HERE = Path(__file__).resolve().parents[1]      # the cilbench package
# the cards: cilbench/protocols/ in an installed wheel, the repository's protocols/ folder in the source tree
PROTOCOL_DIR = _HERE / "protocols" if (_HERE / "protocols").is_dir() else _HERE.parent / "protocols"
DATASETS = ("cifar10", "cifar100", "imagenet100", "digits", "synthetic")


@dataclass
class TrainConfig:
    """One training phase's budget. Milestones count epochs after warm-up (as DER's scheduler does)."""
    epochs: int = 170
    batch_size: int = 128
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"   # adamw: decoupled weight decay (ViT recipes)
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: int = 0
    warmup_lr: float | None = None        # linear warm-up from this lr (timm's warmup_lr_init); null: (e+1)/w ramp
    min_lr: float = 0.0                   # cosine floor (timm's min_lr)
    clip_norm: float | None = None
    # upper bounds stop values that are typos or crash a run (a batch of 1e10, momentum 2 diverging); the lr
    # stays open above (a sweep may probe a diverging lr on purpose)
    BOUNDS: ClassVar[dict] = {"epochs": (None, MAX_EPOCHS), "batch_size": (None, MAX_BATCH), "momentum": (0, 1),
                              "weight_decay": (0, None), "milestones": (0, MAX_EPOCHS), "gamma": (0, None),
                              "warmup_epochs": (0, MAX_EPOCHS), "clip_norm": (0, None),
                              "warmup_lr": (0, None), "min_lr": (0, None)}

    def validate(self, where: str) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"{where}: epochs and batch_size must be >= 1")
        if self.lr <= 0:
            raise UserError(f"{where}.lr: must be > 0, got {self.lr}")


@dataclass
class MemoryConfig:
    """Exemplar memory policy. B0: fixed_total 2000; B50: per_class 20; online: reservoir of `size`."""
    policy: Literal["none", "fixed_total", "per_class", "reservoir"] = "fixed_total"
    total: int = 2000
    per_class: int = 20
    size: int = 1000
    selection: Literal["herding", "random"] = "herding"
    BOUNDS: ClassVar[dict] = {"total": (0, MAX_SAMPLES), "per_class": (0, MAX_SAMPLES), "size": (0, MAX_SAMPLES)}


@dataclass
class AugmentConfig:
    """Batched on-device augmentation, applied in this order. A zero / false value turns an op off."""
    resize: int = 0                       # every image (train and test) resized to this side first, as
                                          # torchvision's Resize on a PIL image (SEED Table 2: CIFAR at 256)
    crop: int = 0                         # train: a random window of this side, no padding; test: the centre one
                                          # (SEED Table 2: 224 out of 256)
    random_resized_crop: int = 0          # output side; 0 = off (ImageNet: 224)
    rrc_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    crop_padding: int = 0                 # random crop with zero padding (CIFAR: 4)
    flip: bool = False
    brightness: float = 0.0               # ColorJitter(brightness=b): factor in [1-b, 1+b] (CIFAR: 63/255)
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0                      # ColorJitter(hue=h): hue shift in [-h, h] of a full turn
    jitter_p: float = 1.0                 # RandomApply([ColorJitter(...)], p) (SimCLR / PCR: 0.8)
    grayscale_p: float = 0.0
    cutout: int = 0                       # square side in pixels
    cutout_normalised: bool = True        # true: the hole is cut after normalisation (0 = the mean colour);
                                          # false: before it, in [0, 1] (black), as a ToTensor-Cutout-Normalize chain
    autoaugment: Literal["none", "cifar10", "imagenet", "svhn"] = "none"   # AutoAugment policy, per sample
    autoaugment_ops: Literal["torchvision", "pil"] = "torchvision"       # torchvision's operations (fill 0,
                                          # nearest) or the PIL port of SEED's / PyCIL's code (grey fill, bicubic
                                          # shears, solarize from 256): cilbench/data/autoaugment.py
    mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    BOUNDS: ClassVar[dict] = {"resize": (0, MAX_SIDE), "crop": (0, MAX_SIDE), "random_resized_crop": (0, MAX_SIDE),
                              "rrc_scale": (0, 1),
                              "crop_padding": (0, MAX_SIDE), "brightness": (0, None), "contrast": (0, None),
                              "saturation": (0, None), "hue": (0, 0.5), "jitter_p": (0, 1), "grayscale_p": (0, 1),
                              "cutout": (0, MAX_SIDE), "std": (1e-12, None)}


@dataclass
class SyntheticConfig:
    classes: int = 10
    image_size: int = 16
    channels: int = 3
    train_per_class: int = 100
    test_per_class: int = 40
    noise: float = 1.0
    seed: int = 0
    BOUNDS: ClassVar[dict] = {"classes": (1, MAX_CLASSES), "image_size": (1, 512), "channels": (1, 4),
                              "train_per_class": (1, 100_000), "test_per_class": (1, 100_000), "noise": (0, None),
                              "seed": (0, SEED_MAX)}


@dataclass
class DataConfig:
    verify_checksums: bool = True         # CIFAR md5 check; turn off for a custom copy in the same format
    image_size: int = 0                   # ImageNet: stored side after resize (0 = dataset default)
    resident: Literal["device", "host"] = "device"   # where the uint8 image tensors live
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    test_fraction: float = 0.3            # digits: stratified held-out share
    BOUNDS: ClassVar[dict] = {"image_size": (0, MAX_SIDE), "test_fraction": (0, 1)}


@dataclass
class OnlineConfig:
    """Online regime: the stream batch is train.batch_size and one pass is train.epochs = 1."""
    replay_batch: int = 10
    BOUNDS: ClassVar[dict] = {"replay_batch": (0, MAX_BATCH)}


@dataclass
class BackboneConfig:
    name: str = "resnet32"                # a factory ResNet (cilbench.kit.backbones.STANDARD) or "timm:<model>"
    width: int = 0                        # base width; 0 = the architecture's standard width (factory only)
    pretrained: str | None = None         # a local weights file loaded into the backbone (never a download)
    timm_kwargs: dict = field(default_factory=dict)   # extra timm.create_model arguments (timm models only)
    BOUNDS: ClassVar[dict] = {"width": (0, 1024)}         # ResNet widths are 16-64; 1024 is already huge
    # names, widths and timm_kwargs are checked against the kit when a run is resolved
    # (cilbench.kit.timm_backbones.check_backbone_config)


@dataclass
class Protocol:
    name: str
    dataset: Literal["cifar10", "cifar100", "imagenet100", "digits", "synthetic"]
    num_classes: int
    base: int
    step: int
    tasks: int
    regime: Literal["offline", "online"] = "offline"
    class_order: str | list[int] = "seed1993"   # a name, an explicit list, or "shuffle": np seed = the run's seed
    class_orders: list[str | list[int]] = field(default_factory=list)   # seed k runs the k-th order (a paper's
    #                                       three-order protocol: [der_trial2, der_trial3, der_trial4]); overrides
    #                                       class_order
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    eval_batch_size: int = 512
    description: str = ""
    source: str = ""
    methods: dict[str, dict] = field(default_factory=dict)
    # per method (or family): augmentation keys that replace `augment` for its runs, so one card serves
    # methods of different augmentation lineages (ImageNet-100: DER/PyCIL/TSD without brightness jitter,
    # PODNet/EXACFS with it)
    method_augment: dict[str, dict] = field(default_factory=dict)
    BOUNDS: ClassVar[dict] = {"num_classes": (1, MAX_CLASSES), "tasks": (1, MAX_CLASSES),
                              "eval_batch_size": (1, MAX_BATCH), "class_order": (0, MAX_CLASSES)}

    def validate(self, where: str) -> None:
        check_component(self.name, f"{where}: protocol name")   # it names a folder under --out
        check_order(self.class_order, f"{where}: key 'class_order'")
        for k, order in enumerate(self.class_orders):
            check_order(order, f"{where}: class_orders[{k}]")
            if order == "shuffle":
                raise UserError(f"{where}: class_orders[{k}]: shuffle is per seed already; use class_order: shuffle")
        if self.class_order == "shuffle" and self.class_orders:
            raise UserError(f"{where}: class_order shuffle and a class_orders list exclude each other; keep one")
        for name, section in self.method_augment.items():
            build(AugmentConfig, {**config_dict(self.augment), **(section or {})}, where,
                  prefix=f"method_augment.{name}.")
        if self.base < 0 or self.step < 1:
            raise UserError(f"{where}: base must be >= 0 and step >= 1")
        first = self.base if self.base > 0 else self.step
        rest = self.num_classes - first
        if rest < 0 or rest % self.step:
            raise UserError(f"{where}: classes do not add up: {self.num_classes} classes cannot be split into "
                            f"a first task of {first} and tasks of {self.step}")
        expected = 1 + rest // self.step
        if expected != self.tasks:
            raise UserError(f"{where}: tasks is {self.tasks} but base {self.base} + steps of {self.step} over "
                            f"{self.num_classes} classes gives {expected} tasks; fix 'tasks'")
        if self.regime == "online" and self.memory.policy not in ("reservoir", "none"):
            raise UserError(f"{where}: online protocols use memory.policy reservoir (got {self.memory.policy})")
        if self.regime == "offline" and self.memory.policy == "reservoir":
            raise UserError(f"{where}: memory.policy reservoir is for online protocols; use fixed_total or per_class")

    @property
    def task_sizes(self) -> list[int]:
        first = self.base if self.base > 0 else self.step
        return [first] + [self.step] * (self.tasks - 1)


def card_path(name_or_path: str) -> Path:
    """A card name from protocols/ or a path to any YAML card."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not path.exists():
            raise UserError(f"protocol file {name_or_path} not found")
        return path
    path = PROTOCOL_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        from cilbench.config import did_you_mean
        raise UserError(f"unknown protocol '{name_or_path}'{did_you_mean(name_or_path, known_protocols())}; "
                        f"known: {', '.join(known_protocols())}")
    return path


def known_protocols() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def load_card(name_or_path: str) -> dict:
    path = card_path(name_or_path)
    data = load_yaml(str(path))
    data.setdefault("name", path.stem)
    return data


DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet100": 100, "digits": 10}


def derive_keys(data: dict, where: str) -> dict:
    """The card with `num_classes` and `tasks` filled in where the dataset and the split determine them:
    num_classes from the dataset (synthetic: data.synthetic.classes), tasks from num_classes, base and step.
    A key that cannot be derived is named in a one-line error."""
    data = dict(data)
    for key, what in (("dataset", f"one of {', '.join(DATASETS)}"), ("base", "classes of the first task, 0 for B0"),
                      ("step", "classes per incremental task")):
        if key not in data:
            raise UserError(f"{where}: missing key '{key}' ({what}); add it to the card")
    dataset = data["dataset"]
    if not isinstance(dataset, str) or dataset not in DATASETS:
        from cilbench.config import did_you_mean
        raise UserError(f"{where}: key 'dataset': expected one of {', '.join(DATASETS)}, got {dataset!r}"
                        f"{did_you_mean(str(dataset), DATASETS)}")
    if "num_classes" not in data:
        if dataset == "synthetic":
            synthetic = ((data.get("data") or {}).get("synthetic") or {}) if isinstance(data.get("data"), dict) else {}
            data["num_classes"] = synthetic.get("classes", SyntheticConfig.classes) if isinstance(synthetic, dict) \
                else SyntheticConfig.classes
        elif dataset in DATASET_CLASSES:
            data["num_classes"] = DATASET_CLASSES[dataset]
        else:
            raise UserError(f"{where}: missing key 'num_classes'; add it to the card")
    if "tasks" not in data:
        n, base, step = data["num_classes"], data["base"], data["step"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, base, step)) or step < 1:
            raise UserError(f"{where}: missing key 'tasks', and num_classes, base and step do not give it; "
                            "add 'tasks' to the card")
        first = base if base > 0 else step
        if n < first or (n - first) % step:
            raise UserError(f"{where}: {n} classes cannot be split into a first task of {first} and tasks of "
                            f"{step}; fix base, step or num_classes")
        data["tasks"] = 1 + (n - first) // step
    return data


def build_protocol(data: dict, where: str) -> Protocol:
    return build(Protocol, derive_keys(data, where), where)


def load_protocol(name_or_path: str) -> Protocol:
    return build_protocol(load_card(name_or_path), str(card_path(name_or_path)))


# ---------------------------------------------------------------------------------------------------------
# Class orders. Labels are remapped so that the k-th class of the order gets label k.

DER_TRIAL0 = [62, 54, 84, 20, 94, 22, 40, 29, 78, 27, 26, 79, 17, 76, 68, 88, 3, 19, 31, 21, 33, 60, 24, 14, 6,
              10, 16, 82, 70, 92, 25, 5, 28, 9, 61, 36, 50, 90, 8, 48, 47, 56, 11, 98, 35, 93, 44, 64, 75, 66,
              15, 38, 97, 42, 43, 12, 37, 55, 72, 95, 18, 7, 23, 71, 49, 53, 57, 86, 39, 87, 34, 63, 81, 89, 69,
              46, 2, 1, 73, 32, 67, 91, 0, 51, 83, 13, 58, 80, 74, 65, 4, 30, 45, 77, 99, 85, 41, 96, 59, 52]
# PODNet order 1 = DER trial 2 = the iCaRL CIFAR-100 order (DER's shipped configs use it).
PODNET_ORDER1 = [87, 0, 52, 58, 44, 91, 68, 97, 51, 15, 94, 92, 10, 72, 49, 78, 61, 14, 8, 86, 84, 96, 18, 24,
                 32, 45, 88, 11, 4, 67, 69, 66, 77, 47, 79, 93, 29, 50, 57, 83, 17, 81, 41, 12, 37, 59, 25, 20,
                 80, 73, 1, 28, 6, 46, 62, 82, 53, 9, 31, 75, 38, 63, 33, 74, 27, 22, 36, 3, 16, 21, 60, 19, 70,
                 90, 89, 43, 5, 42, 65, 76, 40, 30, 23, 85, 2, 95, 56, 48, 71, 64, 98, 13, 99, 7, 34, 55, 54, 26,
                 35, 39]
# PODNet orders 2 and 3 = DER trials 3 and 4 (options/data/cifar100_3orders.yaml).
PODNET_ORDER2 = [58, 30, 93, 69, 21, 77, 3, 78, 12, 71, 65, 40, 16, 49, 89, 46, 24, 66, 19, 41, 5, 29, 15, 73,
                 11, 70, 90, 63, 67, 25, 59, 72, 80, 94, 54, 33, 18, 96, 2, 10, 43, 9, 57, 81, 76, 50, 32, 6,
                 37, 7, 68, 91, 88, 95, 85, 4, 60, 36, 22, 27, 39, 42, 34, 51, 55, 28, 53, 48, 38, 17, 83, 86,
                 56, 35, 45, 79, 99, 84, 97, 82, 98, 26, 47, 44, 62, 13, 31, 0, 75, 14, 52, 74, 8, 20, 1, 92,
                 87, 23, 64, 61]
PODNET_ORDER3 = [71, 54, 45, 32, 4, 8, 48, 66, 1, 91, 28, 82, 29, 22, 80, 27, 86, 23, 37, 47, 55, 9, 14, 68,
                 25, 96, 36, 90, 58, 21, 57, 81, 12, 26, 16, 89, 79, 49, 31, 38, 46, 20, 92, 88, 40, 39, 98,
                 94, 19, 95, 72, 24, 64, 18, 60, 50, 63, 61, 83, 76, 69, 35, 0, 52, 7, 65, 42, 73, 74, 30, 41,
                 3, 6, 53, 13, 56, 70, 77, 34, 97, 75, 2, 17, 93, 33, 84, 99, 51, 62, 87, 5, 15, 10, 78, 67,
                 44, 59, 85, 43, 11]
NAMED_ORDERS: dict[str, list[int]] = {
    "der_trial0": DER_TRIAL0,
    "der_trial2": PODNET_ORDER1,
    "der_trial3": PODNET_ORDER2,
    "der_trial4": PODNET_ORDER3,
    "podnet1": PODNET_ORDER1,
    "podnet2": PODNET_ORDER2,
    "podnet3": PODNET_ORDER3,
}


def seed_permutation(seed: int, n: int) -> list[int]:
    """`np.random.seed(seed); np.random.permutation(n)` (legacy global RNG, as PyCIL does)."""
    return np.random.RandomState(seed).permutation(n).tolist()


def check_order(order: str | list[int], where: str) -> None:
    """A class order's name is one resolve_class_order knows (explicit lists are checked against the data)."""
    if isinstance(order, list) or order in ("natural", "shuffle", "der_trial1") or order in NAMED_ORDERS:
        return
    if order.startswith("seed") and order[4:].isdigit():
        if int(order[4:]) > SEED_MAX:
            raise UserError(f"{where}: the seed must be at most {SEED_MAX}, got {order!r}")
        return
    known = ["natural", "shuffle", "seed<k> (e.g. seed1993)", "der_trial1", *sorted(NAMED_ORDERS)]
    raise UserError(f"{where}: unknown order {order!r}; known: {', '.join(known)} or an explicit list")


def order_for_seed(protocol: Protocol, seed: int, where: str) -> tuple[Protocol, dict]:
    """The protocol a run with `seed` uses (class_order resolved for that seed), and what to record of it:
    class_orders[seed] when the card lists orders, seed<k> (np.random.seed(k) permutation, PyCIL's per-run
    shuffle) when class_order is shuffle, else the card's class_order."""
    if protocol.class_orders:
        n = len(protocol.class_orders)
        if not 0 <= seed < n:
            raise UserError(f"{where}: class_orders lists {n} orders, for seeds 0..{n - 1}; got --seed {seed} "
                            f"(use --seed 0..{n - 1} or list more orders)")
        order, rule = protocol.class_orders[seed], f"class_orders[{seed}]"
    elif protocol.class_order == "shuffle":
        order, rule = f"seed{seed}", "shuffle"
    else:
        order, rule = protocol.class_order, "class_order"
    record = {"name": order if isinstance(order, str) else "explicit", "rule": rule,
              "orders": list(protocol.class_orders)}
    return dataclasses.replace(protocol, class_order=order), record


def with_method_augment(protocol: Protocol, names: list[str], where: str) -> Protocol:
    """The protocol with the augmentation keys of `names`' method_augment sections (in that order) applied."""
    changes: dict = {}
    for name in names:
        changes.update(protocol.method_augment.get(name) or {})
    if not changes:
        return protocol
    augment = build(AugmentConfig, {**config_dict(protocol.augment), **changes}, where, prefix="augment.")
    return dataclasses.replace(protocol, augment=augment)


def resolve_class_order(order: str | list[int], num_classes: int, dataset_classes: int) -> list[int]:
    """The original class ids in training order; only the first `num_classes` of it are used."""
    if isinstance(order, list):
        full = list(order)
    elif order == "natural":
        full = list(range(dataset_classes))
    elif order.startswith("seed") and order[4:].isdigit():
        full = seed_permutation(int(order[4:]), dataset_classes)
    elif order == "der_trial1":   # DER's trial 1 is PyCIL's seed-1993 permutation
        full = seed_permutation(1993, dataset_classes)
    elif order in NAMED_ORDERS:
        full = NAMED_ORDERS[order]
    else:
        check_order(order, "class_order")
        raise UserError(f"class_order: {order!r} is resolved per run (order_for_seed), not here")
    if len(full) < num_classes:
        raise UserError(f"class_order: gives {len(full)} classes, the protocol needs {num_classes}")
    chosen = full[:num_classes]
    if len(set(chosen)) != len(chosen) or min(chosen) < 0 or max(chosen) >= dataset_classes:
        raise UserError(f"class_order: must list distinct class ids in 0..{dataset_classes - 1}")
    return chosen


def resolved_dict(protocol: Protocol) -> dict:
    from cilbench.config import to_dict
    return to_dict(protocol)


def with_overrides(protocol: Protocol, **changes) -> Protocol:
    return dataclasses.replace(protocol, **changes)
