"""Load RAM (``ram_swin_large_14m.pth``) and SeeSR's DAPE LoRA (``DAPE.pth``) by their published key names.

Files are read as safetensors or with ``torch.load(weights_only=True)`` (memory-mapped): no pickled code runs.

RAM checkpoint (``{"model": state_dict}`` as RAM's ``load_checkpoint_swinlarge`` reads it):

- used: ``visual_encoder.*``, ``image_proj.*``, ``label_embed``, ``wordvec_proj.*``, ``fc.*``, ``tagging_head.*``
  (older files call it ``vision_multi.*``; RAM's loader renames it, so do we);
- derived, dropped (RAM's loader deletes them as well): ``*.relative_position_index``, ``*.attn_mask``;
- unused, skipped: ``tag_encoder.*`` and ``text_decoder.*`` (RAM's captioning parts; tagging never runs them).

DAPE file (SeeSR ``basicsr/models/dape_model.py``, ``save_network_lora``: every ``lora_`` tensor of SeeSR's
``RAMLora``; loralib layers, rank 8, alpha 1, so scale 1/8):

- ``visual_encoder.layers.{i}.blocks.{j}.attn.qkv.lora_A`` [2r, C] / ``lora_B`` [2C, r]: a loralib
  ``MergedLinear`` with ``enable_lora=[True, False, True]``: the query rows get ``B[:C] @ A[:r]``, the value
  rows ``B[C:] @ A[r:]``, the key rows nothing;
- ``tagging_head.encoder.layer.{i}.crossattention.self.{query,key}.lora_A`` [r, in] / ``lora_B`` [out, r]:
  delta ``B @ A``;
- ``tag_encoder.encoder.layer.{i}.crossattention.self.{query,key}.lora_*`` for ``i`` < the tagging head's
  layer count: RAM ties those weights to the tagging head's (``tie_encoder_decoder_weights``), and loralib
  merges every LoRA into its weight when SeeSR calls ``model.eval()``, so these deltas land on the tagging
  head too (zero in a DAPE file trained by SeeSR's recipe, whose ``lora_B`` start at zero and get no gradient);
- other ``tag_encoder.*`` / ``text_decoder.*`` LoRA: skipped (captioning parts).

The deltas are merged into the weights at load time, exactly what loralib does when the model is put in eval mode.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import WeightFileError
from .config import SWIN_L_384, RamConfig, infer_config
from .tagger import RamModel

log = logging.getLogger("megasr")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
TAG_LIST_FILE = DATA_DIR / "ram_tag_list.txt"
THRESHOLD_FILE = DATA_DIR / "ram_tag_list_threshold.txt"

#: RAM's captioning modules, in the checkpoint but never run for tags or tokens
UNUSED_PREFIXES = ("tag_encoder.", "text_decoder.")
#: buffers derived from the geometry (RAM's loaders delete them too)
DERIVED_SUFFIXES = (".relative_position_index", ".attn_mask")

_QKV_LORA = re.compile(r"^visual_encoder\.layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.lora_([AB])$")
_HEAD_LORA = re.compile(
    r"^(tagging_head|tag_encoder)\.encoder\.layer\.(\d+)\.crossattention\.self\.(query|key)\.lora_([AB])$"
)


def read_tag_list(path: str | os.PathLike = TAG_LIST_FILE) -> list[str]:
    """Tag names, one per line (RAM's ``ram_tag_list.txt`` format, read with ``splitlines``)."""
    return Path(path).read_text(encoding="utf-8").splitlines()


def read_thresholds(path: str | os.PathLike = THRESHOLD_FILE) -> torch.Tensor:
    """Per-class thresholds, one float per line (RAM's ``ram_tag_list_threshold.txt``)."""
    values = [float(s) for s in Path(path).read_text(encoding="utf-8").split()]
    return torch.tensor(values, dtype=torch.float32)


def read_weight_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors or a torch file (``weights_only=True``, memory-mapped where possible).

    A ``{"model": ...}`` (RAM), ``{"params": ...}`` (basicsr) or ``{"state_dict": ...}`` wrapper is unwrapped;
    a ``module.`` prefix (DataParallel) is removed.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise WeightFileError(p, "no such file")
    if p.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            state = load_file(p)
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise WeightFileError(p, f"not a readable safetensors file ({e})") from e
    else:
        try:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) torch files cannot be memory-mapped
                state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightFileError(
                p, f"cannot be read as a weights-only torch file ({type(e).__name__}: {e}); no code is unpickled"
            ) from e
    for wrapper in ("model", "params", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(p, "does not hold a state dict of tensors")
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}


