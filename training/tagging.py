"""Training prompts from tags of the HR crop (the teacher tagger), as MegaSR/SeeSR train with image tags.

The teacher is the tagger of the ``MegaSR Tags`` node (:mod:`megasr.tags`) without the DAGE LoRA, on the HR
crop: the projected image embedding of the CLIP ViT-H/14 vision tower against the projected text embeddings of
the tag vocabulary from the OpenCLIP ViT-H/14 text tower (SD-2's text encoder). At inference the node tags the
LR image with the DAGE LoRA, which was trained to give on LR what this teacher gives on HR.

Where the parts come from (``megasr.tags``):

- vision: the DAGE CLIP extractor of the run with its LoRA switched off (``megasr.dage_clip``), else a ViT-H/14
  from ``tags.clip_vision``; the ``visual_projection.weight`` is read from ``tags.clip_vision`` (default
  ``megasr.dage_clip_base``: ComfyUI's ``clip_vision`` ViT-H file holds it);
- text: ``tags.text`` -- a transformers ``CLIPTextModelWithProjection`` folder (e.g. the LAION ViT-H/14 CLIP)
  or an SD-2 LDM checkpoint file (its ``cond_stage_model`` holds all 24 layers and ``text_projection``).
  Unset, the SD-2 base is used when it is such a file or a folder whose text encoder has a projection. The
  SD-2 diffusers folder does not qualify: its text encoder stops at layer 23 and has no projection, so its
  pooled output is not the CLIP text embedding.

The vocabulary is embedded once at start; the text tower is then freed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megasr.files import read_state_dict

from .errors import UsageError

__all__ = ["TeacherTagger", "build_teacher_tagger", "load_tag_text_tower", "tag_sources"]

logger = logging.getLogger(__name__)

#: The OpenCLIP ViT-H/14 text tower with all 24 layers (SD-2 keeps them in its checkpoint).
OPENCLIP_H_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1024,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


def _is_file(path: str | None) -> bool:
    return bool(path) and Path(path).expanduser().is_file()


def _folder_has_projection(folder: Path) -> bool:
    from safetensors import safe_open

    for name in ("model.safetensors",):
        f = folder / name
        if f.is_file():
            with safe_open(str(f), "pt") as st:
                return "text_projection.weight" in set(st.keys())
    return False


def tag_sources(mcfg: Any) -> tuple[str, str]:
    """(clip_vision file, text tower) for the teacher tagger; raises :class:`UsageError` naming the option."""
    tcfg = mcfg.tags
    vision = tcfg.clip_vision or mcfg.dage_clip_base
    if not vision:
        raise UsageError(
            "megasr.tags.clip_vision",
            "tags of the HR images (the default prompt) need the CLIP ViT-H/14 clip_vision file: set "
            "megasr.tags.clip_vision (or megasr.dage_clip_base), or megasr.tags.enabled=false",
        )
    if not _is_file(vision):
        option = "megasr.tags.clip_vision" if tcfg.clip_vision else "megasr.dage_clip_base"
        raise UsageError(option, f"'{vision}' does not exist (the tagger's CLIP vision file)")
    text = tcfg.text
    if text:
        if not Path(text).expanduser().exists():
            raise UsageError("megasr.tags.text", f"'{text}' does not exist")
        return str(vision), str(text)
    candidates = [mcfg.text_encoder, mcfg.base]
    if mcfg.base and Path(mcfg.base).expanduser().is_dir():
        candidates.append(str(Path(mcfg.base).expanduser() / "text_encoder"))
    for cand in candidates:
        if not cand:
            continue
        p = Path(cand).expanduser()
        if p.is_file() or (p.is_dir() and _folder_has_projection(p)):
            return str(vision), str(p)
    raise UsageError(
        "megasr.tags.text",
        "tags of the HR images (the default prompt) need the full OpenCLIP ViT-H/14 text tower with its projection; "
        "the SD-2 diffusers text encoder has neither (23 layers, no text_projection). Set megasr.tags.text to an "
        "SD-2 checkpoint file (e.g. v2-1_512-ema-pruned.safetensors) or a CLIP ViT-H/14 CLIPTextModelWithProjection "
        "folder, or megasr.tags.enabled=false to train on sidecar tags / megasr.prompt only",
    )


def load_tag_text_tower(path: str) -> nn.Module:
    """A ``CLIPTextModelWithProjection`` from a transformers folder or an SD-2 LDM checkpoint file."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    p = Path(path).expanduser()
    try:
        if p.is_dir():
            model, info = CLIPTextModelWithProjection.from_pretrained(str(p), output_loading_info=True)
            if any("text_projection" in k for k in info.get("missing_keys", [])):
                raise ValueError("the text model has no text_projection weights")
        else:
            from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

            state = read_state_dict(p)
            if "cond_stage_model.model.text_projection" not in state:
                raise ValueError("not an SD-2 checkpoint with an OpenCLIP text tower (no text_projection)")
            model = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_H_TEXT_CONFIG))
            conv = convert_open_clip_checkpoint(model, state)
            missing, unexpected = model.load_state_dict(conv, strict=False)
            missing = [k for k in missing if "position_ids" not in k]
            if missing:
                raise ValueError(f"missing {missing[:4]}")
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError("megasr.tags.text", f"cannot load the tagger's text tower from '{p}': {exc}") from None
    return model.eval().requires_grad_(False)


