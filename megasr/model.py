"""The MegaSR model: ControlNet + CISM² + MS-GAM, everything the ``controlnet`` weight file holds.

The frozen SD-2 U-Net is not part of it; adapters attach ``unet_ext`` to a diffusers or ComfyUI U-Net.
The ControlNet is diffusers' ``ControlNetModel`` (SD encoder copy, LR condition encoder, zero convs)
with CISM² and MS-GAM attached to its own transformer blocks through the diffusers adapter.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .adapter_diffusers import DiffusersMegaSRAdapter
from .blocks import unet_blocks
from .cism import Connector
from .extension import GuidanceContext, MegaSRBlockExtension
from .images import resize_bchw
from .layers import retype_layers
from .msgam import FusionStage
from .seesr_branch import RepresentationBranch, branch_specs, install_into

# The diffusers UNet config keys that also configure its ControlNet.
CONTROLNET_KEYS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "resnet_time_scale_shift",
    "mid_block_type",
)
UNET_KEYS = CONTROLNET_KEYS + ("up_block_types",)

# Stable Diffusion 2 base (512 px, epsilon): the U-Net the paper builds on.
SD2_BASE_UNET = {
    "in_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "transformer_layers_per_block": 1,
    "attention_head_dim": [5, 10, 20, 20],
    "num_attention_heads": None,
    "use_linear_projection": True,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
}


@dataclass
class MegaSRConfig:
    """Configuration of a MegaSR model; stored as ``megasr.config`` in its weight file."""

    unet: dict = field(default_factory=lambda: dict(SD2_BASE_UNET))
    clip_dim: int = 1280  # CLIP ViT-H/14 hidden width (penultimate hidden states)
    connector: str = "linear"  # "linear" or "mlp"
    connector_hidden: int = 1024
    msgam_hidden: int = 64  # hidden channels of the SAFT gamma/beta conv net
    groups: int = 32  # GroupNorm groups in SAFT
    se_reduction: int = 1  # channel-attention reduction over the 4 fused channels
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    prediction: str = "epsilon"
    # SeeSR's representation branch (RAM tokens of this width; 0 = none, 512 = SeeSR): ``image_attentions`` in the
    # ControlNet and the U-Net branch ``unet_representation``, under SeeSR's key names (megasr/seesr_branch.py)
    representation_dim: int = 0

    def __post_init__(self) -> None:
        self.unet = {k: self.unet[k] for k in UNET_KEYS if k in self.unet}
        self.conditioning_embedding_out_channels = tuple(self.conditioning_embedding_out_channels)

    @property
    def context_dim(self) -> int:
        return int(self.unet["cross_attention_dim"])

    def base(self) -> dict:
        """What a base U-Net must match for this model to apply to it."""
        return {
            "family": "sd2" if self.context_dim == 1024 else f"context{self.context_dim}",
            "prediction": self.prediction,
            "context_dim": self.context_dim,
            "block_out_channels": list(self.unet["block_out_channels"]),
            "layers_per_block": int(self.unet["layers_per_block"]),
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["conditioning_embedding_out_channels"] = list(self.conditioning_embedding_out_channels)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> MegaSRConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _ext_dict(blocks, cfg: MegaSRConfig, operations=None) -> nn.ModuleDict:
    return nn.ModuleDict(
        {b.key: MegaSRBlockExtension(b.dim, b.level, cfg.msgam_hidden, cfg.groups, operations) for b in blocks}
    )


class MegaSRModel(nn.Module):
    """ControlNet + connector + stage-1 fusion + per-block extensions of the U-Net and the ControlNet.

    ``operations`` (see :mod:`megasr.layers`): the layer classes; ComfyUI's ``comfy.ops.manual_cast`` in the nodes.
    """

    def __init__(self, config: MegaSRConfig, operations=None) -> None:
        super().__init__()
        from diffusers import ControlNetModel

        self.config = config
        cn_kwargs = {k: config.unet[k] for k in CONTROLNET_KEYS if k in config.unet}
        self.controlnet = ControlNetModel(
            conditioning_channels=3,
            conditioning_embedding_out_channels=config.conditioning_embedding_out_channels,
            **cn_kwargs,
        )
        self.representation_specs = []
        if config.representation_dim:
            # before retyping: the branch is built from torch layers like the rest of the ControlNet
            self.representation_specs = branch_specs(config.unet, include_up=False)
            install_into(self.controlnet, config.unet, self.representation_specs, config.representation_dim)
        retype_layers(self.controlnet, operations)
        self.unet_representation = (
            RepresentationBranch(config.unet, config.representation_dim, operations)
            if config.representation_dim
            else None
        )
        self.connector = Connector(
            config.clip_dim, config.context_dim, config.connector, config.connector_hidden, operations
        )
        self.fusion = FusionStage(config.se_reduction, operations)
        self.unet_blocks = unet_blocks(config.unet, include_up=True)
        self.controlnet_blocks = unet_blocks(config.unet, include_up=False)
        self.unet_ext = _ext_dict(self.unet_blocks, config, operations)
        self.cn_ext = _ext_dict(self.controlnet_blocks, config, operations)
        self._cn_adapter = DiffusersMegaSRAdapter(
            self.controlnet,
            self.cn_ext,
            self.controlnet_blocks,
            image_attention_from_context=True,
            representation=(self.controlnet, self.representation_specs) if config.representation_dim else None,
        )

    def prepare_context(
        self,
        latent_hw: tuple[int, int],
        clip_tokens: torch.Tensor | None = None,
        hed: torch.Tensor | None = None,
        depth: torch.Tensor | None = None,
        seg: torch.Tensor | None = None,
        *,
        cism_strength: float = 1.0,
        level_strengths: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        msgam_strength: float = 1.0,
        hed_strength: float = 1.0,
        depth_strength: float = 1.0,
        seg_strength: float = 1.0,
        image_keep: torch.Tensor | None = None,
        image_attention=None,
        step_invariant: bool = False,
        dtype: torch.dtype | None = None,
        representation_tokens: torch.Tensor | None = None,
    ) -> GuidanceContext:
        """Run the connector and MS-GAM stage 1 once per forward.

        Maps are [B, C, H, W] in 0..1 (HED 1 ch, depth 1 ch, segmentation 3 ch), any size; None = absent,
        i.e. the null (zero) map that training's modality dropout feeds. Strengths interpolate each map's
        contribution between absent (0) and trained (1) -- see :func:`map_terms`; ``msgam_strength`` does the
        same for all three maps at once (0 = every map absent). ``image_keep`` [B]: training's per-sample
        dropout of the image semantics. ``image_attention``: see :class:`GuidanceContext`.
        ``step_invariant``: the caller re-uses the context for every sampling step (inference), so
        map-only values (resized maps, SAFT modulations) are computed once.
        ``dtype``: the compute dtype (default: the weights' dtype). It may differ from the storage dtype when the
        model is built with casting layers (``comfy.ops``): inputs are cast to it once, here.
        ``representation_tokens``: RAM/DAPE tokens [B, N, representation_dim] for SeeSR's branch (required when the
        model has one, see :mod:`megasr.seesr_branch`).
        """
        if dtype is None:
            dtype = self.fusion.conv.weight.dtype
        width = self.config.representation_dim
        if (
            representation_tokens is not None
            and width
            and (representation_tokens.ndim != 3 or representation_tokens.shape[-1] != width)
        ):
            raise ValueError(
                f"RAM representation tokens must be [batch, tokens, {width}], got {list(representation_tokens.shape)}"
            )
        tokens = None
        if clip_tokens is not None:
            tokens = self.connector(clip_tokens.to(dtype))
        hed_terms, corner_weights = map_terms(
            hed is not None,
            depth is not None,
            seg is not None,
            msgam_strength,
            hed_strength,
            depth_strength,
            seg_strength,
        )
        fused_terms = tuple(
            (w, self._fused(depth if d else None, seg if s else None, dtype)) for (d, s), w in corner_weights
        )
        return GuidanceContext(
            latent_hw=tuple(latent_hw),
            image_tokens=tokens,
            image_keep=image_keep,
            hed_terms=tuple((w, hed if on else None) for on, w in hed_terms),
            fused_terms=fused_terms,
            cism_strength=cism_strength,
            level_strengths=tuple(level_strengths),
            image_attention=image_attention,
            step_invariant=step_invariant,
            representation_tokens=None if representation_tokens is None else representation_tokens.to(dtype),
        )

    def _fused(self, depth: torch.Tensor | None, seg: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Stage 1 (Eq. 8) F^r of depth and seg, a missing one as its null (zero) map; both null -> None
        (F^r = F^c * M^c is exactly 0 then)."""
        if depth is None and seg is None:
            return None
        ref = depth if depth is not None else seg
        b, _, h, w = ref.shape
        d = depth.to(dtype) if depth is not None else torch.zeros(b, 1, h, w, device=ref.device, dtype=dtype)
        if seg is not None:
            # resized before the cast: a half-precision resize is not implemented on every device
            s = resize_bchw(seg.float(), tuple(d.shape[-2:]), "nearest").to(dtype)
        else:
            s = torch.zeros(b, 3, h, w, device=ref.device, dtype=dtype)
        return self.fusion(d, s)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Gradient checkpointing of the ControlNet's blocks (resnets and transformer blocks, diffusers' own
        switch) while this model is in training mode: their activations are recomputed during backward instead
        of kept. Same gradients, less memory, about one more ControlNet forward per step."""
        if enabled:
            func = self._cn_adapter.checkpoint_function(lambda: self.training)
            self.controlnet.enable_gradient_checkpointing(gradient_checkpointing_func=func)
        else:
            self.controlnet.disable_gradient_checkpointing()

    def guidance(self, ctx: GuidanceContext | None):
        """Keep ``ctx`` active on the ControlNet's blocks for the whole block, e.g. around forward *and*
        backward when gradient checkpointing re-runs blocks during backward (``controlnet_residuals``
        restores this outer context when it returns)."""
        return self._cn_adapter.guidance(ctx)

    def controlnet_residuals(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_context: torch.Tensor,
        hint: torch.Tensor,
        ctx: GuidanceContext,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ControlNet residuals (input-block order, then middle) for the U-Net.

        ``sample``: the (scaled) noisy latent; ``hint``: the LR image upscaled to output size, [B,3,H,W] in 0..1.
        """
        with self._cn_adapter.guidance(ctx):
            down, mid = self.controlnet(
                sample,
                timestep,
                encoder_hidden_states=text_context,
                controlnet_cond=hint,
                return_dict=False,
            )
        return list(down), mid


