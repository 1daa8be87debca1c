"""``python -m training <stage> --config FILE [--set key=value ...] [--resume] [--max-steps N] [--output DIR]``.

Stages:

- ``degrade-preview``: writes ``preview.count`` example pairs (HR crop, USM-sharpened HR, LR, bicubic LR at HR
  size) from the HR folders, to check the degradation settings by eye.
- ``dage-hed``, ``dage-depth``, ``dage-seg``, ``dage-clip``: DAGE fine-tuning (see :mod:`training.dage`);
  the run folder (``--output``, default ``<output_dir>/<stage>``) gets checkpoints and, at the end,
  ``export/<component>.safetensors``.
- ``all``: the whole pipeline (:mod:`training.pipeline`): the four DAGE stages, ``megasr`` wired to their
  exports, then the five files installed into ``<--models-dir>/megasr``; resumable as a whole.
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
from typing import Any

import numpy as np
import torch
from PIL import Image

from megasr.dage.kinds import TRAINED_KINDS

from .config import RunConfig, config_to_dict, load_config
from .errors import ConfigError, UsageError, raise_problems
from .flags import BASE_FLAGS, FLAG_HELP, FLAGS, flag_key
from .run_log import RunLog
from .runs import build_hr_dataset, open_run_dir, prepare_output_dir

__all__ = ["STAGES", "build_parser", "main"]

logger = logging.getLogger("training")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: DAGE stage (sub-command) -> extractor kind
DAGE_STAGES = {k.stage: k.kind for k in TRAINED_KINDS}


_GPU_MEMORY_HELP = (
    "the device's memory, e.g. 24GB (train.gpu_memory): the megasr stage refuses a run whose memory plan does not "
    "fit, naming the numbers and cheaper settings"
)


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
    """Everything comes from the run folder (its checkpoint holds the run's config): no --config needed."""
    from .export import export_run

    if not args.output:
        raise UsageError(
            "--out", "give the weight file to write", example="--out ComfyUI/models/megasr/dage_hed.safetensors"
        )
    if not args.run:
        raise UsageError("--run", "give the run folder to export", example="--run runs/dage-hed")
    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise UsageError("--run", f"run folder '{run_dir}' does not exist")
    if args.source in DAGE_STAGES and args.dtype != "fp32":
        raise UsageError("--dtype", "only the megasr export can be written in fp16/bf16")
    out = export_run(run_dir, Path(args.output), overwrite=args.overwrite, expect=args.source, dtype=args.dtype)
    return f"export: wrote {out} from {run_dir}"


def _run_megasr(cfg: RunConfig, args: argparse.Namespace) -> str | None:
    from .stage_megasr import run_megasr

    return run_megasr(cfg, args)


def _run_all(configs: dict[str, RunConfig], args: argparse.Namespace) -> str | None:
    from .pipeline import run_pipeline

    return run_pipeline(configs, args)


STAGES: dict[str, tuple[str, Callable[[Any, argparse.Namespace], str | None]]] = {
    "degrade-preview": ("write example LR/HR pairs from the HR folders", run_degrade_preview),
    **{
        k.stage: (f"fine-tune {k.description} on degraded inputs ({'LoRA r=8' if k.lora else 'full'})", _run_dage)
        for k in TRAINED_KINDS
    },
    "megasr": ("train MegaSR (ControlNet + CISM² + MS-GAM) on the frozen SD-2 base", _run_megasr),
    "export": ("write a run's newest checkpoint as a node weight file", _run_export),
    "all": ("the whole pipeline: dage-hed/depth/seg/clip, megasr, export into the ComfyUI models folder", _run_all),
}

#: Bundled config of each stage when --config is not given.
DEFAULT_CONFIGS = {
    "degrade-preview": "megasr",
    **{k.stage: k.config_section for k in TRAINED_KINDS},  # configs/dage_<kind>.yaml
    "megasr": "megasr_sd2",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's own convention)
        self.exit(2, f"{self.prog}: error: {message}\n")


def prog_name() -> str:
    """``megasr-train`` when run as the console script, else ``python -m training``."""
    return "megasr-train" if Path(sys.argv[0]).name.startswith("megasr-train") else "python -m training"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per stage, one flag vocabulary for all)."""
    parser = _Parser(prog=prog_name(), description="MegaSR training package")
    sub = parser.add_subparsers(dest="stage", metavar="stage", required=True, parser_class=_Parser)
    for name, (help_text, _) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "all":
            _add_all_arguments(p)
            continue
        if name != "export":
            p.add_argument(
                "--config",
                default=DEFAULT_CONFIGS[name],
                help="YAML/JSON config file, or a bundled name (tiny, megasr)",
            )
        else:  # accepted for old command lines; export always uses the config stored in the run
            p.add_argument("--config", help=argparse.SUPPRESS)
        _add_run_options(
            p,
            force_help="replace an existing output",
            models_dir_help="a ComfyUI models folder: base weights by name (extra_model_paths.yaml too)",
        )
        if name == "export":
            stages = sorted([*DAGE_STAGES, "megasr"])
            p.add_argument("--from", dest="source", choices=stages, help="stage of the run (default: read from it)")
            p.add_argument("--run", required=False, help="run folder")
            p.add_argument("--out", "--output", dest="output", help="weight file to write (.safetensors)")
            p.add_argument(
                "--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="megasr: storage dtype in the file"
            )
            continue
        p.add_argument("--input", action="append", metavar="DIR", help="HR image folder (overrides data.hr_dirs)")
        for flag, (dest, _key, stages) in FLAGS.items():
            if name in stages:
                p.add_argument(flag, dest=dest, help=FLAG_HELP[flag])
        if name == "degrade-preview":
            p.add_argument("--out", "--output", dest="output", help="output folder (default: <output_dir>/preview)")
            p.add_argument("--count", type=int, help="number of examples (overrides preview.count)")
            p.add_argument("--device", help="torch device for the degradation (default: cuda if present, else cpu)")
        else:
            p.add_argument("--out", "--output", dest="output", help=f"run folder (default: <output_dir>/{name})")
            p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the output")
            p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (train.max_steps)")
            p.add_argument("--gpu-memory", help=_GPU_MEMORY_HELP)
    return parser


def _add_run_options(p: argparse.ArgumentParser, *, force_help: str, models_dir_help: str) -> None:
    """The options every sub-command shares (single stages and ``all``), in one place."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config option")
    p.add_argument("--seed", type=int, help="overrides seed")
    p.add_argument("--force", "--overwrite", dest="overwrite", action="store_true", help=force_help)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--models-dir", help=models_dir_help)