@dataclass
class KeyReport:
    """How a file's keys were used: the tests assert ``unexpected`` and ``missing`` are empty."""

    used: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def select_ram_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """The tensors our module reads from a RAM checkpoint (keys as in the file), with a report of the rest."""
    report = KeyReport()
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.replace("vision_multi", "tagging_head")
        if name.endswith(DERIVED_SUFFIXES):
            report.derived.append(key)
        elif name.startswith(UNUSED_PREFIXES):
            report.unused.append(key)
        else:
            out[name] = value
            report.used.append(key)
    return out, report


def lora_deltas(
    dape: Mapping[str, torch.Tensor], head_layers: int, alpha: float = 1.0
) -> tuple[dict[str, torch.Tensor], KeyReport]:
    """DAPE LoRA tensors -> weight deltas keyed by the RAM weight they add to (see the module docstring)."""
    report = KeyReport()
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in dape.items():
        m_qkv, m_head = _QKV_LORA.match(key), _HEAD_LORA.match(key)
        if m_qkv:
            target = key.rsplit(".lora_", 1)[0] + ".weight"
            pairs.setdefault(target, {})[m_qkv.group(3)] = value
            report.used.append(key)
        elif m_head and (m_head.group(1) == "tagging_head" or int(m_head.group(2)) < head_layers):
            # a tied tag_encoder layer's LoRA merges into the shared (tagging head) weight
            target = f"tagging_head.encoder.layer.{m_head.group(2)}.crossattention.self.{m_head.group(3)}.weight"
            pairs.setdefault(f"{target}#{m_head.group(1)}", {})[m_head.group(4)] = value
            report.used.append(key)
        elif key.startswith(UNUSED_PREFIXES) and ".lora_" in key:
            report.unused.append(key)
        else:
            report.unexpected.append(key)
    deltas: dict[str, torch.Tensor] = {}
    for tag, ab in sorted(pairs.items()):
        target = tag.split("#")[0]
        if set(ab) != {"A", "B"}:
            report.missing.append(f"{tag.split('#')[-1] if '#' in tag else target}: lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b = ab["A"].float(), ab["B"].float()
        if target.endswith(".attn.qkv.weight"):
            r = a.shape[0] // 2
            c = b.shape[0] // 2
            scale = alpha / r
            delta = torch.zeros(3 * c, a.shape[1])
            delta[:c] = b[:c] @ a[:r]  # query rows
            delta[2 * c :] = b[c:] @ a[r:]  # value rows (enable_lora=[True, False, True])
        else:
            scale = alpha / a.shape[0]
            delta = b @ a
        deltas[target] = deltas.get(target, 0) + delta * scale
    return deltas, report


def _check_keys(model: RamModel, state: Mapping[str, torch.Tensor], path: str, report: KeyReport) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report.missing += sorted(set(own) - set(state))
    report.unexpected += sorted(set(state) - set(own))
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {own[k]}"
        for k in state
        if k in own and tuple(state[k].shape) != own[k]
    ]
    if report.missing or report.unexpected or bad:
        parts = []
        if report.missing:
            parts.append(f"missing {len(report.missing)} keys (first: {report.missing[:3]})")
        if report.unexpected:
            parts.append(f"unexpected {len(report.unexpected)} keys (first: {report.unexpected[:3]})")
        if bad:
            parts.append(f"shape mismatch: {bad[:3]}")
        raise WeightFileError(path, "not a RAM checkpoint in the published layout: " + "; ".join(parts))


