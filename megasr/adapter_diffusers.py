"""Attach MegaSR block extensions to a diffusers ``UNet2DConditionModel`` or ``ControlNetModel``.

A forward hook on each transformer block's ``attn2`` adds the extension's delta to the text
cross-attention output; the image path calls the same ``attn2`` (its ``forward``, so the hook does not
re-enter). Weights and state-dict keys of the model are untouched; ``remove()`` detaches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .blocks import BlockSpec
from .extension import GuidanceContext


class DiffusersMegaSRAdapter:
    """Hooks ``extensions[key]`` into ``model.<spec.diffusers_path>.attn2`` for every block spec."""

    def __init__(self, model: nn.Module, extensions: nn.ModuleDict, blocks: Sequence[BlockSpec]) -> None:
        self._ctx: GuidanceContext | None = None
        self._handles = []
        modules = dict(model.named_modules())
        for spec in blocks:
            block = modules.get(spec.diffusers_path)
            if block is None or getattr(block, "attn2", None) is None:
                raise ValueError(f"the model has no cross-attention block at '{spec.diffusers_path}'")
            self._handles.append(
                block.attn2.register_forward_hook(self._make_hook(extensions, spec.key), with_kwargs=True)
            )

    def _make_hook(self, extensions: nn.ModuleDict, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            ctx = self._ctx
            if ctx is None:
                return output
            n = args[0] if args else kwargs["hidden_states"]

            def cross_attention(q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
                return module.forward(q, encoder_hidden_states=context)

            delta = extensions[key](n, ctx, cross_attention)
            return output if delta is None else output + delta

        return hook

    @contextmanager
    def guidance(self, ctx: GuidanceContext | None) -> Iterator[None]:
        """Within the block, forwards of the model use ``ctx`` (None = the plain model)."""
        previous, self._ctx = self._ctx, ctx
        try:
            yield
        finally:
            self._ctx = previous

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def attach_megasr_to_diffusers_unet(unet: nn.Module, megasr_model: nn.Module) -> DiffusersMegaSRAdapter:
    """Attach ``megasr_model.unet_ext`` to a diffusers SD U-Net (training, reference inference)."""
    return DiffusersMegaSRAdapter(unet, megasr_model.unet_ext, megasr_model.unet_blocks)
