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

from ...megasr.adapter_comfy import RUNTIME_KEY, SEMANTICS_KEY, MegaSRRuntime
from ...megasr.layers import expand_batch
from ...megasr.tiling import Canvas, Tile, stack_tiles, to_canvas

# Prepared hint sets (and guidance contexts) one MegaSR control keeps, by latent size and tile layout: two, like
# the newest core ControlNet's ``cond_hints``, covers area composition (two sizes alternating); the MegaSR
# Sampler's tiles give each cropped copy a single size. More sizes than this only recompute, never mix.
HINT_CACHE_SIZES = 2
# Per-instance caches of prepared inputs: a crop must never share them with the uncropped control it copies
# (``cond_hints``/``control_inputs``: the newest ControlBase's, keyed by latent size only; ``multigpu_clones``:
# uncropped per-device copies; ``cond_hint``: 0.3.75's single prepared hint).
_PREPARED = ("cond_hint", "cond_hints", "control_inputs", "multigpu_clones", "_hints", "_ctx")


class MissingSemanticsError(RuntimeError):
    pass


def crop_control_chain(control, canvas: Canvas, group: list[Tile], batch: int, shared: dict):
    """Copies of a ControlNet chain that see only the tiles of ``group`` of their hints (stacked tile-major).

    Every hint is first laid out on the canvas exactly like the VAE latent's source (resized to the
    output size, replicate-padded to a multiple of 8), then cut per tile: MegaSR controls do that for the
    LR hint and every guidance map; any other ControlBase with an image hint gets its
    ``cond_hint_original`` replaced by the stacked crops (ComfyUI then resizes them by a factor of 1).
    ``shared`` holds the canvas-sized hints for one sampling run (keyed by the original control).
    """
    if control is None:
        return None
    c = control.copy()
    # The copy is made during sampling, after ComfyUI's pre_run: carry what pre_run set on the original
    # (timestep_range, model_sampling_current, a ControlLora's built model, ...), never the sized hint.
    fresh = vars(c)
    for k, v in vars(control).items():
        if k not in _PREPARED and k != "previous_controlnet" and fresh.get(k) is None and v is not None:
            setattr(c, k, v)
    if isinstance(control, MegaSRControl):
        c.canvas, c.group, c.batch, c.shared, c.source_id = canvas, list(group), batch, shared, id(control)
    elif (
        isinstance(getattr(control, "cond_hint_original", None), torch.Tensor)
        and control.cond_hint_original.ndim == 4
        and getattr(control, "compression_ratio", 8) == 8
        and getattr(control, "vae", None) is None
    ):
        key = ("core", id(control))
        if key not in shared:
            hint = control.cond_hint_original.to(torch.float32)
            shared[key] = to_canvas(hint, canvas, getattr(control, "upscale_algorithm", "nearest-exact"))
        c.cond_hint_original = stack_tiles(shared[key], group, batch)
        c.cond_hint = None
        if isinstance(getattr(c, "cond_hints", None), dict):  # a copy() that shares it would serve the uncropped hint
            c.cond_hints = {}
    c.previous_controlnet = crop_control_chain(control.previous_controlnet, canvas, group, batch, shared)
    # newest ComfyUI's multi-GPU sampling asks the control it is handed (this crop) for its per-device instance
    clones = getattr(control, "multigpu_clones", None)
    if clones:
        c.multigpu_clones = {d: crop_control_chain(dc, canvas, group, batch, shared) for d, dc in clones.items()}
    return c


def unet_compute_dtype(model) -> torch.dtype:
    """The dtype a ComfyUI MODEL's U-Net computes in (its manual-cast dtype, else its weight dtype)."""
    base = model.model
    return base.manual_cast_dtype or base.get_dtype()


def attention_in_dtype(image_attention: dict, dtype: torch.dtype, caller_dtype: torch.dtype) -> dict:
    """The U-Net's frozen cross-attentions as the MegaSR ControlNet calls them (its CISM² image path).

    When the U-Net computes in another dtype than the MegaSR model (an fp16 U-Net beside an fp32 MegaSR file,
    or the reverse), a U-Net layer without casting (ComfyUI's default on a GPU) refuses the other dtype: the
    query and the image tokens are cast to the U-Net's compute dtype and the result back to the caller's. Same
    dtypes: the callables are handed over unchanged."""
    if dtype == caller_dtype:
        return image_attention
    return {key: _AttentionInDtype(a, dtype) for key, a in image_attention.items()}


