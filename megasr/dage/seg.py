"""DAGE segmentation extractor: Mask2Former (ADE20K, 150 classes) via ``transformers``, fully
fine-tuned, behind a small pluggable :class:`Segmentor` protocol.

Semantic post-processing (written here): per-pixel class scores
``S[b,k,y,x] = sum_q softmax(class_logits[b,q])[k] * sigmoid(mask_logits[b,q,y,x])`` with the
no-object class dropped, then argmax over k. MaskDINO (the paper's choice) is not in transformers;
another segmentor can be registered with :func:`register_segmentor`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from ..errors import WeightFileError
from ..weights import check_state_dict, load_weight_file, save_weight_file
from .common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DageOutput,
    check_input,
    load_hf_pretrained,
    normalize,
    resize_bchw,
    upsample_labels,
    working_size,
)
from .encodings import NUM_ADE20K_CLASSES
from .kinds import BY_KIND

log = logging.getLogger("megasr")

COMPONENT = BY_KIND["seg"].component
SEG_DEFAULT_RESOLUTION = 512

# transformers 4.x Swin names -> 5.x (order matters: attention.output.dense before output.dense).
SWIN_LEGACY_RENAMES: tuple[tuple[str, str], ...] = (
    ("attention.self.query", "attention.q_proj"),
    ("attention.self.key", "attention.k_proj"),
    ("attention.self.value", "attention.v_proj"),
    ("attention.self.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.self.relative_position_index", "attention.relative_position_bias.relative_position_index"),
    ("attention.output.dense", "attention.o_proj"),
    ("intermediate.dense", "mlp.fc1"),
    (".output.dense", ".mlp.fc2"),
)

# facebook/mask2former-swin-tiny-ade-semantic layout (Mask2FormerConfig dict).
MASK2FORMER_SWIN_TINY_ADE_CONFIG: dict[str, Any] = {
    "backbone_config": {
        "model_type": "swin",
        "embed_dim": 96,
        "depths": [2, 2, 6, 2],
        "num_heads": [3, 6, 12, 24],
        "window_size": 7,
        "image_size": 224,
        "drop_path_rate": 0.3,
        "out_features": ["stage1", "stage2", "stage3", "stage4"],
    },
    "num_labels": NUM_ADE20K_CLASSES,
    "num_queries": 100,
    "feature_size": 256,
    "mask_feature_size": 256,
    "hidden_dim": 256,
    "encoder_feedforward_dim": 1024,
    "dim_feedforward": 2048,
    "encoder_layers": 6,
    "decoder_layers": 10,
    "num_attention_heads": 8,
    "common_stride": 4,
}


@runtime_checkable
class Segmentor(Protocol):
    """What the segmentation extractor needs from a segmentor (an ``nn.Module``).

    ``segment(pixels, out_size)``: ``pixels`` [B, 3, h, w] RGB in 0..1 at the working size (a
    multiple of ``size_multiple``); returns (class scores [B, num_classes, *out_size] — larger =
    more likely —, intermediate features for the DAGE loss). The extractor asks for ``out_size`` =
    the working size: class scores never exist at the (unbounded) input size.
    """

    num_classes: int
    size_multiple: int

    def segment(self, pixels: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]: ...

    def segmentor_config(self) -> dict[str, Any]: ...


SEGMENTORS: dict[str, Callable[[dict[str, Any]], torch.nn.Module]] = {}


def register_segmentor(name: str, factory: Callable[[dict[str, Any]], torch.nn.Module]) -> None:
    """Register ``factory(config) -> Segmentor module`` under ``name`` (the file config's "segmentor")."""
    SEGMENTORS[name] = factory


def semantic_scores(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    out_size: tuple[int, int] | None = None,
    query_chunk: int | None = None,
) -> torch.Tensor:
    """Mask2Former semantic combination: [B,Q,K+1] class logits and [B,Q,h,w] mask logits ->
    [B,K,H,W] per-pixel class scores (no-object class dropped). ``out_size`` upsamples the mask
    logits (bilinear) before the sigmoid. ``query_chunk`` accumulates over groups of queries so
    that the upsampled [B,Q,H,W] masks never exist at once (inference on large images)."""
    classes = class_logits.float().softmax(dim=-1)[..., :-1]
    q = mask_logits.shape[1]
    step = q if not query_chunk or query_chunk >= q else int(query_chunk)
    scores = None
    for s in range(0, q, step):
        m = mask_logits[:, s : s + step].float()
        if out_size is not None and tuple(m.shape[-2:]) != tuple(out_size):
            m = F.interpolate(m, size=out_size, mode="bilinear", align_corners=False)
        part = torch.einsum("bqk,bqhw->bkhw", classes[:, s : s + step], m.sigmoid())
        scores = part if scores is None else scores + part
    return scores


class Mask2FormerSegmentor(torch.nn.Module):
    """``transformers.Mask2FormerForUniversalSegmentation`` as a :class:`Segmentor`."""

    size_multiple = 32

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.num_classes = int(model.config.num_labels)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Mask2FormerSegmentor":
        from transformers import Mask2FormerForUniversalSegmentation

        return cls(Mask2FormerForUniversalSegmentation(build_mask2former_config(config)))

    def segmentor_config(self) -> dict[str, Any]:
        return mask2former_config_dict(self.model.config)

    def segment(self, pixels: torch.Tensor, out_size: tuple[int, int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dtype = next(self.model.parameters()).dtype
        x = normalize(pixels.float(), IMAGENET_MEAN, IMAGENET_STD).to(dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        chunk = None if torch.is_grad_enabled() else 16
        scores = semantic_scores(out.class_queries_logits, out.masks_queries_logits, out_size, chunk)
        feats = list(out.encoder_hidden_states or ()) + list(out.pixel_decoder_hidden_states or ())
        if out.pixel_decoder_last_hidden_state is not None:
            feats.append(out.pixel_decoder_last_hidden_state)
        return scores, feats


register_segmentor("mask2former", Mask2FormerSegmentor.from_config)


def build_mask2former_config(config: dict[str, Any]) -> Any:
    from transformers import Mask2FormerConfig, SwinConfig

    cfg = dict(config)
    bb = dict(cfg.pop("backbone_config", MASK2FORMER_SWIN_TINY_ADE_CONFIG["backbone_config"]))
    if bb.pop("model_type", "swin") != "swin":
        raise ValueError("only Swin backbones are supported for Mask2Former here")
    cfg.pop("model_type", None)
    return Mask2FormerConfig(backbone_config=SwinConfig(**bb), **cfg)


def mask2former_config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict()
    bb = config.backbone_config.to_dict()
    keep_bb = {
        k: bb[k]
        for k in (
            "model_type",
            "embed_dim",
            "depths",
            "num_heads",
            "window_size",
            "image_size",
            "drop_path_rate",
            "out_features",
            "patch_size",
            "mlp_ratio",
        )
        if k in bb
    }
    keys = (
        "num_labels",
        "num_queries",
        "feature_size",
        "mask_feature_size",
        "hidden_dim",
        "encoder_feedforward_dim",
        "dim_feedforward",
        "encoder_layers",
        "decoder_layers",
        "num_attention_heads",
        "common_stride",
        "feature_strides",
        "pre_norm",
        "enforce_input_projection",
    )
    out = {k: d[k] for k in keys if k in d}
    out["num_labels"] = int(config.num_labels)  # to_dict() stores id2label instead
    out["backbone_config"] = keep_bb
    return out


class SegExtractor(torch.nn.Module):
    """``forward(image [B,3,H,W] 0..1, resolution=None) -> DageOutput``: ``map`` the ADE20K label map
    [B, H, W] (long) at the input size, ``raw`` the class scores [B, 150, h, w] at the working size.

    Memory is bounded by ``resolution``: the argmax is taken at the working size and the label map
    is upsampled by nearest neighbour, so no [150, H, W] float exists at the input size."""

    kind = "seg"
    component = COMPONENT

    def __init__(
        self, segmentor: torch.nn.Module, name: str = "mask2former", resolution: int = SEG_DEFAULT_RESOLUTION
    ) -> None:
        super().__init__()
        if not isinstance(segmentor, Segmentor):
            raise TypeError(f"{type(segmentor).__name__} does not implement the Segmentor protocol")
        self.segmentor = segmentor
        self.segmentor_name = name
        self.resolution = int(resolution)

    @property
    def size_multiple(self) -> int:
        return int(self.segmentor.size_multiple)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "SegExtractor":
        """``config``: {"segmentor": name, name: its config, "resolution": int}; random weights."""
        name = config.get("segmentor", "mask2former")
        if name not in SEGMENTORS:
            raise ValueError(f"unknown segmentor '{name}' (registered: {', '.join(SEGMENTORS)})")
        seg_cfg = config.get(name, MASK2FORMER_SWIN_TINY_ADE_CONFIG if name == "mask2former" else {})
        return cls(SEGMENTORS[name](seg_cfg), name, config.get("resolution", SEG_DEFAULT_RESOLUTION))

    @classmethod
    def from_base(
        cls, base_path: str, mask2former: dict[str, Any] | None = None, resolution: int = SEG_DEFAULT_RESOLUTION
    ) -> "SegExtractor":
        """Start from a transformers Mask2Former ADE20K folder (or one safetensors file + config)."""
        from transformers import Mask2FormerForUniversalSegmentation

        cfg = build_mask2former_config(mask2former) if mask2former is not None else None
        model = load_hf_pretrained(
            Mask2FormerForUniversalSegmentation, base_path, cfg, SWIN_LEGACY_RENAMES, "pixel_level_module.encoder."
        )
        if int(model.config.num_labels) != NUM_ADE20K_CLASSES:
            raise WeightFileError(
                base_path,
                f"this Mask2Former has {model.config.num_labels} classes; an ADE20K (150-class) model is needed",
            )
        return cls(Mask2FormerSegmentor(model), "mask2former", resolution)

    def file_config(self) -> dict[str, Any]:
        return {
            "segmentor": self.segmentor_name,
            self.segmentor_name: self.segmentor.segmentor_config(),
            "resolution": self.resolution,
            "num_classes": int(self.segmentor.num_classes),
        }

    def forward(self, image: torch.Tensor, resolution: int | None = None) -> DageOutput:
        image = check_input(image, "segmentation extractor")
        h0, w0 = image.shape[-2:]
        res = self.resolution if resolution is None else int(resolution)
        size = working_size(h0, w0, res, self.size_multiple)
        x = resize_bchw(image.float(), size, "bilinear").clamp(0, 1)
        scores, feats = self.segmentor.segment(x, size)
        labels = upsample_labels(scores.argmax(dim=1), (h0, w0))
        return DageOutput(map=labels, raw=scores, features=feats)

    def save(self, path: str, provenance: dict | None = None, overwrite: bool = False) -> None:
        save_weight_file(path, self.segmentor.state_dict(), COMPONENT, self.file_config(), provenance, overwrite)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "SegExtractor":
        state, info = load_weight_file(path, COMPONENT, device=device)
        name = info.config.get("segmentor", "mask2former")
        if name not in SEGMENTORS:
            raise WeightFileError(
                info.path, f"it needs the segmentor '{name}', which is not registered (have: {', '.join(SEGMENTORS)})"
            )
        model = cls.from_config(info.config)
        check_state_dict(model.segmentor, state, info.path)
        model.segmentor.load_state_dict(state)
        return model.eval()


def seg_output_loss(student: DageOutput, teacher: DageOutput, eps: float = 1e-6) -> torch.Tensor:
    """Output term for segmentation (Eq. 5: L1 between the outputs): mean |p_s - p_t| of the per-pixel class
    distributions (the class scores normalised over the classes), at the working size where ``raw`` lives;
    the teacher detached. L1 on the whole distribution, not the NLL of the teacher's argmax: a pixel where the
    teacher hesitates between two classes asks the student to hesitate too."""
    p = student.raw.float()
    p = p / p.sum(dim=1, keepdim=True).clamp_min(eps)
    t = teacher.raw.detach().float()
    if t.shape[-2:] != p.shape[-2:]:
        t = F.interpolate(t, size=p.shape[-2:], mode="bilinear", align_corners=False)
    t = t / t.sum(dim=1, keepdim=True).clamp_min(eps)
    return F.l1_loss(p, t)
