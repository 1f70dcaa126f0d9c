"""Vision-transformer pieces built from timm's layers: a patch encoder (patch embedding + positional embedding +
self-attention blocks), its blocks (ConViT's gated positional self-attention or plain multi-head self-attention),
a class-attention block (CaiT: one token queries the patches, only that token is updated) and weight-decay groups
as timm's optimiser factory forms them.

Blocks are pre-norm: x + DropPath(attn(LN(x))), then x + DropPath(Mlp(LN(x))). Weights start as ConViT/DeiT
start them: linear weights truncated-normal (std 0.02), biases 0, LayerNorm (1, 0), the patch convolution at
PyTorch's default, the positional embedding truncated-normal (std 0.02); GPSA then gets ConViT's local
initialisation (v = identity, each positional head focused on one offset).
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _timm_layers():
    """timm's layers, imported on first use: importing timm pulls in torchvision and torch._dynamo (seconds of
    start-up), which a run without a transformer never needs."""
    from timm.layers import Attention, DropPath, Mlp, PatchEmbed, trunc_normal_
    from timm.models.convit import GPSA
    return Attention, DropPath, Mlp, PatchEmbed, trunc_normal_, GPSA


BlockKind = Literal["gpsa", "mhsa"]


def init_vit_weights(module: nn.Module) -> None:
    """DeiT/ConViT initialisation of one module (use with module.apply)."""
    if isinstance(module, nn.Linear):
        _timm_layers()[4](module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class SelfAttentionBlock(nn.Module):
    """A pre-norm transformer block over all tokens. kind: gpsa = ConViT's gated positional self-attention
    (timm's GPSA, locally initialised; the tokens must form a square grid), mhsa = timm's multi-head Attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0, kind: BlockKind = "gpsa", locality_strength: float = 1.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        Attention, DropPath, Mlp, _, _, GPSA = _timm_layers()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim)
        if kind == "gpsa":
            self.attn = GPSA(dim, num_heads=heads, qkv_bias=qkv_bias, locality_strength=locality_strength)
        else:
            self.attn = Attention(dim, num_heads=heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.apply(init_vit_weights)
        if kind == "gpsa":
            self.attn.local_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ClassAttention(nn.Module):
    """Attention whose only query is the first token (CaiT's class attention): q = W_q x_0, keys and values from
    every token (x_0 included); softmax(q k^T / sqrt(d_head)) v per head, then a projection. Returns [B, 1, D]."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x[:, :1]).view(b, 1, h, d // h).transpose(1, 2)
        k = self.k(x).view(b, n, h, d // h).transpose(1, 2)
        v = self.v(x).view(b, n, h, d // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)           # [B, h, 1, d/h]
        return self.proj(out.transpose(1, 2).reshape(b, 1, d))


class ClassAttentionBlock(nn.Module):
    """A CaiT class-attention block: `token` [B, 1, D] attends over [token, patches]; only the token is updated,
    token + DropPath(CA(LN([token, patches]))), then token + DropPath(Mlp(LN(token)))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop_path: float = 0.0):
        super().__init__()
        _, DropPath, Mlp, _, _, _ = _timm_layers()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ClassAttention(dim, heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.apply(init_vit_weights)

    def forward(self, token: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        token = token + self.drop_path(self.attn(self.norm1(torch.cat([token, patches], dim=1))))
        return token + self.drop_path(self.mlp(self.norm2(token)))


class PatchEncoder(nn.Module):
    """Patch embedding (timm's PatchEmbed, a strided convolution) + a learned positional embedding + self-attention
    blocks. Maps images [B, C, H, W] to patch tokens [B, (H/p)(W/p), D]."""

    def __init__(self, image_size: int, in_chans: int, patch_size: int, dim: int, heads: int,
                 drop_paths: Sequence[float], mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 kind: BlockKind = "gpsa", locality_strength: float = 1.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image side {image_size} is not a multiple of the patch size {patch_size}")
        _, _, _, PatchEmbed, trunc_normal_, _ = _timm_layers()
        self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([SelfAttentionBlock(dim, heads, mlp_ratio, qkv_bias, rate, kind, locality_strength)
                                     for rate in drop_paths])
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return x


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to `rate` at the last (DeiT's rule)."""
    return [float(r) for r in torch.linspace(0, rate, depth)]


def decay_groups(named_params, weight_decay: float) -> list[dict]:
    """Optimiser groups as timm's factory forms them: no weight decay on biases and 1-D parameters (norms,
    gates); `weight_decay` on the rest. Parameters that do not require grad are left out."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
