"""``python -m megasr``: list, check and fetch the files of the model manifest (``megasr/manifest.json``).

    python -m megasr list                                   # every file: folder, source, licence
    python -m megasr check [--models-dir DIR] [--extra-model-paths-config FILE]   # what is still missing
    python -m megasr fetch [--only ID ...] [--training] [--eval] [--models-dir DIR] [--offline] [--endpoint URL]
    python -m megasr convert-seesr SEESR_FOLDER OUT.safetensors [--fp16]   # SeeSR's unet/ + controlnet/ -> one file
    python -m megasr eval --test FOLDER ... --output DIR [--metrics psnr,ssim,lpips] [--force]   # docs/EVALUATION.md

``fetch`` downloads the public files (default: the three the nodes need; ``--training`` adds the bases of the
training stages; ``--eval`` picks the evaluation metrics' weights alone, downloaded from their publishers and
combined into one file per metric; ``--only`` picks entries) into ``<models-dir>/<folder>/``, resumable and sha256-checked where
the manifest knows the hash, skipping files already present there or in any folder of the given
``extra_model_paths.yaml``. ``--models-dir`` defaults to the ``models`` folder of the ComfyUI this pack is
installed in (``ComfyUI/custom_nodes/ComfyUI-MegaSR`` -> ``ComfyUI/models``). Offline (``--offline``, or
huggingface_hub's own ``HF_HUB_OFFLINE``) nothing is downloaded: it lists every missing file with its folder and
address and exits with status 2. MegaSR's own weights have no public source: both commands print the training
command that makes each. Exit status: 0 done, 1 a download failed (run again to resume), 2 usage error or
files missing offline / in ``check``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import manifest as M
from .download import convert_bin_to_safetensors, download_file, ensure_weight_file, hub_file_url, hub_offline
from .errors import WeightFileError

log = logging.getLogger("megasr")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SEESR_FILE = "seesr_sd2_x4.safetensors"  # megasr.seesr_weights.SEESR_FILE_NAME (not imported: it pulls in torch)


def default_models_dir() -> Path | None:
    """``ComfyUI/models`` when this pack sits in ``ComfyUI/custom_nodes/<pack>``."""
    comfy = Path(__file__).resolve().parents[2]
    if comfy.name == "custom_nodes" and (comfy.parent / "models").is_dir():
        return comfy.parent / "models"
    return None


def extra_model_folders(config: Path) -> dict[str, list[Path]]:
    """Folders per model type from an ``extra_model_paths.yaml`` (as ComfyUI reads it: ``base_path`` plus one
    or more relative or absolute paths per folder name, one a line)."""
    import yaml

    data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    out: dict[str, list[Path]] = {}
    for section in data.values():
        if not isinstance(section, dict):
            continue
        base = Path(os.path.expanduser(str(section.get("base_path", ""))))
        if not base.is_absolute():
            base = config.parent / base
        for key, value in section.items():
            if key in ("base_path", "is_default") or value is None:
                continue
            for line in str(value).splitlines():
                line = line.strip()
                if line:
                    out.setdefault(key, []).append(base / os.path.expanduser(line))
    return out


def _folders(models_dir: Path | None, extra: dict[str, list[Path]], folder: str) -> list[Path]:
    comfy_folder, _, sub = folder.partition("/")
    roots = ([models_dir / comfy_folder] if models_dir is not None else []) + extra.get(comfy_folder, [])
    return [r / sub if sub else r for r in roots]


def _present(folders: list[Path], f: M.ManifestFile) -> Path | None:
    for folder in folders:
        for name in (f.name, f.convert_to):
            if name and (folder / name).is_file():
                return folder / name
    return None


def cmd_convert_seesr(args: argparse.Namespace) -> int:
    from .errors import SeeSRError
    from .seesr_weights import convert_seesr

    try:
        convert_seesr(
            args.seesr_dir,
            args.output,
            clip_dim=args.clip_dim,
            dtype=_half() if args.fp16 else None,
            overwrite=args.overwrite,
        )
    except (SeeSRError, WeightFileError, FileExistsError) as err:
        log.error("convert-seesr: %s", err)
        return EXIT_USAGE
    return EXIT_OK


def _half():
    import torch

    return torch.float16


def _selected(args: argparse.Namespace) -> list[M.ManifestEntry]:
    if args.only:
        return [M.entry(i) for i in args.only]
    if getattr(args, "eval", False):
        return [e for e in M.load_manifest() if e.for_eval]
    training = getattr(args, "training", False)
    return [e for e in M.load_manifest() if e.needed_for_nodes or (training and not e.for_eval)]


def _built(folders: list[Path], e: M.ManifestEntry) -> Path | None:
    """The file an entry builds from its parts, where it exists (None: not built, or the entry builds none)."""
    if not e.produces:
        return None
    return _present(folders, M.ManifestFile(name=e.produces["name"]))


def cmd_list(args: argparse.Namespace) -> int:
    for e in M.load_manifest():
        log.info("%s  [%s]  %s", e.id, e.folder, e.what)
        for f in e.files:
            log.info("    %s", f.name)
        log.info("    %s", e.how_to_get())
        log.info("    licence: %s; size: %s; verified: %s", e.licence, e.size, e.verified)
    return EXIT_OK


def _missing(args: argparse.Namespace, entries: list[M.ManifestEntry]) -> list[tuple[M.ManifestEntry, M.ManifestFile]]:
    extra: dict[str, list[Path]] = {}
    for cfg in args.extra_model_paths_config:
        extra.update({k: extra.get(k, []) + v for k, v in extra_model_folders(cfg).items()})
    out = []
    for e in entries:
        folders = _folders(args.models_dir, extra, e.folder)
        if _built(folders, e) is not None:
            continue  # the combined file is there: its parts are not needed
        for f in e.files:
            if _present(folders, f) is None:
                out.append((e, f))
    return out


def _report(missing: list[tuple[M.ManifestEntry, M.ManifestFile]], models_dir: Path | None, why: str) -> None:
    root = str(models_dir) if models_dir is not None else "<ComfyUI>/models"
    log.error("%s: %d file(s) missing:", why, len(missing))
    for e, f in missing:
        target = f"{root}/{e.folder}/{f.name}"
        if e.public:
            url = f.url or hub_file_url(e.repo_id, f.repo_file, e.revision)
            built = f" (then built into {e.produces['name']})" if e.produces else ""
            log.error("  %s\n      from %s%s", target, url, built)
        else:
            log.error("  %s\n      %s", target, e.how_to_get())


def cmd_check(args: argparse.Namespace) -> int:
    selected = _selected(args)
    missing = _missing(args, selected)
    missing_ids = {e.id for e, _ in missing}
    unbuilt = [e for e in selected if e.produces and e.id not in missing_ids and not _built_here(args, e)]
    for e in unbuilt:
        log.error("check: %s/%s is not built yet: run %s", e.folder, e.produces["name"], e.fetch_command)
    if unbuilt and not missing:
        return EXIT_USAGE
    if not missing:
        log.info("every file is in place")
        return EXIT_OK
    _report(missing, args.models_dir, "check")
    return EXIT_USAGE


def cmd_fetch(args: argparse.Namespace) -> int:
    if args.models_dir is None:
        log.error("fetch: give --models-dir (the models folder of your ComfyUI, e.g. ComfyUI/models)")
        return EXIT_USAGE
    missing = _missing(args, _selected(args))
    trained = [(e, f) for e, f in missing if not e.public]
    public = [(e, f) for e, f in missing if e.public]
    if trained:
        _report(trained, args.models_dir, "not downloadable (make them with the training package)")
    offline = args.offline or hub_offline()
    if public and offline:
        _report(public, args.models_dir, "offline (--offline or HF_HUB_OFFLINE): nothing downloaded")
        return EXIT_USAGE
    failed = 0
    for e, f in public:
        folder = args.models_dir / e.folder
        try:
            if f.url:  # published outside the hub: its own address, the same checked, resumable download
                path = download_file(f.url, str(folder / f.name), f.sha256, f.size_bytes, progress=not args.no_progress)
                log.info("ok  %s", path)
                continue
            path = ensure_weight_file(
                str(folder),
                f.name,
                e.repo_id,
                f.sha256,
                allow_download=True,
                endpoint=args.endpoint,
                revision=e.revision,
                repo_file=f.repo_file,
                size_bytes=f.size_bytes,
                offline=False,
                progress=not args.no_progress,
            )
            if f.convert_to:
                convert_bin_to_safetensors(path, str(folder / f.convert_to))
            log.info("ok  %s", path)
        except WeightFileError as err:
            failed += 1
            log.error("failed  %s", err)
    failed += _build_products(args, _selected(args))
    if failed:
        log.error("%d download(s) failed (each message above says why and what to do)", failed)
        return EXIT_FAILED
    if trained:
        log.warning("the public files are in place; %d trained file(s) are still missing (see above)", len(trained))
    return EXIT_OK


def _built_here(args: argparse.Namespace, e: M.ManifestEntry) -> bool:
    extra: dict[str, list[Path]] = {}
    for cfg in args.extra_model_paths_config:
        extra.update({k: extra.get(k, []) + v for k, v in extra_model_folders(cfg).items()})
    return _built(_folders(args.models_dir, extra, e.folder), e) is not None


def _build_products(args: argparse.Namespace, entries: list[M.ManifestEntry]) -> int:
    """Build each entry's combined file (``produces``) from its downloaded parts; returns how many failed."""
    from .metrics import MetricUnavailable, build_metric_file

    failed = 0
    for e in entries:
        if not e.produces or _built_here(args, e):
            continue
        folder = args.models_dir / e.folder
        parts = [folder / f.name for f in e.files]
        if not all(p.is_file() for p in parts):
            continue  # a download failed: reported above
        try:
            out = build_metric_file(e.produces["builder"], parts, folder / e.produces["name"])
            log.info("ok  %s (built from %s)", out, ", ".join(f.name for f in e.files))
        except MetricUnavailable as err:
            failed += 1
            log.error("failed  %s", err)
    return failed


