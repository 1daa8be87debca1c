"""Degradation-aware tags for the prompt: zero-shot CLIP ViT-H/14 tagging of the LR image (megasr/tags.py).

Two nodes, so that ComfyUI's output cache keeps the expensive part: *MegaSR Tag Vocabulary* embeds every tag
once with the SD-2 text encoder (the CLIP of Load Checkpoint: its projected pooled output is the OpenCLIP
ViT-H/14 text embedding); *MegaSR Tags* embeds the LR image with the CLIP_VISION model (``image_embeds``, the
projected ViT-H/14 image embedding, with the DAGE CLIP LoRA when given) and ranks the tags. Changing top_k,
threshold or the image re-ranks without re-encoding the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.utils
import torch

from ..megasr import tags as megasr_tags
from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image
from .api import io, ui
from .common import CATEGORY, DageModelType
from .semantics import patched_clip_vision

VOCAB_WHERE = "MegaSR Tag Vocabulary"
TAGS_WHERE = "MegaSR Tags"
TagVocabType = io.Custom("MEGASR_TAG_VOCAB")


@dataclass(eq=False)
class TagEmbeddings:
    """A vocabulary and its text embeddings [V, D] (what MEGASR_TAG_VOCAB values carry)."""

    vocab: megasr_tags.TagVocabulary
    embeds: torch.Tensor


def encode_vocabulary(clip, vocab: megasr_tags.TagVocabulary) -> torch.Tensor:
    """Projected pooled text embeddings [V, D] of the vocabulary's prompts (progress bar, Cancel)."""
    out = []
    pbar = comfy.utils.ProgressBar(len(vocab.tags))
    for text in vocab.prompts():
        comfy.model_management.throw_exception_if_processing_interrupted()
        _, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        if pooled is None:
            raise MegaSRInputError(VOCAB_WHERE, "clip", "this text encoder gives no pooled output; use SD-2's CLIP")
        out.append(pooled.reshape(-1).float().to(comfy.model_management.intermediate_device()))
        pbar.update(1)
    embeds = torch.stack(out)
    if not torch.isfinite(embeds).all():
        raise MegaSRInputError(VOCAB_WHERE, "clip", "the text encoder produced NaN/inf")
    return embeds


class MegaSRTagVocabulary(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRTagVocabulary",
            display_name=VOCAB_WHERE,
            category=CATEGORY,
            description=(
                "Embeds the tag vocabulary once with the SD-2 text encoder (OpenCLIP ViT-H/14: the same space as "
                "the ViT-H/14 CLIP vision model), for MegaSR Tags. Empty vocabulary = the shipped list of about "
                "300 common subjects, scenes and materials."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of the SD-2 checkpoint (Load Checkpoint)."),
                io.String.Input(
                    "vocabulary",
                    multiline=True,
                    default="",
                    tooltip="Your own tags, one per line or comma-separated ('#' starts a comment). Empty: the "
                    "shipped vocabulary (megasr/data/tag_vocabulary.txt).",
                ),
                io.String.Input(
                    "template",
                    default="",
                    tooltip="Text each tag is embedded in, {} = the tag. Empty: the vocabulary's own "
                    "('a photo of {}.').",
                ),
            ],
            outputs=[
                TagVocabType.Output(display_name="tag_vocab", tooltip="The embedded vocabulary, for MegaSR Tags.")
            ],
        )

    @classmethod
    def execute(cls, clip, vocabulary: str = "", template: str = "") -> io.NodeOutput:
        if clip is None:
            raise MegaSRInputError(VOCAB_WHERE, "clip", "no CLIP connected (the checkpoint has no text encoder)")
        try:
            if (vocabulary or "").strip():
                vocab = megasr_tags.parse_vocabulary(vocabulary, template or None)
            else:
                vocab = megasr_tags.load_vocabulary(template=template or None)
        except ValueError as e:
            raise MegaSRInputError(VOCAB_WHERE, "template" if "template" in str(e) else "vocabulary", str(e)) from e
        return io.NodeOutput(TagEmbeddings(vocab, encode_vocabulary(clip, vocab)))


