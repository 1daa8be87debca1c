"""Training prompts default to the teacher tagger's tags of the HR crop (sidecar files override, text dropout 0.5).

The tiny CLIP of the test fixtures gets a visual projection constructed so that the *base* CLIP (no DAGE LoRA)
maps each HR image exactly onto the text embedding of one chosen tag: the real training stage must then train
on exactly those tags. A teacher that kept the LoRA on, tagged the LR instead of the HR, used the unprojected
pooled output, or ignored the sidecar file gives other prompts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from megasr_training_fixtures import megasr_config, tiny_tokenizer, write_guidance_files, write_tiny_sd2_base
from PIL import Image

from training.config import load_config
from training.errors import UsageError

TAGS = ("cat", "dog", "tree", "sky", "boat")
WANT = {"img0.png": "cat, tree, sky", "img1.png": "dog", "img2.png": "boat"}  # img0: its sidecar file


def _hr_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    for i in range(3):  # 32 x 32 = the crop: the stage's HR crop is the whole image
        img = rng.random((32, 32, 3)) * 0.3 + np.array([0.2 * i, 0.7 - 0.3 * i, 0.4])
        img[4 + 6 * i : 14 + 6 * i, 8:20] = rng.random(3)
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("cat, tree, sky\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionModel

    from megasr.dage.clip import build_clip_config, clip_preprocess, load_clip_vision_weights
    from megasr.tags import parse_vocabulary
    from training.data import HRImageFolder
    from training.tagging import embed_vocabulary

    root = tmp_path_factory.mktemp("train_tags")
    base = write_tiny_sd2_base(root / "sd2")
    guidance = write_guidance_files(root / "dage")
    hr = _hr_folder(root / "hr")
    vocab_file = root / "vocab.txt"
    vocab_file.write_text("template: a photo of {}.\n" + "\n".join(TAGS) + "\n", encoding="utf-8")

    tok = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        cfg = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            projection_dim=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        CLIPTextModelWithProjection(cfg).save_pretrained(root / "tags_text")
    text = CLIPTextModelWithProjection.from_pretrained(root / "tags_text").eval()
    t_emb = embed_vocabulary(text, tok, parse_vocabulary(vocab_file.read_text()).prompts(), torch.device("cpu"))

    # the teacher's pooled features of each HR crop, by the base CLIP (transformers, no LoRA, no stage code)
    from megasr_training_fixtures import TINY_CLIP_1024

    vision = CLIPVisionModel(build_clip_config({**TINY_CLIP_1024["clip"]})).eval()
    load_clip_vision_weights(vision, guidance["clip_vision"])
    ds = HRImageFolder(hr, crop_size=32, hflip=False)
    order = [Path(p).name for p in ds.paths]
    crops = torch.stack([ds[(0, i)]["hr"] for i in range(len(ds))])
    with torch.no_grad():
        pooled = vision(pixel_values=clip_preprocess(crops, 112, crop=False)).pooler_output
    targets = {"img0.png": "tree", "img1.png": "dog", "img2.png": "boat"}  # img0's tag loses to its sidecar
    goal = torch.stack([t_emb[TAGS.index(targets[n])] for n in order])
    proj = (torch.linalg.pinv(pooled.double()) @ goal.double()).T.float()  # proj @ pooled_i = goal_i
    cv = load_file(guidance["clip_vision"])
    cv["visual_projection.weight"] = proj.contiguous()
    cv_path = root / "dage" / "tiny_clip1024_vision_proj.safetensors"
    save_file(cv, str(cv_path))
    guidance = {**guidance, "clip_vision": str(cv_path)}
    return {
        "root": root,
        "base": base,
        "guidance": guidance,
        "hr": hr,
        "vocab": vocab_file,
        "text": root / "tags_text",
        "crops": crops,
        "goal": goal,
    }


def _cfg(setup: dict[str, Any], name: str, **tags: Any) -> Path:
    run = setup["root"] / name
    path = megasr_config(setup["base"], setup["guidance"], setup["hr"], run, batch_size=3, max_steps=2)
    data = json.loads(path.read_text())
    data["data"]["hflip"] = False
    for k in ("dage_hed", "dage_depth", "dage_depth_base", "dage_seg"):
        data["megasr"][k] = None
    data["megasr"]["tags"] = {
        "enabled": True,
        "text": str(setup["text"]),
        "vocabulary": str(setup["vocab"]),
        "top_k": 1,
        "threshold": 0.0,
        **tags,
    }
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_hr_tags_reach_the_training_prompts_with_dropout_and_sidecar_override(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every prompt the real stage trains on is "" (dropped, p = 0.5), the sidecar tags (img0), or the tag the
    teacher CLIP gives the HR crop (img1 -> dog, img2 -> boat); USM-sharpened HR is the default target."""
    from training.stage_megasr import MegaSRStage, train_megasr

    seen: list[tuple[str, str]] = []
    original = MegaSRStage.make_inputs

    def recording(self, hr, paths, generator):  # records what the stage made; computes nothing else
        out = original(self, hr, paths, generator)
        seen.extend(zip((Path(p).name for p in paths), self.last_prompts, strict=True))
        return out

    monkeypatch.setattr(MegaSRStage, "make_inputs", recording)
    cfg = load_config(_cfg(setup, "run"))
    assert cfg.megasr.target == "hr_usm" and cfg.train.text_dropout == 0.5
    run = setup["root"] / "run"
    run.mkdir()
    result, export, stage = train_megasr(cfg, run)
    assert result.step == 2 and export is not None and export.is_file()
    assert len(seen) == 6
    assert all(p in ("", WANT[name]) for name, p in seen), seen
    kept = [name for name, p in seen if p]
    assert {"img1.png", "img2.png"} & set(kept), seen  # the tagger was exercised
    assert 0 < len(kept) < 6, seen  # dropout happened, not everything dropped

    # the tags depend on the image: the teacher on another crop gives another tag; nothing passing -> prompt
    tagger = stage.tagger
    emb = tagger.image_embeds(setup["crops"])  # exactly the base CLIP's projected embedding (LoRA off)
    assert torch.nn.functional.cosine_similarity(emb, setup["goal"]).min() > 0.99999
    hr = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(setup["hr"] / f"img{i}.png"), np.float32) / 255) for i in (1, 2)]
    )
    hr = hr.permute(0, 3, 1, 2).contiguous()
    assert tagger(hr) == [["dog"], ["boat"]]
    tagger.threshold = 100.0
    assert stage._prompts(hr, [None, "x"], [False, False]) == [stage.mcfg.prompt, "x"]


