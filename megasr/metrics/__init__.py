"""Image-quality metrics for evaluating super-resolution: one registry the eval command, the training
validation and the Image Quality node all read, so they cannot disagree.

Full-reference: ``psnr`` and ``ssim`` (Y channel, ``fidelity.py``), ``lpips`` and ``dists`` (learned,
``lpips.py``, ``dists.py``). No-reference: ``niqe`` (``niqe.py``; its pristine model is a data file) and ``clipiqa`` (``clipiqa.py``, CLIP RN50).
Learned metrics read their weights from files (the manifest's ``metric_*`` entries,
``python -m megasr fetch --eval``); nothing is downloaded here. A metric whose file is missing is skipped
with one line naming the file; the other metrics still run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fidelity

log = logging.getLogger("megasr")


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (its weight file is missing or unreadable); the message is one line."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    label: str
    needs_reference: bool
    higher_is_better: bool
    #: file names (in the metrics folder) the metric reads; empty for formula metrics
    files: tuple[str, ...] = ()
    unit: str = ""


METRIC_FOLDER = "megasr/metrics"  # under ComfyUI's models/; the manifest's metric entries point here

METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", "PSNR (Y)", True, True, unit="dB"),
    "ssim": MetricSpec("ssim", "SSIM (Y)", True, True),
    "lpips": MetricSpec("lpips", "LPIPS (Alex)", True, False, files=("lpips_alex.safetensors",)),
    "dists": MetricSpec("dists", "DISTS", True, False, files=("dists_vgg16.safetensors",)),
    "niqe": MetricSpec("niqe", "NIQE", False, False, files=("niqe_pris_params.safetensors",)),
    "clipiqa": MetricSpec("clipiqa", "CLIP-IQA (RN50)", False, True, files=("clipiqa_rn50.safetensors",)),
}


@dataclass
class MetricOptions:
    crop: int = 0
    size_rule: str = "error"
    max_mismatch: int = 4


@dataclass
class MetricResult:
    """Per-metric values (one per image of the batch) and the metrics skipped, with why (one line each)."""

    values: dict[str, list[float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


_learned_cache: dict[tuple[str, str, float], Callable[..., torch.Tensor]] = {}


def find_metric_file(name: str, folders: Sequence[str | Path]) -> Path:
    """The first ``folders/name`` that exists, else ``MetricUnavailable`` naming the file and folders."""
    for folder in folders:
        p = Path(folder) / name
        if p.is_file():
            return p
    where = ", ".join(str(f) for f in folders) or f"models/{METRIC_FOLDER}"
    raise MetricUnavailable(
        f"weight file '{name}' not found (looked in: {where}); get it with: python -m megasr fetch --eval"
    )


def _learned(spec: MetricSpec, folders: Sequence[str | Path], device: torch.device) -> Callable[..., torch.Tensor]:
    path = find_metric_file(spec.files[0], folders)
    key = (spec.name, str(path), path.stat().st_mtime)
    fn = _learned_cache.get(key)
    if fn is None:
        if spec.name == "lpips":
            from .lpips import load_lpips

            fn = load_lpips(path)
        elif spec.name == "dists":
            from .dists import load_dists

            fn = load_dists(path)
        elif spec.name == "niqe":
            from .niqe import load_niqe

            fn = load_niqe(path)
        elif spec.name == "clipiqa":
            from .clipiqa import load_clipiqa

            fn = load_clipiqa(path)
        else:  # pragma: no cover - every learned spec has a loader above
            raise MetricUnavailable(f"no loader for metric '{spec.name}'")
        _learned_cache.clear()  # one learned model kept in memory at a time
        _learned_cache[key] = fn
    return fn


def compute_metrics(
    names: Sequence[str],
    image: torch.Tensor,
    reference: torch.Tensor | None = None,
    folders: Sequence[str | Path] = (),
    options: MetricOptions | None = None,
    device: torch.device | str = "cpu",
) -> MetricResult:
    """Each named metric on ``image`` ([B, 3, H, W] RGB 0..1) against ``reference`` (same layout, or None).

    A full-reference metric without a reference, or a learned metric without its file, goes to ``skipped``
    with one line (also logged once); the others still run. Unknown names raise ``KeyError``.
    """
    opts = options or MetricOptions()
    device = torch.device(device)
    result = MetricResult()
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise KeyError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    for name in names:
        spec = METRICS[name]
        if spec.needs_reference and reference is None:
            result.skipped[name] = f"{spec.label}: skipped (needs a reference image)"
            continue
        try:
            if name == "psnr":
                vals = fidelity.psnr_y(image, reference, opts.crop, opts.size_rule, opts.max_mismatch)
            elif name == "ssim":
                vals = fidelity.ssim_y(image, reference, opts.crop, opts.size_rule, opts.max_mismatch)
            else:
                fn = _learned(spec, folders, device)
                img, ref = image, reference
                if ref is not None:
                    img, ref = fidelity.match_sizes(img, ref, opts.size_rule, opts.max_mismatch)
                    ref = fidelity.crop_border(ref, opts.crop)
                img = fidelity.crop_border(img, opts.crop)
                with torch.no_grad():
                    vals = fn(img.to(device, torch.float32), None if ref is None else ref.to(device, torch.float32))
        except MetricUnavailable as err:
            line = f"{spec.label}: skipped: {err}"
            log.warning("%s", line)
            result.skipped[name] = line
            continue
        result.values[name] = [float(v) for v in vals.detach().cpu().reshape(-1)]
    return result


def _build_lpips_alex(parts: Sequence[Path], output: Path) -> None:
    from .lpips import write_combined

    write_combined(parts[0], parts[1], output, "alex")


def _build_dists(parts: Sequence[Path], output: Path) -> None:
    from .dists import write_combined

    write_combined(parts[0], parts[1], output)


#: manifest ``produces.builder`` -> how the one metric file is made from the entry's downloaded parts (in order)
def _build_niqe(parts: Sequence[Path], output: Path) -> None:
    from .niqe import write_from_npz

    write_from_npz(parts, output)


def _build_clipiqa(parts: Sequence[Path], output: Path) -> None:
    from .clipiqa import write_from_open_clip

    write_from_open_clip(parts, output)


BUILDERS: dict[str, Callable[[Sequence[Path], Path], None]] = {
    "clipiqa": _build_clipiqa,
    "lpips_alex": _build_lpips_alex,
    "dists": _build_dists,
    "niqe": _build_niqe,
}


def build_metric_file(builder: str, parts: Sequence[str | Path], output: str | Path) -> Path:
    """Write ``output`` (atomic, checked by loading it) from a manifest entry's parts; ``MetricUnavailable`` with
    one line when a part is not what the builder expects."""
    if builder not in BUILDERS:
        raise MetricUnavailable(f"unknown metric file builder '{builder}' (known: {', '.join(BUILDERS)})")
    output = Path(output)
    try:
        BUILDERS[builder]([Path(p) for p in parts], output)
    except MetricUnavailable:
        output.unlink(missing_ok=True)
        raise
    except Exception as err:  # noqa: BLE001 - a part that does not fit is one line for the user
        output.unlink(missing_ok=True)
        raise MetricUnavailable(f"cannot build '{output.name}' from {[str(p) for p in parts]}: {err}") from err
    return output


def format_values(result: MetricResult) -> str:
    """A readable multi-line text: one line per metric (per image when the batch has several), then skips."""
    lines = []
    for name, vals in result.values.items():
        spec = METRICS[name]
        arrow = "higher is better" if spec.higher_is_better else "lower is better"
        unit = f" {spec.unit}" if spec.unit else ""
        shown = ", ".join(f"{v:.4f}" for v in vals)
        lines.append(f"{spec.label}: {shown}{unit} ({arrow})")
    lines.extend(result.skipped.values())
    return "\n".join(lines)
