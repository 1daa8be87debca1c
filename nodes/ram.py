"""DAPE-equipped RAM (megasr/ram): the paper's tags (the text prompt) and representation tokens (SeeSR's branch).

Two nodes, so ComfyUI's output cache keeps the loaded model: *MegaSR RAM Loader* reads RAM's
``ram_swin_large_14m.pth`` (or a safetensors copy) and, optionally, SeeSR's ``DAPE.pth`` LoRA, and hands the model
to ComfyUI's model management; *MegaSR RAM Tags* runs it on the LR image and outputs SeeSR's prompt and the tags as
text (connect ``prompt`` to a CLIP Text Encode's text; edit it through ``exclude``, ``user_prompt`` and ``suffix``)
and the representation tokens (``ram_semantics``, for MegaSR CISM² Semantic Injection).
"""

from __future__ import annotations

import os

import comfy.model_management
import folder_paths
import torch

from ..megasr.errors import MegaSRInputError, WeightFileError
from ..megasr.images import as_rgb_image
from ..megasr.ram import RamOutput, seesr_prompt
from .api import io, ui
from .common import CATEGORY, RamModelType, RamSemanticsType
from .runtime.folders import MEGASR_FOLDER, missing_weight_problem, resolve_weight_file
from .runtime.models import ManagedModel, make_patcher

LOADER_WHERE = "MegaSR RAM Loader"
TAGS_WHERE = "MegaSR RAM Tags"
NO_DAPE = "none"
RAM_EXTENSIONS = (".pth", ".safetensors")
#: SeeSR's added prompt (test_seesr.py ``--added_prompt``) and negative prompt (``--negative_prompt``)
SEESR_SUFFIX = "clean, high-resolution, 8k"
SEESR_NEGATIVE = "dotted, noise, blur, lowres, smooth"
#: sidecar files beside a RAM file of another class count than RAM's 4585 (one tag / threshold a line)
TAGS_SIDECAR, THRESHOLDS_SIDECAR = ".tags.txt", ".thresholds.txt"


def ram_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(MEGASR_FOLDER) if f.endswith(RAM_EXTENSIONS)]


def _sidecars(path: str) -> tuple[list[str] | None, torch.Tensor | None]:
    """Tag names and thresholds beside ``path`` (``<file>.tags.txt`` / ``<file>.thresholds.txt``), when there."""
    from ..megasr.ram.loader import read_tag_list, read_thresholds

    stem = os.path.splitext(path)[0]
    tags = read_tag_list(stem + TAGS_SIDECAR) if os.path.isfile(stem + TAGS_SIDECAR) else None
    th = read_thresholds(stem + THRESHOLDS_SIDECAR) if os.path.isfile(stem + THRESHOLDS_SIDECAR) else None
    return tags, th


class MegaSRRamLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRRamLoader",
            display_name=LOADER_WHERE,
            category=CATEGORY,
            description=(
                "Loads the DAPE-equipped RAM tagger (SeeSR's and MegaSR's semantic prompt extractor) from "
                "models/megasr: RAM's ram_swin_large_14m.pth plus SeeSR's degradation-aware DAPE.pth LoRA "
                "(python -m megasr fetch --only ram_swin_large_14m seesr_dape)."
            ),
            inputs=[
                io.Combo.Input("ram_name", options=ram_files(), tooltip="RAM Swin-L (ram_swin_large_14m.pth)."),
                io.Combo.Input(
                    "dape_name",
                    options=[NO_DAPE, *ram_files()],
                    default=NO_DAPE,
                    tooltip="SeeSR's DAPE LoRA (DAPE.pth): tags and tokens of a degraded LR as of the clean image. "
                    "none: plain RAM.",
                ),
            ],
            outputs=[RamModelType.Output(display_name="ram_model", tooltip="For MegaSR RAM Tags.")],
        )

    @classmethod
    def validate_inputs(cls, ram_name, dape_name) -> bool | str:
        problem = missing_weight_problem(ram_name)
        if problem is None and dape_name != NO_DAPE:
            problem = missing_weight_problem(dape_name)
        return problem or True

    @classmethod
    def execute(cls, ram_name, dape_name) -> io.NodeOutput:
        from ..megasr.ram.loader import load_ram

        ram_path = resolve_weight_file(LOADER_WHERE, "ram_name", ram_name)
        dape_path = None if dape_name == NO_DAPE else resolve_weight_file(LOADER_WHERE, "dape_name", dape_name)
        tags, thresholds = _sidecars(ram_path)
        try:
            model = load_ram(ram_path, dape_path, tag_names=tags, thresholds=thresholds)
        except WeightFileError as e:
            name = "dape_name" if dape_path is not None and e.path == dape_path else "ram_name"
            raise MegaSRInputError(LOADER_WHERE, name, e.problem) from e
        info = {"dape": dape_name, "num_classes": model.config.num_classes}
        # a holder: the patcher writes bookkeeping attributes (``device`` among them) onto the module it owns
        holder = torch.nn.Module()
        holder.ram = model
        return io.NodeOutput(ManagedModel(make_patcher(holder), model.kind, ram_name, info))


