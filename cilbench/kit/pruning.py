"""DER's channel-level masks, sparsity loss, gradient compensation and physical pruning (DER sec. 3.3,
adapted from HAT), for the ResNets of cilbench/kit/backbones.py.

Every feature map of a ResNet belongs to a *channel group*. A group that carries a mask
`m = sigmoid(s * e)` has it multiplied onto every feature map of the group (forward hooks, so the backbone
code is untouched); after training the masks are binarised (`e > 0`) and the channels whose mask is 0 are
removed from every convolution that writes the group (output channels and the BN entries) and every
convolution that reads it (input channels).

Two scopes (the paper leaves where the masks sit open):
- "shared" (choice B): one mask per residual stream, shared by the stem and every block output of a stage
  (identity shortcuts join the two sides into one group), plus one mask on each block's inner conv. The
  residual streams and the output dimension are pruned too. Where a stride-2 block of an option-A network
  (resnet20/32: subsample + zero-padding shortcut) links two streams pruned differently, the pruned network
  gets an explicit index shortcut (backbones.IndexShortcut) so it computes exactly what the masked one did.
- "internal" (choice A): a mask on each block's inner conv (conv1 output) and on the stem only. Residual
  streams are never pruned and the output dimension stays; the first block's identity shortcut becomes an
  index shortcut that scatters the surviving stem channels into the full-width stream.

The mask of a block's inner conv is applied at bn1's output (before the ReLU): relu(m * v) = m * relu(v) for
m >= 0, so this equals masking after the activation as HAT does. Stream masks are applied after the block's
final ReLU.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from cilbench.kit.backbones import BasicBlock, IndexShortcut, ResNet, ShortcutA

Scope = Literal["shared", "internal"]


@dataclass
class BlockInfo:
    stage: int
    block: int
    module: BasicBlock
    t_in: str          # group of the block input
    mid: str           # group of the conv1 output
    t_out: str         # group of the block output
    stride: int

    @property
    def path(self) -> str:
        return f"stages.{self.stage}.{self.block}"


@dataclass
class Graph:
    """Channel groups of a ResNet and the convolutions / BN layers that read and write them."""
    channels: dict[str, int]                      # group -> number of channels
    masked: list[str]                             # groups that carry a mask
    image: str
    stem: str                                     # group of the stem output
    out: str                                      # group of the final feature
    blocks: list[BlockInfo]
    convs: list[tuple[str, str, str, int]]        # (weight key, input group, output group, k*k taps)
    bns: list[tuple[str, str]]                    # (BN prefix, group)
    sites: dict[str, list[nn.Module]] = field(default_factory=dict)   # group -> modules whose output is masked


def shortcut_map(block: BasicBlock) -> list[int] | None:
    """For a parameter-free shortcut, the input channel each output channel copies (-1: zero); None for a
    1x1-conv shortcut."""
    sc = block.shortcut
    n_out = block.conv2.out_channels
    if isinstance(sc, IndexShortcut):
        return list(sc.index)
    if isinstance(sc, nn.Identity):
        return list(range(n_out))
    if isinstance(sc, ShortcutA):
        n_in = block.conv1.in_channels
        return [i if i < n_in else -1 for i in range(n_out)]
    return None


def describe(net: ResNet, scope: Scope = "shared", kernel: Literal["area", "side"] = "area") -> Graph:
    """The channel groups of `net` under a mask scope."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    def taps(conv: nn.Conv2d) -> int:
        k = conv.kernel_size[0] * conv.kernel_size[1]
        return k if kernel == "area" else int(round(math.sqrt(k)))

    tensors = {"x": net.spec["in_channels"], "t0": net.stem[0].out_channels}
    raw_blocks = []
    prev = "t0"
    for s, stage in enumerate(net.stages):
        for b, block in enumerate(stage):
            mid, out = f"m{s}_{b}", f"t{s}_{b}"
            tensors[mid], tensors[out] = block.conv1.out_channels, block.conv2.out_channels
            if scope == "shared" and isinstance(block.shortcut, nn.Identity):
                union(prev, out)
            raw_blocks.append((s, b, block, prev, mid, out))
            prev = out
    group = {t: find(t) for t in tensors}
    channels = {group[t]: c for t, c in tensors.items()}
    if scope == "shared":
        masked = sorted({g for t, g in group.items() if t != "x"})
    else:
        masked = sorted({group["t0"], *(group[r[4]] for r in raw_blocks)})
    blocks = [BlockInfo(s, b, blk, group[i], group[m], group[o], blk.conv1.stride[0])
              for s, b, blk, i, m, o in raw_blocks]
    stem_conv = net.stem[0]
    convs = [("stem.0.weight", group["x"], group["t0"], taps(stem_conv))]
    bns = [("stem.1", group["t0"])]
    sites: dict[str, list[nn.Module]] = {g: [] for g in masked}
    if group["t0"] in sites:
        sites[group["t0"]].append(net.stem)
    for info in blocks:
        blk, p = info.module, info.path
        convs.append((f"{p}.conv1.weight", info.t_in, info.mid, taps(blk.conv1)))
        convs.append((f"{p}.conv2.weight", info.mid, info.t_out, taps(blk.conv2)))
        bns += [(f"{p}.bn1", info.mid), (f"{p}.bn2", info.t_out)]
        if isinstance(blk.shortcut, nn.Sequential):
            convs.append((f"{p}.shortcut.0.weight", info.t_in, info.t_out, taps(blk.shortcut[0])))
            bns.append((f"{p}.shortcut.1", info.t_out))
        if info.mid in sites:
            sites[info.mid].append(blk.bn1)
        if info.t_out in sites:
            sites[info.t_out].append(blk)
    return Graph(channels, masked, group["x"], group["t0"], group[prev], blocks, convs, bns, sites)


