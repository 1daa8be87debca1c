"""Shared node plumbing: the pack's custom types, model folders and managed-model holders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
import torch

from ..megasr.errors import MegaSRInputError, WeightFileError
from ..megasr.manifest import describe_missing, find_file
from ..megasr.weights import ensure_weight_file, hub_offline
from .api import io
from .compat import storage_kwargs

MEGASR_FOLDER = "megasr"
CATEGORY = "MegaSR"

MegaSRModelType = io.Custom("MEGASR_MODEL")
SemanticsType = io.Custom("MEGASR_SEMANTICS")
DageModelType = io.Custom("MEGASR_DAGE")


def register_model_folder() -> None:
    """``models/megasr`` (plus any ``megasr:`` entry of extra_model_paths.yaml, which ComfyUI adds itself)."""
    default = os.path.join(folder_paths.models_dir, MEGASR_FOLDER)
    known = folder_paths.folder_names_and_paths.get(MEGASR_FOLDER)
    if known is None or default not in known[0]:
        folder_paths.add_model_folder_path(MEGASR_FOLDER, default)
    exts = folder_paths.folder_names_and_paths[MEGASR_FOLDER][1]
    if isinstance(exts, set):  # a `megasr:` entry of extra_model_paths.yaml may have made it with other extensions
        exts.add(".safetensors")


def strength_input(name: str, tooltip: str) -> io.Float.Input:
    """A 0..3 strength (default 1): the one range every MegaSR weight/strength widget uses."""
    return io.Float.Input(name, default=1.0, min=0.0, max=3.0, step=0.05, tooltip=tooltip)


def weight_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(MEGASR_FOLDER) if f.endswith(".safetensors")]


def _present(filename: str) -> bool:
    path = folder_paths.get_full_path(MEGASR_FOLDER, filename) if filename else None
    return path is not None and os.path.isfile(path)


def downloadable(filename: str) -> bool:
    """Whether the model manifest has a public source for ``filename`` of the megasr folder."""
    found = find_file(MEGASR_FOLDER, filename) if filename else None
    return found is not None and found[0].public


def missing_weight_problem(filename: str | None, download_missing: bool | None = None) -> str | None:
    """Why ``filename`` cannot be loaded from the megasr folders (what it is and how to get it, from the model
    manifest), or None when it is there. Used at validation, so ComfyUI lists every missing file of a graph at
    once, and again at run time. ``download_missing`` is the node's opt-in for this input (None: the input has
    none): when true, a file the manifest has a public source for is no problem (it is downloaded when the node
    runs) unless huggingface_hub is offline; when false, the message points at the option."""
    if not isinstance(filename, str):  # fed by a link: known only at run time
        return None
    if _present(filename):
        return None
    problem = describe_missing(MEGASR_FOLDER, filename, folder_paths.get_folder_paths(MEGASR_FOLDER))
    if download_missing is None or not downloadable(filename):
        return problem
    if not download_missing:
        return problem + "; or set download_missing to true on this node to download it when the node runs"
    if hub_offline():
        return (
            problem
            + "; download_missing is on, but huggingface_hub is offline (HF_HUB_OFFLINE): nothing can be downloaded"
        )
    return None


def download_weight_file(where: str, name: str, filename: str) -> str:
    """The opt-in download-on-missing path (the only network access of the nodes): fetch a manifest file with a
    public source into the first megasr folder through ``ensure_weight_file`` (resumable, size/sha256-checked
    where the manifest knows them, atomic; huggingface_hub's offline mode and endpoint apply)."""
    entry, f = find_file(MEGASR_FOLDER, filename)
    folder = folder_paths.get_folder_paths(MEGASR_FOLDER)[0]
    if entry.subfolder:
        folder = os.path.join(folder, entry.subfolder)
    try:
        return ensure_weight_file(
            folder,
            f.name,
            entry.repo_id,
            f.sha256,
            allow_download=True,
            revision=entry.revision,
            repo_file=f.repo_file,
            size_bytes=f.size_bytes,
        )
    except WeightFileError as e:
        raise MegaSRInputError(where, name, e.problem) from e


def resolve_weight_file(where: str, name: str, filename: str, download_missing: bool = False) -> str:
    """The path of a megasr-folder file; missing, it is downloaded when allowed and public, else refused."""
    if download_missing and not _present(filename) and downloadable(filename):
        return download_weight_file(where, name, filename)
    problem = missing_weight_problem(filename)
    if problem is not None:
        raise MegaSRInputError(where, name, problem)
    return folder_paths.get_full_path(MEGASR_FOLDER, filename)


SUPPORTED_COMPUTE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def model_dtype(params: int) -> torch.dtype:
    """Storage dtype for a U-Net-side model, as model management picks it for the U-Net (fp32/fp16/bf16/fp8)."""
    device = comfy.model_management.get_torch_device()
    return comfy.model_management.unet_dtype(
        device=device, model_params=params, supported_dtypes=SUPPORTED_COMPUTE_DTYPES
    )


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype a model stored in ``storage`` computes in on the load device (ComfyUI's manual cast rule)."""
    device = comfy.model_management.get_torch_device()
    cast = comfy.model_management.unet_manual_cast(storage, device, SUPPORTED_COMPUTE_DTYPES)
    return storage if cast is None else cast


def layer_operations():
    """The layer classes the pack's own modules are built from (see megasr/layers.py): casting layers, so the
    weights may be stored in another dtype than the compute one and be partially loaded under lowvram."""
    return comfy.ops.manual_cast


def patcher_class() -> type:
    """The patcher class core loaders use: ``CoreModelPatcher`` where it exists (the newest ComfyUI sets it to
    its dynamic-VRAM patcher at start-up, so it is read at call time), ``ModelPatcher`` on 0.3.75."""
    return getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)


def make_patcher(
    module: torch.nn.Module,
    load_device: torch.device | None = None,
    core: bool = False,
    weight_paths: list[str] | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """Hand a module to ComfyUI's model management (it decides where it lives).

    ``core``: the module is built from ``comfy.ops`` layers (the MegaSR model), so it gets the class core loaders
    use (dynamic VRAM in the newest ComfyUI streams such layers). Modules of other libraries (the DAGE extractors:
    transformers / controlnet_aux layers) get a plain ``ModelPatcher``, as core does for its multi-GPU clones.
    ``weight_paths``: the files the weights were read from (the newest ComfyUI's ``fast_disk`` policy).
    """
    cls = patcher_class() if core else comfy.model_patcher.ModelPatcher
    return cls(
        module,
        load_device=load_device or comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
        **storage_kwargs(cls, weight_paths),
    )


def is_dynamic(patcher) -> bool:
    """Whether the patcher wants state dicts assigned rather than copied (newest ComfyUI's dynamic VRAM)."""
    method = getattr(patcher, "is_dynamic", None)
    return bool(method()) if callable(method) else False


@dataclass(eq=False)
class ManagedModel:
    """A pack model owned by a ModelPatcher: what MEGASR_MODEL / MEGASR_DAGE values carry."""

    patcher: comfy.model_patcher.ModelPatcher
    kind: str
    filename: str
    info: dict = field(default_factory=dict)
    compute_dtype: torch.dtype | None = None  # None: compute in the storage dtype
    owner_id: int = 0  # identity shared by copies on other devices (multi-GPU clones); 0 = id(module)

    def __post_init__(self) -> None:
        if not self.owner_id:
            self.owner_id = id(self.patcher.model)

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    @property
    def dtype(self) -> torch.dtype:
        """The dtype inputs are cast to before they meet this model's layers."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return next(self.module.parameters()).dtype

    def load(self) -> torch.device:
        """Ask model management to put the module on its device; returns that device."""
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.load_device

    def __deepcopy__(self, memo: dict) -> ManagedModel:
        return self
