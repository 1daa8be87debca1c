"""SeeSR warm start (training/seesr.py) on a tiny SeeSR-layout checkpoint written here.

The checkpoint is what SeeSR publishes, shrunk: ``controlnet/`` = a diffusers ``ControlNetModel`` of the tiny SD-2
U-Net (``save_pretrained``) plus SeeSR's RAM/DAPE image-attention branch (``image_attentions`` tensors) and its
``use_image_cross_attention`` config flag; ``unet/`` = the U-Net with other weights plus the same branch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.slow


def _image_branch(state: dict[str, torch.Tensor], prefixes: tuple[str, ...], seed: int) -> dict[str, torch.Tensor]:
    """SeeSR-style extra tensors: a parallel transformer per cross-attention block reading image embeddings."""
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for p in prefixes:
        for name, shape in (
            ("norm.weight", (320,)),
            ("proj_in.weight", (320, 320)),
            ("transformer_blocks.0.attn2.to_q.weight", (320, 320)),
            ("transformer_blocks.0.attn2.to_k.weight", (320, 512)),  # RAM image embeddings are 512-d
            ("transformer_blocks.0.attn2.to_v.weight", (320, 512)),
            ("proj_out.weight", (320, 320)),
        ):
            extra[f"{p}.image_attentions.0.{name}"] = torch.randn(shape, generator=g) * 0.02
    assert not set(extra) & set(state)
    return extra


def _write_part(folder: Path, model: torch.nn.Module, extra: dict[str, torch.Tensor], fmt: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["use_image_cross_attention"] = True
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = folder / "diffusion_pytorch_model.safetensors"
    state = {**load_file(str(weights)), **extra}
    if fmt == "bin":
        weights.unlink()
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(state, str(weights))


def _seesr_controlnet(seed: int) -> torch.nn.Module:
    from diffusers import ControlNetModel
    from harness.checkpoints import tiny_sd2_unet_diffusers

    cn = ControlNetModel.from_unet(tiny_sd2_unet_diffusers())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # "trained": every tensor moved, zero convs included
        for p in cn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return cn.eval()


def write_tiny_seesr(folder: Path, fmt: str = "safetensors", mismatch: bool = False) -> dict[str, Any]:
    from harness.checkpoints import tiny_sd2_unet_diffusers

    cn = _seesr_controlnet(seed=11)
    blocks = ("down_blocks.0", "mid_block")
    cn_extra = _image_branch(cn.state_dict(), blocks, seed=12)
    if mismatch:  # e.g. a variant with a 4-channel (RGBA) condition encoder
        cn_extra["controlnet_cond_embedding.conv_in.weight"] = torch.zeros(16, 4, 3, 3)
    _write_part(folder / "controlnet", cn, cn_extra, fmt)
    unet = tiny_sd2_unet_diffusers(seed=5)  # other weights than the SD-2 base of the run
    unet_extra = _image_branch(unet.state_dict(), blocks + ("up_blocks.0",), seed=13)
    _write_part(folder / "unet", unet, unet_extra, fmt)
    return {"dir": folder, "controlnet": cn, "unet": unet, "cn_extra": cn_extra, "unet_extra": unet_extra}


def _megasr(clip_dim: int = 32):
    from harness.checkpoints import TINY_SD2_UNET_CONFIG

    from megasr.model import MegaSRConfig, MegaSRModel

    torch.manual_seed(0)
    return MegaSRModel(MegaSRConfig(unet=dict(TINY_SD2_UNET_CONFIG), clip_dim=clip_dim, msgam_hidden=16))


@pytest.fixture(scope="module")
def seesr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return write_tiny_seesr(tmp_path_factory.mktemp("seesr"))


def test_controlnet_maps_and_megasr_starts_as_seesr_without_its_image_branch(seesr: dict[str, Any]) -> None:
    from harness.checkpoints import tiny_sd2_unet_diffusers

    from megasr.adapter_diffusers import attach_megasr_to_diffusers_unet
    from megasr.model import megasr_noise_prediction
    from training.seesr import warm_start_from_seesr

    model = _megasr()
    zero_before = {k for k, v in model.state_dict().items() if not k.startswith("controlnet.") and v.abs().max() == 0}
    report = warm_start_from_seesr(model, seesr["dir"])
    cn_state = seesr["controlnet"].state_dict()
    r = report.controlnet
    assert sorted(r.mapped) == sorted(cn_state) and r.changed == len(cn_state)
    assert r.shape_mismatch == [] and r.kept == []
    assert sorted(r.unmapped) == sorted(r.image_branch) == sorted(seesr["cn_extra"])
    for k, v in model.controlnet.state_dict().items():
        assert torch.equal(v, cn_state[k]), k
    # the new MegaSR parts are untouched: their zero-initialised projections are still zero
    assert zero_before and all(model.state_dict()[k].abs().max() == 0 for k in zero_before)
    summary = report.summary()
    assert summary["controlnet"]["image_branch"] == len(seesr["cn_extra"]) and summary["unet"] is None
    json.dumps(summary)  # goes into the weight file's provenance

    # with every guidance input present, MegaSR predicts exactly SeeSR's ControlNet + the U-Net
    unet = tiny_sd2_unet_diffusers()
    adapter = attach_megasr_to_diffusers_unet(unet, model)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 6, 5, generator=g), torch.tensor([10, 700])
    text, hint = torch.randn(2, 7, 1024, generator=g), torch.rand(2, 3, 48, 40, generator=g)
    ctx = model.prepare_context(
        (6, 5),
        torch.randn(2, 9, 32, generator=g),
        torch.rand(2, 1, 12, 10, generator=g),
        torch.rand(2, 1, 12, 10, generator=g),
        torch.rand(2, 3, 12, 10, generator=g),
    )
    with torch.no_grad():
        ours = megasr_noise_prediction(unet, adapter, model, x, t, text, hint, ctx)
        down, mid = seesr["controlnet"](x, t, encoder_hidden_states=text, controlnet_cond=hint, return_dict=False)
        ref = unet(
            x, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_bin_checkpoint_shape_mismatch_and_unet_replacement(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from harness.checkpoints import tiny_sd2_unet_diffusers

    from training.seesr import warm_start_from_seesr

    seesr = write_tiny_seesr(tmp_path / "seesr_bin", fmt="bin", mismatch=True)
    assert not list((tmp_path / "seesr_bin").rglob("*.safetensors"))
    model = _megasr()
    init_conv_in = model.controlnet.controlnet_cond_embedding.conv_in.weight.detach().clone()
    unet = tiny_sd2_unet_diffusers()
    with caplog.at_level("INFO", logger="megasr.seesr_weights"):
        report = warm_start_from_seesr(model, seesr["dir"], unet=unet)
    r = report.controlnet
    assert len(r.shape_mismatch) == 1 and r.shape_mismatch[0].startswith("controlnet_cond_embedding.conv_in.weight")
    assert "SeeSR [16, 4, 3, 3]" in r.shape_mismatch[0] and r.kept == ["controlnet_cond_embedding.conv_in.weight"]
    assert torch.equal(model.controlnet.controlnet_cond_embedding.conv_in.weight, init_conv_in)
    assert len(r.mapped) == len(seesr["controlnet"].state_dict()) - 1
    u = report.unet
    assert u is not None and sorted(u.mapped) == sorted(unet.state_dict()) and u.changed > 0
    assert sorted(u.image_branch) == sorted(seesr["unet_extra"])
    for k, v in unet.state_dict().items():
        assert torch.equal(v, seesr["unet"].state_dict()[k]), k
    text = caplog.text
    assert "shape mismatch controlnet_cond_embedding.conv_in.weight" in text
    assert f"{len(seesr['cn_extra']) - 1} of SeeSR's image-attention branch" in text


def test_bad_seesr_folders(tmp_path: Path) -> None:
    from training.seesr import SeeSRError, warm_start_from_seesr

    (tmp_path / "empty").mkdir()
    with pytest.raises(SeeSRError, match="has no 'controlnet/' folder"):
        warm_start_from_seesr(_megasr(), tmp_path / "empty")
    (tmp_path / "nofiles" / "controlnet").mkdir(parents=True)
    with pytest.raises(SeeSRError, match="holds no diffusion_pytorch_model"):
        warm_start_from_seesr(_megasr(), tmp_path / "nofiles")
    foreign = tmp_path / "foreign" / "controlnet"
    foreign.mkdir(parents=True)
    save_file({"encoder.weight": torch.zeros(2, 2)}, str(foreign / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(SeeSRError, match="fits the MegaSR ControlNet"):
        warm_start_from_seesr(_megasr(), tmp_path / "foreign")


def test_warm_start_through_the_training_stage(seesr: dict[str, Any], tmp_path: Path) -> None:
    from megasr_training_fixtures import write_hr_folder, write_tiny_sd2_base

    from megasr.model_io import load_megasr_model
    from megasr.weights import read_weight_header
    from training.cli import main
    from training.config import load_config
    from training.stage_megasr import train_megasr

    base = write_tiny_sd2_base(tmp_path / "sd2")
    hr = write_hr_folder(tmp_path / "hr", count=1)
    values = {
        "base": str(Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"),
        "data": {"hr_dirs": [str(hr)], "crop_size": 32},
        "train": {"batch_size": 1, "max_steps": 1, "lr": 1e-6},
        "megasr": {"base": str(base), "model": {"clip_dim": 32, "msgam_hidden": 16}},
        "init": {"seesr_dir": str(seesr["dir"]), "seesr_unet": True},
    }
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(values))
    run = tmp_path / "run"
    run.mkdir()
    result, export, stage = train_megasr(load_config(cfg_path), run)
    assert result.step == 1 and export is not None
    prov = read_weight_header(str(export)).provenance["seesr_warm_start"]
    assert prov["controlnet"]["mapped"] == len(seesr["controlnet"].state_dict())
    assert prov["controlnet"]["image_branch"] == len(seesr["cn_extra"])
    assert prov["unet"]["image_branch"] == len(seesr["unet_extra"])
    for k, v in stage.module.unet.state_dict().items():  # the frozen U-Net is SeeSR's
        assert torch.equal(v, seesr["unet"].state_dict()[k]), k
    trained = load_megasr_model(str(export)).controlnet.state_dict()
    moved = max((trained[k] - v).abs().max().item() for k, v in seesr["controlnet"].state_dict().items())
    assert 0 < moved < 1e-4  # one Adam step at lr 1e-6 away from SeeSR's weights

    bad = ["megasr", "--config", str(cfg_path), "--output", str(tmp_path / "r2"), "--set", "init.seesr_dir=/no/such"]
    assert main([*bad, "--log-level", "ERROR"]) == 2


def test_two_process_run_from_a_seesr_warm_start_over_gloo(seesr: dict[str, Any], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m training megasr`` (DDP over gloo) from a SeeSR warm start."""
    import os
    import subprocess
    import sys

    from dage_fixtures import write_dage_weight_files
    from megasr_training_fixtures import write_hr_folder, write_tiny_sd2_base

    from megasr.model_io import load_megasr_model
    from megasr.weights import read_weight_header

    repo = Path(__file__).resolve().parents[2]
    base = write_tiny_sd2_base(tmp_path / "sd2")
    hr = write_hr_folder(tmp_path / "hr", count=2)
    hed = write_dage_weight_files(str(tmp_path / "dage"), ("dage_hed",))["dage_hed"]
    values = {
        "base": str(repo / "training" / "configs" / "tiny.yaml"),
        "data": {"hr_dirs": [str(hr)], "crop_size": 32},
        "train": {"batch_size": 1, "max_steps": 2, "lr": 1e-4},
        "megasr": {"base": str(base), "model": {"clip_dim": 32, "msgam_hidden": 16}, "dage_hed": hed},
        "init": {"seesr_dir": str(seesr["dir"])},
    }
    values["megasr"]["dage_resolution"] = 64
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(values))
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "training"]
    proc = subprocess.run(
        [*cmd, "megasr", "--config", str(cfg), "--output", str(run), "--log-level", "WARNING"],
        cwd=repo, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("megasr: step 2 (from 0)") == 1, proc.stdout  # one summary, from the main process
    assert '"world_size": 2' in (run / "checkpoints" / "step-00000002" / "state.json").read_text()
    export = run / "export" / "megasr_controlnet.safetensors"
    model = load_megasr_model(str(export))
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert read_weight_header(str(export)).provenance["seesr_warm_start"]["controlnet"]["image_branch"] == len(
        seesr["cn_extra"]
    )
