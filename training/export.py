"""``python -m training export --run DIR --out FILE [--overwrite]``: a run's newest checkpoint -> node weight file.

(The sub-command lives in :mod:`training.cli`; without ``--from`` or with ``--from megasr`` it comes here.)

For a ``megasr`` run the trained :class:`megasr.model.MegaSRModel` is rebuilt from the config stored in the
checkpoint (no base model needed) and written with :func:`megasr.model_io.save_megasr_model` (component
``controlnet``), with provenance: the run config, the step, the checkpoint, the SeeSR warm-start summary and the
git commit of this package when it is a git checkout. ``dage-*`` runs are handed to
:func:`training.dage.export_dage`. An existing ``--out`` file is never replaced without ``--overwrite``
(exit code 2 and one line saying so).
"""

from __future__ import annotations

import datetime as _dt
import logging
import subprocess
from pathlib import Path
from typing import Any

from megasr.dage.kinds import BY_STAGE

from .checkpoint import latest_checkpoint, load_checkpoint
from .ema import ema_weights
from .errors import CheckpointError, UsageError

__all__ = ["export_megasr", "export_run", "git_commit", "megasr_provenance"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]


def git_commit(repo: Path = _REPO) -> str | None:
    """The commit of this checkout (with ``-dirty`` when it has local changes), or None outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def megasr_provenance(
    run_config: dict[str, Any], step: int, run_dir: Path, checkpoint: Path | None, seesr: dict[str, Any] | None
) -> dict[str, Any]:
    """What a MegaSR weight file records about the run that made it."""
    return {
        "made_by": "ComfyUI-MegaSR training (python -m training megasr)",
        "stage": "megasr",
        "step": int(step),
        "run_dir": str(run_dir),
        "checkpoint": checkpoint.name if checkpoint is not None else None,
        "git_commit": git_commit(),
        "exported_at": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seesr_warm_start": seesr,
        "run_config": run_config,
    }


def _strip(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def export_megasr(
    run_dir: Path, out: Path, *, overwrite: bool = False, state: dict[str, Any] | None = None, dtype: str = "fp32"
) -> Path:
    """Write the MegaSR model of ``run_dir``'s newest checkpoint to ``out`` (refuses an existing file).

    ``dtype``: fp32, fp16 or bf16 storage in the file (half precision halves the download; the nodes convert to
    whatever dtype the user's ComfyUI stores and computes in)."""
    from megasr.errors import WeightFileError
    from megasr.model import MegaSRConfig, MegaSRModel
    from megasr.model_io import EXPORT_DTYPES, save_megasr_model

    if dtype not in EXPORT_DTYPES:
        raise UsageError("--dtype", f"'{dtype}' is not one of {', '.join(EXPORT_DTYPES)}")

    run_dir, out = Path(run_dir), Path(out)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError("--run", f"'{run_dir}' has no checkpoint (is it a training run folder?)")
    if out.is_dir():
        raise UsageError("--out", f"'{out}' is a folder; give a file name ending in .safetensors")
    if out.exists() and not overwrite:
        raise UsageError("--out", f"'{out}' already exists; pass --force (--overwrite) to replace it")
    if out.suffix.lower() != ".safetensors":
        raise UsageError("--out", f"'{out.name}' must end in .safetensors (the MegaSR nodes load only safetensors)")
    if state is None:
        state = load_checkpoint(ckpt)
    extra = state.get("extra") or {}
    if extra.get("stage") != "megasr":
        raise UsageError("--run", f"'{run_dir}' holds a '{extra.get('stage')}' run, not megasr")
    if "megasr_config" not in extra or "megasr" not in state.get("modules", {}):
        raise UsageError("--run", f"checkpoint {ckpt} lacks the MegaSR model or its config")
    model = MegaSRModel(MegaSRConfig.from_dict(extra["megasr_config"]))
    ema = (state.get("ema") or {}).get("megasr")
    weights = _strip("model.", ema_weights(state["modules"]["megasr"], ema))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise UsageError("--run", f"checkpoint {ckpt} does not fit its MegaSR config: {str(exc)[:400]}") from None
    prov = megasr_provenance(extra.get("config", {}), int(state["step"]), run_dir, ckpt, extra.get("seesr"))
    if ema:
        prov["ema_decay"] = float(ema["decay"])
    try:
        save_megasr_model(str(out), model.eval(), prov, overwrite=overwrite, dtype=EXPORT_DTYPES[dtype])
    except (FileExistsError, WeightFileError) as exc:
        raise UsageError("--out", str(exc)) from None
    which = f"EMA weights (decay {float(ema['decay']):g})" if ema else "trained weights (no EMA)"
    logger.info("exported the MegaSR model of %s (step %d, %s) to %s", ckpt, state["step"], which, out)
    return out


def export_run(
    run_dir: Path, out: Path, *, overwrite: bool = False, expect: str | None = None, dtype: str = "fp32"
) -> Path:
    """Export whatever stage ``run_dir`` trained (megasr, dage-hed/depth/seg/clip) to ``out``.

    ``expect``: the stage the caller named (``--from``); another stage in the run is refused.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise UsageError("--run", f"'{run_dir}' is not a folder")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UsageError("--run", f"'{run_dir}' has no checkpoint (is it a training run folder?)")
    if out.is_dir():  # before the "exists" check: --force cannot replace a folder, so it must not be suggested
        raise UsageError("--out", f"'{out}' is a folder; give a file name ending in .safetensors")
    if out.exists() and not overwrite:
        raise UsageError("--out", f"'{out}' already exists; pass --force (--overwrite) to replace it")
    try:
        state = load_checkpoint(ckpt)
    except CheckpointError as exc:
        raise UsageError("--run", str(exc)) from None
    stage = str((state.get("extra") or {}).get("stage"))
    if expect is not None and stage != expect:
        raise UsageError("--from", f"'{run_dir}' holds a '{stage}' run, not {expect}")
    if stage == "megasr":
        return export_megasr(run_dir, out, overwrite=overwrite, state=state, dtype=dtype)
    if stage in BY_STAGE:
        if dtype != "fp32":
            raise UsageError("--dtype", "only the megasr export can be written in fp16/bf16")
        from . import dage
        from .config import parse_config

        cfg = parse_config(state["extra"]["config"], f"{ckpt}")
        return dage.export_dage(BY_STAGE[stage].kind, cfg, run_dir, out, overwrite=overwrite)
    raise UsageError("--run", f"'{run_dir}' holds a '{stage}' run; nothing to export")
