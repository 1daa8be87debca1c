"""SeeSR through the pack's own nodes (issue 25): workflows/seesr_x4.json in the real ComfyUI 0.3.75 executor with tiny
SeeSR- and RAM-layout files (tests/fixtures/seesr_fixtures.py), the ComfyUI control path against SeeSR's own
reference prediction (tests/fixtures/seesr/tiny), and RAM's tokens on every tile of the per-step tiling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness.comfy import ExecutionFailed
from harness.images import load_image_array
from harness.workflow import find_nodes
from seesr_fixtures import SEESR_NAME, seesr_env, seesr_prompt

CISM_WHERE = "MegaSR CISM² Semantic Injection"


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return seesr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _pack(module: str):
    """A module of the pack *as ComfyUI loaded it* (its package name differs from a plain ``import megasr``)."""
    import importlib

    import nodes as comfy_nodes

    base = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRSampler"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{base}.{module}")


def _run(env, p) -> tuple[np.ndarray, str]:
    """(saved image, the RAM Tags node's shown prompt) of one run."""
    result = env[0].run(p)
    save = find_nodes(p, "SaveImage")[0]
    tags = find_nodes(p, "MegaSRRamTags")[0]
    (path,) = result.images(save)
    return load_image_array(path), "".join(result.outputs[tags]["text"])


def _tags_of(env, image: str = "t_seesr_lr.png") -> list[str]:
    """RAM's tags of an input image, computed with the pack's RAM directly (megasr.ram on the tiny files)."""
    import folder_paths
    from PIL import Image

    ram = _pack("nodes.ram")
    model_io = ram.MegaSRRamLoader.execute("tiny_ram.safetensors", "tiny_dape.safetensors").args[0]
    with Image.open(f"{folder_paths.get_input_directory()}/{image}") as im:
        a = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]
    out = ram.MegaSRRamTags.execute(a, model_io, "", "", "")
    return [t for t in out.args[1].split(", ") if t]


def test_seesr_x4_runs_end_to_end_and_shows_ram_tags_as_the_prompt(env):
    """The shipped workflow (public file names swapped for the tiny ones) upscales x4; the RAM tags node shows SeeSR's
    prompt 'tags, ,clean, high-resolution, 8k' on the node and feeds it to the positive text encoder."""
    p = seesr_prompt(env)
    tags_node = find_nodes(p, "MegaSRRamTags")[0]
    pos = find_nodes(p, "Positive (RAM tags)")[0]
    assert p[pos]["inputs"]["text"] == [tags_node, 0]  # the prompt output drives the text encoder
    image, shown = _run(env, p)
    assert image.shape[:2] == (44, 52)  # 13 x 11 LR -> x4
    tags = _tags_of(env)
    assert tags, "the tiny RAM gives this LR image no tag: the fixture no longer exercises the prompt"
    assert shown == ", ".join(tags) + ", ," + "clean, high-resolution, 8k"


def test_editing_a_tag_changes_the_result(env):
    """Excluding one of RAM's tags (and writing another word instead) changes the prompt exactly there and the
    upscaled image; the same prompt twice gives the same image (so the change is the edit's)."""
    tags = _tags_of(env)
    base_img, base_prompt = _run(env, seesr_prompt(env, **{"MegaSRSampler.seed": 3}))
    again, _ = _run(
        env, seesr_prompt(env, **{"MegaSRSampler.seed": 3, "MegaSRRamTags.suffix": "clean, high-resolution, 8k"})
    )
    np.testing.assert_array_equal(base_img, again)
    edits = {"MegaSRRamTags.exclude": tags[0], "MegaSRRamTags.user_prompt": "zebra", "MegaSRSampler.seed": 3}
    edited_img, edited_prompt = _run(env, seesr_prompt(env, **edits))
    assert edited_prompt == ", ".join(tags[1:]) + ", zebra," + "clean, high-resolution, 8k"
    assert edited_prompt != base_prompt
    assert np.abs(edited_img.astype(np.float32) - base_img.astype(np.float32)).max() > 0


def test_a_seesr_model_without_ram_semantics_is_refused_naming_the_node_and_input(env):
    p = seesr_prompt(env)
    cism = find_nodes(p, "MegaSRCismInjection")[0]
    del p[cism]["inputs"]["ram_semantics"]
    with pytest.raises(ExecutionFailed) as e:
        env[0].run(p)
    msg = str(e.value)
    assert CISM_WHERE in msg and "ram_semantics" in msg and SEESR_NAME in msg


# --- the ComfyUI control path == SeeSR's own prediction -------------------------------------------------------


