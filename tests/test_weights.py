"""megasr.weights: save/load round trip, atomic writes, and a table of malformed files."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

from megasr import weights as W
from megasr.errors import WeightFileError

BASE = {"family": "sd2", "context_dim": 1024, "model_channels": 320}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(4, 3, generator=g),
        "a.bias": torch.randn(4, generator=g).to(torch.float16),
        "b.weight": torch.randn(2, 5, 3, generator=g).to(torch.bfloat16),
        "c.index": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d.mask": torch.tensor([True, False, True]),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


class Tiny(torch.nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 4)
        self.b = torch.nn.Linear(4, width)


def _good(tmp_path, name="good.safetensors", component="controlnet", config=None) -> str:
    p = str(tmp_path / name)
    W.save_weight_file(p, _tensors(), component, config if config is not None else {"base": BASE, "x": 1}, {"run": "t"})
    return p


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(ints[t.element_size()]) if t.is_floating_point() else t


def test_round_trip_exact(tmp_path):
    p = _good(tmp_path)
    state, info = W.load_weight_file(p, "controlnet")
    src = _tensors()
    assert set(state) == set(src)
    for k, v in src.items():
        assert state[k].dtype == v.dtype and state[k].shape == v.shape
        assert torch.equal(_bits(state[k]), _bits(v))
    assert info.component == "controlnet" and info.format == W.FORMAT_VERSION
    assert info.config == {"base": BASE, "x": 1} and info.provenance == {"run": "t"}
    assert info.tensors["b.weight"] == ((2, 5, 3), "BF16")
    assert info.base == BASE
    assert W.detect_component(p) == "controlnet"
    assert "controlnet" in W.read_weight_header(p).describe() or "MegaSR" in W.read_weight_header(p).describe()
    W.check_base(info, BASE)


def test_shared_and_noncontiguous_tensors_save(tmp_path):
    base = torch.randn(4, 6)
    p = str(tmp_path / "s.safetensors")
    W.save_weight_file(p, {"x": base, "y": base, "t": base.t(), "part": base[1:3]}, "dage_hed", {})
    st, _ = W.load_weight_file(p)
    assert torch.equal(st["y"], base) and torch.equal(st["t"], base.t()) and torch.equal(st["part"], base[1:3])


def test_refuses_overwrite_and_atomic(tmp_path, monkeypatch):
    p = _good(tmp_path)
    before = open(p, "rb").read()
    with pytest.raises(FileExistsError, match="already exists; refusing to overwrite"):
        W.save_weight_file(p, {"z": torch.zeros(1)}, "controlnet", {})

    # An interrupted write (failure after the temp file is written) leaves the old file intact.
    def boom(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(W.os, "fsync", boom)
    with pytest.raises(OSError, match="disk gone"):
        W.save_weight_file(p, {"z": torch.zeros(1)}, "controlnet", {}, overwrite=True)
    monkeypatch.undo()
    assert open(p, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]  # no temp file left

    W.save_weight_file(p, {"z": torch.zeros(1)}, "controlnet", {}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["good.safetensors"]
    assert list(W.load_weight_file(p)[0]) == ["z"]


def test_bad_component_name_and_config_refused_on_save(tmp_path):
    with pytest.raises(ValueError, match="unknown component"):
        W.save_weight_file(str(tmp_path / "x.safetensors"), {}, "unet", {})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        W.save_weight_file(str(tmp_path / "x.safetensors"), {}, "dage_hed", {"f": object()})
    assert not os.listdir(tmp_path)


def _write_raw(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)


def _meta(**over) -> dict:
    m = {
        W.META_FORMAT: "1",
        W.META_COMPONENT: "dage_hed",
        W.META_CONFIG: json.dumps({"base": BASE}),
        W.META_PROVENANCE: "{}",
    }
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def _make_case(tmp_path, case: str) -> str:
    p = str(tmp_path / f"{case}.safetensors")
    good = _good(tmp_path, "src.safetensors", component="dage_hed")
    raw = open(good, "rb").read()
    (hlen,) = struct.unpack("<Q", raw[:8])
    if case == "empty":
        open(p, "wb").close()
    elif case == "trunc_in_length":
        open(p, "wb").write(raw[:5])
    elif case == "trunc_in_header":
        open(p, "wb").write(raw[: 8 + hlen // 2])
    elif case == "trunc_in_data":
        open(p, "wb").write(raw[: 8 + hlen + 10])
    elif case == "trunc_last_byte":
        open(p, "wb").write(raw[:-1])
    elif case == "random_bytes":
        open(p, "wb").write(
            bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(1)).to(torch.uint8).tolist())
        )
    elif case == "text_file":
        open(p, "wb").write(b"\x20\x00\x00\x00\x00\x00\x00\x00this is not json at all, sorry..")
    elif case == "plain_safetensors":
        save_file({"w": torch.zeros(2)}, p)
    elif case == "plain_sd_checkpoint":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, p)
    elif case == "future_format":
        _write_raw(p, {"__metadata__": _meta(**{W.META_FORMAT: "7"})}, b"")
    elif case == "format_not_int":
        _write_raw(p, {"__metadata__": _meta(**{W.META_FORMAT: "one"})}, b"")
    elif case == "config_not_json":
        _write_raw(p, {"__metadata__": _meta(**{W.META_CONFIG: "{base: sd2"})}, b"")
    elif case == "unknown_component":
        _write_raw(p, {"__metadata__": _meta(**{W.META_COMPONENT: "dage_normal"})}, b"")
    elif case == "wrong_component":
        return good
    elif case == "bad_tensor_size":
        _write_raw(
            p, {"__metadata__": _meta(), "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\x00" * 8
        )
    else:
        raise AssertionError(case)
    return p


MALFORMED = [
    ("empty", "only 0 bytes long"),
    ("trunc_in_length", "only 5 bytes long"),
    ("trunc_in_header", "truncated: the header says"),
    ("trunc_in_data", "truncated: the tensors need"),
    ("trunc_last_byte", "truncated: the tensors need"),
    ("random_bytes", "not a safetensors file"),
    ("text_file", "header is not JSON"),
    ("plain_safetensors", "not a MegaSR weight file"),
    ("plain_sd_checkpoint", "looks like a Stable Diffusion checkpoint"),
    ("future_format", r"made by a newer MegaSR \(weight format 7"),
    ("format_not_int", "bad megasr.format"),
    ("config_not_json", "megasr.config metadata is not valid JSON"),
    ("unknown_component", "unknown MegaSR component 'dage_normal'"),
    ("wrong_component", "this is a dage_hed file .*but this loader needs controlnet"),
    ("bad_tensor_size", "has 8 bytes"),
]


@pytest.mark.parametrize("case,message", MALFORMED, ids=[c for c, _ in MALFORMED])
def test_malformed_files(tmp_path, case, message):
    p = _make_case(tmp_path, case)
    with pytest.raises(WeightFileError, match=message) as ei:
        W.load_weight_file(p, "controlnet")
    assert ei.value.path == p and os.path.basename(p) in str(ei.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(WeightFileError, match="does not exist"):
        W.read_weight_header(str(tmp_path / "nope.safetensors"))
    with pytest.raises(WeightFileError, match="folder"):
        W.read_weight_header(str(tmp_path))


def test_detect_component_ignores_name(tmp_path):
    p = str(tmp_path / "controlnet_megasr.safetensors")
    W.save_weight_file(p, {"w": torch.zeros(1)}, "dage_seg", {})
    assert W.detect_component(p) == "dage_seg"
    q = str(tmp_path / "dage_hed.safetensors")
    save_file({"w": torch.zeros(1)}, q)
    assert W.detect_component(q) is None
    state, info = W.load_weight_file(p, ("dage_seg", "dage_hed"))
    assert info.component == "dage_seg"


STATE_CASES = [
    (
        "shape",
        lambda sd: {**sd, "b.weight": torch.zeros(5, 4)},
        r"1 shape mismatch: b.weight \(file \[5, 4\], model \[3, 4\]\)",
    ),
    (
        "missing",
        lambda sd: {k: v for k, v in sd.items() if not k.startswith("a.")},
        r"2 missing keys: a.bias, a.weight",
    ),
    ("unexpected", lambda sd: {**sd, "c.weight": torch.zeros(1)}, r"1 unexpected key: c.weight"),
    (
        "many_missing",
        lambda sd: {},
        r"4 missing keys: a.bias, a.weight, b.bias, b.weight",
    ),
]


@pytest.mark.parametrize("case,edit,message", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_check_state_dict(case, edit, message):
    m = Tiny()
    sd = edit(m.state_dict())
    with pytest.raises(WeightFileError, match=message):
        W.check_state_dict(m, sd, "x.safetensors")


def test_check_state_dict_ok_and_allowances():
    m = Tiny()
    W.check_state_dict(m, m.state_dict(), "x")
    W.check_state_dict(m, {"b.weight": torch.zeros(3, 4), "b.bias": torch.zeros(3)}, "x", allow_missing=("a.",))
    W.check_state_dict(
        {"k": (2, 3)}, {"k": torch.zeros(2, 3), "lora.x": torch.zeros(1)}, "x", allow_unexpected=("lora.",)
    )
    many = {f"k{i}": torch.zeros(1) for i in range(9)}
    with pytest.raises(WeightFileError, match=r"9 unexpected keys: k0, k1, k2, k3, \.\.\. \(5 more\)"):
        W.check_state_dict(m, {**m.state_dict(), **many}, "x")


def test_check_base(tmp_path):
    info = W.read_weight_header(_good(tmp_path, config={"base": {**BASE, "context_dim": 768}}))
    with pytest.raises(WeightFileError, match=r"made for another base model: context_dim=768 \(needed 1024\)"):
        W.check_base(info, BASE)
    info2 = W.read_weight_header(_good(tmp_path, "nobase.safetensors", config={}))
    with pytest.raises(WeightFileError, match="does not say which base model"):
        W.check_base(info2, BASE)


def test_bad_provenance_is_tolerated(tmp_path, caplog):
    p = str(tmp_path / "p.safetensors")
    _write_raw(p, {"__metadata__": _meta(**{W.META_PROVENANCE: "not json"})}, b"")
    info = W.read_weight_header(p)
    assert info.provenance == {"unparsed": "not json"}


# ------------------------------------------------------------------------------- ensure_weight_file


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert W.sha256_file(str(p)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_ensure_weight_file_paths(tmp_path, monkeypatch):
    hub = tmp_path / "hub" / "org" / "megasr"
    hub.mkdir(parents=True)
    payload = b"weights!" * 100
    (hub / "model.safetensors").write_bytes(payload)
    good_sha = W.sha256_file(str(hub / "model.safetensors"))
    folder = tmp_path / "models" / "megasr"
    url = (tmp_path / "hub").as_uri()

    # missing and not allowed: names the file and the folder
    with pytest.raises(
        W.WeightFileMissingError,
        match=r"'model.safetensors' is not in the folder '.*models/megasr'.*allow automatic download",
    ):
        W.ensure_weight_file(str(folder), "model.safetensors", "org/megasr", good_sha, allow_download=False)

    # offline (HF_HUB_OFFLINE) and a real hub: clear message, nothing attempted
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(W.WeightFileMissingError, match=r"HF_HUB_OFFLINE.*org/megasr"):
        W.ensure_weight_file(str(folder), "model.safetensors", "org/megasr", good_sha, allow_download=True)

    # sha mismatch: deleted, clear error, nothing left behind
    with pytest.raises(WeightFileError, match="not the expected 0000.*it was deleted"):
        W.ensure_weight_file(str(folder), "model.safetensors", "org/megasr", "0" * 64, True, base_url=url)
    assert os.listdir(folder) == []

    # download from the local fake hub, verified
    p = W.ensure_weight_file(str(folder), "model.safetensors", "org/megasr", good_sha, True, base_url=url)
    assert p == str(folder / "model.safetensors") and open(p, "rb").read() == payload
    assert os.listdir(folder) == ["model.safetensors"]

    # present: returned without a download; verify_existing catches a changed file
    assert W.ensure_weight_file(str(folder), "model.safetensors", None, None, False) == p
    (folder / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(WeightFileError, match="does not match the expected"):
        W.ensure_weight_file(str(folder), "model.safetensors", "org/megasr", good_sha, False, verify_existing=True)

    # source missing in the fake hub
    with pytest.raises(W.WeightFileMissingError, match="does not exist to copy it from"):
        W.ensure_weight_file(str(folder), "other.safetensors", "org/megasr", None, True, base_url=url)


def test_ensure_weight_file_hub_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    def fail(**kw):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(
        W.WeightFileMissingError,
        match=r"downloading it from the Hugging Face repository 'org/x' failed \(ConnectionError",
    ):
        W.ensure_weight_file(str(tmp_path), "m.safetensors", "org/x", None, True)
    assert os.listdir(tmp_path) == []
