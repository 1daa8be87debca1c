"""Tiling inside every model call: one sampling run for the whole canvas (MultiDiffusion / SeeSR style).

:class:`TiledModelCall` is a ComfyUI ``CALC_COND_BATCH`` wrapper (``comfy.patcher_extension``, present in
0.3.75 and the newest ComfyUI). At each model call it cuts the noisy canvas latent into overlapping tiles,
stacks ``tile_batch`` tiles along the batch, hands each stack to the next wrapper / ComfyUI's own
``_calc_cond_batch`` (so cond/uncond batching, ``model_function_wrapper``, hooks and every ControlNet work
as usual) with conditionings whose ControlNet chains see only those tiles of their hints and maps, and
with the CISM² semantics of those tiles; the noise predictions are blended with
:func:`megasr.tiling.tile_weight` (raised-cosine ramps, zero at the outer quarter of each overlap). The
sampler, its noise, the progress bar and previews see one canvas, exactly as untiled.
"""

from __future__ import annotations

import logging

import comfy.model_management
import torch

from ...megasr.adapter_comfy import SEMANTICS_KEY
from ...megasr.cism import ImageSemantics
from ...megasr.errors import MegaSRInputError
from ...megasr.tiling import Canvas, Tile, TileBlender, per_tile_batch, tiles
from .control import SemanticsBinding, crop_control_chain

log = logging.getLogger("megasr")
MIN_TILE = 16  # latent cells; the OOM fallback halves the tile down to this
CACHED_GROUPS = 8  # tile stacks whose cropped ControlNets (and MS-GAM contexts) are kept across steps
CLIP_CHUNK = 8  # tile crops per CLIP vision call


