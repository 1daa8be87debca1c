"""megasr/tags.py: the shipped vocabulary and zero-shot tag selection, on constructed embeddings."""

from __future__ import annotations

import pytest
import torch

from megasr.tags import (
    DEFAULT_SUFFIX,
    format_prompt,
    load_vocabulary,
    parse_vocabulary,
    select_tags,
    tag_scores,
    tags_for_images,
)


def test_shipped_vocabulary_parses_without_duplicates_and_with_its_template() -> None:
    """Catches a broken data file: a lost template line, duplicated or empty tags, comments read as tags."""
    vocab = load_vocabulary()
    assert vocab.template == "a photo of {}."
    assert len(vocab.tags) >= 250
    assert len({t.lower() for t in vocab.tags}) == len(vocab.tags)
    assert all(t and "#" not in t and ":" not in t for t in vocab.tags)
    assert {"dog", "building", "brick", "sky", "face"} <= set(vocab.tags)
    assert vocab.prompts()[vocab.tags.index("dog")] == "a photo of dog."


def test_parse_vocabulary_comments_commas_template_and_errors() -> None:
    """Catches comma lists read as one tag, a template override ignored, duplicates kept, silent bad input."""
    v = parse_vocabulary("# c\ntemplate: an image of {}\ncat, Dog\n\ndog  # again\nred   car\n")
    assert v.tags == ("cat", "Dog", "red car") and v.template == "an image of {}"
    assert parse_vocabulary("cat", template="{} photo").prompts() == ["cat photo"]
    with pytest.raises(ValueError, match="no tags"):
        parse_vocabulary("# nothing\ntemplate: a {}\n")
    with pytest.raises(ValueError, match="template"):
        parse_vocabulary("cat", template="no slot")


def _text_embeds() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 16, generator=g)
    return t * torch.tensor([1.0, 1.0, 0.5, 1.0, 1.0, 8.0]).unsqueeze(1)  # tag 2 short, tag 5 long


def test_scores_are_cosines_so_a_long_text_embedding_does_not_win() -> None:
    """Catches a raw dot product (no normalisation): tag 5's text embedding is 8x longer and half-aligned."""
    t = _text_embeds()
    img = torch.nn.functional.normalize(t[2], dim=0) + 0.5 * torch.nn.functional.normalize(t[5], dim=0)
    tags = ("a", "b", "c", "d", "e", "f")
    assert select_tags(tag_scores(img[None] * 7.0, t)[0], tags, 1, float("-inf")) == ["c"]
    assert (img @ t.T).argmax() == 5  # what an unnormalised score would pick
    s = tag_scores(img[None], t)[0]
    assert torch.allclose(s, torch.nn.functional.cosine_similarity(img[None], t), atol=1e-6)


def test_threshold_is_a_z_score_top_k_caps_order_is_best_first_and_exclude_filters() -> None:
    """Catches a threshold on raw cosines (z is scale free), top_k not applied, wrong order, exclude applied after
    top_k (which would return fewer tags than asked)."""
    tags = tuple("abcdefghij")
    scores = torch.tensor([0.10, 0.30, 0.12, 0.28, 0.11, 0.09, 0.10, 0.26, 0.10, 0.11])
    z = (scores - scores.mean()) / scores.std(unbiased=False)
    assert select_tags(scores, tags, 8, 1.0) == [t for t, _ in sorted(zip(tags, z), key=lambda p: -p[1]) if _ >= 1.0]
    assert select_tags(scores, tags, 8, 1.0) == ["b", "d", "h"]
    assert select_tags(scores * 0.1 + 0.5, tags, 8, 1.0) == ["b", "d", "h"]  # same ranking spread: same tags
    assert select_tags(scores, tags, 2, 1.0) == ["b", "d"]
    assert select_tags(scores, tags, 2, 1.0, exclude=["B "]) == ["d", "h"]
    assert select_tags(scores, tags, 8, 5.0) == []
    assert select_tags(torch.full((10,), 0.2), tags, 3, 0.0) == ["a", "b", "c"]  # flat: z = 0, vocabulary order
    assert select_tags(scores, tags, 0, 0.0) == []


def test_tags_per_image_follow_each_image_embedding() -> None:
    """Catches scores taken from the wrong image of a batch (or from the batch mean)."""
    t = torch.eye(5, 12)
    img = torch.stack([t[3] + 0.05 * t[1], t[0] + 0.05 * t[4]])
    assert tags_for_images(img, t, tuple("vwxyz"), top_k=1, threshold=0.0) == [["y"], ["v"]]
    with pytest.raises(ValueError, match="not one CLIP"):
        tag_scores(torch.zeros(1, 7), t)


def test_format_prompt_joins_prefix_tags_and_suffix() -> None:
    """Catches a dropped suffix/prefix or doubled separators for empty parts."""
    assert format_prompt(["dog", "grass"]) == f"dog, grass, {DEFAULT_SUFFIX}"
    assert format_prompt(["dog"], prefix=" my dog ", suffix="") == "my dog, dog"
    assert format_prompt([], prefix="", suffix="8k") == "8k"
