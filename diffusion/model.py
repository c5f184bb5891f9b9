"""A small U-Net for ε-prediction, in the style of lucidrains' denoising-diffusion-pytorch:
channel widths ``dim · dim_mults``, sinusoidal time embedding, ResNet blocks with GroupNorm
and a scale/shift from the time (and class) embedding, optional self-attention at low
resolution, optional class conditioning with label dropout for classifier-free guidance.

Works for any H×W ≥ 4 (8×8 digits, 28×28 MNIST padded or not, 32×32 CIFAR): the up path
resizes to the skip connection's size, so odd sizes (7×7 after two halvings of 28) are fine.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class SinusoidalPosEmb(nn.Module):
    """t (B,) → (B, dim) sin/cos features at geometric frequencies (Transformer positions)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / max(half - 1, 1))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)


def _groups(ch: int, groups: int) -> int:
    """The largest divisor of ch that is ≤ groups (GroupNorm needs ch % groups == 0)."""
    return max(g for g in range(1, min(groups, ch) + 1) if ch % g == 0)


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, twice, with the embedding as a FiLM scale/shift; residual 1×1."""

    def __init__(self, dim_in: int, dim_out: int, emb_dim: int, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(_groups(dim_in, groups), dim_in), nn.Conv2d(dim_in, dim_out, 3, padding=1)
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * dim_out))
        self.norm2, self.conv2 = nn.GroupNorm(_groups(dim_out, groups), dim_out), nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, pre-GroupNorm, residual."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm = nn.GroupNorm(1, dim)
        self.qkv, self.out = nn.Conv2d(dim, 3 * inner, 1, bias=False), nn.Conv2d(inner, dim, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, self.heads, -1, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, dim_head)
        return x + self.out(h.transpose(-1, -2).reshape(B, -1, H, W))


class Unet(nn.Module):
    """ε-network ``model(x, t, y=None) -> (B, channels, H, W)``.

    dim, dim_mults: widths per level (level i has ``dim*dim_mults[i]`` channels; the image is
    halved between levels).  resnet_blocks: blocks per level on the way down (one more on the
    way up, which also takes the downsampled skip).  attn_levels: indices of levels with
    self-attention (the middle has it whenever attention is used at all).  num_classes:
    enables class conditioning; ``cond_drop_prob`` is the probability of replacing a label by
    the null class in training (classifier-free guidance); ``y=None`` means the null class.
    """

    def __init__(self, dim: int = 32, dim_mults=(1, 2), channels: int = 1, resnet_blocks: int = 2,
                 attn_levels=(), groups: int = 8, dropout: float = 0.0, num_classes: int | None = None,
                 cond_drop_prob: float = 0.1, heads: int = 4, dim_head: int = 32):
        super().__init__()
        self.channels, self.num_classes, self.cond_drop_prob = channels, num_classes, cond_drop_prob
        dims = [dim * m for m in dim_mults]
        emb_dim = 4 * dim
        self.time_emb = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, emb_dim), nn.GELU(),
                                      nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.init_conv = nn.Conv2d(channels, dim, 3, padding=1)
        attn = set(attn_levels)
        block = lambda i, o: ResnetBlock(i, o, emb_dim, groups, dropout)  # noqa: E731

        # down: each block's output is a skip, and so is each downsampled map
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()
        skips, ch = [dim], dim
        for i, d in enumerate(dims):
            last = i == len(dims) - 1
            level = nn.ModuleList()
            for _ in range(resnet_blocks):
                level.append(block(ch, d))
                ch = d
                skips.append(ch)
            level.append(Attention(ch, heads, dim_head) if i in attn else nn.Identity())
            level.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skips.append(ch)
            self.downs.append(level)
        self.mid1 = block(ch, ch)
        self.mid_attn = Attention(ch, heads, dim_head) if attn else nn.Identity()
        self.mid2 = block(ch, ch)
        # up: R+1 blocks per level (its R block skips + the map that entered it), then upsample
        for i, d in reversed(list(enumerate(dims))):
            level = nn.ModuleList()
            for _ in range(resnet_blocks + 1):
                level.append(block(ch + skips.pop(), d))
                ch = d
            level.append(Attention(ch, heads, dim_head) if i in attn else nn.Identity())
            level.append(nn.Conv2d(ch, ch, 3, padding=1) if i > 0 else nn.Identity())
            self.ups.append(level)
        assert not skips
        self.out = nn.Sequential(nn.GroupNorm(_groups(ch, groups), ch), nn.SiLU(),
                                 nn.Conv2d(ch, channels, 3, padding=1))

    def forward(self, x, t, y=None, cond_drop_mask=None):
        """x (B,C,H,W), t (B,) long, y (B,) long or None → (B,C,H,W).  cond_drop_mask (B,)
        bool forces the null class where True (guided sampling); in training mode labels are
        dropped with probability ``cond_drop_prob``."""
        emb = self.time_emb(t)
        if self.class_emb is not None:
            null = torch.full((x.shape[0],), self.num_classes, device=x.device, dtype=torch.long)
            if y is None:
                y = null
            else:
                drop = cond_drop_mask
                if drop is None and self.training and self.cond_drop_prob > 0:
                    drop = torch.rand(x.shape[0], device=x.device) < self.cond_drop_prob
                y = torch.where(drop, null, y) if drop is not None else y
            emb = emb + self.class_emb(y)
        h = self.init_conv(x)
        hs = [h]
        for *blocks, attn, down in self.downs:
            for b in blocks:
                h = b(h, emb)
                hs.append(h)
            h = attn(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for *blocks, attn, up in self.ups:
            for b in blocks:
                h = b(torch.cat([h, hs.pop()], dim=1), emb)
            h = attn(h)
            if not isinstance(up, nn.Identity):  # conv at the low resolution, then nearest upsampling
                h = F.interpolate(up(h), size=hs[-1].shape[-2:], mode="nearest")
        return self.out(h)
