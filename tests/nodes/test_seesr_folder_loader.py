"""The MegaSR Model Loader takes SeeSR's published folders directly (issue 25): a folder holding ``unet/`` and
``controlnet/`` (diffusers layout, as SeeSR publishes ``preset/models/seesr``) placed in the megasr model folder is
listed as ``name/`` and converted in memory exactly as ``python -m megasr convert-seesr`` converts it. Real ComfyUI
0.3.75, the tiny SeeSR-layout folder of tests/fixtures/seesr_fixtures.py (safetensors, and the published ``.bin``
pickles read with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from harness.comfy import ExecutionFailed
from harness.images import load_image_array
from harness.workflow import find_nodes
from megasr_fixtures import models_dir
from safetensors.torch import load_file
from seesr_fixtures import SEESR_NAME, ensure_tiny_seesr_folder, seesr_env, seesr_prompt

WHERE = "MegaSR Model Loader"
FOLDERS = "megasr_seesr_folders"  # a second megasr model folder, registered for this module only


def _pack(module: str):
    import importlib

    import nodes as comfy_nodes

    base = comfy_nodes.NODE_CLASS_MAPPINGS["MegaSRSampler"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(f"{base}.{module}")


def _place(root, name: str, *, bin_files: bool = False, drop: str | None = None, drop_key: str | None = None) -> None:
    """Copy the tiny SeeSR folder to ``root/name``: weights as published ``.bin`` pickles when asked, without the
    part ``drop``, or with the ControlNet lacking the tensor ``drop_key``."""
    src = ensure_tiny_seesr_folder()
    dst = root / name
    shutil.rmtree(dst, ignore_errors=True)
    for part in ("unet", "controlnet"):
        if part == drop:
            continue
        (dst / part).mkdir(parents=True)
        shutil.copyfile(src / part / "config.json", dst / part / "config.json")
        state = load_file(str(src / part / "diffusion_pytorch_model.safetensors"))
        if part == "controlnet" and drop_key is not None:
            del state[drop_key]
        if bin_files:
            torch.save(state, dst / part / "diffusion_pytorch_model.bin")
        else:
            from safetensors.torch import save_file

            save_file(state, str(dst / part / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    import folder_paths

    e = seesr_env(comfy_runner, tiny_sd2_ckpt, object_info)
    root = models_dir(FOLDERS)
    shutil.rmtree(root, ignore_errors=True)
    _place(root, "seesr")
    _place(root / "preset" / "models", "seesr", bin_files=True)  # SeeSR's own repository layout, .bin weights
    _place(root, "seesr_no_unet", drop="unet")
    comfy_runner.register_model_dir("megasr", root, first=False)
    yield e
    folder_paths.folder_names_and_paths["megasr"][0].remove(str(root.resolve()))
    folder_paths.filename_list_cache.pop("megasr", None)


def _state(managed) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in managed.patcher.model.state_dict().items()}


def test_seesr_folders_are_listed_and_their_part_files_are_not(env):
    choices = _pack("nodes.runtime.folders").megasr_model_choices()
    assert {"seesr/", "preset/models/seesr/", "seesr_no_unet/"} <= set(choices)
    assert SEESR_NAME in choices
    assert not [c for c in choices if "diffusion_pytorch_model" in c]


@pytest.mark.parametrize("folder", ["seesr/", "preset/models/seesr/"])
def test_loading_the_folder_gives_the_converted_files_tensors(env, folder):
    """The folder (safetensors, or the published .bin pickles) through the node == the convert-seesr file through
    the node: same keys, dtypes and values bit for bit, same config (representation branch included)."""
    loader = _pack("nodes.loaders").MegaSRModelLoader
    from_file = loader.execute(SEESR_NAME).args[0]
    from_folder = loader.execute(folder).args[0]
    a, b = _state(from_file), _state(from_folder)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert from_folder.module.config == from_file.module.config
    assert from_folder.module.config.representation_dim == 512
    assert from_folder.dtype == from_file.dtype
    # the branch really came from the folder (not zeros or a seed's values)
    branch = [k for k in b if "image_attentions" in k and k.endswith("to_q.weight")]
    assert branch and all(b[k].abs().sum() > 0 for k in branch)


def test_seesr_x4_with_the_folder_gives_the_same_image_as_with_the_converted_file(env):
    """The shipped seesr_x4 workflow, its loader pointed at the folder, runs in the executor (validation included)
    and upscales exactly as with the converted file."""

    def run(name: str, prefix: str) -> np.ndarray:
        p = seesr_prompt(env, **{"MegaSRModelLoader.megasr_name": name, "SaveImage.filename_prefix": prefix})
        result = env[0].run(p)
        (path,) = result.images(find_nodes(p, "SaveImage")[0])
        return load_image_array(path)

    np.testing.assert_array_equal(run("seesr/", "folder"), run(SEESR_NAME, "file"))


def test_an_incomplete_folder_is_refused_at_validation_naming_node_input_and_part(env):
    """ComfyUI's own prompt validation (as ``POST /prompt``) rejects the loader's value, saying which part lacks; the
    SaveImage branch is not run (the RAM Tags node, an output node too, may still be)."""
    import asyncio

    import execution

    p = seesr_prompt(env, **{"MegaSRModelLoader.megasr_name": "seesr_no_unet/"})
    (loader,) = find_nodes(p, "MegaSRModelLoader")
    (save,) = find_nodes(p, "SaveImage")
    _, _, outputs, node_errors = asyncio.run(execution.validate_prompt("incomplete", p, None))
    assert save not in outputs
    msg = " ".join(f"{e.get('message')} {e.get('details')}" for e in node_errors[loader]["errors"])
    assert WHERE in msg and "megasr_name" in msg and "'unet/'" in msg and "seesr_no_unet" in msg


def test_a_folder_missing_controlnet_tensors_fails_naming_node_and_input(env):
    key = "controlnet_down_blocks.0.weight"
    _place(models_dir(FOLDERS), "seesr_partial", drop_key=key)
    p = seesr_prompt(env, **{"MegaSRModelLoader.megasr_name": "seesr_partial/"})
    with pytest.raises(ExecutionFailed) as e:
        env[0].run(p)
    assert e.value.node_type == "MegaSRModelLoader"
    msg = e.value.exception_message
    assert WHERE in msg and "megasr_name" in msg and key in msg
