"""The MegaSR workflows take their positive prompt from DAPE-equipped RAM (issue 25, as the paper does): the RAM
Tags node's prompt drives the positive text encoder, the negative stays SeeSR's fixed text, and RAM's tokens reach
CISM² (read only by a model with SeeSR's representation branch; the tiny MegaSR file here has none and still runs).
Real ComfyUI 0.3.75 executor, tiny generated files (tests/fixtures/megasr_fixtures.py, seesr_fixtures.py)."""

from __future__ import annotations

import pytest
import torch
from harness.workflow import find_nodes
from megasr_fixtures import megasr_env, prompt

WITH_PROMPT = ("megasr_x4", "megasr_swap_guidance", "megasr_large_tiled", "megasr_compare")
SUFFIX = "clean, high-resolution, 8k"


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _source(p: dict, node_id: str, name: str) -> str:
    value = p[node_id]["inputs"][name]
    assert isinstance(value, list), f"{p[node_id]['class_type']}.{name} is not linked: {value!r}"
    return value[0]


@pytest.mark.parametrize("name", WITH_PROMPT)
def test_ram_tags_feed_the_positive_text_and_not_the_negative(env, name):
    """Follows the links back from the MS-GAM Guidance Fusion's positive and negative inputs: the positive is a CLIP
    Text Encode of the RAM Tags node's prompt (output 0) of the LR image, the negative a fixed text; RAM's tokens
    (output 2) go to CISM². Fails when the tags are wired to the negative, to the wrong output, or not at all."""
    p = prompt(env, name)
    (fusion,) = find_nodes(p, "MegaSRGuidanceFusion")
    (tags,) = find_nodes(p, "MegaSRRamTags")
    (cism,) = find_nodes(p, "MegaSRCismInjection")
    pos, neg = _source(p, fusion, "positive"), _source(p, fusion, "negative")
    assert p[pos]["class_type"] == p[neg]["class_type"] == "CLIPTextEncode"
    assert p[pos]["inputs"]["text"] == [tags, 0]
    assert p[neg]["inputs"]["text"] == "dotted, noise, blur, lowres, smooth"
    assert p[cism]["inputs"]["ram_semantics"] == [tags, 2]
    assert p[tags]["inputs"]["image"] == p[fusion]["inputs"]["lr_image"]  # the LR image is what RAM tags
    assert p[tags]["inputs"]["suffix"] == SUFFIX  # SeeSR's added prompt


def _run(env, **overrides) -> tuple[torch.Tensor, str]:
    """(the sampler's latent, the prompt the RAM Tags node shows) of megasr_x4 at cfg 1 (positive only)."""
    import folder_paths
    import safetensors.torch

    base = {"MegaSRSampler.seed": 3, "MegaSRSampler.cfg": 1.0, "SaveImage.filename_prefix": "ramprompt"}
    p = prompt(env, "megasr_x4", **{**base, **overrides})
    (sampler,) = find_nodes(p, "MegaSRSampler")
    (tags,) = find_nodes(p, "MegaSRRamTags")
    p["latent_out"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 1], "filename_prefix": "ramprompt"}}
    result = env[0].run(p)
    (f,) = result.outputs["latent_out"]["latents"]
    path = f"{folder_paths.get_output_directory()}/{f.get('subfolder', '')}/{f['filename']}"
    latent = safetensors.torch.load_file(path)["latent_tensor"].float()
    return latent, "".join(result.outputs[tags]["text"])


def test_editing_the_ram_tags_changes_the_result_and_the_negative_does_not_at_cfg_1(env):
    """At cfg 1 only the positive conditioning shapes the result. Excluding RAM's first tag (and adding a word)
    changes the shown prompt exactly there and the latent; editing the negative text changes nothing; the same
    graph twice gives the same latent. If the tags fed the negative, the tag edit would change nothing here."""
    base, shown = _run(env)
    assert shown.endswith(", ," + SUFFIX)
    tags = shown[: -len(", ," + SUFFIX)].split(", ")
    assert tags and tags[0], "the tiny RAM gives the LR image no tag: the test no longer exercises the tags"
    again, _ = _run(env)
    torch.testing.assert_close(again, base, atol=0, rtol=0)

    same, _ = _run(env, **{"Negative.text": "a completely different negative prompt"})
    torch.testing.assert_close(same, base, atol=1e-5 * float(base.abs().max()), rtol=1e-5)

    edited, edited_shown = _run(env, **{"MegaSRRamTags.exclude": tags[0], "MegaSRRamTags.user_prompt": "zebra"})
    assert edited_shown == ", ".join(tags[1:]) + ", zebra," + SUFFIX
    assert float((edited - base).abs().max()) > 1e-3 * float(base.abs().max())
