"""MegaSR model loader."""

from __future__ import annotations

from ..megasr.errors import MegaSRInputError, WeightFileError
from ..megasr.model_io import load_megasr_model
from ..megasr.weights import read_weight_header
from .api import io
from .common import CATEGORY, MegaSRModelType
from .runtime.folders import missing_weight_problem, resolve_weight_file, weight_files
from .runtime.models import ManagedModel, compute_dtype, layer_operations, make_patcher, model_dtype


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
        patchers = []
        try:
            info = read_weight_header(path)
            storage = model_dtype(info.num_parameters)
            # built with casting layers: stored as model management chooses (fp32/fp16/bf16/fp8), computed in
            # what the device supports; the patcher exists before the weights so it can ask for assign-loading
            model = load_megasr_model(
                path,
                dtype=storage,
                operations=layer_operations(),
                owner=lambda m: patchers.append(make_patcher(m, core=True)) or patchers[-1],
            )
        except WeightFileError as e:
            raise MegaSRInputError(where, "megasr_name", e.problem) from e
        managed = ManagedModel(
            patchers[0], "megasr", megasr_name, {"base": model.config.base()}, compute_dtype=compute_dtype(storage)
        )
        return io.NodeOutput(managed)
