"""LPIPS (Zhang et al., CVPR 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
version 0.1, written from the paper, with the state-dict layout of the published ``lpips`` package (BSD-2-Clause)
so its weights load unchanged:

- ``net.slice{1..5}.{i}.weight|bias``: the backbone's convolutions, ``i`` being the layer's index in torchvision's
  ``alexnet().features`` / ``vgg16().features`` (BSD-3-Clause weights);
- ``lin{0..4}.model.1.weight``: the learned 1x1 channel weights [1, C, 1, 1] (``model.0`` is a dropout);
- ``scaling_layer.shift|scale``: the input normalisation buffers (optional in a file: they are constants).

Distance: inputs in 0..1 are mapped to -1..1, normalised by the scaling layer, each of five feature maps is
unit-normalised along channels, the squared difference weighted by ``lin``, averaged over space and summed over
the five layers. Lower is better; identical images give 0.

A weight file holding only the ``lin`` layers (the package's ``weights/v0.1/alex.pth``) is combined with
torchvision's AlexNet file by ``combine_parts``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..files import read_state_dict

#: Backbone layers per network: (index in torchvision's ``features``, layer); slices end after these indices.
_ALEX = [
    (0, ("conv", 3, 64, 11, 4, 2)),
    (1, ("relu",)),
    (2, ("pool",)),
    (3, ("conv", 64, 192, 5, 1, 2)),
    (4, ("relu",)),
    (5, ("pool",)),
    (6, ("conv", 192, 384, 3, 1, 1)),
    (7, ("relu",)),
    (8, ("conv", 384, 256, 3, 1, 1)),
    (9, ("relu",)),
    (10, ("conv", 256, 256, 3, 1, 1)),
    (11, ("relu",)),
]
_ALEX_SLICE_ENDS = (1, 4, 7, 9, 11)
_ALEX_CHANNELS = (64, 192, 384, 256, 256)


def _vgg16_layers() -> list[tuple[int, tuple]]:
    plan = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    out: list[tuple[int, tuple]] = []
    i, cin = 0, 3
    for v in plan:
        if v == "M":
            out.append((i, ("pool2",)))
            i += 1
        else:
            out += [(i, ("conv", cin, v, 3, 1, 1)), (i + 1, ("relu",))]
            cin, i = v, i + 2
    return out


_VGG = _vgg16_layers()
_VGG_SLICE_ENDS = (3, 8, 15, 22, 29)
_VGG_CHANNELS = (64, 128, 256, 512, 512)

NETS = {
    "alex": (_ALEX, _ALEX_SLICE_ENDS, _ALEX_CHANNELS),
    "vgg": (_VGG, _VGG_SLICE_ENDS, _VGG_CHANNELS),
}
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def _layer(spec: tuple) -> nn.Module:
    if spec[0] == "conv":
        _, cin, cout, k, s, p = spec
        return nn.Conv2d(cin, cout, k, stride=s, padding=p)
    if spec[0] == "relu":
        return nn.ReLU(inplace=False)
    if spec[0] == "pool":
        return nn.MaxPool2d(3, stride=2)
    return nn.MaxPool2d(2, stride=2)


class _Backbone(nn.Module):
    def __init__(self, net: str) -> None:
        super().__init__()
        layers, ends, _ = NETS[net]
        start = 0
        for n, end in enumerate(ends, start=1):
            seq = nn.Sequential()
            for idx, spec in layers:
                if start <= idx <= end:
                    seq.add_module(str(idx), _layer(spec))
            setattr(self, f"slice{n}", seq)
            start = end + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for n in range(1, 6):
            x = getattr(self, f"slice{n}")(x)
            feats.append(x)
        return feats


class _ScalingLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class _Lin(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 distance; ``forward(image, reference)`` takes [B, 3, H, W] in 0..1 and returns [B]."""

    def __init__(self, net: str = "alex") -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"net must be one of {list(NETS)}, got {net!r}")
        self.net_name = net
        self.scaling_layer = _ScalingLayer()
        self.net = _Backbone(net)
        for i, c in enumerate(NETS[net][2]):
            setattr(self, f"lin{i}", _Lin(c))
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        f1 = self.net(self.scaling_layer(image * 2 - 1))
        f2 = self.net(self.scaling_layer(reference * 2 - 1))
        total = image.new_zeros(image.shape[0])
        for i, (a, b) in enumerate(zip(f1, f2, strict=True)):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = getattr(self, f"lin{i}").model[1]((a - b) ** 2)
            total = total + d.mean(dim=(1, 2, 3))
        return total


