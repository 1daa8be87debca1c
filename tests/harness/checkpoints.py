"""Tiny but structurally real SD-2 checkpoints, generated (never downloaded), seeded and byte-reproducible.

``ensure_tiny_sd2_checkpoint()`` writes ``megasr_tiny_sd2.ckpt`` into the git-ignored fixture cache (see
``harness.paths.cache_dir``) and re-uses it while its stamp (content version + seed) matches. The file is
what users have: an LDM-layout ``.ckpt`` (``{"state_dict": ...}``) that ComfyUI 0.3.75's
``CheckpointLoaderSimple`` detects as SD20 with epsilon prediction:

- ``model.diffusion_model.*``: a diffusers ``UNet2DConditionModel`` built from ``TINY_SD2_UNET_CONFIG``
  (320 channels, cross-attention 1024, linear projection, 5 heads of 64 dims; one level with one
  res+transformer block, a middle block with a transformer, two output res+transformer blocks), its
  weights renamed with ComfyUI's own diffusers->LDM table (``comfy.utils.unet_to_diffusers``).
  ``tiny_sd2_unet_diffusers(seed)`` returns the very same network as a diffusers model (bit-identical
  weights) for diffusers-side tests (e.g. ``ControlNetModel.from_unet``).
- ``cond_stage_model.model.*``: a full-size OpenCLIP ViT-H/14 text encoder (24 x 1024; any smaller one
  loads with missing keys and yields NaN silently). Its 354M values are views into one 4M-float random
  pool (LayerNorm weights/biases are broadcast constants), so the file stays about 120 MB.
- ``first_stage_model.taesd_encoder/decoder.*``: a TAESD VAE (x8, 4 latent channels), fast on CPU; or,
  with ``vae="kl"`` (file ``megasr_tiny_sd2_kl.ckpt``), the full-size SD KL VAE (83.7M values, pool views)
  for tests that need the real VAE path (tiled encode/decode, 8x scale, latent statistics).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megasr.files import sha256_file

from .paths import cache_dir

log = logging.getLogger("megasr.harness")

#: Bump when anything about the generated content changes; the cache is then regenerated.
FIXTURE_VERSION = "1"
DEFAULT_SEED = 0
CHECKPOINT_NAME = "megasr_tiny_sd2.ckpt"

#: The tiny SD-2-layout U-Net, as ``diffusers.UNet2DConditionModel(**TINY_SD2_UNET_CONFIG)``.
#: diffusers' ``attention_head_dim`` is (historically) the number of heads: 5 heads x 64 dims = 320.
TINY_SD2_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D",),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D",),
    "block_out_channels": (320,),
    "layers_per_block": 1,
    "cross_attention_dim": 1024,
    "attention_head_dim": 5,
    "use_linear_projection": True,
    "upcast_attention": False,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

#: The same U-Net described the way ComfyUI's model detection reads it from the LDM keys.
TINY_SD2_LDM_UNET_CONFIG: dict[str, Any] = {
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_output": [1, 1],
    "transformer_depth_middle": 1,
}

#: The SD-1/SD-2 KL autoencoder (LDM ``ddconfig``), as ComfyUI builds it for these checkpoints.
SD_KL_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}

#: OpenCLIP ViT-H/14 text tower (the SD-2 text encoder).
OPENCLIP_H_TEXT = {"width": 1024, "layers": 24, "heads": 16, "context": 77, "vocab": 49408, "embed": 1024}

_VPRED_BIAS = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_POOL_FLOATS = 1 << 22


def tiny_sd2_unet_diffusers(seed: int = DEFAULT_SEED):  # -> diffusers.UNet2DConditionModel
    """The tiny SD-2 U-Net as a diffusers model, weights identical to those in the generated checkpoint."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_SD2_UNET_CONFIG)
    unet.eval()
    return unet


def diffusers_unet_to_ldm(state_dict: dict[str, torch.Tensor], ldm_config: dict[str, Any] | None = None) -> dict:
    """Rename a diffusers U-Net state dict to ComfyUI/LDM keys (``input_blocks.1.1...``), using ComfyUI's table.

    Needs the ComfyUI tree importable (``harness.comfy.bootstrap()``).
    """
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(dict(ldm_config or TINY_SD2_LDM_UNET_CONFIG))
    out = {}
    left = sorted(set(state_dict) - set(table))
    if left:
        raise KeyError(f"diffusers keys without an LDM name: {left[:10]}")
    for dkey, ldm_key in table.items():
        if dkey in state_dict:
            out[ldm_key] = state_dict[dkey]
    return out