class _ConsoleHandler(logging.Handler):
    """The command's own output: each message on whatever ``sys.stdout`` is at that moment."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stdout.write(record.getMessage() + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m megasr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every file of the manifest")
    from .evaluate import add_eval_arguments

    ev = sub.add_parser("eval", help="upscale test folders and score them (the paper's Table 1 protocol)")
    add_eval_arguments(ev)
    ev.add_argument("--models-dir", type=Path, default=default_models_dir(), help="ComfyUI's models folder")
    cs = sub.add_parser("convert-seesr", help="SeeSR's unet/ + controlnet/ folders -> one MegaSR weight file")
    cs.add_argument("seesr_dir", type=Path, help="the folder holding SeeSR's unet/ and controlnet/ (…/seesr)")
    cs.add_argument("output", type=Path, help=f"the MegaSR file to write, e.g. models/megasr/{SEESR_FILE}")
    cs.add_argument("--clip-dim", type=int, default=1280, help="CLIP vision width for CISM² (zero init; default ViT-H)")
    cs.add_argument("--fp16", action="store_true", help="store fp16 (half the size; SeeSR's values are fp16-exact)")
    cs.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    for name in ("check", "fetch"):
        s = sub.add_parser(name, help="what is missing" if name == "check" else "download the public files")
        s.add_argument("--only", nargs="+", metavar="ID", help="manifest entries (see `list`)")
        s.add_argument("--training", action="store_true", help="also the bases of the training stages")
        s.add_argument("--eval", action="store_true", help="only the evaluation metrics' weights (LPIPS, DISTS)")
        s.add_argument("--models-dir", type=Path, default=default_models_dir(), help="ComfyUI's models folder")
        s.add_argument("--extra-model-paths-config", type=Path, action="append", default=[], metavar="YAML")
        if name == "fetch":
            s.add_argument("--offline", action="store_true", help="download nothing; list what is missing")
            s.add_argument("--endpoint", help="hub address (default: huggingface_hub's, i.e. HF_ENDPOINT)")
            s.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    known = {e.id for e in M.load_manifest()}
    bad = [i for i in (getattr(args, "only", None) or []) if i not in known]
    if bad:
        p.error(
            f"--only: unknown entr{'ies' if len(bad) > 1 else 'y'} {', '.join(bad)} (known: {', '.join(sorted(known))})"
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not any(isinstance(h, _ConsoleHandler) for h in log.handlers):
        log.addHandler(_ConsoleHandler())
        log.setLevel(logging.INFO)
    if args.command == "eval":
        from .evaluate import cmd_eval

        return cmd_eval(args)
    commands = {"list": cmd_list, "check": cmd_check, "fetch": cmd_fetch, "convert-seesr": cmd_convert_seesr}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
