"""Opt-in download-on-missing in the MegaSR DAGE Loader (issue 10), in the real ComfyUI, against a fake hub.

The only public file a MegaSR loader opens is the Depth-Anything-V2-Small base of the depth LoRA (base_name).
With ``download_missing`` (off by default, the last input) a missing base is fetched through
``ensure_weight_file`` into the first megasr folder; the hub is a loopback server serving the manifest's address
(huggingface_hub's endpoint and offline mode are its own settings, patched here), never the internet.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from dage_fixtures import DEFAULT_FILENAMES, write_dage_weight_files
from fake_hub import FakeHub
from harness import comfy as hcomfy
from harness.images import write_test_image
from PIL import Image

from megasr import manifest as M

BASE = M.file_name("depth_anything_v2_small")  # the name the shipped workflows use


@pytest.fixture()
def env(comfy_runner, tmp_path: Path, restore_comfy_dirs) -> Iterator[SimpleNamespace]:
    import folder_paths

    local, target = tmp_path / "megasr_local", tmp_path / "megasr_downloads"
    paths = write_dage_weight_files(str(local), components=("dage_depth_lora",))
    comfy_runner.register_model_dir("megasr", local)
    comfy_runner.register_model_dir("megasr", target, first=True)  # downloads go to the first megasr folder
    assert folder_paths.get_full_path("megasr", BASE) is None, "the test needs the base to be missing"
    comfy_runner.set_dirs(input_dir=tmp_path / "input", output_dir=tmp_path / "out", temp_dir=tmp_path / "temp")
    write_test_image(tmp_path / "input" / "dl_lr.png", 21, 17, seed=4)
    entry = M.entry("depth_anything_v2_small")
    served = Path(paths["depth_base"]).read_bytes()
    hub = FakeHub({f"/{entry.repo_id}/resolve/{entry.revision}/{entry.files[0].repo_file}": served})
    try:
        yield SimpleNamespace(runner=comfy_runner, hub=hub, target=target, served=served)
    finally:
        hub.close()
        registered = folder_paths.folder_names_and_paths["megasr"][0]
        for folder in (local, target):
            if str(folder.resolve()) in registered:
                registered.remove(str(folder.resolve()))
        folder_paths.filename_list_cache.pop("megasr", None)


def _prompt(base_name: str, download_missing: bool | None) -> dict:
    loader = {"kind": "depth", "dage_name": DEFAULT_FILENAMES["dage_depth_lora"], "base_name": base_name}
    if download_missing is not None:
        loader["download_missing"] = download_missing
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "dl_lr.png"}},
        "2": {"class_type": "MegaSRDageLoader", "inputs": loader},
        "3": {"class_type": "MegaSRDageDepth", "inputs": {"image": ["1", 0], "dage_model": ["2", 0], "resolution": 64}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }


def _online(monkeypatch, endpoint: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def test_off_by_default_nothing_is_requested_and_the_error_says_how(env, monkeypatch) -> None:
    """Without the opt-in (input absent, or false) the missing base fails validation naming the node, the file,
    its hub source and the download_missing option, and the hub sees no request, even online. Catches a
    download that is on by default or that happens at validation."""
    _online(monkeypatch, env.hub.endpoint)
    for flag in (None, False):
        with pytest.raises(hcomfy.PromptInvalid) as e:
            env.runner.validate(_prompt(BASE, flag))
        text = str(e.value)
        assert "MegaSRDageLoader" in text or "MegaSR DAGE Loader" in text
        assert (
            f"'{BASE}' was not found in models/megasr" in text and "depth-anything/Depth-Anything-V2-Small-hf" in text
        )
        assert "set download_missing to true" in text
    assert env.hub.requests == [] and not any(env.target.iterdir())


def test_offline_the_opt_in_downloads_nothing_and_says_so(env) -> None:
    """The suite runs with HF_HUB_OFFLINE=1: with download_missing on, validation refuses the missing base at
    once, saying downloads are off, and nothing is requested. Catches ignoring huggingface_hub's offline mode."""
    with pytest.raises(hcomfy.PromptInvalid, match="download_missing is on, but huggingface_hub is offline"):
        env.runner.validate(_prompt(BASE, True))
    assert env.hub.requests == [] and not any(env.target.iterdir())


def test_opt_in_downloads_the_manifest_file_and_the_loader_uses_it(env, monkeypatch) -> None:
    """With download_missing on, the run fetches the manifest's repository file once into the first megasr folder
    under the workflow's name (no .part left), and the depth map equals the one made from the same base loaded
    from disk. Catches a wrong address or local name, a download into a folder the loader does not search, a
    partial file renamed into place, a loader that ignores the downloaded base."""
    _online(monkeypatch, env.hub.endpoint)
    result = env.runner.run(_prompt(BASE, True))
    assert [p for p, _ in env.hub.requests] == [next(iter(env.hub.files))]
    assert sorted(os.listdir(env.target)) == [BASE]
    assert (env.target / BASE).read_bytes() == env.served
    reference = env.runner.run(_prompt("tiny_depth_anything_base.safetensors", False))
    got, want = (np.asarray(Image.open(r.images("4")[0])) for r in (result, reference))
    assert got.shape == (17, 21, 3) and np.array_equal(got, want)
    assert len(env.hub.requests) == 1
