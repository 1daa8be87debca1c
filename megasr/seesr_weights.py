"""SeeSR's published checkpoint folders mapped onto a MegaSR model: the warm start of training (config
``init.seesr_dir``, re-exported by ``training.seesr``) and ``python -m megasr convert-seesr`` (:func:`convert_seesr`).

SeeSR (Wu et al., CVPR 2024, Apache-2.0) publishes diffusers folders ``controlnet/`` and ``unet/``
(``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``). Its ControlNet is diffusers'
``ControlNetModel`` plus, in every cross-attention block, a parallel ``image_attentions`` transformer that reads
RAM/DAPE image embeddings; its U-Net is the SD-2-base U-Net plus the same branch.

- Every ControlNet tensor whose name and shape match :attr:`MegaSRModel.controlnet` is copied onto it. The
  rest of MegaSR (CISM² connector, projections, gates, MS-GAM) keeps its zero init.
- SeeSR's representation branch (``image_attentions``, the RAM/DAPE cross-attention transformers): a MegaSR
  model built with ``representation_dim`` 512 (config ``megasr.model.representation_dim``) has it in SeeSR's
  layout (:mod:`megasr.seesr_branch`): the ControlNet's branch maps with the ControlNet, the U-Net's onto
  ``model.unet_representation``, which is frozen (SeeSR trains it, MegaSR keeps SeeSR's U-Net frozen). Then the
  warm-started model predicts exactly what SeeSR does (CISM² and MS-GAM at zero init), and every SeeSR tensor is
  mapped. A model without the branch reports it as not mapped (and the log says how to keep it).
- With ``init.seesr_unet`` the SeeSR U-Net's base weights replace the frozen SD-2 U-Net's (again by name and
  shape); the report counts how many of them differ from the SD-2 weights (SeeSR trains only the branch, so
  normally none).

Only the tensor layout is read (nothing of SeeSR's code is used); ``.bin`` files load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SeeSRError
from .files import read_state_dict

__all__ = [
    "SEESR_FILE_NAME",
    "SEESR_IMAGE_BRANCH",
    "SeeSRError",
    "SeeSRMapReport",
    "SeeSRReport",
    "convert_seesr",
    "load_seesr_unet_into",
    "map_state_onto",
    "read_seesr_part",
    "seesr_config",
    "seesr_folder_problem",
    "seesr_folder_state",
    "seesr_model",
    "warm_start_from_seesr",
]

logger = logging.getLogger(__name__)

#: Name fragment of SeeSR's RAM/DAPE image cross-attention branch.
SEESR_IMAGE_BRANCH = "image_attentions"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
_SHOW = 8


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = read_state_dict(path)
    except ValueError:
        state = None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SeeSRError(f"'{path}' is not a state dict of tensors")
    return state


def read_seesr_part(folder: str | Path, part: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and ``config.json`` of ``<folder>/<part>`` (a diffusers model folder, sharded or not)."""
    root = Path(folder).expanduser() / part
    if not root.is_dir():
        raise SeeSRError(f"'{Path(folder)}' has no '{part}/' folder (expected SeeSR's diffusers layout)")
    config: dict[str, Any] = {}
    cfg_path = root / "config.json"
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    for name in _WEIGHT_FILES:
        if (root / name).is_file():
            return _load_file(root / name), config
    for name in _INDEX_FILES:
        if (root / name).is_file():
            index = json.loads((root / name).read_text(encoding="utf-8"))
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.get("weight_map", {}).values())):
                state.update(_load_file(root / shard))
            return state, config
    raise SeeSRError(f"'{root}' holds no {' or '.join(_WEIGHT_FILES)}")