def _fixture_unet_in_comfy(tiny):
    """ComfyUI's UNetModel with the SeeSR fixture's base weights (its unet/ minus the branch)."""
    import json

    import comfy.ops
    import comfy.utils
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import load_file

    from megasr.blocks import comfy_unet_config

    cfg = json.loads((tiny / "unet" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "use_image_cross_attention"}
    ccfg = comfy_unet_config(cfg)
    dm = UNetModel(**ccfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    key_map = comfy.utils.unet_to_diffusers(ccfg)
    state = load_file(str(tiny / "unet" / "diffusion_pytorch_model.safetensors"))
    base = {key_map[k]: v.float() for k, v in state.items() if "image_attentions" not in k}
    missing, unexpected = dm.load_state_dict(base, strict=False)
    assert not missing and not unexpected
    return dm.eval()


@torch.no_grad()
@pytest.mark.parametrize(("t", "cfg"), [(999, False), (21, True)])
def test_converted_seesr_file_through_the_control_predicts_seesr(env, tmp_path, t, cfg):
    """SeeSR's tiny fixture folder -> ``python -m megasr convert-seesr`` -> the MegaSR Model Loader's patcher -> the
    U-Net patches and the MegaSR control (RAM tokens from the CISM² binding) -> ComfyUI's UNetModel, at a sampler's
    sigma: equals SeeSR's own U-Net + ControlNet (reference.safetensors) to 1e-5. Fails on a wrong key in the
    conversion, tokens the control does not pass (the ControlNet branch then refuses) or a branch left off."""
    import comfy.model_patcher
    import comfy.model_sampling
    from harness.paths import REPO_ROOT
    from safetensors.torch import load_file

    from megasr.__main__ import main

    tiny = REPO_ROOT / "tests" / "fixtures" / "seesr" / "tiny"
    ref = load_file(str(tiny / "reference.safetensors"))
    path = tmp_path / "seesr_tiny.safetensors"
    assert main(["convert-seesr", str(tiny), str(path)]) == 0
    loaders, models = _pack("nodes.loaders"), _pack("nodes.runtime.models")
    control_mod, adapter = _pack("nodes.runtime.control"), _pack("megasr.adapter_comfy")
    managed = models.ManagedModel(_pack("nodes.loaders").megasr_patcher(str(path)), "megasr", path.name, {})
    assert loaders is not None and managed.module.config.representation_dim == 512

    dm = _fixture_unet_in_comfy(tiny)
    holder = torch.nn.Module()
    holder.diffusion_model = dm
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device="cpu", offload_device="cpu").clone()
    patch = adapter.apply_megasr_to_comfy_unet(patcher, managed.module, managed.owner_id)
    binding = control_mod.SemanticsBinding(
        None, managed.owner_id, 1.0, (1.0, 1.0, 1.0, 1.0), patch.image_attention, ref["ram_tokens"]
    )
    control = control_mod.MegaSRControl(managed, {}, {})
    control.set_cond_hint(ref["hint"], 1.0, (0.0, 1.0))

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
        pass

    ms = Sampling()
    control.model_sampling_current = ms
    control.timestep_range = None
    text = torch.cat([ref["negative"], ref["text"]]) if cfg else ref["text"]
    b = text.shape[0]
    sigma = ms.sigmas[t].expand(b).float()
    x = ref["x"].expand(b, -1, -1, -1)
    x_noisy = x * (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt()  # what the sampler hands the model at this sigma
    to = dict(patcher.model_options["transformer_options"])
    to[adapter.SEMANTICS_KEY] = binding
    out = control.get_control(x_noisy, sigma, {"c_crossattn": text}, 1, to)
    assert isinstance(to[adapter.RUNTIME_KEY].ctx.representation_tokens, torch.Tensor)
    patcher.patch_model()
    try:
        eps = dm(x, timesteps=torch.full((b,), float(t)), context=text, control=out, transformer_options=to)
    finally:
        patcher.unpatch_model()
    expected = ref[f"eps_cfg_batch_t{t}" if cfg else f"eps_t{t}"]
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


# --- tiling: RAM's tokens are the whole image's on every tile ---------------------------------------------------


def test_tiled_equals_untiled_with_ram_tokens_on_every_tile(env):
    """As tests/nodes/test_tiled_sampling.py: a stand-in model of local support (3x3 conv) sampled with DDPM gives the
    same latent tiled and untiled -- here it also adds a term of the RAM tokens the MegaSR control put into the
    call's guidance context, and the MegaSR control runs SeeSR's ControlNet (its branch reads the tokens) on every
    tile. CLIP semantics with an encoder are connected too, so the tiles get rebuilt CISM² bindings. Fails when a
    tile's binding drops the tokens (the ControlNet branch refuses) or gets other tokens than the whole image's."""
    import comfy.sd
    import folder_paths

    sampler, tiling = _pack("nodes.sampler"), _pack("megasr.tiling")
    cism, fusion, loaders = _pack("nodes.cism"), _pack("nodes.msgam"), _pack("nodes.loaders")
    adapter, cism_core = _pack("megasr.adapter_comfy"), _pack("megasr.cism")
    ram_mod = _pack("megasr.ram")
    from megasr_fixtures import fusion_args

    model = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", env[1]))[0]
    megasr = loaders.MegaSRModelLoader.execute(SEESR_NAME).args[0]
    g = torch.Generator().manual_seed(0)
    lr = torch.rand(1, 36, 40, 3, generator=g)
    clip_dim = megasr.module.config.clip_dim
    encoded = []

    def encoder(img: torch.Tensor) -> torch.Tensor:  # region-dependent CLIP tokens: the tiles re-encode
        encoded.append(img.shape[0])
        return img.mean(dim=(1, 2, 3)).view(-1, 1, 1).expand(-1, 3, clip_dim).contiguous()

    sem = cism_core.ImageSemantics(encoder(lr), "test", image=lr, encoder=encoder)
    tokens = torch.randn(1, 9, 512, generator=g)
    ram = ram_mod.RamOutput([["a"]], ["a"], tokens)
    levels = {f"strength_{n}": 1.0 for n in ("full_res", "half_res", "quarter_res", "eighth_res")}
    patched = cism.MegaSRCismInjection.execute(model, megasr, sem, 1.0, ram_semantics=ram, **levels).args[0]
    args = fusion_args(megasr)
    args["positive"] = args["negative"] = [[torch.zeros(1, 77, 1024), {}]]
    pos, neg = fusion.MegaSRGuidanceFusion.execute(lr_image=lr, **args).args[:2]

    kernel = torch.randn(4, 4, 3, 3, generator=g) * 0.05
    seen: list[torch.Tensor] = []

    def local_model(apply_model, a):
        x, t = a["input"], a["timestep"]
        ctx = a["c"]["transformer_options"][adapter.RUNTIME_KEY].ctx
        rep = ctx.representation_for(x.shape[0], x.dtype, x.device)
        seen.append(rep)
        ramp = (t / (1 + t)).view(-1, 1, 1, 1)
        return (
            0.3 * x * ramp
            + torch.nn.functional.conv2d(x, kernel, padding=1)
            + 0.1 * rep.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        )

    m = patched.clone()
    m.set_model_unet_function_wrapper(local_model)
    latent = torch.randn(1, 4, 40, 36, generator=g)
    canvas = tiling.Canvas.for_output(320, 288)

    def run(tile, batch):
        return sampler.sample_canvas(m, latent, pos, neg, 5, 3, 2.0, "ddpm", "normal", 1.0, canvas, tile, 8, batch)

    untiled = run(64, 1)
    assert seen and all(torch.equal(r[:1], tokens) for r in seen)
    seen.clear()
    encoded.clear()
    tiled = run(16, 3)  # 3 x 3 tiles of 16 cells, overlap 8, 3 tiles a call
    assert encoded, "the tiles did not re-encode CLIP semantics: the rebuilt-binding path was not exercised"
    assert seen and all(torch.equal(r, tokens.expand(r.shape[0], -1, -1)) for r in seen)
    torch.testing.assert_close(tiled, untiled, atol=1e-4, rtol=0)


def test_memory_preflight_counts_the_representation_branch(env, monkeypatch):
    """The sampler's preflight asks for more working memory per latent cell when the MODEL carries RAM tokens for
    SeeSR's branch (a second transformer in every block) than for the same MODEL without them."""
    import comfy.sd
    import folder_paths

    sampler, control_mod, adapter = (
        _pack("nodes.sampler"),
        _pack("nodes.runtime.control"),
        _pack("megasr.adapter_comfy"),
    )
    model, _, vae = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", env[1]))[:3]
    asked: list[float] = []
    real = sampler.estimate_sampler_peak_bytes

    def spy(*args, **kwargs):
        asked.append(kwargs["unet_bytes_per_cell"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sampler, "estimate_sampler_peak_bytes", spy)
    lr = torch.rand(1, 3, 11, 13)
    per_cell = {}
    for name, rep in (("plain", None), ("seesr", torch.zeros(1, 145, 512))):
        m = model.clone()
        binding = control_mod.SemanticsBinding(None, 1, 1.0, (1.0,) * 4, None, rep)
        m.model_options.setdefault("transformer_options", {})[adapter.SEMANTICS_KEY] = binding
        asked.clear()
        sampler.preflight(m, vae, lr, 4.0, 1024, 128, 1)
        per_cell[name] = asked[0]
    assert per_cell["seesr"] == pytest.approx(per_cell["plain"] * _pack("megasr.memory").REPRESENTATION_BRANCH_FACTOR)
    assert per_cell["seesr"] > per_cell["plain"]
