"""DAGE CLIP image semantics: ViT-H/14 layout (tiny width), LoRA r=8 except the last layer,
weight deltas for ComfyUI weight patches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from dage_fixtures import TINY_CLIP_CONFIG, tiny_clip, write_dage_weight_files

from megasr.dage import dage_loss, load_extractor
from megasr.dage.clip import (
    CLIP_VIT_H14_CONFIG,
    ClipExtractor,
    build_clip_config,
    check_clip_lora_fits,
    clip_lora_comfy_deltas,
    clip_lora_state,
    clip_lora_to_weight_deltas,
    clip_preprocess,
    comfy_clip_vision_key,
    hf_clip_vision_key,
    openclip_to_hf_vision,
)
from megasr.errors import WeightFileError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMFY = os.path.join(REPO, ".comfyui", "ComfyUI")
N_LAYERS = TINY_CLIP_CONFIG["clip"]["num_hidden_layers"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()[0]


def test_penultimate_tokens_any_size_batch2(clip):
    x = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = clip(x)
    assert out.map.shape == (2, 257, 32) and torch.isfinite(out.map).all()
    assert len(out.features) == N_LAYERS - 1
    assert torch.equal(out.features[-1], out.map)
    with torch.no_grad():
        assert torch.allclose(clip(x[1:]).map, out.map[1:], atol=1e-5)


def test_lora_everywhere_but_the_last_layer(clip):
    trainable = [n for n, p in clip.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    layers = {int(n.split("encoder.layers.")[1].split(".")[0]) for n in trainable}
    assert layers == set(range(N_LAYERS - 1))
    projs = {n.split("self_attn.")[1].split(".")[0] for n in trainable}
    assert projs == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert all(v.shape[0] == 8 for k, v in clip_lora_state(clip).items() if k.endswith("lora_A.weight"))
    # every LoRA parameter gets a gradient from the penultimate state
    student, _ = tiny_clip(seed=0)
    teacher, _ = tiny_clip(seed=0, lora_nonzero=False)
    teacher.requires_grad_(False)
    hr = torch.rand(1, 3, 30, 40)
    dage_loss("clip", student(hr * 0.7), teacher(hr))["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if p.requires_grad)


def test_deltas_on_a_plain_copy_reproduce_the_peft_model(clip):
    from transformers import CLIPVisionModel

    plain = CLIPVisionModel(build_clip_config(TINY_CLIP_CONFIG["clip"])).eval()
    plain.load_state_dict(clip.base_state())
    deltas = clip_lora_to_weight_deltas(clip_lora_state(clip), clip.file_config())
    assert all(k.startswith("encoder.layers.") and k.endswith("_proj.weight") for k in deltas)
    assert len(deltas) == 4 * (N_LAYERS - 1)
    with torch.no_grad():
        for k, d in deltas.items():
            plain.get_parameter(k).add_(d)
        x = clip_preprocess(torch.rand(2, 3, 50, 31))
        ref = clip.model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        got = plain(pixel_values=x, output_hidden_states=True).hidden_states[-2]
    assert (ref - got).abs().max() < 1e-5


def test_comfy_keys():
    assert (
        comfy_clip_vision_key("encoder.layers.3.self_attn.q_proj.weight")
        == "vision_model.encoder.layers.3.self_attn.q_proj.weight"
    )
    assert comfy_clip_vision_key("pre_layrnorm.weight") == "vision_model.pre_layrnorm.weight"
    assert comfy_clip_vision_key("vision_model.post_layernorm.bias") == "vision_model.post_layernorm.bias"
    assert hf_clip_vision_key("vision_model.embeddings.class_embedding") == "embeddings.class_embedding"
    assert hf_clip_vision_key("visual_projection.weight") is None


def test_weight_file_round_trip_onto_comfy_clip_vision_file(tmp_path, clip):
    paths = write_dage_weight_files(str(tmp_path), ("dage_clip_lora",))
    loaded = load_extractor(paths["dage_clip_lora"], base_path=paths["clip_vision"])
    assert isinstance(loaded, ClipExtractor)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).map, clip(x).map)
    deltas, cfg = clip_lora_comfy_deltas(paths["dage_clip_lora"])
    assert all(k.startswith("vision_model.encoder.layers.") for k in deltas)
    from safetensors.torch import load_file

    shapes = load_file(paths["clip_vision"])
    check_clip_lora_fits(deltas, shapes, paths["dage_clip_lora"])
    wrong = {k: torch.zeros(5, 5) for k in shapes if k.endswith("q_proj.weight")}
    with pytest.raises(WeightFileError, match="does not fit the CLIP vision model"):
        check_clip_lora_fits(deltas, wrong, paths["dage_clip_lora"])


def test_openclip_layout_converts(tmp_path, clip):
    """An OpenCLIP-format visual tower (in_proj packed q/k/v) loads to the same model."""
    from safetensors.torch import save_file

    base = clip.base_state()
    oc = {
        "visual.class_embedding": base["embeddings.class_embedding"],
        "visual.conv1.weight": base["embeddings.patch_embedding.weight"],
        "visual.positional_embedding": base["embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": base["pre_layrnorm.weight"],
        "visual.ln_pre.bias": base["pre_layrnorm.bias"],
        "visual.ln_post.weight": base["post_layernorm.weight"],
        "visual.ln_post.bias": base["post_layernorm.bias"],
    }
    for i in range(N_LAYERS):
        p = f"encoder.layers.{i}."
        r = f"visual.transformer.resblocks.{i}."
        for leaf in ("weight", "bias"):
            oc[r + "attn.in_proj_" + leaf] = torch.cat([base[p + f"self_attn.{n}_proj.{leaf}"] for n in "qkv"])
            oc[r + "attn.out_proj." + leaf] = base[p + "self_attn.out_proj." + leaf]
            oc[r + "ln_1." + leaf] = base[p + "layer_norm1." + leaf]
            oc[r + "ln_2." + leaf] = base[p + "layer_norm2." + leaf]
            oc[r + "mlp.c_fc." + leaf] = base[p + "mlp.fc1." + leaf]
            oc[r + "mlp.c_proj." + leaf] = base[p + "mlp.fc2." + leaf]
    assert set(openclip_to_hf_vision(oc)) == set(base)
    path = str(tmp_path / "openclip.safetensors")
    save_file({k: v.contiguous() for k, v in oc.items()}, path)
    m = ClipExtractor.from_base(path, TINY_CLIP_CONFIG["clip"], TINY_CLIP_CONFIG["lora"]).eval()
    m.set_lora_state(clip.lora_state())
    x = torch.rand(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.allclose(m(x).map, clip(x).map, atol=1e-6)


def test_real_vit_h14_config():
    cfg = build_clip_config(CLIP_VIT_H14_CONFIG)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        1280,
        32,
        16,
        5120,
    )
    assert (cfg.image_size // cfg.patch_size) ** 2 + 1 == 257
    comfy_cfg = os.path.join(COMFY, "comfy", "clip_vision_config_h.json")
    if os.path.isfile(comfy_cfg):
        ref = json.load(open(comfy_cfg))
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "patch_size",
            "image_size",
        ):
            assert CLIP_VIT_H14_CONFIG[k] == ref[k]


@pytest.mark.skipif(
    not os.path.isdir(os.path.join(COMFY, "comfy")), reason="ComfyUI tree not installed (scripts/setup.sh)"
)
def test_comfy_clip_vision_with_delta_patches_matches(tmp_path, clip):
    """ComfyUI's own CLIPVisionModelProjection + clip_preprocess, weights from our key map and the
    LoRA deltas added, gives our penultimate tokens (run in a subprocess: no ComfyUI import here)."""
    from safetensors.torch import save_file

    base = {comfy_clip_vision_key(k): v.contiguous() for k, v in clip.base_state().items()}
    deltas = {
        comfy_clip_vision_key(k): v.contiguous()
        for k, v in clip_lora_to_weight_deltas(clip_lora_state(clip), clip.file_config()).items()
    }
    img = torch.rand(2, 45, 61, 3, generator=torch.Generator().manual_seed(5))
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(deltas, str(tmp_path / "deltas.safetensors"))
    save_file({"img": img}, str(tmp_path / "img.safetensors"))
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {COMFY!r})
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.clip_model, comfy.clip_vision, comfy.ops
        from safetensors.torch import load_file, save_file
        cfg = dict({TINY_CLIP_CONFIG["clip"]!r}, num_channels=3, model_type="clip_vision_model")
        m = comfy.clip_model.CLIPVisionModelProjection(cfg, torch.float32, "cpu", comfy.ops.manual_cast)
        sd = load_file({str(tmp_path / "base.safetensors")!r})
        for k, d in load_file({str(tmp_path / "deltas.safetensors")!r}).items():
            sd[k] = sd[k] + d
        missing, unexpected = m.load_state_dict(sd, strict=False)
        assert [k for k in missing if not k.startswith("visual_projection")] == [] and unexpected == [], (missing, unexpected)
        img = load_file({str(tmp_path / "img.safetensors")!r})["img"]
        px = comfy.clip_vision.clip_preprocess(img, size=224)
        out = m(pixel_values=px, intermediate_output=-2)
        save_file({{"pen": out[1].contiguous(), "px": px.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    res = load_file(str(tmp_path / "out.safetensors"))
    ours_px = clip_preprocess(img.movedim(-1, 1))
    assert (ours_px - res["px"]).abs().max() < 1e-5
    with torch.no_grad():
        ours = clip(img.movedim(-1, 1)).map
    assert (ours - res["pen"]).abs().max() < 1e-4
