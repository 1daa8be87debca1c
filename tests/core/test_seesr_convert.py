"""``python -m megasr convert-seesr`` (megasr/seesr_weights.py): SeeSR's published folders -> one MegaSR weight file.

Uses the SeeSR-layout fixture folder tests/fixtures/seesr/tiny (SeeSR's key names, see its README). The noise
prediction of the converted file against SeeSR's own reference is checked through the pack's ComfyUI control in
tests/nodes/test_seesr_workflow.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from megasr.__main__ import main
from megasr.model_io import read_megasr_file
from megasr.weights import read_weight_header

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "seesr" / "tiny"


def test_converted_file_holds_every_seesr_tensor_under_its_name_and_megasr_parts_at_zero_init(tmp_path) -> None:
    """Every tensor of SeeSR's controlnet/ is in the file unchanged under ``controlnet.<name>``, every branch tensor of
    its unet/ under ``unet_representation.<name>``; SeeSR's base U-Net is not (the user's SD-2 checkpoint is the
    base); the metadata says representation_dim 512 and the fixture's U-Net; the rest is MegaSR's own parts
    (CISM², MS-GAM), some of them zero. Catches a dropped or renamed key, a branch left out, the base U-Net copied in."""
    out = tmp_path / "seesr.safetensors"
    assert main(["convert-seesr", str(TINY), str(out)]) == 0
    state, config = read_megasr_file(str(out))
    assert config.representation_dim == 512
    assert config.unet["block_out_channels"] == [32, 64, 32]
    assert read_weight_header(str(out)).provenance["made_by"] == "python -m megasr convert-seesr"
    cn = load_file(str(TINY / "controlnet" / "diffusion_pytorch_model.safetensors"))
    unet = load_file(str(TINY / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in cn.items():
        torch.testing.assert_close(state[f"controlnet.{k}"], v.float(), atol=0, rtol=0)
    branch = {k: v for k, v in unet.items() if "image_attentions" in k}
    assert branch
    for k, v in branch.items():
        torch.testing.assert_close(state[f"unet_representation.{k}"], v.float(), atol=0, rtol=0)
    ours = {k for k in state if k.startswith(("controlnet.", "unet_representation."))}
    assert ours == {f"controlnet.{k}" for k in cn} | {f"unet_representation.{k}" for k in branch}
    rest = {k: v for k, v in state.items() if k not in ours}
    zero = [k for k, v in rest.items() if torch.count_nonzero(v) == 0]
    assert zero, "no zero-initialised MegaSR part found"
    from megasr.model import MegaSRModel

    with torch.device("meta"):
        fresh = MegaSRModel(config).state_dict()
    assert set(rest) == {k for k in fresh if not k.startswith(("controlnet.", "unet_representation."))}


def test_conversion_is_reproducible_and_refuses_bad_folders_and_overwrites(tmp_path, capsys) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["convert-seesr", str(TINY), str(a)]) == 0
    assert main(["convert-seesr", str(TINY), str(b)]) == 0
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same folder, same weights
    assert main(["convert-seesr", str(TINY), str(a)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().out
    assert main(["convert-seesr", str(TINY), str(a), "--overwrite"]) == 0

    broken = tmp_path / "seesr"
    shutil.copytree(TINY, broken)
    shutil.rmtree(broken / "controlnet")
    assert main(["convert-seesr", str(broken), str(tmp_path / "c.safetensors")]) == 2
    assert "controlnet/config.json" in capsys.readouterr().out
    assert not (tmp_path / "c.safetensors").exists()

    # a ControlNet that lacks SeeSR's branch (a plain diffusers ControlNet) is refused, not written half-mapped
    shutil.copytree(TINY / "controlnet", broken / "controlnet")
    state = load_file(str(broken / "controlnet" / "diffusion_pytorch_model.safetensors"))
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in state.items() if "image_attentions" not in k},
        str(broken / "controlnet" / "diffusion_pytorch_model.safetensors"),
    )
    assert main(["convert-seesr", str(broken), str(tmp_path / "d.safetensors")]) == 2
    assert "lacks" in capsys.readouterr().out
    assert not (tmp_path / "d.safetensors").exists()