@dataclass
class SeeSRMapReport:
    """How one SeeSR part mapped onto one of our modules."""

    part: str
    mapped: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)  # "name (SeeSR [..], ours [..])"
    unmapped: list[str] = field(default_factory=list)  # SeeSR tensors with no counterpart here
    image_branch: list[str] = field(default_factory=list)  # of ``unmapped``: SeeSR's RAM/DAPE image attention
    kept: list[str] = field(default_factory=list)  # our tensors SeeSR does not have (left as initialised)
    changed: int = 0  # mapped tensors whose value differs from what the module held before

    def summary(self) -> dict[str, Any]:
        return {
            "part": self.part,
            "mapped": len(self.mapped),
            "shape_mismatch": len(self.shape_mismatch),
            "unmapped": len(self.unmapped),
            "image_branch": len(self.image_branch),
            "kept": len(self.kept),
            "changed": self.changed,
            "shape_mismatch_names": self.shape_mismatch[:_SHOW],
            "unmapped_names": [k for k in self.unmapped if SEESR_IMAGE_BRANCH not in k][:_SHOW]
            + self.image_branch[:_SHOW],
            "kept_names": self.kept[:_SHOW],
        }


@dataclass
class SeeSRReport:
    """The whole warm start: the ControlNet mapping, (with ``init.seesr_unet``) the U-Net's and (when the model has
    SeeSR's representation branch) the U-Net branch's."""

    source: str
    controlnet: SeeSRMapReport
    unet: SeeSRMapReport | None = None
    unet_representation: SeeSRMapReport | None = None  # SeeSR's U-Net branch onto ``model.unet_representation``

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "controlnet": self.controlnet.summary(),
            "unet": self.unet.summary() if self.unet is not None else None,
            "unet_representation": (
                self.unet_representation.summary() if self.unet_representation is not None else None
            ),
        }


def map_state_onto(module: nn.Module, state: dict[str, torch.Tensor], part: str) -> SeeSRMapReport:
    """Copy every tensor of ``state`` whose name and shape match ``module``'s; report the rest."""
    report = SeeSRMapReport(part)
    own = module.state_dict()
    take: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        value = state[key]
        if key not in own:
            report.unmapped.append(key)
            if SEESR_IMAGE_BRANCH in key:
                report.image_branch.append(key)
            continue
        if tuple(own[key].shape) != tuple(value.shape):
            report.shape_mismatch.append(f"{key} (SeeSR {list(value.shape)}, ours {list(own[key].shape)})")
            continue
        value = value.to(dtype=own[key].dtype)
        if not torch.equal(own[key].cpu(), value):
            report.changed += 1
        take[key] = value
        report.mapped.append(key)
    report.kept = sorted(k for k in own if k not in take)
    with torch.no_grad():
        module.load_state_dict(take, strict=False)
    return report


def _log_report(r: SeeSRMapReport, source: str) -> None:
    logger.info(
        "SeeSR %s from %s: %d tensors mapped (%d changed), %d shape mismatches, %d not mapped "
        "(%d of SeeSR's image-attention branch), %d of ours kept as initialised",
        r.part,
        source,
        len(r.mapped),
        r.changed,
        len(r.shape_mismatch),
        len(r.unmapped),
        len(r.image_branch),
        len(r.kept),
    )
    for item in r.shape_mismatch[:_SHOW]:
        logger.warning("SeeSR %s: shape mismatch %s", r.part, item)
    other = [k for k in r.unmapped if SEESR_IMAGE_BRANCH not in k]
    if other:
        logger.warning("SeeSR %s: %d tensors without a counterpart, e.g. %s", r.part, len(other), other[:_SHOW])