def anneal(step: int, steps: int, s_max: float) -> float:
    """Eq. 8: s rises linearly from 1/s_max (first batch of the epoch) to s_max (last batch). `step` is
    0-based (b = step + 1)."""
    if steps <= 1:
        return s_max
    return 1.0 / s_max + (s_max - 1.0 / s_max) * step / (steps - 1)


def binarize(e: torch.Tensor) -> torch.Tensor:
    """The inference mask of e: 1 where e > 0 (sigmoid(s_max e) > 0.5). A group never loses every channel:
    if no e is positive, the channel with the largest e is kept (the network would otherwise be cut)."""
    keep = e > 0
    if not bool(keep.any()):
        keep = torch.zeros_like(keep)
        keep[int(torch.argmax(e))] = True
    return keep


class ChannelMasks(nn.Module):
    """The learnable mask parameters e of one network, and the hooks that apply sigma(s * e).

    `s` is set by the training loop (anneal); `binary = True` applies the binarised masks instead (what the
    pruned network computes). The network is not registered as a submodule: parameters() are the e's only.
    """

    def __init__(self, net: ResNet, scope: Scope = "shared", s_max: float = 400.0,
                 kernel: Literal["area", "side"] = "area", init_mean: float = 0.0, init_std: float = 1.0):
        super().__init__()
        self.graph = describe(net, scope, kernel)
        self.scope = scope
        self.s_max = float(s_max)
        self.s = float(s_max)
        self.binary = False
        device = net.stem[0].weight.device
        self.e = nn.ParameterDict({
            g: nn.Parameter(torch.randn(self.graph.channels[g]).mul_(init_std).add_(init_mean).to(device))
            for g in self.graph.masked})
        self.initial = {g: (e.detach() > 0).cpu() for g, e in self.e.items()}   # the signs training starts from
        self._handles: list = []
        g = self.graph
        self._den = float(sum(k * g.channels[i] * g.channels[o] for _, i, o, k in g.convs))

    # --- masks ----------------------------------------------------------------------------------------
    def mask(self, group: str) -> torch.Tensor:
        e = self.e[group]
        if self.binary:
            return binarize(e.detach()).to(e.dtype)
        return torch.sigmoid(self.s * e)

    def keep(self) -> dict[str, torch.Tensor]:
        """Indices of the surviving channels of every group (all channels of an unmasked group)."""
        out = {}
        for g, c in self.graph.channels.items():
            if g in self.e:
                out[g] = torch.nonzero(binarize(self.e[g].detach())).flatten().cpu()
            else:
                out[g] = torch.arange(c)
        return out

    def stats(self) -> dict:
        """Kept fraction over the masked channels, and the fraction whose keep decision differs from the sign
        of its initial e (0 would mean the masks never learned: pruning by the random initialisation)."""
        total = kept = changed = 0
        for g, e in self.e.items():
            keep = binarize(e.detach()).cpu()
            total += keep.numel()
            kept += int(keep.sum())
            changed += int((keep != self.initial[g]).sum())
        return {"kept_fraction": kept / total, "changed_vs_init": changed / total}

    def attach(self) -> "ChannelMasks":
        self.detach()
        for g, modules in self.graph.sites.items():
            for module in modules:
                self._handles.append(module.register_forward_hook(self._hook(g)))
        return self

    def _hook(self, group: str):
        def apply(module, inputs, output):
            m = self.mask(group).to(output.dtype)
            return output * m.view(1, -1, 1, 1)
        return apply

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- losses and gradient surgery ------------------------------------------------------------------
    def used(self, group: str) -> torch.Tensor | float:
        """||m||_1 of a group (its channel count when it carries no mask)."""
        if group in self.e:
            return self.mask(group).float().sum()
        return float(self.graph.channels[group])

    def sparsity(self) -> torch.Tensor:
        """Eq. 10: sum_l K_l ||m_{l-1}||_1 ||m_l||_1 / sum_l K_l c_{l-1} c_l over every convolution, with
        m_{l-1} the mask of the conv's actual input (layer 0 = the image, ||m_0|| = its channel count)."""
        num = sum(k * self.used(i) * self.used(o) for _, i, o, k in self.graph.convs)
        return num / self._den

    @torch.no_grad()
    def compensate(self, mode: Literal["paper", "hat", "none"] = "paper", clamp: float | None = 50.0) -> None:
        """Eq. 9: g' = sigma'(e) / (s sigma'(s e)) g = (cosh(s e) + 1) / (s (cosh(e) + 1)) g; "hat" multiplies
        by s_max as HAT's code does. `clamp` bounds s*e inside cosh (HAT's thres_cosh = 50). Computed in
        float64; a gradient that underflowed to 0 stays 0."""
        if mode == "none":
            return
        for e in self.e.values():
            if e.grad is None:
                continue
            x = e.detach().double()
            se = self.s * x
            if clamp is not None:
                se = se.clamp(-clamp, clamp)
            ratio = (torch.cosh(se) + 1) / (self.s * (torch.cosh(x) + 1))
            if mode == "hat":
                ratio = ratio * self.s_max
            g = e.grad.double()
            g = torch.where(g == 0, torch.zeros_like(g), g * ratio)
            e.grad.copy_(g.to(e.grad.dtype))

    @torch.no_grad()
    def clamp_(self, bound: float | None = 6.0) -> None:
        """HAT's thres_emb: keep e in [-bound, bound] after each step."""
        if bound is None:
            return
        for e in self.e.values():
            e.clamp_(-bound, bound)


