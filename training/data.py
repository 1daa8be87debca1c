"""HR image folders, random crops, resumable per-step batches, and on-device LR synthesis.

- :class:`HRImageFolder` scans folders recursively for png/jpg/webp/bmp/tif images of any size, mode and bit
  depth (16-bit and float images scaled to [0, 1], grayscale replicated to RGB, alpha composited over white,
  EXIF orientation applied). Files that cannot be read are reported once through ``logging`` and skipped.
- Images smaller than the crop are **padded by reflection** (bottom/right, mirror without repeating the edge
  pixel, as Real-ESRGAN does) by default: the HR pixels stay real, whereas upscaling would teach the model
  soft ground truth. ``small_images="upscale"`` (bicubic, shorter side to the crop) is available.
- Every random choice of an item (crop position, flips) comes from ``numpy.random.default_rng((seed, epoch,
  index))``, so an item is a pure function of (seed, epoch, index), independent of workers and resume.
- :class:`StepBatchSampler` yields, for micro-batch ``k`` of rank ``r`` of ``world`` ranks, positions
  ``[(k * world + r) * B, ... + B)`` of the endless concatenation of per-epoch permutations: a run resumed at
  step ``s`` sees exactly the batches an uninterrupted run would, and ranks never share an item in a step.
- :class:`DegradedBatch` runs the degradation on the training device: ``lr``, ``hr_usm``, ``hr`` and ``lr_up``
  (the bicubic-upscaled LR at HR size, what the ControlNet and the LRE latent read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from .degradations import DegradationPipeline

__all__ = [
    "IMAGE_EXTENSIONS",
    "DegradedBatch",
    "HRImageFolder",
    "StepBatchSampler",
    "collate_hr",
    "load_image",
    "make_hr_loader",
    "scan_images",
]

logger = logging.getLogger(__name__)
_PADDED_SIZES: set[tuple[int, int, int]] = set()

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SMALL_IMAGE_MODES: tuple[str, ...] = ("reflect", "upscale")


def scan_images(roots: Sequence[str | Path], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """All image files under ``roots`` (recursive, sorted, deduplicated, hidden files skipped).

    Raises ``FileNotFoundError`` for a missing or non-folder root.
    """
    exts = {e.lower() for e in extensions}
    found: set[Path] = set()
    for root in roots:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder '{root}' does not exist or is not a folder")
        for p in root.rglob("*"):
            if p.suffix.lower() in exts and not p.name.startswith(".") and p.is_file():
                found.add(p.resolve())
    return sorted(found)


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    """PIL image of any mode -> float32 HxWx3 in [0, 1]."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if mode != "I" or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / peak, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img).astype(np.float32)
        if arr.max(initial=0) > 1.0:
            arr = arr / 255.0
        return np.repeat(np.clip(arr, 0.0, 1.0)[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return arr.astype(np.float32) / 255.0


def load_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to float32 HxWx3 in [0, 1] (EXIF orientation applied). Raises ``OSError`` when unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            arr = _to_float_rgb(img)
    except (UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise OSError(f"cannot read image '{path}': {exc}") from exc
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise OSError(f"cannot read image '{path}': empty image")
    return arr


def _fit_small(arr: np.ndarray, crop: int, mode: str) -> np.ndarray:
    h, w = arr.shape[:2]
    if h >= crop and w >= crop:
        return arr
    if mode == "upscale":
        scale = crop / min(h, w)
        size = (max(crop, round(w * scale)), max(crop, round(h * scale)))
        img = Image.fromarray((arr * 255.0 + 0.5).clip(0, 255).astype(np.uint8))
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
    key = (h, w, crop)
    if key not in _PADDED_SIZES:  # once per size: a folder of small images would repeat it every epoch
        _PADDED_SIZES.add(key)
        logger.warning(
            "a %dx%d px training image is smaller than the %d px crop: padded by reflection to %d px "
            "(data.small_images: upscale resizes instead; tiny images teach the model little)",
            w, h, crop, crop,
        )  # fmt: skip
    pad = ((0, max(0, crop - h)), (0, max(0, crop - w)), (0, 0))
    return np.pad(arr, pad, mode="reflect" if min(h, w) > 1 else "edge")


class HRImageFolder(Dataset):
    """Random ``crop_size`` crops of HR images found recursively under ``roots``.

    ``dataset[(epoch, index)]`` (or ``dataset[index]`` for the current :meth:`set_epoch`) returns
    ``{"hr": float32 [3, S, S] in [0, 1], "index": int, "path": str}``.
    """

    def __init__(
        self,
        roots: Sequence[str | Path] | str | Path,
        crop_size: int = 512,
        seed: int = 0,
        hflip: bool = True,
        vflip: bool = False,
        rot90: bool = False,
        small_images: str = "reflect",
        check_files: bool = True,
    ) -> None:
        if isinstance(roots, (str, Path)):
            roots = [roots]
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if small_images not in SMALL_IMAGE_MODES:
            raise ValueError(f"small_images must be one of {list(SMALL_IMAGE_MODES)}, got '{small_images}'")
        self.roots = [Path(r) for r in roots]
        self.crop_size = int(crop_size)
        self.seed = int(seed)
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90
        self.small_images = small_images
        self.epoch = 0
        self._reported: set[str] = set()
        paths = scan_images(self.roots)
        if check_files:
            paths = [p for p in paths if self._header_ok(p)]
        if not paths:
            where = ", ".join(str(r) for r in self.roots)
            raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) found under {where}")
        self.paths: list[Path] = paths

    def _report(self, path: Path, problem: str) -> None:
        key = str(path)
        if key not in self._reported:
            self._reported.add(key)
            logger.warning("skipping unreadable image %s: %s", path, problem)

    def _header_ok(self, path: Path) -> bool:
        try:
            with Image.open(path) as img:
                w, h = img.size
            if w < 1 or h < 1:
                raise OSError("empty image")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            self._report(path, str(exc))
            return False
        return True

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when the dataset is indexed by a plain int."""
        self.epoch = int(epoch)

    def _decode(self, index: int) -> tuple[int, np.ndarray]:
        """Decode ``index``, or the next readable image after it (deterministic substitute)."""
        n = len(self.paths)
        for step in range(n):
            i = (index + step) % n
            try:
                return i, load_image(self.paths[i])
            except OSError as exc:
                self._report(self.paths[i], str(exc))
        raise RuntimeError(f"none of the {n} images under {[str(r) for r in self.roots]} can be read")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (self.epoch, int(key))
        if not 0 <= index < len(self.paths):
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, epoch, index))
        used, arr = self._decode(index)
        arr = _fit_small(arr, self.crop_size, self.small_images)
        h, w = arr.shape[:2]
        top = int(rng.integers(0, h - self.crop_size + 1))
        left = int(rng.integers(0, w - self.crop_size + 1))
        crop = arr[top : top + self.crop_size, left : left + self.crop_size]
        flips = rng.random(3)
        if self.hflip and flips[0] < 0.5:
            crop = crop[:, ::-1]
        if self.vflip and flips[1] < 0.5:
            crop = crop[::-1]
        if self.rot90 and flips[2] < 0.5:
            crop = crop.transpose(1, 0, 2)
        hr = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        return {"hr": hr, "index": used, "path": str(self.paths[used])}


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Resumable, rank-sharded batches of ``(epoch, index)`` keys.

    Micro-batch ``k`` (counting from 0 over the whole run) of rank ``rank`` takes the positions
    ``[(k * world_size + rank) * batch_size, ... + batch_size)`` of the endless sequence formed by
    concatenating one permutation of ``range(num_items)`` per epoch (permutation seeded by ``(seed, epoch)``).
    Starts at micro-batch ``start`` and yields ``count`` batches (endless when ``None``).
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        count: int | None = None,
        shuffle: bool = True,
    ) -> None:
        if num_items < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError("num_items, batch_size, world_size must be >= 1 and 0 <= rank < world_size")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start, self.count, self.shuffle = rank, world_size, start, count, shuffle
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            if self.shuffle:
                self._perm_cache[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_items)
            else:
                self._perm_cache[epoch] = np.arange(self.num_items)
        return self._perm_cache[epoch]

    def batch(self, k: int) -> list[tuple[int, int]]:
        """Keys of micro-batch ``k`` for this rank."""
        first = (k * self.world_size + self.rank) * self.batch_size
        keys = []
        for pos in range(first, first + self.batch_size):
            epoch, offset = divmod(pos, self.num_items)
            keys.append((epoch, int(self._perm(epoch)[offset])))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start
        while self.count is None or k < self.start + self.count:
            yield self.batch(k)
            k += 1

    def __len__(self) -> int:
        if self.count is None:
            raise TypeError("endless sampler has no length")
        return self.count


def collate_hr(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into ``{"hr": [B,3,S,S], "index": LongTensor[B], "path": list[str]}``."""
    return {
        "hr": torch.stack([it["hr"] for it in items]),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "path": [it["path"] for it in items],
    }


def make_hr_loader(
    dataset: HRImageFolder,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    count: int | None = None,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of HR batches driven by a :class:`StepBatchSampler` (resumable at micro-batch ``start``)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, rank, world_size, start, count)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_hr,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        # Its own generator: otherwise the iterator draws its base seed from torch's global RNG, which
        # shifts every later global draw (e.g. drop-path) and breaks bit-exact resume.
        generator=torch.Generator().manual_seed(seed),
    )


@dataclass
class DegradedBatch:
    """One training batch: ``lr`` [B,3,H/s,W/s], ``hr_usm`` and ``hr`` [B,3,H,W], ``lr_up`` [B,3,H,W] (bicubic)."""

    lr: torch.Tensor
    hr_usm: torch.Tensor
    hr: torch.Tensor
    lr_up: torch.Tensor

    @classmethod
    def build(
        cls,
        hr: torch.Tensor,
        pipeline: DegradationPipeline,
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> DegradedBatch:
        """Move ``hr`` to ``device`` (default: where it is), degrade it there with ``generator``'s draws."""
        if device is not None:
            hr = hr.to(device, non_blocking=True)
        hr = hr.float()
        lr, hr_usm = pipeline(hr, generator)
        lr_up = F.interpolate(lr, size=hr.shape[-2:], mode="bicubic", align_corners=False).clamp_(0, 1)
        return cls(lr=lr, hr_usm=hr_usm, hr=hr, lr_up=lr_up)

    def to(self, device: torch.device | str) -> DegradedBatch:
        """A copy on ``device``."""
        return DegradedBatch(*(t.to(device) for t in (self.lr, self.hr_usm, self.hr, self.lr_up)))
