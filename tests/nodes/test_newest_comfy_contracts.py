"""What the newest ComfyUI (read at the commits docs/COMPATIBILITY.md cites; it cannot be installed here) expects of
the pack, run on the executed harness, ComfyUI 0.3.75 (issue 28):

- prepared-hint caches keyed by latent size (the newest ``ControlBase.cond_hints``, at most two): the MegaSR
  control's own cache of two sizes gives, over three sizes in one run, exactly what no cache gives; and a core
  ControlNet carrying the newest cache (reproduced on 0.3.75's ControlNet) gives each tile its own cropped hint
  even when the uncropped control already prepared a hint of the tile's latent size;
- ``cached_patcher_init``: the MegaSR loader registers the factory the newest multi-GPU clones call, and setting it
  is harmless on 0.3.75;
- ``fast_disk``: passed to a patcher class that takes it, decided from the weight file, and not passed on 0.3.75.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch
from megasr_fixtures import MEGASR_NAME, ensure_tiny_controlnet, loaded_control, megasr_env

LEVELS = dict.fromkeys(("strength_full_res", "strength_half_res", "strength_quarter_res", "strength_eighth_res"), 1.0)


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    comfy_runner.register_model_dir("controlnet", ensure_tiny_controlnet().parent)
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _node(name: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[name]


def _pack(module: str):
    """A module of the pack (loaded by ComfyUI under its folder name) by its path inside the pack."""
    root = _node("MegaSRModelLoader").__module__.split(".nodes.")[0]
    return importlib.import_module(f"{root}.{module}")


def _megasr_graph(env):
    """Patched MODEL and positive conditioning with the MegaSR control, built by the real nodes."""
    _, ckpt, _ = env
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    clip_vision = _node("CLIPVisionLoader")().load_clip("megasr_tiny_vitl.ckpt")[0]
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    g = torch.Generator().manual_seed(28)
    lr = torch.rand(1, 12, 16, 3, generator=g)
    maps = {k: torch.rand(1, 12, 16, 3, generator=g) for k in ("hed", "depth", "seg")}
    semantics = _node("MegaSRClipSemantics").execute(lr, clip_vision, "none").result[0]
    patched = _node("MegaSRCismInjection").execute(unet_model, msr, semantics, 1.0, **LEVELS).result[0]
    text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    fusion = _node("MegaSRGuidanceFusion").execute(text, text, msr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, **maps)
    return patched, fusion.result[0], msr


def _residuals(out: dict) -> list[torch.Tensor]:
    return [r.float().clone() for r in out["output"] + out["middle"] if r is not None]


@torch.no_grad()
def test_megasr_hint_cache_of_two_sizes_over_three_sizes_equals_no_cache(env, monkeypatch):
    """Three latent sizes in turn (twice) through one MegaSR control, as area composition or another tiling
    sampler hands them: with the cache of two sizes the residuals equal those with no cache at all, bit for bit,
    and the cache never holds more than two. Catches a cache keyed on part of the size (height only: the
    (6, 8) hint served at (6, 10)), on the size without the layout, or one that serves the last hint."""
    patched, positive, _ = _megasr_graph(env)
    emb, control, _base, ms = loaded_control(patched, positive)
    control_module = sys.modules[type(control).__module__]
    sigma = ms.sigma(torch.tensor([600.0]))
    sizes = [(6, 8), (6, 10), (8, 8)] * 2

    def run() -> list[list[torch.Tensor]]:
        outs = []
        for i, (h, w) in enumerate(sizes):
            x = torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(i)) * torch.sqrt(sigma**2 + 1)
            to = {**patched.model_options["transformer_options"]}
            outs.append(_residuals(control.get_control(x, sigma, {"c_crossattn": emb}, 1, to)))
            assert len(control._hints) <= 2 and len(control._ctx) <= 2
        return outs

    cached = run()
    assert len(control._hints) == 2  # it did cache
    control._hints.clear()
    control._ctx.clear()
    monkeypatch.setattr(control_module, "HINT_CACHE_SIZES", 0)
    uncached = run()
    assert not control._hints
    assert len({tuple(r[0].shape[-2:]) for r in cached}) == 3  # three sizes really went through
    for i, (a, b) in enumerate(zip(cached, uncached, strict=True)):
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y), (i, sizes[i])


def _newest_hint_cache_controlnet():
    """0.3.75's core ControlNet with the newest tree's prepared-hint cache (``comfy/controlnet.py`` @ ``03b1ca67``):
    at most two hints keyed by the latent's (height, width), the oldest dropped first. Created on first use (as a
    ControlBase subclass of another pack may), so copying per-instance attributes over would share it."""
    import comfy.controlnet

    class NewestHintCacheControlNet(comfy.controlnet.ControlNet):
        cond_hints = None

        def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
            if self.cond_hints is None:
                self.cond_hints = {}
            key = tuple(x_noisy.shape[2:])
            self.cond_hint = self.cond_hints.get(key)  # None: 0.3.75's get_control prepares it from the original
            out = super().get_control(x_noisy, t, cond, batched_number, transformer_options)
            if key not in self.cond_hints:
                while len(self.cond_hints) >= 2:
                    self.cond_hints.pop(next(iter(self.cond_hints)))
                self.cond_hints[key] = self.cond_hint
            return out

        def copy(self):
            c = super().copy()
            c.__class__ = NewestHintCacheControlNet
            return c

    return NewestHintCacheControlNet


@torch.no_grad()
def test_core_controlnet_with_the_newest_hint_cache_gets_each_tiles_own_hint(env):
    """The MegaSR Sampler's tiles crop every ControlNet's hint. With the newest size-keyed cache the uncropped
    control has already prepared a hint at the tile's latent size (8 x 8): each tile crop (three tile sizes, each
    called twice in turn) must still give exactly the residuals of a 0.3.75 ControlNet crop of that tile. Catches
    a crop that inherits the uncropped control's prepared hints (served the whole image squeezed into the tile)."""
    tiling = _pack("megasr.tiling")
    _, ckpt, _ = env
    unet_model, clip, _vae = _node("CheckpointLoaderSimple")().load_checkpoint(ckpt)
    text = _node("CLIPTextEncode")().encode(clip, "a photo")[0]
    lr = torch.rand(1, 24, 32, 3, generator=torch.Generator().manual_seed(3))
    cn = _node("ControlNetLoader")().load_controlnet(ensure_tiny_controlnet().name)[0]
    positive, _ = _node("ControlNetApplyAdvanced")().apply_controlnet(text, text, cn, lr, 0.7, 0.0, 1.0)
    emb, plain, _base, ms = loaded_control(unet_model, positive)
    newest = plain.copy()
    newest.__class__ = _newest_hint_cache_controlnet()
    newest.pre_run(_base, lambda p: ms.percent_to_sigma(p))
    crop = _crop_control_chain()
    sigma = ms.sigma(torch.tensor([500.0]))
    cond = {"c_crossattn": emb}

    def x_of(h, w, seed):
        return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed)) * torch.sqrt(sigma**2 + 1)

    # the uncropped control at the whole latent and at the tile size (what ComfyUI may have run before tiling)
    newest.get_control(x_of(12, 16, 0), sigma, cond, 1, {})
    newest.get_control(x_of(8, 8, 1), sigma, cond, 1, {})
    assert set(newest.cond_hints) == {(12, 16), (8, 8)}
    canvas = tiling.Canvas.for_output(96, 128)
    tiles = [tiling.Tile(0, 8, 0, 8), tiling.Tile(4, 12, 2, 14), tiling.Tile(0, 12, 8, 16)]  # 8x8, 8x12, 12x8
    shared_newest, shared_plain = {}, {}
    crops = [(crop(newest, canvas, [t], 1, shared_newest), crop(plain, canvas, [t], 1, shared_plain)) for t in tiles]
    for rnd in range(2):
        for i, (t, (c_new, c_old)) in enumerate(zip(tiles, crops, strict=True)):
            x = x_of(t.y1 - t.y0, t.x1 - t.x0, 10 + i)
            got = _residuals(c_new.get_control(x, sigma, cond, 1, {}))
            want = _residuals(c_old.get_control(x, sigma, cond, 1, {}))
            assert len(got) == len(want) > 0
            for a, b in zip(got, want, strict=True):
                assert torch.equal(a, b), (rnd, t)
    assert crops[0][0].cond_hints is not newest.cond_hints


