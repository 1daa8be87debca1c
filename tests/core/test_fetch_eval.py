"""``python -m megasr fetch --eval``: the metric weights of the manifest, downloaded from their publishers (a fake
server on loopback here) and combined into the one file per metric that the metrics read.

Catches: eval files fetched with the nodes' files (or the nodes' files with ``--eval``), a part saved under a
wrong name or folder, a combination that maps torchvision's layer indices to the wrong LPIPS slice or DISTS stage,
a sha256 not checked for a direct address, a rebuild or re-download when the combined file is there, a failed
part that still leaves a combined file, an offline run that does not name the addresses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from fake_hub import FakeHub
from metric_fixtures import write_tiny_clip_parts
from safetensors.torch import load_file

from megasr import __main__ as cli
from megasr import manifest as M
from megasr.metrics import METRIC_FOLDER, METRICS, compute_metrics


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _pth(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _parts(tmp: Path) -> dict[str, bytes]:
    """Random parts in the published layouts: lpips lin layers, torchvision AlexNet/VGG16 (features only, to keep
    the test small), DISTS alpha/beta."""
    torch.manual_seed(0)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}
    alex = {f"features.{k}": v for k, v in torchvision.models.alexnet().features.state_dict().items()}
    vgg = {f"features.{k}": v for k, v in torchvision.models.vgg16().features.state_dict().items()}
    ab = {"alpha": torch.rand(1, 1475, 1, 1), "beta": torch.rand(1, 1475, 1, 1)}
    npz = io.BytesIO()
    np.savez(npz, mu_pris_param=np.linspace(0, 1, 36)[None], cov_pris_param=np.eye(36) * 2.0)
    clip = write_tiny_clip_parts(tmp / "clip_parts")
    hub = f"/{M.entry('metric_clipiqa_rn50').repo_id}/resolve/main"
    return {
        f"{hub}/open_clip_model.safetensors": clip[0].read_bytes(),
        f"{hub}/vocab.json": clip[1].read_bytes(),
        f"{hub}/merges.txt": clip[2].read_bytes(),
        "/niqe/niqe_pris_params.npz": npz.getvalue(),
        "/lpips/alex.pth": _pth(lin),
        "/tv/alexnet.pth": _pth(alex),
        "/dists/weights.pt": _pth(ab),
        "/tv/vgg16.pth": _pth(vgg),
    }


def test_manifest_eval_entries_name_their_sources_and_the_files_the_metrics_read():
    entries = [e for e in M.load_manifest() if e.for_eval]
    assert {e.id for e in entries} == {"metric_lpips_alex", "metric_dists", "metric_niqe", "metric_clipiqa_rn50"}
    produced = {e.produces["name"] for e in entries}
    assert produced == {METRICS[m].files[0] for m in ("lpips", "dists", "niqe", "clipiqa")}
    for e in entries:
        assert e.folder == METRIC_FOLDER and e.public and not e.needed_for_nodes
        assert all(e.url(f).startswith("https://") for f in e.files)
        assert e.licence and "python -m megasr fetch --eval" in e.how_to_get()
    assert "BSD-2-Clause" in M.entry("metric_lpips_alex").licence and "MIT" in M.entry("metric_dists").licence
    assert "not verified" in M.entry("metric_niqe").licence  # named as such, fetched by the user
    assert M.entry("metric_clipiqa_rn50").on_hub and "MIT" in M.entry("metric_clipiqa_rn50").licence
    # the torchvision files' sha256 start with the 8 hex digits torchvision puts in their names
    for e in entries[:2]:
        tv = e.files[1]
        assert tv.sha256 and tv.sha256[:8] in tv.url
    assert M.find_file("megasr", "metrics/lpips_alex.safetensors")[0].id == "metric_lpips_alex"


def _local_manifest(monkeypatch, endpoint: str, served: dict[str, bytes], sha: bool = True) -> None:
    """The real eval entries with their addresses moved to the fake server (and the served bytes' sha256)."""
    where = {
        "parts/lpips_v0.1_alex.pth": "/lpips/alex.pth",
        "parts/alexnet-owt-7be5be79.pth": "/tv/alexnet.pth",
        "parts/dists_weights.pt": "/dists/weights.pt",
        "parts/vgg16-397923af.pth": "/tv/vgg16.pth",
        "parts/niqe_pris_params.npz": "/niqe/niqe_pris_params.npz",
    }
    real = M.load_manifest()
    moved = []
    for e in real:
        if e.for_eval and not e.on_hub:  # a hub entry is moved by --endpoint, as a user's mirror would be
            files = tuple(
                dataclasses.replace(
                    f,
                    url=endpoint + where[f.name],
                    sha256=hashlib.sha256(served[where[f.name]]).hexdigest() if sha and f.sha256 else None,
                )
                for f in e.files
            )
            e = dataclasses.replace(e, files=files)
        moved.append(e)
    monkeypatch.setattr(M, "load_manifest", lambda path=None: tuple(moved))


def test_fetch_eval_downloads_the_parts_and_builds_each_metric_file(tmp_path, online, monkeypatch, capsys):
    served = _parts(tmp_path)
    hub = FakeHub(served)
    models = tmp_path / "models"
    try:
        _local_manifest(monkeypatch, hub.endpoint, served)
        argv = ["fetch", "--eval", "--models-dir", str(models), "--no-progress", "--endpoint", hub.endpoint]
        assert cli.main(["check", "--eval", "--models-dir", str(models)]) == 2
        assert cli.main(argv) == 0
        assert sorted(p for p, _ in hub.requests) == sorted(served)  # only the eval files, nothing of the nodes'
        n = len(hub.requests)
        assert cli.main(argv) == 0
        assert len(hub.requests) == n, "the combined files are there: nothing may be downloaded again"
        assert cli.main(["check", "--eval", "--models-dir", str(models)]) == 0
    finally:
        hub.close()
    folder = models / METRIC_FOLDER
    lp = load_file(str(folder / "lpips_alex.safetensors"))
    lin = torch.load(io.BytesIO(served["/lpips/alex.pth"]), weights_only=True)
    alex = torch.load(io.BytesIO(served["/tv/alexnet.pth"]), weights_only=True)
    assert torch.equal(lp["lin2.model.1.weight"], lin["lin2.model.1.weight"])
    # torchvision features.3 is AlexNet's second conv: LPIPS slice 2; features.10 its fifth: slice 5
    assert torch.equal(lp["net.slice2.3.weight"], alex["features.3.weight"])
    assert torch.equal(lp["net.slice5.10.bias"], alex["features.10.bias"])
    di = load_file(str(folder / "dists_vgg16.safetensors"))
    vgg = torch.load(io.BytesIO(served["/tv/vgg16.pth"]), weights_only=True)
    assert torch.equal(di["stage3.10.weight"], vgg["features.10.weight"])  # after the 2nd pool: stage 3
    assert torch.equal(di["stage5.28.weight"], vgg["features.28.weight"])
    # and the metrics read them from that folder
    img = torch.rand(1, 3, 48, 48)
    res = compute_metrics(["lpips", "dists"], img, img.flip(-1), folders=[folder])
    assert not res.skipped and all(v[0] > 0 for v in res.values.values()), res
    same = compute_metrics(["lpips", "dists"], img, img, folders=[folder])
    assert abs(same.values["lpips"][0]) < 1e-6 and abs(same.values["dists"][0]) < 1e-4
    clip = compute_metrics(["clipiqa"], torch.rand(1, 3, 64, 64), folders=[folder])
    assert not clip.skipped and 0 < clip.values["clipiqa"][0] < 1
    niqe = load_file(str(folder / "niqe_pris_params.safetensors"))
    assert niqe["mu_pris_param"].shape == (36,) and torch.equal(niqe["cov_pris_param"], torch.eye(36).double() * 2)


def test_fetch_eval_refuses_a_part_with_a_wrong_sha256_and_builds_nothing(tmp_path, online, monkeypatch, capsys):
    served = _parts(tmp_path)
    hub = FakeHub(served)
    models = tmp_path / "models"
    try:
        _local_manifest(monkeypatch, hub.endpoint, served)
        served["/tv/alexnet.pth"] = _pth({"features.0.weight": torch.zeros(64, 3, 11, 11)})  # not the hashed file
        assert (
            cli.main(["fetch", "--eval", "--models-dir", str(models), "--no-progress", "--endpoint", hub.endpoint])
            == cli.EXIT_FAILED
        )
    finally:
        hub.close()
    out = capsys.readouterr().out
    assert "sha256" in out and "alexnet-owt-7be5be79.pth" in out, out
    folder = models / METRIC_FOLDER
    assert not (folder / "lpips_alex.safetensors").exists()
    assert (folder / "dists_vgg16.safetensors").is_file() and (
        folder / "clipiqa_rn50.safetensors"
    ).is_file()  # the other metric is unaffected


def test_fetch_eval_offline_names_every_address(tmp_path, capsys):
    models = tmp_path / "models"
    assert cli.main(["fetch", "--eval", "--models-dir", str(models)]) == cli.EXIT_USAGE
    out = capsys.readouterr().out
    for e in M.load_manifest():
        for f in e.files:
            assert (e.url(f) in out) == e.for_eval, f.name if e.public else e.id
    assert f"{models}/{METRIC_FOLDER}/parts/vgg16-397923af.pth" in out and "dists_vgg16.safetensors" in out
    assert not models.exists()


def test_missing_metric_file_is_one_line_naming_it_and_the_fetch_command(tmp_path: Path):
    img = torch.rand(1, 3, 32, 32)
    res = compute_metrics(["psnr", "lpips", "dists"], img, img, folders=[tmp_path])
    assert set(res.values) == {"psnr"}
    for name, file in (("lpips", "lpips_alex.safetensors"), ("dists", "dists_vgg16.safetensors")):
        line = res.skipped[name]
        assert "\n" not in line and file in line and "python -m megasr fetch --eval" in line


def test_npz_header_is_checked(tmp_path: Path) -> None:
    """The NIQE part is an .npz (a zip): a Git LFS pointer or text served in its place is refused."""
    from megasr.verify import header_problem

    good, bad = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(good, mu_pris_param=np.zeros(36))
    bad.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert header_problem(str(good), "niqe_pris_params.npz") is None
    assert "not a zip archive" in header_problem(str(bad), "niqe_pris_params.npz")
