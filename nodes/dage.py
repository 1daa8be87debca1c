"""DAGE nodes: the loader of the degradation-aware guidance extractors and the HED / depth / segmentation map nodes.

The maps are ordinary IMAGEs in the encodings of ``megasr/dage/encodings.py`` (HED white edges on black,
depth near = bright normalised per image, segmentation in the ADE20K palette), so maps from other packs or
painted by hand can replace them. The lead registers ``DAGE_NODES`` in ``nodes/__init__.py``.
"""

from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..megasr.dage.depth import DEPTH_BASE_HINT
from ..megasr.dage.kinds import BY_KIND, BY_NODE_CHOICE
from ..megasr.errors import MegaSRInputError, WeightFileError
from ..megasr.images import as_rgb_image, to_bchw
from ..megasr.weights import COMPONENT_DESCRIPTIONS, read_weight_header
from .api import io, ui
from .common import CATEGORY, DageModelType
from .runtime.folders import MEGASR_FOLDER, missing_weight_problem, resolve_weight_file, weight_files
from .runtime.models import ManagedModel, make_patcher

log = logging.getLogger("megasr")

DAGE_CATEGORY = f"{CATEGORY}/DAGE"
LOADER = "MegaSR DAGE Loader"

#: loader ``kind`` (the registry's node choice) -> the ``megasr.component`` its file must hold
KIND_COMPONENTS: dict[str, str] = {choice: k.component for choice, k in BY_NODE_CHOICE.items()}
COMPONENT_KINDS = {v: k for k, v in KIND_COMPONENTS.items()}
#: the loader kind of the CLIP LoRA (applied as weight patches, not run as a map extractor)
CLIP_LORA = BY_KIND["clip"].node_choice
_COMPONENT_LIST = ", ".join(list(KIND_COMPONENTS.values())[:-1]) + " or " + list(KIND_COMPONENTS.values())[-1]
NO_BASE = "none"


class DageLoraHolder(torch.nn.Module):
    """Owns nothing on the device: a CLIP LoRA is applied as weight patches onto the user's CLIP_VISION model
    (MegaSR DAGE CLIP Image Semantics); the deltas live in ``ManagedModel.info['weight_deltas']``."""

    def extra_repr(self) -> str:
        return "DAGE CLIP LoRA (weight deltas in ManagedModel.info)"


def _component_problem(filename: str, component: str, kind: str) -> str:
    have = COMPONENT_DESCRIPTIONS.get(component, component)
    need = KIND_COMPONENTS[kind]
    text = (
        f"'{filename}' holds {have} (component '{component}'), but kind '{kind}' needs a '{need}' file "
        f"({COMPONENT_DESCRIPTIONS.get(need, need)})"
    )
    other = COMPONENT_KINDS.get(component)
    if other is not None:
        return text + f"; set kind to '{other}' or pick a '{need}' file"
    return text + f"; pick a '{need}' file"


def _check_depth_base(base_name: str, base_path: str) -> None:
    """The depth base must be a plain transformers Depth-Anything safetensors file, not a MegaSR file."""
    from ..megasr.dage.depth import check_depth_base

    try:
        check_depth_base(base_path, base_name)
    except WeightFileError as e:
        raise MegaSRInputError(LOADER, "base_name", e.problem) from e


def _load_extractor(kind: str, path: str, base_name: str, download_missing: bool = False) -> torch.nn.Module:
    from ..megasr.dage import load_extractor

    row = BY_NODE_CHOICE[kind]
    if not row.lora:
        return load_extractor(path, expect=row.component)
    if not base_name or base_name == NO_BASE:
        raise MegaSRInputError(LOADER, "base_name", f"a depth LoRA needs its base model; pick {DEPTH_BASE_HINT}")
    base_path = resolve_weight_file(LOADER, "base_name", base_name, download_missing)
    _check_depth_base(base_name, base_path)
    try:
        return load_extractor(path, base_path=base_path, expect=row.component)
    except WeightFileError as e:
        raise MegaSRInputError(LOADER, "base_name" if e.path == base_path else "dage_name", e.problem) from e
    except (OSError, RuntimeError, ValueError, KeyError) as e:  # transformers' own loading errors
        raise MegaSRInputError(
            LOADER,
            "base_name",
            f"the base weights '{base_name}' do not fit the Depth-Anything model of the LoRA file "
            f"({type(e).__name__}: {e}); pick {DEPTH_BASE_HINT}",
        ) from e


