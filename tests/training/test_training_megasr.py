"""MegaSR training (training/stage_megasr.py, training/export.py) end to end on tiny real models.

The frozen base is the tiny SD-2 U-Net of the ComfyUI test checkpoint (``tiny_sd2_unet_diffusers()``), a small
KL VAE, a one-layer 1024-d CLIP text encoder and a real CLIP BPE tokenizer; guidance comes from the tiny DAGE
files of ``tests/fixtures/dage_fixtures.py`` and a 1024-d CLIP LoRA. The exported file runs in the shipped ComfyUI
workflow ``megasr_x4``.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from megasr_training_fixtures import megasr_config, write_guidance_files, write_hr_folder, write_tiny_sd2_base
from safetensors import safe_open
from safetensors.torch import load_file

from training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from training.cli import main
from training.config import load_config

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> tuple[int, str]:
    """Run ``python -m training ...`` in-process; returns (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = main([*argv, "--log-level", "WARNING"])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, buf.getvalue()


def _last_loss(stdout: str) -> float:
    m = re.search(r"last loss ([0-9.eE+-]+|nan|inf)", stdout)
    assert m, stdout
    return float(m.group(1))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("megasr_train")
    return {
        "root": root,
        "base": write_tiny_sd2_base(root / "sd2"),
        "guidance": write_guidance_files(root / "dage"),
        "hr": write_hr_folder(root / "hr"),
        "cache": root / "guidance_cache",
    }


def _config(setup: dict[str, Any], run: Path, **train: Any) -> Path:
    path = megasr_config(setup["base"], setup["guidance"], setup["hr"], run, **train)
    data = json.loads(path.read_text())
    data["megasr"]["guidance_cache"] = str(setup["cache"])
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def trained(setup: dict[str, Any]) -> dict[str, Any]:
    run = setup["root"] / "run"
    cfg = _config(setup, run, max_steps=3, batch_size=2)
    code, out = _cli("megasr", "--config", str(cfg), "--output", str(run))
    assert code == 0, out
    return {"run": run, "config": cfg, "stdout": out}


def test_stage_trains_and_exports_a_node_loadable_file(trained: dict[str, Any], tmp_path: Path) -> None:
    from megasr.model import MegaSRModel
    from megasr.model_io import load_megasr_model
    from megasr.weights import read_weight_header

    run = trained["run"]
    assert np.isfinite(_last_loss(trained["stdout"]))
    assert [p.name for p in list_checkpoints(run)] == ["step-00000003"]
    export = run / "export" / "megasr_controlnet.safetensors"
    model = load_megasr_model(str(export))
    assert isinstance(model, MegaSRModel) and model.config.clip_dim == 1024
    state = load_checkpoint(latest_checkpoint(run))
    trained_state = {k[len("model.") :]: v for k, v in state["modules"]["megasr"].items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained_state[k]), k
    # every zero-initialised part was trained away from zero (ControlNet zero convs, CISM² Z_b, MS-GAM P_b)
    for key, value in model.state_dict().items():
        if re.search(r"controlnet_(down_blocks\.\d+|mid_block)\.weight$|\.(cism|msgam)\.proj\.weight$", key):
            assert value.abs().max() > 0, key
    info = read_weight_header(str(export))
    assert info.component == "controlnet" and info.base["context_dim"] == 1024
    prov = info.provenance
    assert prov["stage"] == "megasr" and prov["step"] == 3 and prov["checkpoint"] == "step-00000003"
    assert prov["run_config"]["megasr"]["dage_resolution"] == 64 and "git_commit" in prov

    # python -m training export --run DIR --out FILE: same tensors; refuses to overwrite; --overwrite replaces
    out = tmp_path / "exported" / "trained_tiny_megasr.safetensors"
    assert _cli("export", "--run", str(run), "--out", str(out))[0] == 0
    a, b = load_file(str(export)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = out.stat().st_mtime_ns
    code, _ = _cli("export", "--run", str(run), "--out", str(out))
    assert code == 2 and out.stat().st_mtime_ns == before
    assert _cli("export", "--run", str(run), "--out", str(out), "--overwrite")[0] == 0
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["megasr.provenance"])["step"] == 3

    # --dtype bf16: every tensor stored in bf16 (half the file), the same values rounded once (issue 17)
    half = tmp_path / "exported" / "trained_tiny_megasr_bf16.safetensors"
    assert _cli("export", "--run", str(run), "--out", str(half), "--dtype", "bf16")[0] == 0
    h = load_file(str(half))
    assert h.keys() == a.keys() and all(h[k].dtype == torch.bfloat16 and torch.equal(h[k], a[k].bfloat16()) for k in a)


def test_export_refusals_and_bad_inputs_exit_2(
    trained: dict[str, Any], setup: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "taken.safetensors"
    existing.write_bytes(b"keep me")
    cfg = str(trained["config"])
    cases = [
        (["export", "--run", str(trained["run"]), "--out", str(existing)], "--out", "already exists"),
        (["export", "--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")], "--run", ""),
        (["export", "--run", str(trained["run"]), "--out", str(tmp_path / "m.ckpt")], "--out", ".safetensors"),
        (
            ["export", "--run", str(trained["run"]), "--from", "dage-hed", "--config", cfg, "--out", "y"],
            "--from",
            "not dage-hed",
        ),
        (["megasr", "--config", cfg, "--output", str(tmp_path / "a"), "--set", "megasr.base=/no/such"], "megasr", ""),
        (
            ["megasr", "--config", cfg, "--output", str(tmp_path / "b"), "--set", "megasr.dage_clip=/no/such.st"],
            "megasr.dage_clip",
            "",
        ),
        (["megasr", "--config", cfg, "--output", str(trained["run"])], "--output", "--resume"),
        (
            [
                "megasr",
                "--config",
                cfg,
                "--output",
                str(trained["run"]),
                "--resume",
                "--set",
                "megasr.model.msgam_hidden=8",
            ],
            "--resume",
            "msgam_hidden",
        ),
        (
            ["megasr", "--config", cfg, "--output", str(tmp_path / "c"), "--set", "megasr.dage_depth_base=null"],
            "megasr.dage_depth_base",
            "needs its base weights",
        ),
    ]
    for argv, option, text in cases:
        assert main([*argv, "--log-level", "ERROR"]) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {option}" in err and text in err and "Traceback" not in err, (argv, err)
    assert existing.read_bytes() == b"keep me"


def test_loss_decreases_on_a_fixed_batch(setup: dict[str, Any], tmp_path: Path) -> None:
    from training.stage_megasr import train_megasr

    run = tmp_path / "fixed"
    cfg_path = _config(setup, run, max_steps=20, batch_size=1, overfit_batches=1, lr=1e-3, checkpoint_every=100)
    cfg = load_config(cfg_path)
    run.mkdir()
    result, export, stage = train_megasr(cfg, run)
    losses = result.losses
    assert len(losses) == 20 and all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    # one image, one degradation: guidance computed once, then read from the disk cache
    assert stage.guidance.misses <= 1 and stage.guidance.hits >= 19, (stage.guidance.misses, stage.guidance.hits)
    assert export is not None and export.is_file()

    # text: tags from <image>.txt (else the configured prompt), replaced by "" with p = train.text_dropout
    from training.prompts import captions_for

    paths = [str(setup["hr"] / "img0.png"), str(setup["hr"] / "img1.png")]
    assert captions_for(paths, "clean", True) == ["cat, tree, sky", "clean"]
    assert captions_for(paths, "clean", False) == ["clean", "clean"]
    hr = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    enc = stage.prompts(["cat, tree, sky", "clean, high resolution", ""])
    assert not torch.equal(enc[0], enc[2])
    for p, want in ((0.0, enc[:2]), (1.0, enc[2:].expand(2, -1, -1))):
        stage.cfg.train.text_dropout = p
        got = stage.make_inputs(hr, paths, torch.Generator().manual_seed(0)).text
        assert torch.equal(got, want), p
    stage.cfg.train.text_dropout = 0.5
    dropped = [
        bool(torch.equal(t, enc[2]))
        for s in range(40)
        for t in stage.make_inputs(hr[:1], paths[:1], torch.Generator().manual_seed(s)).text
    ]
    assert 8 <= sum(dropped) <= 32  # Binomial(40, 0.5)

    # modality dropout: a dropped map is the null (zero) map the nodes feed for an absent map, a dropped CLIP
    # semantics a per-sample CISM² weight of 0; each kind independently, with its own probability
    stage.cfg.train.text_dropout = 0.0
    kinds = ("hed", "depth", "seg")
    for kind in kinds:
        setattr(stage.mcfg, f"{kind}_dropout", 0.0)
    stage.mcfg.clip_dropout = 0.0
    hr = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))  # 16 px LR: no flat depth map
    kept = stage.make_inputs(hr, paths, torch.Generator().manual_seed(0)).guidance
    assert all(kept[k].flatten(1).abs().amax(1).min() > 0 for k in kinds) and kept["clip_keep"].tolist() == [1, 1]
    stage.mcfg.depth_dropout = 1.0
    g = stage.make_inputs(hr, paths, torch.Generator().manual_seed(0)).guidance
    assert torch.count_nonzero(g["depth"]) == 0
    assert all(torch.equal(g[k], kept[k]) for k in ("hed", "seg", "clip", "clip_keep"))  # the others untouched
    for kind in (*kinds, "clip"):
        setattr(stage.mcfg, f"{kind}_dropout", 0.5)
    drops = {k: [] for k in (*kinds, "clip")}
    for seed in range(40):
        g = stage.make_inputs(hr[:1], paths[:1], torch.Generator().manual_seed(seed)).guidance
        for k in kinds:
            drops[k].append(bool(torch.count_nonzero(g[k]) == 0))
        drops["clip"].append(g["clip_keep"].item() == 0)
    assert all(8 <= sum(v) <= 32 for v in drops.values()), {k: sum(v) for k, v in drops.items()}
    assert len({tuple(v) for v in drops.values()}) == 4  # independent draws, not one shared coin
    # a sample whose semantics are dropped is predicted as if no semantics were given
    module = stage.module
    g = stage.make_inputs(hr[:1], paths[:1], torch.Generator().manual_seed(0)).guidance
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300])
    text = stage.prompts(["clean"])
    hint = torch.rand(1, 3, 64, 64)
    maps = {k: g[k] for k in kinds}
    with torch.no_grad():
        perturbed = {n: p.clone() for n, p in module.model.named_parameters()}
        for n, prm in module.model.named_parameters():  # trained-like: the CISM² projections are non-zero
            if torch.count_nonzero(prm) == 0:
                prm.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
        dropped = module(x, t, text, hint, clip=g["clip"], clip_keep=torch.zeros(1), **maps)
        absent = module(x, t, text, hint, clip=None, **maps)
        with_clip = module(x, t, text, hint, clip=g["clip"], clip_keep=torch.ones(1), **maps)
        for n, prm in module.model.named_parameters():
            prm.copy_(perturbed[n])
    torch.testing.assert_close(dropped, absent, atol=0, rtol=0)
    assert (with_clip - absent).abs().max() > 1e-5


