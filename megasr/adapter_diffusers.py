"""Attach MegaSR block extensions to a diffusers ``UNet2DConditionModel`` or ``ControlNetModel``.

A forward hook on each transformer block's ``attn2`` adds the extension's delta to the text
cross-attention output. The U-Net's image path calls the same (frozen) ``attn2`` (its ``forward``, so the
hook does not re-enter). The ControlNet's ``attn2`` is trained with the ControlNet, so its image path
instead calls the frozen U-Net's ``attn2`` of the same block (``GuidanceContext.image_attention``, which
:attr:`DiffusersMegaSRAdapter.image_attention` of the U-Net adapter provides): the paper's "frozen CA
initialised from the text branch" in both networks. Weights and state-dict keys of the model are
untouched; ``remove()`` detaches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.utils.checkpoint
from torch import nn

from .blocks import BlockSpec
from .extension import GuidanceContext
from .seesr_branch import attach_diffusers_hooks


class DiffusersMegaSRAdapter:
    """Hooks ``extensions[key]`` into ``model.<spec.diffusers_path>.attn2`` for every block spec."""

    def __init__(
        self,
        model: nn.Module,
        extensions: nn.ModuleDict,
        blocks: Sequence[BlockSpec],
        image_attention_from_context: bool = False,
        representation: tuple[nn.Module, Sequence] | None = None,
    ) -> None:
        """``image_attention_from_context``: the image path uses ``ctx.image_attention[key]`` (the ControlNet)
        instead of the block's own ``attn2`` (the frozen U-Net). ``representation``: (root, specs) of SeeSR's
        branch (:mod:`megasr.seesr_branch`), run after each text transformer while a context is active."""
        self._ctx: GuidanceContext | None = None
        self._handles = []
        self._from_context = image_attention_from_context
        self.image_attention: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}
        modules = dict(model.named_modules())
        for spec in blocks:
            block = modules.get(spec.diffusers_path)
            if block is None or getattr(block, "attn2", None) is None:
                raise ValueError(f"the model has no cross-attention block at '{spec.diffusers_path}'")
            self.image_attention[spec.key] = _own_attention(block.attn2)
            self._handles.append(
                block.attn2.register_forward_hook(self._make_hook(extensions, spec.key), with_kwargs=True)
            )
        if representation is not None:
            root, specs = representation
            self._handles += attach_diffusers_hooks(model, root, specs, lambda: self._ctx)

    def _image_attention(self, ctx: GuidanceContext, key: str, own):
        if not self._from_context:
            return own
        found = (ctx.image_attention or {}).get(key)
        if found is not None:
            return found

        def missing(q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            raise ValueError(
                f"MegaSR: the ControlNet's image path at '{key}' needs the U-Net's frozen cross-attention "
                "(GuidanceContext.image_attention); none was given"
            )

        return missing

    def _make_hook(self, extensions: nn.ModuleDict, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            ctx = self._ctx
            if ctx is None:
                return output
            n = args[0] if args else kwargs["hidden_states"]
            cross_attention = self._image_attention(ctx, key, self.image_attention[key])
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

    def checkpoint_function(self, enabled: Callable[[], bool]) -> Callable:
        """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing`` on the model this
        adapter hooks: each block (resnet, transformer block) runs under ``torch.utils.checkpoint`` (non-reentrant)
        while ``enabled()`` (the trained module's ``training`` flag), and plainly otherwise.

        The block is re-run during backward, after :meth:`guidance` has returned, so the re-run enters the
        context the block first ran with -- with the context's per-forward cache as it was then, so the re-run
        makes the same tensors in the same order (checkpointing requires it).
        """

        def run(module: Callable, *args: object) -> object:
            if not enabled():
                return module(*args)
            ctx = self._ctx
            cache = None if ctx is None else dict(ctx._cache)
            calls = [0]

            def block(*inner: object) -> object:
                first = calls[0] == 0
                calls[0] += 1
                again = ctx if first or ctx is None else dataclasses.replace(ctx, _cache=dict(cache))
                with self.guidance(again):
                    return module(*inner)

            # looked up at call time: the memory plan (training/memory_plan.py) substitutes its own counter
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)

        return run

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _own_attention(attn2: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def cross_attention(q: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return attn2.forward(q, encoder_hidden_states=context)  # forward: our hook does not re-enter

    return cross_attention


def attach_megasr_to_diffusers_unet(unet: nn.Module, megasr_model: nn.Module) -> DiffusersMegaSRAdapter:
    """Attach ``megasr_model.unet_ext`` (and SeeSR's branch, when the model has one) to a diffusers SD U-Net
    (training, reference inference)."""
    branch = getattr(megasr_model, "unet_representation", None)
    return DiffusersMegaSRAdapter(
        unet,
        megasr_model.unet_ext,
        megasr_model.unet_blocks,
        representation=None if branch is None else (branch, branch.specs),
    )
