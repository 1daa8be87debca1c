"""megasr.weights: save/load round trip, atomic writes, and a table of malformed files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import save_file

from megasr import download as D
from megasr import weights as W
from megasr.errors import WeightFileError
from megasr.files import sha256_file

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
    assert sha256_file(str(p)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub out of offline mode (the suite runs with HF_HUB_OFFLINE=1); only the fake hub is reached."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub():
    from safetensors.torch import save

    # a real safetensors file of about 1 MB (several chunks): the download's header check passes it
    payload = save({"w": torch.arange(250_000, dtype=torch.float32)})
    hub = FakeHub({"/org/megasr/resolve/main/weights/model.safetensors": payload})
    hub.payload = payload
    hub.sha = hashlib.sha256(payload).hexdigest()
    yield hub
    hub.close()


def test_ensure_weight_file_downloads_from_the_hub_checked_and_atomic(tmp_path, fake_hub, online):
    """A good file arrives complete under its local name (taken from the repository path), with nothing left
    beside it; an existing file is returned without a request. Catches a wrong URL layout, a missing rename,
    temp files left behind, re-downloading what is there."""
    folder = tmp_path / "models" / "megasr"
    args = dict(endpoint=fake_hub.endpoint, repo_file="weights/model.safetensors", progress=False)
    p = D.ensure_weight_file(str(folder), "local.safetensors", "org/megasr", fake_hub.sha, True, **args)
    assert p == str(folder / "local.safetensors") and open(p, "rb").read() == fake_hub.payload
    assert os.listdir(folder) == ["local.safetensors"]
    assert fake_hub.requests == [("/org/megasr/resolve/main/weights/model.safetensors", None)]
    assert D.ensure_weight_file(str(folder), "local.safetensors", "org/megasr", fake_hub.sha, True, **args) == p
    assert len(fake_hub.requests) == 1


def test_wrong_sha256_deletes_the_download(tmp_path, fake_hub, online):
    """A file whose hash differs from the manifest's is deleted, never renamed into place."""
    folder = tmp_path / "m"
    with pytest.raises(WeightFileError, match="not the expected 0000.*it was deleted"):
        D.ensure_weight_file(
            str(folder),
            "x.safetensors",
            "org/megasr",
            "0" * 64,
            True,
            endpoint=fake_hub.endpoint,
            repo_file="weights/model.safetensors",
            progress=False,
        )
    assert os.listdir(folder) == []


def test_interrupted_download_resumes_with_a_range_request(tmp_path, fake_hub, online):
    """A connection that drops mid-file keeps the bytes in a .part file and raises a clear error; the next call
    asks only for the rest (Range: bytes=N-) and the result is byte-identical. Catches restarting from zero,
    appending a second full copy, or renaming a partial file into place."""
    folder = tmp_path / "m"
    args = dict(endpoint=fake_hub.endpoint, repo_file="weights/model.safetensors", progress=False)
    fake_hub.cut_after = 300_000
    with pytest.raises(D.WeightFileMissingError, match="interrupted.*300000 bytes are kept"):
        D.ensure_weight_file(str(folder), "x.safetensors", "org/megasr", fake_hub.sha, True, **args)
    assert not (folder / "x.safetensors").exists()
    assert os.path.getsize(D.partial_path(str(folder / "x.safetensors"))) == 300_000
    p = D.ensure_weight_file(str(folder), "x.safetensors", "org/megasr", fake_hub.sha, True, **args)
    assert fake_hub.requests[-1][1] == "bytes=300000-"
    assert open(p, "rb").read() == fake_hub.payload
    assert os.listdir(folder) == ["x.safetensors"]


def test_offline_and_not_allowed_name_file_folder_and_source(tmp_path, fake_hub):
    """Offline (huggingface_hub's HF_HUB_OFFLINE, as the suite runs) or without permission nothing is requested
    and the message names the file, the folder and the address to get it from."""
    folder = tmp_path / "models" / "megasr"
    with pytest.raises(
        D.WeightFileMissingError, match=r"'x.safetensors' is not in the folder '.*models/megasr'.*allow automatic"
    ):
        D.ensure_weight_file(str(folder), "x.safetensors", "org/megasr", None, False, endpoint=fake_hub.endpoint)
    with pytest.raises(
        D.WeightFileMissingError,
        match=r"downloads are off.*https://huggingface.co/org/megasr/resolve/main/weights/model.safetensors",
    ):
        D.ensure_weight_file(
            str(folder),
            "x.safetensors",
            "org/megasr",
            None,
            True,
            endpoint=fake_hub.endpoint,
            repo_file="weights/model.safetensors",
        )
    assert fake_hub.requests == [] and not folder.exists()


def test_verify_existing_catches_a_changed_file(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"changed")
    with pytest.raises(WeightFileError, match="does not match the expected"):
        D.ensure_weight_file(str(tmp_path), "m.safetensors", "org/x", "0" * 64, False, verify_existing=True)


