"""Learnability proof for MS-GAM guidance (issue 9): a synthetic task where each map carries what the LR lacks.

The task. An HR image (32 px) is a 2x2 grid of quadrants; per quadrant three independent fair coins decide
- its red level (0.15 / 0.85), which the *depth* map shows as the quadrant's relative inverse depth (far / near),
- its green level, which the *segmentation* map shows as the quadrant's ADE20K class (sky / tree, palette colours),
- its blue level, which the *HED* map shows as the quadrant's object outline (white edges on black, or none).
The LR image the ControlNet sees is flat grey: the HR content can be read from the maps only, and each map
carries exactly one colour channel's worth of it, so a model that ignores one map cannot recover that channel.

The base (:func:`write_proof_base`). A frozen *random* U-Net cannot denoise anything, so a ControlNet steering it
has nothing to steer (first attempt: eps-MSE 0.42, gaps under 1 %). SD-2 knows the image prior and MegaSR's
control only has to pick the mode; so the proof gives its tiny SD-2 the same: the tiny U-Net of the ComfyUI test
checkpoints (320 channels: the smallest ComfyUI detects as SD-2) gets a short plain denoising pretraining on the
task's HR images (:func:`pretrain_prior`, no control, empty prompt), and the VAE is the test checkpoint's TAESD
with its latent scale set to SD's and its decoder trained to reconstruct the task's images
(:func:`pretrain_decoder`; the encoder stays random). Everything lives in one LDM ``.ckpt`` that the training
stage and ComfyUI's *Load Checkpoint* both load, so the trained weights run in the nodes on the very networks they
were trained with (the test checks that too).

Training goes through the real MegaSR training code path: :class:`training.stage_megasr.MegaSRStage` (frozen
U-Net/text encoder from the checkpoint, trainable ControlNet = copy of the pretrained encoder + CISM² + MS-GAM),
its modality dropout (``modality_keep`` / ``apply_modality_dropout``, 0.3 per map), noise/timestep draw and
Eq. 4 loss, optimised by :func:`training.loop.run_training` (accelerate, Adam from :func:`training.runs.build_adam`),
exported with :func:`megasr.model_io.save_megasr_model`. Only the data differs from ``python -m training megasr``:
synthetic HR + maps instead of photos + DAGE extractors (a DAGE map is a function of the LR; here it must carry
what the LR lacks), encoded by :class:`ProofVAE` as ComfyUI encodes.

Evaluation on 32 held-out samples (other seeds, fixed noise) at t = 50, 150, 300, 500, 700, 900 (low/mid t is
where guidance matters; 900 kept for honesty): eps-MSE with the true maps, with one map at a time taken from
another sample of the batch ("shuffled"), and with no map. Gap = mean over t of (MSE shuffled - MSE true) /
MSE true. Negative controls, trained exactly the same way and evaluated on the same aligned held-out data:
``disconnected`` (maps drawn from coins independent of the HR: they carry nothing) and ``misaligned`` (the true
maps shifted by one quadrant: a registration bug; every map still holds all the coins, in the wrong place).

First honest run (2026-12-02, shared 2-core CPU, one thread; prior 200 steps batch 16 Adam 1e-3; MegaSR 200
steps batch 8 Adam 2e-3; ~10.5 min for the base and the three models):

    | model trained on  | hed   | depth  | seg   | all absent | eps-MSE (true maps) |
    | true maps         | +4.5% | +25.7% | +8.9% | +15.2%     | 0.1726 |
    | disconnected maps | -0.1% | -0.1%  | -0.0% | -1.8%      | 0.1921 |
    | misaligned maps   | +0.3% | +0.1%  | -1.1% | -15.6%     | 0.2105 |

Thresholds (about a third of the trained model's gap, each at least 5x the largest control gap): hed 1.5 %,
depth 8 %, seg 3 % (``tests/tools/test_learnability_proof.py``). Depth steers most because the random TAESD encoder
keeps the red channel best; green and blue reach the latent weaker, hence smaller (but clear) seg / HED gaps.
The misaligned model is *worse* with its maps than without on aligned data (all absent -15.6 %): it uses them,
at the wrong place. Through the nodes (``tests/tools/test_learnability_proof.py``, shipped megasr_swap_guidance workflow), mean abs output
difference 0..255, trained / untrained: swap hed 11.4 / 0.000, depth 48.2 / 0.000, seg 27.2 / 0.000; strength
0 vs 1 hed 7.0 / 0.000, depth 39.8 / 0.000, seg 14.9 / 0.000. The exported files are 76 MB each: generate them, never commit them.

Run by hand (one CPU slot) to make the weights and print the numbers (the README's table is pasted from it)::

    .venv/bin/python scripts/tools/learnability_proof.py --out runs/proof --export
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("megasr.proof")
MAP_KINDS = ("hed", "depth", "seg")
SIZE = 32  # HR / output size in pixels: latent 4x4, each quadrant 2x2 latent cells
LOW, HIGH = 0.15, 0.85
SEG_CLASSES = (2, 4)  # ADE20K "sky", "tree" (0-based class indices into the palette)
#: Eval timesteps: the eps error from a wrong x0 estimate scales with sqrt(abar / (1 - abar)), so low and mid
#: noise levels are where guidance matters; very high t (x_t almost pure noise) is included for honesty.
EVAL_TIMESTEPS = (50, 150, 300, 500, 700, 900)
PRIOR_STEPS = 200  # plain denoising pretraining of the tiny U-Net (its "SD-2 pretraining")
PRIOR_LR = 1e-3
PRIOR_BATCH = 16
DECODER_STEPS = 150  # the TAESD decoder's reconstruction training (the encoder stays random)
TRAIN_STEPS = 200
TRAIN_BATCH = 8
TRAIN_LR = 2e-3
EVAL_SAMPLES = 32


@dataclass
class SyntheticBatch:
    hr: torch.Tensor  # [B, 3, S, S] in 0..1
    hint: torch.Tensor  # [B, 3, S, S]: the flat-grey LR at output size
    maps: dict[str, torch.Tensor]  # hed/depth [B, 1, s, s], seg [B, 3, s, s] at the LR size s = S / 4


def _quadrants(bits: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 2, 2] -> [B, 1, S, S], each quadrant filled with its value."""
    return bits[:, None].float().repeat_interleave(size // 2, -2).repeat_interleave(size // 2, -1)


def _outline(size: int) -> torch.Tensor:
    """A quadrant-sized square outline, 1 px wide on the quadrant border: [S/2, S/2]."""
    q = size // 2
    m = torch.ones(q, q)
    m[1:-1, 1:-1] = 0.0
    return m


def render(bits: torch.Tensor, map_bits: torch.Tensor | None = None, size: int = SIZE) -> SyntheticBatch:
    """HR, flat LR hint and maps from per-quadrant coins ``bits`` [B, 3, 2, 2] (red/depth, green/seg, blue/hed);
    the maps are drawn from ``map_bits`` (default: the same coins, i.e. the true maps). The maps are made at the
    LR size, as the DAGE extractors give them; :func:`training.guidance.maps_to_output_size` resizes them."""
    from megasr.dage.encodings import ADE20K_PALETTE

    map_bits = bits if map_bits is None else map_bits
    hr = torch.cat([LOW + (HIGH - LOW) * _quadrants(bits[:, c], size) for c in range(3)], 1)
    lr = size // 4
    depth = 0.2 + 0.7 * _quadrants(map_bits[:, 0], lr)
    palette = torch.tensor([ADE20K_PALETTE[c] for c in SEG_CLASSES], dtype=torch.float32) / 255.0  # [2, 3]
    seg_q = _quadrants(map_bits[:, 1], lr)[:, 0].long()  # [B, s, s] in {0, 1}
    seg = palette[seg_q].permute(0, 3, 1, 2).contiguous()
    edge = _outline(lr).repeat(2, 2)[None, None]
    hed = _quadrants(map_bits[:, 2], lr) * edge
    hint = torch.full_like(hr, 0.5)
    return SyntheticBatch(hr=hr, hint=hint, maps={"hed": hed, "depth": depth, "seg": seg})


MAP_MODES = ("true", "disconnected", "misaligned")


def make_batch(n: int, generator: torch.Generator, *, maps: str = "true", size: int = SIZE) -> SyntheticBatch:
    """``n`` synthetic samples. ``maps``: "true" (each map shows its channel's coins), "disconnected" (the maps
    come from independent coins: they say nothing about the HR) or "misaligned" (the true maps shifted by one
    quadrant to the right, cyclically: a map/HR registration bug; every map still holds all the coins)."""
    bits = torch.rand(n, 3, 2, 2, generator=generator) < 0.5
    if maps == "true":
        map_bits = None
    elif maps == "disconnected":
        map_bits = torch.rand(n, 3, 2, 2, generator=generator) < 0.5
    elif maps == "misaligned":
        map_bits = bits.roll(1, -1)
    else:
        raise ValueError(f"maps must be one of {MAP_MODES}, not {maps!r}")
    return render(bits, map_bits, size)


VAE_LATENT_STD = 1.0 / 0.18215  # SD's raw latent std: ComfyUI's SD-2 latent format multiplies by 0.18215
SCALING = 0.18215


class ProofVAE:
    """The proof's VAE: the TAESD of the tiny ComfyUI test checkpoint (ComfyUI's own ``comfy.taesd.taesd.TAESD``,
    deterministic, x8, 4 channels), with its ``vae_scale`` set so the task's latents have SD's std.

    Training encodes with it exactly as ComfyUI's *VAE Encode* does (``encode(2x - 1)``, then the SD-2 latent
    format's 0.18215), so the trained weights see in the nodes the latents they were trained on. (The training
    stage's own VAE, the KL one, is not used by the proof: it encodes the synthetic HR itself.)
    """

    def __init__(self, sd: dict[str, torch.Tensor]) -> None:
        import comfy.taesd.taesd

        prefix = "first_stage_model."
        self.taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
        self.taesd.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        self.taesd.eval().requires_grad_(False)

    @torch.no_grad()
    def latents(self, hr: torch.Tensor) -> torch.Tensor:
        """HR images [B, 3, S, S] in 0..1 -> scaled latents [B, 4, S/8, S/8] (what the U-Net sees)."""
        return self.taesd.encode(hr * 2.0 - 1.0) * SCALING


def _condition_vae(sd: dict[str, torch.Tensor], seed: int) -> None:
    """Set the TAESD's ``vae_scale`` in ``sd`` (in place) so the task's raw latents have std 1 / 0.18215, as SD's
    trained VAE gives on photos (the random TAESD's scale is arbitrary)."""
    key = "first_stage_model.vae_scale"
    sd[key] = torch.tensor(1.0)
    hr = make_batch(64, torch.Generator().manual_seed(seed + 99)).hr
    std = float(ProofVAE(sd).latents(hr).std() / SCALING)
    sd[key] = torch.tensor(std / VAE_LATENT_STD)


def pretrain_decoder(sd: dict[str, torch.Tensor], steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Train the TAESD decoder in ``sd`` (in place; the encoder, hence every latent, unchanged) to reconstruct the
    task's HR images from their latents, as SD's VAE decoder was trained on photos: a random decoder shows almost
    nothing of the latent in the image ComfyUI decodes (map swaps changed the output by < 1 / 255 with it)."""
    vae = ProofVAE(sd)
    dec = vae.taesd.taesd_decoder.train().requires_grad_(True)
    opt = torch.optim.Adam(dec.parameters(), lr=lr)
    losses = []
    for k in range(steps):
        hr = make_batch(batch_size, torch.Generator().manual_seed(5_000_011 * (seed + 1) + k)).hr
        raw = vae.latents(hr) / SCALING
        loss = torch.nn.functional.mse_loss(vae.taesd.decode(raw), hr * 2.0 - 1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    prefix = "first_stage_model.taesd_decoder."
    sd.update({prefix + k: v.detach().clone() for k, v in dec.state_dict().items()})
    return losses


def _text_context(base: Any) -> torch.Tensor:
    from training.prompts import PromptEncoder

    with torch.no_grad():
        return PromptEncoder(base.tokenizer, base.text_encoder, torch.device("cpu"))([""])


def pretrain_prior(base: Any, vae: ProofVAE, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    """Plain denoising pretraining of the (tiny, random) U-Net on the task's HR images, no control, empty text:
    what SD-2's pretraining on photos is to MegaSR. Updates ``base.unet`` in place and freezes it again."""
    unet = base.unet.train().requires_grad_(True)
    text = _text_context(base)
    opt = torch.optim.Adam(unet.parameters(), lr=lr)
    abar = base.scheduler.alphas_cumprod.float()
    losses = []
    for k in range(steps):
        g = torch.Generator().manual_seed(7_000_001 * (seed + 1) + k)
        batch = make_batch(batch_size, g)
        latents = vae.latents(batch.hr)
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, abar.numel(), (batch_size,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * latents + (1 - a).sqrt() * noise, t, text.expand(batch_size, -1, -1)).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    unet.eval().requires_grad_(False)
    return losses


def write_proof_base(folder: Path, seed: int = 0, prior_steps: int = PRIOR_STEPS) -> tuple[Path, list[float]]:
    """The proof's SD-2 base: one LDM-layout ``.ckpt`` that both the training stage and ComfyUI's
    ``CheckpointLoaderSimple`` load, so the trained weights run in the nodes on the very networks they were
    trained with: the tiny SD-2 U-Net of the test checkpoints after :func:`pretrain_prior`, the TAESD of
    :class:`ProofVAE`, the full-size OpenCLIP ViT-H text tower (random). Returns it and the prior's losses."""
    from diffusers import AutoencoderKL
    from harness.checkpoints import _VPRED_BIAS, build_tiny_sd2_state_dict, diffusers_unet_to_ldm
    from megasr_training_fixtures import TINY_VAE_CONFIG

    folder.mkdir(parents=True, exist_ok=True)
    sd = build_tiny_sd2_state_dict(seed, vae="taesd")
    _condition_vae(sd, seed)
    decoder_losses = pretrain_decoder(sd, DECODER_STEPS, PRIOR_BATCH, PRIOR_LR, seed)
    log.info("proof: TAESD decoder loss %.4f -> %.4f", decoder_losses[0], decoder_losses[-1])
    path = folder / "proof_sd2.ckpt"
    torch.save({"state_dict": sd}, path)
    with torch.random.fork_rng(devices=[]):  # the stage loads a KL VAE; the proof encodes with ProofVAE
        torch.manual_seed(seed + 1)
        AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(folder / "unused_kl_vae")
    base = _load_base(path)
    losses = pretrain_prior(base, ProofVAE(sd), prior_steps, PRIOR_BATCH, PRIOR_LR, seed)
    ldm = diffusers_unet_to_ldm({k: v.detach().clone() for k, v in base.unet.state_dict().items()})
    sd.update({"model.diffusion_model." + k: v for k, v in ldm.items()})
    assert _VPRED_BIAS not in sd  # one level: ComfyUI's v-prediction probe key does not exist, epsilon it is
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"state_dict": sd}, tmp)
    tmp.replace(path)
    return path, losses


