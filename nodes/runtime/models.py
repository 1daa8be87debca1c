"""Pack models under ComfyUI's model management: dtypes, layer classes, patchers and ``ManagedModel``."""

from __future__ import annotations

from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import torch

from .compat import storage_kwargs

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
