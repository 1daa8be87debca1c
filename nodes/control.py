"""The MS-GAM conditioning: a ComfyUI ``ControlBase`` subclass that runs the MegaSR ControlNet.

Lifecycle contract (as ComfyUI drives every ControlBase):
- ``set_cond_hint`` stores the LR image; ``copy()`` gives each conditioning entry its own instance that
  shares the managed MegaSR model and the (read-only) maps;
- ``pre_run`` picks up the model's sampling object; ``get_models`` hands the MegaSR patcher to model
  management (it is loaded with the U-Net); ``cleanup`` drops per-run caches;
- ``previous_controlnet`` is always evaluated first and merged, so it stacks with other ControlNets;
- ``get_control`` also writes the per-call :class:`MegaSRRuntime` into ``transformer_options`` for the
  U-Net patches installed by the CISM² node, reading the image semantics that node put there.
"""

from __future__ import annotations

import copy

import comfy.controlnet
import comfy.utils
import torch

from ..megasr.adapter_comfy import RUNTIME_KEY, SEMANTICS_KEY, MegaSRRuntime
from ..megasr.extension import expand_batch
from ..megasr.tiling import crop_fraction


class MissingSemanticsError(RuntimeError):
    pass


def crop_control_chain(control, crop: tuple[float, float, float, float]):
    """Copies of a ControlNet chain that see only ``crop`` of their hints (tiled sampling).

    MegaSR controls crop the LR hint and the guidance maps; any other ControlBase gets its
    ``cond_hint_original`` cropped, so a stacked core ControlNet stays aligned with the tile.
    """
    if control is None:
        return None
    c = control.copy()
    if isinstance(control, MegaSRControl):
        c.crop = crop
    elif (
        isinstance(getattr(control, "cond_hint_original", None), torch.Tensor) and control.cond_hint_original.ndim == 4
    ):
        c.cond_hint_original = crop_fraction(control.cond_hint_original, crop)
    c.previous_controlnet = crop_control_chain(control.previous_controlnet, crop)
    return c


class SemanticsBinding:
    """What the CISM² node puts into ``transformer_options``: semantics + strengths + owning model, and the
    patched U-Net's frozen cross-attentions (block key -> callable) for the ControlNet's image path."""

    def __init__(
        self,
        semantics,
        owner_id: int,
        strength: float,
        level_strengths: tuple[float, ...],
        image_attention: dict | None = None,
    ) -> None:
        self.semantics = semantics
        self.owner_id = owner_id
        self.strength = strength
        self.level_strengths = level_strengths
        self.image_attention = image_attention

    def for_region(self, crop: tuple[float, float, float, float]) -> SemanticsBinding:
        """The same binding with the semantics of the region ``crop`` (tiled sampling)."""
        return SemanticsBinding(
            self.semantics.for_region(crop), self.owner_id, self.strength, self.level_strengths, self.image_attention
        )

    def __deepcopy__(self, memo: dict) -> SemanticsBinding:
        return self


