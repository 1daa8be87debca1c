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
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from megasr.dage.kinds import BY_STAGE, DAGE_STAGES, TRAINED_KINDS
from megasr.files import atomic_write, sha256_file

from .checkpoint import latest_checkpoint
from .config import RunConfig, load_config
from .dage import train_dage
from .errors import ConfigError, UsageError
from .flags import BASE_FLAGS, flag_key
from .preflight import check_megasr_inputs, preflight
from .runs import open_run_dir

__all__ = ["EXPORT_NAMES", "PIPELINE_STAGES", "prepare_pipeline", "run_pipeline"]

logger = logging.getLogger("training")

PIPELINE_STAGES: tuple[str, ...] = (*DAGE_STAGES, "megasr")
#: stage -> file name in the ComfyUI ``megasr`` model folder (the shipped workflows' defaults)
EXPORT_NAMES = {
    **{k.stage: f"megasr_{k.component}.safetensors" for k in TRAINED_KINDS},
    "megasr": "megasr_sd2_x4.safetensors",
}
#: the megasr.* key that takes each DAGE stage's export
_MEGASR_KEY = {k.stage: k.config_section for k in TRAINED_KINDS}
STATE_FILE = "pipeline.json"


def export_folder(args: argparse.Namespace) -> Path:
    """Where the exports go: ``<models-dir>/megasr``, or ``OUT/models/megasr``."""
    root = Path(args.models_dir).expanduser() if args.models_dir else Path(args.output) / "models"
    return root / "megasr"


def _stage_overrides(stage: str, args: argparse.Namespace, common: list[str]) -> list[str]:
    out = list(common)
    for flag, (dest, _key, _stages) in BASE_FLAGS.items():
        key = flag_key(flag, stage)
        value = getattr(args, dest, None)
        if value and key:
            out.append(f"{key}=" + json.dumps(value))
    if stage == "megasr":  # the DAGE files do not exist yet: wired to the exports once their stages ran
        out.extend(f"megasr.{key}=null" for key in _MEGASR_KEY.values())
    return out


def _flag_names(stage: str, args: argparse.Namespace) -> dict[str, str]:
    names = {"data.hr_dirs": "--input", "models_dir": "--models-dir"}
    for flag in BASE_FLAGS:
        key = flag_key(flag, stage)
        if key:  # the pipeline's flags, given or not, are what the user types to fix it
            names[key] = flag
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
    text = json.dumps(state, indent=2)
    atomic_write(out / STATE_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def prepare_pipeline(
    args: argparse.Namespace, common: list[str], config_for: Any
) -> tuple[dict[str, RunConfig], list[ConfigError]]:
    """Every stage's config and every input problem of every stage (to be reported at once, before any load).

    ``config_for(stage)``: the config file of a stage (``--config`` or its bundled default)."""
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
        if dest.is_file() and sha256_file(dest) not in ours:
            out.append(
                ConfigError(
                    "--models-dir" if args.models_dir else "--out",
                    f"'{dest}' already exists and was not written by this run; pass --force to replace it",
                )
            )
    return out


def _install(src: Path, dest: Path) -> str:
    """Copy ``src`` to ``dest`` atomically (a partial file never has the final name); returns its sha256."""
    atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return sha256_file(dest)


def _run_stage(stage: str, cfg: RunConfig, run_dir: Path) -> tuple[Any, Path | None]:
    resume = latest_checkpoint(run_dir) is not None if run_dir.is_dir() else False
    if resume:
        logger.info("all: resuming %s from %s", stage, latest_checkpoint(run_dir))
    run_dir = open_run_dir(run_dir, cfg, stage, resume=resume, overwrite=False)
    if stage == "megasr":
        from .stage_megasr import train_megasr  # the diffusers / transformers stack: only when it trains

        check_megasr_inputs(cfg)  # the DAGE exports are wired in now
        result, export, _ = train_megasr(cfg, run_dir, resume=resume)
        return result, export
    return train_dage(BY_STAGE[stage].kind, cfg, run_dir, resume=resume)


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
        if done and Path(done["export"]).is_file() and sha256_file(Path(done["export"])) == done["sha256"]:
            lines.append(f"{stage}: done before (step {done['step']}), kept")
            logger.info("all: %s already done (%s), not run again", stage, done["export"])
        else:
            result, export = _run_stage(stage, cfg, out / stage)
            if proc.is_main_process:
                if result.interrupted:
                    _write_state(out, state)
                    return f"all: {stage} interrupted at step {result.step}; rerun the same command to continue"
                record = {
                    "export": str(Path(export).absolute()),
                    "sha256": sha256_file(export),
                    "step": int(result.step),
                }
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
            if not (dest.is_file() and record.get("installed_sha256") == sha256_file(dest)):
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
