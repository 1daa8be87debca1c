"""HR image folder, resumable batch sampler and DegradedBatch (training/data.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DegradedBatch, HRImageFolder, StepBatchSampler, collate_hr, load_image, make_hr_loader
from training.degradations import DegradationPipeline

CROP = 64


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A uint8 RGB crop of a bundled photo (scikit-image), or smooth noise when it is unavailable."""
    try:
        from skimage import data as skdata

        img = skdata.astronaut()
        top, left = (seed * 37) % (512 - h), (seed * 53) % (512 - w)
        return np.ascontiguousarray(img[top : top + h, left : left + w])
    except ImportError:  # pragma: no cover
        rng = np.random.default_rng(seed)
        return (rng.random((h, w, 3)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hr")
    sub = root / "nested" / "deeper"
    sub.mkdir(parents=True)
    Image.fromarray(_photo(100, 120, 1)).save(root / "a.png")
    Image.fromarray(_photo(90, 80, 2)).save(root / "b.jpg", quality=95)
    Image.fromarray(_photo(70, 96, 3)).save(sub / "c.webp")
    Image.fromarray(_photo(80, 80, 4)).save(root / "nested" / "d.bmp")
    Image.fromarray(_photo(72, 72, 5)).save(sub / "e.TIF")
    Image.fromarray(np.full((80, 80), 30000, dtype=np.uint16)).save(root / "gray16.png")
    Image.fromarray(_photo(80, 80, 6)[..., 0]).save(root / "gray8.png")
    rgba = np.zeros((80, 80, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> composited over white
    Image.fromarray(rgba, "RGBA").save(root / "transparent.png")
    Image.fromarray(_photo(30, 40, 7)).save(root / "small.png")
    (root / "not_an_image.png").write_bytes(b"this is text, not a png")
    good = (root / "b.jpg").read_bytes()
    (sub / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("ignored")
    return root


def test_scan_reads_every_format_and_reports_unreadable_once(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="training.data"):
        ds = HRImageFolder(folder, crop_size=CROP, hflip=False)
    names = sorted(p.name for p in ds.paths)
    assert "not_an_image.png" not in names and "notes.txt" not in names
    assert {"a.png", "b.jpg", "c.webp", "d.bmp", "e.TIF", "gray16.png", "truncated.jpg"} <= set(names)
    assert sum("not_an_image.png" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.data"):
        items = [ds[i] for i in range(len(ds))] + [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["hr"].shape == (3, CROP, CROP) and it["hr"].dtype == torch.float32
        assert 0.0 <= float(it["hr"].min()) and float(it["hr"].max()) <= 1.0
    trunc = [r for r in caplog.records if "truncated.jpg" in r.getMessage()]
    assert len(trunc) == 1  # reported once, though read twice
    i_trunc = [p.name for p in ds.paths].index("truncated.jpg")
    assert items[i_trunc]["path"] != str(ds.paths[i_trunc])  # substituted by the next readable image


def test_modes_16bit_gray_and_alpha(folder: Path) -> None:
    g16 = load_image(folder / "gray16.png")
    assert g16.shape == (80, 80, 3)
    np.testing.assert_allclose(g16, 30000 / 65535, atol=1e-6)
    g8 = load_image(folder / "gray8.png")
    assert np.array_equal(g8[..., 0], g8[..., 2])
    np.testing.assert_allclose(load_image(folder / "transparent.png"), 1.0)


def test_small_images_are_reflection_padded_or_upscaled(tmp_path: Path) -> None:
    arr = (np.arange(2 * 3 * 3).reshape(2, 3, 3) * 10).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "tiny.png")
    Image.fromarray(np.full((1, 1, 3), 77, dtype=np.uint8)).save(tmp_path / "one.png")
    ds = HRImageFolder(tmp_path, crop_size=5, hflip=False)
    by_name = {Path(ds[i]["path"]).name: ds[i]["hr"] for i in range(len(ds))}
    want = np.pad(arr.astype(np.float32) / 255, ((0, 3), (0, 2), (0, 0)), mode="reflect")
    np.testing.assert_allclose(by_name["tiny.png"].permute(1, 2, 0).numpy(), want, atol=1e-6)
    torch.testing.assert_close(by_name["one.png"], torch.full((3, 5, 5), 77 / 255))
    up = HRImageFolder(tmp_path, crop_size=8, small_images="upscale", hflip=False)
    assert all(up[i]["hr"].shape == (3, 8, 8) for i in range(len(up)))
    with pytest.raises(ValueError, match="small_images"):
        HRImageFolder(tmp_path, crop_size=8, small_images="stretch")


def test_items_are_a_function_of_seed_epoch_index(folder: Path) -> None:
    ds = HRImageFolder(folder, crop_size=CROP, seed=3)
    again = HRImageFolder(folder, crop_size=CROP, seed=3)
    other_seed = HRImageFolder(folder, crop_size=CROP, seed=4)
    i = [p.name for p in ds.paths].index("a.png")
    assert torch.equal(ds[(2, i)]["hr"], again[(2, i)]["hr"])
    crops = {ds[(e, i)]["hr"].numpy().tobytes() for e in range(6)}
    assert len(crops) > 1  # different epochs give different crops
    assert any(not torch.equal(ds[(e, i)]["hr"], other_seed[(e, i)]["hr"]) for e in range(4))
    ds.set_epoch(2)
    assert torch.equal(ds[i]["hr"], again[(2, i)]["hr"])


def test_missing_and_empty_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HRImageFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("no images")
    with pytest.raises(ValueError, match="no readable images"):
        HRImageFolder(tmp_path / "empty")


def test_step_sampler_is_resumable_and_sharded() -> None:
    full = list(StepBatchSampler(10, 3, seed=1, count=12))
    resumed = list(StepBatchSampler(10, 3, seed=1, start=5, count=7))
    assert resumed == full[5:]
    flat = [k for batch in full for k in batch]
    for epoch in range(3):  # each epoch is a permutation
        assert sorted(i for e, i in flat if e == epoch) == list(range(10))
    r0 = list(StepBatchSampler(12, 2, seed=1, rank=0, world_size=2, count=6))
    r1 = list(StepBatchSampler(12, 2, seed=1, rank=1, world_size=2, count=6))
    for a, b in zip(r0, r1, strict=True):
        assert not set(a) & set(b)
    assert sorted(i for b in r0[:3] + r1[:3] for _, i in b) == list(range(12))


def test_loader_with_workers_matches_in_process(folder: Path) -> None:
    ds = HRImageFolder(folder, crop_size=CROP)
    a = list(make_hr_loader(ds, 3, seed=2, start=1, count=2, num_workers=0))
    b = list(make_hr_loader(ds, 3, seed=2, start=1, count=2, num_workers=2))
    assert len(a) == 2
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["hr"], y["hr"]) and x["path"] == y["path"]
        assert x["hr"].shape == (3, 3, CROP, CROP)


def test_degraded_batch(folder: Path) -> None:
    ds = HRImageFolder(folder, crop_size=CROP)
    hr = collate_hr([ds[i] for i in range(4)])["hr"]
    pipe = DegradationPipeline()
    b1 = DegradedBatch.build(hr, pipe, torch.Generator().manual_seed(9), device="cpu")
    b2 = DegradedBatch.build(hr, pipe, torch.Generator().manual_seed(9))
    assert b1.lr.shape == (4, 3, CROP // 4, CROP // 4)
    assert b1.hr.shape == b1.hr_usm.shape == b1.lr_up.shape == (4, 3, CROP, CROP)
    assert torch.equal(b1.lr, b2.lr) and torch.equal(b1.lr_up, b2.lr_up) and torch.equal(b1.hr, hr)
    assert 0 <= float(b1.lr_up.min()) and float(b1.lr_up.max()) <= 1


def test_16bit_rgb_files(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    rgb16 = (np.random.default_rng(0).random((20, 30, 3)) * 65535).astype(np.uint16)
    for name in ("rgb16.png", "rgb16.tif"):
        assert cv2.imwrite(str(tmp_path / name), rgb16[..., ::-1])  # OpenCV writes BGR
        arr = load_image(tmp_path / name)
        assert arr.shape == (20, 30, 3)
        np.testing.assert_allclose(arr, rgb16 / 65535.0, atol=1.0 / 255 + 1e-6)