def _crop_control_chain():
    return _pack("nodes.runtime.control").crop_control_chain


@torch.no_grad()
def test_megasr_loader_registers_the_reload_factory_and_it_is_harmless_on_0_3_75(env):
    """The newest ``ModelPatcher.deepclone_multigpu`` raises unless ``cached_patcher_init`` is set, and calls
    ``factory(*args)`` for an untainted model (``disable_dynamic=True`` for a plain patcher). The loader's factory
    gives a fresh module with the same weights; on 0.3.75 the patched MODEL with the MegaSR patcher as additional
    model clones and loads as before."""
    import comfy.model_management
    import comfy.model_patcher

    patched, positive, msr = _megasr_graph(env)
    factory, args = msr.patcher.cached_patcher_init
    fresh = factory(*args)
    assert fresh.model is not msr.module
    assert type(fresh) is type(msr.patcher)
    want = msr.module.state_dict()
    got = fresh.model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k].cpu(), got[k].cpu()) for k in want)
    plain = factory(*args, disable_dynamic=True)
    assert type(plain) is comfy.model_patcher.ModelPatcher
    assert plain.cached_patcher_init == (factory, args)

    m = patched.clone()
    assert any(a.model is msr.module for a in m.get_additional_models())  # clone() clones additional models
    comfy.model_management.load_models_gpu([m] + positive[0][1]["control"].get_models())
    emb, control, _base, ms = loaded_control(m, positive)
    sigma = ms.sigma(torch.tensor([500.0]))
    x = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(1)) * torch.sqrt(sigma**2 + 1)
    out = control.get_control(x, sigma, {"c_crossattn": emb}, 1, {**m.model_options["transformer_options"]})
    assert _residuals(out)