def _add_all_arguments(p: argparse.ArgumentParser) -> None:
    """``all``: the single stages' flags, one config for every stage (or each stage's bundled one)."""
    p.add_argument("--config", help="one YAML/JSON config for every stage (default: each stage's bundled config)")
    _add_run_options(
        p,
        force_help="replace files in the models folder",
        models_dir_help="a ComfyUI models folder: bases by name, and the exports go to its megasr/ (default: OUT/models/megasr)",
    )
    p.add_argument("--input", action="append", metavar="DIR", help="HR image folder (overrides data.hr_dirs)")
    for flag, (dest, _key, _stages) in BASE_FLAGS.items():
        p.add_argument(flag, dest=dest, help=FLAG_HELP[flag])
    p.add_argument("--out", "--output", dest="output", help="the pipeline's run folder (one sub-folder per stage)")
    p.add_argument("--max-steps", type=int, help="stop every stage after this many optimizer steps")
    p.add_argument("--gpu-memory", help=_GPU_MEMORY_HELP)
    p.add_argument(
        "--stop-after", metavar="STAGE", help="end after this stage (dage-hed ... megasr); rerun without it to go on"
    )


def flag_keys(args: argparse.Namespace) -> dict[str, str]:
    """Config key -> the flag that set it (so problems name what the user typed)."""
    out = {}
    for flag, (dest, _key, _stages) in FLAGS.items():
        key = flag_key(flag, args.stage)
        if key and getattr(args, dest, None):
            out[key] = flag
    if getattr(args, "input", None):
        out["data.hr_dirs"] = "--input"
    if getattr(args, "models_dir", None):
        out["models_dir"] = "--models-dir"
    return out


def _overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    max_steps = getattr(args, "max_steps", None)
    if max_steps is not None:
        if max_steps < 0:
            raise UsageError("--max-steps", f"must be >= 0, got {max_steps}")
        out.append(f"train.max_steps={max_steps}")
    if args.seed is not None:
        out.append(f"seed={args.seed}")
    if getattr(args, "gpu_memory", None):
        out.append("train.gpu_memory=" + json.dumps(args.gpu_memory))
    if getattr(args, "input", None):
        out.append("data.hr_dirs=" + json.dumps(args.input))
    if getattr(args, "models_dir", None):
        out.append("models_dir=" + json.dumps(args.models_dir))
    for flag, (dest, _key, _stages) in FLAGS.items():
        key = flag_key(flag, args.stage)
        value = getattr(args, dest, None)
        if key and value:
            out.append(f"{key}=" + json.dumps(value))
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


def _log_path(cfg: RunConfig | None, args: argparse.Namespace) -> Path | None:
    """The run's log file: ``train.log`` in the run folder (export: in the run it reads)."""
    if args.stage == "export":
        return Path(args.run) / "train.log" if args.run and Path(args.run).is_dir() else None
    if args.stage == "all":
        return Path(args.output) / "train.log" if args.output else None
    if args.stage == "degrade-preview" or cfg is None:
        return None
    return (Path(args.output) if args.output else Path(cfg.output_dir) / args.stage) / "train.log"


