"""The command line's flag vocabulary: one set of flags for every stage and for ``all``.

Each flag sets one config key, in the stages it belongs to; the per-extractor flags follow the kind registry
(:mod:`megasr.dage.kinds`). The flag names are user-facing (README recipes, shipped workflows' notes): never
rename one.
"""

from __future__ import annotations

from megasr.dage.kinds import TRAINED_KINDS

from .kind_inputs import KIND_INPUTS

__all__ = ["BASE_FLAGS", "DAGE_FILE_FLAGS", "FLAG_HELP", "FLAGS", "MEGASR_KEYS", "flag_key"]

#: Flags of the pretrained bases: flag -> (dest, config key, stages). Also the flags of ``all``.
BASE_FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {"--base": ("base", "megasr.base", ("megasr",))}
#: Flags of the fine-tuned DAGE files the megasr stage reads: flag -> (dest, config key, stages).
DAGE_FILE_FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {}
#: In the megasr stage a LoRA's base flag sets the guidance extractor's base: flag -> config key.
MEGASR_KEYS: dict[str, str] = {}
FLAG_HELP: dict[str, str] = {
    "--base": "SD-2-base checkpoint (single file, e.g. from models/checkpoints) or diffusers folder"
}
for _k in TRAINED_KINDS:
    _flag = KIND_INPUTS[_k.kind].flag(_k.kind)
    BASE_FLAGS[_flag] = (
        _flag[2:].replace("-", "_"),
        f"{_k.config_section}.base",
        (_k.stage, "megasr") if _k.lora else (_k.stage,),
    )
    FLAG_HELP[_flag] = KIND_INPUTS[_k.kind].base_help
    if _k.lora:
        MEGASR_KEYS[_flag] = f"megasr.{_k.config_section}_base"
for _k in TRAINED_KINDS:
    DAGE_FILE_FLAGS[f"--{_k.stage}"] = (_k.config_section, f"megasr.{_k.config_section}", ("megasr",))
    FLAG_HELP[f"--{_k.stage}"] = f"fine-tuned {_k.component}.safetensors (export of {_k.stage})"
# DAPE-equipped RAM (published weights, not trained here): the megasr stage's prompts and representation tokens
BASE_FLAGS["--ram"] = ("ram", "megasr.ram", ("megasr",))
FLAG_HELP["--ram"] = "RAM Swin-L weights (ram_swin_large_14m.pth): tags as the prompt, tokens for SeeSR's branch"
BASE_FLAGS["--dape"] = ("dape", "megasr.dape", ("megasr",))
FLAG_HELP["--dape"] = "SeeSR's DAPE.pth, the degradation-aware LoRA merged into RAM (needs --ram)"
#: Every flag that sets a config key, in the order the parser lists them.
FLAGS: dict[str, tuple[str, str, tuple[str, ...]]] = {**BASE_FLAGS, **DAGE_FILE_FLAGS}


def flag_key(flag: str, stage: str) -> str | None:
    """The config key ``flag`` sets in ``stage`` (None: not a flag of that stage)."""
    _dest, key, stages = FLAGS[flag]
    if stage not in stages:
        return None
    return MEGASR_KEYS.get(flag, key) if stage == "megasr" else key
