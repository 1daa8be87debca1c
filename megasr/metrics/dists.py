"""DISTS (Ding et al., TPAMI 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity"), written
from the paper, with the state-dict layout of the authors' ``DISTS_pytorch`` package (MIT) so its weights load:

- ``stage{1..5}.{i}.weight|bias``: torchvision VGG16 ``features`` convolutions (index kept, BSD-3-Clause weights),
  with each max-pool replaced by an L2 pooling (``stage{2..5}.{i}.filter``: a 3x3 Hann window, stride 2);
- ``mean``, ``std``: ImageNet normalisation buffers; ``alpha``, ``beta`` [1, 1475, 1, 1]: the learned weights of the
  texture (mean) and structure (covariance) terms over the input's 3 channels and the five stages' channels.

Distance: ``1 - sum_k sum_c (alpha_kc S1_kc + beta_kc S2_kc)`` with alpha and beta normalised to sum 1 together,
S1 = (2 mu_x mu_y + c) / (mu_x^2 + mu_y^2 + c), S2 = (2 cov_xy + c) / (var_x + var_y + c), c = 1e-6, statistics
over the whole feature map. Lower is better; equal images give 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = (3, 64, 128, 256, 512, 512)
#: torchvision vgg16 ``features`` indices per stage (the pool that opens stages 2..5 becomes an L2 pooling)
STAGES = ((0, 3), (4, 8), (9, 15), (16, 22), (23, 29))
_POOLS = (4, 9, 16, 23)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
EPS = 1e-6


class L2Pooling(nn.Module):
    """sqrt(Hann-weighted mean of x^2), stride 2: an anti-aliased replacement of max pooling."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)  # np.hanning(5) without its zero ends
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum()).float()[None, None].repeat(channels, 1, 1, 1))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=self.channels)
        return (out + 1e-12).sqrt()


def _conv_plan() -> dict[int, tuple[int, int]]:
    plan, cin, i = {}, 3, 0
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
        if v == "M":
            i += 1
        else:
            plan[i] = (cin, v)
            cin, i = v, i + 2
    return plan


class DISTS(nn.Module):
    """``forward(image, reference)``: [B, 3, H, W] in 0..1 -> [B] distance."""

    def __init__(self) -> None:
        super().__init__()
        convs = _conv_plan()
        for n, (lo, hi) in enumerate(STAGES, start=1):
            seq = nn.Sequential()
            for idx in range(lo, hi + 1):
                if idx in _POOLS:
                    seq.add_module(str(idx), L2Pooling(convs[idx - 2][1]))
                elif idx in convs:
                    seq.add_module(str(idx), nn.Conv2d(*convs[idx], 3, padding=1))
                else:
                    seq.add_module(str(idx), nn.ReLU())
            setattr(self, f"stage{n}", seq)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.alpha = nn.Parameter(torch.full((1, sum(CHANNELS), 1, 1), 0.1))
        self.beta = nn.Parameter(torch.full((1, sum(CHANNELS), 1, 1), 0.1))
        self.eval().requires_grad_(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [x]
        h = (x - self.mean) / self.std
        for n in range(1, 6):
            h = getattr(self, f"stage{n}")(h)
            feats.append(h)
        return feats

    def forward(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        fx, fy = self.features(image), self.features(reference)
        total = self.alpha.sum() + self.beta.sum()
        alphas = torch.split(self.alpha / total, list(CHANNELS), dim=1)
        betas = torch.split(self.beta / total, list(CHANNELS), dim=1)
        score = image.new_zeros(image.shape[0])
        for x, y, a, b in zip(fx, fy, alphas, betas, strict=True):
            mx, my = x.mean(dim=(2, 3), keepdim=True), y.mean(dim=(2, 3), keepdim=True)
            s1 = (2 * mx * my + EPS) / (mx**2 + my**2 + EPS)
            vx = ((x - mx) ** 2).mean(dim=(2, 3), keepdim=True)
            vy = ((y - my) ** 2).mean(dim=(2, 3), keepdim=True)
            cov = (x * y).mean(dim=(2, 3), keepdim=True) - mx * my
            s2 = (2 * cov + EPS) / (vx + vy + EPS)
            score = score + (a * s1 + b * s2).sum(dim=(1, 2, 3))
        return 1 - score


def combine_parts(alpha_beta: Mapping[str, torch.Tensor], torchvision_vgg16: Mapping[str, torch.Tensor]) -> dict:
    """The full DISTS state dict from the package's ``weights.pt`` (alpha, beta) and torchvision's VGG16 file."""
    out = {k: alpha_beta[k] for k in ("alpha", "beta")}
    for k, v in torchvision_vgg16.items():
        if not k.startswith("features."):
            continue
        idx = int(k.split(".")[1])
        n = next(i for i, (lo, hi) in enumerate(STAGES, start=1) if lo <= idx <= hi)
        out[f"stage{n}.{k[len('features.') :]}"] = v
    return out


def load_dists(path: str | Path) -> DISTS:
    """A DISTS model from a state dict in the package's layout (buffers ``mean``/``std``/``filter`` optional)."""
    from ..files import read_state_dict
    from . import MetricUnavailable

    path = Path(path)
    try:
        sd = read_state_dict(path)
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise MetricUnavailable(f"'{path}' could not be read ({type(err).__name__}: {err})") from err
    model = DISTS()
    own = model.state_dict()
    buffers = {k for k, _ in model.named_buffers()}
    missing = sorted(k for k in own if k not in sd and k not in buffers)
    unexpected = sorted(k for k in sd if k not in own)
    bad = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise MetricUnavailable(
            f"'{path}' is not a DISTS state dict: {len(missing)} missing key(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]}, wrong shapes {bad[:3]}"
        )
    model.load_state_dict({**own, **sd})
    return model


def write_combined(weights_path: str | Path, backbone_path: str | Path, output: str | Path) -> Path:
    """Write the one DISTS file the metrics read (safetensors, atomic) from the package's alpha/beta and
    torchvision's VGG16 (both read with ``weights_only=True``); the result is loaded back as a check."""
    from safetensors.torch import save_file

    from ..files import atomic_write, read_state_dict

    parts = combine_parts(read_state_dict(weights_path), read_state_dict(backbone_path))
    full = {k: v.contiguous() for k, v in parts.items()}
    atomic_write(output, lambda tmp: save_file(full, tmp, metadata={"megasr.component": "metric_dists"}))
    load_dists(output)
    return Path(output)


def main(argv: list[str] | None = None) -> int:
    """``python -m megasr.metrics.dists --weights weights.pt --backbone vgg16-397923af.pth --output FILE``: the one
    DISTS file the metrics read, from the package's alpha/beta and torchvision's VGG16 (both weights_only)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megasr.metrics.dists", description=main.__doc__)
    p.add_argument("--weights", type=Path, required=True, help="DISTS_pytorch weights.pt (alpha, beta; MIT)")
    p.add_argument("--backbone", type=Path, required=True, help="torchvision vgg16 weights (BSD-3-Clause)")
    p.add_argument(
        "--output", type=Path, required=True, help="e.g. ComfyUI/models/megasr/metrics/dists_vgg16.safetensors"
    )
    args = p.parse_args(argv)
    write_combined(args.weights, args.backbone, args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
