"""Checks and conversions of ComfyUI-style IMAGE tensors ([B, H, W, C] float in 0..1)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .errors import MegaSRInputError

log = logging.getLogger("megasr")

RESIZE_DTYPES = (torch.float32, torch.float64)  # resized as they are; every other dtype via float32
#: How far a 0..1 image may over/undershoot (bicubic resampling does, e.g. core Upscale Image) and still be
#: read as 0..1 (clamped); a float image with a larger max (up to 255) is read as 0..255 and rescaled.
RANGE_TOLERANCE = 0.25
MAX_BYTE_RANGE = 255.0
#: this share of pure-white values or more: warned about as a clipped 16-bit load
SATURATED_FRACTION = 0.99


def check_value_range(image: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """The pack's one value-range rule for float IMAGE/map inputs; returns the image in 0..1 (clamped).

    max <= 1 + RANGE_TOLERANCE: 0..1 (overshoot clamped); 1 + RANGE_TOLERANCE < max <= 255: 0..255,
    divided by 255 (logged, naming node and input); max > 255, min below -RANGE_TOLERANCE (in the
    detected scale), NaN or inf: refused. An image that is pure white everywhere is warned about: a 16-bit
    PNG through core Load Image arrives like that.
    """
    if not torch.isfinite(image).all():
        raise MegaSRInputError(where, name, "the image contains NaN or infinite values; fix the node that made it")
    lo, hi = float(image.min()), float(image.max())
    if hi > MAX_BYTE_RANGE:
        raise MegaSRInputError(
            where, name, f"values reach {hi:g}; IMAGE inputs must be 0..1 (0..255 floats are rescaled), not above 255"
        )
    if hi > 1.0 + RANGE_TOLERANCE:
        log.warning("%s: input '%s' has values up to %g: read as 0..255 and divided by 255", where, name, hi)
        image, lo = image / MAX_BYTE_RANGE, lo / MAX_BYTE_RANGE
    if lo < -RANGE_TOLERANCE:
        raise MegaSRInputError(
            where, name, f"values go down to {lo:g} (in 0..1 terms); IMAGE inputs must not be negative"
        )
    white = float((image >= 1.0).float().mean())
    if white >= SATURATED_FRACTION:
        log.warning(
            "%s: input '%s' is %.0f%% pure white: a 16-bit PNG loaded with core Load Image arrives clipped like "
            "this (ComfyUI reads its values as 8-bit). Fix: save the image as an 8-bit PNG (or 16-bit TIFF/EXR "
            "through a 16-bit-aware loader) and load it again",
            where,
            name,
            100 * white,
        )
    return image.clamp(0.0, 1.0)


def integer_to_unit(image: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """An integer IMAGE scaled by the range its values use, not its dtype's maximum: uint8 is 0..255; any other
    integer dtype is 0..255 when its values stay within it, 0..65535 (16-bit) when they stay within that, else
    0..dtype max. Logged, naming node and input (an int32 tensor of 16-bit values was black when divided by 2^31)."""
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    hi = int(image.max()) if image.numel() else 0
    if int(image.min()) < 0:
        raise MegaSRInputError(where, name, f"integer image with negative values ({int(image.min())}); use 0..255")
    scale = 255 if hi <= 255 else 65535 if hi <= 65535 else torch.iinfo(image.dtype).max
    bits = {255: "8-bit", 65535: "16-bit"}.get(scale, f"{image.dtype} full range")
    log.warning(
        "%s: input '%s' is an integer image (%s) with values up to %d: read as 0..%d (%s)",
        where, name, str(image.dtype).replace("torch.", ""), hi, scale, bits,
    )  # fmt: skip
    return image.float() / float(scale)


def normalise_depth_map(image: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """A float depth map outside 0..1 (MiDaS / Depth Anything raw output, metres, 0..255): min-max normalised to
    0..1, the documented rule for relative depth (near = bright kept as it is), logged naming node and input."""
    if not image.is_floating_point() or not torch.isfinite(image).all():
        return image
    lo, hi = float(image.min()), float(image.max())
    if lo >= -RANGE_TOLERANCE and hi <= 1.0 + RANGE_TOLERANCE:
        return image
    log.warning(
        "%s: input '%s' has values %g..%g, not 0..1: min-max normalised to 0..1 (the rule for depth maps)",
        where, name, lo, hi,
    )  # fmt: skip
    return (image - lo) / max(hi - lo, 1e-12)


def as_rgb_image(image: torch.Tensor, where: str, name: str, min_size: int = 1) -> torch.Tensor:
    """Validate an IMAGE and return it as float32 RGB [B, H, W, 3] in 0..1.

    Grayscale is repeated to RGB and alpha dropped (both logged); integer images are scaled by the range
    their values use (``integer_to_unit``, logged); float values follow ``check_value_range`` (0..255 rescaled, logged; out of range refused);
    empty or wrongly shaped tensors are refused with a message naming the input.
    """
    if not isinstance(image, torch.Tensor):
        raise MegaSRInputError(where, name, f"expected an IMAGE tensor, got {type(image).__name__}")
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4:
        raise MegaSRInputError(where, name, f"expected shape [batch, height, width, channels], got {list(image.shape)}")
    b, h, w, c = image.shape
    if b == 0 or h == 0 or w == 0:
        raise MegaSRInputError(where, name, f"the image is empty (shape {list(image.shape)})")
    if h < min_size or w < min_size:
        raise MegaSRInputError(where, name, f"the image is {w}x{h} px; at least {min_size}x{min_size} px is needed")
    if image.dtype == torch.bool:
        image = image.float()
    elif not image.is_floating_point():
        image = integer_to_unit(image, where, name)
    image = check_value_range(image.float(), where, name)
    if c == 1:
        log.info("%s: input '%s' is grayscale; repeating it to RGB", where, name)
        image = image.expand(-1, -1, -1, 3)
    elif c == 4:
        log.info("%s: input '%s' has an alpha channel; it is ignored", where, name)
        image = image[..., :3]
    elif c == 2:
        log.info("%s: input '%s' is grayscale+alpha; using the gray channel", where, name)
        image = image[..., :1].expand(-1, -1, -1, 3)
    elif c != 3:
        raise MegaSRInputError(where, name, f"expected 1, 3 or 4 channels, got {c}")
    return image.contiguous()


def to_bchw(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(-1, 1)


def to_bhwc(image: torch.Tensor) -> torch.Tensor:
    return image.movedim(1, -1)


def resize_bchw(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize [B, C, H, W] to ``size`` (h, w); antialiased when shrinking with bilinear/bicubic.

    Any other dtype than float32/float64 is resized in float32 and returned in its own dtype: torch has no
    antialiased (nor, on some devices, any) resize for float16/bfloat16 on CPU, and none at all for fp8.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.dtype not in RESIZE_DTYPES:
        return resize_bchw(x.float(), size, mode).to(x.dtype)
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(
        x, size=size, mode=mode, align_corners=False, antialias=shrink and mode in ("bilinear", "bicubic")
    )


def match_batch(x: torch.Tensor, batch: int, where: str, name: str) -> torch.Tensor:
    """Broadcast a batch of 1 to ``batch``; any other mismatch is an error."""
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise MegaSRInputError(
        where, name, f"batch size {x.shape[0]} does not match the LR image batch {batch}; use 1 or {batch} images"
    )
