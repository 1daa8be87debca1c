"""The core of ``python -m megasr eval``: upscale every image of one or more test folders, score it, and write
per-image and mean results (CSV, JSON) and a markdown table beside the paper's Table 1 figures.

Test folders: a folder of LR images (no-reference metrics only) or a dataset folder holding an LR/HR pair of
sub-folders under one of the common names (``test_LR``/``test_HR`` as in the StableSR test crops of RealSR and
DRealSR, ``lq``/``gt`` as in DIV2K-Val, ``LR``/``HR``, ``LQ``/``GT``, ``lr``/``hr``); DPED-iPhone crops are
LR only. LR and HR files are paired by name, ignoring the usual ``_LR4``/``_HR``/``x4`` decorations.

Resume: every finished image is appended to ``per_image.jsonl`` (flushed and fsynced) with its SR image in
``images/``; a run started again with the same settings skips those. A finished report is never overwritten
without ``force``. Each image gets a fixed seed: ``seed + crc32(its file name)``, independent of order.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .files import atomic_write, fsync_file
from .metrics import METRICS, MetricOptions, compute_metrics
from .metrics.fidelity import PROTOCOL

log = logging.getLogger("megasr")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PAIR_NAMES = (("test_LR", "test_HR"), ("lq", "gt"), ("LQ", "GT"), ("LR", "HR"), ("lr", "hr"), ("input", "target"))
_DECORATION = re.compile(r"(?i)([_-]?(lr|hr|lq|gt)\d*|[_-]?x\d)$")

#: The paper's Table 1, RealSR (DESIGN.md section 10); NIQE and DISTS are not in that excerpt.
PAPER_REALSR = {
    "MegaSR (paper)": {
        "psnr": 23.49,
        "ssim": 0.6903,
        "lpips": 0.3072,
        "maniqa": 0.5574,
        "musiq": 70.03,
        "clipiqa": 0.6790,
    },
    "SeeSR (MegaSR's table)": {
        "psnr": 23.60,
        "ssim": 0.6947,
        "lpips": 0.3007,
        "maniqa": 0.5437,
        "musiq": 69.82,
        "clipiqa": 0.6700,
    },
}
TABLE_COLUMNS = ("psnr", "ssim", "lpips", "niqe", "maniqa", "musiq", "clipiqa")

#: An upscaler: (LR [1, 3, h, w] in 0..1, seed) -> SR [1, 3, H, W] in 0..1.
Upscaler = Callable[[torch.Tensor, int], torch.Tensor]


class EvalError(RuntimeError):
    """A usage problem of the eval command (bad folder, earlier report present, settings changed)."""


def bicubic_upscaler(scale: int) -> Upscaler:
    """The baseline: bicubic interpolation (a = -0.75, as torch and OpenCV), clamped to 0..1."""

    def up(lr: torch.Tensor, seed: int) -> torch.Tensor:
        return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)

    return up


@dataclass(frozen=True)
class TestItem:
    name: str
    lr: Path
    hr: Path | None


@dataclass
class TestSet:
    name: str
    items: list[TestItem]
    paired: bool
    unmatched: list[str] = field(default_factory=list)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def pair_key(path: Path) -> str:
    """The name an LR and its HR share: the stem without ``_LR4``, ``_HR``, ``x4``... decorations."""
    return _DECORATION.sub("", path.stem).lower()


def discover(folder: str | Path) -> TestSet:
    """A test set from a dataset folder (an LR/HR pair of sub-folders) or a plain folder of LR images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"test folder '{folder}' does not exist or is not a folder")
    for lr_name, hr_name in PAIR_NAMES:
        lr_dir, hr_dir = folder / lr_name, folder / hr_name
        if lr_dir.is_dir() and hr_dir.is_dir():
            hrs = {pair_key(p): p for p in _images(hr_dir)}
            items, unmatched = [], []
            for p in _images(lr_dir):
                hr = hrs.get(pair_key(p))
                if hr is None:
                    unmatched.append(p.name)
                items.append(TestItem(p.name, p, hr))
            if unmatched:
                log.warning("%s: %d LR image(s) without an HR partner: %s", folder.name, len(unmatched), unmatched[:5])
            return TestSet(folder.name, items, True, unmatched)
    items = [TestItem(p.name, p, None) for p in _images(folder)]
    if not items:
        raise EvalError(f"test folder '{folder}' holds no images ({', '.join(IMAGE_EXTS)}) and no LR/HR sub-folders")
    return TestSet(folder.name, items, False)


