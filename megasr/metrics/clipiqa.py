"""CLIP-IQA (Wang, Chan, Loy, AAAI 2023, "Exploring CLIP for Assessing the Look and Feel of Images"), the
variant IQA-PyTorch's ``clipiqa`` (the MegaSR paper's toolbox) computes, written from the paper:

- CLIP ResNet-50 (OpenAI weights) image tower at the image's own size: the attention pooling's positional
  embedding is left out (it only exists for 224 px), inputs normalised with CLIP's mean and std;
- the antonym prompts "Good photo." / "Bad photo." through CLIP's text tower;
- score = softmax(100 * cos(image, [good, bad]))[good]: 0..1, higher is better.

Layout: the image tower is open_clip's ``ModifiedResNet`` (``visual.*`` keys of the OpenAI RN50 checkpoint as
``timm/resnet50_clip.openai`` publishes it: three stem convolutions, bottlenecks with an average pool before
strided convolutions, ``attnpool.{q,k,v,c}_proj``). The text tower runs once, when ``python -m megasr fetch
--eval`` builds ``clipiqa_rn50.safetensors``: the file holds the image tower and the two prompts' unit features
(``prompt_features`` [2, D]), so scoring needs no tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PROMPTS = ("Good photo.", "Bad photo.")
LOGIT_SCALE = 100.0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RN50 = {"layers": (3, 4, 6, 3), "width": 64, "heads": 32, "output_dim": 1024}


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:  # an average pool, then a 1x1 convolution (keys "0", "1")
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride))
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class AttentionPool(nn.Module):
    """Multi-head attention of the mean token over all tokens; CLIP-IQA's variant: no positional embedding."""

    def __init__(self, tokens: int, dim: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(tokens, dim))  # kept for the layout, not used
        self.k_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        n, length, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, self.heads, c // self.heads).transpose(1, 2)

        q = split(self.q_proj(x[:, :1]))
        out = F.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(n, 1, c))[:, 0]


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower (``visual.*``): [N, 3, H, W] normalised -> [N, output_dim]."""

    def __init__(self, layers: Sequence[int], width: int, heads: int, output_dim: int, image_size: int = 224) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        inplanes = width
        for i, (blocks, mult) in enumerate(zip(layers, (1, 2, 4, 8), strict=True), start=1):
            planes = width * mult
            seq = [Bottleneck(inplanes, planes, 1 if i == 1 else 2)]
            inplanes = planes * 4
            seq += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            setattr(self, f"layer{i}", nn.Sequential(*seq))
        self.attnpool = AttentionPool((image_size // 32) ** 2 + 1, width * 32, heads, output_dim)
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.attnpool(x)


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def encode_text(state: Mapping[str, torch.Tensor], ids: torch.Tensor, eos_id: int, heads: int) -> torch.Tensor:
    """CLIP's text tower from an OpenAI/open_clip state dict (``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks.N.*``, ``ln_final``, ``text_projection``): token ids [N, L] -> [N, D], the final
    layer's feature at each sequence's first end-of-text token, projected. Causal attention, QuickGELU."""
    x = state["token_embedding.weight"][ids] + state["positional_embedding"][: ids.shape[1]]
    n, length, c = x.shape
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (c,), state[p + "ln_1.weight"], state[p + "ln_1.bias"])
        q, k, v = F.linear(h, state[p + "attn.in_proj_weight"], state[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, c // heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(n, length, c)
        x = x + F.linear(a, state[p + "attn.out_proj.weight"], state[p + "attn.out_proj.bias"])
        h = F.layer_norm(x, (c,), state[p + "ln_2.weight"], state[p + "ln_2.bias"])
        h = _quick_gelu(F.linear(h, state[p + "mlp.c_fc.weight"], state[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, state[p + "mlp.c_proj.weight"], state[p + "mlp.c_proj.bias"])
        i += 1
    x = F.layer_norm(x, (c,), state["ln_final.weight"], state["ln_final.bias"])
    eos = (ids == eos_id).int().argmax(dim=1)  # the first end-of-text token of each sequence
    return x[torch.arange(n), eos] @ state["text_projection"]


class CLIPIQA:
    """``CLIPIQA(visual, prompt_features)(image [B, 3, H, W] in 0..1, reference ignored) -> [B]``."""

    def __init__(self, visual: ModifiedResNet, prompt_features: torch.Tensor) -> None:
        self.visual = visual
        self.prompts = F.normalize(prompt_features.float(), dim=-1)

    def __call__(self, image: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        from . import MetricUnavailable

        if min(image.shape[-2:]) < 32:
            raise MetricUnavailable(f"CLIP-IQA needs an image of at least 32 x 32; it is {tuple(image.shape[-2:])}")
        mean = torch.tensor(CLIP_MEAN, device=image.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=image.device).view(1, 3, 1, 1)
        self.visual.to(image.device)
        feats = F.normalize(self.visual((image.float() - mean) / std), dim=-1)
        probs = (LOGIT_SCALE * feats @ self.prompts.to(image.device).T).softmax(dim=-1)
        return probs[:, 0]


def visual_config(state: Mapping[str, torch.Tensor]) -> dict:
    """The image tower's sizes read from its ``visual.*`` keys (RN50: layers 3-4-6-3, width 64, 32 heads)."""
    width = state["visual.conv3.weight"].shape[0]
    layers = tuple(len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{i}.")}) for i in range(1, 5))
    dim = width * 32
    heads = int(state["visual.attnpool.heads"]) if "visual.attnpool.heads" in state else max(1, dim // 64)
    return {
        "layers": layers,
        "width": width,
        "heads": heads,
        "output_dim": state["visual.attnpool.c_proj.weight"].shape[0],
    }


def load_clipiqa(path: str | Path) -> CLIPIQA:
    """The metric from ``clipiqa_rn50.safetensors`` (``visual.*``, ``prompt_features``); a wrong file is one line."""
    from ..files import read_state_dict
    from . import MetricUnavailable

    try:
        sd = read_state_dict(Path(path))
        cfg = visual_config(sd)
        tokens = sd["visual.attnpool.positional_embedding"].shape[0]
        model = ModifiedResNet(**cfg, image_size=int(round((tokens - 1) ** 0.5)) * 32)
        visual = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
        visual.pop("attnpool.heads", None)
        missing, unexpected = model.load_state_dict(visual, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        prompts = sd["prompt_features"]
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise MetricUnavailable(f"'{path}' is not a CLIP-IQA file ({type(err).__name__}: {err})") from err
    return CLIPIQA(model.float(), prompts)


def write_from_open_clip(parts: Sequence[Path], output: Path) -> Path:
    """Build ``clipiqa_rn50.safetensors`` from open_clip's ``open_clip_model.safetensors`` and the CLIP BPE
    tokenizer files (``vocab.json``, ``merges.txt``): the image tower as it is, the prompts encoded once."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTokenizer

    from ..files import atomic_write

    state = {k: v.float() for k, v in load_file(str(parts[0])).items()}
    vocab = json.loads(Path(parts[1]).read_text(encoding="utf-8"))
    lines = Path(parts[2]).read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#")]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    length = state["positional_embedding"].shape[0]
    ids = tok(list(PROMPTS), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    words = tok(list(PROMPTS)).input_ids
    if any(tok.unk_token_id in w[1:-1] for w in words) or words[0] == words[1]:  # CLIP's unk is its end token
        raise ValueError(f"the tokenizer files {parts[1].name}, {parts[2].name} do not tokenize the prompts {PROMPTS}")
    width = state["ln_final.weight"].shape[0]
    with torch.no_grad():
        feats = encode_text(state, ids, tok.eos_token_id, heads=max(1, width // 64))
    out = {k: v.contiguous() for k, v in state.items() if k.startswith("visual.")}
    cfg = visual_config(state)
    out["visual.attnpool.heads"] = torch.tensor(cfg["heads"])
    out["prompt_features"] = F.normalize(feats, dim=-1).contiguous()
    atomic_write(output, lambda tmp: save_file(out, tmp, metadata={"megasr.component": "metric_clipiqa_rn50"}))
    load_clipiqa(output)
    return Path(output)