def test_missing_tagger_sources_are_named_before_training() -> None:
    """The SD-2 diffusers text encoder (23 layers, no projection) cannot tag: a clear error naming the option."""
    from training.config import MegaSRStageConfig
    from training.tagging import tag_sources

    root = Path(__file__).resolve().parent
    mcfg = MegaSRStageConfig(base=str(root), dage_clip_base=None)
    with pytest.raises(UsageError, match="megasr.tags.clip_vision"):
        tag_sources(mcfg)


def test_diffusers_text_encoder_without_projection_is_refused(setup: dict[str, Any]) -> None:
    from training.config import MegaSRStageConfig
    from training.tagging import tag_sources

    mcfg = MegaSRStageConfig(base=str(setup["base"]), dage_clip_base=setup["guidance"]["clip_vision"])
    with pytest.raises(UsageError, match="megasr.tags.text.*23 layers"):
        tag_sources(mcfg)
    mcfg.tags.text = str(setup["text"])
    assert tag_sources(mcfg) == (setup["guidance"]["clip_vision"], str(setup["text"]))


def test_bundled_config_defaults_usm_target_and_hr_tags() -> None:
    """USM-sharpened ground truth and HR tags are the documented defaults of the bundled MegaSR config."""
    cfg = load_config(Path(__file__).resolve().parents[2] / "training" / "configs" / "megasr_sd2.yaml")
    assert cfg.megasr.target == "hr_usm"
    assert cfg.megasr.tags.enabled and cfg.megasr.tags.top_k == 8 and cfg.train.text_dropout == 0.5
