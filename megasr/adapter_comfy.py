"""Attach MegaSR block extensions to a ComfyUI ``UNetModel`` through list-appended patches.

This module never imports ComfyUI: it is handed the ``ModelPatcher`` (for ``set_model_attn2_patch`` /
``set_model_attn2_output_patch``) and reads the diffusion model's modules by duck typing.

At run time each transformer block calls, in order, every ``attn2_patch`` (ours records the query
input ``n`` in the block's per-call ``extra_options``) and every ``attn2_output_patch`` (ours adds the
extension's delta). Other packs' patches on the same blocks run before/after ours unchanged.

The per-forward :class:`MegaSRRuntime` reaches the blocks through ``transformer_options`` under
``RUNTIME_KEY``; the MS-GAM control writes it in ``get_control`` (ComfyUI hands the same dict to the
model), so one value feeds both the ControlNet and the U-Net.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import comfy_block_key
from .extension import GuidanceContext
from .seesr_branch import apply_to_comfy_unet

RUNTIME_KEY = "megasr_runtime"  # set per model call by the MS-GAM control
SEMANTICS_KEY = "megasr_semantics"  # set once by the CISM² node (model_options transformer_options)
_QUERY_KEY = "megasr_attn2_query"


class MissingGuidanceError(RuntimeError):
    pass


@dataclass
class MegaSRRuntime:
    """What one model call needs: the guidance context and the U-Net's extension modules."""

    ctx: GuidanceContext | None
    unet_ext: nn.ModuleDict
    owner_id: int  # id of the MegaSR model that made it (checked against the patched U-Net)

    def __deepcopy__(self, memo: dict) -> MegaSRRuntime:
        return self  # holds modules and tensors for one call; never copied with model options


def find_cross_attentions(diffusion_model: nn.Module) -> dict[tuple[str, int, int], nn.Module]:
    """Map ComfyUI's (kind, block_id, transformer_index) to each transformer block's ``attn2``."""
    found: dict[tuple[str, int, int], nn.Module] = {}
    groups = [("input", getattr(diffusion_model, "input_blocks", [])), ("output", diffusion_model.output_blocks)]
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        groups.insert(1, ("middle", [middle]))
    for kind, blocks in groups:
        for block_id, block in enumerate(blocks):
            for layer in block:
                for t, tb in enumerate(getattr(layer, "transformer_blocks", [])):
                    if getattr(tb, "attn2", None) is not None:
                        found[(kind, block_id, t)] = tb.attn2
    return found


def _num_res_blocks(diffusion_model: nn.Module) -> int:
    nrb = diffusion_model.num_res_blocks
    nrb = list(nrb) if isinstance(nrb, (list, tuple)) else [nrb]
    if len(set(nrb)) != 1:
        raise ValueError(f"U-Nets with different res blocks per level are not supported: {nrb}")
    return int(nrb[0])


class ComfyMegaSRPatch:
    """The pair of attn2 patches; one instance is shared by both patch lists of one cloned MODEL."""

    def __init__(self, diffusion_model: nn.Module, owner_id: int, expected_keys: set[str]) -> None:
        self.owner_id = owner_id
        nrb = _num_res_blocks(diffusion_model)
        self.attn2 = {}
        for (kind, block_id, t), module in find_cross_attentions(diffusion_model).items():
            self.attn2[(kind, block_id, t)] = (comfy_block_key(kind, block_id, t, nrb), module)
        self._attention = {key: _comfy_attention(module) for key, module in self.attn2.values()}
        keys = {k for k, _ in self.attn2.values()}
        if keys != expected_keys:
            missing = sorted(expected_keys - keys)[:4]
            extra = sorted(keys - expected_keys)[:4]
            raise ValueError(
                "the MegaSR model was made for another U-Net layout "
                f"(blocks the model expects but the U-Net lacks: {missing}; blocks it does not know: {extra})"
            )

    def __deepcopy__(self, memo: dict) -> ComfyMegaSRPatch:
        return self  # holds references to the (shared) diffusion model's modules

    @property
    def image_attention(self) -> dict:
        """Block key -> this U-Net's frozen cross-attention, for the ControlNet's image path
        (``GuidanceContext.image_attention``)."""
        return {key: self._attention[key] for key, _ in self.attn2.values()}

    def attn2_patch(self, n, context, value, extra_options):
        if RUNTIME_KEY in extra_options:
            extra_options[_QUERY_KEY] = n
        return n, context, value

    def attn2_output_patch(self, out: torch.Tensor, extra_options: dict) -> torch.Tensor:
        runtime = self.runtime(extra_options)
        if runtime.ctx is None:
            return out
        block = extra_options.get("block")
        entry = self.attn2.get((block[0], block[1], extra_options.get("block_index", 0))) if block else None
        n = extra_options.get(_QUERY_KEY)
        if entry is None or n is None:
            return out
        key = entry[0]
        delta = runtime.unet_ext[key](n, runtime.ctx, self._attention[key])
        return out if delta is None else out + delta.to(out.dtype)

    def runtime(self, transformer_options: dict) -> MegaSRRuntime:
        """This call's :class:`MegaSRRuntime`, checked: set by the MS-GAM control, made by our MegaSR model."""
        runtime = transformer_options.get(RUNTIME_KEY)
        if runtime is None:
            raise MissingGuidanceError(
                "MegaSR: this MODEL was patched by 'MegaSR CISM² Semantic Injection', but the conditioning "
                "has no MegaSR guidance. Connect 'MegaSR MS-GAM Guidance Fusion' to positive and negative."
            )
        if runtime.owner_id != self.owner_id:
            raise MissingGuidanceError(
                "MegaSR: the CISM² node and the MS-GAM node use different MegaSR models; load one "
                "MegaSR model and connect it to both."
            )
        return runtime


