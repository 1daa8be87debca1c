"""How much memory a DAGE map node needs, so that a preflight (sampler, headless run) can count it.

    dage_map_bytes(kind, height, width, resolution, batch=1) -> int

The estimate is the peak of the tensors one map-node call creates (weights excluded: ComfyUI's model
management accounts for those when it loads the extractor). Since the extractors keep every network-side
tensor at the working size (``working_size``: short side ``resolution``, long side at most
``MAX_WORKING_ASPECT * resolution``), it has two parts:

- per *working* pixel: the network's activations and, for segmentation, the 150 class scores and the
  per-query-chunk upsampled masks (the dominant term: ~1.3 kB per working pixel);
- per *input* pixel: the RGB copy of the input, the map at the input size and its IMAGE encoding
  (tens of bytes), plus the output IMAGE of the whole batch (12 bytes per pixel per image).

The coefficients are upper bounds from the tensor shapes of the real architectures (Mask2Former
Swin-T, ControlNetHED_Apache2, Depth-Anything-V2-Small) in float32; the tests check them against the
tensors counted while the node runs.
"""

from __future__ import annotations

from .common import working_size

#: the working size is a multiple of this per kind (the backbones' strides)
SIZE_MULTIPLES = {"hed": 16, "depth": 14, "seg": 32}

#: bytes per working pixel (float32 activations; segmentation: 150 scores x (partial + sum) + 16 query
#: masks x (upsampled + sigmoid) + Swin/pixel-decoder features at 1/4 resolution and below)
WORK_BYTES_PER_PIXEL = {"hed": 2 * 64 * 4 + 64 * 4, "depth": 1024, "seg": 150 * 4 * 2 + 16 * 4 * 2 + 768}

#: bytes per input pixel for one image of the batch: RGB float copy (12), map at input size and its
#: encodings (hed/depth: 1-channel float + normalised copy + IMAGE; seg: uint8 + long labels + IMAGE)
INPUT_BYTES_PER_PIXEL = {"hed": 12 + 4 + 4 + 12, "depth": 12 + 4 + 4 + 12, "seg": 12 + 1 + 8 + 12}

#: the output IMAGE [B, H, W, 3] float32, kept for the whole batch (plus its concatenated copy)
OUTPUT_BYTES_PER_PIXEL = 2 * 12


def dage_map_bytes(kind: str, height: int, width: int, resolution: int, batch: int = 1) -> int:
    """Estimated peak bytes of one DAGE map node ('hed', 'depth' or 'seg') on a ``batch`` of
    ``height`` x ``width`` images at ``resolution`` (the node's widget). Images of a batch run one
    after the other, so only the output grows with ``batch``."""
    if kind not in WORK_BYTES_PER_PIXEL:
        raise ValueError(f"unknown DAGE map kind '{kind}', expected one of {', '.join(WORK_BYTES_PER_PIXEL)}")
    h, w = working_size(int(height), int(width), int(resolution), SIZE_MULTIPLES[kind])
    input_px = int(height) * int(width)
    return (
        h * w * WORK_BYTES_PER_PIXEL[kind]
        + input_px * INPUT_BYTES_PER_PIXEL[kind]
        + int(batch) * input_px * OUTPUT_BYTES_PER_PIXEL
    )