def lr_box(t: Tile, canvas: Canvas, lr_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The LR pixels (y0, y1, x0, x1) under latent tile ``t`` (its padded part clamped to the image)."""
    (oh, ow), (lh, lw) = canvas.out_hw, lr_hw

    def span(a: int, b: int, out: int, lr: int) -> tuple[int, int]:
        lo = min(lr - 1, (a * 8 * lr) // out)
        hi = min(lr, max(lo + 1, -(-(b * 8 * lr) // out)))
        return lo, hi

    return (*span(t.y0, t.y1, oh, lh), *span(t.x0, t.x1, ow, lw))


def encode_tile_semantics(semantics: ImageSemantics, boxes: list[tuple[int, int, int, int]]) -> list[torch.Tensor]:
    """CLIP tokens of each LR box, crops of equal size encoded together (``CLIP_CHUNK`` per call)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        by_size.setdefault((y1 - y0, x1 - x0), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(boxes)
    img = semantics.image
    b = img.shape[0]
    for idx in by_size.values():
        for start in range(0, len(idx), CLIP_CHUNK):
            chunk = idx[start : start + CLIP_CHUNK]
            crops = torch.cat([img[:, y0:y1, x0:x1] for y0, y1, x0, x1 in (boxes[i] for i in chunk)])
            tokens = semantics.encoder(crops)
            for j, i in enumerate(chunk):
                out[i] = tokens[j * b : (j + 1) * b]
    return out


def _uses_semantics(binding: SemanticsBinding) -> bool:
    """Whether any block gets a CISM² term (global strength times a level strength non-zero): at strength 0
    the tokens are never read, so the tiles' CLIP crops are not encoded."""
    levels = tuple(binding.level_strengths) or (1.0,)
    return float(binding.strength) != 0.0 and any(float(s) != 0.0 for s in levels)


class TiledModelCall:
    """The per-run CALC_COND_BATCH wrapper; holds only this run's caches (one instance per sampler run)."""

    def __init__(self, canvas: Canvas, tile: int, overlap: int, tile_batch: int, where: str) -> None:
        self.canvas = canvas
        self.tile = tile
        self.overlap = overlap
        self.tile_batch = max(1, tile_batch)
        self.where = where
        self.shared: dict = {}  # canvas-sized hints/maps per original control
        self._groups: dict = {}  # (grid key, group index) -> cropped conds (with their controls' caches)
        self._semantics: dict = {}  # grid key -> per-tile tokens
        self._weights: dict = {}
        self.calls = 0  # model calls handled (for tests and benchmarks)

    def release(self) -> None:
        self.shared.clear()
        self._groups.clear()
        self._semantics.clear()
        self._weights.clear()

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        while True:
            try:
                return self._run(executor, model, conds, x_in, timestep, model_options)
            except comfy.model_management.OOM_EXCEPTION:
                if self.tile_batch > 1:
                    self.tile_batch //= 2
                    log.warning("%s: out of memory; retrying with %d tiles per model call", self.where, self.tile_batch)
                elif self.tile > MIN_TILE:
                    self.tile = max(MIN_TILE, self.tile // 2)
                    self.overlap = min(self.overlap, self.tile // 2)
                    log.warning("%s: out of memory; retrying with %d px tiles", self.where, self.tile * 8)
                else:
                    raise
                self._groups.clear()
                comfy.model_management.soft_empty_cache()

    # --- one model call --------------------------------------------------------------------------------
    def _run(self, executor, model, conds, x_in, timestep, model_options):
        h, w = x_in.shape[-2:]
        b = x_in.shape[0]
        overlap = min(self.overlap, self.tile // 2)
        grid = tiles(h, w, self.tile, overlap)
        key = (h, w, self.tile, overlap)
        n = self.tile_batch
        groups = [grid[i : i + n] for i in range(0, len(grid), n)]
        if len(grid) > 1:
            self._refuse_area_conds(conds)
        blends = [TileBlender(x_in.shape, overlap, x_in.dtype, x_in.device, self._weights) for _ in conds]
        self.calls += 1
        for gi, group in enumerate(groups):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x_g = torch.cat([x_in[..., t.y0 : t.y1, t.x0 : t.x1] for t in group])
            t_g = timestep.repeat(len(group)) if timestep.ndim > 0 and timestep.shape[0] == b else timestep
            conds_g = self._conds_for(conds, key, gi, group, b)
            outs = executor(model, conds_g, x_g, t_g, self._options_for(model_options, grid, group, key, b))
            for blend, o in zip(blends, outs, strict=True):
                for j, t in enumerate(group):
                    blend.add(t, o[j * b : (j + 1) * b])
        return [blend.result() for blend in blends]

    def _refuse_area_conds(self, conds) -> None:
        for cond in conds:
            for c in cond or []:
                if "area" in c or "mask" in c:
                    raise MegaSRInputError(
                        self.where,
                        "positive",
                        "area or mask conditioning is placed on the whole canvas and cannot be tiled; set "
                        "tile_size at least the output size, or remove the area/mask conditioning",
                    )

    def _conds_for(self, conds, key, gi: int, group: list[Tile], batch: int):
        cached = self._groups.get((key, gi))
        if cached is not None:
            return cached
        done: dict = {}
        out = []
        for cond in conds:
            if cond is None:
                out.append(None)
                continue
            entries = []
            for c in cond:
                control = c.get("control")
                if control is not None:
                    if id(control) not in done:  # shared by cond and uncond: stays shared, so they batch
                        done[id(control)] = crop_control_chain(control, self.canvas, group, batch, self.shared)
                    c = {**c, "control": done[id(control)]}
                entries.append(c)
            out.append(entries)
        if gi < CACHED_GROUPS:
            self._groups[(key, gi)] = out
        return out

    def _options_for(self, model_options: dict, grid: list[Tile], group: list[Tile], key, batch: int) -> dict:
        """Model options whose CISM² binding carries the semantics of the group's tiles."""
        topts = model_options.get("transformer_options", {})
        binding = topts.get(SEMANTICS_KEY)
        sem = getattr(binding, "semantics", None)
        if len(grid) == 1 or sem is None or sem.encoder is None or sem.image is None or not _uses_semantics(binding):
            return model_options
        if key not in self._semantics:
            lr_hw = tuple(sem.image.shape[1:3])
            boxes = [lr_box(t, self.canvas, lr_hw) for t in grid]
            tokens = encode_tile_semantics(sem, boxes)
            self._semantics[key] = ({t: tok for t, tok in zip(grid, tokens, strict=True)}, {})
        per_tile, bindings = self._semantics[key]
        gkey = tuple(group)
        if gkey not in bindings:  # one binding object per stack: the MS-GAM context cache is keyed on it
            tokens = torch.cat([per_tile_batch(per_tile[t], batch) for t in group])
            # the RAM representation tokens stay the whole image's (SeeSR tiles the same way)
            bindings[gkey] = binding.with_semantics(ImageSemantics(tokens, f"{sem.source} tiles {len(group)}"))
        return {**model_options, "transformer_options": {**topts, SEMANTICS_KEY: bindings[gkey]}}
