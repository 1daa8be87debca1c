"""The CISM² image-token K/V cache (issue 8, part A): the cached call is the uncached call, and no stale entry.

The image tokens and the frozen cross-attention weights are constant over a sampling run, so the ComfyUI
path projects the tokens' K/V once per run (per tile stack, per branch) and re-uses them at every step
(``megasr.extension.image_attention``). These tests compare against the same code with the cache off
(``CACHE_IMAGE_KV = False``), on the real ComfyUI ``UNetModel`` patched as the nodes patch it, and through the
real executor with tiles and with a second LR image in the same process.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from megasr_fixtures import megasr_env, prompt
from megasr_testing import import_comfy, perturb_zero_inits

LATENT = 8


def _unet_setup():
    """The tiny SD-2 ComfyUI U-Net + the tiny MegaSR model, patched as the CISM² node patches it."""
    comfy = import_comfy()
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from harness.checkpoints import TINY_SD2_UNET_CONFIG

    from megasr.adapter_comfy import apply_megasr_to_comfy_unet
    from megasr.blocks import comfy_unet_config
    from megasr.model import MegaSRConfig, MegaSRModel

    ucfg = dict(TINY_SD2_UNET_CONFIG)
    g = torch.Generator().manual_seed(0)
    dm = UNetModel(**comfy_unet_config(ucfg), operations=comfy.ops.disable_weight_init)
    with torch.no_grad():
        for p in dm.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model = MegaSRModel(MegaSRConfig(unet=ucfg, clip_dim=64, msgam_hidden=8)).eval()
    perturb_zero_inits(model, scale=0.2)
    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu")
    patch = apply_megasr_to_comfy_unet(patcher, model)
    return dm, model, patcher, patch, g


def _call(dm, model, patcher, ctx, x, t, text, hint):
    from megasr.adapter_comfy import RUNTIME_KEY, MegaSRRuntime

    down, mid = model.controlnet_residuals(x, t, text, hint, ctx)
    to = dict(patcher.model_options["transformer_options"])
    to[RUNTIME_KEY] = MegaSRRuntime(ctx, model.unet_ext, id(model))
    return dm(x, timesteps=t, context=text, control={"output": list(down), "middle": [mid]}, transformer_options=to)


class _ImageProjections:
    """Counts ``to_k`` calls on image tokens (257 of them; the text has 77) across the U-Net's cross-attentions."""

    def __init__(self, dm, n_tokens: int) -> None:
        self.calls = 0
        self.handles = []
        for name, m in dm.named_modules():
            if name.endswith("attn2.to_k"):
                self.handles.append(m.register_forward_hook(self._hook(n_tokens)))

    def _hook(self, n_tokens: int):
        def hook(module, args, output):
            if args[0].shape[1] == n_tokens:
                self.calls += 1

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_cached_image_kv_equals_the_uncached_call_and_is_projected_once_per_run(monkeypatch):
    """Catches: a K/V cache that changes the prediction (K/V of the wrong block, of the uncond half, not
    broadcast to the cond/uncond batch), one that never hits (K/V projected again at every step), a split
    attention that is not the block's cross-attention (wrong head split, scale, missing ``to_out``), and a
    context whose K/V survive into a context of other image tokens (another LR image or tile)."""
    import megasr.extension as ext

    dm, model, patcher, patch, g = _unet_setup()
    b, n_tok = 2, 257
    x = torch.randn(b, 4, LATENT, LATENT, generator=g)
    t = torch.full((b,), 400.0)
    text = torch.randn(b, 77, 1024, generator=g)
    hint = torch.rand(1, 3, LATENT * 8, LATENT * 8, generator=g).expand(b, -1, -1, -1)
    hed = torch.rand(1, 1, LATENT * 8, LATENT * 8, generator=g)
    tok_a = torch.randn(1, n_tok, 64, generator=g)  # one LR image: shared by cond and uncond, as in the nodes
    tok_b = torch.randn(1, n_tok, 64, generator=g)

    def ctx(tokens):
        return model.prepare_context(
            (LATENT, LATENT), tokens, hed, image_attention=patch.image_attention, step_invariant=True
        )

    meter = _ImageProjections(dm, n_tok)
    with torch.no_grad():
        monkeypatch.setattr(ext, "CACHE_IMAGE_KV", False)
        ref_a = _call(dm, model, patcher, ctx(tok_a), x, t, text, hint)
        ref_b = _call(dm, model, patcher, ctx(tok_b), x, t, text, hint)
        uncached_calls = meter.calls
        # the split attention is the block's own cross-attention (ComfyUI's attn2 forward on expanded tokens)
        attn = next(iter(patch.image_attention.values()))
        n = torch.randn(b, 16, attn.module.to_q.in_features, generator=g)
        tokens = model.connector(tok_a).expand(b, -1, -1)
        k, v = attn.project(tokens)
        split = attn.attend(n, k, v)
        whole = attn(n, tokens)
        assert (split - whole).abs().max() <= 1e-5 * whole.abs().max()

        monkeypatch.setattr(ext, "CACHE_IMAGE_KV", True)
        meter.calls = 0
        ca = ctx(tok_a)
        first = _call(dm, model, patcher, ca, x, t, text, hint)
        first_calls = meter.calls
        second = _call(dm, model, patcher, ca, x, t, text, hint)
        second_calls = meter.calls - first_calls
        other = _call(dm, model, patcher, ctx(tok_b), x, t, text, hint)  # a new run after the first one
    meter.remove()

    n_blocks = len(model.unet_ext)
    n_cn_blocks = len(model.cn_ext)
    assert uncached_calls == 2 * (n_blocks + n_cn_blocks)  # uncached: every block, U-Net and ControlNet
    assert first_calls == n_blocks  # ControlNet blocks share the U-Net's attn2 of their key, hence its K/V
    assert second_calls == 0
    scale = ref_a.abs().max()
    assert (ref_a - ref_b).abs().max() > 1e-3 * scale  # the image tokens matter, so a stale K/V would show
    for got, ref in ((first, ref_a), (second, ref_a), (other, ref_b)):
        assert (got - ref).abs().max() <= 1e-6 * scale


