"""``python -m megasr fetch`` against a fake hub (loopback) that answers wrongly: each bad answer is refused with its
own message and nothing is renamed into place.

Catches: an HTML page answered with 200 installed as a model (the bug of issue 29), a wrong size or sha256 let
through, a truncated safetensors file installed, a full disk that leaves the ``.part`` file filling it, a read-only
folder reported as an interrupted download ("run the same command again").
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import save

from megasr import __main__ as cli
from megasr import download
from megasr import manifest as M
from megasr.errors import WeightFileError

ENTRY = M.entry("depth_anything_v2_small")
URL_PATH = f"/{ENTRY.repo_id}/resolve/{ENTRY.revision}/{ENTRY.files[0].repo_file}"
GOOD = save({"pos": torch.arange(1000.0), "w": torch.ones(3, 4)})
HTML = b"<!DOCTYPE html><html><head><title>Hugging Face</title></head><body>Sign in</body></html>" * 20


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _download(tmp_path: Path, body: bytes, *, sha256=None, size=None, content_type=None) -> tuple[str, Path]:
    hub = FakeHub({URL_PATH: body})
    if content_type:
        hub.content_types[URL_PATH] = content_type
    folder = tmp_path / "megasr"
    try:
        with pytest.raises(WeightFileError) as err:
            download.ensure_weight_file(
                str(folder), "depth.safetensors", ENTRY.repo_id, sha256, allow_download=True,
                endpoint=hub.endpoint, repo_file=ENTRY.files[0].repo_file, size_bytes=size, offline=False,
                progress=False,
            )  # fmt: skip
    finally:
        hub.close()
    assert not (folder / "depth.safetensors").exists(), "a refused download was installed"
    return str(err.value), folder


def test_good_file_is_installed(tmp_path, online):
    """The control: the same path with a good file installs it (so the refusals below are the checks' doing)."""
    hub = FakeHub({URL_PATH: GOOD})
    try:
        p = download.ensure_weight_file(
            str(tmp_path), "depth.safetensors", ENTRY.repo_id, hashlib.sha256(GOOD).hexdigest(), True,
            endpoint=hub.endpoint, repo_file=ENTRY.files[0].repo_file, size_bytes=len(GOOD), offline=False,
            progress=False,
        )  # fmt: skip
    finally:
        hub.close()
    assert Path(p).read_bytes() == GOOD and os.listdir(tmp_path) == ["depth.safetensors"]


def test_html_page_with_200_is_refused(tmp_path, online):
    msg, folder = _download(tmp_path, HTML, content_type="text/html; charset=utf-8")
    assert "web page" in msg and "text/html" in msg and "login" in msg, msg
    assert os.listdir(folder) == []


def test_html_page_served_as_octet_stream_is_refused(tmp_path, online):
    msg, folder = _download(tmp_path, HTML)
    assert "web page" in msg, msg
    assert os.listdir(folder) == []


def test_wrong_size_is_refused(tmp_path, online):
    msg, folder = _download(tmp_path, GOOD, size=len(GOOD) - 10)
    assert f"has {len(GOOD)} bytes, not the expected {len(GOOD) - 10}" in msg, msg
    assert os.listdir(folder) == []


def test_wrong_sha256_is_refused(tmp_path, online):
    wrong = hashlib.sha256(b"another file").hexdigest()
    msg, folder = _download(tmp_path, GOOD, sha256=wrong)
    assert f"sha256 {hashlib.sha256(GOOD).hexdigest()}, not the expected {wrong}" in msg, msg
    assert os.listdir(folder) == []


def test_truncated_safetensors_is_refused(tmp_path, online):
    msg, folder = _download(tmp_path, GOOD[:-100])
    assert "not a valid .safetensors file" in msg and "truncated" in msg, msg
    assert os.listdir(folder) == []


def test_broken_safetensors_header_is_refused(tmp_path, online):
    """Header length within the file but not JSON (the first bytes of another format)."""
    msg, _ = _download(tmp_path, (20).to_bytes(8, "little") + b"\x00" * 40)
    assert "not valid JSON" in msg, msg


def test_pickle_and_json_headers(tmp_path):
    """The other file types: a torch.save zip and a legacy pickle pass, text does not; JSON must parse."""
    from megasr.verify import header_problem

    zip_file, legacy, text, js, bad_js = (tmp_path / n for n in ("a.pth", "b.bin", "c.bin", "d.json", "e.json"))
    torch.save({"a": torch.ones(2)}, zip_file)
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    text.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    js.write_text('{"a": 1}')
    bad_js.write_text("<html>")
    assert header_problem(str(zip_file), "x.pth") is None and header_problem(str(legacy), "x.bin") is None
    assert "neither a zip archive nor a pickle stream" in header_problem(str(text), "x.bin")
    assert header_problem(str(js), "x.json") is None and "not valid JSON" in header_problem(str(bad_js), "x.json")


def test_full_disk_removes_the_part_file(tmp_path, online):
    """A real ENOSPC from the kernel: the partial file is a link to /dev/full, whose writes fail with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    folder = tmp_path / "megasr"
    folder.mkdir()
    part = Path(download.partial_path(str(folder / "depth.safetensors")))
    part.symlink_to("/dev/full")
    msg, folder = _download(tmp_path, GOOD)
    assert "is full" in msg and "partial file was removed" in msg and "interrupted" not in msg, msg
    assert os.listdir(folder) == [], "a .part file was left on a full disk"


def test_read_only_folder_says_so(tmp_path, online, monkeypatch):
    """EROFS while opening the partial file (injected: the suite runs as root, for whom chmod does not bite)."""
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).endswith(".part") and any(c in mode for c in "wa"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(download, "open", read_only_open, raising=False)
    msg, folder = _download(tmp_path, GOOD)
    assert "read-only" in msg and "will not help" in msg and "interrupted" not in msg, msg
    assert os.listdir(folder) == []


def test_fetch_command_refuses_html_and_exits_nonzero(tmp_path, online, capsys):
    """The CLI path of the original report: exit 1, no "ok", no file, and the message says why."""
    hub = FakeHub({URL_PATH: HTML})
    hub.content_types[URL_PATH] = "text/html"
    try:
        models = tmp_path / "models"
        rc = cli.main(
            ["fetch", "--only", ENTRY.id, "--models-dir", str(models), "--endpoint", hub.endpoint, "--no-progress"]
        )
    finally:
        hub.close()
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == cli.EXIT_FAILED and "web page" in text and "ok  " not in text, text
    assert not (models / ENTRY.folder / ENTRY.files[0].name).exists()


def test_models_folder_that_cannot_be_created_says_so(tmp_path, online, monkeypatch):
    """The folder itself cannot be made (a read-only parent): the same read-only message, no traceback."""

    def read_only_makedirs(name, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(name))

    monkeypatch.setattr(download.os, "makedirs", read_only_makedirs)
    hub = FakeHub({URL_PATH: GOOD})
    try:
        with pytest.raises(WeightFileError) as err:
            download.download_file(f"{hub.endpoint}{URL_PATH}", str(tmp_path / "new" / "d.safetensors"), progress=False)
    finally:
        hub.close()
    assert "read-only" in str(err.value) and "will not help" in str(err.value)
