"""DAPE-equipped RAM: tags and representation tokens of an LR image (SeeSR's semantic prompt extractor).

RAM (Recognize Anything, Swin-L 384 px) with SeeSR's DAPE LoRA reads an image and gives

- ``tags``: the recognised tag names per image (RAM's 4585-name list, per-class thresholds), used as the
  text prompt;
- ``tokens``: the representation embeddings ``image_proj(visual_encoder(x))`` ([B, 145, 512] at 384 px:
  one mean-pooled token followed by the 12 x 12 last-stage Swin tokens), read by SeeSR's ``image_attentions``
  (``cross_attention_dim`` 512) in the U-Net and the ControlNet.

Our own pure-torch code; see docs/RAM.md for the sources of every layout fact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: width of the representation tokens (RAM's ``image_proj`` output, SeeSR's ``cross_attention_dim`` of
#: ``image_attentions``)
RAM_TOKEN_DIM = 512
#: RAM's fixed input size: every image is resized to this square before the Swin encoder
RAM_IMAGE_SIZE = 384


@dataclass
class RamOutput:
    """What the DAPE-equipped RAM returns for a batch of B images.

    ``tags[b]`` lists image b's tag names in RAM's tag-list order. ``tag_text[b]`` is the same joined with
    ``", "``: the form SeeSR's ``ram_lora.generate_tag`` returns and puts first in its prompt (RAM's own code
    joins with ``" | "``; ``seesr_prompt`` builds SeeSR's full prompt from it). ``tokens`` are the
    representation tokens [B, N, 512] (N = 145 at RAM's 384 px), float32 on the model's device.
    ``logits`` are the per-class tag logits [B, num_classes] (sigmoid > per-class threshold = tag), kept
    for training (DAPE's logit loss) and for inspection.
    """

    tags: list[list[str]]
    tag_text: list[str]
    tokens: torch.Tensor
    logits: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.ndim != 3:
            raise ValueError(f"RAM tokens must be [B, N, C], got shape {tuple(self.tokens.shape)}")
        if not (len(self.tags) == len(self.tag_text) == self.tokens.shape[0]):
            raise ValueError(
                f"RAM output batch sizes disagree: {len(self.tags)} tag lists, {len(self.tag_text)} tag texts, "
                f"{self.tokens.shape[0]} token rows"
            )


def seesr_prompt(tag_text: str, user_prompt: str = "", added_prompt: str = "clean, high-resolution, 8k") -> str:
    """SeeSR's positive prompt, character for character.

    SeeSR's test script builds ``f"{tags}, {user_prompt},"`` and then appends ``added_prompt`` with no
    separator (cswry/SeeSR test_seesr.py, ``get_validation_prompt`` and ``main``), so an empty user prompt
    gives ``"cat, dog, ,clean, high-resolution, 8k"``.
    """
    return f"{tag_text}, {user_prompt}," + added_prompt


__all__ = ["RAM_IMAGE_SIZE", "RAM_TOKEN_DIM", "RamOutput", "seesr_prompt"]