@torch.no_grad()
def embed_vocabulary(text_tower: nn.Module, tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Projected pooled text embeddings [V, D] of ``prompts`` (batches of 64)."""
    text_tower.to(device)
    limit = int(getattr(text_tower.config, "max_position_embeddings", 77))
    out = []
    for i in range(0, len(prompts), 64):
        ids = tokenizer(
            prompts[i : i + 64], padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out.append(text_tower(input_ids=ids).text_embeds.float())
    return torch.cat(out)


def _disable_adapters(model: nn.Module, disabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(not disabled)


class TeacherTagger:
    """Tags of HR crops [B, 3, H, W] in 0..1: ``tagger(hr) -> list of tag lists``."""

    def __init__(
        self,
        vision: nn.Module,
        projection: torch.Tensor,
        text_embeds: torch.Tensor,
        vocab: Any,
        image_size: int,
        crop: bool,
        top_k: int,
        threshold: float,
    ) -> None:
        self.vision = vision
        self.projection = projection
        self.text_embeds = text_embeds
        self.vocab = vocab
        self.image_size = image_size
        self.crop = crop
        self.top_k = top_k
        self.threshold = threshold

    @torch.no_grad()
    def image_embeds(self, hr: torch.Tensor) -> torch.Tensor:
        from megasr.dage.clip import clip_preprocess

        dtype = next(self.vision.parameters()).dtype
        x = clip_preprocess(hr.float(), self.image_size, crop=self.crop).to(hr.device, dtype)
        _disable_adapters(self.vision, True)  # the teacher: the base CLIP, without the DAGE LoRA
        try:
            pooled = self.vision(pixel_values=x).pooler_output.float()
        finally:
            _disable_adapters(self.vision, False)
        return pooled @ self.projection.to(pooled.device).T

    def __call__(self, hr: torch.Tensor) -> list[list[str]]:
        from megasr.tags import tags_for_images

        return tags_for_images(self.image_embeds(hr), self.text_embeds, self.vocab.tags, self.top_k, self.threshold)


def build_teacher_tagger(
    mcfg: Any, tokenizer: Any, device: torch.device, dtype: torch.dtype, clip_extractor: nn.Module | None
) -> TeacherTagger:
    """The teacher tagger of a MegaSR run (see the module docstring)."""
    from safetensors.torch import load_file

    from megasr.dage.clip import ClipExtractor
    from megasr.tags import load_vocabulary

    tcfg = mcfg.tags
    vision_file, text_path = tag_sources(mcfg)
    try:
        vocab = load_vocabulary(tcfg.vocabulary, tcfg.template)
    except (OSError, ValueError) as exc:
        raise UsageError("megasr.tags.vocabulary", str(exc)) from None
    raw = load_file(vision_file)
    proj = raw.get("visual_projection.weight")
    if proj is None:
        raise UsageError(
            "megasr.tags.clip_vision",
            f"'{vision_file}' has no visual_projection.weight (use ComfyUI's clip_vision ViT-H/14 file, which has it)",
        )
    same_base = not tcfg.clip_vision or (
        mcfg.dage_clip_base
        and Path(tcfg.clip_vision).expanduser().resolve() == Path(mcfg.dage_clip_base).expanduser().resolve()
    )
    if clip_extractor is not None and same_base:
        extractor = clip_extractor  # one ViT in memory: the DAGE CLIP with its LoRA switched off
    else:
        extractor = ClipExtractor.from_base(vision_file).to(device=device, dtype=dtype).eval()
    vision = extractor.model
    hidden = int(extractor.clip_config["hidden_size"])
    if proj.shape[1] != hidden:
        raise UsageError(
            "megasr.tags.clip_vision",
            f"its visual projection takes {proj.shape[1]}-d features but the CLIP vision tower is {hidden}-d",
        )
    text_tower = load_tag_text_tower(text_path)
    text_embeds = embed_vocabulary(text_tower, tokenizer, vocab.prompts(), device)
    del text_tower
    if text_embeds.shape[1] != proj.shape[0]:
        raise UsageError(
            "megasr.tags.text",
            f"the text tower embeds into {text_embeds.shape[1]}-d, the vision tower into {proj.shape[0]}-d: "
            "not one CLIP (both must be ViT-H/14 OpenCLIP)",
        )
    logger.info("megasr: training prompts = tags of the HR crops (%d-tag vocabulary, teacher CLIP)", len(vocab.tags))
    return TeacherTagger(
        vision,
        proj.float().to(device),
        text_embeds,
        vocab,
        extractor.image_size,
        bool(mcfg.clip_crop),
        int(tcfg.top_k),
        float(tcfg.threshold),
    )
