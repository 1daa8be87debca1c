"""Every input problem of a stage, found before any model loads, reported together.

:func:`preflight` checks what a stage reads -- HR folders, base weights, DAGE files, the SeeSR folder -- and
resolves each path the way a ComfyUI user gives it: an existing file or folder, a model folder or the weight
file inside it, or a bare name found in the ComfyUI model folders (``models_dir`` + ``extra_model_paths.yaml``,
:mod:`training.model_folders`). Resolved paths are written back into the config (absolute), so the run's
``run_config.json`` and checkpoints record what was actually used and ``export`` needs nothing else.

The megasr stage's own checks (an SD-2 base, each part of it, the LoRA bases, the tagger's sources, the SeeSR
folder) are one pass, :func:`megasr_input_problems`; the pipeline (once the DAGE exports are wired in) and
:class:`training.stage_megasr.MegaSRStage` run it again through :func:`check_megasr_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megasr.dage.kinds import TRAINED_KINDS

from .base_models import base_layout_problems, base_part_path
from .config import RunConfig
from .errors import ConfigError, UsageError, raise_problems
from .kind_inputs import KIND_INPUTS
from .model_folders import ModelFolders, resolve_model_path, weight_file_in
from .ram_guidance import ram_input_problems
from .tagging import tag_sources

__all__ = ["STAGE_INPUTS", "check_megasr_inputs", "megasr_input_problems", "preflight"]

_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}

# what a path must be: "file", "folder" (a model folder with config.json) or "either"
_Spec = tuple[str, str, tuple[str, ...], str, str]  # (section, key, ComfyUI kinds, shape, example)

_DAGE_BASES: dict[str, _Spec] = {
    k.stage: (
        k.config_section,
        "base",
        KIND_INPUTS[k.kind].base_folders,
        KIND_INPUTS[k.kind].base_shape,
        KIND_INPUTS[k.kind].base_example,
    )
    for k in TRAINED_KINDS
}
#: the SD-2 base parts (each ``megasr.<part>``, else from ``megasr.base``)
_BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
_MEGASR_INPUTS: list[_Spec] = [
    ("megasr", "base", ("checkpoints",), "either", "v2-1_512-ema-pruned.safetensors"),
    ("megasr", "unet", ("checkpoints", "unet", "diffusion_models"), "either", "a U-Net folder or checkpoint"),
    ("megasr", "vae", ("vae", "checkpoints"), "either", "a VAE folder or checkpoint"),
    ("megasr", "text_encoder", ("text_encoders", "clip", "checkpoints"), "either", "a text encoder folder"),
    ("megasr", "tokenizer", (), "folder", "/ComfyUI/comfy/sd1_tokenizer"),
]
for _k in TRAINED_KINDS:  # megasr.<config_section>: the fine-tuned file; megasr.<config_section>_base: a LoRA's base
    _MEGASR_INPUTS.append(("megasr", _k.config_section, ("megasr",), "file", f"{_k.component}.safetensors"))
    if _k.lora:
        _in = KIND_INPUTS[_k.kind]
        _MEGASR_INPUTS.append(
            ("megasr", f"{_k.config_section}_base", _in.base_folders, _in.base_shape, Path(_in.base_example).name)
        )
_MEGASR_INPUTS += [
    ("megasr", "ram", ("megasr",), "file", "ram_swin_large_14m.pth"),
    ("megasr", "dape", ("megasr",), "file", "DAPE.pth"),
]
STAGE_INPUTS: dict[str, list[_Spec]] = {**{k: [v] for k, v in _DAGE_BASES.items()}, "megasr": _MEGASR_INPUTS}


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_EXTS for p in folder.rglob("*") if p.is_file())


def _check_data(cfg: RunConfig, option: str) -> list[ConfigError]:
    if not cfg.data.hr_dirs:
        return [
            ConfigError(
                option,
                "no HR image folder given",
                expected="a folder of HR photos",
                example="--input /data/photos (or data.hr_dirs: [/data/photos] in the config)",
            )
        ]
    out = []
    for d in cfg.data.hr_dirs:
        p = Path(d).expanduser()
        if not p.is_dir():
            out.append(
                ConfigError(option, f"'{d}' does not exist or is not a folder", expected="a folder of HR photos")
            )
        elif not _has_images(p):
            out.append(ConfigError(option, f"'{d}' holds no readable images", expected="png/jpg/webp/bmp/tif files"))
    return out


def _shape(path: Path, shape: str) -> tuple[Path | None, str | None]:
    """The path a loader wants for ``shape``, or a problem."""
    if shape == "folder":
        return (path, None) if path.is_dir() else (None, "is not a folder")
    if shape == "file":
        if path.is_file():
            return path, None
        found = weight_file_in(path) if path.is_dir() else None
        return (found, None) if found else (None, "is a folder without a single .safetensors weight file")
    if shape == "model":  # a transformers model folder, or its weight file (then the folder, for config.json)
        if path.is_file() and (path.parent / "config.json").is_file():
            return path.parent, None
        return path, None
    return path, None


def preflight(cfg: RunConfig, stage: str, option_names: Callable[[str], str] | None = None) -> list[ConfigError]:
    """Problems of ``stage``'s inputs (empty when all is well); resolved paths are written into ``cfg``.

    ``option_names(key)`` gives the name to report for a dotted key (the CLI flag it came from, if any).
    """
    name = option_names or (lambda key: key)
    folders = ModelFolders(cfg.models_dir)
    problems: list[ConfigError] = []
    if cfg.models_dir and (folders.models_dir is None or not folders.models_dir.is_dir()):
        problems.append(
            ConfigError(
                name("models_dir"), f"'{cfg.models_dir}' is not a folder", example="--models-dir /ComfyUI/models"
            )
        )
    if folders.problem:
        problems.append(ConfigError(name("models_dir"), folders.problem))
    if stage not in ("export",):
        problems.extend(_check_data(cfg, name("data.hr_dirs")))
        try:  # an 8-bit optimiser that cannot run here: refused before anything trains
            from .runs import check_optimizer

            check_optimizer(cfg)
        except UsageError as exc:
            problems.append(ConfigError(name("train.optimizer"), exc.problem, example=exc.example))
    for section, key, kinds, shape, example in STAGE_INPUTS.get(stage, []):
        holder = getattr(cfg, section)
        value = getattr(holder, key)
        if not value:
            continue
        option = name(f"{section}.{key}")
        found = resolve_model_path(str(value), kinds, folders) if kinds else Path(value).expanduser()
        if found is None or not found.exists():
            where = f" nor in the ComfyUI {'/'.join(kinds)} folders" if kinds and cfg.models_dir else ""
            hint = " (or give --models-dir to find names there)" if kinds and not cfg.models_dir else ""
            problems.append(
                ConfigError(
                    option, f"'{value}' does not exist{where}{hint}", expected="an existing path", example=example
                )
            )
            continue
        resolved, problem = _shape(found, shape)
        if problem:
            problems.append(ConfigError(option, f"'{value}' {problem}", example=example))
            continue
        setattr(holder, key, str(resolved))
    if stage == "megasr":
        problems.extend(megasr_input_problems(cfg, name))
    return problems


def megasr_input_problems(cfg: RunConfig, option_names: Callable[[str], str] | None = None) -> list[ConfigError]:
    """Every problem of the megasr stage's inputs beyond a path's existence (which :func:`preflight` resolves):
    an SD-2 base and each of its parts, the LoRA bases, the teacher tagger's sources and the SeeSR folder."""
    name = option_names or (lambda key: key)
    m = cfg.megasr
    problems: list[ConfigError] = []
    has_base = bool(m.base or (m.unet and m.vae and m.text_encoder))
    if not has_base:
        problems.append(
            ConfigError(
                name("megasr.base"),
                "no SD-2 base given",
                expected="an SD-2-base checkpoint file or diffusers folder",
                example="--base v2-1_512-ema-pruned.safetensors --models-dir /ComfyUI/models",
            )
        )
    elif not m.base or Path(m.base).expanduser().exists():  # a missing base is its own problem, said once
        part_problems: list[ConfigError] = []
        for part in _BASE_PARTS:
            if getattr(m, part):
                if not Path(getattr(m, part)).expanduser().exists():
                    part_problems.append(ConfigError(name(f"megasr.{part}"), "does not exist"))
                continue  # given itself: resolved by preflight()
            try:
                base_part_path(m, part)
            except UsageError as exc:
                part_problems.append(exc)
        problems.extend(part_problems)
        if not part_problems:  # every part is there: open each (headers, layouts) before anything trains
            problems.extend(base_layout_problems(m))
    examples = {key: example for _, key, _, _, example in _MEGASR_INPUTS}
    for kind in TRAINED_KINDS:
        section = kind.config_section
        if kind.lora and getattr(m, section) and not getattr(m, f"{section}_base"):
            problems.append(
                ConfigError(
                    name(f"megasr.{section}_base"),
                    f"the {kind.kind} LoRA megasr.{section} needs its base weights",
                    example=examples[f"{section}_base"],
                )
            )
    if m.tags.enabled and has_base and not m.ram:  # RAM tags replace the zero-shot teacher
        try:
            tag_sources(m)
        except UsageError as exc:
            problems.append(exc)
    problems += ram_input_problems(cfg, name)
    if cfg.init.seesr_unet and not cfg.init.seesr_dir:
        problems.append(ConfigError("init.seesr_unet", "needs init.seesr_dir (the SeeSR folder whose unet/ to use)"))
    if cfg.init.seesr_dir and not Path(cfg.init.seesr_dir).expanduser().is_dir():
        problems.append(ConfigError("init.seesr_dir", f"'{cfg.init.seesr_dir}' is not a folder"))
    return problems


def check_megasr_inputs(cfg: RunConfig) -> None:
    """:func:`megasr_input_problems`, raised (one problem, or all of them together)."""
    raise_problems(megasr_input_problems(cfg))
