"""Network pieces shared by the methods: a stack of extractors with frozen members, growing heads."""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cilbench.kit.backbones import build_from_spec, count_params


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and BN statistics fixed: parameters off and the module pinned to eval mode."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()
    return module


def frozen_forward(fn, x: torch.Tensor, chunk: int = 0):
    """fn(x) under no_grad for a frozen network in eval mode, `chunk` images at a time (0: all at once). In eval
    mode each sample's output depends on that sample alone, so chunking changes nothing but speed (and float
    rounding): on a CPU, chunks whose activations stay in cache run faster (Engine.frozen_chunk: 64 CIFAR
    images, where a ResNet-32 forward runs about 25% faster than at 128). Tensor outputs, and lists or tuples
    of them (stage maps), are concatenated back."""
    with torch.no_grad():
        if not chunk or len(x) <= chunk:
            return fn(x)
        return _cat_parts([fn(part) for part in x.split(chunk)])


def _cat_parts(parts: list):
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    return type(first)(_cat_parts([p[i] for p in parts]) for i in range(len(first)))


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

    def features_each(self, x: torch.Tensor, chunk: int = 0) -> list[torch.Tensor]:
        """Each extractor's features; frozen ones under no_grad, `chunk` images at a time (frozen_forward)."""
        return [frozen_forward(ext, x, chunk) if is_frozen else ext(x)
                for ext, is_frozen in zip(self.extractors, self.frozen)]

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
            stack.add(build_from_spec(spec))
        stack.load_state_dict(weights)
        for i, frozen in enumerate(extra["frozen"]):
            if frozen:
                stack.freeze(i)
        return stack.to(device)

    def num_params(self) -> int:
        return count_params(self)


HeadInit = Literal["torch", "pycil", "der"]


def linear_head(in_features: int, out_features: int, bias: bool = True, init: HeadInit = "torch") -> nn.Linear:
    """A linear head, initialised as
    - torch: nn.Linear's default, weight and bias ~ U(+-1/sqrt(fan_in)) (kaiming_uniform_ with a = sqrt(5));
    - pycil: PyCIL's SimpleLinear, weight kaiming_uniform_(nonlinearity='linear') ~ U(+-sqrt(3/fan_in)), bias 0;
    - der: DER's official _gen_classifier, weight kaiming_normal_(nonlinearity='linear') ~ N(0, 1/fan_in),
      bias 0."""
    head = nn.Linear(in_features, out_features, bias=bias)
    if init == "torch":
        return head
    with torch.no_grad():
        if init == "pycil":
            nn.init.kaiming_uniform_(head.weight, nonlinearity="linear")
        elif init == "der":
            nn.init.kaiming_normal_(head.weight, nonlinearity="linear")
        else:
            raise ValueError(f"unknown head init {init!r}; use torch, pycil or der")
        if bias:
            head.bias.zero_()
    return head


def expand_head(old: nn.Linear | None, in_features: int, out_features: int, inherit: bool = True,
                bias: bool = True, init: HeadInit = "torch") -> nn.Linear:
    """A head over more inputs/classes whose top-left block copies `old` (DER / PyCIL update_fc)."""
    device = old.weight.device if old is not None else None
    new = linear_head(in_features, out_features, bias, init).to(device)
    if old is not None and inherit:
        with torch.no_grad():
            o, i = old.weight.shape
            new.weight[:o, :i].copy_(old.weight)
            if bias and old.bias is not None:
                new.bias[:o].copy_(old.bias)
    return new


@torch.no_grad()
def weight_align(head: nn.Linear, n_old: int, value: float = 1.0) -> float:
    """Weight aligning (WA, Zhao et al. CVPR 2020; PyCIL's `weight_align`): the new-class rows (n_old:) of the
    head's weight are rescaled by gamma = mean old-row norm / mean new-row norm * value^(n_old / n_new); the bias
    is untouched. Returns gamma (1.0 when there are no old or no new classes: nothing to align)."""
    w = head.weight
    n_new = w.shape[0] - n_old
    if n_old <= 0 or n_new <= 0:
        return 1.0
    gamma = w[:n_old].norm(dim=1).mean() / w[n_old:].norm(dim=1).mean() * value ** (n_old / n_new)
    w[n_old:] *= gamma
    return float(gamma)


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




