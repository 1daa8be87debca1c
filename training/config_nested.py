"""Unknown keys inside the free-form config mappings (``dage_*.extractor``, its ``lora``, ``megasr.model``).

The typed sections of :mod:`training.config` refuse unknown keys themselves; these mappings are handed on to
the extractors' ``from_config`` and to :class:`megasr.model.MegaSRConfig`, which would ignore (or pass on to a
transformers config, which keeps anything) a misspelt key. Each is checked against what its consumer reads;
the transformers configs (``depth_anything``, ``mask2former``, ``clip`` and their ``backbone_config``) against
the keys of that config class.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from megasr.dage.kinds import TRAINED_KINDS

from .errors import ConfigError
from .kind_inputs import KIND_INPUTS

__all__ = ["EXTRACTOR_KEYS", "LORA_KEYS", "nested_problems"]

#: What each extractor's ``from_config`` / ``from_base`` reads from ``dage_<kind>.extractor``.
EXTRACTOR_KEYS: dict[str, tuple[str, ...]] = {
    k.config_section: KIND_INPUTS[k.kind].extractor_keys for k in TRAINED_KINDS
}
LORA_KEYS = ("r", "alpha", "dropout", "target")

# extractor key -> (transformers config class, backbone config class or None)
_HF_CONFIGS: dict[str, tuple[str, str | None]] = {
    "depth_anything": ("DepthAnythingConfig", "Dinov2Config"),
    "mask2former": ("Mask2FormerConfig", "SwinConfig"),
    "clip": ("CLIPVisionConfig", None),
}
# keys our builders read themselves, beside the config class's own
_BUILDER_KEYS = {"model_type"}


def _unknown(option: str, values: Any, known: Iterable[str], what: str | None = None) -> list[Any]:
    """``what``: a name for the known keys (too many to list), e.g. a transformers config class."""
    known = sorted(set(known))
    if not isinstance(values, Mapping):
        return [ConfigError(option, f"must be a mapping of options, got {values!r}")]
    out = []
    for key, value in values.items():
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1)
        out.append(
            ConfigError(
                f"{option}.{key}",
                f"unknown option (value {value!r}); "
                + (f"not a {what} option" if what else f"known options here: {', '.join(known)}"),
                example=f"{option}.{close[0]}" if close else None,
            )
        )
    return out


def _hf_keys(class_name: str) -> set[str] | None:
    try:
        import inspect

        import transformers

        cls = getattr(transformers, class_name)
        params = set(inspect.signature(cls.__init__).parameters) | set(
            inspect.signature(transformers.PretrainedConfig.__init__).parameters
        )
        return set(cls().to_dict()) | params | _BUILDER_KEYS | {"num_labels"}
    except Exception:  # noqa: BLE001 - an unavailable class: leave the check to the model builder
        return None


def nested_problems(cfg: Any) -> list[Any]:
    """Every unknown key in the free-form mappings of ``cfg`` (a :class:`training.config.RunConfig`)."""
    out: list[Any] = []
    for section, keys in EXTRACTOR_KEYS.items():
        ext = getattr(cfg, section).extractor
        option = f"{section}.extractor"
        if not ext:
            continue
        out.extend(_unknown(option, ext, keys))
        if isinstance(ext.get("lora"), Mapping):
            out.extend(_unknown(f"{option}.lora", ext["lora"], LORA_KEYS))
        for key, (cls_name, backbone_cls) in _HF_CONFIGS.items():
            sub = ext.get(key)
            if key not in keys or not isinstance(sub, Mapping):
                continue
            known = _hf_keys(cls_name)
            if known is not None:
                out.extend(_unknown(f"{option}.{key}", sub, known, cls_name))
            bb = sub.get("backbone_config")
            if backbone_cls and isinstance(bb, Mapping):
                known_bb = _hf_keys(backbone_cls)
                if known_bb is not None:
                    out.extend(_unknown(f"{option}.{key}.backbone_config", bb, known_bb, backbone_cls))
    model = cfg.megasr.model
    if model:
        from megasr.model import MegaSRConfig

        fields = [f.name for f in dataclasses.fields(MegaSRConfig) if f.name != "unet"]
        out.extend(_unknown("megasr.model", model, fields))
    return out
