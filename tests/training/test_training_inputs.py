"""What training feeds the models is what the nodes feed them (issue 27, part 1).

- DAGE: the student is fine-tuned on the tensor the DAGE nodes hand the extractor at inference (the raw LR
  image), and its backbone works at the teacher's working size;
- MegaSR: the noisy latent of a training step is the SD-2 DDPM schedule's (diffusers' ``add_noise``) at the very
  timestep the model is told.

The hint and maps against the nodes' for the same LR: tests/nodes/test_node_vs_training.py. The per-level CISM²
strengths: tests/core/test_level_strengths.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dage_fixtures import TINY_HED_CONFIG, TINY_SEG_CONFIG
from PIL import Image

from training.config import load_config
from training.dage import train_dage

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def dage_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dage_inputs")
    hr = root / "hr"
    hr.mkdir()
    g = torch.Generator().manual_seed(3)
    for i in range(2):  # a non-square crop source: a transposed working size would show
        pix = (torch.rand(96, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pix).save(hr / f"{i}.png")
    cfg = {
        "base": str(TINY),
        "data": {"hr_dirs": [str(hr)], "crop_size": 64},
        "train": {"max_steps": 1, "checkpoint_every": 1, "batch_size": 2},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
        "dage_seg": {"extractor": TINY_SEG_CONFIG},
    }
    path = root / "dage.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("kind", ["hed", "seg"])
def test_dage_student_is_trained_on_what_the_node_feeds_it(
    kind: str, dage_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DAGE map nodes call ``extractor(lr, resolution)`` on the raw LR image (nodes/dage.py run_extractor);
    the student must get that tensor in training, not the bicubic ``lr_up``, and reach the working size the
    teacher's HR crop reaches (so the feature and output terms compare the same pixels)."""
    from megasr.dage import extractor_class
    from training.data import DegradedBatch

    batches: list[Any] = []
    build = DegradedBatch.build

    def recording_build(*args: Any, **kwargs: Any) -> Any:
        b = build(*args, **kwargs)
        batches.append(b)
        return b

    monkeypatch.setattr(DegradedBatch, "build", recording_build)
    cls = extractor_class(kind)
    forward = cls.forward
    calls: list[tuple[bool, torch.Tensor, Any]] = []

    def recording_forward(self: Any, image: torch.Tensor, resolution: int | None = None) -> Any:
        out = forward(self, image, resolution)
        student = any(p.requires_grad for p in self.parameters())
        calls.append((student, image.detach().clone(), out.raw.shape))
        return out

    monkeypatch.setattr(cls, "forward", recording_forward)
    train_dage(kind, load_config(dage_config), tmp_path / kind)
    assert len(batches) == 1
    b = batches[0]
    student = [c for c in calls if c[0]]
    teacher = [c for c in calls if not c[0]]
    assert len(student) == 1 and len(teacher) == 1, [c[0] for c in calls]
    _, seen, student_raw = student[0]
    assert seen.shape == b.lr.shape and torch.equal(seen, b.lr.to(seen.device))
    assert not torch.equal(b.lr_up[..., : b.lr.shape[-2], : b.lr.shape[-1]], b.lr)  # lr_up would differ
    _, teacher_seen, teacher_raw = teacher[0]
    assert teacher_seen.shape == b.hr.shape
    assert student_raw[-2:] == teacher_raw[-2:]  # the same working size from the LR and the HR crop


def _recording_module() -> Any:
    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[str, torch.Tensor] = {}

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, hint: torch.Tensor, **g):
            self.seen = {"sample": sample.detach().clone(), "timestep": timestep.detach().clone()}
            return torch.zeros_like(sample)

    return Recorder()


def test_training_noise_is_the_ddpm_schedule_at_the_timestep_the_model_is_told() -> None:
    """``MegaSRStage.loss`` noises the latents with the SD-2 schedule at t and tells the model t: compared with
    diffusers' ``DDPMScheduler.add_noise`` at the same t (the nodes' sigma -> t mapping is pinned against the
    training path by tests/nodes/test_node_vs_training.py). Timesteps at both ends of the schedule."""
    from diffusers import DDPMScheduler

    from training.stage_megasr import MegaSRStage, StepInputs

    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )  # SD-2-base's scheduler_config.json
    stage = object.__new__(MegaSRStage)  # loss() reads only the schedule and the weight dtype
    stage.alphas_cumprod = sched.alphas_cumprod.clone()
    stage.num_timesteps = 1000
    stage.weight_dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    noise = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 998])
    inputs = StepInputs(latents=latents, hint=torch.zeros(4, 3, 64, 64), text=torch.zeros(4, 77, 8), guidance={})
    rec = _recording_module()
    loss = stage.loss(rec, inputs, noise, t)
    assert torch.equal(rec.seen["timestep"], t)
    expected = sched.add_noise(latents, noise, t)
    assert torch.allclose(rec.seen["sample"], expected, atol=1e-6), (rec.seen["sample"] - expected).abs().max()
    assert torch.allclose(loss, (noise**2).mean())
    drawn = [stage.draw_noise(latents, torch.Generator().manual_seed(s))[1] for s in range(50)]
    every = torch.cat(drawn)
    assert int(every.min()) >= 0 and int(every.max()) <= 999 and len(set(every.tolist())) > 100


def test_the_guidance_cache_says_when_it_cannot_hit_and_what_it_costs() -> None:
    """The cache key (the LR pixels) repeats only when the HR crop and the degradation seed do: a paper-length
    run never hits and writes about 1.6 MB per sample (terabytes in all) -- the start-of-run note says so; with
    train.overfit_batches it names the few fixed samples. Catches a note that promises hits a run cannot have."""
    from training.config import load_config
    from training.guidance import DROPOUT_KINDS, cache_note

    cfg = load_config(REPO / "training" / "configs" / "megasr_sd2.yaml")
    lr = cfg.data.crop_size // cfg.degradation.scale
    note = cache_note(cfg.megasr, cfg.train, (lr, lr), 1280, DROPOUT_KINDS)
    per_sample = (5 * lr * lr + 257 * 1280) * 4 / 1e6  # HED, depth, 3 seg channels at the LR size + ViT-H tokens
    assert f"about {per_sample:.2f} MB per sample" in note and "no hits" in note
    total_gb = per_sample * cfg.train.max_steps * cfg.train.batch_size / 1e3
    assert total_gb > 1000 and f"{total_gb:.1f} GB" in note
    cfg.train.overfit_batches = 2
    assert "every later step hits" in cache_note(cfg.megasr, cfg.train, (lr, lr), 1280, DROPOUT_KINDS)
