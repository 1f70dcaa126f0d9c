"""Network pieces shared by the methods: a stack of extractors with frozen members, growing heads."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ResNet, build_backbone, count_params


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and BN statistics fixed: parameters off and the module pinned to eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


class ExtractorStack(nn.Module):
    """Extractors whose features are concatenated (DER's super-feature).

    Frozen extractors run in eval mode under no_grad whatever mode the stack is put in, so their BN
    statistics never move and no graph is built through them.
    """

    def __init__(self):
        super().__init__()
        self.extractors = nn.ModuleList()
        self.frozen: list[bool] = []

    def __len__(self) -> int:
        return len(self.extractors)

    def add(self, extractor: nn.Module, frozen: bool = False) -> int:
        self.extractors.append(freeze(extractor) if frozen else extractor)
        self.frozen.append(frozen)
        return len(self.extractors) - 1

    def replace(self, i: int, extractor: nn.Module, frozen: bool) -> None:
        self.extractors[i] = freeze(extractor) if frozen else extractor
        self.frozen[i] = frozen

    def pop(self) -> nn.Module:
        self.frozen.pop()
        ext = self.extractors[-1]
        del self.extractors[-1]
        return ext

    def freeze(self, i: int) -> None:
        freeze(self.extractors[i])
        self.frozen[i] = True

    def train(self, mode: bool = True):
        super().train(mode)
        for ext, is_frozen in zip(self.extractors, self.frozen):
            if is_frozen:
                ext.eval()
        return self

    @property
    def dims(self) -> list[int]:
        return [ext.out_dim for ext in self.extractors]

    @property
    def out_dim(self) -> int:
        return sum(self.dims)

    def features_each(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for ext, is_frozen in zip(self.extractors, self.frozen):
            if is_frozen:
                with torch.no_grad():
                    feats.append(ext(x))
            else:
                feats.append(ext(x))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.features_each(x), dim=1)

    def specs(self) -> list[dict]:
        return [ext.spec for ext in self.extractors]

    def extra_state(self) -> dict:
        return {"specs": self.specs(), "frozen": list(self.frozen)}

    @classmethod
    def rebuild(cls, extra: dict, weights: dict, device) -> "ExtractorStack":
        stack = cls()
        for spec in extra["specs"]:
            stack.add(build_backbone(spec))
        stack.load_state_dict(weights)
        for i, frozen in enumerate(extra["frozen"]):
            if frozen:
                stack.freeze(i)
        return stack.to(device)

    def num_params(self) -> int:
        return count_params(self)


def linear_head(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    """Linear head with Kaiming-uniform weights (PyTorch default), as PyCIL's SimpleLinear."""
    return nn.Linear(in_features, out_features, bias=bias)


def expand_head(old: nn.Linear | None, in_features: int, out_features: int, inherit: bool = True,
                bias: bool = True) -> nn.Linear:
    """A head over more inputs/classes whose top-left block copies `old` (DER / PyCIL update_fc)."""
    device = old.weight.device if old is not None else None
    new = linear_head(in_features, out_features, bias).to(device)
    if old is not None and inherit:
        with torch.no_grad():
            o, i = old.weight.shape
            new.weight[:o, :i].copy_(old.weight)
            if bias and old.bias is not None:
                new.bias[:o].copy_(old.bias)
    return new


def drop_columns(head: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """A copy of `head` that reads only the input features in `keep` (e.g. without a teacher's block)."""
    new = nn.Linear(int(keep.numel()), head.out_features, bias=head.bias is not None).to(head.weight.device)
    with torch.no_grad():
        new.weight.copy_(head.weight[:, keep])
        if head.bias is not None:
            new.bias.copy_(head.bias)
    return new


class CosineHead(nn.Module):
    """Cosine classifier: scale * <w/|w|, x/|x|> (proxy-based methods such as PCR)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0, learn_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=learn_scale)

    def forward(self, x):
        return self.scale * F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))


__all__ = ["ExtractorStack", "freeze", "expand_head", "drop_columns", "linear_head", "CosineHead", "ResNet"]


class ProjectionHead(nn.Module):
    """SupCon's MLP projection head (`head='mlp'`): Linear(d, hidden) -> ReLU -> Linear(hidden, out), then L2
    normalisation. `hidden` defaults to the input dim (TSD: d -> d -> 128)."""

    def __init__(self, in_features: int, out_features: int = 128, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_features
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x).float(), dim=1)


def trainable_copy(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every parameter trainable and in train mode (e.g. a distillation student
    initialised from a frozen extractor). The original is untouched."""
    import copy
    new = copy.deepcopy(module)
    for p in new.parameters():
        p.requires_grad_(True)
    return new.train()


__all__ += ["ProjectionHead", "trainable_copy"]


class ProxyHead(CosineHead):
    """A cosine head computed in float32 even under bf16 autocast: its logits reach 1/tau ~ 11 and bf16 would
    round them to steps of ~0.06."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return self.scale * F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))


def proxy_head(in_features: int, classes: int, tau: float = 0.09) -> ProxyHead:
    """PCR/HPCR's proxy classifier (the code's cosLinear): logits cos(z, w_c) / tau, no bias; row c of the
    weight is class c's proxy. Allocated for every class of the protocol at once, as the code does: the PCR
    loss never touches the proxy of a class absent from the batch, so unseen rows stay as initialised."""
    return ProxyHead(in_features, classes, scale=1.0 / tau)


__all__ += ["ProxyHead", "proxy_head"]
