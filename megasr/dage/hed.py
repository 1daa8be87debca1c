"""DAGE HED edge extractor: the ``ControlNetHED_Apache2`` architecture (controlnet_aux), fully
fine-tuned. The map is the sigmoid of the mean of the five side outputs, each upsampled to the
working size (as the controlnet_aux detector does at its input size), then resized to the input
size: memory is bounded by ``resolution``, not by the input. Intermediates are the five blocks'
features."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..files import read_state_dict
from ..weights import check_state_dict, load_weight_file, save_weight_file
from .common import DageOutput, check_input, resize_bchw, working_size
from .kinds import BY_KIND

log = logging.getLogger("megasr")

COMPONENT = BY_KIND["hed"].component
HED_WIDTHS = (64, 128, 256, 512, 512)  # the real ControlNetHED_Apache2
HED_LAYERS = (2, 2, 3, 3, 3)
HED_SIZE_MULTIPLE = 16  # four 2x max-pools
HED_DEFAULT_CONFIG: dict[str, Any] = {"arch": "ControlNetHED_Apache2", "widths": list(HED_WIDTHS), "resolution": 512}


def build_hed_network(widths: tuple[int, ...] | list[int] = HED_WIDTHS) -> torch.nn.Module:
    """A ``ControlNetHED_Apache2``; other ``widths`` (tests) keep its layout and key names."""
    from controlnet_aux.hed import ControlNetHED_Apache2, DoubleConvBlock  # lazy: imports every detector

    net = ControlNetHED_Apache2()
    widths = tuple(int(w) for w in widths)
    if len(widths) != 5:
        raise ValueError(f"HED needs 5 block widths, got {widths}")
    if widths != HED_WIDTHS:
        c_in = 3
        for i, (w, n) in enumerate(zip(widths, HED_LAYERS)):
            setattr(net, f"block{i + 1}", DoubleConvBlock(input_channel=c_in, output_channel=w, layer_number=n))
            c_in = w
    return net


class HedExtractor(torch.nn.Module):
    """``forward(image [B,3,H,W] 0..1, resolution=None) -> DageOutput`` with ``map`` [B,1,H,W] at the
    input size and ``raw`` (logits) [B,1,h,w] at the working size."""

    kind = "hed"
    component = COMPONENT
    size_multiple = HED_SIZE_MULTIPLE

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config = {**HED_DEFAULT_CONFIG, **(config or {})}
        self.net = build_hed_network(self.config["widths"])

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None) -> "HedExtractor":
        return cls(config)

    @property
    def default_resolution(self) -> int:
        return int(self.config.get("resolution", 512))

    def forward(self, image: torch.Tensor, resolution: int | None = None) -> DageOutput:
        image = check_input(image, "HED extractor")
        h0, w0 = image.shape[-2:]
        res = self.default_resolution if resolution is None else int(resolution)
        size = working_size(h0, w0, res, self.size_multiple)
        dtype = self.net.norm.dtype
        x = resize_bchw(image.to(dtype), size, "bilinear") * 255.0  # the net takes RGB in 0..255
        h = x - self.net.norm
        feats, sides = [], []
        for i in range(1, 6):
            h, side = getattr(self.net, f"block{i}")(h, down_sampling=i > 1)
            feats.append(h)
            sides.append(side)
        logits = sum(resize_bchw(s.float(), size, "bilinear") for s in sides) / len(sides)
        edges = resize_bchw(torch.sigmoid(logits), (h0, w0), "bilinear")
        return DageOutput(map=edges, raw=logits, features=feats)

    # -------------------------------------------------------------------------------- weight files

    def file_config(self) -> dict[str, Any]:
        return dict(self.config)

    def save(self, path: str, provenance: dict | None = None, overwrite: bool = False) -> None:
        save_weight_file(path, self.net.state_dict(), COMPONENT, self.file_config(), provenance, overwrite)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "HedExtractor":
        state, info = load_weight_file(path, COMPONENT, device=device)
        model = cls(info.config)
        check_state_dict(model.net, state, info.path)
        model.net.load_state_dict(state)
        return model.eval()

    def load_original(self, path: str) -> None:
        """Load the original ``ControlNetHED.pth`` (lllyasviel/Annotators) or a safetensors copy,
        the starting point of fine-tuning (``.pth`` read with ``weights_only=True``)."""
        state = read_state_dict(path)
        check_state_dict(self.net, state, path)
        self.net.load_state_dict(state)


def hed_output_loss(student: DageOutput, teacher: DageOutput) -> torch.Tensor:
    """Output term for HED: L1 between the edge maps (teacher detached), at the student's size (the student sees
    the LR image, the teacher the HR crop: the teacher's map is resized down, antialiased)."""
    target = teacher.map.detach()
    if target.shape[-2:] != student.map.shape[-2:]:
        target = resize_bchw(target.float(), tuple(student.map.shape[-2:]), "bilinear")
    return torch.nn.functional.l1_loss(student.map, target.to(student.map.dtype))
