"""Base weights found by name in ComfyUI's model folders, as the nodes find them.

``ModelFolders(models_dir)`` knows ``<models_dir>/<kind>`` and every folder ``extra_model_paths.yaml`` (beside
the ``models`` folder, in the ComfyUI root) adds for that kind: sections with an optional ``base_path`` and
``kind: path`` entries (several paths one per line; relative ones to ``base_path`` or to the YAML file's
folder), the format ComfyUI reads. A value that is an existing path is used as it is; otherwise it is looked
up as a file or folder name (``v2-1_512-ema-pruned.safetensors``, ``Depth-Anything-V2-Small-hf``) in the
folders of its kind.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

__all__ = ["ModelFolders", "resolve_model_path", "weight_file_in"]

logger = logging.getLogger(__name__)


class ModelFolders:
    """The model folders of one ComfyUI installation (``models_dir`` = its ``models`` folder)."""

    def __init__(self, models_dir: str | Path | None) -> None:
        self.models_dir = Path(models_dir).expanduser().resolve() if models_dir else None
        self.extra: dict[str, list[Path]] = {}
        self.problem: str | None = None
        if self.models_dir is not None:
            extra = self.models_dir.parent / "extra_model_paths.yaml"
            if extra.is_file():
                self._read_extra(extra)

    def _read_extra(self, path: Path) -> None:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            self.problem = f"cannot read {path}: {exc}"
            return
        if not isinstance(data, dict):
            self.problem = f"{path} does not hold sections of model paths"
            return
        for section in data.values():
            if not isinstance(section, dict):
                continue
            conf = dict(section)
            base = conf.pop("base_path", None)
            conf.pop("is_default", None)
            root = Path(os.path.expandvars(str(base))).expanduser() if base else None
            if root is not None and not root.is_absolute():
                root = path.parent / root
            for kind, value in conf.items():
                for line in str(value or "").splitlines():
                    line = line.strip()
                    if not line:
                        continue
                    p = Path(os.path.expandvars(line)).expanduser()
                    if not p.is_absolute():
                        p = (root / p) if root is not None else (path.parent / p)
                    self.extra.setdefault(str(kind), []).append(p)

    def folders(self, kind: str) -> list[Path]:
        """Every folder holding models of ``kind`` (``checkpoints``, ``clip_vision``, ``megasr``, ...)."""
        out = [self.models_dir / kind] if self.models_dir is not None else []
        return out + self.extra.get(kind, [])

    def find(self, kind: str, name: str) -> Path | None:
        """The file or folder called ``name`` (may contain sub-folders) in the folders of ``kind``."""
        for folder in self.folders(kind):
            candidate = folder / name
            if candidate.exists():
                return candidate
        return None


def resolve_model_path(value: str, kinds: tuple[str, ...], folders: ModelFolders) -> Path | None:
    """``value`` as an existing path, else found by name in the folders of ``kinds``; None when neither."""
    path = Path(value).expanduser()
    if path.exists():
        return path.resolve()
    if path.is_absolute():
        return None
    for kind in kinds:
        found = folders.find(kind, value)
        if found is not None:
            logger.info("found %s in the ComfyUI %s folder: %s", value, kind, found)
            return found.resolve()
    return None


def weight_file_in(folder: Path) -> Path | None:
    """The weight file of a model folder: ``model.safetensors``, else its only ``*.safetensors``."""
    if (folder / "model.safetensors").is_file():
        return folder / "model.safetensors"
    files = sorted(folder.glob("*.safetensors"))
    return files[0] if len(files) == 1 else None
