"""CLIP-IQA (megasr/metrics/clipiqa.py): open_clip's RN50 layout, the attention pooling and the text tower against
independent computations (torch's MultiheadAttention, transformers' CLIPTextModelWithProjection), the score rule
against fixed expectations.

Catches: a key layout other than open_clip's (the published weights would not load), the positional embedding
added (CLIP-IQA drops it to score any image size), the prompts swapped (good must be first), softmax over the
batch instead of the two prompts, a missing logit scale, pooling the text at the wrong token, GELU instead of
QuickGELU, a missing file that crashes instead of one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megasr_training_fixtures import tiny_tokenizer
from metric_fixtures import CLIP_EMBED, CLIP_TEXT_LAYERS, CLIP_TEXT_WIDTH, tiny_open_clip_state, write_tiny_clip_parts

from megasr.metrics import MetricUnavailable, build_metric_file, compute_metrics
from megasr.metrics import clipiqa as C


def test_rn50_layout_is_open_clips() -> None:
    sd = C.ModifiedResNet(**C.RN50).state_dict()
    expect = {
        "conv1.weight": (32, 3, 3, 3),
        "bn3.running_var": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),  # inplanes 64 != 256: a projection, no pool params
        "layer2.0.downsample.1.weight": (512,),
        "layer3.5.conv2.weight": (256, 256, 3, 3),
        "layer4.2.bn3.weight": (2048,),
        "attnpool.positional_embedding": (50, 2048),
        "attnpool.q_proj.weight": (2048, 2048),
        "attnpool.c_proj.weight": (1024, 2048),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert "layer1.1.downsample.0.weight" not in sd and "layer4.3.conv1.weight" not in sd
    blocks = {".".join(k.split(".")[:2]) for k in sd if k.startswith("layer")}
    assert len(blocks) == 3 + 4 + 6 + 3


def test_attention_pool_equals_torch_multihead_attention_without_positions() -> None:
    torch.manual_seed(0)
    pool = C.AttentionPool(tokens=10, dim=16, heads=4, output_dim=8)
    for p in pool.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 16, 3, 3)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]))
        mha.out_proj.weight.copy_(pool.c_proj.weight[:, :16] if pool.c_proj.weight.shape[0] == 16 else torch.eye(16))
        mha.out_proj.bias.zero_()
        tokens = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1)  # the mean token first, no positions
        attended = mha(tokens[:, :1], tokens, tokens, need_weights=False)[0][:, 0]
        expected = F.linear(attended, pool.c_proj.weight, pool.c_proj.bias)
        assert torch.allclose(pool(x), expected, atol=1e-5)
        pool.positional_embedding.normal_()  # not used: CLIP-IQA scores any image size
        assert torch.allclose(pool(x), expected, atol=1e-5)


def test_text_tower_equals_transformers_clip_text_model() -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    state = tiny_open_clip_state()
    tok = tiny_tokenizer()
    cfg = CLIPTextConfig(
        vocab_size=len(tok), hidden_size=CLIP_TEXT_WIDTH, intermediate_size=4 * CLIP_TEXT_WIDTH,
        num_hidden_layers=CLIP_TEXT_LAYERS, num_attention_heads=CLIP_TEXT_WIDTH // 64, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=CLIP_EMBED, eos_token_id=tok.eos_token_id, bos_token_id=0,
        pad_token_id=tok.pad_token_id, layer_norm_eps=1e-5,
    )  # fmt: skip
    model = CLIPTextModelWithProjection(cfg).eval()
    hf = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
    }
    for i in range(CLIP_TEXT_LAYERS):
        p, q = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for n, (w, b) in zip(
            ("q", "k", "v"),
            zip(state[p + "attn.in_proj_weight"].chunk(3), state[p + "attn.in_proj_bias"].chunk(3), strict=True),
            strict=True,
        ):
            hf[q + f"self_attn.{n}_proj.weight"], hf[q + f"self_attn.{n}_proj.bias"] = w, b
        hf[q + "self_attn.out_proj.weight"] = state[p + "attn.out_proj.weight"]
        hf[q + "self_attn.out_proj.bias"] = state[p + "attn.out_proj.bias"]
        for a, b in (
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            hf[q + f"{b}.weight"], hf[q + f"{b}.bias"] = state[p + f"{a}.weight"], state[p + f"{a}.bias"]
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not [k for k in missing if "position_ids" not in k] and not unexpected
    ids = tok(list(C.PROMPTS) + ["clean cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).text_embeds
        got = C.encode_text(state, ids, tok.eos_token_id, heads=CLIP_TEXT_WIDTH // 64)
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # the two prompts differ


def _metric(prompts: torch.Tensor) -> C.CLIPIQA:
    torch.manual_seed(0)
    return C.CLIPIQA(C.ModifiedResNet(layers=(1, 1, 1, 1), width=8, heads=4, output_dim=CLIP_EMBED), prompts)


def test_score_is_the_good_prompts_softmax_probability_at_scale_100() -> None:
    img = torch.rand(3, 3, 64, 48)
    probe = _metric(torch.eye(2, CLIP_EMBED))
    mean = torch.tensor(C.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(C.CLIP_STD).view(1, 3, 1, 1)
    feats = F.normalize(probe.visual((img - mean) / std), dim=-1)
    f0 = feats[0]
    good = _metric(torch.stack([f0, -f0]))(img)
    assert good[0] == pytest.approx(1.0, abs=1e-6)  # softmax(100 * [1, -1])
    bad = _metric(torch.stack([-f0, f0]))(img)
    assert bad[0] == pytest.approx(0.0, abs=1e-6)
    # per image, over the two prompts: exp(100 c_good) / (exp(100 c_good) + exp(100 c_bad))
    g, b = F.normalize(torch.randn(CLIP_EMBED), dim=0), F.normalize(torch.randn(CLIP_EMBED), dim=0)
    scores = _metric(torch.stack([g, b]))(img)
    expected = torch.sigmoid(100 * (feats @ g - feats @ b))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_build_from_open_clip_parts_and_score_through_the_registry(tmp_path: Path) -> None:
    parts = write_tiny_clip_parts(tmp_path / "parts")
    folder = tmp_path / "metrics"
    out = build_metric_file("clipiqa", parts, folder / "clipiqa_rn50.safetensors")
    metric = C.load_clipiqa(out)
    tok = tiny_tokenizer()
    state = tiny_open_clip_state()
    ids = tok(list(C.PROMPTS), padding="max_length", max_length=77, return_tensors="pt").input_ids
    expect = F.normalize(C.encode_text(state, ids, tok.eos_token_id, heads=2), dim=-1)
    assert torch.allclose(metric.prompts, expect, atol=1e-5)
    img = torch.rand(2, 3, 96, 64)
    res = compute_metrics(["clipiqa"], img, folders=[folder])
    assert not res.skipped and all(0.0 < v < 1.0 for v in res.values["clipiqa"])
    assert res.values["clipiqa"] == pytest.approx([float(v) for v in metric(img)], abs=1e-6)


def test_missing_file_and_small_image_are_one_line(tmp_path: Path) -> None:
    res = compute_metrics(["clipiqa"], torch.rand(1, 3, 64, 64), folders=[tmp_path])
    assert "clipiqa_rn50.safetensors" in res.skipped["clipiqa"] and "fetch --eval" in res.skipped["clipiqa"]
    parts = write_tiny_clip_parts(tmp_path / "parts")
    build_metric_file("clipiqa", parts, tmp_path / "m" / "clipiqa_rn50.safetensors")
    small = compute_metrics(["clipiqa"], torch.rand(1, 3, 16, 64), folders=[tmp_path / "m"])
    assert "at least 32 x 32" in small.skipped["clipiqa"]
    with pytest.raises(MetricUnavailable, match="not a CLIP-IQA file"):
        C.load_clipiqa(parts[0])  # the open_clip file itself has no prompt features


def test_tokenizer_files_that_do_not_tokenize_the_prompts_are_refused(tmp_path: Path) -> None:
    """A vocabulary that maps the prompts to unknown tokens would give both prompts one feature: refused."""
    parts = write_tiny_clip_parts(tmp_path / "parts")
    parts[1].write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1, "x": 2}', encoding="utf-8")
    parts[2].write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(MetricUnavailable, match="do not tokenize the prompts"):
        build_metric_file("clipiqa", parts, tmp_path / "clipiqa_rn50.safetensors")
    assert not (tmp_path / "clipiqa_rn50.safetensors").exists()