class _AttentionInDtype:
    """``attention`` called in ``dtype``, its result in the caller's; keeps the split halves (``project`` /
    ``attend``, for the once-per-run image K/V of ``megasr.extension.image_attention``) when it has them."""

    def __init__(self, attention, dtype: torch.dtype) -> None:
        self.attention = attention
        self.dtype = dtype
        if hasattr(attention, "project"):
            self.key = attention.key
            self.project = self._project
            self.attend = self._attend

    def __call__(self, q: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.attention(q.to(self.dtype), tokens.to(self.dtype)).to(q.dtype)

    def _project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attention.project(tokens.to(self.dtype))

    def _attend(self, n: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attention.attend(n.to(self.dtype), k, v).to(n.dtype)


class SemanticsBinding:
    """What the CISM² node puts into ``transformer_options``: semantics + strengths + owning model, the
    patched U-Net's frozen cross-attentions (block key -> callable) for the ControlNet's image path, and the RAM/DAPE
    representation tokens [B, N, 512] of SeeSR's branch (None: the model has no branch). The representation tokens
    describe the whole image (as in SeeSR): every tile gets the same ones."""

    def __init__(
        self,
        semantics,
        owner_id: int,
        strength: float,
        level_strengths: tuple[float, ...],
        image_attention: dict | None = None,
        representation: torch.Tensor | None = None,
    ) -> None:
        self.semantics = semantics
        self.owner_id = owner_id
        self.strength = strength
        self.level_strengths = level_strengths
        self.image_attention = image_attention
        self.representation = representation

    def with_semantics(self, semantics) -> SemanticsBinding:
        """The same binding (strengths, attention, representation tokens) with other CISM² semantics (a tile's)."""
        return SemanticsBinding(
            semantics, self.owner_id, self.strength, self.level_strengths, self.image_attention, self.representation
        )

    def for_region(self, crop: tuple[float, float, float, float]) -> SemanticsBinding:
        """The same binding with the semantics of the region ``crop`` (tiled sampling)."""
        return self.with_semantics(self.semantics.for_region(crop))

    def __deepcopy__(self, memo: dict) -> SemanticsBinding:
        return self


def _remember(cache: dict, key, value) -> None:
    """Keep ``value`` under ``key``, dropping the oldest entries beyond ``HINT_CACHE_SIZES``."""
    if HINT_CACHE_SIZES <= 0:
        return
    while len(cache) >= HINT_CACHE_SIZES:
        cache.pop(next(iter(cache)))
    cache[key] = value


class MegaSRControl(comfy.controlnet.ControlBase):
    def __init__(self, megasr, maps: dict, map_strengths: dict, drop_semantics: bool = False):
        super().__init__()
        self.megasr = megasr  # nodes.runtime.models.ManagedModel
        self.maps = maps  # name -> [B, C, H, W] float 0..1 (hed 1 ch, depth 1 ch, seg 3 ch) or absent
        self.map_strengths = map_strengths  # hed / depth / seg / msgam
        self.drop_semantics = drop_semantics  # multimodal CFG: this branch runs without CISM² semantics
        # Set by the MegaSR Sampler's tiling (crop_control_chain): the canvas layout, this copy's tiles,
        # the latent batch, the run's shared canvas-sized hints and the original control's id.
        self.canvas: Canvas | None = None
        self.group: list[Tile] = []
        self.batch = 1
        self.shared: dict = {}
        self.source_id = id(self)
        self.model_sampling_current = None
        self._hints: dict = {}  # (size, device, dtype, layout) -> prepared hint and maps
        self._ctx: dict = {}  # (latent size, device, dtype, layout, binding, active) -> GuidanceContext (per run)

    # --- lifecycle ---------------------------------------------------------------------------
    def copy(self) -> MegaSRControl:
        c = MegaSRControl(self.megasr, self.maps, self.map_strengths, self.drop_semantics)
        self._copy_to(c)
        return c

    def _copy_to(self, c: MegaSRControl) -> None:
        """ControlBase's fields plus the tiling layout (a copy is the same control for the sampler's tiles)."""
        c.canvas, c.group, c.batch, c.shared = self.canvas, self.group, self.batch, self.shared
        c.source_id = self.source_id
        self.copy_to(c)

    def get_models(self):
        return super().get_models() + [self.megasr.patcher]

    def deepclone_multigpu(self, load_device, autoregister: bool = False) -> MegaSRControl:
        """A copy whose MegaSR model is a deep copy managed for ``load_device`` (multi-GPU sampling in the newest
        ComfyUI asks every ControlBase for this). It keeps the original's owner id, so the U-Net patches and the
        CISM² binding still recognise it as the same MegaSR model."""
        from .models import ManagedModel, make_patcher

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
        c = MegaSRControl(managed, self.maps, self.map_strengths, self.drop_semantics)
        self._copy_to(c)
        if autoregister:
            clones = getattr(self, "multigpu_clones", None)
            if clones is None:  # ComfyUI 0.3.75's ControlBase has no multi-GPU registry
                clones = self.multigpu_clones = {}
            clones[load_device] = c
        return c

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.model_sampling

    def set_cond_hint(self, *args, **kwargs) -> MegaSRControl:
        self._hints.clear()  # prepared from the previous hint (the newest ControlBase clears its own cache too)
        self._ctx.clear()
        return super().set_cond_hint(*args, **kwargs)

    def cleanup(self):
        self.model_sampling_current = None
        self._hints.clear()
        self._ctx.clear()
        super().cleanup()

    def _layout(self) -> tuple:
        """What the prepared hints depend on besides the call's size, device and dtype."""
        return (self.canvas, tuple(self.group), self.batch)

    # --- per call ----------------------------------------------------------------------------
    def _canvas_maps(self) -> dict:
        """Hint and maps laid out on the canvas (float32, intermediate device), once per sampling run."""
        key = ("megasr", self.source_id)
        if key not in self.shared:
            out = {"hint": to_canvas(self.cond_hint_original.float(), self.canvas, "bicubic").clamp(0, 1)}
            for name, m in self.maps.items():
                out[name] = to_canvas(m.float(), self.canvas, "nearest-exact" if name == "seg" else "bilinear")
            self.shared[key] = out
        return self.shared[key]

    def _prepared(self, size: tuple[int, int], device, dtype) -> dict:
        key = (tuple(size), str(device), dtype, self._layout())
        out = self._hints.get(key)
        if out is None:
            if self.canvas is not None:  # MegaSR Sampler: pixel-exact crops of the canvas layout
                out = {n: stack_tiles(v, self.group, self.batch).to(device) for n, v in self._canvas_maps().items()}
            else:  # another sampler: the output size is unknown, so hint and maps are stretched to the latent

                def prep(x, mode):  # float32 throughout; cast once where the model takes it
                    x = x.to(device=device, dtype=torch.float32)
                    return comfy.utils.common_upscale(x, size[1], size[0], mode, "disabled")

                out = {"hint": prep(self.cond_hint_original, "bicubic").clamp(0, 1)}
                for name, m in self.maps.items():
                    out[name] = prep(m, "nearest-exact" if name == "seg" else "bilinear")
            _remember(self._hints, key, out)
        return out

    def _context(self, model, binding, tokens, prepared, latent_hw, device, dtype):
        """The guidance context, built once per run (connector, MS-GAM stage 1, SAFT modulations).

        ``prepared`` None: outside start/end percent, where every map is absent (its null map).
        """
        key = (latent_hw, str(device), dtype, self._layout(), binding, prepared is None)
        ctx = self._ctx.get(key)
        if ctx is None:
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
                # SeeSR's branch reads RAM's tokens for cond and uncond alike (its pipeline repeats them for CFG)
                representation_tokens=binding.representation,
            )
            _remember(self._ctx, key, ctx)
        return ctx

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
