"""SeeSR's representation branch: a second transformer after every text transformer, reading RAM tokens.

SeeSR (Wu et al., CVPR 2024, Apache-2.0; layout read from cswry/SeeSR@8edecc7 ``models/unet_2d_blocks.py``) gives
each cross-attention block of its U-Net and ControlNet (down, mid, up; the ControlNet has no up blocks) a list
``image_attentions`` beside ``attentions``: the j-th entry is a diffusers ``Transformer2DModel`` built with the same
arguments as ``attentions[j]`` (heads, head width, depth, GroupNorm groups, linear projection, upcast) except
``cross_attention_dim`` = 512, the width of RAM's representation tokens (``image_proj(visual_encoder(x))``). In
every block it runs right after ``attentions[j]`` on that transformer's output (GroupNorm, projection, self- and
cross-attention, GEGLU feed-forward, projection, residual), before anything else touches the hidden state. The
tokens are the same for cond and uncond (SeeSR's pipeline concatenates them twice for CFG).

Here, with our own code and SeeSR's key names:

- :func:`branch_specs`: where the branch sits in a diffusers U-Net / ControlNet of a given config;
- :func:`install_into`: adds ``image_attentions`` to a diffusers ``ControlNetModel`` (its state dict then has
  SeeSR's ControlNet keys exactly);
- :class:`RepresentationBranch`: the U-Net's branch on its own (``down_blocks.{i}.image_attentions.{j}``, ...,
  SeeSR's U-Net key names), so the frozen base U-Net stays the user's SD-2 file;
- :func:`attach_diffusers_hooks`: runs the branch after each ``attentions[j]`` of a diffusers model (forward hooks;
  nothing in the model changes);
- :func:`apply_to_comfy_unet`: the same on ComfyUI's ``UNetModel``: an object patch of each ``SpatialTransformer``'s
  ``forward`` (the whole module's output is the point SeeSR reads; ComfyUI has no list patch after a
  ``SpatialTransformer`` inside the middle and output blocks) that calls whatever ``forward`` was there, then the
  branch. The module tree and its weight keys stay ComfyUI's; the branch's weights stay in the MegaSR model,
  which ComfyUI's model management moves like the CISM²/MS-GAM extensions.

The tokens reach every block through the per-call :class:`~megasr.extension.GuidanceContext`
(``representation_tokens``): in diffusers through the adapters' ``guidance(ctx)``, in ComfyUI through
``transformer_options[RUNTIME_KEY].ctx`` -- the same value the ControlNet gets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .layers import retype_layers

#: Width of RAM's representation tokens (``image_proj`` output); SeeSR's ``image_cross_attention_dim``.
REPRESENTATION_DIM = 512
#: SeeSR's name of the branch's module list in each block.
BRANCH_NAME = "image_attentions"


class MissingRepresentationError(RuntimeError):
    pass


@dataclass(frozen=True)
class BranchSpec:
    """One ``image_attentions[index]`` of ``block`` (a diffusers path: ``down_blocks.0``, ``mid_block``, ...)."""

    block: str
    index: int
    dim: int
    heads: int
    depth: int
    only_cross_attention: bool
    key: str  # canonical block key without the transformer index (``down_0_1``), see :mod:`megasr.blocks`

    @property
    def attention_path(self) -> str:
        return f"{self.block}.attentions.{self.index}"

    @property
    def branch_path(self) -> str:
        return f"{self.block}.{BRANCH_NAME}.{self.index}"


def _per_level(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def branch_specs(cfg: dict, include_up: bool = True) -> list[BranchSpec]:
    """The branch's places in a diffusers SD U-Net (or, ``include_up=False``, its ControlNet) of config ``cfg``.

    Heads as diffusers (and SeeSR) read an SD config: ``num_attention_heads`` or else ``attention_head_dim``
    (historically the head count), per level; the up blocks take them in reverse order.
    """
    channels = list(cfg["block_out_channels"])
    n = len(channels)
    nrb = int(cfg["layers_per_block"])
    heads = _per_level(cfg.get("num_attention_heads") or cfg["attention_head_dim"], n)
    depth = _per_level(cfg.get("transformer_layers_per_block", 1), n)
    only_cross = _per_level(cfg.get("only_cross_attention", False), n)
    out: list[BranchSpec] = []
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            for j in range(nrb):
                out.append(
                    BranchSpec(f"down_blocks.{i}", j, channels[i], heads[i], depth[i], only_cross[i], f"down_{i}_{j}")
                )
    if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn":
        out.append(BranchSpec("mid_block", 0, channels[-1], heads[-1], depth[-1], False, "mid_0"))
    if include_up:
        rc, rh, rd, ro = channels[::-1], heads[::-1], depth[::-1], only_cross[::-1]
        for i, kind in enumerate(cfg["up_block_types"]):
            if "CrossAttn" in kind:
                for j in range(nrb + 1):
                    out.append(BranchSpec(f"up_blocks.{i}", j, rc[i], rh[i], rd[i], ro[i], f"up_{i}_{j}"))
    return out


def image_transformer(spec: BranchSpec, cfg: dict, token_dim: int = REPRESENTATION_DIM, operations=None) -> nn.Module:
    """One branch transformer: the text transformer's arguments with ``cross_attention_dim`` = ``token_dim``."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    t = Transformer2DModel(
        num_attention_heads=int(spec.heads),
        attention_head_dim=spec.dim // int(spec.heads),
        in_channels=spec.dim,
        num_layers=int(spec.depth),
        cross_attention_dim=token_dim,
        norm_num_groups=int(cfg.get("norm_num_groups", 32)),
        use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        only_cross_attention=bool(spec.only_cross_attention),
        upcast_attention=bool(cfg.get("upcast_attention", False)),
    )
    return retype_layers(t, operations)