def _projection_dim(clip_vision) -> int | None:
    proj = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    weight = getattr(proj, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


class MegaSRTags(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRTags",
            display_name=TAGS_WHERE,
            category=CATEGORY,
            is_output_node=True,  # shows the prompt on the node even before it is wired to a text encoder
            description=(
                "Tags the LR image zero-shot (as MegaSR/SeeSR prompt with image tags): CLIP ViT-H/14 image embedding "
                "(with the degradation-aware DAGE CLIP LoRA when given) against the embedded vocabulary. Outputs "
                "the prompt 'prefix, tags, suffix' as text: connect it to the text input of a CLIP Text Encode; "
                "edit it through prefix, exclude and suffix. The prompt is also shown on the node."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The LR image (a batch gets one prompt from its mean tag scores)."),
                io.ClipVision.Input(
                    "clip_vision",
                    tooltip="CLIP vision ViT-H/14 (OpenCLIP LAION-2B, the IPAdapter file): the one whose image "
                    "embeddings share SD-2's text space.",
                ),
                TagVocabType.Input("tag_vocab", tooltip="From MegaSR Tag Vocabulary."),
                io.Int.Input(
                    "top_k", default=megasr_tags.DEFAULT_TOP_K, min=1, max=64, tooltip="At most this many tags."
                ),
                io.Float.Input(
                    "threshold",
                    default=megasr_tags.DEFAULT_THRESHOLD,
                    min=-10.0,
                    max=10.0,
                    step=0.1,
                    tooltip="A tag is kept when its similarity to the image lies this many standard deviations "
                    "above the vocabulary's mean similarity (higher = fewer, surer tags).",
                ),
                io.String.Input("prefix", multiline=True, default="", tooltip="Your own words, put before the tags."),
                io.String.Input(
                    "suffix",
                    default=megasr_tags.DEFAULT_SUFFIX,
                    tooltip="Put after the tags (SeeSR's quality words by default).",
                ),
                io.String.Input(
                    "exclude", default="", tooltip="Comma-separated tags never to output (others take their place)."
                ),
                DageModelType.Input(
                    "dage_lora",
                    optional=True,
                    tooltip="Optional DAGE CLIP LoRA (MegaSR DAGE Loader, kind clip_lora): tags of a degraded LR "
                    "as the clean image would get them.",
                ),
            ],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="prefix, tags, suffix: for CLIP Text Encode's text."),
                io.String.Output(display_name="tags", tooltip="The tags alone, comma-separated, best first."),
            ],
        )

    @classmethod
    def execute(
        cls,
        image,
        clip_vision,
        tag_vocab,
        top_k: int,
        threshold: float,
        prefix: str,
        suffix: str,
        exclude: str,
        dage_lora=None,
    ) -> io.NodeOutput:
        img = as_rgb_image(image, TAGS_WHERE, "image")
        if not isinstance(tag_vocab, TagEmbeddings):
            raise MegaSRInputError(TAGS_WHERE, "tag_vocab", "expected the output of MegaSR Tag Vocabulary")
        if int(top_k) < 1:
            raise MegaSRInputError(TAGS_WHERE, "top_k", f"{top_k} is below 1")
        dim = int(tag_vocab.embeds.shape[1])
        have = _projection_dim(clip_vision)
        if have is not None and have != dim:
            raise MegaSRInputError(
                TAGS_WHERE,
                "clip_vision",
                f"this CLIP vision model embeds images into {have}-d, the SD-2 text encoder into {dim}-d: tags need "
                "the ViT-H/14 CLIP vision (OpenCLIP LAION-2B, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)",
            )
        cv = patched_clip_vision(clip_vision, dage_lora, TAGS_WHERE) if dage_lora is not None else clip_vision
        with torch.no_grad():
            emb = cv.encode_image(img, crop=False)["image_embeds"].float()
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise MegaSRInputError(
                TAGS_WHERE, "clip_vision", f"image embeddings of shape {list(emb.shape)} do not fit {dim}-d tags"
            )
        if not torch.isfinite(emb).all():
            raise MegaSRInputError(TAGS_WHERE, "clip_vision", "the CLIP vision model produced NaN/inf")
        scores = megasr_tags.tag_scores(emb, tag_vocab.embeds).mean(dim=0)
        chosen = megasr_tags.select_tags(
            scores, tag_vocab.vocab.tags, int(top_k), float(threshold), [e for e in exclude.split(",") if e.strip()]
        )
        prompt = megasr_tags.format_prompt(chosen, prefix, suffix)
        return io.NodeOutput(prompt, ", ".join(chosen), ui=ui.PreviewText(prompt))


TAG_NODES: list[type[io.ComfyNode]] = [MegaSRTagVocabulary, MegaSRTags]
