"""The frozen SD-2 base of the MegaSR stage: U-Net, VAE, text encoder, tokenizer and noise schedule.

Each part is a diffusers folder or comes from one single-file SD-2 checkpoint (the file a ComfyUI user has in
``models/checkpoints``), read with :func:`megasr.files.read_state_dict`. What such a file does not say itself:

- The U-Net layout: read from the LDM keys (``model.diffusion_model.*``) -- channels per level, res blocks per
  level, which levels have transformers (and how deep), linear or conv ``proj_in``, the middle block, the
  cross-attention width. Attention heads are not visible in weights: SD-2 uses 64 channels per head, and so do
  we (``megasr.unet_config`` overrides any of it).
- The tokenizer: a checkpoint has none. SD-2's is OpenAI CLIP's BPE tokenizer padded with ``!`` (id 0), which
  is what ComfyUI's SD-2 text encoder uses too; ComfyUI ships its files (``comfy/sd1_tokenizer``), so we take
  them from the ComfyUI next to the models folder, the one this pack sits in, or an importable ``comfy``.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megasr.files import read_state_dict

from .errors import UsageError
from .failures import explain

__all__ = [
    "SD2_HEAD_CHANNELS",
    "SD2_NOISE_SCHEDULE",
    "BaseModels",
    "base_layout_problems",
    "base_part_path",
    "comfy_tokenizer_dirs",
    "find_tokenizer",
    "load_base_models",
    "load_clip_tokenizer",
    "load_text_encoder",
    "load_unet",
    "load_vae",
    "read_layout",
    "unet_config_from_ldm",
]

#: Stable Diffusion 2 base training schedule (epsilon prediction).
SD2_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

#: The SD-2 KL VAE (diffusers ``AutoencoderKL`` config), for single-file checkpoints.
SD2_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

#: The SD-2 text encoder as diffusers ships it: OpenCLIP ViT-H text, penultimate layer = 23 layers + final LN.
SD2_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}


# ----------------------------------------------------------------------------------- single-file checkpoints

SD2_HEAD_CHANNELS = 64
_PREFIX = "model.diffusion_model."


def _block_ids(keys: Iterable[str], group: str) -> list[int]:
    pat = re.compile(rf"^{group}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _depth(keys: set[str], block: str) -> int:
    pat = re.compile(rf"^{re.escape(block)}\.transformer_blocks\.(\d+)\.")
    ids = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    return max(ids) + 1 if ids else 0


def unet_config_from_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers ``UNet2DConditionModel`` config of the LDM U-Net in ``state`` (an SD checkpoint).

    Raises ``ValueError`` when the file holds no SD U-Net.
    """
    sd = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise ValueError("no Stable Diffusion U-Net in this file (no model.diffusion_model.input_blocks.0.0.weight)")
    keys = set(sd)
    conv_in = sd["input_blocks.0.0.weight"]
    model_channels, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
    # input blocks: level by level, each res block (+ transformer), then a downsample (".0.op") except the last
    levels: list[dict[str, Any]] = []
    current: dict[str, Any] = {"res": 0, "depth": 0, "channels": model_channels}
    for i in _block_ids(keys, "input_blocks")[1:]:
        if f"input_blocks.{i}.0.op.weight" in keys:
            levels.append(current)
            current = {"res": 0, "depth": 0, "channels": current["channels"]}
            continue
        current["res"] += 1
        current["channels"] = int(sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0])
        current["depth"] = max(current["depth"], _depth(keys, f"input_blocks.{i}.1"))
    levels.append(current)
    res_counts = {lv["res"] for lv in levels}
    if len(res_counts) != 1:
        raise ValueError(f"levels with different numbers of res blocks ({sorted(res_counts)}) are not supported")
    attn_keys = [k for k in keys if k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise ValueError("the U-Net has no cross-attention (not an SD-2 text-conditioned U-Net)")
    context = int(sd[attn_keys[0]].shape[1])
    proj = [k for k in keys if k.endswith(".proj_in.weight")]
    linear = bool(proj) and sd[proj[0]].ndim == 2
    mid_depth = _depth(keys, "middle_block.1")
    has_mid = any(k.startswith("middle_block.") for k in keys)
    down = ["CrossAttnDownBlock2D" if lv["depth"] else "DownBlock2D" for lv in levels]
    up = ["CrossAttnUpBlock2D" if lv["depth"] else "UpBlock2D" for lv in reversed(levels)]
    channels = [lv["channels"] for lv in levels]
    depths = [max(1, lv["depth"]) for lv in levels]
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": in_channels,
        "out_channels": int(sd["out.2.weight"].shape[0]),
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": ("UNetMidBlock2DCrossAttn" if mid_depth else "UNetMidBlock2D") if has_mid else None,
        "block_out_channels": channels,
        "layers_per_block": levels[0]["res"],
        "cross_attention_dim": context,
        "attention_head_dim": [c // SD2_HEAD_CHANNELS for c in channels],
        "use_linear_projection": linear,
        "transformer_layers_per_block": depths if any(d > 1 for d in depths) else 1,
        "upcast_attention": False,
        "norm_num_groups": 32,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    return config


def comfy_tokenizer_dirs(models_dir: str | Path | None = None) -> list[Path]:
    """Where ComfyUI's CLIP tokenizer files may be, most specific first."""
    roots: list[Path] = []
    if models_dir:
        roots.append(Path(models_dir).expanduser().resolve().parent)
    here = Path(__file__).absolute()  # not resolved: the pack may be linked into ComfyUI/custom_nodes
    roots.append(here.parents[3] if len(here.parents) > 3 else here.parent)
    repo = Path(__file__).resolve().parents[1]
    roots.append(repo / ".comfyui" / "ComfyUI")  # what scripts/setup.sh installs beside the pack
    spec = importlib.util.find_spec("comfy") if importlib.util.find_spec is not None else None
    if spec is not None and spec.submodule_search_locations:
        roots.extend(Path(p).parent for p in spec.submodule_search_locations)
    out, seen = [], set()
    for root in roots:
        d = root / "comfy" / "sd1_tokenizer"
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def load_clip_tokenizer(folder: str | Path) -> Any:
    """The SD-2 tokenizer from a CLIP tokenizer folder (``vocab.json`` + ``merges.txt``), padded with ``!``."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), pad_token="!")


# ----------------------------------------------------------------------------------------------- loading


@dataclass
class BaseModels:
    """The frozen SD-2 parts."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    scheduler: Any  # diffusers DDPMScheduler


class _SingleFile:
    """Loads an LDM-layout SD checkpoint once for the parts taken from it."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict[str, torch.Tensor]] = {}

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._cache:
            self._cache[path] = read_state_dict(path)
        return self._cache[path]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_layout(path: Path) -> dict[str, torch.Tensor]:
    """A weight file's keys as meta tensors of their shapes and dtypes: the safetensors header only, or a torch
    file mapped to the meta device (``weights_only=True``) -- no tensor data is read."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32)
                out[key] = torch.empty(tuple(sl.get_shape()), dtype=dtype, device="meta")
        return out
    state = torch.load(str(path), map_location="meta", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' does not hold a state dict")
    return state


class _LayoutOnly(_SingleFile):
    """As :class:`_SingleFile`, but the file's layout only (:func:`read_layout`): for the preflight."""

    def __call__(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._cache:
            self._cache[path] = read_layout(path)
        return self._cache[path]


def _folder_layout(cls: Any, what: str) -> Any:
    """A folder "loader" that builds ``cls`` from the folder's config on the meta device and checks the weight
    file's keys and shapes against it (header only): the layout check of a diffusers / transformers folder."""

    def check(path: Path) -> nn.Module:
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(f"no config.json in the {what} folder")
        import json

        config = json.loads(config_file.read_text(encoding="utf-8"))
        have = config.get("_class_name") or (config.get("architectures") or [None])[0]
        if have and have != cls.__name__:
            raise ValueError(f"it holds a {have}, not the {cls.__name__} MegaSR trains with")
        if hasattr(cls, "from_config"):  # diffusers
            model = cls.from_config(config)
        else:  # transformers
            model = cls(cls.config_class.from_pretrained(str(path)))
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:  # (sharded or .bin weights: the keys are checked when it loads)
            expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in read_layout(files[0]).items()}
            missing = sorted(set(expected) - set(got))
            wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
            if missing or wrong:
                raise ValueError(
                    f"{files[0].name} does not fit its config.json ({len(missing)} missing tensors, e.g. "
                    f"{missing[:2]}; {len(wrong)} of another shape, e.g. {wrong[:2]})"
                )
        return model

    return check


def base_part_path(mcfg: Any, name: str) -> tuple[Path, str]:
    """Where a base part comes from: ``megasr.<name>`` or ``megasr.base``/<name> (or the single file)."""
    explicit = getattr(mcfg, name)
    option = f"megasr.{name}"
    if explicit:
        path = Path(explicit).expanduser()
    elif mcfg.base:
        option = "megasr.base"
        base = Path(mcfg.base).expanduser()
        path = base if base.is_file() else base / name
    else:
        raise UsageError("megasr.base", f"no SD-2 base given: set megasr.base (a diffusers folder with {name}/) ")
    if not path.exists():
        raise UsageError(option, f"'{path}' does not exist (needed for the {name.replace('_', ' ')})")
    return path, option


def _load_part(mcfg: Any, name: str, folder_loader: Any, file_loader: Any) -> nn.Module:
    path, option = base_part_path(mcfg, name)
    try:
        model = folder_loader(path) if path.is_dir() else file_loader(path)
    except UsageError:
        raise
    except Exception as exc:  # a broken folder or file: name it, no traceback
        known = explain(exc)
        text = known[0] if known else " ".join(str(exc).split())
        text = text if len(text) <= 400 else text[:400] + " ..."
        raise UsageError(option, f"cannot load the {name.replace('_', ' ')} from '{path}': {text}") from None
    return model.eval().requires_grad_(False)


def load_unet(mcfg: Any, single: _SingleFile | None = None, layout_only: bool = False) -> nn.Module:
    """The frozen U-Net: a diffusers folder, or an LDM-layout checkpoint converted with ``megasr.unet_config``."""
    from diffusers import UNet2DConditionModel

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        state = single(path)
        config = {**unet_config_from_ldm(state), **dict(mcfg.unet_config)}  # the layout the file holds
        unet = UNet2DConditionModel(**config)
        converted = convert_ldm_unet_checkpoint(state, unet.config)
        missing, unexpected = unet.load_state_dict(converted, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the U-Net in the file does not fit the layout read from it ({len(missing)} missing keys, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); set megasr.unet_config "
                "(a diffusers UNet2DConditionModel config) to describe it"
            )
        return unet

    folder = _folder_layout(UNet2DConditionModel, "U-Net") if layout_only else UNet2DConditionModel.from_pretrained
    return _load_part(mcfg, "unet", folder, from_file)


def load_vae(mcfg: Any, single: _SingleFile | None = None, layout_only: bool = False) -> nn.Module:
    """The frozen KL VAE: a diffusers folder, or an LDM-layout checkpoint (SD-2 VAE config)."""
    from diffusers import AutoencoderKL

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        state = single(path)
        vae_keys = [k for k in state if k.startswith("first_stage_model.")]
        if not any(k.startswith("first_stage_model.encoder.") for k in vae_keys):
            taesd = any("taesd" in k for k in vae_keys)
            what = "a TAESD (tiny autoencoder)" if taesd else "no KL VAE" if vae_keys else "no VAE"
            raise ValueError(
                f"the checkpoint holds {what}, but MegaSR trains in SD-2's KL VAE latent space; use an SD-2 "
                "checkpoint with its VAE, or give megasr.vae (a KL VAE folder or file)"
            )
        vae = AutoencoderKL(**SD2_VAE_CONFIG)
        missing, unexpected = vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae.config), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"the VAE in the file is not SD-2's KL VAE ({len(missing)} missing tensors, e.g. {missing[:2]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
            )
        return vae

    folder = _folder_layout(AutoencoderKL, "VAE") if layout_only else AutoencoderKL.from_pretrained
    return _load_part(mcfg, "vae", folder, from_file)


def load_text_encoder(mcfg: Any, single: _SingleFile | None = None, layout_only: bool = False) -> nn.Module:
    """The frozen text encoder: a diffusers/transformers folder, or the OpenCLIP text tower of an SD-2 checkpoint."""
    from transformers import CLIPTextConfig, CLIPTextModel

    single = single or _SingleFile()

    def from_file(path: Path) -> nn.Module:
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        model = CLIPTextModel(CLIPTextConfig(**SD2_TEXT_CONFIG))
        state = convert_open_clip_checkpoint(model, single(path))
        if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 has no text_model
            state = {k.removeprefix("text_model."): v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if "text_projection" not in k]  # CLIPTextModel has no projection
        if missing or unexpected:
            raise ValueError(f"not an SD-2 OpenCLIP text tower: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return model

    folder = _folder_layout(CLIPTextModel, "text encoder") if layout_only else CLIPTextModel.from_pretrained
    return _load_part(mcfg, "text_encoder", folder, from_file)


def find_tokenizer(mcfg: Any, models_dir: str | None = None) -> tuple[Path, str]:
    """The tokenizer folder: ``megasr.tokenizer``, ``<base>/tokenizer`` of a diffusers folder, or -- for a
    single-file checkpoint, which has none -- ComfyUI's CLIP tokenizer files (:func:`comfy_tokenizer_dirs`)."""
    if mcfg.tokenizer or (mcfg.base and Path(mcfg.base).expanduser().is_dir()):
        path, option = base_part_path(mcfg, "tokenizer")
        if not path.is_dir():
            raise UsageError(option, f"'{path}' is not a tokenizer folder", expected="a folder with vocab.json")
        return path, option
    candidates = comfy_tokenizer_dirs(models_dir)
    for d in candidates:
        if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            return d, "megasr.tokenizer"
    raise UsageError(
        "megasr.tokenizer",
        "a single-file checkpoint holds no tokenizer and ComfyUI's CLIP tokenizer files were not found "
        f"(looked in {', '.join(str(d) for d in candidates[:3])})",
        expected="--models-dir COMFYUI/models (its ComfyUI has comfy/sd1_tokenizer) or a tokenizer folder",
        example="--set megasr.tokenizer=/ComfyUI/comfy/sd1_tokenizer",
    )


def base_layout_problems(mcfg: Any) -> list[UsageError]:
    """Open every part of the SD-2 base as :func:`load_base_models` will -- but the headers only, the models
    built on the meta device -- and return what will not load: a VAE that is not SD-2's KL VAE (a TAESD), a
    U-Net or text encoder whose tensors do not fit, a text encoder of another width than the U-Net's
    cross-attention. Seconds, whatever the file size; run by the preflight before any stage trains."""
    problems: list[UsageError] = []
    single = _LayoutOnly()
    parts: dict[str, nn.Module] = {}
    with torch.device("meta"):
        for name, loader in (("unet", load_unet), ("vae", load_vae), ("text_encoder", load_text_encoder)):
            try:
                parts[name] = loader(mcfg, single, layout_only=True)
            except UsageError as exc:
                problems.append(exc)
    if "unet" in parts and "text_encoder" in parts:
        ctx = int(getattr(parts["unet"].config, "cross_attention_dim", 0))
        width = int(parts["text_encoder"].config.hidden_size)
        if ctx != width:
            problems.append(
                UsageError(
                    "megasr.text_encoder",
                    f"the text encoder gives {width}-d tokens but the U-Net's cross-attention takes {ctx}-d "
                    "(not an SD-2 pair)",
                )
            )
    return problems


def load_base_models(mcfg: Any, models_dir: str | None = None) -> BaseModels:
    """Load the frozen SD-2 U-Net, VAE, text encoder, tokenizer and noise schedule.

    Each part comes from ``megasr.<part>`` when set, else from ``megasr.base``. A part is a diffusers folder
    (``config.json`` + weights) or -- U-Net, VAE and text encoder -- one LDM-layout SD checkpoint
    (``.safetensors``, or ``.ckpt`` read with ``weights_only=True``), converted with diffusers' converters using
    ``megasr.unet_config`` (default: SD-2-base) and the SD-2 VAE / text-encoder configs. The tokenizer must be
    a folder (a checkpoint has none). The schedule is ``<base>/scheduler`` when present, else SD-2's.
    """
    from diffusers import DDPMScheduler
    from transformers import AutoTokenizer

    single = _SingleFile()
    unet = load_unet(mcfg, single)
    vae = load_vae(mcfg, single)
    text_encoder = load_text_encoder(mcfg, single)
    tok_path, tok_option = find_tokenizer(mcfg, models_dir)
    try:
        if tok_path.name == "sd1_tokenizer":  # ComfyUI's copy of the CLIP tokenizer files
            tokenizer = load_clip_tokenizer(tok_path)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_path))
    except Exception as exc:
        raise UsageError(tok_option, f"cannot load the tokenizer from '{tok_path}': {exc}") from None
    sched_dir = Path(mcfg.base).expanduser() / "scheduler" if mcfg.base else None
    if sched_dir is not None and sched_dir.is_dir():
        scheduler = DDPMScheduler.from_pretrained(str(sched_dir))
    else:
        scheduler = DDPMScheduler(**SD2_NOISE_SCHEDULE)
    if scheduler.config.prediction_type != "epsilon":
        raise UsageError(
            "megasr.base", f"the schedule predicts '{scheduler.config.prediction_type}'; MegaSR is epsilon"
        )
    ctx = int(getattr(unet.config, "cross_attention_dim", 0))
    width = int(text_encoder.config.hidden_size)
    if ctx != width:
        raise UsageError(
            "megasr.text_encoder",
            f"the text encoder gives {width}-d tokens but the U-Net's cross-attention takes {ctx}-d (not an SD-2 pair)",
        )
    return BaseModels(unet, vae, text_encoder, tokenizer, scheduler)
