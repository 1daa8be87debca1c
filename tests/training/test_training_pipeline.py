"""``megasr-train all``: photo folder + single-file SD-2 checkpoint -> every weight file, resumable, then the
shipped workflow runs with what it installed (issue 13)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from dage_fixtures import TINY_DEPTH_CONFIG, TINY_HED_CONFIG, TINY_SEG_CONFIG
from megasr_training_fixtures import TINY_CLIP_1024, write_guidance_files, write_hr_folder

from training.cli import main
from training.pipeline import EXPORT_NAMES, PIPELINE_STAGES

REPO = Path(__file__).resolve().parents[2]
DAGE_STAGES = PIPELINE_STAGES[:4]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _config(folder: Path) -> Path:
    cfg = {
        "base": str(REPO / "training" / "configs" / "tiny.yaml"),
        "data": {"crop_size": 64},
        "train": {"max_steps": 2, "checkpoint_every": 2, "lr": 1e-3, "batch_size": 1},
        "dage_hed": {"extractor": TINY_HED_CONFIG},
        "dage_depth": {"extractor": TINY_DEPTH_CONFIG},
        "dage_seg": {"extractor": TINY_SEG_CONFIG},
        "dage_clip": {"extractor": TINY_CLIP_1024},
        "megasr": {"model": {"msgam_hidden": 16}, "dage_resolution": 64, "prompt": "clean, high resolution"},
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_manifest_names_are_the_install_names() -> None:
    """The pipeline installs under the names the shipped workflows and the manifest use (a renamed file in one
    place would leave the workflows pointing at nothing)."""
    manifest = json.loads((REPO / "megasr" / "manifest.json").read_text(encoding="utf-8"))
    names = {f for e in manifest["entries"] if e["folder"] == "megasr" for f in (x["name"] for x in e["files"])}
    assert set(EXPORT_NAMES.values()) <= names
    shipped = (REPO / "workflows" / "megasr_x4.json").read_text(encoding="utf-8")
    assert all(name in shipped for name in EXPORT_NAMES.values())


def test_all_problems_of_every_stage_at_once_and_foreign_files_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing photo folder, a depth base that does not exist and a foreign file in the models folder: one
    message naming --input, --depth-base and the file, exit 2, nothing trained. Catches checks made stage by
    stage (the megasr base found missing after an hour of DAGE training) and an install that overwrites a
    user's file."""
    models = tmp_path / "models"
    (models / "megasr").mkdir(parents=True)
    (models / "megasr" / EXPORT_NAMES["megasr"]).write_bytes(b"the user's own file")
    out = tmp_path / "run"
    code, _, err = _cli(
        capsys,
        *("all", "--config", str(_config(tmp_path)), "--input", str(tmp_path / "nope")),
        *("--depth-base", str(tmp_path / "missing-depth"), "--out", str(out), "--models-dir", str(models)),
    )
    assert code == 2, err
    assert "--input" in err and "--depth-base" in err and EXPORT_NAMES["megasr"] in err and "--force" in err
    assert "Traceback" not in err
    assert not (out / "dage-hed").exists()
    assert (models / "megasr" / EXPORT_NAMES["megasr"]).read_bytes() == b"the user's own file"


def test_a_base_whose_vae_cannot_load_fails_before_any_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_sd2_ckpt: str
) -> None:
    """A single-file SD checkpoint with a TAESD instead of the KL VAE (the tiny ComfyUI test checkpoint): ``all``
    refuses it in its preflight -- every base file opened, headers only -- in one message naming --base and the
    TAESD, exit 2, before the DAGE stages train (which once ran 12.6 minutes first and then dumped a state
    dict). Catches a base checked for existence only, or checked when its stage starts."""
    from harness.checkpoints import checkpoints_dir

    photos = write_hr_folder(tmp_path / "photos", count=2)
    out = tmp_path / "run"
    code, _, err = _cli(
        capsys,
        *("all", "--config", str(_config(tmp_path)), "--input", str(photos), "--out", str(out)),
        *("--base", str(checkpoints_dir() / tiny_sd2_ckpt)),
    )
    assert code == 2, err
    assert "TAESD" in err and "KL VAE" in err and ("--base" in err or "megasr.base" in err), err
    assert "Traceback" not in err and "Missing key" not in err and len(err) < 1500, err
    assert not (out / "dage-hed").exists()


RECIPE_MARK = "<!-- recipe "


