"""MegaSR Image Quality node: the eval command's metrics on any IMAGE, as numbers and a readable text."""

from __future__ import annotations

import math

import folder_paths
import torch

from ..megasr.errors import MegaSRInputError
from ..megasr.images import as_rgb_image, match_batch, to_bchw
from ..megasr.metrics import METRIC_FOLDER, MetricOptions, compute_metrics, format_values
from ..megasr.metrics.fidelity import SIZE_RULES
from .api import io, ui

WHERE = "MegaSR Image Quality"


def metric_folders() -> list[str]:
    """``models/megasr/metrics`` in every ``megasr`` folder ComfyUI knows (incl. extra_model_paths.yaml)."""
    sub = METRIC_FOLDER.split("/", 1)[1]
    try:
        roots = folder_paths.get_folder_paths(METRIC_FOLDER.split("/", 1)[0])
    except KeyError:
        roots = []
    return [f"{r}/{sub}" for r in roots]


class MegaSRImageQuality(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSRImageQuality",
            display_name="MegaSR Image Quality",
            category="MegaSR",
            is_output_node=True,  # runs (and shows its text) without anything connected to its outputs
            description=(
                "Scores an image with the metrics of the MegaSR paper's table, computed exactly as "
                "`python -m megasr eval` does: PSNR and SSIM on the Y channel (BT.601) and LPIPS need a "
                "reference (the HR image). The image is scored as an 8-bit file would be (values rounded to "
                "k/255). A metric whose weight file is missing is skipped with a line saying which file; its "
                "number output is NaN. With a batch, the numbers are the batch mean and the text lists each image."
            ),
            inputs=[
                io.Image.Input("image", tooltip="The image to score (e.g. the upscaled result)."),
                io.Image.Input(
                    "reference",
                    optional=True,
                    tooltip="Ground truth of the same size (the HR image), needed by PSNR, SSIM and LPIPS. "
                    "A batch of 1 is used for every image of the batch.",
                ),
                io.Boolean.Input("psnr", default=True, tooltip="PSNR on the Y channel, dB (higher is better)."),
                io.Boolean.Input("ssim", default=True, tooltip="SSIM on the Y channel, 0..1 (higher is better)."),
                io.Boolean.Input(
                    "lpips",
                    default=True,
                    tooltip="LPIPS (AlexNet), lower is better; needs models/megasr/metrics/lpips_alex.safetensors "
                    "(python -m megasr fetch --eval).",
                ),
                io.Int.Input(
                    "crop_border",
                    default=0,
                    min=0,
                    max=64,
                    tooltip="Pixels removed from every side of both images before the full-reference metrics "
                    "(the paper's toolbox: 0; many x4 SR papers: 4).",
                ),
                io.Combo.Input(
                    "size_rule",
                    options=list(SIZE_RULES),
                    default="error",
                    tooltip="error: image and reference must be the same size. crop: a difference under 4 px "
                    "per side is allowed, the top-left common region is compared.",
                ),
                io.Boolean.Input(
                    "dists",
                    default=False,
                    tooltip="DISTS (VGG16), lower is better; needs models/megasr/metrics/dists_vgg16.safetensors.",
                ),
                io.Boolean.Input(
                    "niqe",
                    default=False,
                    tooltip="NIQE (no reference), lower is better; needs models/megasr/metrics/"
                    "niqe_pris_params.safetensors (python -m megasr fetch --eval) and an image of at least two "
                    "96 x 96 blocks.",
                ),
                io.Boolean.Input(
                    "clipiqa",
                    default=False,
                    tooltip="CLIP-IQA with CLIP ResNet-50 (no reference), 0..1, higher is better; needs "
                    "models/megasr/metrics/clipiqa_rn50.safetensors (python -m megasr fetch --eval).",
                ),
            ],
            outputs=[
                io.Float.Output(display_name="psnr", tooltip="PSNR (Y) in dB, batch mean; NaN when not computed."),
                io.Float.Output(display_name="ssim", tooltip="SSIM (Y), batch mean; NaN when not computed."),
                io.Float.Output(display_name="lpips", tooltip="LPIPS, batch mean; NaN when not computed."),
                io.String.Output(display_name="text", tooltip="Every score (per image) and every skip, one a line."),
                io.Float.Output(display_name="dists", tooltip="DISTS, batch mean; NaN when not computed."),
                io.Float.Output(display_name="niqe", tooltip="NIQE, batch mean; NaN when not computed."),
                io.Float.Output(display_name="clipiqa", tooltip="CLIP-IQA, batch mean; NaN when not computed."),
            ],
        )

    @classmethod
    def execute(
        cls, image, psnr, ssim, lpips, crop_border, size_rule, dists=False, niqe=False, clipiqa=False, reference=None
    ) -> io.NodeOutput:
        img = to_bchw(as_rgb_image(image, WHERE, "image"))
        img = torch.round(img * 255.0) / 255.0  # as a saved 8-bit file: the same numbers as the eval command
        ref = None
        if reference is not None:
            ref = match_batch(as_rgb_image(reference, WHERE, "reference"), img.shape[0], WHERE, "reference")
            ref = torch.round(to_bchw(ref) * 255.0) / 255.0
        switches = (
            ("psnr", psnr),
            ("ssim", ssim),
            ("lpips", lpips),
            ("dists", dists),
            ("niqe", niqe),
            ("clipiqa", clipiqa),
        )
        names = [n for n, on in switches if on]
        if not names:
            raise MegaSRInputError(WHERE, "psnr", "no metric is switched on; turn on at least one")
        try:
            result = compute_metrics(
                names, img, ref, metric_folders(), MetricOptions(crop=crop_border, size_rule=size_rule)
            )
        except MegaSRInputError as err:
            raise MegaSRInputError(WHERE, err.name, err.problem) from err
        except ValueError as err:  # e.g. a border crop that leaves nothing, an image too small for SSIM
            raise MegaSRInputError(WHERE, "crop_border" if "crop_border" in str(err) else "image", str(err)) from err

        def mean(name: str) -> float:
            vals = result.values.get(name)
            return float(sum(vals) / len(vals)) if vals else math.nan

        text = format_values(result)
        outs = (mean("psnr"), mean("ssim"), mean("lpips"), text, mean("dists"), mean("niqe"), mean("clipiqa"))
        return io.NodeOutput(*outs, ui=ui.PreviewText(text))