def _pack_module(name: str):
    from harness import comfy as hcomfy

    import nodes

    pack = nodes.NODE_CLASS_MAPPINGS[hcomfy.PACK_SENTINEL_NODE].__module__.rsplit(".nodes.", 1)[0]
    return importlib.import_module(f"{pack}.{name}")


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    import folder_paths
    from PIL import Image

    e = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    rng = np.random.default_rng(11)
    for name in ("kv_a", "kv_b"):  # textured, so every tile's CLIP crop (and K/V) differs
        img = Image.fromarray(rng.integers(0, 256, size=(24, 48, 3), dtype=np.uint8))
        for copy in ("1", "2"):  # the same pixels under two names: the executor's cache cannot answer the 2nd
            img.save(f"{folder_paths.get_input_directory()}/{name}_{copy}.png")
    return e


def _latent(env, image: str, cached: bool, monkeypatch) -> torch.Tensor:
    import folder_paths
    import safetensors.torch

    monkeypatch.setattr(_pack_module("megasr.extension"), "CACHE_IMAGE_KV", cached)
    tag = f"kv_{image}_{int(cached)}"
    p = prompt(
        env,
        "megasr_large_tiled",
        **{
            "LR image.image": image,
            "MegaSRSampler.seed": 9,
            "MegaSRSampler.steps": 2,
            "MegaSRSampler.tile_size": 128,
            "MegaSRSampler.tile_overlap": 32,
            "MegaSRSampler.tile_batch": 1,
            "SaveImage.filename_prefix": tag,
        },
    )
    for n in p.values():  # no DAGE maps: the K/V cache is the image path's (and the run stays short)
        if n["class_type"] == "MegaSRGuidanceFusion":
            for name in ("hed", "depth", "seg"):
                n["inputs"].pop(name, None)
    sampler = next(k for k, n in p.items() if n["class_type"] == "MegaSRSampler")
    p["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 1], "filename_prefix": tag}}
    out = env[0].run(p).outputs["save_latent"]["latents"][0]
    path = f"{folder_paths.get_directory_by_type(out['type'])}/{out['subfolder']}/{out['filename']}"
    return safetensors.torch.load_file(path)["latent_tensor"].double()


def test_tiled_sampler_with_cached_kv_equals_uncached_for_every_tile_and_a_second_lr(env, monkeypatch):
    """Catches a K/V cache keyed too coarsely in the real sampler: tiles (2 tiles of 128 px, one per model call,
    each with its own CLIP tokens) sharing the first tile's K/V, the negative branch or a second LR
    image in the same process re-using the first one's, or a cache that outlives the sampling run."""
    a_cached = _latent(env, "kv_a_1.png", True, monkeypatch)
    b_cached = _latent(env, "kv_b_1.png", True, monkeypatch)
    a_ref = _latent(env, "kv_a_2.png", False, monkeypatch)
    b_ref = _latent(env, "kv_b_2.png", False, monkeypatch)
    assert a_cached.shape == (1, 4, 12, 24)  # 96 x 192 px: 2 tiles of 16 cells side by side, one per call
    assert (a_ref - b_ref).abs().max() > 1e-3 * a_ref.abs().max()
    for got, ref in ((a_cached, a_ref), (b_cached, b_ref)):
        assert torch.isfinite(got).all()
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_msgam_modulations_of_one_lr_are_computed_once_for_cond_and_uncond():
    """Catches MS-GAM modulations computed per cond/uncond sample again (the SAFT conv nets running at the model
    batch although both halves share one LR image's maps), and a shared modulation that is broadcast wrongly
    (another result than maps expanded to the model batch; a tile stack's maps tiled in the wrong order)."""
    dm, model, patcher, patch, g = _unet_setup()
    b = 4  # two tiles x (cond, uncond): maps of batch 2 (one per tile), tiled to 4 like the model batch
    x = torch.randn(b, 4, LATENT, LATENT, generator=g)
    t = torch.full((b,), 300.0)
    text = torch.randn(b, 77, 1024, generator=g)
    hint = torch.rand(b, 3, LATENT * 8, LATENT * 8, generator=g)
    maps = {k: torch.rand(2, c, LATENT * 8, LATENT * 8, generator=g) for k, c in (("hed", 1), ("depth", 1), ("seg", 3))}
    batches: list[int] = []
    hooks = [
        m.shared[0].register_forward_hook(lambda mod, args, out: batches.append(args[0].shape[0]))
        for m in model.modules()
        if hasattr(m, "shared") and hasattr(m, "gamma")
    ]

    def run(m: dict):
        ctx = model.prepare_context((LATENT, LATENT), None, m["hed"], m["depth"], m["seg"], step_invariant=True)
        ctx.image_attention = patch.image_attention
        return _call(dm, model, patcher, ctx, x, t, text, hint)

    with torch.no_grad():
        shared = run(maps)
        shared_batches = list(batches)
        expanded = run({k: v.repeat(2, 1, 1, 1) for k, v in maps.items()})
    for h in hooks:
        h.remove()
    assert shared_batches and set(shared_batches) == {2}, shared_batches  # the maps' batch, never 4
    assert (shared - expanded).abs().max() <= 1e-6 * expanded.abs().max()
