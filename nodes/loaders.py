"""MegaSR model loader."""

from __future__ import annotations

import os

from ..megasr.errors import MegaSRInputError, SeeSRError, WeightFileError
from ..megasr.model_io import build_megasr_model, read_megasr_file
from ..megasr.seesr_weights import seesr_folder_state
from .api import io
from .common import CATEGORY, MegaSRModelType
from .runtime.compat import set_reload_factory
from .runtime.folders import (
    is_seesr_folder_choice,
    megasr_model_choices,
    missing_weight_problem,
    resolve_seesr_folder,
    resolve_weight_file,
    seesr_folder_problem_of,
)
from .runtime.models import ManagedModel, compute_dtype, layer_operations, make_patcher, model_dtype

WHERE = "MegaSR Model Loader"


def megasr_patcher(path: str, disable_dynamic: bool = False):
    """A model patcher owning a MegaSR model freshly loaded from ``path``: a MegaSR weight file, or a SeeSR folder
    (``unet/`` + ``controlnet/``) converted in memory exactly as ``python -m megasr convert-seesr`` converts it.

    Built with casting layers: stored as model management chooses (fp32/fp16/bf16/fp8), computed in what the
    device supports; the patcher exists before the weights so it can ask for assign-loading. It is also the
    loader factory the newest ComfyUI calls to re-create the model (``cached_patcher_init``: multi-GPU clones of
    the patched MODEL, whose additional models hold it; ``disable_dynamic`` asks for a plain ``ModelPatcher``).
    """
    folder = os.path.isdir(path)
    state, config = seesr_folder_state(path) if folder else read_megasr_file(path)
    storage = model_dtype(sum(v.numel() for v in state.values()))
    patchers = []
    weight_paths = None if folder else [path]  # the newest ComfyUI's fast_disk policy is about files
    build_megasr_model(
        state,
        config,
        path,
        dtype=storage,
        operations=layer_operations(),
        owner=lambda m: (
            patchers.append(make_patcher(m, core=not disable_dynamic, weight_paths=weight_paths)) or patchers[-1]
        ),
    )
    set_reload_factory(patchers[0], megasr_patcher, path)
    return patchers[0]


class MegaSRModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRModelLoader",
            display_name="MegaSR Model Loader",
            category=CATEGORY,
            description=(
                "Loads a MegaSR weight file (ControlNet + CISM² + MS-GAM) from models/megasr, or a SeeSR folder "
                "placed there (SeeSR's published unet/ + controlnet/, listed as 'name/'; converted in memory as "
                "python -m megasr convert-seesr does). The file kind is read from its metadata; ComfyUI's model "
                "management loads and offloads it with the U-Net."
            ),
            inputs=[
                io.Combo.Input(
                    "megasr_name",
                    options=megasr_model_choices(),
                    tooltip="A MegaSR weight file (component 'controlnet') in models/megasr, or a SeeSR folder "
                    "('name/': unet/ and controlnet/ as SeeSR publishes them).",
                ),
            ],
            outputs=[
                MegaSRModelType.Output(
                    display_name="megasr_model",
                    tooltip="The MegaSR model; connect it to CISM² Semantic Injection and MS-GAM Guidance Fusion.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, megasr_name) -> bool | str:
        """A missing file fails validation with what it is and how to make it (ComfyUI then reports every
        missing file of the graph at once instead of one per run)."""
        if is_seesr_folder_choice(megasr_name):
            problem = seesr_folder_problem_of(megasr_name)
            return f"{WHERE}: megasr_name: {problem}" if problem else True
        return missing_weight_problem(megasr_name) or True

    @classmethod
    def execute(cls, megasr_name) -> io.NodeOutput:
        where = WHERE
        if is_seesr_folder_choice(megasr_name):
            path = resolve_seesr_folder(where, "megasr_name", megasr_name)
        else:
            path = resolve_weight_file(where, "megasr_name", megasr_name)
        try:
            patcher = megasr_patcher(path)
        except WeightFileError as e:
            raise MegaSRInputError(where, "megasr_name", e.problem) from e
        except SeeSRError as e:
            raise MegaSRInputError(where, "megasr_name", str(e)) from e
        storage = model_dtype(sum(v.numel() for v in patcher.model.state_dict().values()))  # as megasr_patcher
        managed = ManagedModel(
            patcher, "megasr", megasr_name, {"base": patcher.model.config.base()}, compute_dtype=compute_dtype(storage)
        )
        return io.NodeOutput(managed)
