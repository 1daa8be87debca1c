"""``megasr-train all``: photo folder + SD-2 checkpoint + extractor bases -> every weight file the nodes read.

Order: ``dage-hed``, ``dage-depth``, ``dage-seg``, ``dage-clip`` (each in ``OUT/<stage>``), then ``megasr`` in
``OUT/megasr`` wired to their exports (the depth/CLIP LoRAs with the same bases), then the five exports are
copied into ``<models-dir>/megasr`` (``OUT/models/megasr`` without ``--models-dir``) under the names the
shipped workflows load (:data:`EXPORT_NAMES`, the same as ``megasr/manifest.json``).

Resumable as a whole: ``OUT/pipeline.json`` records each finished stage with the sha256 of its export; a rerun
of the same command skips a finished stage whose export is unchanged, resumes a stage that has a checkpoint
and starts the others. ``--stop-after STAGE`` ends the command after that stage (rerun without it to go on).
Every configuration problem of every stage is reported at once before anything trains (exit 2); an existing
file in the models folder that this run did not write is refused up front unless ``--force``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, UsageError, load_config

__all__ = ["EXPORT_NAMES", "PIPELINE_STAGES", "prepare_pipeline", "run_pipeline"]

logger = logging.getLogger("training")

PIPELINE_STAGES = ("dage-hed", "dage-depth", "dage-seg", "dage-clip", "megasr")
#: stage -> file name in the ComfyUI ``megasr`` model folder (the shipped workflows' defaults)
EXPORT_NAMES = {
    "dage-hed": "megasr_dage_hed.safetensors",
    "dage-depth": "megasr_dage_depth_lora.safetensors",
    "dage-seg": "megasr_dage_seg.safetensors",
    "dage-clip": "megasr_dage_clip_lora.safetensors",
    "megasr": "megasr_sd2_x4.safetensors",
}
#: the megasr.* key that takes each DAGE stage's export
_MEGASR_KEY = {"dage-hed": "dage_hed", "dage-depth": "dage_depth", "dage-seg": "dage_seg", "dage-clip": "dage_clip"}
#: flag -> config keys it sets, per stage (one vocabulary with the single stages)
_FLAG_KEYS: dict[str, dict[str, str]] = {
    "--base": {"megasr": "megasr.base"},
    "--hed-base": {"dage-hed": "dage_hed.base"},
    "--depth-base": {"dage-depth": "dage_depth.base", "megasr": "megasr.dage_depth_base"},
    "--seg-base": {"dage-seg": "dage_seg.base"},
    "--clip-vision": {"dage-clip": "dage_clip.base", "megasr": "megasr.dage_clip_base"},
}
_FLAG_DEST = {"--base": "base", "--hed-base": "hed_base", "--depth-base": "depth_base", "--seg-base": "seg_base"}
_FLAG_DEST["--clip-vision"] = "clip_vision"
STATE_FILE = "pipeline.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_folder(args: argparse.Namespace) -> Path:
    """Where the exports go: ``<models-dir>/megasr``, or ``OUT/models/megasr``."""
    root = Path(args.models_dir).expanduser() if args.models_dir else Path(args.output) / "models"
    return root / "megasr"


def _stage_overrides(stage: str, args: argparse.Namespace, common: list[str]) -> list[str]:
    out = list(common)
    for flag, per_stage in _FLAG_KEYS.items():
        value = getattr(args, _FLAG_DEST[flag], None)
        if value and stage in per_stage:
            out.append(f"{per_stage[stage]}=" + json.dumps(value))
    if stage == "megasr":  # the DAGE files do not exist yet: wired to the exports once their stages ran
        out.extend(f"megasr.{key}=null" for key in _MEGASR_KEY.values())
    return out


def _flag_names(stage: str, args: argparse.Namespace) -> dict[str, str]:
    names = {"data.hr_dirs": "--input", "models_dir": "--models-dir"}
    for flag, per_stage in _FLAG_KEYS.items():
        if stage in per_stage:  # the pipeline's flags, given or not, are what the user types to fix it
            names[per_stage[stage]] = flag
    return names


def read_state(out: Path) -> dict[str, Any]:
    """``OUT/pipeline.json``: ``{"done": {stage: {"export": path, "sha256": hex, "step": n}}}``."""
    path = out / STATE_FILE
    if not path.is_file():
        return {"done": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError("--out", f"'{path}' is unreadable ({exc}); remove it to start the pipeline afresh") from None
    state.setdefault("done", {})
    return state


def _write_state(out: Path, state: dict[str, Any]) -> None:
    tmp = out / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
    os.replace(tmp, out / STATE_FILE)


def prepare_pipeline(
    args: argparse.Namespace, common: list[str], config_for: Any
) -> tuple[dict[str, RunConfig], list[ConfigError]]:
    """Every stage's config and every input problem of every stage (to be reported at once, before any load).

    ``config_for(stage)``: the config file of a stage (``--config`` or its bundled default)."""
    from .preflight import preflight

    problems: list[ConfigError] = []
    if not args.output:
        problems.append(ConfigError("--out", "give the pipeline's run folder", example="--out runs/megasr-all"))
    if args.stop_after and args.stop_after not in PIPELINE_STAGES:
        problems.append(ConfigError("--stop-after", f"'{args.stop_after}' is not a stage of the pipeline"))
    configs: dict[str, RunConfig] = {}
    seen: set[str] = set()
    for stage in PIPELINE_STAGES:
        stage_problems: list[ConfigError] = []
        cfg = load_config(config_for(stage), _stage_overrides(stage, args, common), stage_problems)
        names = _flag_names(stage, args)
        stage_problems.extend(preflight(cfg, stage, lambda k, names=names: names.get(k, k)))
        for p in stage_problems:
            for q in p.problems:
                key = f"{q.option}: {q.problem}"  # a shared key (--input) is wrong in every stage: say it once
                if key not in seen:
                    seen.add(key)
                    problems.append(q)
        configs[stage] = cfg
    if args.output:
        problems.extend(_export_conflicts(args))
    return configs, problems


def _export_conflicts(args: argparse.Namespace) -> list[ConfigError]:
    """Files in the models folder that this pipeline did not write: refused unless --force."""
    if args.overwrite:
        return []
    try:
        state = read_state(Path(args.output))
    except UsageError as exc:
        return [exc]
    ours = {v.get("installed_sha256") for v in state["done"].values()}
    out = []
    for name in EXPORT_NAMES.values():
        dest = export_folder(args) / name
        if dest.is_file() and _sha256(dest) not in ours:
            out.append(
                ConfigError(
                    "--models-dir" if args.models_dir else "--out",
                    f"'{dest}' already exists and was not written by this run; pass --force to replace it",
                )
            )
    return out


def _install(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` atomically (a partial file never has the final name); returns its sha256."""
    import shutil

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return _sha256(dest)


