"""Swin Transformer image encoder of RAM, written from the Swin paper (Liu et al., ICCV 2021) and the tensor
layout of RAM's published checkpoint.

Module and parameter names follow the checkpoint's keys under ``visual_encoder.`` (RAM's
``ram/models/swin_transformer.py``, SeeSR's ``ram/models/swin_transformer_lora.py``; see docs/RAM.md):
``patch_embed.proj`` / ``patch_embed.norm``, ``layers.{i}.blocks.{j}.{norm1, attn.qkv, attn.proj,
attn.relative_position_bias_table, norm2, mlp.fc1, mlp.fc2}``, ``layers.{i}.downsample.{norm, reduction}``,
``norm``. The relative-position index and the shifted-window masks are derived from the geometry and kept
as non-persistent buffers (RAM's loaders delete them from checkpoints too).

Behaviour that matters for exactness (each checked against RAM's own code by tests/test_ram.py):

- a stage whose resolution is not larger than the window uses one window of the whole stage and no shift;
- odd blocks shift by ``window // 2``; masked pairs get -100 (not -inf) added before the softmax;
- patch merging concatenates the 2x2 neighbours in the order (0,0), (1,0), (0,1), (1,1) (row, column);
- the output is ``cat([mean over tokens, tokens])`` after the final LayerNorm: [B, 1 + h*w, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: value RAM's Swin adds to the attention logits of token pairs from different regions of a shifted window
SHIFT_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """[B, H, W, C] -> [B * nW, window * window, C], windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: [B * nW, window * window, C] -> [B, H, W, C]."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def relative_position_index(window: int) -> torch.Tensor:
    """[window^2, window^2] index into the (2*window-1)^2 bias table: (dy + w-1) * (2w-1) + (dx + w-1)."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def shifted_window_mask(h: int, w: int, window: int, shift: int) -> torch.Tensor:
    """[nW, window^2, window^2] additive mask of a cyclically shifted window layout (0 or SHIFT_MASK_VALUE)."""
    region = torch.zeros(1, h, w, 1)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            region[:, hs, ws, :] = label
            label += 1
    regions = window_partition(region, window).squeeze(-1)  # nW, window^2
    diff = regions[:, None, :] - regions[:, :, None]
    return torch.where(diff != 0, torch.tensor(SHIFT_MASK_VALUE), torch.tensor(0.0))


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window), persistent=False)

    def reset_derived_buffers(self) -> None:
        self.relative_position_index = relative_position_index(self.window).to(self.relative_position_index.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B*nW, heads, N, d]
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1).to(q.dtype)  # heads, N, N
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        else:
            nw = mask.shape[0]
            b = bw // nw
            d = q.shape[-1]
            # windows of one image side by side as heads: [B, nW*heads, N, d] with a [nW*heads, N, N] bias
            full = (bias.unsqueeze(0) + mask.to(q.dtype).unsqueeze(1)).reshape(nw * self.num_heads, n, n)
            q, k, v = (t.reshape(b, nw * self.num_heads, n, d) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=full.unsqueeze(0))
            out = out.reshape(bw, self.num_heads, n, d)
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwinBlock(nn.Module):
    def __init__(
        self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int, mlp_ratio: float
    ):
        super().__init__()
        self.resolution = resolution
        if min(resolution) <= window:
            # the stage fits in one window: no partition, no shift (as RAM's Swin)
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.register_buffer("attn_mask", self._mask(), persistent=False)

    def _mask(self) -> torch.Tensor | None:
        if not self.shift:
            return None
        return shifted_window_mask(*self.resolution, self.window, self.shift)

    def reset_derived_buffers(self) -> None:
        if self.attn_mask is not None:
            self.attn_mask = self._mask().to(self.attn_mask.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        y = self.attn(window_partition(y, self.window), self.attn_mask)
        y = window_merge(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, n, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        # neighbour order (row, col): (0,0), (1,0), (0,1), (1,1)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim, resolution, depth, num_heads, window, mlp_ratio, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """RAM's Swin encoder: [B, 3, S, S] normalised pixels -> [B, 1 + (S/32)^2, C] (S = ``image_size``)."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        embed_dim: int,
        depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        window_size: int,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        side = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads, strict=True)):
            res = (side // 2**i, side // 2**i)
            last = i == len(depths) - 1
            self.layers.append(SwinStage(embed_dim * 2**i, res, depth, heads, window_size, mlp_ratio, not last))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"RAM's Swin takes {self.image_size}x{self.image_size} input, got {tuple(x.shape[-2:])}")
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
