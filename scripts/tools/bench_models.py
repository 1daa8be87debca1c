"""SD-2-base-sized random weight files for the GPU benchmark (made here, never downloaded).

- ``bench_sd2_base.ckpt``: the full SD-2-base U-Net (866M, diffusers' init, seeded, renamed with ComfyUI's
  table), the full OpenCLIP ViT-H text encoder and the full KL VAE (pool views, as the test fixtures do);
- ``bench_vith.ckpt``: a ViT-H/14 CLIP vision tower in ComfyUI's layout (pool views);
- ``bench_sd2_base_megasr.safetensors``: a MegaSR file for that U-Net with every zero-init part perturbed.
The values are random: the files measure time and memory, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SD2_CKPT = "bench_sd2_base.ckpt"
VITH = "bench_vith.ckpt"
MEGASR = "bench_sd2_base_megasr.safetensors"
VERSION = "1"


def _stamp_ok(path: Path, stamp: str) -> bool:
    s = path.with_name(path.name + ".stamp")
    return path.exists() and s.exists() and s.read_text() == stamp


def _write_stamp(path: Path, stamp: str) -> None:
    path.with_name(path.name + ".stamp").write_text(stamp)


def _pool_state(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 22, generator=g) * 0.02
    ones, zeros = torch.ones(1 << 14), torch.zeros(1 << 14)
    sd = {}
    for k, shape in shapes.items():
        n = int(torch.Size(shape).numel())
        if "norm" in k and k.endswith(".weight"):
            sd[k] = ones[:n].view(shape) if n <= ones.numel() else torch.ones(shape)
        elif k.endswith(".bias"):
            sd[k] = zeros[:n].view(shape) if n <= zeros.numel() else torch.zeros(shape)
        else:
            reps = -(-n // pool.numel())
            sd[k] = (pool if reps == 1 else pool.repeat(reps))[:n].view(shape)
    return sd


def ensure_sd2_base_files(root: Path) -> dict[str, Path]:
    """Paths by ComfyUI folder name (``checkpoints``, ``clip_vision``, ``megasr``), generated when absent."""
    from harness.checkpoints import (
        _VPRED_BIAS,
        diffusers_unet_to_ldm,
        kl_vae_state_dict,
        openclip_h_text_state_dict,
    )

    from megasr.blocks import comfy_unet_config
    from megasr.model import SD2_BASE_UNET, MegaSRConfig, MegaSRModel
    from megasr.model_io import save_megasr_model

    paths = {
        "checkpoints": root / "checkpoints" / SD2_CKPT,
        "clip_vision": root / "clip_vision" / VITH,
        "megasr": root / "megasr" / MEGASR,
    }
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    stamp = f"{VERSION}-{json.dumps(SD2_BASE_UNET, sort_keys=True)}"

    if not _stamp_ok(paths["checkpoints"], stamp):
        from diffusers import UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD2_BASE_UNET)
        ldm = diffusers_unet_to_ldm(unet.state_dict(), comfy_unet_config(SD2_BASE_UNET))
        sd = {"model.diffusion_model." + k: v.half() for k, v in ldm.items()}
        sd[_VPRED_BIAS] = torch.zeros_like(sd[_VPRED_BIAS])  # SD-2-base is epsilon prediction
        sd.update(openclip_h_text_state_dict(0))
        sd.update(kl_vae_state_dict(0))
        tmp = paths["checkpoints"].with_suffix(".tmp")
        torch.save({"state_dict": sd}, tmp)
        tmp.replace(paths["checkpoints"])
        _write_stamp(paths["checkpoints"], stamp)

    if not _stamp_ok(paths["clip_vision"], stamp):
        import comfy.clip_vision

        cfg = Path(comfy.clip_vision.__file__).parent / "clip_vision_config_h.json"
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in comfy.clip_vision.ClipVisionModel(str(cfg)).model.state_dict().items()}
        tmp = paths["clip_vision"].with_suffix(".tmp")
        torch.save(_pool_state(shapes, 1), tmp)
        tmp.replace(paths["clip_vision"])
        _write_stamp(paths["clip_vision"], stamp)

    if not _stamp_ok(paths["megasr"], stamp):
        from megasr_testing import perturb_zero_inits

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            model = MegaSRModel(MegaSRConfig(unet=dict(SD2_BASE_UNET), clip_dim=1280))
        perturb_zero_inits(model, seed=3, scale=0.02)
        save_megasr_model(str(paths["megasr"]), model, {"made_by": "scripts/tools/bench_models.py"}, overwrite=True)
        _write_stamp(paths["megasr"], stamp)
    return paths