def _run_stage(stage: str, cfg: RunConfig, run_dir: Path) -> tuple[Any, Path | None]:
    from .checkpoint import latest_checkpoint
    from .runs import open_run_dir

    resume = latest_checkpoint(run_dir) is not None if run_dir.is_dir() else False
    if resume:
        logger.info("all: resuming %s from %s", stage, latest_checkpoint(run_dir))
    run_dir = open_run_dir(run_dir, cfg, stage, resume=resume, overwrite=False)
    if stage == "megasr":
        from .stage_megasr import check_inputs, train_megasr

        check_inputs(cfg)
        result, export, _ = train_megasr(cfg, run_dir, resume=resume)
        return result, export
    from .dage import train_dage

    return train_dage(stage[len("dage-") :], cfg, run_dir, resume=resume)


def run_pipeline(configs: dict[str, RunConfig], args: argparse.Namespace) -> str | None:
    """Run the stages not yet done, then install the exports; returns the summary (None off the main process).

    Only the main process writes ``pipeline.json`` and the models folder; the others read it after each stage."""
    from accelerate import PartialState

    out = Path(args.output)
    proc = PartialState(cpu=True)
    if proc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    proc.wait_for_everyone()
    state = read_state(out)
    lines = []
    for stage in PIPELINE_STAGES:
        cfg = configs[stage]
        if stage == "megasr":
            for dage_stage, key in _MEGASR_KEY.items():
                setattr(cfg.megasr, key, state["done"][dage_stage]["export"])
        done = state["done"].get(stage)
        if done and Path(done["export"]).is_file() and _sha256(Path(done["export"])) == done["sha256"]:
            lines.append(f"{stage}: done before (step {done['step']}), kept")
            logger.info("all: %s already done (%s), not run again", stage, done["export"])
        else:
            result, export = _run_stage(stage, cfg, out / stage)
            if proc.is_main_process:
                if result.interrupted:
                    _write_state(out, state)
                    return f"all: {stage} interrupted at step {result.step}; rerun the same command to continue"
                record = {"export": str(Path(export).absolute()), "sha256": _sha256(export), "step": int(result.step)}
                state["done"][stage] = {**record, "installed_sha256": None}
                _write_state(out, state)
                lines.append(f"{stage}: trained steps {result.start_step}..{result.step}")
            proc.wait_for_everyone()
            state = read_state(out)
            if stage not in state["done"]:  # the main process stopped (interrupted)
                return None
        if proc.is_main_process:
            record = state["done"][stage]
            dest = export_folder(args) / EXPORT_NAMES[stage]
            if not (dest.is_file() and record.get("installed_sha256") == _sha256(dest)):
                record["installed_sha256"] = _install(Path(record["export"]), dest)
                _write_state(out, state)
                lines.append(f"{stage}: installed {dest}")
        if args.stop_after == stage:
            lines.append(f"stopped after {stage} (--stop-after); rerun without it to continue")
            break
    proc.wait_for_everyone()
    if not proc.is_main_process:
        return None
    return "all:\n  " + "\n  ".join(lines) + f"\n  weight files in {export_folder(args)}"