class ComfyImageAttention:
    """A ComfyUI transformer block's frozen ``attn2`` for the CISM² image path, split in two halves.

    ``project(tokens)`` = (``to_k``, ``to_v``) of the image tokens (constant over a sampling run, so
    :func:`megasr.extension.image_attention` computes them once); ``attend(n, k, v)`` = ``to_out`` of the
    multi-head attention of ``to_q(n)`` over them, with torch's ``scaled_dot_product_attention`` (in float32
    when the block's ``attn_precision`` asks for it, as ComfyUI's attention functions do). Calling the object
    is ``attn2(n, context=tokens)`` itself. Read by duck typing (``to_q``/``to_k``/``to_v``/``to_out``/``heads``,
    the same in ComfyUI 0.3.75 and the newest).
    """

    def __init__(self, attn2: nn.Module) -> None:
        self.module = attn2
        self.key = id(attn2)

    def __call__(self, q: torch.Tensor, ctx_tokens: torch.Tensor) -> torch.Tensor:
        return self.module(q, context=ctx_tokens)

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module.to_k(tokens), self.module.to_v(tokens)

    def attend(self, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.module
        q = m.to_q(n)
        b, length, inner = q.shape
        heads = int(m.heads)
        d = inner // heads
        dtype = q.dtype
        if getattr(m, "attn_precision", None) == torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        q, k, v = (t.reshape(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return m.to_out(out.transpose(1, 2).reshape(b, length, inner).to(dtype))


def _comfy_attention(attn2: nn.Module):
    if all(hasattr(attn2, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads")):
        return ComfyImageAttention(attn2)

    def cross_attention(q: torch.Tensor, ctx_tokens: torch.Tensor) -> torch.Tensor:
        return attn2(q, context=ctx_tokens)

    return cross_attention


def apply_megasr_to_comfy_unet(model_patcher, megasr_model: nn.Module, owner_id: int | None = None) -> ComfyMegaSRPatch:
    """Install the MegaSR patches on a (cloned) ComfyUI ``ModelPatcher`` of an SD U-Net.

    ``model_patcher`` must already be a clone; ``megasr_model`` is the :class:`~megasr.model.MegaSRModel`;
    ``owner_id`` identifies it across copies on other devices (default ``id(megasr_model)``).
    """
    diffusion_model = model_patcher.get_model_object("diffusion_model")
    owner = id(megasr_model) if owner_id is None else owner_id
    patch = ComfyMegaSRPatch(diffusion_model, owner, set(megasr_model.unet_ext.keys()))
    model_patcher.set_model_attn2_patch(patch.attn2_patch)
    model_patcher.set_model_attn2_output_patch(patch.attn2_output_patch)
    branch = getattr(megasr_model, "unet_representation", None)
    if branch is not None:  # SeeSR's representation branch after every SpatialTransformer (object patches)
        apply_to_comfy_unet(model_patcher, branch, patch.runtime)
    return patch
