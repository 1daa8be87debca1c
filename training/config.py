"""Run configuration: typed dataclasses loaded from YAML/JSON files plus ``--set key=value`` overrides.

Every option has a dotted name (``train.lr``, ``data.crop_size``, ``degradation.blur_sigma``); an unknown
name or a value of the wrong type is a :class:`ConfigError` naming the option and where it came from.
Defaults are the paper's where MegaSR states them (Adam, lr 2.5e-5, batch 16, 200k steps, 512 px crops), SeeSR's
text dropout 0.5 (MegaSR states none), fp16 mixed precision as our choice (MegaSR states no precision; the
frozen parts run in it, the trained weights stay fp32), MMSR's modality dropout 0.1, and Real-ESRGAN x4plus for
the degradation.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megasr.dage.kinds import TRAINED_KINDS

from .config_nested import nested_problems
from .degradations import DegradationConfig
from .errors import ConfigError, raise_problems

__all__ = [
    "DageConfig",
    "DataConfig",
    "InitConfig",
    "MegaSRStageConfig",
    "PreviewConfig",
    "RunConfig",
    "TagsConfig",
    "TrainConfig",
    "ValidationSection",
    "apply_overrides",
    "config_to_dict",
    "load_config",
    "parse_config",
]


#: ``train.optimizer``: Adam (the paper's), AdamW (decoupled weight decay; the same as Adam at weight_decay 0),
#: bitsandbytes' AdamW8bit (moments in 8 bits: 2 bytes per parameter instead of 8; CUDA only)
OPTIMIZERS = ("adam", "adamw", "adamw8bit")


@dataclass
class DataConfig:
    """HR image folders and cropping."""

    hr_dirs: list[str] = field(default_factory=list)
    crop_size: int = 512
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    small_images: str = "reflect"  # or "upscale"
    check_files: bool = True
    num_workers: int = 4


@dataclass
class TrainConfig:
    """Optimisation (the paper's values where MegaSR states them; see the module docstring for the others)."""

    batch_size: int = 16
    lr: float = 2.5e-5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_steps: int = 200_000
    grad_accum: int = 1
    mixed_precision: str = "fp16"  # "no" | "fp16" | "bf16" (fp16 falls back to "no" on CPU)
    max_grad_norm: float | None = 1.0
    lr_warmup_steps: int = 0
    text_dropout: float = 0.5
    checkpoint_every: int = 2000
    keep_last: int = 3
    log_every: int = 50
    overfit_batches: int = 0  # > 0: cycle over the first N micro-batches with fixed degradations (debugging)
    gpu_memory: str | None = None  # e.g. "24GB": the megasr stage refuses a run whose memory plan does not fit
    gradient_checkpointing: bool = False  # megasr: recompute ControlNet + U-Net blocks in backward (less memory)
    ema_decay: float | None = None  # megasr, e.g. 0.9999: an fp32 EMA of the trained weights, exported (0/None: off)
    optimizer: str = "adam"  # "adam" (the paper's) | "adamw" | "adamw8bit" (bitsandbytes, CUDA only)


@dataclass
class PreviewConfig:
    """``degrade-preview``: how many examples."""

    count: int = 8
    batch_size: int = 4


@dataclass
class DageConfig:
    """One DAGE fine-tuning stage (sections ``dage_hed``, ``dage_depth``, ``dage_seg``, ``dage_clip``).

    ``base``: the pretrained extractor to start from -- HED: ``ControlNetHED.pth`` or a safetensors copy;
    depth / segmentation: a transformers model folder or one safetensors file (then ``extractor`` holds its
    config); CLIP: a ComfyUI ``clip_vision`` file. Without ``base`` the extractor is randomly initialised
    (tests only; a warning says so). ``extractor``: the extractor's config (architecture, LoRA r/alpha,
    working resolution), as its ``from_config`` takes it. ``output_weight``: weight of the output loss
    beside the L1 on intermediate representations (Eq. 3, 5, 6). The HR teacher is frozen; the LR student
    is trained (HED and segmentation fully, depth and CLIP through LoRA r=8).
    """

    base: str | None = None
    extractor: dict[str, Any] = field(default_factory=dict)
    output_weight: float = 1.0
    teacher_input: str = "hr"  # "hr" or "hr_usm": what the frozen teacher sees


@dataclass
class TagsConfig:
    """``megasr.tags``: the default training prompt = tags of the HR crop by the teacher tagger (the CLIP
    without the DAGE LoRA; see :mod:`training.tagging`); a sidecar ``<image>.txt`` overrides it (``captions``),
    ``megasr.prompt`` is used when no tag passes. ``clip_vision``: the ViT-H/14 clip_vision file (default
    ``megasr.dage_clip_base``); ``text``: the OpenCLIP ViT-H/14 text tower with projection (an SD-2 checkpoint
    file or a CLIPTextModelWithProjection folder; default: the SD-2 base when it is one); ``vocabulary``: a tag
    file (default the shipped ``megasr/data/tag_vocabulary.txt``), ``template`` overrides its template;
    ``top_k`` / ``threshold`` (z-score over the vocabulary) as on the MegaSR Tags node."""

    enabled: bool = True
    clip_vision: str | None = None
    text: str | None = None
    vocabulary: str | None = None
    template: str | None = None
    top_k: int = 8
    threshold: float = 2.0


@dataclass
class MegaSRStageConfig:
    """``python -m training megasr`` (see :mod:`training.stage_megasr`).

    ``base``: the SD-2-base diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``) or one
    SD checkpoint file; ``unet``/``vae``/``text_encoder``/``tokenizer`` override single parts (folder or file;
    ``unet_config`` is the diffusers U-Net config for a single-file U-Net, default SD-2-base). ``model``:
    MegaSRConfig overrides (``connector``, ``msgam_hidden``, ...; ``clip_dim`` follows the CLIP extractor).
    ``dage_*``: the fine-tuned DAGE weight files (``*_base``: the LoRA's base weights); a missing one leaves
    that guidance out. ``guidance_cache``: a folder caching the guidance per LR image. Text: ``<image>.txt``
    tags when ``captions``, else the HR crop's tags (``tags``), else ``prompt``; ``target``: ``hr_usm`` (default,
    the USM-sharpened HR of Real-ESRGAN/SeeSR training) or ``hr`` is VAE-encoded.
    """

    base: str | None = None
    unet: str | None = None
    vae: str | None = None
    text_encoder: str | None = None
    tokenizer: str | None = None
    unet_config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    dage_hed: str | None = None
    dage_depth: str | None = None
    dage_depth_base: str | None = None
    dage_seg: str | None = None
    dage_clip: str | None = None
    dage_clip_base: str | None = None
    dage_resolution: int = 512
    clip_crop: bool = False
    guidance_cache: str | None = None
    prompt: str = ""
    captions: bool = True
    tags: TagsConfig = field(default_factory=TagsConfig)
    target: str = "hr_usm"
    # DAPE-equipped RAM (SeeSR's tagger, the paper's "tags and semantic representations"): ``ram`` the RAM Swin-L
    # file (ram_swin_large_14m.pth or a safetensors copy), ``dape`` SeeSR's DAPE.pth merged into it (optional),
    # ``ram_tag_list`` / ``ram_thresholds`` RAM's data files (default: the shipped ones). Given ``ram``: the
    # training prompt is RAM's tags of the HR crop (instead of the zero-shot tagger) and a model with SeeSR's
    # representation branch (``model.representation_dim``) reads RAM's tokens of the LR (training.ram_guidance).
    ram: str | None = None
    dape: str | None = None
    ram_tag_list: str | None = None
    ram_thresholds: str | None = None
    # Modality dropout (MMSR, whose rate is 0.1): each sample's map / image semantics is replaced by its null
    # input with this probability, independently, so any subset of guidance is a trained state (see
    # training.stage_megasr). At 0.1 the full-guidance state the nodes run by default is 0.9^4 = 66% of the
    # samples (0.3 gave 0.7^4 = 24%); every one-input-missing state still gets 0.1 * 0.9^3 = 7% (docs/ARCHITECTURE.md).
    hed_dropout: float = 0.1
    depth_dropout: float = 0.1
    seg_dropout: float = 0.1
    clip_dropout: float = 0.1


@dataclass
class InitConfig:
    """Warm start of the MegaSR stage: ``seesr_dir`` a local SeeSR folder (``controlnet/``, ``unet/``);
    ``seesr_unet``: also replace the frozen U-Net's base weights by SeeSR's (see :mod:`training.seesr`)."""

    seesr_dir: str | None = None
    seesr_unet: bool = False


@dataclass
class ValidationSection:
    """``validation``: scores of the model being trained on a held-out folder every ``every`` steps (0: off).

    ``folder``: LR images, or an LR/HR pair of sub-folders (the layouts ``python -m megasr eval`` reads); the
    first ``max_images`` by name are upscaled with ``steps`` DDIM steps (seed ``seed``), scored with ``metrics``
    (megasr.metrics names; learned ones read ``metric_folders``, default ``<models_dir>/megasr/metrics``), put in
    one grid ``<run>/validation/step_N.png`` and logged to the run log; ``log_with: tensorboard`` also writes
    them to ``<run>/logs`` through accelerate's TensorBoard tracker (opt-in: needs the tensorboard package).
    The checkpoint of the best step by ``best_metric`` is kept in ``<run>/best`` beside the newest ones.
    ``every`` must be a multiple of ``train.checkpoint_every``."""

    every: int = 0
    folder: str | None = None
    metrics: list[str] = field(default_factory=lambda: ["psnr", "ssim"])
    best_metric: str = "psnr"
    max_images: int = 8
    steps: int = 20
    seed: int = 0
    crop_border: int = 0
    size_rule: str = "crop"
    metric_folders: list[str] = field(default_factory=list)
    log_with: str | None = None


@dataclass
class RunConfig:
    """A whole run."""

    seed: int = 0
    output_dir: str = "runs/megasr"
    models_dir: str | None = None  # a ComfyUI models folder: bases by name, tokenizer files, export targets
    data: DataConfig = field(default_factory=DataConfig)
    degradation: DegradationConfig = field(default_factory=DegradationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    dage_hed: DageConfig = field(default_factory=DageConfig)
    dage_depth: DageConfig = field(default_factory=DageConfig)
    dage_seg: DageConfig = field(default_factory=DageConfig)
    dage_clip: DageConfig = field(default_factory=DageConfig)
    megasr: MegaSRStageConfig = field(default_factory=MegaSRStageConfig)
    init: InitConfig = field(default_factory=InitConfig)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def validate(self) -> None:
        """Cross-field checks (ranges); raises :class:`ConfigError` (or :class:`ConfigProblems`) naming each option."""
        raise_problems(self.problems())

    def problems(self) -> list[ConfigError]:
        """Every range / choice problem of the config (empty when it is fine)."""
        out: list[ConfigError] = []
        positive = {
            "data.crop_size": self.data.crop_size,
            "train.batch_size": self.train.batch_size,
            "train.grad_accum": self.train.grad_accum,
            "train.checkpoint_every": self.train.checkpoint_every,
            "train.keep_last": self.train.keep_last,
            "train.log_every": self.train.log_every,
            "preview.count": self.preview.count,
            "preview.batch_size": self.preview.batch_size,
        }
        for name, value in positive.items():
            if value < 1:
                out.append(ConfigError(name, f"must be >= 1, got {value}"))
        non_negative = {
            "train.max_steps": self.train.max_steps,
            "data.num_workers": self.data.num_workers,
            "train.overfit_batches": self.train.overfit_batches,
            "train.lr_warmup_steps": self.train.lr_warmup_steps,
        }
        for name, value in non_negative.items():
            if value < 0:
                out.append(ConfigError(name, f"must be >= 0, got {value}"))
        if self.train.lr <= 0:
            out.append(ConfigError("train.lr", f"must be > 0, got {self.train.lr}", example="train.lr=2.5e-5"))
        if not 0.0 <= self.train.text_dropout <= 1.0:
            out.append(ConfigError("train.text_dropout", f"must be in [0, 1], got {self.train.text_dropout}"))
        for kind in TRAINED_KINDS:
            p = getattr(self.megasr, f"{kind.kind}_dropout")
            if not 0.0 <= p <= 1.0:
                out.append(ConfigError(f"megasr.{kind.kind}_dropout", f"must be in [0, 1], got {p}"))
        if self.train.mixed_precision not in ("no", "fp16", "bf16"):
            out.append(
                ConfigError(
                    "train.mixed_precision",
                    f"must be no, fp16 or bf16, got '{self.train.mixed_precision}'",
                    example="train.mixed_precision=bf16",
                )
            )
        if self.train.optimizer not in OPTIMIZERS:
            out.append(
                ConfigError(
                    "train.optimizer",
                    f"must be one of {', '.join(OPTIMIZERS)}, got '{self.train.optimizer}'",
                    example="train.optimizer=adamw8bit",
                )
            )
        if self.train.ema_decay is not None and not 0.0 <= self.train.ema_decay < 1.0:
            out.append(
                ConfigError(
                    "train.ema_decay",
                    f"must be in [0, 1) (0 or empty: no EMA), got {self.train.ema_decay}",
                    example="train.ema_decay=0.9999",
                )
            )
        if self.data.small_images not in ("reflect", "upscale"):
            out.append(ConfigError("data.small_images", f"must be reflect or upscale, got '{self.data.small_images}'"))
        for name in (kind.config_section for kind in TRAINED_KINDS):
            section = getattr(self, name)
            if section.teacher_input not in ("hr", "hr_usm"):
                out.append(ConfigError(f"{name}.teacher_input", f"must be hr or hr_usm, got '{section.teacher_input}'"))
            if section.output_weight < 0:
                out.append(ConfigError(f"{name}.output_weight", f"must be >= 0, got {section.output_weight}"))
        if self.data.crop_size % self.degradation.scale:
            out.append(
                ConfigError(
                    "data.crop_size",
                    f"must be a multiple of degradation.scale ({self.degradation.scale}), got {self.data.crop_size}",
                    example=f"data.crop_size={max(1, self.data.crop_size // self.degradation.scale) * self.degradation.scale}",
                )
            )
        if self.megasr.target not in ("hr", "hr_usm"):
            out.append(ConfigError("megasr.target", f"must be hr or hr_usm, got '{self.megasr.target}'"))
        out.extend(nested_problems(self))
        out.extend(_validation_problems(self))
        return out


def _validation_problems(cfg: RunConfig) -> list[ConfigError]:
    from megasr.metrics import METRICS

    v, out = cfg.validation, []
    if v.every < 0:
        out.append(ConfigError("validation.every", f"must be >= 0 (0: off), got {v.every}"))
    if v.every <= 0:
        return out
    if not v.folder:
        out.append(
            ConfigError("validation.folder", "is needed when validation.every > 0", example="validation.folder=val")
        )
    if v.every % cfg.train.checkpoint_every:
        out.append(
            ConfigError(
                "validation.every",
                f"must be a multiple of train.checkpoint_every ({cfg.train.checkpoint_every}) so that the best step "
                f"has a checkpoint, got {v.every}",
            )
        )
    unknown = [m for m in v.metrics if m not in METRICS]
    if unknown or not v.metrics:
        out.append(ConfigError("validation.metrics", f"unknown or none: {unknown} (known: {', '.join(METRICS)})"))
    if v.best_metric not in v.metrics:
        out.append(ConfigError("validation.best_metric", f"must be one of validation.metrics {v.metrics}"))
    for name, value in (("validation.max_images", v.max_images), ("validation.steps", v.steps)):
        if value < 1:
            out.append(ConfigError(name, f"must be >= 1, got {value}"))
    if v.size_rule not in ("error", "crop"):
        out.append(ConfigError("validation.size_rule", f"must be error or crop, got '{v.size_rule}'"))
    if v.log_with not in (None, "tensorboard"):
        out.append(ConfigError("validation.log_with", f"must be tensorboard or empty, got '{v.log_with}'"))
    return out


def _fields_missing_for_kinds() -> list[str]:
    """The config fields each registry kind needs (see training/README.md) that are not here."""
    run = {f.name for f in dataclasses.fields(RunConfig)}
    stage = {f.name for f in dataclasses.fields(MegaSRStageConfig)}
    out = [k.config_section for k in TRAINED_KINDS if k.config_section not in run]
    out += [f"megasr.{k.config_section}" for k in TRAINED_KINDS if k.config_section not in stage]
    out += [
        f"megasr.{k.config_section}_base" for k in TRAINED_KINDS if k.lora and f"{k.config_section}_base" not in stage
    ]
    out += [f"megasr.{k.kind}_dropout" for k in TRAINED_KINDS if f"{k.kind}_dropout" not in stage]
    return out


if _fields_missing_for_kinds():  # pragma: no cover - a registry row without its config fields
    raise RuntimeError(f"training/config.py lacks the options {', '.join(_fields_missing_for_kinds())}")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-5`` is a number, not the string YAML 1.1 makes of it."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    """Parse YAML safely, with YAML 1.2 number syntax."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ----------------------------------------------------------------------------------------------
# typed conversion
# ----------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, option: str, sink: list[ConfigError] | None = None) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, option)
            except ConfigError as exc:
                errors.append(exc.problem)
        raise ConfigError(option, "; ".join(errors))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(option, f"must be a mapping of options, got {value!r}")
        return _build(tp, value, option, sink)
    if origin in (list, tuple):
        if isinstance(value, str) and origin is list and args and args[0] is str:
            value = [value]  # a single folder for a list of folders
        if not isinstance(value, (list, tuple)):
            raise ConfigError(option, f"must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(option, f"must have {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{option}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{option}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(option, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise ConfigError(option, f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(option, f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(option, f"must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(option, f"must be an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(option, f"must be a number, got {value!r}")
        try:
            out = float(value)  # YAML 1.1 reads "1e-4" as a string
        except (TypeError, ValueError):
            raise ConfigError(option, f"must be a number, got {value!r}") from None
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(option, f"must be a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(option, f"must be a string, got {value!r}")
    raise ConfigError(option, f"unsupported option type {_type_name(tp)}")  # pragma: no cover


def _build(cls: type, values: dict[str, Any], prefix: str, sink: list[ConfigError] | None = None) -> Any:
    """``cls(**values)`` with every value coerced; all bad keys/values of the section (and below) at once.

    With ``sink`` the problems are appended to it and the bad values replaced by their defaults (so that later
    checks still run and every problem of a run is reported together); without, they are raised.
    """
    import difflib

    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    problems: list[ConfigError] = []
    for key, value in values.items():
        option = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            problems.append(
                ConfigError(
                    option,
                    f"unknown option (value {value!r}); known options here: {', '.join(known)}",
                    example=f"{prefix + '.' if prefix else ''}{close[0]}" if close else None,
                )
            )
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], option, sink)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if sink is None:
        raise_problems(problems)
    sink_ = sink if sink is not None else []
    sink_.extend(problems)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own validation (e.g. DegradationConfig) names the field
        msg = str(exc)
        field_name = next((k for k in sorted(known, key=len, reverse=True) if msg.startswith(k)), None)
        option = f"{prefix}.{field_name}" if field_name else prefix or "config"
        err = ConfigError(option, msg)
        if sink is None:
            raise err from None
        sink.append(err)
        kwargs.pop(field_name, None) if field_name else kwargs.clear()
        try:
            return cls(**kwargs)
        except ValueError:
            return cls()


def parse_config(values: dict[str, Any], source: str = "config", sink: list[ConfigError] | None = None) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain dict.

    Without ``sink`` every problem is raised at once; with it they are appended and a config with defaults in
    place of the bad values is returned.
    """
    if not isinstance(values, dict):
        raise ConfigError(source, "the file must hold a mapping of options at the top level")
    problems: list[ConfigError] = []
    cfg = _build(RunConfig, values, "", problems)
    problems.extend(cfg.problems())
    if sink is None:
        raise_problems(problems)
    else:
        sink.extend(problems)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain-JSON form of a config (tuples as lists)."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError("--config", f"file '{path}' does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("--config", f"'{path}' is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"'{path}' must hold a mapping of options at the top level")
    base = data.pop("base", None)  # "base: other.yaml" inherits from another file (relative to this one)
    if base is not None:
        parent = _read_file((path.parent / str(base)).resolve())
        data = _merge(parent, data)
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(values: dict[str, Any], overrides: list[str], source: str = "the config file") -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a plain config dict.

    A key whose section is not a mapping is blamed on where that value came from: ``source`` (the file), or the
    earlier ``--set`` that wrote it."""
    out = json.loads(json.dumps(values))
    set_by: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", f"'{item}' is not key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError("--set", f"'{item}' has no key")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}", f"cannot parse value '{raw}': {exc}") from None
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                section = ".".join(parts[: i + 1])
                if section in set_by:
                    raise ConfigError(
                        f"--set {key}", f"'{section}' is not a section (set to {nxt!r} by {set_by[section]})"
                    )
                raise ConfigError(
                    section,
                    f"in {source}, '{section}' is {nxt!r}, not a section of settings (e.g. '{section}: {{...}}'); "
                    f"fix the file (--set {key} writes into that section)",
                )
            node = nxt
        node[parts[-1]] = value
        set_by[key] = f"--set {item}"
    return out


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, sink: list[ConfigError] | None = None
) -> RunConfig:
    """Load a YAML/JSON file (or the defaults when ``path`` is ``None``), apply overrides, validate.

    Every problem is reported at once (:class:`ConfigProblems`), or appended to ``sink``; one that came from
    ``--set`` is named so (``--set train.lr``).
    """
    values = _read_file(Path(path)) if path is not None else {}
    values = apply_overrides(values, list(overrides or []), str(path) if path is not None else "the defaults")
    problems: list[ConfigError] = []
    cfg = parse_config(values, str(path or "config"), problems)
    set_keys = {o.split("=", 1)[0].strip() for o in overrides or []}
    renamed = [
        ConfigError(f"--set {p.option}", p.problem, expected=p.expected, example=p.example)
        if p.option in set_keys
        else p
        for p in problems
    ]
    if sink is None:
        raise_problems(renamed)
    else:
        sink.extend(renamed)
    return cfg