def _prepare(args: argparse.Namespace) -> Any:
    """Config + every input problem of the stage, all reported at once before anything loads (exit 2).

    ``all``: a dict stage -> config, every stage checked before the first one trains."""
    from .preflight import preflight

    _check_device(getattr(args, "device", None))
    problems: list[ConfigError] = []
    if args.stage == "export":
        return load_config(None, [])
    if args.stage == "all":
        from .pipeline import prepare_pipeline

        configs, problems = prepare_pipeline(
            args, _overrides(args), lambda stage: _resolve_config_path(args.config or DEFAULT_CONFIGS[stage])
        )
        raise_problems(_agree_across_ranks(problems))
        return configs
    cfg = load_config(_resolve_config_path(args.config), _overrides(args), problems)
    flags = flag_keys(args)
    stages = [args.stage]
    for stage in stages:
        problems.extend(preflight(cfg, stage, lambda k: flags.get(k, k)))
    raise_problems(_agree_across_ranks(problems))
    return cfg


#: Measured (issue 27): one dage-hed step with its bundled config (512 px crops, batch 8) took 307 s on a 2-core
#: CPU. A step's work grows with the pixels it processes; the megasr stage (an SD-2 U-Net, its ControlNet copy
#: and the guidance extractors) costs several times a dage-hed step of the same size.
CPU_REFERENCE = {"seconds": 307.0, "pixels": 512 * 512 * 8, "what": "dage-hed, 512 px x 8, 2 CPU cores"}
#: up to this many pixels per optimizer step a CPU run counts as quick (the tiny config: 64 px x 2)
_QUICK_PIXELS = 64 * 64 * 2


def cpu_step_note(cfg: Any, stage: str, device: str | None = None) -> str | None:
    """On a CPU, a line saying what one optimizer step of ``cfg`` will cost and how to get a quick run; None on a
    GPU or for a config as small as ``tiny``. ``cfg``: a RunConfig, or ``all``'s dict stage -> RunConfig."""
    on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    if not on_cpu or stage in ("export", "degrade-preview"):
        return None
    configs = cfg if isinstance(cfg, dict) else {stage: cfg}
    pixels = {s: c.data.crop_size**2 * c.train.batch_size * c.train.grad_accum for s, c in configs.items()}
    worst = max(pixels, key=pixels.get)
    if pixels[worst] <= _QUICK_PIXELS:
        return None
    c = configs[worst]
    seconds = CPU_REFERENCE["seconds"] * pixels[worst] / CPU_REFERENCE["pixels"]
    more = " or more (the megasr stage costs several times a DAGE step)" if "megasr" in configs else ""
    return (
        f"{worst} runs on the CPU with {c.data.crop_size} px crops x batch {c.train.batch_size}"
        f"{f' x {c.train.grad_accum} accumulated' if c.train.grad_accum > 1 else ''}: about {seconds:.0f} s per "
        f"step{more} (estimate scaled from a measured {CPU_REFERENCE['seconds']:.0f} s step of "
        f"{CPU_REFERENCE['what']}). For a quick run: --config tiny (64 px crops, batch 2), or a GPU"
    )


def _agree_across_ranks(problems: list[ConfigError]) -> list[ConfigError]:
    """Under several processes every rank learns every rank's problems, so all stop together (exit 2)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return problems
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    mine = [(p.option, p.problem, p.expected, p.example) for p in problems]
    gathered: list[object] = [None] * state.num_processes
    dist.all_gather_object(gathered, mine)
    out: list[ConfigError] = []
    for rank, items in enumerate(gathered):
        for option, problem, expected, example in items or []:
            where = f" (rank {rank})" if state.num_processes > 1 else ""
            out.append(ConfigError(option, problem + where, expected=expected, example=example))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 2 bad input or a failure the user can fix, 1 internal error,
    130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint)."""
    from .loop import clear_stop_signal, stop_signal

    args = build_parser().parse_args(argv)
    prog = f"{prog_name()} {args.stage}"
    clear_stop_signal()
    log = RunLog(args.log_level)
    cfg: Any = None
    try:
        with log:
            try:
                cfg = _prepare(args)
                log.attach(_log_path(cfg, args))
                note = cpu_step_note(cfg, args.stage, getattr(args, "device", None))
                if note:
                    logger.warning(note)
                summary = STAGES[args.stage][1](cfg, args)
            except (UsageError, ConfigError) as exc:
                log.record_exception(exc)
                log.error(f"{prog}: error: {exc}", rank_zero_only=True)
                return 2
            except KeyboardInterrupt:
                log.error(f"{prog}: interrupted")
                return 130
            except Exception as exc:  # noqa: BLE001 - the one place that turns failures into a message
                from .failures import explain

                where = log.record_exception(exc)
                log_file = _log_path(cfg, args)
                known = explain(exc, log_file.parent if log_file is not None else None)
                if known is not None:
                    log.error(f"{prog}: error: {known[0]} (details: {where})")
                    return known[1]
                first = " ".join(str(exc).split())[:300]
                log.error(f"{prog}: internal error: {type(exc).__name__}: {first} (full traceback: {where})")
                return 1
    finally:
        log.close()
    if summary is not None:
        print(summary)
    stopped = stop_signal()
    if stopped is not None:  # saved, but not finished: a script must not carry on as if it were
        import signal as _signal

        name = _signal.Signals(stopped).name
        print(
            f"{prog}: stopped by {name} after saving a checkpoint; rerun the same command to continue", file=sys.stderr
        )
        return 128 + stopped
    return 0