def _load_clip_lora(path: str, filename: str) -> ManagedModel:
    from ..megasr.dage.clip import COMPONENT, clip_lora_to_weight_deltas
    from ..megasr.weights import load_weight_file

    state, info = load_weight_file(path, COMPONENT)
    try:
        deltas = clip_lora_to_weight_deltas(state, info.config)
    except (ValueError, RuntimeError) as e:
        raise WeightFileError(path, f"its LoRA tensors do not form weight deltas ({e})") from e
    # kept in the dtype ComfyUI stores CLIP vision weights in (fp16 by default): half the memory of fp32 (a ViT-H
    # LoRA's deltas are ~0.8 GB in fp32) and no precision below what the patched weights hold anyway
    dtype = comfy.model_management.text_encoder_dtype(comfy.model_management.text_encoder_device())
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float16
    deltas = {k: v.to(dtype) for k, v in deltas.items()}
    holder = DageLoraHolder()
    return ManagedModel(
        make_patcher(holder),
        CLIP_LORA,
        filename,
        {"component": COMPONENT, "config": info.config, "weight_deltas": deltas},
    )


class MegaSRDageLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = weight_files()
        return io.Schema(
            node_id="MegaSRDageLoader",
            display_name=LOADER,
            category=DAGE_CATEGORY,
            description=(
                "Loads a DAGE (degradation-aware guidance extractor) weight file from models/megasr: the HED edge, "
                "depth (a LoRA on Depth-Anything-V2-Small, which needs the base weights as base_name) or "
                "segmentation extractor, or the CLIP LoRA for DAGE CLIP Image Semantics. The file's kind is read "
                "from its metadata and must match 'kind'. ComfyUI's model management loads and offloads it."
            ),
            inputs=[
                io.Combo.Input(
                    "kind",
                    options=list(KIND_COMPONENTS),
                    default="hed",
                    tooltip="Which extractor the file holds: hed (edges), depth (LoRA on Depth-Anything-V2-Small), "
                    "seg (ADE20K segmentation) or clip_lora (for DAGE CLIP Image Semantics).",
                ),
                io.Combo.Input(
                    "dage_name",
                    options=files,
                    tooltip=f"A DAGE weight file in models/megasr (component {_COMPONENT_LIST}, matching 'kind').",
                ),
                io.Combo.Input(
                    "base_name",
                    options=[NO_BASE, *files],
                    default=NO_BASE,
                    optional=True,
                    tooltip="depth only: the Depth-Anything-V2-Small base weights the depth LoRA is applied to "
                    "(model.safetensors of depth-anything/Depth-Anything-V2-Small-hf, in models/megasr). "
                    "Ignored by the other kinds.",
                ),
                io.Boolean.Input(
                    "download_missing",
                    default=False,
                    optional=True,
                    tooltip="Off by default. On: a missing base_name file with a public source in the pack's model "
                    "manifest (the Depth-Anything-V2-Small base) is downloaded from the Hugging Face hub into "
                    "models/megasr when the node runs (resumable, checked, atomic; huggingface_hub's HF_HUB_OFFLINE "
                    "and HF_ENDPOINT apply). DAGE weight files have no public source: they are never downloaded.",
                ),
            ],
            outputs=[
                DageModelType.Output(
                    display_name="dage_model",
                    tooltip="The DAGE extractor; connect it to the DAGE HED / Depth / Segmentation node of the same "
                    "kind (a clip_lora to DAGE CLIP Image Semantics).",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, dage_name, base_name=NO_BASE, download_missing=False) -> bool | str:
        """Missing files fail validation with what they are and how to get them (all of a graph at once); a
        public base file passes when download_missing is on (it is fetched when the node runs)."""
        problems = [missing_weight_problem(dage_name)]
        if base_name and base_name != NO_BASE:
            problems.append(missing_weight_problem(base_name, download_missing is True))
        return "; ".join(p for p in problems if p) or True

    @classmethod
    def fingerprint_inputs(cls, kind, dage_name, base_name=NO_BASE, download_missing=False):
        """Reload when a file of the same name is replaced on disk (ComfyUI caches by input values)."""
        stamp = [kind]
        for name in (dage_name, base_name if kind == "depth" else None):
            path = folder_paths.get_full_path(MEGASR_FOLDER, name) if name and name != NO_BASE else None
            try:
                st = os.stat(path) if path else None
            except OSError:
                st = None
            stamp.append((name, st.st_mtime_ns, st.st_size) if st else (name, None))
        return tuple(stamp)

    @classmethod
    def execute(cls, kind, dage_name, base_name=NO_BASE, download_missing=False) -> io.NodeOutput:
        if kind not in KIND_COMPONENTS:
            raise MegaSRInputError(
                LOADER, "kind", f"unknown kind '{kind}', expected one of {', '.join(KIND_COMPONENTS)}"
            )
        path = resolve_weight_file(LOADER, "dage_name", dage_name)
        try:
            info = read_weight_header(path)
        except WeightFileError as e:
            raise MegaSRInputError(LOADER, "dage_name", e.problem) from e
        if info.component != KIND_COMPONENTS[kind]:
            raise MegaSRInputError(LOADER, "dage_name", _component_problem(dage_name, info.component, kind))
        try:
            if kind == CLIP_LORA:
                return io.NodeOutput(_load_clip_lora(path, dage_name))
            module = _load_extractor(kind, path, base_name, download_missing is True)
        except WeightFileError as e:
            raise MegaSRInputError(LOADER, "dage_name", e.problem) from e
        module.requires_grad_(False)
        extra = {"component": info.component, "config": info.config}
        if kind == "depth":
            extra["base"] = base_name
        log.info("%s: loaded %s", LOADER, info.describe())
        return io.NodeOutput(ManagedModel(make_patcher(module.eval()), kind, dage_name, extra))


# ------------------------------------------------------------------------------------------- map nodes


def _resolution_input() -> io.Int.Input:
    return io.Int.Input(
        "resolution",
        default=512,
        min=64,
        max=4096,
        step=64,
        tooltip="The short side the extractor runs at; the map is resized back to the input size.",
    )


def _encode(kind: str, out) -> torch.Tensor:
    from ..megasr.dage import encodings

    if kind == "hed":
        return encodings.hed_to_image(out.map)
    if kind == "depth":
        return encodings.depth_to_image(out.map)
    return encodings.seg_labels_to_image(out.map)


def run_extractor(where: str, kind: str, image, dage_model, resolution: int) -> torch.Tensor:
    """Validate the inputs, run the managed extractor per image (progress, Cancel), return the IMAGE map."""
    img = as_rgb_image(image, where, "image")
    have = getattr(dage_model, "kind", None)
    if not isinstance(dage_model, ManagedModel) or have not in KIND_COMPONENTS:
        raise MegaSRInputError(where, "dage_model", "expected a DAGE model from MegaSR DAGE Loader")
    if have != kind:
        raise MegaSRInputError(
            where,
            "dage_model",
            f"this is a '{have}' DAGE model ({dage_model.filename}); this node needs one loaded with kind '{kind}' "
            f"(a '{KIND_COMPONENTS[kind]}' file)",
        )
    resolution = int(resolution)
    if resolution < 64:
        raise MegaSRInputError(where, "resolution", f"{resolution} is too small; use at least 64")
    b, h, w, _ = img.shape
    device = dage_model.load()
    module = dage_model.module
    out_device = comfy.model_management.intermediate_device()
    pbar = comfy.utils.ProgressBar(b)
    maps = []
    with torch.no_grad():
        for i in range(b):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x = to_bchw(img[i : i + 1]).to(device)
            result = module(x, resolution)
            m = _encode(kind, result).float()
            if not torch.isfinite(m).all():
                raise MegaSRInputError(
                    where,
                    "dage_model",
                    f"the extractor produced NaN/inf values for image {i + 1} of the batch; the weights "
                    f"'{dage_model.filename}' are damaged",
                )
            maps.append(m.to(out_device))
            pbar.update(1)
    # one batch item: no concatenated copy; clamped in place (the maps are this node's own tensors)
    out = (maps[0] if len(maps) == 1 else torch.cat(maps, dim=0)).clamp_(0.0, 1.0).contiguous()
    if tuple(out.shape) != (b, h, w, 3):  # the extractors resize back themselves; never hand on another size
        out = to_bchw(out)
        mode = "nearest-exact" if kind == "seg" else "bilinear"
        out = torch.nn.functional.interpolate(out, size=(h, w), mode=mode).movedim(1, -1).contiguous()
    return out


def _map_schema(node_id: str, display_name: str, kind: str, what: str, output_tip: str) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=DAGE_CATEGORY,
        description=what,
        inputs=[
            io.Image.Input("image", tooltip="The low-resolution input image (grayscale and RGBA are accepted)."),
            DageModelType.Input("dage_model", tooltip=f"From MegaSR DAGE Loader with kind '{kind}'."),
            _resolution_input(),
        ],
        outputs=[io.Image.Output(display_name="map", tooltip=output_tip)],
    )


class _DageMapNode(io.ComfyNode):
    """Shared execute of the three map nodes; subclasses set KIND, WHERE and their schema."""

    KIND = ""
    WHERE = ""

    @classmethod
    def execute(cls, image, dage_model, resolution) -> io.NodeOutput:
        out = run_extractor(cls.WHERE, cls.KIND, image, dage_model, resolution)
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))