def read_rgb(path: Path) -> torch.Tensor:
    """[1, 3, H, W] float64 in 0..1 from an 8-bit (or 16-bit, rounded to 8-bit) image file (float64 so that the
    Y-channel metrics are exact; the upscaler gets float32)."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I"):
            arr = np.asarray(im, dtype=np.float64) / 65535.0
            arr = np.repeat(arr[..., None], 3, axis=2)
            arr = np.round(arr * 255.0) / 255.0
        else:
            arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]


def to_u8(image: torch.Tensor) -> np.ndarray:
    return (image[0].clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def image_seed(seed: int, name: str) -> int:
    return (seed + zlib.crc32(name.encode("utf-8"))) % (2**32)


@dataclass
class EvalSettings:
    method: str
    scale: int = 4
    seed: int = 0
    metrics: tuple[str, ...] = ("psnr", "ssim", "lpips")
    crop: int = 0
    size_rule: str = "error"

    def protocol(self) -> str:
        return (
            PROTOCOL.format(crop=self.crop, size_rule=self.size_rule)
            + f" SR made by '{self.method}' at x{self.scale}, saved as 8-bit PNG and scored from that file; "
            f"seed per image = {self.seed} + crc32(file name)."
        )


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
    fsync_file(path)


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write: that image is done again
                continue
    return out


def _prepare_output(out_dir: Path, settings: EvalSettings, sets: Sequence[TestSet], force: bool) -> list[dict]:
    """Checks the output folder; returns the per-image records of an interrupted run with the same settings."""
    run_file, report = out_dir / "run.json", out_dir / "results.json"
    current = {"settings": asdict(settings), "sets": [s.name for s in sets]}
    if out_dir.exists() and any(out_dir.iterdir()):
        if force:
            log.info("--force: removing the earlier results in %s", out_dir)
            shutil.rmtree(out_dir)
        elif report.is_file():
            raise EvalError(f"'{out_dir}' already holds a finished report (results.json); give --force to replace it")
        elif run_file.is_file():
            earlier = json.loads(run_file.read_text(encoding="utf-8"))
            earlier["settings"]["metrics"] = tuple(earlier["settings"]["metrics"])
            if earlier != current:
                raise EvalError(
                    f"'{out_dir}' holds an interrupted run with other settings ({earlier}); give --force to restart"
                )
            done = _read_jsonl(out_dir / "per_image.jsonl")
            log.info("resuming: %d image(s) already done in %s", len(done), out_dir)
            return done
        else:
            raise EvalError(f"'{out_dir}' is not empty and is not an eval run; pick another folder or give --force")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_file, lambda tmp: Path(tmp).write_text(json.dumps(current, indent=1), encoding="utf-8"))
    return []


def run_eval(
    sets: Sequence[TestSet],
    upscaler: Upscaler,
    settings: EvalSettings,
    out_dir: str | Path,
    metric_folders: Sequence[str | Path] = (),
    force: bool = False,
    on_image: Callable[[dict], None] | None = None,
) -> dict:
    """Upscale and score every image; writes per_image.jsonl, results.csv/json and report.md in ``out_dir``."""
    out_dir = Path(out_dir)
    done_records = _prepare_output(out_dir, settings, sets, force)
    done = {(r["set"], r["image"]) for r in done_records}
    records = list(done_records)
    jsonl = out_dir / "per_image.jsonl"
    todo = [(s, it) for s in sets for it in s.items if (s.name, it.name) not in done]
    total, t0, n_run = len(todo), time.monotonic(), 0
    opts = MetricOptions(crop=settings.crop, size_rule=settings.size_rule)
    skip_lines: dict[str, str] = {}
    for i, (tset, item) in enumerate(todo, start=1):
        lr = hr = None
        bad = item.lr
        try:
            lr = read_rgb(item.lr)
            bad = item.hr
            hr = read_rgb(item.hr) if item.hr is not None else None
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped with a message
            log.warning("skipped %s/%s: cannot read %s (%s)", tset.name, item.name, bad, err)
            rec = {"set": tset.name, "image": item.name, "skipped": f"cannot read {bad}: {err}"}
            _append_jsonl(jsonl, rec)
            records.append(rec)
            continue
        seed = image_seed(settings.seed, item.name)
        sr = upscaler(lr.float(), seed)
        sr_path = out_dir / "images" / tset.name / (Path(item.name).stem + ".png")
        sr_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(sr_path, lambda tmp: Image.fromarray(to_u8(sr)).save(tmp, format="PNG"))
        sr = read_rgb(sr_path)  # scored from the 8-bit file, as the toolbox reads it
        names = [m for m in settings.metrics if hr is not None or not METRICS[m].needs_reference]
        res = compute_metrics(names, sr, hr, metric_folders, opts)
        for k, line in res.skipped.items():
            if k not in skip_lines:
                skip_lines[k] = line
        rec = {"set": tset.name, "image": item.name, "seed": seed, "sr": str(sr_path.relative_to(out_dir))}
        rec.update({k: v[0] for k, v in res.values.items()})
        _append_jsonl(jsonl, rec)
        records.append(rec)
        n_run += 1
        elapsed = time.monotonic() - t0
        eta = elapsed / n_run * (total - i)
        scores = " ".join(f"{k}={v[0]:.4f}" for k, v in res.values.items())
        log.info(
            "[%d/%d] %s/%s %s (elapsed %s, ETA %s)",
            i,
            total,
            tset.name,
            item.name,
            scores,
            _fmt_eta(elapsed),
            _fmt_eta(eta),
        )
        if on_image is not None:
            on_image(rec)
    summary = summarise(records, sets, settings, skip_lines)
    write_reports(out_dir, records, summary)
    return summary


def summarise(records: Sequence[dict], sets: Sequence[TestSet], settings: EvalSettings, skips: dict[str, str]) -> dict:
    means: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for s in sets:
        rows = [r for r in records if r["set"] == s.name and "skipped" not in r]
        counts[s.name] = len(rows)
        means[s.name] = {
            m: float(np.mean([r[m] for r in rows if m in r])) for m in settings.metrics if any(m in r for r in rows)
        }
    return {
        "settings": asdict(settings),
        "protocol": settings.protocol(),
        "means": means,
        "images_scored": counts,
        "images_skipped": [f"{r['set']}/{r['image']}: {r['skipped']}" for r in records if "skipped" in r],
        "metrics_skipped": list(skips.values()),
        "paper_realsr": PAPER_REALSR,
    }


def markdown_report(summary: dict) -> str:
    head = "| | " + " | ".join(METRICS[c].label if c in METRICS else c.upper() for c in TABLE_COLUMNS) + " |"
    lines = [
        "## Evaluation",
        "",
        f"Protocol: {summary['protocol']}",
        "",
        "The paper's figures are RealSR only (MegaSR Table 1, via IQA-PyTorch); compare ours with them only on RealSR "
        "under the same protocol. A dash: not computed / not reported.",
        "",
        head,
        "|---" * (len(TABLE_COLUMNS) + 1) + "|",
    ]

    def cell(v: float | None) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    for label, vals in summary["paper_realsr"].items():
        lines.append(f"| {label}, RealSR | " + " | ".join(cell(vals.get(c)) for c in TABLE_COLUMNS) + " |")
    method = summary["settings"]["method"]
    for set_name, vals in summary["means"].items():
        n = summary["images_scored"][set_name]
        lines.append(
            f"| ours: {method}, {set_name} ({n} images) | "
            + " | ".join(cell(vals.get(c)) for c in TABLE_COLUMNS)
            + " |"
        )
    for line in summary["metrics_skipped"] + summary["images_skipped"]:
        lines.append(f"\n- {line}")
    return "\n".join(lines) + "\n"


def write_reports(out_dir: Path, records: Sequence[dict], summary: dict) -> None:
    cols = ["set", "image", "seed", *summary["settings"]["metrics"], "sr", "skipped"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow(r)
    for set_name, vals in summary["means"].items():
        w.writerow({"set": set_name, "image": "MEAN", **vals})
    atomic_write(out_dir / "results.csv", lambda tmp: Path(tmp).write_text(buf.getvalue(), encoding="utf-8"))
    atomic_write(out_dir / "report.md", lambda tmp: Path(tmp).write_text(markdown_report(summary), encoding="utf-8"))
    full = {**summary, "per_image": list(records)}
    # results.json last: its presence marks the run finished (no overwrite without --force)
    atomic_write(
        out_dir / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(full, indent=1), encoding="utf-8")
    )


def default_metric_folders(models_dir: Path | None) -> list[Path]:
    return [] if models_dir is None else [models_dir / "megasr" / "metrics"]


def add_eval_arguments(s) -> None:  # noqa: ANN001 - an argparse sub-parser
    """The ``eval`` sub-command's options (registered by ``megasr/__main__.py``)."""
    from .metrics.fidelity import SIZE_RULES

    s.add_argument("--test", nargs="+", type=Path, required=True, metavar="FOLDER", help="test folders (LR, or LR/HR)")
    s.add_argument("--output", type=Path, required=True, help="folder for images, per-image results and the report")
    s.add_argument(
        "--method",
        default="bicubic",
        choices=["bicubic"],
        help="what upscales (baseline: bicubic; a ComfyUI workflow: scripts/eval_workflow.py)",
    )
    s.add_argument("--scale", type=int, default=4)
    s.add_argument("--seed", type=int, default=0, help="base seed; each image uses seed + crc32(its name)")
    s.add_argument("--metrics", default="psnr,ssim,lpips", help=f"comma-separated, from: {', '.join(METRICS)}")
    s.add_argument("--crop-border", type=int, default=0, help="pixels cut from each side before PSNR/SSIM/LPIPS")
    s.add_argument("--size-rule", choices=SIZE_RULES, default="error")
    s.add_argument("--force", action="store_true", help="replace an earlier report in --output")


def cmd_eval(args) -> int:  # noqa: ANN001 - the parsed namespace
    """``python -m megasr eval``: 0 done, 2 usage error (bad folder, report present, unknown metric)."""
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        log.error("eval: unknown metric(s) %s (known: %s)", ", ".join(unknown), ", ".join(METRICS))
        return 2
    if args.scale < 1:
        log.error("eval: --scale must be >= 1")
        return 2
    settings = EvalSettings(args.method, args.scale, args.seed, metrics, args.crop_border, args.size_rule)
    try:
        sets = [discover(f) for f in args.test]
        summary = run_eval(
            sets,
            bicubic_upscaler(args.scale),
            settings,
            args.output,
            default_metric_folders(args.models_dir),
            args.force,
        )
    except EvalError as err:
        log.error("eval: %s", err)
        return 2
    log.info("%s", markdown_report(summary))
    log.info("written: %s (results.csv, results.json, report.md, images/)", args.output)
    return 0