def _default_map(n_in: int, n_out: int, stride: int, kind: str) -> list[int] | None:
    """The shortcut map ResNet's constructor gives a block without an explicit index."""
    if stride == 1 and n_in == n_out:
        return list(range(n_out))
    if kind == "A":
        return [i if i < n_in else -1 for i in range(n_out)]
    return None


def pruned_spec(net: ResNet, graph: Graph, keep: dict[str, torch.Tensor]) -> dict:
    """The spec of `net` with only the channels in `keep` (index shortcuts where the two sides of a
    parameter-free shortcut differ)."""
    spec = copy.deepcopy(net.spec)
    spec["stem"] = len(keep[graph.stem])
    index: dict[str, list[int]] = {}
    for info in graph.blocks:
        k_in, k_mid, k_out = keep[info.t_in], keep[info.mid], keep[info.t_out]
        spec["stages"][info.stage][info.block] = [len(k_mid), len(k_out)]
        old = shortcut_map(info.module)
        default = _default_map(len(k_in), len(k_out), info.stride, spec["shortcut"])
        if old is None:               # 1x1-conv shortcut: its weights carry any channel change
            if default is not None and info.stride == 1 and len(k_in) == len(k_out):
                raise NotImplementedError(f"{info.path}: a conv shortcut pruned to equal widths at stride 1 "
                                          "would be rebuilt as an identity")
            continue
        pos = {int(c): p for p, c in enumerate(k_in.tolist())}
        new = [pos.get(old[o], -1) if old[o] >= 0 else -1 for o in k_out.tolist()]
        if new != default:
            index[f"{info.stage}.{info.block}"] = new
    spec.pop("shortcut_index", None)
    if index:
        spec["shortcut_index"] = index
    return spec


@torch.no_grad()
def prune(net: ResNet, graph: Graph, keep: dict[str, torch.Tensor]) -> ResNet:
    """A physically smaller ResNet that computes what `net` computes with the binarised masks `keep`: removed
    output channels of every conv and BN writing a group, and removed input channels of every conv reading it."""
    spec = pruned_spec(net, graph, keep)
    device = net.stem[0].weight.device
    new = ResNet(spec).to(device)
    state = net.state_dict()
    out = {}
    for key, g_in, g_out, _ in graph.convs:
        w = state[key]
        out[key] = w.index_select(0, keep[g_out].to(w.device)).index_select(1, keep[g_in].to(w.device)).clone()
    for prefix, g in graph.bns:
        idx = keep[g]
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = state[f"{prefix}.{name}"]
            out[f"{prefix}.{name}"] = t.index_select(0, idx.to(t.device)).clone()
        out[f"{prefix}.num_batches_tracked"] = state[f"{prefix}.num_batches_tracked"].clone()
    new.load_state_dict(out)
    return new


@torch.no_grad()
def regrow(fresh: ResNet, full: ResNet, graph: Graph, keep: dict[str, torch.Tensor]) -> ResNet:
    """`fresh` (same spec as `full`) with the surviving channels' weights of `full` copied in and the pruned
    ones left at their fresh initialisation (the second way to start F_t from a pruned F_{t-1}). `graph`
    describes `full`."""
    src, dst = full.state_dict(), fresh.state_dict()
    for key, g_in, g_out, _ in graph.convs:
        o, i = keep[g_out], keep[g_in]
        dst[key][o[:, None], i[None, :]] = src[key][o[:, None], i[None, :]]
    for prefix, g in graph.bns:
        for name in ("weight", "bias", "running_mean", "running_var"):
            dst[f"{prefix}.{name}"][keep[g]] = src[f"{prefix}.{name}"][keep[g]]
    fresh.load_state_dict(dst)
    return fresh


__all__ = ["ChannelMasks", "Graph", "anneal", "binarize", "describe", "prune", "pruned_spec", "regrow",
           "shortcut_map"]
