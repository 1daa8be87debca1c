"""Zero-shot image tags in the OpenCLIP ViT-H/14 embedding space (pure torch).

SD-2's text encoder is the OpenCLIP ViT-H/14 (LAION-2B) text tower; its projected pooled output lives in the
same 1024-d space as the projected image embedding of the ViT-H/14 vision tower (ComfyUI's ``clip_vision``
file, the base DAGE-CLIP fine-tunes). So an image is tagged by cosine similarity between its image embedding
and the text embeddings of a shipped vocabulary, each tag embedded in a prompt template -- no extra model.

Selection (per image, or on the mean score of a batch): a tag is kept when its similarity stands at least
``threshold`` standard deviations above the mean similarity over the whole vocabulary (a z-score; raw CLIP
cosines differ between models and between degraded and clean inputs, the z-score does not care), at most
``top_k`` tags, best first.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_SUFFIX",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_K",
    "VOCABULARY_FILE",
    "TagVocabulary",
    "format_prompt",
    "load_vocabulary",
    "parse_vocabulary",
    "select_tags",
    "tag_scores",
    "tags_for_images",
]

VOCABULARY_FILE = Path(__file__).resolve().parent / "data" / "tag_vocabulary.txt"
DEFAULT_SUFFIX = "clean, high-resolution, 8k"  # SeeSR's positive suffix
DEFAULT_TOP_K = 8
DEFAULT_THRESHOLD = 2.0
DEFAULT_TEMPLATE = "a photo of {}."


@dataclass(frozen=True)
class TagVocabulary:
    """Tags and the template each is embedded in (``template.format(tag)``)."""

    tags: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE

    def prompts(self) -> list[str]:
        """The texts whose embeddings represent the tags."""
        return [self.template.format(t) for t in self.tags]


def parse_vocabulary(text: str, template: str | None = None) -> TagVocabulary:
    """Tags from text: one per line or comma-separated; ``#`` starts a comment; a ``template:`` line sets the
    template (``template`` overrides it). Duplicates are dropped (first kept). Raises ``ValueError`` when no
    tag is left or the template has no ``{}``."""
    tags: list[str] = []
    seen: set[str] = set()
    found_template = None
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.lower().startswith("template:"):
            found_template = line.split(":", 1)[1].strip()
            continue
        for part in line.split(","):
            tag = " ".join(part.split())
            if tag and tag.lower() not in seen:
                seen.add(tag.lower())
                tags.append(tag)
    chosen = (template or "").strip() or found_template or DEFAULT_TEMPLATE
    if "{}" not in chosen:
        raise ValueError(f"the template '{chosen}' has no '{{}}' where the tag goes")
    if not tags:
        raise ValueError("the vocabulary holds no tags")
    return TagVocabulary(tuple(tags), chosen)


def load_vocabulary(path: str | Path | None = None, template: str | None = None) -> TagVocabulary:
    """The shipped vocabulary (``megasr/data/tag_vocabulary.txt``) or a file in the same format."""
    return parse_vocabulary(Path(path or VOCABULARY_FILE).read_text(encoding="utf-8"), template)


def tag_scores(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [B, V] between image embeddings [B, D] and tag text embeddings [V, D]."""
    if image_embeds.ndim != 2 or text_embeds.ndim != 2:
        raise ValueError(f"expected [B, D] and [V, D], got {list(image_embeds.shape)} and {list(text_embeds.shape)}")
    if image_embeds.shape[-1] != text_embeds.shape[-1]:
        raise ValueError(
            f"image embeddings are {image_embeds.shape[-1]}-d but the tag embeddings {text_embeds.shape[-1]}-d: "
            "the vision and text towers are not one CLIP"
        )
    img = F.normalize(image_embeds.float(), dim=-1)
    txt = F.normalize(text_embeds.float().to(img.device), dim=-1)
    return img @ txt.T


def select_tags(
    scores: torch.Tensor, tags: Sequence[str], top_k: int, threshold: float, exclude: Iterable[str] = ()
) -> list[str]:
    """Tags of one image from its similarities [V]: z-score (over the whole vocabulary) >= ``threshold``, not in
    ``exclude`` (case-insensitive), at most ``top_k``, best first (ties keep vocabulary order)."""
    if scores.ndim != 1 or scores.shape[0] != len(tags):
        raise ValueError(f"expected {len(tags)} scores, got shape {list(scores.shape)}")
    if top_k < 1 or not torch.isfinite(scores).all():
        return []
    s = scores.double()
    std = s.std(unbiased=False) if s.numel() > 1 else s.new_tensor(0.0)
    z = (s - s.mean()) / std if float(std) > 0 else torch.zeros_like(s)
    order = sorted(range(len(tags)), key=lambda i: (-float(s[i]), i))
    drop = {" ".join(e.split()).lower() for e in exclude}
    keep = [i for i in order if float(z[i]) >= threshold and tags[i].lower() not in drop]
    return [tags[i] for i in keep[:top_k]]


def tags_for_images(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    tags: Sequence[str],
    top_k: int = DEFAULT_TOP_K,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[list[str]]:
    """Per image of the batch, its tags (see :func:`select_tags`)."""
    scores = tag_scores(image_embeds, text_embeds)
    return [select_tags(row, tags, top_k, threshold) for row in scores]


def format_prompt(tags: Iterable[str], prefix: str = "", suffix: str = DEFAULT_SUFFIX) -> str:
    """``prefix, tag, tag, ..., suffix``; empty parts are skipped."""
    parts = [prefix.strip(), *tags, suffix.strip()]
    return ", ".join(p for p in parts if p)
