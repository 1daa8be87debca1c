"""``python -m training <stage> --config FILE [--set key=value ...] [--resume] [--max-steps N] [--output DIR]``.

Stages:

- ``degrade-preview``: writes ``preview.count`` example pairs (HR crop, USM-sharpened HR, LR, bicubic LR at HR
  size) from the HR folders, to check the degradation settings by eye.
- ``dage-hed``, ``dage-depth``, ``dage-seg``, ``dage-clip``: DAGE fine-tuning (see :mod:`training.dage`);
  the run folder (``--output``, default ``<output_dir>/<stage>``) gets checkpoints and, at the end,
  ``export/<component>.safetensors``.
- ``export``: writes the newest checkpoint of a run (``--run DIR``, ``--from STAGE``) as a node weight file
  (``--output FILE``); refuses to replace a file unless ``--overwrite``.

Several processes: ``torchrun --nproc_per_node N -m training <stage> ...`` (``accelerate launch`` on GPUs).
Bad input (missing or empty folder, unknown option, bad value, an output that exists without ``--overwrite``)
ends with one line naming the option at fault and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ConfigError, RunConfig, UsageError, config_to_dict, load_config
from .runs import build_hr_dataset, open_run_dir, prepare_output_dir

__all__ = ["STAGES", "build_parser", "main"]

logger = logging.getLogger("training")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DAGE_STAGES = {"dage-hed": "hed", "dage-depth": "depth", "dage-seg": "seg", "dage-clip": "clip"}


def _resolve_config_path(value: str) -> Path:
    """A path, or the name of a bundled config (``tiny``, ``megasr``) in ``training/configs``."""
    path = Path(value).expanduser()
    if path.is_file() or path.suffix:
        return path
    for ext in (".yaml", ".yml", ".json"):
        bundled = CONFIG_DIR / f"{value}{ext}"
        if bundled.is_file():
            return bundled
    return path


def _to_png(x: torch.Tensor, path: Path) -> None:
    arr = (x.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    Image.fromarray(arr).save(path)


def _data_option(args: argparse.Namespace) -> str:
    return "--input" if getattr(args, "input", None) else "data.hr_dirs"


def run_degrade_preview(cfg: RunConfig, args: argparse.Namespace) -> str:
    """Write example LR/HR pairs; returns the summary line."""
    from .data import DegradedBatch, collate_hr
    from .degradations import DegradationPipeline

    ds = build_hr_dataset(cfg, _data_option(args))
    out = prepare_output_dir(
        Path(args.output) if args.output else Path(cfg.output_dir) / "preview", overwrite=args.overwrite
    )
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DegradationPipeline(cfg.degradation)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    count = cfg.preview.count
    written = []
    for first in range(0, count, cfg.preview.batch_size):
        keys = list(range(first, min(count, first + cfg.preview.batch_size)))
        hr = collate_hr([ds[divmod(i, len(ds))] for i in keys])  # (epoch, index): repeats get new crops
        batch = DegradedBatch.build(hr["hr"], pipe, gen, device=device)
        for j, i in enumerate(keys):
            stem = f"{i:04d}"
            for name, t in (("hr", batch.hr), ("hr_usm", batch.hr_usm), ("lr", batch.lr), ("lr_up", batch.lr_up)):
                _to_png(t[j], out / f"{stem}_{name}.png")
            written.append({"stem": stem, "source": hr["path"][j]})
    meta = {"stage": "degrade-preview", "config": config_to_dict(cfg), "examples": written, "device": str(device)}
    (out / "preview.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return (
        f"degrade-preview: wrote {len(written)} examples (HR {cfg.data.crop_size} px, LR x1/{cfg.degradation.scale}) "
        f"to {out}"
    )


def _run_dage(cfg: RunConfig, args: argparse.Namespace) -> str | None:
    from .dage import train_dage

    kind = DAGE_STAGES[args.stage]
    dataset = build_hr_dataset(cfg, _data_option(args))
    run_dir = Path(args.output) if args.output else Path(cfg.output_dir) / args.stage
    run_dir = open_run_dir(run_dir, cfg, args.stage, resume=args.resume, overwrite=args.overwrite)
    result, export = train_dage(kind, cfg, run_dir, resume=args.resume, dataset=dataset)
    if export is None:  # not the main process of a multi-process run: the main one reports
        return None
    last = f"{result.losses[-1]:.5g}" if result.losses else "n/a"
    return (
        f"{args.stage}: trained steps {result.start_step}..{result.step}"
        f"{' (interrupted)' if result.interrupted else ''}, last loss {last}, "
        f"checkpoint {result.checkpoint}, weights {export}"
    )


def _run_export(cfg: RunConfig, args: argparse.Namespace) -> str:
    from .dage import export_dage

    if not args.output:
        raise UsageError("--output", "give the weight file to write, e.g. --output models/megasr/dage_hed.safetensors")
    if not args.run and not args.source:
        raise UsageError("--run", "give the run folder to export (--run DIR)")
    run_dir = Path(args.run) if args.run else Path(cfg.output_dir) / args.source
    if not run_dir.is_dir():
        raise UsageError("--run", f"run folder '{run_dir}' does not exist")
    if args.source in DAGE_STAGES:
        if args.dtype != "fp32":
            raise UsageError("--dtype", "only the megasr export can be written in fp16/bf16")
        out = export_dage(DAGE_STAGES[args.source], cfg, run_dir, Path(args.output), overwrite=args.overwrite)
    else:  # megasr, or the stage read from the run's checkpoint (training/export.py)
        from .export import export_run

        out = export_run(run_dir, Path(args.output), overwrite=args.overwrite, expect=args.source, dtype=args.dtype)
    return f"export: wrote {out} from {run_dir}"


def _run_megasr(cfg: RunConfig, args: argparse.Namespace) -> str | None:
    from .stage_megasr import run_megasr

    return run_megasr(cfg, args)


STAGES: dict[str, tuple[str, Callable[[RunConfig, argparse.Namespace], str | None]]] = {
    "degrade-preview": ("write example LR/HR pairs from the HR folders", run_degrade_preview),
    "dage-hed": ("fine-tune the HED edge extractor (full) on degraded inputs", _run_dage),
    "dage-depth": ("fine-tune the depth extractor (LoRA r=8) on degraded inputs", _run_dage),
    "dage-seg": ("fine-tune the segmentation extractor (full) on degraded inputs", _run_dage),
    "dage-clip": ("fine-tune the CLIP image encoder (LoRA r=8) on degraded inputs", _run_dage),
    "megasr": ("train MegaSR (ControlNet + CISM² + MS-GAM) on the frozen SD-2 base", _run_megasr),
    "export": ("write a run's newest checkpoint as a node weight file", _run_export),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per stage)."""
    parser = _Parser(prog="python -m training", description="MegaSR training package")
    sub = parser.add_subparsers(dest="stage", metavar="stage", required=True, parser_class=_Parser)
    for name, (help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "--config", required=name != "export", help="YAML/JSON config file, or a bundled name (tiny, megasr)"
        )
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
        p.add_argument("--seed", type=int, help="overrides seed")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == "export":
            stages = sorted([*DAGE_STAGES, "megasr"])
            p.add_argument("--from", dest="source", choices=stages, help="stage of the run (default: read from it)")
            p.add_argument("--run", help="run folder (default: <output_dir>/<stage>)")
            p.add_argument("--output", "--out", help="weight file to write (.safetensors)")
            p.add_argument(
                "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="megasr: storage dtype in the file"
            )
            continue
        p.add_argument("--input", action="append", metavar="DIR", help="HR image folder (overrides data.hr_dirs)")
        if name == "degrade-preview":
            p.add_argument("--output", help="output folder (default: <output_dir>/preview)")
            p.add_argument("--count", type=int, help="number of examples (overrides preview.count)")
            p.add_argument("--device", help="torch device for the degradation (default: cuda if present, else cpu)")
        else:
            p.add_argument("--output", help=f"run folder (default: <output_dir>/{name})")
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
            p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    max_steps = getattr(args, "max_steps", None)
    if max_steps is not None:
        if max_steps < 0:
            raise UsageError("--max-steps", f"must be >= 0, got {max_steps}")
        out.append(f"train.max_steps={max_steps}")
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if getattr(args, "input", None):
        out.append("data.hr_dirs=" + json.dumps(args.input))
    count = getattr(args, "count", None)
    if count is not None:
        if count < 1:
            raise UsageError("--count", f"must be >= 1, got {count}")
        out.append(f"preview.count={count}")
    return out


def _check_device(value: str | None) -> None:
    if not value:
        return
    try:
        dev = torch.device(value)
    except RuntimeError as exc:
        raise UsageError("--device", str(exc)) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", f"'{value}' requested but no CUDA device is available")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prog = f"python -m training {args.stage}"
    try:
        _check_device(getattr(args, "device", None))
        cfg = load_config(_resolve_config_path(args.config) if args.config else None, _overrides(args))
        summary = STAGES[args.stage][1](cfg, args)
    except (UsageError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if summary is not None:
        print(summary)
    return 0
