"""Backbones with explicit channel widths, so a (pruned) network can be rebuilt from its spec.

A spec is a plain dict: {"name", "in_channels", "stem", "stem_kind", "shortcut", "stages"} where
`stages` lists, per stage, the blocks as [inner width, output width]. The standard architectures are specs
generated from (name, width); pruning produces narrower specs of the same shape. A pruned spec may carry an
optional "shortcut_index": {"<stage>.<block>": [int, ...]} giving, for a parameter-free shortcut, the input
channel each output channel copies (-1: zero), used when pruning removed different channels on the two sides
of a residual connection (cilbench/kit/pruning.py).

- resnet32 / resnet20: the CIFAR ResNets of iCaRL/PyCIL (16-32-64, option-A shortcuts, 64-d features;
  resnet32 has 0.46M parameters);
- resnet18_cifar: 3x3 stem, no max-pool (DER's CIFAR ResNet-18, 512-d);
- resnet18_imagenet: 7x7/2 stem + max-pool (512-d);
- resnet18_reduced: nf=20, CIFAR stem (the "reduced ResNet-18" of GEM/ER/PCR, 160-d);
- resnet32_podnet: PODNet's CIFAR ResNet-32 ("rebuffi"): 5/5/4 blocks at 16/32/64 channels plus a fourth
  stage of one block at 64 channels and stride 1, without the final ReLU (64-d features that a cosine
  classifier can place anywhere on the sphere); the layout EXACFS distils over four stages.

A spec may carry "stage_strides" (the first block's stride per stage; without it every stage after the
first halves the resolution) and "final_relu": false (the last block's output is not rectified).
`stage_outputs(net, x)` gives any factory backbone's stage maps and pooled features in one pass.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.errors import UserError
from cilbench.kit.timm_backbones import TimmBackbone, is_timm, timm_spec

STANDARD = {
    # name: (blocks per stage, default base width, stage width multipliers, stem kind, shortcut kind)
    "resnet32": (5, 16, (1, 2, 4), "cifar", "A"),
    "resnet20": (3, 16, (1, 2, 4), "cifar", "A"),
    "resnet18_cifar": (2, 64, (1, 2, 4, 8), "cifar", "B"),
    "resnet18_imagenet": (2, 64, (1, 2, 4, 8), "imagenet", "B"),
    "resnet18_reduced": (2, 20, (1, 2, 4, 8), "cifar", "B"),
    "resnet32_podnet": (5, 16, (1, 2, 4), "cifar", "A"),
}
# Conv initialisations of ResNet: kaiming_normal(fan_out) over every conv, or PyTorch's nn.Conv2d default.
INITS = ("kaiming_fan_out", "torch")
# Architectures that append single-block stages at stride 1: name -> width multipliers of those stages.
EXTRA_STAGES = {"resnet32_podnet": (4,)}
# Architectures whose stages differ from the uniform `blocks`: name -> blocks per stage (before the extras).
STAGE_BLOCKS = {"resnet32_podnet": (5, 5, 4)}


def standard_spec(name: str, in_channels: int = 3, width: int = 0) -> dict:
    if name not in STANDARD:
        raise UserError(f"unknown backbone '{name}'; known: {', '.join(STANDARD)}")
    blocks, default_width, mults, stem_kind, shortcut = STANDARD[name]
    base = width or default_width
    per_stage = STAGE_BLOCKS.get(name, (blocks,) * len(mults))
    stages = [[[base * m, base * m] for _ in range(n)] for m, n in zip(mults, per_stage)]
    spec = {"name": name, "in_channels": in_channels, "stem": base, "stem_kind": stem_kind,
            "shortcut": shortcut, "stages": stages}
    if name in EXTRA_STAGES:
        extra = EXTRA_STAGES[name]
        spec["stages"] += [[[base * m, base * m]] for m in extra]
        spec["stage_strides"] = [1] + [2] * (len(mults) - 1) + [1] * len(extra)
        spec["final_relu"] = False
    return spec


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling and zero channels appended (PyCIL DownsampleA)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.pad, self.stride = out_channels - in_channels, stride

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, 1, self.stride)   # == x[..., ::2, ::2], as PyCIL
        if self.pad > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, self.pad))
        elif self.pad < 0:
            x = x[:, : x.shape[1] + self.pad]
        return x


class IndexShortcut(nn.Module):
    """Parameter-free shortcut of a pruned network: stride subsampling as ShortcutA, then output channel p
    copies input channel index[p], or is zero where index[p] == -1. ShortcutA is the index
    [0, ..., in-1, -1, ...]; the identity is [0, ..., in-1]."""

    def __init__(self, in_channels: int, index: list[int], stride: int):
        super().__init__()
        self.in_channels, self.stride, self.index = in_channels, stride, [int(i) for i in index]
        if any(i < -1 or i >= in_channels for i in self.index):
            raise ValueError(f"shortcut index out of range for {in_channels} input channels: {self.index}")
        gather = torch.tensor([i if i >= 0 else in_channels for i in self.index], dtype=torch.int64)
        self.register_buffer("gather", gather, persistent=False)

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, 1, self.stride)
        x = F.pad(x, (0, 0, 0, 0, 0, 1))          # one zero channel at position in_channels
        return x[:, self.gather]                  # backward: index_put with accumulate (deterministic)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int, stride: int, shortcut: str,
                 index: list[int] | None = None, relu_out: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, mid_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_ch)
        self.conv2 = nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu_out = relu_out      # False: no ReLU after the residual sum (SEED's last stage, PODNet's last block)
        if index is not None:
            self.shortcut = IndexShortcut(in_ch, index, stride)
        elif stride == 1 and in_ch == out_ch:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_ch, out_ch, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) + self.shortcut(x)
        return F.relu(out) if self.relu_out else out


class ResNet(nn.Module):
    """Feature extractor: image -> d-dim feature after global average pooling.

    `forward_stages` returns the output of the stem and of every stage (EXACFS-style methods use them).
    """

    def __init__(self, spec: dict, init: str = "kaiming_fan_out"):
        super().__init__()
        if init not in INITS:
            raise UserError(f"unknown backbone init '{init}'; known: {', '.join(INITS)}")
        self.spec = copy.deepcopy(spec)
        stem = spec["stem"]
        if spec["stem_kind"] == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(spec["in_channels"], stem, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(spec["in_channels"], stem, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(stem), nn.ReLU(inplace=True))
        stages, in_ch = [], stem
        index = spec.get("shortcut_index", {})
        strides = spec.get("stage_strides") or [1] + [2] * (len(spec["stages"]) - 1)
        for s, blocks in enumerate(spec["stages"]):
            layers = []
            for b, (mid, out) in enumerate(blocks):
                stride = strides[s] if b == 0 else 1
                last = s == len(spec["stages"]) - 1 and b == len(blocks) - 1
                layers.append(BasicBlock(in_ch, mid, out, stride, spec["shortcut"], index.get(f"{s}.{b}"),
                                         relu_out=spec.get("final_relu", True) or not last))
                in_ch = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.out_dim = in_ch
        self.latent = None
        self._seed_variant(spec)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and init == "kaiming_fan_out":
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _seed_variant(self, spec: dict) -> None:
        """Optional spec keys (SEED, App. A.2): "last_relu": false drops the final ReLU of every block of the
        last stage (features can be negative, closer to Gaussian); "latent": S adds a 1x1 conv (with bias) to S
        channels after the last stage, before pooling."""
        if spec.get("last_relu", True) is False:
            for block in self.stages[-1]:
                block.relu_out = False
        if spec.get("latent"):
            self.latent = nn.Conv2d(self.out_dim, int(spec["latent"]), 1)   # Kaiming-initialised below
            self.out_dim = int(spec["latent"])

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = [self.stem(x)]
        for stage in self.stages:
            outs.append(stage(outs[-1]))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        if self.latent is not None:
            x = self.latent(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def stage_outputs(net: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The output map of every stage (stem excluded) and the pooled feature, in one forward pass (a timm
    backbone: every feature level's map, cilbench/kit/timm_backbones.py)."""
    if hasattr(net, "stage_outputs"):
        return net.stage_outputs(x)
    maps = net.forward_stages(x)[1:]
    last = net.latent(maps[-1]) if getattr(net, "latent", None) is not None else maps[-1]   # as forward()
    return maps, torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)