def _lists(specs: Sequence[BranchSpec]) -> dict[str, list[BranchSpec]]:
    by_block: dict[str, list[BranchSpec]] = {}
    for s in specs:
        by_block.setdefault(s.block, []).append(s)
    return by_block


def install_into(model: nn.Module, cfg: dict, specs: Sequence[BranchSpec], token_dim: int, operations=None) -> None:
    """Give each block of ``model`` (a diffusers ``ControlNetModel``) SeeSR's ``image_attentions`` list."""
    for block, items in _lists(specs).items():
        module = model.get_submodule(block)
        if hasattr(module, BRANCH_NAME):
            raise ValueError(f"'{block}' already has {BRANCH_NAME}")
        items = sorted(items, key=lambda s: s.index)
        setattr(module, BRANCH_NAME, nn.ModuleList([image_transformer(s, cfg, token_dim, operations) for s in items]))


class RepresentationBranch(nn.Module):
    """The U-Net's branch alone, under SeeSR's U-Net key names (``down_blocks.0.image_attentions.0.norm.weight``)."""

    def __init__(self, cfg: dict, token_dim: int = REPRESENTATION_DIM, operations=None) -> None:
        super().__init__()
        self.specs = branch_specs(cfg, include_up=True)
        n = len(cfg["block_out_channels"])
        self.down_blocks = nn.ModuleList(nn.Module() for _ in range(n))
        self.mid_block = nn.Module()
        self.up_blocks = nn.ModuleList(nn.Module() for _ in range(len(cfg["up_block_types"])))
        install_into(self, cfg, self.specs, token_dim, operations)