class _Pool:
    """Seeded random values that many tensors view (one stored storage -> a small file)."""

    def __init__(self, seed: int, std: float = 0.02) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.base = torch.randn(_POOL_FLOATS, generator=gen) * std
        self.gen = gen
        self.ones = torch.ones(1)
        self.zeros = torch.zeros(1)

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = self.base.numel()
        if len(shape) == 0:
            return self.base[int(torch.randint(0, n, (1,), generator=self.gen))].clone()
        if len(shape) == 1:
            off = int(torch.randint(0, n - shape[0], (1,), generator=self.gen))
            return self.base[off : off + shape[0]]
        rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
        row_stride = max(1, min(cols, (n - cols) // rows))
        span = (rows - 1) * row_stride + cols
        off = int(torch.randint(0, n - span + 1, (1,), generator=self.gen))
        flat = self.base.as_strided((rows, cols), (row_stride, 1), off)
        return flat if len(shape) == 2 else flat.unflatten(1, shape[1:])

    def const(self, value: float, shape: tuple[int, ...]) -> torch.Tensor:
        return (self.ones if value == 1.0 else self.zeros).expand(shape)


def openclip_h_text_state_dict(seed: int, prefix: str = "cond_stage_model.model.") -> dict[str, torch.Tensor]:
    """A full-size OpenCLIP ViT-H text encoder state dict (SD-2 checkpoint layout), as pool views."""
    cfg = OPENCLIP_H_TEXT
    w = cfg["width"]
    pool = _Pool(seed)
    sd: dict[str, torch.Tensor] = {
        "positional_embedding": pool.view((cfg["context"], w)),
        "token_embedding.weight": pool.view((cfg["vocab"], w)),
    }
    for i in range(cfg["layers"]):
        p = f"transformer.resblocks.{i}."
        sd[p + "ln_1.weight"] = pool.const(1.0, (w,))
        sd[p + "ln_1.bias"] = pool.const(0.0, (w,))
        sd[p + "attn.in_proj_weight"] = pool.view((3 * w, w))
        sd[p + "attn.in_proj_bias"] = pool.const(0.0, (3 * w,))
        sd[p + "attn.out_proj.weight"] = pool.view((w, w))
        sd[p + "attn.out_proj.bias"] = pool.const(0.0, (w,))
        sd[p + "ln_2.weight"] = pool.const(1.0, (w,))
        sd[p + "ln_2.bias"] = pool.const(0.0, (w,))
        sd[p + "mlp.c_fc.weight"] = pool.view((4 * w, w))
        sd[p + "mlp.c_fc.bias"] = pool.const(0.0, (4 * w,))
        sd[p + "mlp.c_proj.weight"] = pool.view((w, 4 * w))
        sd[p + "mlp.c_proj.bias"] = pool.const(0.0, (w,))
    sd["ln_final.weight"] = pool.const(1.0, (w,))
    sd["ln_final.bias"] = pool.const(0.0, (w,))
    sd["text_projection"] = pool.view((w, cfg["embed"]))
    sd["logit_scale"] = torch.tensor(4.6052)
    return {prefix + k: v for k, v in sd.items()}


def taesd_state_dict(seed: int, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """TAESD encoder/decoder weights (names and shapes from ComfyUI's TAESD), seeded He-style init."""
    import comfy.taesd.taesd

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in comfy.taesd.taesd.TAESD().state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if key == "vae_scale":
            t = torch.tensor(1.0)
        elif key == "vae_shift":
            t = torch.tensor(0.0)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
            t = torch.randn(shape, generator=gen) * (1.0 / fan_in) ** 0.5
        sd[prefix + key] = t
    return sd


def kl_vae_state_dict(seed: int, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """The SD KL VAE (LDM keys, names/shapes from ComfyUI's AutoencoderKL) as views into a random pool."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        shapes = {
            k: tuple(v.shape)
            for k, v in AutoencoderKL(ddconfig=dict(SD_KL_VAE_DDCONFIG), embed_dim=4).state_dict().items()
        }
    pool = _Pool(seed + 2, std=0.05)
    sd = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if "norm" in key and key.endswith(".weight"):
            t = pool.const(1.0, shape)
        elif key.endswith(".bias"):
            t = pool.const(0.0, shape)
        else:
            t = pool.view(shape)
        sd[prefix + key] = t
    return sd


def build_tiny_sd2_state_dict(seed: int = DEFAULT_SEED, vae: str = "taesd") -> dict[str, torch.Tensor]:
    from .comfy import bootstrap

    bootstrap()
    unet = tiny_sd2_unet_diffusers(seed)
    ldm = diffusers_unet_to_ldm({k: v.detach().clone() for k, v in unet.state_dict().items()})
    sd = {"model.diffusion_model." + k: v for k, v in ldm.items()}
    if _VPRED_BIAS in sd:  # a random bias here would make ComfyUI pick v-prediction; SD-2-base is epsilon
        sd[_VPRED_BIAS] = torch.zeros_like(sd[_VPRED_BIAS])
    sd.update(openclip_h_text_state_dict(seed))
    if vae == "taesd":
        sd.update(taesd_state_dict(seed))
    elif vae == "kl":
        sd.update(kl_vae_state_dict(seed))
    else:
        raise ValueError(f"vae must be 'taesd' or 'kl', not {vae!r}")
    return sd


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def checkpoints_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / "checkpoints"


def checkpoint_name(seed: int = DEFAULT_SEED, vae: str = "taesd") -> str:
    stem = CHECKPOINT_NAME.removesuffix(".ckpt")
    return stem + ("" if vae == "taesd" else f"_{vae}") + ("" if seed == DEFAULT_SEED else f"_s{seed}") + ".ckpt"


def ensure_tiny_sd2_checkpoint(seed: int = DEFAULT_SEED, root: Path | None = None, vae: str = "taesd") -> Path:
    """Path of the tiny SD-2 checkpoint in the cache, generating it when absent or stale.

    ``vae``: "taesd" (default, fast) or "kl" (the full-size SD KL VAE).
    """
    folder = checkpoints_dir(root)
    path = folder / checkpoint_name(seed, vae)
    stamp_path = path.with_suffix(".stamp.json")
    want = {"version": FIXTURE_VERSION, "seed": seed, "vae": vae, "torch": torch.__version__.split("+")[0]}
    with _locked(folder / ".lock"):
        if path.is_file() and stamp_path.is_file():
            stamp = json.loads(stamp_path.read_text())
            if {k: stamp.get(k) for k in want} == want and stamp.get("size") == path.stat().st_size:
                return path
        log.info("generating tiny SD-2 checkpoint %s", path)
        sd = build_tiny_sd2_state_dict(seed, vae)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": sd}, tmp)
        os.replace(tmp, path)
        stamp_path.write_text(json.dumps({**want, "size": path.stat().st_size, "sha256": sha256_file(path)}, indent=1))
    return path