def _split_branch(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    base = {k: v for k, v in state.items() if SEESR_IMAGE_BRANCH not in k}
    return base, {k: v for k, v in state.items() if SEESR_IMAGE_BRANCH in k}


def load_seesr_unet_into(unet: nn.Module, seesr_dir: str | Path) -> SeeSRMapReport:
    """Replace the frozen U-Net's base weights by SeeSR's ``unet/`` (its image branch is not mapped here)."""
    state, _ = read_seesr_part(seesr_dir, "unet")
    report = map_state_onto(unet, state, "unet")
    _log_report(report, str(seesr_dir))
    return report


def _map_unet_branch(branch: nn.Module, seesr_dir: Path, state: dict[str, torch.Tensor]) -> SeeSRMapReport:
    """SeeSR's U-Net ``image_attentions`` onto ``model.unet_representation`` (same key names), all or an error."""
    _, image = _split_branch(state)
    report = map_state_onto(branch, image, "unet_representation")
    _log_report(report, str(seesr_dir))
    if report.kept or report.shape_mismatch or report.unmapped:
        problems = report.kept[:4] or report.shape_mismatch[:4] or report.unmapped[:4]
        raise SeeSRError(
            f"'{seesr_dir / 'unet'}' does not hold SeeSR's representation branch for this U-Net "
            f"({len(report.kept)} missing, {len(report.shape_mismatch)} of another shape, {len(report.unmapped)} "
            f"unknown; e.g. {problems})"
        )
    branch.requires_grad_(False)  # frozen like the rest of SeeSR's U-Net
    return report


def warm_start_from_seesr(model: nn.Module, seesr_dir: str | Path, unet: nn.Module | None = None) -> SeeSRReport:
    """Map SeeSR's ``controlnet/`` onto ``model.controlnet`` (its representation branch too when the model has one),
    SeeSR's U-Net branch onto ``model.unet_representation`` and, given ``unet``, SeeSR's ``unet/`` base onto it."""
    seesr_dir = Path(seesr_dir).expanduser()
    branch = getattr(model, "unet_representation", None)
    unet_report = branch_report = None
    if unet is not None or branch is not None:
        unet_state, _ = read_seesr_part(seesr_dir, "unet")
        if unet is not None:
            base_state = unet_state if branch is None else _split_branch(unet_state)[0]
            unet_report = map_state_onto(unet, base_state, "unet")
            _log_report(unet_report, str(seesr_dir))
        if branch is not None:
            branch_report = _map_unet_branch(branch, seesr_dir, unet_state)
    state, config = read_seesr_part(seesr_dir, "controlnet")
    ours = getattr(model.config, "unet", {})
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "attention_head_dim"):
        if key in config and key in ours and _norm(config[key]) != _norm(ours[key]):
            logger.warning("SeeSR controlnet %s is %s, ours %s: expect shape mismatches", key, config[key], ours[key])
    report = map_state_onto(model.controlnet, state, "controlnet")
    _log_report(report, str(seesr_dir))
    if not report.mapped:
        raise SeeSRError(f"no tensor of '{seesr_dir / 'controlnet'}' fits the MegaSR ControlNet: wrong base model?")
    if report.image_branch and branch is None:
        logger.warning(
            "SeeSR's representation branch is not mapped: this MegaSR model has none. Set "
            "megasr.model.representation_dim: 512 to start from SeeSR exactly (RAM/DAPE tokens then feed it)."
        )
    return SeeSRReport(str(seesr_dir), report, unet_report, branch_report)


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


#: file name of the converted SeeSR model in ``models/megasr`` (the shipped seesr_x4 workflow loads it)
SEESR_FILE_NAME = "seesr_sd2_x4.safetensors"


def seesr_config(seesr_dir: str | Path, clip_dim: int = 1280):
    """The MegaSR config of SeeSR's folders: its U-Net config, its ControlNet's conditioning embedding, RAM's token
    width for the representation branch; CISM² (``clip_dim``: the CLIP vision width it would read) and MS-GAM
    keep the defaults and their zero init."""
    from .model import MegaSRConfig
    from .seesr_branch import REPRESENTATION_DIM

    seesr_dir = Path(seesr_dir).expanduser()
    configs = {}
    for part in ("unet", "controlnet"):
        path = seesr_dir / part / "config.json"
        if not path.is_file():
            raise SeeSRError(f"'{seesr_dir}' has no '{part}/config.json' (expected SeeSR's diffusers layout)")
        configs[part] = json.loads(path.read_text(encoding="utf-8"))
    unet = {k: v for k, v in configs["unet"].items() if not k.startswith("_")}
    cond = configs["controlnet"].get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    return MegaSRConfig(
        unet=unet,
        clip_dim=int(clip_dim),
        conditioning_embedding_out_channels=tuple(cond),
        representation_dim=REPRESENTATION_DIM,
    )


