"""``python -m training <stage> --config FILE [--set key=value ...] [--resume] [--max-steps N] [--output DIR]``.

Stages available now:

- ``degrade-preview``: writes ``preview.count`` example pairs (HR crop, USM-sharpened HR, LR, bicubic LR at HR
  size) from the configured HR folders, to check the degradation settings by eye.

Bad input (missing or empty folder, unknown option, bad value, an output folder that exists without
``--overwrite``) ends with one line naming the option at fault and exit code 2, never a traceback.
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
from .runs import build_hr_dataset, prepare_output_dir

__all__ = ["STAGES", "build_parser", "main"]

logger = logging.getLogger("training")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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


def run_degrade_preview(cfg: RunConfig, args: argparse.Namespace) -> str:
    """Write example LR/HR pairs; returns the summary line."""
    from .data import DegradedBatch, collate_hr
    from .degradations import DegradationPipeline

    ds = build_hr_dataset(cfg, "--input" if args.input else "data.hr_dirs")
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
    return f"degrade-preview: wrote {len(written)} examples (HR {cfg.data.crop_size} px, LR x1/{cfg.degradation.scale}) to {out}"


STAGES: dict[str, tuple[str, Callable[[RunConfig, argparse.Namespace], str]]] = {
    "degrade-preview": ("write example LR/HR pairs from the HR folders", run_degrade_preview),
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
        p.add_argument("--config", required=True, help="YAML/JSON config file, or a bundled name (tiny, megasr)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
        p.add_argument("--output", help="output folder (default: <output_dir>/<stage>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty output folder")
        p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
        p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides train.max_steps)")
        p.add_argument("--seed", type=int, help="overrides seed")
        p.add_argument("--device", help="torch device for the degradation (default: cuda if present, else cpu)")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if name == "degrade-preview":
            p.add_argument("--input", action="append", metavar="DIR", help="HR image folder (overrides data.hr_dirs)")
            p.add_argument("--count", type=int, help="number of examples (overrides preview.count)")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    if args.max_steps is not None:
        if args.max_steps < 0:
            raise UsageError("--max-steps", f"must be >= 0, got {args.max_steps}")
        out.append(f"train.max_steps={args.max_steps}")
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if getattr(args, "input", None):
        out.append("data.hr_dirs=" + json.dumps(args.input))
    if getattr(args, "count", None) is not None:
        if args.count < 1:
            raise UsageError("--count", f"must be >= 1, got {args.count}")
        out.append(f"preview.count={args.count}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    prog = f"python -m training {args.stage}"
    try:
        if args.device:
            try:
                dev = torch.device(args.device)
            except RuntimeError as exc:
                raise UsageError("--device", str(exc)) from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise UsageError("--device", f"'{args.device}' requested but no CUDA device is available")
        cfg = load_config(_resolve_config_path(args.config), _overrides(args))
        summary = STAGES[args.stage][1](cfg, args)
    except (UsageError, ConfigError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0