def stage_channels(net: nn.Module) -> list[int]:
    """Channels of each stage output of a factory backbone (a timm backbone: of each feature level)."""
    if hasattr(net, "stage_channels"):
        return net.stage_channels()
    return [blocks[-1][1] for blocks in net.spec["stages"]]


def build_backbone(name_or_spec: str | dict, in_channels: int = 3, width: int = 0,
                   init: str = "kaiming_fan_out", timm_kwargs: dict | None = None) -> nn.Module:
    """`init`: "kaiming_fan_out" draws every conv weight from kaiming_normal(fan_out, relu) (the default);
    "torch" keeps PyTorch's own nn.Conv2d initialisation (kaiming_uniform with a = sqrt(5)). BatchNorm starts
    at weight 1, bias 0 either way. A "timm:<model>" name or spec builds a TimmBackbone, initialised as timm
    does (`init` and `width` apply to the factory ResNets only; `timm_kwargs` to timm models only)."""
    timm_name = name_or_spec["name"] if isinstance(name_or_spec, dict) else name_or_spec
    if is_timm(timm_name):
        spec = name_or_spec if isinstance(name_or_spec, dict) else timm_spec(timm_name, in_channels, timm_kwargs)
        return TimmBackbone(spec)
    spec = name_or_spec if isinstance(name_or_spec, dict) else standard_spec(name_or_spec, in_channels, width)
    return ResNet(spec, init)