def _load_base(path: Path) -> Any:
    from training.base_models import load_base_models
    from training.config import load_config

    cfg = load_config(proof_config(path, path.parent / "prior", steps=1, batch_size=1, lr=1e-3))
    return load_base_models(cfg.megasr)


def proof_config(base: Path, out: Path, *, steps: int, batch_size: int, lr: float, seed: int = 0) -> Path:
    """A run config (JSON) on the bundled tiny settings: tiny SD-2 base, no DAGE extractor (maps are given)."""
    cfg = {
        "base": str(Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"),
        "seed": seed,
        "output_dir": str(out),
        "data": {"hr_dirs": [], "crop_size": SIZE, "num_workers": 0},
        "train": {
            "batch_size": batch_size,
            "max_steps": steps,
            "lr": lr,
            "mixed_precision": "no",
            "checkpoint_every": steps,
            "keep_last": 1,
            "log_every": max(1, steps // 10),
            "text_dropout": 0.0,
        },
        "megasr": {
            "base": str(base),
            "vae": str(base.parent / "unused_kl_vae"),
            "model": {"msgam_hidden": 16, "clip_dim": 1024},  # 1024: fits the ViT-L CLIP vision of the node tests
            "prompt": "",
            "clip_dropout": 1.0,  # no image semantics in this task (CISM² stays at its zero init)
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}_config.json"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return path


def build_stage(config_path: Path) -> Any:
    from training.config import load_config
    from training.stage_megasr import MegaSRStage

    cfg = load_config(config_path)
    return MegaSRStage(cfg, torch.device("cpu"), torch.float32)


def load_proof_vae(ckpt: Path) -> ProofVAE:
    return ProofVAE(torch.load(str(ckpt), map_location="cpu", weights_only=True)["state_dict"])


def _inputs(
    stage: Any, vae: ProofVAE, batch: SyntheticBatch, text: torch.Tensor, generator: torch.Generator, dropout: bool
) -> Any:
    """The stage's StepInputs for a synthetic batch: latents of the HR, empty text, maps (+ modality dropout)."""
    from training.guidance import apply_modality_dropout, maps_to_output_size, modality_keep
    from training.stage_megasr import StepInputs

    n = batch.hr.shape[0]
    maps = maps_to_output_size(batch.maps, tuple(batch.hr.shape[-2:]))
    if dropout:
        maps = apply_modality_dropout(maps, modality_keep(n, stage.mcfg, generator))
    return StepInputs(latents=vae.latents(batch.hr), hint=batch.hint, text=text.expand(n, -1, -1), guidance=maps)


def empty_text(stage: Any) -> torch.Tensor:
    """The empty prompt through the stage's text encoder, once ([1, 77, 1024])."""
    with torch.no_grad():
        return stage.prompts([""])


def train_proof(stage: Any, vae: ProofVAE, run_dir: Path, *, maps: str = "true") -> list[float]:
    """Train ``stage``'s MegaSR model on the synthetic task with :func:`training.loop.run_training`."""
    from training.loop import run_training
    from training.runs import build_adam, loop_config
    from training.stage_megasr import STAGE

    cfg = stage.cfg
    bs = int(cfg.train.batch_size)
    text = empty_text(stage)

    def batches(start: int, rank: int, world: int) -> Iterator[SyntheticBatch]:
        k = start
        while True:  # batch k is a pure function of (seed, k): a resumed run sees the same data
            yield make_batch(bs, torch.Generator().manual_seed(1_000_003 * (cfg.seed + 1) + k), maps=maps)
            k += 1

    def step_fn(batch: SyntheticBatch, ctx: Any) -> torch.Tensor:
        inputs = _inputs(stage, vae, batch, text, ctx.generator, dropout=True)
        noise, t = stage.draw_noise(inputs.latents, ctx.generator)
        return stage.loss(ctx.modules[STAGE], inputs, noise, t)

    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_training(
        run_dir=run_dir,
        config=loop_config(cfg),
        modules={STAGE: stage.module},
        optimizer=build_adam(stage.module.parameters(), cfg),
        step_fn=step_fn,
        batches=batches,
        extra_state={"stage": STAGE, "task": "learnability proof", "maps": maps},
    )
    stage.module.eval()
    return result.losses


@torch.no_grad()
def evaluate(stage: Any, vae: ProofVAE, n: int = EVAL_SAMPLES, seed: int = 12345) -> dict[str, list[float]]:
    """Held-out eps-MSE per timestep of :data:`EVAL_TIMESTEPS` (fixed noise): ``true`` (all maps right, aligned),
    ``absent`` (no map) and ``<kind>_shuffled`` (that map from the next sample of the batch)."""
    batch = make_batch(n, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    inputs = _inputs(stage, vae, batch, empty_text(stage), g, dropout=False)
    variants: dict[str, dict[str, torch.Tensor]] = {"true": inputs.guidance, "absent": {}}
    for kind in MAP_KINDS:
        variants[f"{kind}_shuffled"] = {**inputs.guidance, kind: inputs.guidance[kind].roll(1, 0)}
    noises = [torch.randn(inputs.latents.shape, generator=g) for _ in EVAL_TIMESTEPS]
    out: dict[str, list[float]] = {}
    for name, maps in variants.items():
        errs = []
        for t, noise in zip(EVAL_TIMESTEPS, noises, strict=True):
            ts = torch.full((n,), t, dtype=torch.long)
            a = stage.alphas_cumprod[ts].view(-1, 1, 1, 1)
            noisy = a.sqrt() * inputs.latents + (1.0 - a).sqrt() * noise
            pred = stage.module(noisy, ts, inputs.text, inputs.hint, **maps)
            errs.append(float(torch.mean((pred - noise) ** 2)))
        out[name] = errs
    return out


def relative_gaps(mse: dict[str, list[float]]) -> dict[str, float]:
    """Per map: the mean over the eval timesteps of (MSE with that map shuffled - MSE with the true maps) / MSE
    with the true maps (per timestep, so the large low-t errors do not drown the mid-t ones where the maps
    matter most); ``absent`` the same for no map at all."""

    def gap(name: str) -> float:
        return sum((x - t) / t for x, t in zip(mse[name], mse["true"], strict=True)) / len(mse["true"])

    out = {k: gap(f"{k}_shuffled") for k in MAP_KINDS}
    out["absent"] = gap("absent")
    return out


def export(stage: Any, path: Path, provenance: dict[str, Any]) -> Path:
    from megasr.model_io import save_megasr_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_megasr_model(str(path), stage.model, provenance, overwrite=True)
    return path


def run_proof(
    out: Path,
    *,
    modes: tuple[str, ...] = MAP_MODES,
    prior_steps: int = PRIOR_STEPS,
    steps: int = TRAIN_STEPS,
    batch_size: int = TRAIN_BATCH,
    lr: float = TRAIN_LR,
    export_weights: bool = False,
) -> dict[str, Any]:
    """The whole proof: base with its prior, then one MegaSR model per map mode, each evaluated on aligned
    held-out data. Returns the report (JSON-able)."""
    import time

    t0 = time.perf_counter()
    base, prior_losses = write_proof_base(out / "sd2")
    vae = load_proof_vae(base)
    report: dict[str, Any] = {
        "prior": {"steps": prior_steps, "first_losses": prior_losses[:3], "last_losses": prior_losses[-5:]},
        "settings": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "eval_timesteps": list(EVAL_TIMESTEPS),
            "eval_samples": EVAL_SAMPLES,
        },
        "base": str(base),
    }
    for mode in modes:
        t1 = time.perf_counter()
        cfg = proof_config(base, out / mode, steps=steps, batch_size=batch_size, lr=lr)
        stage = build_stage(cfg)
        if export_weights and mode == "true":  # the untrained (zero-init) model: the "before" of the node numbers
            report["untrained_weights"] = str(export(stage, out / "megasr_proof_untrained.safetensors", {}))
        losses = train_proof(stage, vae, out / mode, maps=mode)
        mse = evaluate(stage, vae)
        entry: dict[str, Any] = {
            "first_losses": losses[:3],
            "last_losses": losses[-5:],
            "mse": mse,
            "gaps": relative_gaps(mse),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        if export_weights:
            entry["weights"] = str(export(stage, out / f"megasr_proof_{mode}.safetensors", {"made_by": __file__}))
        report[mode] = entry
        del stage
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def summary_table(report: dict[str, Any]) -> str:
    """The printout's table (markdown): relative gap per map and for all maps absent, per trained model."""
    rows = ["| model trained on | hed | depth | seg | all absent | eps-MSE (true maps) |", "|---|---|---|---|---|---|"]
    for mode in MAP_MODES:
        if mode in report:
            g = report[mode]["gaps"]
            mse = sum(report[mode]["mse"]["true"]) / len(EVAL_TIMESTEPS)
            rows.append(
                f"| {mode} maps | {g['hed']:+.1%} | {g['depth']:+.1%} | {g['seg']:+.1%} | "
                f"{g['absent']:+.1%} | {mse:.4f} |"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[2]  # the test harness and fixtures (a dev tool, not product code)
    sys.path[:0] = [str(root / "tests"), str(root / "tests" / "fixtures"), str(root)]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="working folder (base, runs, weights)")
    ap.add_argument("--prior-steps", type=int, default=PRIOR_STEPS)
    ap.add_argument("--steps", type=int, default=TRAIN_STEPS)
    ap.add_argument("--batch-size", type=int, default=TRAIN_BATCH)
    ap.add_argument("--lr", type=float, default=TRAIN_LR)
    ap.add_argument("--modes", default=",".join(MAP_MODES), help="comma-separated map modes to train")
    ap.add_argument("--export", action="store_true", help="also write each model's weights file (never commit it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = run_proof(
        args.out,
        modes=tuple(args.modes.split(",")),
        prior_steps=args.prior_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        export_weights=args.export,
    )
    (args.out / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(json.dumps(report, indent=1))
    print(summary_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
