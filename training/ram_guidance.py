"""DAPE-equipped RAM in the megasr stage: the paper's "image tags and semantic representations".

MegaSR: "We adopted the SD-2-base model as our base model and collaborated with the DAPE-equipped RAM to
extract image tags and semantic representations." Here, with ``megasr.ram`` given (``megasr.dape`` merged in
when given, see :mod:`megasr.ram`):

- **tags** -- the training prompt of an image without a sidecar ``.txt`` is RAM's tag text of its HR crop
  (``", "``-joined, the form SeeSR's tag files and test script use), in place of the zero-shot CLIP teacher
  (:mod:`training.tagging`, still the fallback when no RAM file is given). The HR crop, as the CLIP teacher:
  the prompt should name what the clean image shows; at inference the RAM node tags the LR with DAPE, which
  SeeSR trained to give on LR what RAM gives on HR.
- **representation tokens** -- a model with SeeSR's representation branch (``megasr.model.representation_dim``
  > 0) reads RAM's ``image_proj(visual_encoder(.))`` tokens of the **LR** image, as SeeSR trains it and as the
  nodes feed it at inference (the RAM node runs on the LR input). Text dropout does not touch them (SeeSR
  drops the text only).

RAM is frozen and computes in float32 (its 384 px Swin-L is small beside the U-Net).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, UsageError

__all__ = ["RamGuidance", "ram_input_problems"]

logger = logging.getLogger(__name__)


def _representation_dim(mcfg: Any) -> int:
    try:
        return int(dict(mcfg.model).get("representation_dim", 0) or 0)
    except (TypeError, ValueError):
        return 0


def ram_input_problems(cfg: Any, name: Callable[[str], str] | None = None) -> list[ConfigError]:
    """The RAM inputs' problems, found before anything loads: a representation branch without RAM, a DAPE file
    without RAM, data files that are not there."""
    name = name or (lambda key: key)
    m = cfg.megasr
    problems: list[ConfigError] = []
    width = _representation_dim(m)
    if width and not m.ram:
        problems.append(
            ConfigError(
                name("megasr.ram"),
                f"the model has SeeSR's representation branch (megasr.model.representation_dim {width}), which "
                "reads RAM/DAPE tokens of the LR image, but no RAM file is given",
                expected="RAM's Swin-L weights (and SeeSR's DAPE.pth as megasr.dape)",
                example="--ram ram_swin_large_14m.pth --dape DAPE.pth (megasr.ram / megasr.dape in a config)",
            )
        )
    if m.dape and not m.ram:
        problems.append(
            ConfigError(name("megasr.dape"), "is SeeSR's LoRA for RAM: it needs megasr.ram (the RAM weights)")
        )
    for key in ("ram_tag_list", "ram_thresholds"):
        value = getattr(m, key)
        if value and not Path(value).expanduser().is_file():
            problems.append(ConfigError(name(f"megasr.{key}"), f"'{value}' is not a file"))
    return problems


class RamGuidance:
    """The frozen DAPE-equipped RAM of a megasr run: HR crops -> prompts, LR images -> representation tokens."""

    def __init__(self, mcfg: Any, device: torch.device) -> None:
        from megasr.errors import WeightFileError
        from megasr.ram.loader import load_ram, read_tag_list, read_thresholds

        names = read_tag_list(mcfg.ram_tag_list) if mcfg.ram_tag_list else None
        thresholds = read_thresholds(mcfg.ram_thresholds) if mcfg.ram_thresholds else None
        try:
            self.model = load_ram(mcfg.ram, mcfg.dape, tag_names=names, thresholds=thresholds, device=device)
        except WeightFileError as exc:
            option = "megasr.dape" if exc.path == mcfg.dape else "megasr.ram"
            raise UsageError(option, f"'{exc.path}': {exc.problem}") from None
        except (OSError, ValueError, RuntimeError) as exc:
            raise UsageError("megasr.ram", f"cannot load RAM from '{mcfg.ram}': {exc}") from None
        self.device = device
        self.with_dape = bool(mcfg.dape)
        logger.info(
            "megasr: RAM%s gives the prompts (tags of the HR crop) and the representation tokens (of the LR)",
            "+DAPE" if self.with_dape else " (no DAPE LoRA)",
        )

    @torch.no_grad()
    def tags(self, hr: torch.Tensor) -> list[str]:
        """RAM's tag text per image of a batch [B, 3, H, W] in 0..1 ("" where no tag passes)."""
        return self.model(hr.float()).tag_text

    @torch.no_grad()
    def tokens(self, lr: torch.Tensor) -> torch.Tensor:
        """Representation tokens [B, N, 512] (float32) of a batch of LR images in 0..1."""
        return self.model.tokens(lr.float()).float()

    def prompts(self, hr: torch.Tensor, need: Sequence[int]) -> dict[int, str]:
        """Tag text of the images ``need`` of the batch (only those are tagged)."""
        if not need:
            return {}
        return dict(zip(need, self.tags(hr[list(need)]), strict=True))
