"""Guidance-map encodings between extractor outputs and ComfyUI-style IMAGE tensors.

docs/ARCHITECTURE.md: every guidance map is an ``IMAGE`` ([B, H, W, 3] float in 0..1) so that maps
from other packs and hand-painted maps are drop-in:

- HED: white edges on black; 1 channel repeated to 3; read back as the channel mean.
- depth: relative inverse depth (near = bright), normalised per image to 0..1; read back as the mean.
- segmentation: the ADE20K 150-class colour palette; read back by nearest palette colour.

The network reads HED and depth as 1 channel ([B, 1, H, W]) and segmentation as 3 channels
([B, 3, H, W], palette colours in 0..1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kinds import MAP_KINDS

NUM_ADE20K_CLASSES = 150

# The standard ADE20K (SceneParse150) colour palette, class index 0 ("wall") .. 149 ("flag"), as used by
# the ADE20K tools, mmsegmentation and the ControlNet segmentation preprocessors. Note that the
# palette itself gives classes 6 ("road") and 48 ("skyscraper") the same colour (140, 140, 140);
# reading colours back therefore maps that colour to class 6.
# fmt: off
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# fmt: on
assert len(ADE20K_PALETTE) == NUM_ADE20K_CLASSES


def palette_tensor(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The palette as [150, 3] in 0..1."""
    return torch.tensor(ADE20K_PALETTE, dtype=dtype, device=device) / 255.0


def _as_b1hw(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[1] == 1:
        return x
    raise ValueError(f"expected a map [B, H, W] or [B, 1, H, W], got {list(x.shape)}")


def _image_to_b1hw(image: torch.Tensor) -> torch.Tensor:
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE [B, H, W, C], got {list(image.shape)}")
    return image.float().mean(dim=-1, keepdim=True).movedim(-1, 1)


def gray_to_image(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] (or [B, H, W]) in 0..1 -> IMAGE [B, H, W, 3] with three equal channels."""
    return _as_b1hw(x).float().clamp(0.0, 1.0).movedim(1, -1).expand(-1, -1, -1, 3).contiguous()


# ------------------------------------------------------------------------------------------------ HED


def hed_to_image(edges: torch.Tensor) -> torch.Tensor:
    """Edge probabilities [B, 1, H, W] in 0..1 (white edges on black) -> IMAGE."""
    return gray_to_image(edges)


def image_to_hed(image: torch.Tensor) -> torch.Tensor:
    """IMAGE -> [B, 1, H, W] edge map the network reads (mean of the channels)."""
    return _image_to_b1hw(image).clamp(0.0, 1.0)


hed_to_network = image_to_hed


# ---------------------------------------------------------------------------------------------- depth


def normalize_depth(disparity: torch.Tensor, rel_eps: float = 1e-6) -> torch.Tensor:
    """Relative inverse depth -> 0..1 per image (min-max). A map whose range is below
    ``rel_eps`` of its magnitude (constant) becomes 0."""
    d = _as_b1hw(disparity).float()
    flat = d.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    rng = hi - lo
    flat_map = rng <= rel_eps * torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)
    out = (d - lo) / torch.where(flat_map, torch.ones_like(rng), rng)
    return torch.where(flat_map, torch.zeros_like(out), out).clamp(0.0, 1.0)


def depth_to_image(disparity: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Relative inverse depth (near = large) -> IMAGE (near = bright), normalised per image."""
    return gray_to_image(normalize_depth(disparity) if normalize else disparity)


def image_to_depth(image: torch.Tensor) -> torch.Tensor:
    """IMAGE -> [B, 1, H, W] depth map the network reads (mean of the channels, not renormalised)."""
    return _image_to_b1hw(image).clamp(0.0, 1.0)


depth_to_network = image_to_depth


# ------------------------------------------------------------------------------------------------ seg


def seg_labels_to_image(labels: torch.Tensor) -> torch.Tensor:
    """Label map [B, H, W] (int, 0..149) -> IMAGE in the ADE20K palette."""
    if labels.ndim == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 3:
        raise ValueError(f"expected a label map [B, H, W], got {list(labels.shape)}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_ADE20K_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_ADE20K_CLASSES - 1}, got {int(labels.min())}..{int(labels.max())}")
    return palette_tensor(labels.device)[labels]


def image_to_seg_labels(image: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """IMAGE -> label map [B, H, W] (long) by nearest palette colour (in 0..255 RGB).

    Works on hand-painted or resized (blended) maps; processed in chunks of pixels to bound memory.
    """
    if image.ndim != 4 or image.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE [B, H, W, 3], got {list(image.shape)}")
    b, h, w, _ = image.shape
    pix = image[..., :3].reshape(-1, 3).float() * 255.0
    pal = palette_tensor(image.device) * 255.0
    pal_sq = (pal * pal).sum(-1)
    out = torch.empty(pix.shape[0], dtype=torch.long, device=image.device)
    for s in range(0, pix.shape[0], chunk):
        p = pix[s : s + chunk]
        # |p - c|^2 = |p|^2 - 2 p.c + |c|^2 ; |p|^2 is constant per pixel
        d = pal_sq.unsqueeze(0) - 2.0 * p @ pal.t()
        out[s : s + chunk] = d.argmin(dim=-1)
    return out.view(b, h, w)


def seg_to_network(image: torch.Tensor, snap: bool = True) -> torch.Tensor:
    """IMAGE -> [B, 3, H, W] palette colour map the network reads.

    With ``snap`` every pixel is replaced by its nearest palette colour, so anti-aliased or
    slightly off hand-painted colours give the same input as clean ones.
    """
    if snap:
        image = seg_labels_to_image(image_to_seg_labels(image))
    return image[..., :3].float().clamp(0.0, 1.0).movedim(-1, 1).contiguous()


def snap_seg_image(image: torch.Tensor) -> tuple[torch.Tensor, int]:
    """IMAGE -> (IMAGE with every pixel at its nearest palette colour, number of pixels that were off-palette).

    A pixel is off-palette unless all three channels equal a palette colour exactly; on-palette pixels keep
    their values bit-exactly (the palette colours are the same float32 values as ``palette_tensor``).
    """
    snapped = seg_labels_to_image(image_to_seg_labels(image))
    off = int((snapped != image[..., :3].float()).any(dim=-1).sum())
    return snapped, off


def seg_logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """[B, 150, H, W] class scores -> label map [B, H, W]."""
    return logits.argmax(dim=1)


def seg_logits_to_image(logits: torch.Tensor) -> torch.Tensor:
    return seg_labels_to_image(seg_logits_to_labels(logits))


# ------------------------------------------------------------------------------------------- helpers


def map_to_network(kind: str, image: torch.Tensor) -> torch.Tensor:
    """IMAGE map of ``kind`` ('hed', 'depth', 'seg') -> the [B, C, H, W] tensor the network reads."""
    if kind == "hed":
        return hed_to_network(image)
    if kind == "depth":
        return depth_to_network(image)
    if kind == "seg":
        return seg_to_network(image)
    raise ValueError(f"unknown map kind '{kind}', expected one of {MAP_KINDS}")


def resize_map(kind: str, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a network-side map [B, C, H, W]: bilinear for HED/depth, nearest for segmentation
    (colours must stay palette colours)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if kind == "seg":
        return F.interpolate(x, size=size, mode="nearest-exact")
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