def _merge_tags(out: RamOutput) -> list[str]:
    """One tag list for a batch: every image's tags, each once, in the order RAM lists them."""
    seen: list[str] = []
    for tags in out.tags:
        seen.extend(t for t in tags if t not in seen)
    return seen


class MegaSRRamTags(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRRamTags",
            display_name=TAGS_WHERE,
            category=CATEGORY,
            is_output_node=True,  # shows the prompt on the node even before it is wired to a text encoder
            description=(
                "Tags the LR image with the DAPE-equipped RAM (RAM resizes it to 384 x 384) as SeeSR and MegaSR do: "
                "outputs SeeSR's prompt 'tags, user_prompt,suffix' for CLIP Text Encode's text, the tags alone, "
                "and the representation tokens (ram_semantics) for MegaSR CISM² Semantic Injection. Edit the "
                "prompt through exclude (drop tags), user_prompt (your words, e.g. a tag RAM missed) and suffix."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The LR image (a batch gets one prompt: the tags of all images)."),
                RamModelType.Input("ram_model", tooltip="From MegaSR RAM Loader."),
                io.String.Input(
                    "user_prompt", multiline=True, default="", tooltip="Your own words, put after the tags."
                ),
                io.String.Input("suffix", default=SEESR_SUFFIX, tooltip="Put last (SeeSR's added prompt)."),
                io.String.Input(
                    "exclude", default="", tooltip="Comma-separated tags to leave out of the prompt (RAM's names)."
                ),
            ],
            outputs=[
                io.String.Output(display_name="prompt", tooltip="SeeSR's prompt: for CLIP Text Encode's text."),
                io.String.Output(display_name="tags", tooltip="RAM's tags, comma-separated, in RAM's order."),
                RamSemanticsType.Output(
                    display_name="ram_semantics",
                    tooltip="RAM's representation tokens of the image, for CISM² Semantic Injection (SeeSR branch).",
                ),
            ],
        )

    @classmethod
    def execute(cls, image, ram_model, user_prompt: str, suffix: str, exclude: str) -> io.NodeOutput:
        img = as_rgb_image(image, TAGS_WHERE, "image")
        if not isinstance(ram_model, ManagedModel) or ram_model.kind != "ram":
            raise MegaSRInputError(TAGS_WHERE, "ram_model", "expected the output of MegaSR RAM Loader")
        device = ram_model.load()
        model = ram_model.module.ram
        with torch.no_grad():
            out = model(img.permute(0, 3, 1, 2).to(device))
        tokens = out.tokens.float().to(comfy.model_management.intermediate_device())
        if not torch.isfinite(tokens).all():
            raise MegaSRInputError(TAGS_WHERE, "ram_model", "the RAM model produced NaN/inf")
        dropped = {e.strip().lower() for e in exclude.split(",") if e.strip()}
        tags = [t for t in _merge_tags(out) if t.lower() not in dropped]
        tag_text = ", ".join(tags)
        prompt = seesr_prompt(tag_text, user_prompt.strip(), suffix)
        semantics = RamOutput(out.tags, out.tag_text, tokens, out.logits)
        return io.NodeOutput(prompt, tag_text, semantics, ui=ui.PreviewText(prompt))


RAM_NODES: list[type[io.ComfyNode]] = [MegaSRRamLoader, MegaSRRamTags]