def _run(branch: nn.Module, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return branch(h, encoder_hidden_states=tokens, return_dict=False)[0]


def _tokens(ctx, h: torch.Tensor, where: str) -> torch.Tensor:
    tokens = None if ctx is None else ctx.representation_for(h.shape[0], h.dtype, h.device)
    if tokens is None:
        raise MissingRepresentationError(
            f"MegaSR: this model carries SeeSR's representation branch ({where}) but no RAM representation tokens "
            "were given. Connect the RAM/DAPE tags node's semantics to the MegaSR nodes."
        )
    return tokens


def attach_diffusers_hooks(
    model: nn.Module, root: nn.Module, specs: Sequence[BranchSpec], get_ctx: Callable[[], object]
) -> list:
    """Run ``root.<spec.branch_path>`` after ``model.<spec.attention_path>`` (forward hooks); returns the handles.

    ``get_ctx()`` is the active :class:`~megasr.extension.GuidanceContext`; None = the plain model (no hook effect).
    """
    handles = []
    for spec in specs:
        attention = model.get_submodule(spec.attention_path)
        branch = root.get_submodule(spec.branch_path)

        def hook(module, args, output, branch=branch, where=spec.branch_path):
            ctx = get_ctx()
            if ctx is None:
                return output
            if isinstance(output, tuple):
                h = _run(branch, output[0], _tokens(ctx, output[0], where))
                return (h,) + tuple(output[1:])
            output.sample = _run(branch, output.sample, _tokens(ctx, output.sample, where))
            return output

        handles.append(attention.register_forward_hook(hook))
    return handles


# --- ComfyUI ---------------------------------------------------------------------------------------------------


def comfy_spatial_transformers(diffusion_model: nn.Module) -> dict[str, tuple[str, str]]:
    """Branch key (``down_0_1``) -> (ComfyUI module path, block kind) of each ``SpatialTransformer``."""
    from .blocks import comfy_block_key

    nrb = diffusion_model.num_res_blocks
    nrb = list(nrb) if isinstance(nrb, (list, tuple)) else [nrb]
    if len(set(nrb)) != 1:
        raise ValueError(f"U-Nets with different res blocks per level are not supported: {nrb}")
    groups = [("input", "input_blocks", getattr(diffusion_model, "input_blocks", []))]
    if getattr(diffusion_model, "middle_block", None) is not None:
        groups.append(("middle", "middle_block", [diffusion_model.middle_block]))
    groups.append(("output", "output_blocks", diffusion_model.output_blocks))
    found: dict[str, tuple[str, str]] = {}
    for kind, attr, blocks in groups:
        for block_id, block in enumerate(blocks):
            for k, layer in enumerate(block):
                if getattr(layer, "transformer_blocks", None) is not None:
                    key = comfy_block_key(kind, block_id, 0, int(nrb[0])).rsplit("_", 1)[0]
                    path = f"{attr}.{k}" if kind == "middle" else f"{attr}.{block_id}.{k}"
                    found[key] = (path, kind)
    return found


class ComfyRepresentationForward:
    """``SpatialTransformer.forward`` replacement: whatever forward was there, then SeeSR's branch transformer.

    ``get_runtime(transformer_options)`` returns the call's :class:`~megasr.adapter_comfy.MegaSRRuntime` (or raises
    when the MegaSR guidance is missing). Held by the ModelPatcher's object patches; never deep-copied.
    """

    def __init__(self, inner: Callable, branch: nn.Module, where: str, get_runtime: Callable) -> None:
        self.inner = inner
        self.branch = branch
        self.where = where
        self.get_runtime = get_runtime

    def __deepcopy__(self, memo: dict) -> ComfyRepresentationForward:
        return self

    def __call__(self, x: torch.Tensor, context=None, transformer_options=None, *args, **kwargs) -> torch.Tensor:
        if transformer_options is None:
            transformer_options = {}
        h = self.inner(x, context, transformer_options, *args, **kwargs)
        runtime = self.get_runtime(transformer_options)
        return _run(self.branch, h, _tokens(runtime.ctx, h, self.where))


def apply_to_comfy_unet(model_patcher, branch: RepresentationBranch, get_runtime: Callable) -> list[str]:
    """Object-patch every ``SpatialTransformer.forward`` of the (cloned) ``model_patcher``'s U-Net; returns the
    patched object names. A forward another pack patched before is wrapped (called first), not replaced; a branch
    of ours already there is replaced, so the branch never runs twice."""
    dm = model_patcher.get_model_object("diffusion_model")
    places = comfy_spatial_transformers(dm)
    wanted = {s.key: s for s in branch.specs}
    if set(places) != set(wanted):
        raise ValueError(
            "SeeSR's representation branch was made for another U-Net layout "
            f"(branch blocks: {sorted(wanted)[:6]}, U-Net transformer blocks: {sorted(places)[:6]})"
        )
    names = []
    for key, (path, _kind) in sorted(places.items()):
        name = f"diffusion_model.{path}.forward"
        inner = model_patcher.get_model_object(name)
        while isinstance(inner, ComfyRepresentationForward):  # patched again (e.g. a second CISM² node): replace
            inner = inner.inner
        sub = branch.get_submodule(wanted[key].branch_path)
        model_patcher.add_object_patch(
            name, ComfyRepresentationForward(inner, sub, wanted[key].branch_path, get_runtime)
        )
        names.append(name)
    return names