class MegaSRControl(comfy.controlnet.ControlBase):
    def __init__(
        self,
        megasr,
        maps: dict,
        map_strengths: dict,
        crop: tuple[float, float, float, float] | None = None,
        drop_semantics: bool = False,
    ):
        super().__init__()
        self.megasr = megasr  # nodes.common.ManagedModel
        self.maps = maps  # name -> [B, C, H, W] float 0..1 (hed 1 ch, depth 1 ch, seg 3 ch) or absent
        self.map_strengths = map_strengths  # hed / depth / seg / msgam
        self.crop = crop  # (top, left, bottom, right) fractions for tiled sampling
        self.drop_semantics = drop_semantics  # multimodal CFG: this branch runs without CISM² semantics
        self.model_sampling_current = None
        self._cache = None
        self._ctx = None  # (key, GuidanceContext): constant over the steps of one run

    # --- lifecycle ---------------------------------------------------------------------------
    def copy(self) -> MegaSRControl:
        c = MegaSRControl(self.megasr, self.maps, self.map_strengths, self.crop, self.drop_semantics)
        self.copy_to(c)
        return c

    def get_models(self):
        return super().get_models() + [self.megasr.patcher]

    def deepclone_multigpu(self, load_device, autoregister: bool = False) -> MegaSRControl:
        """A copy whose MegaSR model is a deep copy managed for ``load_device`` (multi-GPU sampling in the newest
        ComfyUI asks every ControlBase for this). It keeps the original's owner id, so the U-Net patches and the
        CISM² binding still recognise it as the same MegaSR model."""
        from .common import ManagedModel, make_patcher

        src = self.megasr
        module = copy.deepcopy(src.module)
        managed = ManagedModel(
            make_patcher(module, load_device),
            src.kind,
            src.filename,
            dict(src.info),
            compute_dtype=src.compute_dtype,
            owner_id=src.owner_id,
        )
        c = MegaSRControl(managed, self.maps, self.map_strengths, self.crop)
        self.copy_to(c)
        if autoregister:
            clones = getattr(self, "multigpu_clones", None)
            if clones is None:  # ComfyUI 0.3.75's ControlBase has no multi-GPU registry
                clones = self.multigpu_clones = {}
            clones[load_device] = c
        return c

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling

    def cleanup(self):
        self.model_sampling_current = None
        self._cache = None
        self._ctx = None
        super().cleanup()

    # --- per call ----------------------------------------------------------------------------
    def _crop(self, x: torch.Tensor) -> torch.Tensor:
        return crop_fraction(x, self.crop)

    def _prepared(self, size: tuple[int, int], device, dtype) -> dict:
        key = (size, device, dtype)
        if self._cache is None or self._cache[0] != key:

            def prep(x, mode):  # float32 throughout; cast once where the model takes it
                x = self._crop(x.to(device=device, dtype=torch.float32))
                return comfy.utils.common_upscale(x, size[1], size[0], mode, "disabled")

            out = {"hint": prep(self.cond_hint_original, "bicubic").clamp(0, 1)}
            for name, m in self.maps.items():
                out[name] = prep(m, "nearest-exact" if name == "seg" else "bilinear")
            self._cache = (key, out)
        return self._cache[1]

    def _context(self, model, binding, tokens, prepared, latent_hw, device, dtype):
        """The guidance context, built once per run (connector, MS-GAM stage 1, SAFT modulations).

        ``prepared`` None: outside start/end percent, where every map is absent (its null map).
        """
        key = (latent_hw, device, dtype, id(binding), prepared is None)
        if self._ctx is None or self._ctx[0] != key:
            s = self.map_strengths
            maps = prepared or {}
            ctx = model.prepare_context(
                latent_hw,
                None if self.drop_semantics else tokens,
                maps.get("hed"),
                maps.get("depth"),
                maps.get("seg"),
                cism_strength=binding.strength,
                level_strengths=binding.level_strengths,
                msgam_strength=s.get("msgam", 1.0),
                hed_strength=s.get("hed", 1.0),
                depth_strength=s.get("depth", 1.0),
                seg_strength=s.get("seg", 1.0),
                image_attention=binding.image_attention,
                step_invariant=True,
                dtype=dtype,
            )
            self._ctx = (key, ctx)
        return self._ctx[1]

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)

        binding = transformer_options.get(SEMANTICS_KEY)
        if binding is None:
            raise MissingSemanticsError(
                "MegaSR MS-GAM Guidance Fusion: the MODEL was not patched by 'MegaSR CISM² Semantic Injection'. "
                "Connect the MODEL through that node (with the same MegaSR model) before the sampler."
            )
        model = self.megasr.module
        owner = self.megasr.owner_id
        if binding.owner_id != owner:
            raise MissingSemanticsError(
                "MegaSR: the CISM² node and the MS-GAM node use different MegaSR models; connect one MegaSR "
                "Model Loader to both."
            )
        dtype = self.megasr.dtype  # compute dtype (storage may be fp16/bf16/fp8: the layers cast)
        device = x_noisy.device
        latent_hw = tuple(x_noisy.shape[-2:])
        tokens = binding.semantics.tokens.to(device=device) if binding.semantics is not None else None

        active = self.timestep_range is None or not (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1])
        if not active:
            ctx = self._context(model, binding, tokens, None, latent_hw, device, dtype)
            transformer_options[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, owner)
            return control_prev

        prepared = self._prepared((latent_hw[0] * 8, latent_hw[1] * 8), device, dtype)
        ctx = self._context(model, binding, tokens, prepared, latent_hw, device, dtype)
        transformer_options[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, owner)

        batch = x_noisy.shape[0]
        hint = expand_batch(prepared["hint"], batch).to(dtype)
        timestep = self.model_sampling_current.timestep(t).to(dtype)
        x_in = self.model_sampling_current.calculate_input(t, x_noisy).to(dtype)
        context = cond.get("crossattn_controlnet", cond["c_crossattn"]).to(device=device, dtype=dtype)
        down, mid = model.controlnet_residuals(x_in, timestep, context, hint, ctx)
        return self.control_merge({"output": list(down), "middle": [mid]}, control_prev, output_dtype=None)