def test_hub_error_is_clear(tmp_path, fake_hub, online):
    with pytest.raises(D.WeightFileMissingError, match="HTTP 404"):
        D.ensure_weight_file(
            str(tmp_path), "m.safetensors", "org/x", None, True, endpoint=fake_hub.endpoint, progress=False
        )
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- manifest and `python -m megasr`


def test_manifest_entries_are_well_formed():
    """Every entry says where its files go and how to get them: a hub repository file for each file, or the
    training and export commands. Catches an entry without a source, a duplicate id or file, a bad hash."""
    from megasr import manifest as M

    entries = M.load_manifest()
    assert len({e.id for e in entries}) == len(entries)
    seen = set()
    for e in entries:
        assert e.what and e.used_by and e.licence and e.size and e.verified and e.folder
        for f in e.files:
            key = (e.folder, f.name)
            assert key not in seen, key
            seen.add(key)
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0)
            if e.on_hub:
                assert f.repo_file and "/" in e.repo_id
            elif e.public:  # published outside the hub (the metric weights): a direct address
                assert f.url and f.url.startswith("https://")
            else:
                assert e.source["train"].startswith("python -m training ")
                assert e.source["export"].startswith("python -m training export ") and f.name in e.source["export"]
    assert {e.id for e in entries if e.needed_for_nodes and e.public} == {
        "sd2_base",
        "clip_vision_h14",
        "depth_anything_v2_small",
    }


def test_fetch_command_downloads_the_manifest_files_from_the_hub(tmp_path, online, capsys):
    """``python -m megasr fetch --only ...`` takes the repository paths and local names from the manifest, and
    converts a .bin state dict to safetensors (torch.load weights_only). Catches the CLI ignoring the manifest's
    names, a wrong folder, a conversion that changes tensors."""
    from megasr import __main__ as cli
    from megasr import manifest as M

    depth = M.entry("depth_anything_v2_small")
    seg = M.entry("mask2former_ade_tiny")
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    bin_path = tmp_path / "p.bin"
    torch.save(state, bin_path)
    from safetensors.torch import save

    depth_bytes = save({"pos": torch.arange(5.0)})
    files = {f"/{depth.repo_id}/resolve/main/{depth.files[0].repo_file}": depth_bytes}
    for f in seg.files:
        files[f"/{seg.repo_id}/resolve/main/{f.repo_file}"] = bin_path.read_bytes() if f.convert_to else b"{}"
    hub = FakeHub(files)
    try:
        models = tmp_path / "models"
        argv = ["fetch", "--only", depth.id, seg.id, "--models-dir", str(models), "--endpoint", hub.endpoint]
        assert cli.main([*argv, "--no-progress"]) == 0
        assert (models / "megasr" / "depth_anything_v2_small.safetensors").read_bytes() == depth_bytes
        seg_dir = models / "megasr_training" / "mask2former-swin-tiny-ade-semantic"
        from safetensors.torch import load_file

        got = load_file(str(seg_dir / "model.safetensors"))
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
        n = len(hub.requests)
        assert cli.main([*argv, "--no-progress"]) == 0  # everything present: nothing requested again
        assert len(hub.requests) == n
    finally:
        hub.close()


def test_fetch_offline_lists_every_missing_file_with_folder_and_source(tmp_path, capsys):
    """Offline (HF_HUB_OFFLINE, as the suite runs) fetch downloads nothing and lists, at once, every file the
    nodes need: target path and address for the public ones, the training command for MegaSR's own; exit 2."""
    from megasr import __main__ as cli

    models = tmp_path / "models"
    assert cli.main(["fetch", "--models-dir", str(models)]) == 2
    out = capsys.readouterr().out
    assert f"{models}/checkpoints/512-base-ema.safetensors" in out
    assert "https://huggingface.co/stabilityai/stable-diffusion-2-base/resolve/main/512-base-ema.safetensors" in out
    assert f"{models}/clip_vision/CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in out
    assert "h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors" in out
    assert f"{models}/megasr/depth_anything_v2_small.safetensors" in out
    assert "python -m training export --from megasr" in out and "megasr_dage_seg.safetensors" in out
    assert not models.exists()


def test_check_honours_extra_model_paths_yaml(tmp_path, capsys):
    """A file that sits in a folder named by extra_model_paths.yaml counts as present."""
    from megasr import __main__ as cli

    (tmp_path / "elsewhere" / "ckpts").mkdir(parents=True)
    (tmp_path / "elsewhere" / "ckpts" / "512-base-ema.safetensors").write_bytes(b"x")
    cfg = tmp_path / "extra.yaml"
    cfg.write_text("mine:\n    base_path: elsewhere\n    checkpoints: ckpts\n")
    argv = ["check", "--only", "sd2_base", "--models-dir", str(tmp_path / "models")]
    assert cli.main(argv) == 2
    assert cli.main([*argv, "--extra-model-paths-config", str(cfg)]) == 0


def test_readme_getting_weights_table_is_the_manifest():
    """README's "Getting weights" table is generated from the manifest (scripts/build_workflows.py writes it)."""
    from megasr import manifest as M

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert M.markdown_table() in readme
