"""Model ownership like core ComfyUI (issue 15): the MegaSR loader's patcher class, storage and compute dtype as
model management picks them for each U-Net precision flag, and the multi-GPU deep clone of MegaSRControl."""

from __future__ import annotations

import pytest
import torch
from megasr_fixtures import MEGASR_NAME, megasr_env


@pytest.fixture(scope="module")
def env(comfy_runner, tiny_sd2_ckpt, object_info):
    return megasr_env(comfy_runner, tiny_sd2_ckpt, object_info)


def _nodes():
    import nodes as comfy_nodes

    return comfy_nodes.NODE_CLASS_MAPPINGS


def _load(monkeypatch, flag: str | None):
    import comfy.model_management

    for name in ("fp16_unet", "bf16_unet", "fp8_e4m3fn_unet"):
        monkeypatch.setattr(comfy.model_management.args, name, name == flag)
    return _nodes()["MegaSRModelLoader"].execute(MEGASR_NAME).args[0]


@pytest.mark.parametrize(
    ("flag", "storage"),
    [(None, torch.float32), ("fp16_unet", torch.float16), ("bf16_unet", torch.bfloat16),
     ("fp8_e4m3fn_unet", torch.float8_e4m3fn)],
)  # fmt: skip
def test_loader_stores_as_the_unet_flag_says_and_computes_in_what_the_cpu_supports(env, monkeypatch, flag, storage):
    """Catches a loader that ignores --fp16-unet & co. (storage), or computes in a dtype the CPU lacks ops for
    (ComfyUI's own manual-cast rule gives float32 on CPU), or builds a plain ModelPatcher where core uses
    CoreModelPatcher."""
    import comfy.model_patcher

    managed = _load(monkeypatch, flag)
    assert {p.dtype for p in managed.module.parameters()} == {storage}
    assert managed.dtype == torch.float32
    expected_cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    assert type(managed.patcher) is expected_cls
    layers = [m for m in managed.module.modules() if hasattr(m, "comfy_cast_weights")]
    assert len(layers) > 100 and all(m.comfy_cast_weights for m in layers)  # manual-cast ops everywhere


def test_control_deep_clone_for_another_device_is_independent_and_recognised(env, monkeypatch):
    """The newest ComfyUI calls deepclone_multigpu on every ControlBase for multi-GPU sampling (the base raises
    NotImplementedError). Catches a clone that shares the module (one device moves both), loses the maps or
    the dtype, or gets a new identity so the CISM² binding would refuse it as 'a different MegaSR model'."""
    megasr = _load(monkeypatch, None)
    lr = torch.rand(1, 8, 10, 3, generator=torch.Generator().manual_seed(0))
    cond = [[torch.zeros(1, 7, 1024), {}]]
    pos, _ = (
        _nodes()["MegaSRGuidanceFusion"].execute(cond, cond, megasr, lr, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, depth=lr).args
    )
    control = pos[0][1]["control"]
    clone = control.deepclone_multigpu(torch.device("cpu"), autoregister=True)
    assert type(clone) is type(control) and control.multigpu_clones[torch.device("cpu")] is clone
    assert clone.megasr.module is not control.megasr.module
    assert clone.megasr.owner_id == control.megasr.owner_id and clone.megasr.dtype == control.megasr.dtype
    assert clone.megasr.patcher.load_device == torch.device("cpu")
    assert clone.megasr.patcher in clone.get_models() and clone.maps is control.maps
    a = dict(control.megasr.module.state_dict())
    for k, v in clone.megasr.module.state_dict().items():
        assert torch.equal(v, a[k]) and v.data_ptr() != a[k].data_ptr(), k
