"""RAM's module configuration: the Swin image encoder, the token projection and the tagging head.

Full-size values are those of ``ram_swin_large_14m.pth`` as RAM's and SeeSR's code builds it
(xinyu1205/recognize-anything @ 7cb804a8, ``ram/configs/swin/config_swinL_384.json`` and
``ram/configs/q2l_config.json``; cswry/SeeSR @ 8edecc71, the same files): Swin-L at 384 px, patch 4,
embed 192, depths (2, 2, 18, 2), heads (6, 12, 24, 48), window 12, MLP ratio 4; ``image_proj``
1536 -> 512; tagging head = 2 BERT layers of hidden 768, 4 heads, FFN 3072, LayerNorm eps 1e-12, whose
self-attention RAM deletes (Query2Label style: only cross-attention from the label queries to the image
tokens); 4585 classes. The DAPE LoRA is loralib's default ``lora_alpha`` = 1 at rank 8 (scale 1/8).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RamConfig:
    image_size: int = 384
    patch_size: int = 4
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    #: width of the representation tokens and of the label embeddings (RAM hard-codes 512)
    token_dim: int = 512
    head_hidden_size: int = 768
    head_num_heads: int = 4
    head_num_layers: int = 2
    head_intermediate_size: int = 3072
    head_layer_norm_eps: float = 1e-12
    num_classes: int = 4585
    #: loralib's ``lora_alpha`` for the DAPE LoRA (default 1 in loralib; SeeSR passes none)
    lora_alpha: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if len(self.depths) != len(self.num_heads):
            raise ValueError(f"RAM config: {len(self.depths)} Swin stages but {len(self.num_heads)} head counts")
        if self.image_size % (self.patch_size * 2 ** (len(self.depths) - 1)):
            raise ValueError(
                f"RAM config: image size {self.image_size} is not divisible by patch {self.patch_size} x "
                f"2^{len(self.depths) - 1} stage merges"
            )
        if self.head_hidden_size % self.head_num_heads:
            raise ValueError(
                f"RAM config: tagging-head width {self.head_hidden_size} not divisible by {self.head_num_heads} heads"
            )

    @property
    def vision_width(self) -> int:
        """Channels of the last Swin stage (1536 for Swin-L)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def num_tokens(self) -> int:
        """Representation tokens per image: the mean-pooled token plus the last stage's grid (145 at 384 px)."""
        side = self.image_size // (self.patch_size * 2 ** (len(self.depths) - 1))
        return 1 + side * side

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("extra")
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RamConfig:
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in d.items() if k in known})


SWIN_L_384 = RamConfig()


def infer_config(state: Mapping[str, torch.Tensor], base: RamConfig = SWIN_L_384) -> RamConfig:
    """The config a RAM state dict (our key names, derived buffers removed) was made with.

    Widths, depths, Swin head counts, window, MLP ratio, classes and the tagging head's width and layer
    count come from the tensor shapes; what shapes cannot say (the input size and the tagging head's
    attention-head count) comes from ``base``.
    """
    try:
        proj = state["visual_encoder.patch_embed.proj.weight"]
        embed_dim, patch = int(proj.shape[0]), int(proj.shape[-1])
        depths, heads = [], []
        i = 0
        while f"visual_encoder.layers.{i}.blocks.0.norm1.weight" in state:
            n = 0
            while f"visual_encoder.layers.{i}.blocks.{n}.norm1.weight" in state:
                n += 1
            depths.append(n)
            heads.append(int(state[f"visual_encoder.layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1]))
            i += 1
        table = int(state["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        window = (round(table**0.5) + 1) // 2
        fc1 = state["visual_encoder.layers.0.blocks.0.mlp.fc1.weight"]
        mlp_ratio = fc1.shape[0] / fc1.shape[1]
        label = state["label_embed"]
        layers = 0
        while f"tagging_head.encoder.layer.{layers}.crossattention.self.query.weight" in state:
            layers += 1
        hidden = int(state["tagging_head.encoder.layer.0.crossattention.self.query.weight"].shape[0])
        inter = int(state["tagging_head.encoder.layer.0.intermediate.dense.weight"].shape[0])
    except KeyError as e:
        raise KeyError(f"not a RAM state dict: no '{e.args[0]}'") from None
    d = asdict(base)
    d.pop("extra")
    d.update(
        embed_dim=embed_dim,
        patch_size=patch,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=window,
        mlp_ratio=float(mlp_ratio),
        token_dim=int(label.shape[1]),
        num_classes=int(label.shape[0]),
        head_num_layers=layers,
        head_hidden_size=hidden,
        head_intermediate_size=inter,
    )
    return RamConfig(**d)