def map_terms(
    has_hed: bool,
    has_depth: bool,
    has_seg: bool,
    msgam_strength: float = 1.0,
    hed_strength: float = 1.0,
    depth_strength: float = 1.0,
    seg_strength: float = 1.0,
) -> tuple[tuple[tuple[bool, float], ...], tuple[tuple[tuple[bool, bool], float], ...]]:
    """Weights of the trained states that the strengths interpolate between (zero weights left out).

    HED branch: ((False, 1 - w), (True, w)) with w = msgam * hed (False = the null map). Fused branch: the four
    corners (depth on?, seg on?) of a bilinear interpolation in (depth, seg) strength, scaled towards the
    all-null corner by ``msgam_strength``; weights sum to 1, an absent map counts as strength 0. At strength 1
    everything is one term of weight 1 (the trained forward); at 0 it is exactly the absent map's terms.
    """
    g = float(msgam_strength)
    wh = g * float(hed_strength) if has_hed else 0.0
    hed = ((False, 1.0 - wh), (True, wh))
    d = float(depth_strength) if has_depth else 0.0
    s = float(seg_strength) if has_seg else 0.0
    w11, w10, w01 = g * d * s, g * d * (1.0 - s), g * (1.0 - d) * s
    fused = (((True, True), w11), ((True, False), w10), ((False, True), w01), ((False, False), 1.0 - w11 - w10 - w01))
    return tuple(t for t in hed if t[1] != 0.0), tuple(t for t in fused if t[1] != 0.0)


def megasr_noise_prediction(
    unet: nn.Module,
    adapter: DiffusersMegaSRAdapter,
    model: MegaSRModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    text_context: torch.Tensor,
    hint: torch.Tensor,
    ctx: GuidanceContext,
) -> torch.Tensor:
    """The full MegaSR epsilon prediction with a diffusers U-Net (training and reference inference).

    The ControlNet's image path uses the U-Net's frozen cross-attention: ``ctx.image_attention`` is set to
    ``adapter.image_attention`` when the caller left it unset.
    """
    if ctx.image_attention is None:
        ctx.image_attention = adapter.image_attention
    down, mid = model.controlnet_residuals(sample, timestep, text_context, hint, ctx)
    with adapter.guidance(ctx):
        return unet(
            sample,
            timestep,
            encoder_hidden_states=text_context,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
