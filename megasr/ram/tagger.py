"""RAM's tagger: Swin tokens -> ``image_proj`` -> representation tokens; label queries -> tagging head -> tags.

Written from the RAM paper (Zhang et al., "Recognize Anything", 2023) and the published tensor layout
(key names as in ``ram_swin_large_14m.pth``; sources in docs/RAM.md):

- ``image_proj``: Linear(vision_width -> 512) on the Swin output; its result is the representation tokens
  SeeSR's ``image_attentions`` read (``generate_image_embeds``);
- ``label_embed`` [num_classes, 512]: one query per class; ``wordvec_proj`` Linear(512 -> hidden) (identity when
  hidden is 512) then ReLU;
- ``tagging_head.encoder.layer.{i}``: BERT layers *without* self-attention (RAM deletes it, Query2Label style):
  cross-attention (queries = labels, keys/values = the 145 image tokens, no mask) with residual + LayerNorm,
  then the GELU FFN with residual + LayerNorm; key names ``crossattention.self.{query,key,value}``,
  ``crossattention.output.{dense,LayerNorm}``, ``intermediate.dense``, ``output.{dense,LayerNorm}``;
- ``fc`` Linear(hidden -> 1) per label -> logit; a class is a tag when ``sigmoid(logit) > threshold[class]``
  (strictly greater; RAM's per-class thresholds file), in tag-list order; ``delete_tag_index`` (empty in RAM's
  and SeeSR's inference) removes classes from the output.

RAM's captioning parts (``tag_encoder``, ``text_decoder``) are not built: tagging and the tokens never run them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..dage.kinds import BY_KIND
from . import RAM_TOKEN_DIM, RamOutput
from .config import RamConfig
from .swin import SwinTransformer

COMPONENT = BY_KIND["ram"].component

log = logging.getLogger("megasr")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _CrossSelf(nn.Module):
    def __init__(self, hidden: int, kv_width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class _CrossAttention(nn.Module):
    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.self = _CrossSelf(hidden, kv_width)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, d).transpose(1, 2)

        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.output(out, x)


class _Intermediate(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class TaggingLayer(nn.Module):
    def __init__(self, hidden: int, kv_width: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.crossattention = _CrossAttention(hidden, kv_width, heads, eps)
        self.intermediate = _Intermediate(hidden, inter)
        self.output = _DenseNorm(inter, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        a = self.crossattention(x, context)
        return self.output(self.intermediate(a), a)


class _Encoder(nn.Module):
    def __init__(self, layers: Sequence[TaggingLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TaggingHead(nn.Module):
    """RAM's image-tag recognition decoder (``tagging_head``)."""

    def __init__(self, config: RamConfig) -> None:
        super().__init__()
        c = config
        self.encoder = _Encoder(
            [
                TaggingLayer(
                    c.head_hidden_size, c.token_dim, c.head_num_heads, c.head_intermediate_size, c.head_layer_norm_eps
                )
                for _ in range(c.head_num_layers)
            ]
        )

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layer:
            queries = layer(queries, context)
        return queries


