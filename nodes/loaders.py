"""MegaSR model loader."""

from __future__ import annotations

from ..megasr.errors import MegaSRInputError, WeightFileError
from ..megasr.model_io import load_megasr_model
from ..megasr.weights import read_weight_header
from .api import io
from .common import CATEGORY, MegaSRModelType
from .runtime.compat import set_reload_factory
from .runtime.folders import missing_weight_problem, resolve_weight_file, weight_files
from .runtime.models import ManagedModel, compute_dtype, layer_operations, make_patcher, model_dtype


def megasr_patcher(path: str, disable_dynamic: bool = False):
    """A model patcher owning a MegaSR model freshly loaded from ``path``.

    Built with casting layers: stored as model management chooses (fp32/fp16/bf16/fp8), computed in what the
    device supports; the patcher exists before the weights so it can ask for assign-loading. It is also the
    loader factory the newest ComfyUI calls to re-create the model (``cached_patcher_init``: multi-GPU clones of
    the patched MODEL, whose additional models hold it; ``disable_dynamic`` asks for a plain ``ModelPatcher``).
    """
    storage = model_dtype(read_weight_header(path).num_parameters)
    patchers = []
    load_megasr_model(
        path,
        dtype=storage,
        operations=layer_operations(),
        owner=lambda m: patchers.append(make_patcher(m, core=not disable_dynamic, weight_paths=[path])) or patchers[-1],
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
                "Loads a MegaSR weight file (ControlNet + CISM² + MS-GAM) from models/megasr. The file kind is "
                "read from its metadata; ComfyUI's model management loads and offloads it with the U-Net."
            ),
            inputs=[
                io.Combo.Input(
                    "megasr_name",
                    options=weight_files(),
                    tooltip="A MegaSR weight file (component 'controlnet') in models/megasr.",
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
        return missing_weight_problem(megasr_name) or True

    @classmethod
    def execute(cls, megasr_name) -> io.NodeOutput:
        where = "MegaSR Model Loader"
        path = resolve_weight_file(where, "megasr_name", megasr_name)
        try:
            storage = model_dtype(read_weight_header(path).num_parameters)
            patcher = megasr_patcher(path)
        except WeightFileError as e:
            raise MegaSRInputError(where, "megasr_name", e.problem) from e
        managed = ManagedModel(
            patcher, "megasr", megasr_name, {"base": patcher.model.config.base()}, compute_dtype=compute_dtype(storage)
        )
        return io.NodeOutput(managed)