def snapshot(module: nn.Module) -> nn.Module:
    """A frozen copy of `module` (the previous model M^{t-1} of distillation methods): deep copy, eval mode,
    no parameter requires grad. The caller runs it under torch.no_grad(); training the original leaves it
    bit-identical, and it is never handed to a fit loop, so nothing puts it back in train mode."""
    import copy
    return freeze(copy.deepcopy(module))


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 30) -> torch.Tensor:
    """k centres of the rows of `x` (Lloyd's algorithm from a k-means++ start drawn with `generator`).
    With fewer rows than k, rows are repeated so every centre is a data point."""
    x = x.float()
    if len(x) < k:
        x = x[torch.arange(k, device=x.device) % len(x)]
    first = int(torch.randint(len(x), (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1 / len(d2))
        centres.append(x[int(torch.multinomial(probs.cpu(), 1, generator=generator))])
    c = torch.stack(centres)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(dim=1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
    return c


class LocalSimilarityHead(nn.Module):
    """PODNet's local-similarity classifier (LSC): K proxies theta_ck per class; per proxy the similarity
        s_ck = -||h/|h| - theta_ck/|theta_ck| ||^2 = 2 cos - 2     (PODNet's neg_stable_cosine_distance),
    the class similarity y_c = sum_k softmax_k(s_ck) s_ck, and logits eta * y_c with eta a learned scale
    (PODNet's learned_scaling post-processor, from 1), kept positive as eta = exp(log_scale): with eta < 0
    the hinged NCA loss reaches 0 by ranking the true class last. Proxies live in one block per task, so the blocks of
    old classes can be frozen (PODNet's CIFAR config: old_weights lr factor 0)."""

    def __init__(self, in_features: int, proxies_per_class: int = 10, scale: float = 1.0):
        super().__init__()
        self.in_features, self.k = in_features, proxies_per_class
        self.blocks = nn.ParameterList()
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    @property
    def n_classes(self) -> int:
        return sum(b.shape[0] for b in self.blocks) // self.k

    def add_classes(self, n: int, centres: torch.Tensor | None = None) -> None:
        """n new classes; `centres` [n, K, d] imprints their proxies (rescaled to the old proxies' mean norm),
        otherwise Kaiming-normal (PODNet's initialisation)."""
        device = self.log_scale.device
        if centres is None:
            weight = torch.empty(n * self.k, self.in_features, device=device)
            nn.init.kaiming_normal_(weight, nonlinearity="linear")
        else:
            weight = F.normalize(centres.reshape(n * self.k, -1).float(), dim=1).to(device)
            if len(self.blocks):
                weight = weight * torch.cat(list(self.blocks)).norm(dim=1).mean()
        self.blocks.append(nn.Parameter(weight))

    def freeze_old(self, frozen: bool = True) -> None:
        """Old-class proxies (every block but the last) off the optimiser, or back on."""
        for block in list(self.blocks)[:-1]:
            block.requires_grad_(not frozen)

    def similarities(self, x: torch.Tensor) -> torch.Tensor:
        """y_c in [-4, 0], float32."""
        w = F.normalize(torch.cat(list(self.blocks)).float(), dim=1)
        cos = F.linear(F.normalize(x.float(), dim=1), w).view(len(x), -1, self.k)       # [B, C, K]
        sims = -(2 - 2 * cos).clamp_min(0)
        return (F.softmax(sims, dim=-1) * sims).sum(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.similarities(x)

    @classmethod
    def from_state(cls, state: dict, proxies_per_class: int) -> "LocalSimilarityHead":
        head = cls(state["blocks.0"].shape[1], proxies_per_class)
        for i in range(sum(key.startswith("blocks.") for key in state)):
            head.blocks.append(nn.Parameter(torch.empty_like(state[f"blocks.{i}"])))
        head.load_state_dict(state)
        return head




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




def tie_parameters(dst: nn.Module, src: nn.Module) -> None:
    """Make every parameter of `dst` the very tensor of `src`'s (same architecture), frozen: layers shared
    between networks (SEED's shared stages) are stored and trained once. Buffers (BN running statistics) stay
    `dst`'s own."""
    for d_mod, s_mod in zip(dst.modules(), src.modules()):
        for name, p in s_mod.named_parameters(recurse=False):
            p.requires_grad_(False)
            setattr(d_mod, name, p)


# --------------------------------------------------------------------------------------------------------
# Checkpoints of modules that grow across tasks: one format for backbones, linear heads, projection heads and
# extractor stacks, so a method's state_dict lists its modules instead of hand-writing how each is rebuilt.

def is_frozen(module: nn.Module) -> bool:
    """No parameter of `module` trains (a frozen extractor, teacher or head)."""
    return not any(p.requires_grad for p in module.parameters())


def pack_module(module: nn.Module | None) -> dict | None:
    """A module as plain data: what to build, its weights (on the CPU) and whether it is frozen."""
    if module is None:
        return None
    module = getattr(module, "_orig_mod", module)        # a torch.compile wrapper: pack the module it wraps
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    if isinstance(module, ExtractorStack):
        return {"kind": "stack", **module.extra_state(), "state": state}
    if isinstance(module, ProjectionHead):
        first, last = module.net[0], module.net[-1]
        args = [first.in_features, last.out_features, first.out_features]
        return {"kind": "projection", "args": args, "state": state, "frozen": is_frozen(module)}
    if isinstance(module, nn.Linear):
        args = [module.in_features, module.out_features, module.bias is not None]
        return {"kind": "linear", "args": args, "state": state, "frozen": is_frozen(module)}
    if hasattr(module, "spec"):
        return {"kind": "backbone", "spec": module.spec, "state": state, "frozen": is_frozen(module)}
    raise TypeError(f"pack_module: no packed form for {type(module).__name__}")


def unpack_module(packed: dict | None, device) -> nn.Module | None:
    """The module `pack_module` described, on `device`, frozen again where it was (eval mode pinned)."""
    if packed is None:
        return None
    kind = packed["kind"]
    if kind == "stack":
        return ExtractorStack.rebuild(packed, packed["state"], device)
    if kind == "projection":
        in_f, out_f, hidden = packed["args"]
        module = ProjectionHead(in_f, out_f, hidden)
    elif kind == "linear":
        in_f, out_f, bias = packed["args"]
        module = nn.Linear(in_f, out_f, bias=bias)
    elif kind == "backbone":
        module = build_from_spec(packed["spec"])
    else:
        raise TypeError(f"unpack_module: unknown kind {kind!r}")
    module.load_state_dict(packed["state"])
    module = module.to(device)
    return freeze(module) if packed.get("frozen") else module