def test_resume_after_interruption_equals_an_uninterrupted_run(setup: dict[str, Any], tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    cfg = _config(setup, full, max_steps=10, batch_size=1, checkpoint_every=5)
    code, out_full = _cli("megasr", "--config", str(cfg), "--output", str(full))
    assert code == 0, out_full
    code, _ = _cli("megasr", "--config", str(cfg), "--output", str(part), "--max-steps", "5")
    assert code == 0 and latest_checkpoint(part).name == "step-00000005"
    code, out_part = _cli("megasr", "--config", str(cfg), "--output", str(part), "--resume")
    assert code == 0 and "from 5" in out_part, out_part
    assert _last_loss(out_part) == _last_loss(out_full)
    a, b = load_checkpoint(latest_checkpoint(full)), load_checkpoint(latest_checkpoint(part))
    assert a["step"] == b["step"] == 10
    sa, sb = a["modules"]["megasr"], b["modules"]["megasr"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)


def test_guidance_matches_the_nodes_encoding_and_cache(setup: dict[str, Any], tmp_path: Path) -> None:
    from megasr.dage import encodings, load_extractor
    from training.config import MegaSRStageConfig
    from training.guidance import GuidanceExtractor, maps_to_output_size

    g = setup["guidance"]
    mcfg = MegaSRStageConfig(
        dage_hed=g["dage_hed"],
        dage_depth=g["dage_depth_lora"],
        dage_depth_base=g["depth_base"],
        dage_seg=g["dage_seg"],
        dage_resolution=64,
        guidance_cache=str(tmp_path / "cache"),
    )
    ext = GuidanceExtractor(mcfg, torch.device("cpu"))
    lr = torch.rand(2, 3, 16, 20, generator=torch.Generator().manual_seed(0))
    first = ext(lr)
    assert (ext.misses, ext.hits) == (2, 0)
    again = ext(lr)
    assert (ext.misses, ext.hits) == (2, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first["hed"].shape == (2, 1, 16, 20) and first["seg"].shape == (2, 3, 16, 20)
    # the depth map is what the DAGE Depth node outputs, read back by MS-GAM: normalised per image, 1 channel
    depth = load_extractor(g["dage_depth_lora"], base_path=g["depth_base"])
    with torch.no_grad():
        node_image = encodings.depth_to_image(depth(lr, 64).map.float())  # .raw stays at the working size
    assert torch.allclose(first["depth"], encodings.depth_to_network(node_image), atol=1e-6)
    assert first["depth"].amax(dim=(1, 2, 3)).allclose(torch.ones(2))
    up = maps_to_output_size(first, (64, 80))
    assert up["hed"].shape == (2, 1, 64, 80) and up["seg"].shape == (2, 3, 64, 80)
    palette = encodings.palette_tensor()
    colours = up["seg"].permute(0, 2, 3, 1).reshape(-1, 1, 3)
    assert ((colours - palette).abs().amax(-1).amin(-1) == 0).all()  # nearest resize keeps palette colours


def test_exported_file_runs_in_the_comfyui_workflow(
    trained: dict[str, Any],
    comfy_runner: Any,
    tiny_sd2_ckpt: str,
    object_info: dict,
    tmp_path: Path,
    no_key_problems: None,
) -> None:
    from megasr_fixtures import megasr_env, run_image

    folder = tmp_path / "megasr_models"
    out = folder / "trained_by_test_training_megasr.safetensors"
    assert _cli("export", "--run", str(trained["run"]), "--out", str(out))[0] == 0
    env = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    comfy_runner.register_model_dir("megasr", folder)
    img = run_image(
        env,
        "megasr_x4",
        **{
            "MegaSRModelLoader.megasr_name": out.name,
            "MegaSRSampler.seed": 11,
            "SaveImage.filename_prefix": "trained_megasr",
        },
    )
    assert img.shape == (44, 52, 3)  # exactly 4 x the 13 x 11 LR test image
    assert np.isfinite(img.astype(float)).all() and img.std() > 0


def test_unet_from_a_single_checkpoint_file(tiny_sd2_ckpt: str) -> None:
    """``megasr.unet`` may be an LDM-layout SD checkpoint (here the tiny ComfyUI one): the very same U-Net."""
    from harness.checkpoints import TINY_SD2_UNET_CONFIG, checkpoints_dir, tiny_sd2_unet_diffusers

    from training.base_models import load_unet
    from training.config import MegaSRStageConfig

    path = checkpoints_dir() / tiny_sd2_ckpt
    mcfg = MegaSRStageConfig(unet=str(path), unet_config=dict(TINY_SD2_UNET_CONFIG))
    unet = load_unet(mcfg)
    ref = tiny_sd2_unet_diffusers().state_dict()
    got = unet.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(p.requires_grad for p in unet.parameters())


def test_bundled_megasr_configs_parse() -> None:
    from training.cli import _resolve_config_path

    for name in ("megasr_sd2", "megasr_seesr"):
        cfg = load_config(_resolve_config_path(name))
        assert cfg.train.lr == 2.5e-5 and cfg.train.batch_size == 16 and cfg.train.text_dropout == 0.5
        assert cfg.data.crop_size == 512 and cfg.megasr.target == "hr_usm" and cfg.megasr.dage_resolution == 512
    seesr = load_config(_resolve_config_path("megasr_seesr"))
    assert seesr.output_dir == "runs/megasr_seesr"
    # SeeSR exactly: its representation branch, fed by RAM/DAPE (asked for before anything loads)
    assert seesr.megasr.model["representation_dim"] == 512
    from training.preflight import megasr_input_problems

    assert "megasr.ram" in [p.option for p in megasr_input_problems(seesr)]


def test_export_reads_the_stage_of_a_dage_run(setup: dict[str, Any], tmp_path: Path) -> None:
    """``export --run DIR --out FILE`` with no --config/--from: the stage and config come from the run."""
    from dage_fixtures import TINY_HED_CONFIG

    from megasr.dage import load_extractor

    values = {
        "base": str(Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml"),
        "data": {"hr_dirs": [str(setup["hr"])], "crop_size": 32},
        "train": {"batch_size": 1, "max_steps": 1},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
    }
    cfg = tmp_path / "hed.json"
    cfg.write_text(json.dumps(values))
    run = tmp_path / "hedrun"
    assert _cli("dage-hed", "--config", str(cfg), "--output", str(run))[0] == 0
    out = tmp_path / "hed_export.safetensors"
    assert _cli("export", "--run", str(run), "--out", str(out))[0] == 0
    model = load_extractor(str(out))
    assert model.kind == "hed"
    assert _cli("export", "--run", str(run), "--out", str(tmp_path / "x.safetensors"), "--from", "megasr")[0] == 2
    megasr_cfg = _config(setup, tmp_path / "unused")
    assert _cli("megasr", "--config", str(megasr_cfg), "--output", str(run), "--resume")[0] == 2  # not a megasr run


def test_a_fresh_model_starts_as_the_pretrained_unet() -> None:
    """ControlNet = the U-Net's encoder (as ``ControlNetModel.from_unet``), zero convs / projections at zero: the
    first MegaSR prediction, with every guidance input present, is the frozen U-Net's own."""
    from diffusers import ControlNetModel
    from harness.checkpoints import tiny_sd2_unet_diffusers

    from training.config import RunConfig
    from training.errors import UsageError
    from training.stage_megasr import MegaSRTrainModule, build_megasr_model

    unet = tiny_sd2_unet_diffusers().requires_grad_(False)
    cfg = RunConfig()
    cfg.megasr.model = {"msgam_hidden": 16}
    model = build_megasr_model(cfg, unet, clip_dim=24)
    ref = ControlNetModel.from_unet(unet).state_dict()
    got = model.controlnet.state_dict()
    copied = [k for k in ref if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    assert copied and all(torch.equal(got[k], ref[k]) for k in copied)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 5, 6, generator=g), torch.tensor([321])
    text = torch.randn(1, 7, 1024, generator=g)
    guidance = {
        "clip": torch.randn(1, 9, 24, generator=g),
        "hed": torch.rand(1, 1, 40, 48, generator=g),
        "depth": torch.rand(1, 1, 40, 48, generator=g),
        "seg": torch.rand(1, 3, 40, 48, generator=g),
    }
    with torch.no_grad():
        ours = MegaSRTrainModule(model, unet)(x, t, text, torch.rand(1, 3, 40, 48, generator=g), **guidance)
        plain = unet(x, t, encoder_hidden_states=text).sample
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    cfg.megasr.model = {"connector": "transformer"}
    with pytest.raises(UsageError, match="megasr.model"):
        build_megasr_model(cfg, unet, clip_dim=24)