def ram_from_state(
    state: Mapping[str, torch.Tensor],
    dape: Mapping[str, torch.Tensor] | None = None,
    *,
    config: RamConfig | None = None,
    tag_names: Sequence[str] | None = None,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    delete_tag_index: Sequence[int] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    path: str = "<state dict>",
    dape_path: str = "<state dict>",
) -> tuple[RamModel, KeyReport, KeyReport | None]:
    """Build RAM (+ merged DAPE LoRA) from state dicts in the published key names.

    Returns the model (eval mode, no grad) and the key reports of both inputs.
    """
    used, report = select_ram_state(state)
    try:
        cfg = config or infer_config(used)
    except KeyError as e:
        raise WeightFileError(path, str(e.args[0])) from None
    if tag_names is None:
        if cfg.num_classes != SWIN_L_384.num_classes:
            raise WeightFileError(path, f"{cfg.num_classes} classes: pass the matching tag list (RAM's has 4585)")
        tag_names = read_tag_list()
    if thresholds is None:
        thresholds = read_thresholds() if cfg.num_classes == SWIN_L_384.num_classes else None
        if thresholds is None:
            raise WeightFileError(path, f"{cfg.num_classes} classes: pass the matching per-class thresholds")
    thresholds = torch.as_tensor(thresholds, dtype=torch.float32)

    with torch.device("meta"):
        model = RamModel(cfg, tag_names, torch.zeros(cfg.num_classes), delete_tag_index)
    model = model.to_empty(device="cpu")
    model.reset_derived_buffers(thresholds)
    _check_keys(model, used, path, report)
    merged = {k: v.float() if v.is_floating_point() else v for k, v in used.items()}
    dape_report = None
    if dape is not None:
        deltas, dape_report = lora_deltas(dape, cfg.head_num_layers, cfg.lora_alpha)
        if dape_report.unexpected or dape_report.missing:
            raise WeightFileError(
                dape_path,
                f"not a DAPE LoRA file for this RAM: unexpected {dape_report.unexpected[:3]}, "
                f"incomplete pairs {dape_report.missing[:3]}",
            )
        for target, delta in deltas.items():
            if target not in merged or tuple(merged[target].shape) != tuple(delta.shape):
                have = tuple(merged[target].shape) if target in merged else None
                raise WeightFileError(dape_path, f"LoRA for '{target}' has shape {tuple(delta.shape)}, RAM has {have}")
            merged[target] = merged[target] + delta
    model.load_state_dict(merged, strict=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, report, dape_report


def load_ram(
    ram_path: str | os.PathLike,
    dape_path: str | os.PathLike | None = None,
    *,
    config: RamConfig | None = None,
    tag_names: Sequence[str] | None = None,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    delete_tag_index: Sequence[int] = (),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> RamModel:
    """RAM from ``ram_swin_large_14m.pth`` (or a safetensors copy), with SeeSR's ``DAPE.pth`` merged in when given.

    Tag names and thresholds default to RAM's shipped files (``megasr/data``) for the 4585-class model.
    """
    state = read_weight_file(ram_path)
    dape = read_weight_file(dape_path) if dape_path is not None else None
    model, report, dape_report = ram_from_state(
        state,
        dape,
        config=config,
        tag_names=tag_names,
        thresholds=thresholds,
        delete_tag_index=delete_tag_index,
        device=device,
        dtype=dtype,
        path=os.fspath(ram_path),
        dape_path=os.fspath(dape_path) if dape_path is not None else "<none>",
    )
    log.info(
        "RAM: %d tensors loaded, %d captioning tensors skipped%s",
        len(report.used),
        len(report.unused),
        f", DAPE LoRA merged ({len(dape_report.used)} tensors)" if dape_report else " (no DAPE LoRA: plain RAM)",
    )
    return model


def ram_from_config(
    config: RamConfig,
    tag_names: Sequence[str] | None = None,
    thresholds: Sequence[float] | torch.Tensor | None = None,
    seed: int = 0,
) -> RamModel:
    """A randomly initialised RAM of any size (tests, benchmarks); names ``tag0..`` and thresholds 0.5 by default."""
    names = list(tag_names) if tag_names is not None else [f"tag{i}" for i in range(config.num_classes)]
    th = thresholds if thresholds is not None else torch.full((config.num_classes,), 0.5)
    model = RamModel(config, names, th)
    return model.init_random(torch.Generator().manual_seed(seed)).eval().requires_grad_(False)


__all__ = [
    "KeyReport",
    "load_ram",
    "lora_deltas",
    "ram_from_config",
    "ram_from_state",
    "read_tag_list",
    "read_thresholds",
    "read_weight_file",
    "select_ram_state",
]