class MegaSRDageHED(_DageMapNode):
    KIND = "hed"
    WHERE = "MegaSR DAGE HED"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _map_schema(
            "MegaSRDageHED",
            cls.WHERE,
            cls.KIND,
            "Extracts a soft edge map from the LR image with the degradation-aware HED extractor (DAGE), for "
            "MS-GAM Guidance Fusion's hed input. Shows the map as a preview.",
            "HED edge map at the input size: white edges on black, 0..1.",
        )


class MegaSRDageDepth(_DageMapNode):
    KIND = "depth"
    WHERE = "MegaSR DAGE Depth"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _map_schema(
            "MegaSRDageDepth",
            cls.WHERE,
            cls.KIND,
            "Estimates relative depth of the LR image with the degradation-aware Depth-Anything-V2 extractor "
            "(DAGE), for MS-GAM Guidance Fusion's depth input. Shows the map as a preview.",
            "Depth map at the input size: relative inverse depth, near = bright, normalised to 0..1 per image.",
        )


class MegaSRDageSegmentation(_DageMapNode):
    KIND = "seg"
    WHERE = "MegaSR DAGE Segmentation"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _map_schema(
            "MegaSRDageSegmentation",
            cls.WHERE,
            cls.KIND,
            "Segments the LR image into the 150 ADE20K classes with the degradation-aware segmentation extractor "
            "(DAGE), for MS-GAM Guidance Fusion's seg input. Shows the map as a preview.",
            "Segmentation map at the input size in the ADE20K colour palette (one colour per class).",
        )


DAGE_NODES: list[type[io.ComfyNode]] = [MegaSRDageLoader, MegaSRDageHED, MegaSRDageDepth, MegaSRDageSegmentation]

__all__ = ["DAGE_NODES", "MegaSRDageDepth", "MegaSRDageHED", "MegaSRDageLoader", "MegaSRDageSegmentation"]
