"""Guidance-map encodings (DESIGN.md section 3) round-trip through ComfyUI IMAGE tensors."""

from __future__ import annotations

import ast
import importlib.util

import pytest
import torch

from megasr.dage import encodings as E
from megasr.dage.common import working_size


def _reference_palette() -> list[list[int]]:
    # controlnet_aux ships the standard table; read it without importing the package (slow).
    origin = importlib.util.find_spec("controlnet_aux").submodule_search_locations[0] + "/util.py"
    tree = ast.parse(open(origin).read())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "ade_palette":
            return ast.literal_eval(node.body[-1].value)
    raise AssertionError("ade_palette not found")


def test_palette_is_the_standard_ade20k_table():
    assert len(E.ADE20K_PALETTE) == 150
    assert [list(c) for c in E.ADE20K_PALETTE] == _reference_palette()
    assert E.palette_tensor().shape == (150, 3)


def test_hed_round_trip():
    edges = torch.rand(2, 1, 9, 13)
    img = E.hed_to_image(edges)
    assert img.shape == (2, 9, 13, 3) and torch.equal(img[..., 0], img[..., 2])
    assert torch.allclose(E.image_to_hed(img), edges, atol=1e-6)
    assert torch.allclose(E.map_to_network("hed", img), edges, atol=1e-6)
    # a coloured map from elsewhere is read as its channel mean
    col = torch.rand(1, 4, 5, 3)
    assert torch.allclose(E.image_to_hed(col)[:, 0], col.mean(-1))


def test_depth_normalised_per_image_near_bright():
    disp = torch.stack([torch.linspace(1, 5, 12).view(1, 3, 4), torch.linspace(100, 900, 12).view(1, 3, 4)])
    img = E.depth_to_image(disp)
    assert img.shape == (2, 3, 4, 3)
    for b in range(2):
        assert img[b].min() == 0 and img[b].max() == 1
        # largest inverse depth (nearest) is brightest
        assert img[b, 2, 3, 0] == 1 and img[b, 0, 0, 0] == 0
    back = E.image_to_depth(img)
    assert torch.allclose(back, E.normalize_depth(disp), atol=1e-6)
    assert torch.equal(E.normalize_depth(torch.full((1, 1, 3, 3), 7.0)), torch.zeros(1, 1, 3, 3))
    tiny = torch.rand(1, 1, 5, 5) * 1e-7  # small but not constant
    assert E.normalize_depth(tiny).max() == 1


def test_seg_round_trip_exact_and_through_8bit():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 150, (2, 17, 11), generator=g)
    labels[labels == 48] = 3  # 48 shares its colour with 6 in the standard palette
    img = E.seg_labels_to_image(labels)
    assert img.shape == (2, 17, 11, 3) and img.min() >= 0 and img.max() <= 1
    assert torch.equal(E.image_to_seg_labels(img), labels)
    saved = (img * 255).round().to(torch.uint8).float() / 255  # PNG save/load
    assert torch.equal(E.image_to_seg_labels(saved), labels)
    # the palette's duplicate colour reads back as the first class
    assert E.image_to_seg_labels(E.seg_labels_to_image(torch.tensor([[[48]]]))).item() == 6


def test_seg_snapping_of_painted_colours_and_network_input():
    labels = torch.tensor([[[0, 20, 149], [55, 66, 2]]])
    img = E.seg_labels_to_image(labels)
    noisy = (img + (torch.rand(img.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 6 / 255).clamp(0, 1)
    assert torch.equal(E.image_to_seg_labels(noisy), labels)
    net = E.seg_to_network(noisy)
    assert net.shape == (1, 3, 2, 3)
    assert torch.allclose(net, img.movedim(-1, 1))
    assert torch.allclose(E.map_to_network("seg", img), img.movedim(-1, 1))
    logits = torch.zeros(1, 150, 2, 3).scatter_(1, labels.unsqueeze(1), 1.0)
    assert torch.equal(E.seg_logits_to_image(logits), img)


def test_seg_chunked_nearest_matches_unchunked():
    img = torch.rand(1, 8, 9, 3)
    assert torch.equal(E.image_to_seg_labels(img, chunk=7), E.image_to_seg_labels(img))


def test_resize_map_keeps_palette_colours_for_seg():
    labels = torch.randint(0, 150, (1, 5, 7))
    net = E.seg_to_network(E.seg_labels_to_image(labels))
    up = E.resize_map("seg", net, (13, 9))
    pal = E.palette_tensor()
    px = up.movedim(1, -1).reshape(-1, 3)
    assert ((px[:, None, :] - pal[None]).abs().sum(-1).min(dim=1).values < 1e-6).all()
    assert E.resize_map("hed", torch.rand(1, 1, 5, 7), (10, 14)).shape == (1, 1, 10, 14)


def test_bad_inputs():
    with pytest.raises(ValueError, match="labels must be in 0..149"):
        E.seg_labels_to_image(torch.tensor([[[150]]]))
    with pytest.raises(ValueError, match="unknown map kind"):
        E.map_to_network("normal", torch.rand(1, 2, 2, 3))
    with pytest.raises(ValueError, match="expected a map"):
        E.hed_to_image(torch.rand(1, 3, 4, 4))


@pytest.mark.parametrize(
    "h,w,res,mult,expect",
    [(37, 53, 64, 16, (64, 96)), (37, 53, 0, 14, (42, 56)), (1, 1, 518, 14, (518, 518)), (300, 100, 56, 14, (168, 56))],
)
def test_working_size(h, w, res, mult, expect):
    assert working_size(h, w, res, mult) == expect


def test_importing_the_dage_modules_is_cheap():
    """Heavy libraries load only when a model is built (controlnet_aux loads every detector)."""
    import subprocess
    import sys

    code = (
        "import sys; import megasr.weights, megasr.dage, megasr.dage.hed, megasr.dage.depth, megasr.dage.seg, "
        "megasr.dage.clip, megasr.dage.encodings; "
        "heavy = [m for m in ('controlnet_aux', 'transformers', 'peft', 'diffusers', 'comfy') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