def combine_parts(lin: Mapping[str, torch.Tensor], torchvision_features: Mapping[str, torch.Tensor], net: str = "alex"):
    """The full LPIPS state dict from the package's lin-only file and torchvision's backbone file
    (``features.{i}.weight`` -> ``net.slice{n}.{i}.weight``); classifier keys are dropped."""
    ends = NETS[net][1]
    out = {k: v for k, v in lin.items() if k.startswith("lin")}
    for k, v in torchvision_features.items():
        if not k.startswith("features."):
            continue
        idx = int(k.split(".")[1])
        n = next(i for i, end in enumerate(ends, start=1) if idx <= end)
        out[f"net.slice{n}.{k[len('features.') :]}"] = v
    return out


def load_lpips(path: str | Path, net: str | None = None) -> LPIPS:
    """An LPIPS model from a full state dict in the published layout (safetensors, or a ``.pth`` read with
    ``weights_only=True``); the net (alex/vgg) is read from the keys unless given. Wrong files raise
    ``MetricUnavailable`` with one line."""
    from . import MetricUnavailable

    path = Path(path)
    try:
        sd = read_state_dict(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise MetricUnavailable(f"'{path}' could not be read ({type(err).__name__}: {err})") from err
    if net is None:
        net = "vgg" if "net.slice1.2.weight" in sd else "alex"
    model = LPIPS(net)
    own = model.state_dict()
    optional = {"scaling_layer.shift", "scaling_layer.scale"}
    missing = sorted(k for k in own if k not in sd and k not in optional)
    unexpected = sorted(k for k in sd if k not in own)
    if missing or unexpected:
        hint = " (only the lin layers? combine them with the backbone: megasr.metrics.lpips.combine_parts)" * bool(
            missing and all(k.startswith("net.") for k in missing)
        )
        raise MetricUnavailable(
            f"'{path}' is not an LPIPS-{net} state dict: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}{hint}"
        )
    bad = [k for k in sd if sd[k].shape != own[k].shape]
    if bad:
        raise MetricUnavailable(f"'{path}': wrong shapes for {bad[:3]}")
    model.load_state_dict({**own, **sd})
    return model


def write_combined(lin_path: str | Path, backbone_path: str | Path, output: str | Path, net: str = "alex") -> Path:
    """Write the one LPIPS file the metrics read (safetensors, atomic) from the package's lin weights and
    torchvision's backbone (both read with ``weights_only=True``); the result is loaded back as a check."""
    from safetensors.torch import save_file

    from ..files import atomic_write

    full = combine_parts(read_state_dict(lin_path), read_state_dict(backbone_path), net)
    full = {k: v.contiguous() for k, v in full.items()}
    atomic_write(output, lambda tmp: save_file(full, tmp, metadata={"megasr.component": f"metric_lpips_{net}"}))
    load_lpips(output, net)  # refuses a file that does not fit
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    """``python -m megasr.metrics.lpips --lin alex.pth --backbone alexnet-owt-7be5be79.pth --output FILE``:
    write the one LPIPS file the metrics read, from the package's lin weights and torchvision's backbone."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megasr.metrics.lpips", description=main.__doc__)
    p.add_argument("--lin", type=Path, required=True, help="lpips package weights/v0.1/<net>.pth (BSD-2-Clause)")
    p.add_argument("--backbone", type=Path, required=True, help="torchvision alexnet/vgg16 weights (BSD-3-Clause)")
    p.add_argument("--net", choices=list(NETS), default="alex")
    p.add_argument(
        "--output", type=Path, required=True, help="e.g. ComfyUI/models/megasr/metrics/lpips_alex.safetensors"
    )
    args = p.parse_args(argv)
    write_combined(args.lin, args.backbone, args.output, args.net)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