def preprocess(image: torch.Tensor, size: int = 384, antialias: bool = False) -> torch.Tensor:
    """RGB [B, 3, H, W] in 0..1 (any size) -> RAM's input: bilinear resize to size x size, ImageNet normalisation.

    SeeSR's test script (cswry/SeeSR test_seesr.py, ``ram_transforms``) applies torchvision
    ``Resize((384, 384))`` to a float tensor, i.e. ``interpolate(mode="bilinear", align_corners=False)``;
    with SeeSR's pinned torch 2.0.1 / torchvision 0.15 that runs *without* antialiasing on tensors (the
    default became ``antialias=True`` in torchvision 0.17), which is also how DAPE was trained
    (``basicsr/data/dape_dataset.py``), so ``antialias=False`` is the default here. The aspect ratio is not
    kept (RAM squashes to a square). Only downscaling is affected by ``antialias``.
    """
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"RAM expects RGB images [B, 3, H, W], got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"RAM expects float pixels in 0..1, got {image.dtype} (divide 8-bit images by 255)")
    x = image.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class RamModel(nn.Module):
    """The DAPE-equipped RAM (with the DAPE LoRA merged into its weights, or plain RAM without it)."""

    kind = "ram"

    def __init__(
        self,
        config: RamConfig,
        tag_names: Sequence[str],
        thresholds: Sequence[float] | torch.Tensor,
        delete_tag_index: Sequence[int] = (),
    ) -> None:
        super().__init__()
        c = config
        if len(tag_names) != c.num_classes:
            raise ValueError(f"RAM: {len(tag_names)} tag names for {c.num_classes} classes")
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten()
        if thresholds.numel() != c.num_classes:
            raise ValueError(f"RAM: {thresholds.numel()} thresholds for {c.num_classes} classes")
        self.config = c
        self.tag_names = list(tag_names)
        self.delete_tag_index = sorted({int(i) for i in delete_tag_index})
        self.visual_encoder = SwinTransformer(
            c.image_size, c.patch_size, c.embed_dim, c.depths, c.num_heads, c.window_size, c.mlp_ratio
        )
        self.image_proj = nn.Linear(c.vision_width, c.token_dim)
        self.label_embed = nn.Parameter(torch.zeros(c.num_classes, c.token_dim))
        self.wordvec_proj = (
            nn.Identity() if c.head_hidden_size == c.token_dim else nn.Linear(c.token_dim, c.head_hidden_size)
        )
        self.tagging_head = TaggingHead(c)
        self.fc = nn.Linear(c.head_hidden_size, 1)
        self.register_buffer("class_threshold", thresholds.clone(), persistent=False)
        if c.token_dim != RAM_TOKEN_DIM:
            log.warning("RAM: token width %d differs from SeeSR's image-attention width %d", c.token_dim, RAM_TOKEN_DIM)

    # --- construction helpers -------------------------------------------------------------------------
    def reset_derived_buffers(self, thresholds: torch.Tensor) -> None:
        """Recompute the buffers that are not in a checkpoint (after ``to_empty``)."""
        for m in self.modules():
            if m is not self and hasattr(m, "reset_derived_buffers"):
                m.reset_derived_buffers()
        self.class_threshold = thresholds.to(self.class_threshold.device, torch.float32)

    def init_random(self, generator: torch.Generator | None = None) -> RamModel:
        """Seeded random weights at useful scales (tests, benchmarks); LayerNorms near identity."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("relative_position_bias_table"):
                    p.copy_(0.5 * torch.randn(p.shape, generator=generator))
                elif p.ndim >= 2 and name != "label_embed":
                    fan_in = math.prod(p.shape[1:])
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
                elif name == "label_embed":
                    p.copy_(torch.randn(p.shape, generator=generator))
                elif "norm" in name.lower() and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        return self

    # --- inference ------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.image_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_proj.weight.dtype

    def tokens_from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised ``image_size`` pixels [B, 3, S, S] -> representation tokens [B, N, 512]."""
        return self.image_proj(self.visual_encoder(pixels.to(self.device, self.dtype)))

    def logits_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Representation tokens [B, N, 512] -> per-class tag logits [B, num_classes] (float32)."""
        labels = F.relu(self.wordvec_proj(self.label_embed))
        labels = labels.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.fc(self.tagging_head(labels, tokens)).squeeze(-1).float()

    def decide(self, logits: torch.Tensor) -> list[list[str]]:
        """RAM's decision: ``sigmoid(logit) > threshold`` per class, then ``delete_tag_index``, in tag-list order."""
        chosen = torch.sigmoid(logits.float()) > self.class_threshold.to(logits.device)
        if self.delete_tag_index:
            chosen[:, self.delete_tag_index] = False
        return [[self.tag_names[i] for i in row.nonzero().flatten().tolist()] for row in chosen.cpu()]

    def tokens(self, image: torch.Tensor, antialias: bool = False) -> torch.Tensor:
        """RGB [B, 3, H, W] in 0..1 -> representation tokens [B, N, 512] (SeeSR's ``generate_image_embeds``)."""
        return self.tokens_from_pixels(preprocess(image, self.config.image_size, antialias))

    def forward(self, image: torch.Tensor, antialias: bool = False, with_tags: bool = True) -> RamOutput:
        """RGB [B, 3, H, W] in 0..1 (any size; resized to RAM's square input) -> tags and tokens."""
        tokens = self.tokens(image, antialias)
        if not with_tags:
            b = tokens.shape[0]
            return RamOutput(tags=[[] for _ in range(b)], tag_text=["" for _ in range(b)], tokens=tokens)
        logits = self.logits_from_tokens(tokens)
        tags = self.decide(logits)
        return RamOutput(tags=tags, tag_text=[", ".join(t) for t in tags], tokens=tokens, logits=logits)
