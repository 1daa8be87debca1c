"""EMA of the trained weights (``train.ema_decay``): an fp32 shadow updated after every optimiser step.

``shadow = d * shadow + (1 - d) * param``, the shadow starting as the weights before the first step. It lives
beside the optimiser (the same device), is saved in every training checkpoint (``"ema"``, restored exactly on
resume) and is what the megasr stage exports when on (the raw weights stay in the checkpoint).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["EmaShadow", "ema_weights"]


class EmaShadow:
    """The fp32 shadow of ``module``'s trainable parameters (by ``named_parameters`` name)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in module.named_parameters() if p.requires_grad
        }

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """After an optimiser step: ``shadow <- d * shadow + (1 - d) * param``."""
        params = dict(module.named_parameters())
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        current = [params[n].detach().to(torch.float32) for n in names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: Mapping[str, object], where: str) -> None:
        shadow = state["shadow"]
        assert isinstance(shadow, Mapping)
        missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"{where}: EMA tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
        for name, value in shadow.items():
            self.shadow[name].copy_(torch.as_tensor(value))
        # the decay stays the run's (train.ema_decay may change on resume); the shadow is restored exactly

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())


def ema_weights(module_state: Mapping[str, torch.Tensor], ema_state: Mapping[str, object] | None) -> dict:
    """A module state dict with its trained tensors replaced by their EMA (``ema_state`` None: unchanged)."""
    out = dict(module_state)
    if ema_state:
        shadow = ema_state["shadow"]
        assert isinstance(shadow, Mapping)
        for name, value in shadow.items():
            if name not in out:
                raise KeyError(f"the EMA holds '{name}', which the module has not")
            out[name] = torch.as_tensor(value).to(out[name].dtype)
    return out
