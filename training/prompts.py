"""The text of a MegaSR training step: sidecar captions and the frozen prompt encoder.

Per image: the tags in ``<image>.txt`` beside it (when ``megasr.captions``), else the tags of the HR crop by
the teacher tagger (:mod:`training.tagging`), else ``megasr.prompt``; encoded by the frozen SD-2 tokenizer and
text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["PromptEncoder", "captions_for"]


class PromptEncoder:
    """Frozen tokenizer + text encoder; each distinct prompt is encoded once."""

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, device: torch.device) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        limit = int(getattr(text_encoder.config, "max_position_embeddings", 77))
        self.max_length = min(int(getattr(tokenizer, "model_max_length", limit) or limit), limit)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        todo = sorted({p for p in prompts if p not in self._cache})
        if todo:
            ids = self.tokenizer(
                todo, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0].float()
            for p, h in zip(todo, hidden, strict=True):
                self._cache[p] = h
        return torch.stack([self._cache[p] for p in prompts])


def captions_for(paths: Sequence[str], prompt: str | None, use_captions: bool) -> list[str | None]:
    """Per image: the tags in ``<image>.txt`` beside it (when present and ``use_captions``), else ``prompt``."""
    out = []
    for p in paths:
        text = prompt
        if use_captions:
            side = Path(p).with_suffix(".txt")
            if side.is_file():
                text = " ".join(side.read_text(encoding="utf-8", errors="replace").split())
        out.append(text)
    return out