def seesr_folder_problem(seesr_dir: str | Path) -> str | None:
    """What keeps ``seesr_dir`` from being SeeSR's published layout (None: it has ``unet/`` and ``controlnet/``, each
    with ``config.json`` and a weight file or shard index); checked before any tensor is read."""
    root = Path(seesr_dir).expanduser()
    for part in ("unet", "controlnet"):
        folder = root / part
        if not folder.is_dir():
            return f"the SeeSR folder '{root}' has no '{part}/' folder (SeeSR publishes unet/ and controlnet/)"
        if not (folder / "config.json").is_file():
            return f"the SeeSR folder '{root}' has no '{part}/config.json'"
        if not any((folder / n).is_file() for n in _WEIGHT_FILES + _INDEX_FILES):
            return f"the SeeSR folder '{root}' has no '{part}/{_WEIGHT_FILES[0]}' (or .bin)"
    return None


def seesr_model(seesr_dir: str | Path, clip_dim: int = 1280):
    """SeeSR's ``controlnet/`` and ``unet/`` (its representation branch) as a MegaSR model (fp32, eval), checked.

    The model is MegaSR with ``representation_dim`` 512 (SeeSR's ``image_attentions`` in the ControlNet and the U-Net
    branch), CISM² and MS-GAM at their zero init, so it predicts exactly what SeeSR does on the user's SD-2 base
    (SeeSR trains only the branch of its U-Net; the base weights stay SD-2-base's). Every SeeSR ControlNet tensor
    must map: a model that would silently lose part of SeeSR is refused.
    """
    import torch

    from .model import MegaSRModel

    seesr_dir = Path(seesr_dir).expanduser()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the zero-init parts are zeros; the rest is overwritten: seeded for identical files
        model = MegaSRModel(seesr_config(seesr_dir, clip_dim)).eval()
    report = warm_start_from_seesr(model, seesr_dir)
    cn = report.controlnet
    if cn.unmapped or cn.shape_mismatch:
        raise SeeSRError(
            f"'{seesr_dir / 'controlnet'}' does not fit a SeeSR model of its own config: "
            f"{len(cn.unmapped)} tensors unknown, {len(cn.shape_mismatch)} of another shape "
            f"(e.g. {(cn.unmapped + cn.shape_mismatch)[:4]})"
        )
    if cn.kept:
        raise SeeSRError(f"'{seesr_dir / 'controlnet'}' lacks {len(cn.kept)} ControlNet tensors (e.g. {cn.kept[:4]})")
    return model, report


def seesr_folder_state(seesr_dir: str | Path, clip_dim: int = 1280):
    """(state dict, MegaSRConfig) of a SeeSR folder converted in memory: the tensors and config
    :func:`convert_seesr` writes and ``megasr.model_io.read_megasr_file`` reads back from its file (fp32)."""
    from .model import MegaSRConfig

    model, _ = seesr_model(seesr_dir, clip_dim)
    config = model.config.to_dict()
    config["base"] = model.config.base()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return state, MegaSRConfig.from_dict(json.loads(json.dumps(config, sort_keys=True)))


def convert_seesr(
    seesr_dir: str | Path, out_path: str | Path, *, clip_dim: int = 1280, dtype=None, overwrite: bool = False
) -> SeeSRReport:
    """Write SeeSR's ``controlnet/`` and ``unet/`` (its representation branch) as one MegaSR weight file
    (the model of :func:`seesr_model`, with our metadata)."""
    from .model_io import save_megasr_model

    seesr_dir = Path(seesr_dir).expanduser()
    model, report = seesr_model(seesr_dir, clip_dim)
    cn = report.controlnet
    provenance = {
        "made_by": "python -m megasr convert-seesr",
        "source": "SeeSR (Apache-2.0)",
        "seesr_dir": str(seesr_dir),
    }
    save_megasr_model(str(out_path), model, provenance, overwrite=overwrite, dtype=dtype)
    logger.info(
        "wrote %s: SeeSR's ControlNet (%d tensors) and U-Net branch (%d tensors); CISM² and MS-GAM at zero init",
        out_path,
        len(cn.mapped),
        len(report.unet_representation.mapped) if report.unet_representation else 0,
    )
    return report
