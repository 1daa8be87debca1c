"""What training needs to know of each extractor kind beyond the registry (:mod:`megasr.dage.kinds`).

One row per kind: the keys its ``dage_<kind>.extractor`` mapping may hold, where its pretrained base is looked
up and what it is (a file, or a transformers model folder), and the CLI flag that gives it. A new extractor
is a row here besides its row in the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from megasr.dage.kinds import TRAINED_KINDS

__all__ = ["KIND_INPUTS", "KindInputs"]


@dataclass(frozen=True)
class KindInputs:
    #: what the extractor's ``from_config`` / ``from_base`` reads from ``dage_<kind>.extractor``
    extractor_keys: tuple[str, ...]
    #: the ComfyUI model folders a bare name of the pretrained base is looked up in
    base_folders: tuple[str, ...]
    #: "file" (one weight file) or "model" (a transformers model folder, or the weight file inside it)
    base_shape: str
    #: a base that works, for messages
    base_example: str
    #: ``--help`` of the base flag
    base_help: str
    #: the base flag (user-facing: never rename); None: ``--<kind>-base``
    base_flag: str | None = None

    def flag(self, kind: str) -> str:
        return self.base_flag or f"--{kind}-base"


KIND_INPUTS: dict[str, KindInputs] = {
    "hed": KindInputs(
        extractor_keys=("arch", "widths", "resolution"),
        base_folders=("megasr",),
        base_shape="file",
        base_example="/models/Annotators/ControlNetHED.pth",
        base_help="ControlNetHED.pth (or a safetensors copy): the HED extractor to fine-tune",
    ),
    "depth": KindInputs(
        extractor_keys=("depth_anything", "lora", "resolution"),
        base_folders=("megasr",),
        base_shape="model",
        base_example="/models/Depth-Anything-V2-Small-hf",
        base_help="Depth-Anything-V2-Small folder or its model.safetensors",
    ),
    "seg": KindInputs(
        extractor_keys=("segmentor", "mask2former", "resolution"),
        base_folders=("megasr",),
        base_shape="model",
        base_example="/models/mask2former-swin-tiny-ade-semantic",
        base_help="Mask2Former ADE20K folder or its model.safetensors",
    ),
    "clip": KindInputs(
        extractor_keys=("clip", "lora"),
        base_folders=("clip_vision",),
        base_shape="file",
        base_example="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
        base_help="CLIP ViT-H/14 clip_vision file (the IPAdapter one)",
        base_flag="--clip-vision",  # ComfyUI's clip_vision file
    ),
}

_missing = [k.kind for k in TRAINED_KINDS if k.kind not in KIND_INPUTS]
if _missing:  # pragma: no cover - a registry row without its training row
    raise RuntimeError(f"training/kind_inputs.py has no row for the extractor kind(s) {', '.join(_missing)}")