def test_fast_disk_is_passed_only_to_a_patcher_that_takes_it(env, monkeypatch):
    """0.3.75's ModelPatcher takes no ``fast_disk``: nothing is passed. A patcher class with the newest
    constructor gets the decision of ``comfy.storage.model_fast_disk`` for the weight file the MegaSR loader read
    (stood in here: the newest module cannot be installed), through ``make_patcher`` and the loader."""
    import comfy.model_patcher
    import folder_paths

    compat = _pack("nodes.runtime.compat")
    assert compat.comfy_storage is None  # 0.3.75 has no comfy.storage
    assert compat.storage_kwargs(comfy.model_patcher.ModelPatcher, ["/x.safetensors"]) == {}

    class NewestPatcher(comfy.model_patcher.ModelPatcher):
        def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False, fast_disk=False):
            super().__init__(model, load_device, offload_device, size, weight_inplace_update)
            self.fast_disk = fast_disk

    asked = []
    storage = types.SimpleNamespace(model_fast_disk=lambda paths: asked.append(paths) or True)
    monkeypatch.setattr(compat, "comfy_storage", storage)
    assert compat.storage_kwargs(NewestPatcher, ["b", "a"]) == {"fast_disk": True}
    assert asked == [["a", "b"]]
    assert compat.storage_kwargs(NewestPatcher, None) == {}
    assert compat.storage_kwargs(comfy.model_patcher.ModelPatcher, ["a"]) == {}

    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", NewestPatcher, raising=False)
    msr = _node("MegaSRModelLoader").execute(MEGASR_NAME).result[0]
    assert type(msr.patcher) is NewestPatcher and msr.patcher.fast_disk is True
    assert asked[-1] == [folder_paths.get_full_path("megasr", MEGASR_NAME)]


@torch.no_grad()
def test_tile_crops_carry_cropped_multigpu_clones(env):
    """The newest ``_calc_cond_batch_multigpu`` runs inside the tiling wrapper and calls
    ``control.get_instance_for_device(device)`` on the control it is handed: the tile crop. The crop's per-device
    instances must be crops of the original's multi-GPU clones (their own MegaSR model, the same tile of the
    hint), not missing (the crop would run on the first GPU's model) nor uncropped. Device: the CPU here."""
    tiling = _pack("megasr.tiling")
    patched, positive, msr = _megasr_graph(env)
    emb, control, _base, ms = loaded_control(patched, positive)
    device = torch.device("cpu")
    clone = control.deepclone_multigpu(device, autoregister=True)
    assert control.multigpu_clones[device] is clone and clone.megasr.module is not msr.module
    canvas = tiling.Canvas.for_output(48, 64)
    tile = tiling.Tile(0, 6, 2, 8)
    crop = _crop_control_chain()(control, canvas, [tile], 1, {})
    device_crop = crop.multigpu_clones[device]
    assert device_crop is not clone and device_crop.megasr is clone.megasr
    assert (device_crop.canvas, device_crop.group) == (canvas, [tile])
    want = crop._prepared((48, 48), "cpu", torch.float32)
    got = device_crop._prepared((48, 48), "cpu", torch.float32)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    full = control._prepared((48, 48), "cpu", torch.float32)  # the whole LR squeezed to the tile's size
    assert not torch.equal(full["hint"], got["hint"])