def count_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# --------------------------------------------------------------------------------------------------------
# Splitting a spec-built backbone into a shared trunk and a specialised tail (MEMO's generalized and
# specialized blocks): trunk = stem + stages[:split] (a feature map), tail = stages[split:] + pooling (the
# feature). Both keep the full spec plus {"part": {"role", "split"}}, so pack_module/unpack_module and
# ExtractorStack rebuild them through build_from_spec.

class BackbonePart(nn.Module):
    """The trunk or the tail of a factory backbone cut at a stage boundary. Built from a spec (fresh weights,
    the backbone's initialisation) or, with `source`, as copies of an existing backbone's modules."""

    def __init__(self, spec: dict, role: str, split: int, init: str = "kaiming_fan_out",
                 source: ResNet | None = None):
        super().__init__()
        base = {k: v for k, v in spec.items() if k != "part"}
        n_stages = len(base["stages"])
        if role not in ("trunk", "tail"):
            raise ValueError(f"unknown backbone part {role!r}; use trunk or tail")
        if not 0 <= split < n_stages:
            raise UserError(f"cannot split {base['name']} after {split} stage(s): it has {n_stages} stages, and "
                            f"the tail needs at least one (use 0..{n_stages - 1})")
        full = source if source is not None else ResNet(base, init)
        self.spec = {**copy.deepcopy(base), "part": {"role": role, "split": split}}
        self.role, self.split = role, split
        if role == "trunk":
            self.stem = copy.deepcopy(full.stem)
            self.stages = nn.ModuleList(copy.deepcopy(s) for s in full.stages[:split])
            self.latent = None
            self.out_dim = stage_channels(full)[split - 1] if split else base["stem"]   # channels of the map
        else:
            self.stem = None
            self.stages = nn.ModuleList(copy.deepcopy(s) for s in full.stages[split:])
            self.latent = copy.deepcopy(full.latent)
            self.out_dim = full.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        if self.role == "trunk":
            return x
        if self.latent is not None:
            x = self.latent(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def split_backbone(net: ResNet, shared_stages: int) -> tuple[BackbonePart, BackbonePart]:
    """(trunk, tail) with copies of `net`'s weights: trunk(x) is the map after the stem and the first
    `shared_stages` stages, tail(trunk(x)) equals net(x)."""
    return (BackbonePart(net.spec, "trunk", shared_stages, source=net),
            BackbonePart(net.spec, "tail", shared_stages, source=net))


def default_shared_stages(spec: dict) -> int:
    """Every stage but the last (MEMO's code: ResNet-32 shares stem + stages 1-2 and specialises stage 3;
    ResNet-18 shares stem + layers 1-3 and specialises layer 4)."""
    return len(spec["stages"]) - 1


def build_from_spec(spec: dict) -> nn.Module:
    """A whole backbone, or the trunk/tail a spec with a "part" entry describes (fresh weights)."""
    part = spec.get("part")
    if part:
        return BackbonePart(spec, part["role"], int(part["split"]))
    return build_backbone(spec)
