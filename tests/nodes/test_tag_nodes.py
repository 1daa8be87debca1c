"""MegaSR Tag Vocabulary + MegaSR Tags inside the real ComfyUI (tiny SD-2 checkpoint, tiny CLIP vision files).

The tests' CLIP vision is a ViT-L/14 (768-d image embeddings; a ViT-H costs ~20 s per image on this CPU), which
is not SD-2's 1024-d text space: through the executor it must be refused by name. The ranking path runs the
node on the real ComfyUI CLIP_VISION with a vocabulary whose embeddings are that model's own image embeddings,
so the right answer is known.
"""

from __future__ import annotations

import pytest
import torch
from harness.comfy import ExecutionFailed
from megasr_fixtures import CLIP_VISION_NAME, ensure_dage_files, megasr_env


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _graph(ckpt: str, vocabulary: str) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION_NAME}},
        "lr": {"class_type": "LoadImage", "inputs": {"image": "t_lr.png"}},
        "vocab": {
            "class_type": "MegaSRTagVocabulary",
            "inputs": {"clip": ["ckpt", 1], "vocabulary": vocabulary, "template": ""},
        },
        "tags": {
            "class_type": "MegaSRTags",
            "inputs": {
                "image": ["lr", 0],
                "clip_vision": ["cv", 0],
                "tag_vocab": ["vocab", 0],
                "top_k": 3,
                "threshold": 0.0,
                "prefix": "",
                "suffix": "clean, high-resolution, 8k",
                "exclude": "",
            },
        },
    }


def test_tags_node_refuses_a_clip_vision_outside_the_sd2_text_space(env):
    """Through the executor: the vocabulary is embedded by SD-2's CLIP (1024-d projected pooled output) and a
    768-d ViT-L is refused naming the node, the input and the file to use (no silent nonsense tags)."""
    runner, ckpt, _ = env
    with pytest.raises(ExecutionFailed) as err:
        runner.run(_graph(ckpt, "cat, dog"))
    msg = str(err.value)
    assert "MegaSR Tags" in msg and "clip_vision" in msg and "768-d" in msg and "1024-d" in msg and "ViT-H" in msg


def test_vocabulary_node_embeds_each_tag_with_the_projected_pooled_text_output(env):
    """Catches the unprojected/penultimate output or a wrong template: the embedding of each tag equals SD-2
    CLIP's projected pooled output for 'template(tag)', one row per tag, in vocabulary order."""
    import nodes as comfy_nodes

    vocab_node = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRTagVocabulary"]
    clip = comfy_nodes.CheckpointLoaderSimple().load_checkpoint(env[1])[1]
    out = vocab_node.execute(clip, "cat\ndog", "a {} here").args[0]
    assert out.vocab.tags == ("cat", "dog")
    assert out.embeds.shape == (2, 1024)
    _, pooled = clip.encode_from_tokens(clip.tokenize("a dog here"), return_pooled=True)
    torch.testing.assert_close(out.embeds[1], pooled.reshape(-1).float())
    assert (out.embeds[0] - out.embeds[1]).abs().max() > 1e-3
    with pytest.raises(Exception, match="MegaSR Tag Vocabulary.*template"):
        vocab_node.execute(clip, "cat", "no slot")


def test_tags_follow_the_image_embedding_and_the_dage_lora(env):
    """With a vocabulary made of the CLIP vision model's own embeddings of the LR image (with and without the
    DAGE LoRA), the node must pick the one matching how it encoded the image: catches a LoRA that is not
    applied, scores on the wrong output (penultimate tokens), a batch not averaged, exclude/prefix/suffix lost."""
    import comfy.clip_vision
    import folder_paths

    import nodes as comfy_nodes

    tags_mod = __import__(comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRTags"].__module__, fromlist=["x"])
    sem_mod = __import__(comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRClipSemantics"].__module__, fromlist=["x"])
    megasr_tags = __import__(tags_mod.__name__.rsplit(".", 2)[0] + ".megasr.tags", fromlist=["x"])
    cv = comfy.clip_vision.load(folder_paths.get_full_path("clip_vision", CLIP_VISION_NAME))
    lora = (
        comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRDageLoader"]
        .execute("clip_lora", ensure_dage_files()["dage_clip_lora_vitl"])
        .args[0]
    )
    g = torch.Generator().manual_seed(4)
    image = torch.rand(1, 40, 56, 3, generator=g)
    plain = cv.encode_image(image, crop=False)["image_embeds"].float()[0]
    with_lora = sem_mod.patched_clip_vision(cv, lora).encode_image(image, crop=False)["image_embeds"].float()[0]
    assert torch.nn.functional.cosine_similarity(plain, with_lora, dim=0) < 0.9999
    other = torch.randn(4, plain.shape[0], generator=g)
    vocab = megasr_tags.TagVocabulary(("plain", "degraded", "x1", "x2", "x3", "x4"))
    emb = tags_mod.TagEmbeddings(vocab, torch.stack([plain, with_lora, *other]))
    node = tags_mod.MegaSRTags

    out = node.execute(image, cv, emb, 1, -10.0, "", "8k", "")
    assert out.args == ("plain, 8k", "plain")
    out = node.execute(image, cv, emb, 1, -10.0, "my photo", "8k", "", dage_lora=lora)
    assert out.args == ("my photo, degraded, 8k", "degraded")
    out = node.execute(image, cv, emb, 1, -10.0, "", "", "Degraded", dage_lora=lora)
    assert out.args == ("plain", "plain")  # excluded: the next best takes its place
    with pytest.raises(Exception, match="MegaSR Tags.*tag_vocab"):
        node.execute(image, cv, "not a vocabulary", 1, 0.0, "", "", "")


def test_tag_nodes_have_descriptions_and_tooltips_and_stable_widget_order(env):
    """Catches a missing tooltip/description or a reordered widget (workflows store widgets by position)."""
    from harness import comfy as hcomfy

    for node_id in ("MegaSRTagVocabulary", "MegaSRTags"):
        info = hcomfy.node_info(node_id)
        assert info["category"] == "MegaSR" and info["description"].strip()
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), node_id
    tags = hcomfy.node_info("MegaSRTags")
    assert tags["input_order"]["required"] == [
        "image", "clip_vision", "tag_vocab", "top_k", "threshold", "prefix", "suffix", "exclude"
    ]  # fmt: skip
    assert tags["input"]["required"]["suffix"][1]["default"] == "clean, high-resolution, 8k"
    assert tags["output_node"] is True