def readme_recipe(path: Path) -> list[list[str]]:
    """The fenced commands after the recipe marker of ``path``: one argv per command (``\\`` continuations)."""
    text = path.read_text(encoding="utf-8")
    block = text[text.index(RECIPE_MARK) :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_both_readmes_give_the_same_recipe() -> None:
    """One recipe, word for word, in README.md and training/README.md (a fix in one would leave the other
    wrong), and it uses the console script."""
    top, training = readme_recipe(REPO / "README.md"), readme_recipe(REPO / "training" / "README.md")
    assert top == training and [c[:2] for c in top] == [["megasr-train", "all"], ["megasr-train", "export"]]


def _substitute(argv: list[str], table: dict[str, str]) -> list[str]:
    """The recipe's example paths -> the tiny ones (a path inside one, e.g. runs/megasr-all/megasr, too)."""
    out = []
    for word in argv:
        for example, tiny in table.items():
            if word == example or word.startswith(example + "/"):
                word = tiny + word[len(example) :]
                break
        out.append(word)
    return out


@pytest.mark.slow
def test_readme_recipe_runs_resumes_after_dage_and_the_workflow_runs_its_files(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    comfy_runner,  # noqa: ANN001
    tiny_sd2_ckpt: str,
    tiny_sd2_kl_ckpt: str,
    object_info: dict,
) -> None:
    """The README recipe as written, with the tiny paths substituted (and --config for tiny sizes): from photos
    + the single-file tiny SD-2 checkpoint (LDM .ckpt: KL VAE, OpenCLIP text tower; tokenizer from ComfyUI's
    files) + tiny HED .pth, depth file, Mask2Former folder and CLIP vision file. Interrupted after the DAGE
    stages (--stop-after), the rerun leaves every DAGE file untouched (bytes and mtimes), trains megasr wired
    to those exports and installs all five files; a third run trains nothing; the recipe's export command
    writes a bf16 file. The shipped megasr_x4 workflow then runs with the installed files.
    Catches a resume that retrains or rewrites a finished stage, megasr wired to other DAGE files than the
    run's, an install of the wrong file under a name (the node loaders refuse a HED file as seg, a LoRA
    without its base), names the workflows do not load and a README recipe that does not run."""
    from dage_fixtures import tiny_hed, tiny_seg
    from harness.checkpoints import checkpoints_dir
    from megasr_fixtures import ensure_dage_files, megasr_env, models_dir, run_image
    from safetensors import safe_open

    photos = write_hr_folder(tmp_path / "photos", count=2)
    clip_base = write_guidance_files(tmp_path / "g")["clip_vision"]  # the 1024-d ViT-H layout tower
    depth_base = models_dir("megasr") / ensure_dage_files()["depth_base"]  # what the workflow pairs the LoRA with
    hed_pth = tmp_path / "ControlNetHED.pth"  # the original's format: a plain-tensor torch file
    torch.save(tiny_hed(3)[0].net.state_dict(), hed_pth)
    seg_folder = tmp_path / "mask2former"
    tiny_seg(4)[0].segmentor.model.save_pretrained(seg_folder)
    models = tmp_path / "models"
    models.mkdir()
    out = tmp_path / "runs" / "megasr-all"
    table = {
        "/data/photos": str(photos),
        "/ComfyUI/models": str(models),
        "runs": str(tmp_path / "runs"),
        "v2-1_512-ema-pruned.safetensors": str(checkpoints_dir() / tiny_sd2_kl_ckpt),
        "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": clip_base,
        "/models/ControlNetHED.pth": str(hed_pth),
        "/models/Depth-Anything-V2-Small-hf": str(depth_base),
        "/models/mask2former-swin-tiny-ade-semantic": str(seg_folder),
    }
    recipe = [_substitute(argv, table) for argv in readme_recipe(REPO / "README.md")]
    flat = " ".join(" ".join(c) for c in readme_recipe(REPO / "README.md"))
    assert all(example in flat for example in table), "the recipe changed: update the substitution table"
    pipeline = [*recipe[0][1:], "--config", str(_config(tmp_path)), "--log-level", "WARNING"]

    code, text, err = _cli(capsys, *pipeline, "--stop-after", "dage-clip")
    assert code == 0, err
    installed = models / "megasr"
    assert sorted(p.name for p in installed.iterdir()) == sorted(EXPORT_NAMES[s] for s in DAGE_STAGES)
    assert not (out / "megasr").exists()
    dage_files = {p: (p.stat().st_mtime_ns, _sha(p)) for s in DAGE_STAGES for p in (out / s).rglob("*") if p.is_file()}
    assert sum("checkpoints" in p.parts for p in dage_files) >= 4

    code, text, err = _cli(capsys, *pipeline)
    assert code == 0, err
    assert "dage-hed: done before" in text and "megasr: trained steps 0..2" in text
    after = {p: (p.stat().st_mtime_ns, _sha(p)) for s in DAGE_STAGES for p in (out / s).rglob("*") if p.is_file()}
    assert after == dage_files  # not retrained, not rewritten
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    for stage in PIPELINE_STAGES:
        record = state["done"][stage]
        assert _sha(installed / EXPORT_NAMES[stage]) == record["sha256"] == _sha(Path(record["export"]))
    run_cfg = json.loads((out / "megasr" / "run_config.json").read_text(encoding="utf-8"))["config"]["megasr"]
    for stage, key in zip(DAGE_STAGES, ("dage_hed", "dage_depth", "dage_seg", "dage_clip"), strict=True):
        assert Path(run_cfg[key]) == Path(state["done"][stage]["export"])
    assert Path(run_cfg["dage_depth_base"]) == depth_base and Path(run_cfg["dage_clip_base"]) == Path(clip_base)

    megasr_files = {p: p.stat().st_mtime_ns for p in (out / "megasr").rglob("*") if p.is_file()}
    code, text, err = _cli(capsys, *pipeline)
    assert code == 0 and "megasr: done before" in text, err
    assert {p: p.stat().st_mtime_ns for p in (out / "megasr").rglob("*") if p.is_file()} == megasr_files

    code, text, err = _cli(capsys, *recipe[1][1:])  # the recipe's export, as written
    assert code == 0, err
    with safe_open(recipe[1][recipe[1].index("--out") + 1], "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}

    import folder_paths

    env = megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    comfy_runner.register_model_dir("megasr", installed)
    try:
        img = run_image(
            env,
            "megasr_x4",
            **{
                "MegaSRModelLoader.megasr_name": EXPORT_NAMES["megasr"],
                "DAGE HED weights.dage_name": EXPORT_NAMES["dage-hed"],
                "DAGE depth weights.dage_name": EXPORT_NAMES["dage-depth"],
                "DAGE seg weights.dage_name": EXPORT_NAMES["dage-seg"],
                # the CLIP LoRA stays the fixture's: the tiny 1024-d tower it was trained on is not a layout ComfyUI
                # detects (its smallest CLIP vision is ViT-L), so the trained one cannot load on the test CLIP vision
                "MegaSRSampler.seed": 3,
                "SaveImage.filename_prefix": "pipeline",
            },
        )
    finally:  # the shipped names must not stay visible to other tests (some check they are missing)
        folder_paths.folder_names_and_paths["megasr"][0].remove(str(installed.resolve()))
        folder_paths.filename_list_cache.pop("megasr", None)
    assert img.shape == (44, 52, 3)  # exactly 4 x the 13 x 11 LR test image


def test_a_stage_stopped_midway_resumes_from_its_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_sd2_kl_ckpt: str
) -> None:
    """A dage-hed folder holding a checkpoint at step 1 of 2 and no pipeline record (killed mid-stage): ``all``
    continues it at step 1 (not from 0, not refused as "already exists", not skipped as done), records the
    step-2 export and installs it. Catches a pipeline that restarts a stage, refuses its own half-done folder
    or trusts a stale export."""
    photos = write_hr_folder(tmp_path / "photos", count=2)
    out = tmp_path / "run"
    cfg = str(_config(tmp_path))
    half = ("dage-hed", "--config", cfg, "--input", str(photos), "--out", str(out / "dage-hed"), "--max-steps", "1")
    assert _cli(capsys, *half)[0] == 0
    from harness.checkpoints import checkpoints_dir

    base = checkpoints_dir() / tiny_sd2_kl_ckpt  # never loaded (the run stops after dage-hed), but opened
    code, text, err = _cli(
        capsys,
        *("all", "--config", cfg, "--input", str(photos), "--out", str(out), "--base", str(base)),
        *("--stop-after", "dage-hed", "--log-level", "WARNING"),
    )
    assert code == 0, err
    assert "dage-hed: trained steps 1..2" in text
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))["done"]
    assert list(state) == ["dage-hed"] and state["dage-hed"]["step"] == 2
    installed = out / "models" / "megasr" / EXPORT_NAMES["dage-hed"]  # no --models-dir: inside the run
    assert _sha(installed) == state["dage-hed"]["sha256"] == _sha(out / "dage-hed" / "export" / "dage_hed.safetensors")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_all_saves_and_exits_128_plus_the_signal(
    tmp_path: Path, tiny_sd2_kl_ckpt: str, sig: int, code: int
) -> None:
    """``megasr-train all`` as a real process, signalled once its first stage has written a checkpoint: it
    saves at the end of the step and exits 143 (SIGTERM) / 130 (SIGINT) -- it once exited 0 ("interrupted at
    step 1; rerun to continue"), so ``megasr-train all && next-step`` carried on. Catches a zero exit, an exit
    before saving and a signal that kills the process without a checkpoint."""
    from harness.checkpoints import checkpoints_dir

    photos = write_hr_folder(tmp_path / "photos", count=2)
    out = tmp_path / "run"
    cfg = str(_config(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv = [sys.executable, "-m", "training", "all", "--config", cfg, "--input", str(photos), "--out", str(out)]
    argv += ["--base", str(checkpoints_dir() / tiny_sd2_kl_ckpt), "--log-level", "WARNING"]
    argv += ["--set", "train.max_steps=100000", "--set", "train.checkpoint_every=1"]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = out / "dage-hed" / "checkpoints"
    deadline = time.monotonic() + 240
    while not (ckpts.is_dir() and any(ckpts.glob("step-*"))):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == code, err[-3000:]
    assert signal.Signals(sig).name in err and "Traceback" not in err, err[-3000:]
    steps = sorted(int(p.name.split("-")[1]) for p in ckpts.glob("step-*"))
    assert steps and steps[-1] >= 1  # saved on the way out (the signal came after the first checkpoint)
    state = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    assert "dage-hed" not in state["done"]  # not recorded as finished
