"""MegaSR weight files: save, read, validate (DESIGN.md section 5).

One safetensors file per component. Its ``__metadata__`` holds

- ``megasr.format``: integer format version (:data:`FORMAT_VERSION`),
- ``megasr.component``: one of :data:`COMPONENTS`,
- ``megasr.config``: JSON of the module config (for the ``controlnet`` component a ``base`` dict such as
  ``{"family": "sd2", "context_dim": 1024, "model_channels": 320}`` names the base model),
- ``megasr.provenance``: JSON describing the training run (free form).

Files are written atomically (temp file in the same folder, fsync, ``os.replace``) and never
overwritten unless asked. Readers validate the raw safetensors header themselves so that a truncated
or foreign file gets a precise message instead of a library traceback. What a file *is* is decided
from its metadata (and, for foreign files, its keys), never from its name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import WeightFileError
from .verify import download_os_error, verify_download

log = logging.getLogger("megasr")

FORMAT_VERSION = 1

COMPONENTS: tuple[str, ...] = ("controlnet", "dage_hed", "dage_depth_lora", "dage_seg", "dage_clip_lora")

COMPONENT_DESCRIPTIONS: dict[str, str] = {
    "controlnet": "the MegaSR model (ControlNet + CISM² + MS-GAM)",
    "dage_hed": "the DAGE HED edge extractor",
    "dage_depth_lora": "the DAGE depth LoRA (Depth-Anything-V2)",
    "dage_seg": "the DAGE segmentation extractor (Mask2Former)",
    "dage_clip_lora": "the DAGE CLIP image-semantics LoRA (ViT-H/14)",
}

META_FORMAT = "megasr.format"
META_COMPONENT = "megasr.component"
META_CONFIG = "megasr.config"
META_PROVENANCE = "megasr.provenance"

# safetensors dtype names -> bytes per element
_DTYPE_SIZES: dict[str, float] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

_MAX_HEADER = 100 * 1024 * 1024  # safetensors itself refuses headers above 100 MB
_SHOW_KEYS = 4


@dataclass
class WeightFileInfo:
    """What a weight file's header says (no tensor data is read)."""

    path: str
    component: str
    format: int
    config: dict[str, Any]
    provenance: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)  # key -> (shape, dtype)

    @property
    def base(self) -> dict[str, Any] | None:
        base = self.config.get("base")
        return base if isinstance(base, dict) else None

    @property
    def num_parameters(self) -> int:
        total = 0
        for shape, _ in self.tensors.values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def describe(self) -> str:
        what = COMPONENT_DESCRIPTIONS.get(self.component, self.component)
        return f"{os.path.basename(self.path)}: {what}, format {self.format}, {len(self.tensors)} tensors, {self.num_parameters:,} values"


# ----------------------------------------------------------------------------------------------- writing


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"tensor keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"'{key}' is a {type(value).__name__}, not a tensor")
        t = value.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if t.numel() and (ident in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()  # shared or partial storage: safetensors wants one owner per tensor
        seen.add(ident)
        out[key] = t
    return out


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Any) -> None:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, fsync it, then rename."""
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def build_metadata(
    component: str, config: Mapping[str, Any], provenance: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """The ``__metadata__`` dict for a MegaSR weight file."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component '{component}', expected one of {', '.join(COMPONENTS)}")
    try:
        config_json = json.dumps(dict(config), sort_keys=True)
        provenance_json = json.dumps(dict(provenance or {}), sort_keys=True, default=str)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the config of a '{component}' weight file must be JSON-serialisable: {e}") from e
    return {
        META_FORMAT: str(FORMAT_VERSION),
        META_COMPONENT: component,
        META_CONFIG: config_json,
        META_PROVENANCE: provenance_json,
    }


def save_weight_file(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    component: str,
    config: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a MegaSR weight file atomically.

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is false; on any failure the
    previous file (if any) is left untouched and no temp file stays behind.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    metadata = build_metadata(component, config, provenance)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"weight file '{path}' already exists; refusing to overwrite it. Choose another name or pass overwrite=True "
            "(--overwrite on the command line)."
        )
    prepared = _prepare_tensors(tensors)
    _atomic_write(path, lambda tmp: save_file(prepared, tmp, metadata=metadata))
    log.info("wrote %s weight file %s (%d tensors)", component, path, len(prepared))


# ----------------------------------------------------------------------------------------------- reading


def _read_raw_header(path: str) -> tuple[dict[str, Any], int]:
    """Parse and check the safetensors header; returns (header dict, data length)."""
    if not os.path.exists(path):
        raise WeightFileError(path, "the file does not exist")
    if os.path.isdir(path):
        raise WeightFileError(path, "this is a folder, not a safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(
                path,
                f"not a safetensors file, or truncated: it is only {size} bytes long (a safetensors header needs 8)",
            )
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER:
            raise WeightFileError(
                path, "not a safetensors file (its first 8 bytes do not give a plausible header length)"
            )
        if 8 + n > size:
            raise WeightFileError(
                path,
                f"truncated: the header says {n} bytes of header follow, but the file has only {size - 8}; "
                "the download or copy was cut short, fetch the file again",
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightFileError(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise WeightFileError(path, "not a safetensors file (its header is not a JSON object)")
    data_len = size - 8 - n
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise WeightFileError(path, f"not a valid safetensors file (entry '{key}' lacks dtype/shape/offsets)")
        try:
            begin, stop = (int(v) for v in entry["data_offsets"])
            shape = [int(s) for s in entry["shape"]]
        except (TypeError, ValueError):
            raise WeightFileError(path, f"not a valid safetensors file (entry '{key}' has bad shape/offsets)") from None
        if stop < begin or begin < 0:
            raise WeightFileError(path, f"not a valid safetensors file (entry '{key}' has bad offsets)")
        itemsize = _DTYPE_SIZES.get(str(entry["dtype"]))
        if itemsize is not None:
            numel = 1
            for s in shape:
                numel *= s
            if int(numel * itemsize + 0.999) != stop - begin:
                raise WeightFileError(
                    path, f"not a valid safetensors file (tensor '{key}' of shape {shape} has {stop - begin} bytes)"
                )
        end = max(end, stop)
    if end > data_len:
        raise WeightFileError(
            path,
            f"truncated: the tensors need {end} bytes of data but the file holds only {data_len}; "
            "the download or copy was cut short, fetch the file again",
        )
    return header, data_len


def _guess_foreign(keys: Iterable[str]) -> str:
    keys = list(keys)
    ks = set(keys)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion checkpoint (it belongs in models/checkpoints)"
    if any(k.startswith(("down_blocks.", "controlnet_down_blocks.", "conv_in.")) for k in keys):
        return "a diffusers U-Net/ControlNet"
    if "norm" in ks and any(k.startswith("block1.convs.") for k in keys):
        return "a plain ControlNetHED state dict"
    if any("vision_model.encoder.layers." in k or k.startswith("visual.transformer.") for k in keys):
        return "a CLIP vision model (it belongs in models/clip_vision)"
    if any(k.startswith(("backbone.embeddings.", "pretrained.")) for k in keys) and any(
        "depth_head" in k or "head." in k for k in keys
    ):
        return "a Depth-Anything model"
    if any("lora_" in k for k in keys):
        return "a LoRA of some other tool"
    return ""


def detect_component(path: str) -> str | None:
    """The MegaSR component a file holds, from its metadata (never its name); ``None`` if not MegaSR.

    Raises :class:`WeightFileError` if the file is not a readable safetensors file at all.
    """
    header, _ = _read_raw_header(os.fspath(path))
    meta = header.get("__metadata__") or {}
    comp = meta.get(META_COMPONENT) if isinstance(meta, dict) else None
    return comp if comp in COMPONENTS else None


def read_weight_header(path: str) -> WeightFileInfo:
    """Read and validate a MegaSR weight file's header (no tensor data)."""
    path = os.fspath(path)
    header, _ = _read_raw_header(path)
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    tensor_keys = [k for k in header if k != "__metadata__"]
    if META_COMPONENT not in meta or META_FORMAT not in meta:
        looks = _guess_foreign(tensor_keys)
        extra = f"; it looks like {looks}" if looks else ""
        raise WeightFileError(
            path,
            "not a MegaSR weight file (it is a safetensors file without megasr metadata)"
            f"{extra}. MegaSR loaders read only files written by the MegaSR training/export tools.",
        )
    try:
        fmt = int(meta[META_FORMAT])
    except (TypeError, ValueError):
        raise WeightFileError(path, f"bad megasr.format metadata {meta[META_FORMAT]!r} (expected an integer)") from None
    if fmt > FORMAT_VERSION:
        raise WeightFileError(
            path,
            f"made by a newer MegaSR (weight format {fmt}; this version reads up to {FORMAT_VERSION}); update ComfyUI-MegaSR",
        )
    if fmt < 1:
        raise WeightFileError(path, f"bad megasr.format {fmt}")
    component = meta[META_COMPONENT]
    if component not in COMPONENTS:
        raise WeightFileError(
            path, f"unknown MegaSR component '{component}' (known: {', '.join(COMPONENTS)}); update ComfyUI-MegaSR"
        )
    raw_config = meta.get(META_CONFIG, "{}")
    try:
        config = json.loads(raw_config)
    except (TypeError, json.JSONDecodeError) as e:
        raise WeightFileError(
            path,
            f"its megasr.config metadata is not valid JSON ({e}); the file was not written by MegaSR's exporter or was edited",
        ) from None
    if not isinstance(config, dict):
        raise WeightFileError(path, "its megasr.config metadata is not a JSON object")
    raw_prov = meta.get(META_PROVENANCE, "{}")
    try:
        provenance = json.loads(raw_prov)
        if not isinstance(provenance, dict):
            provenance = {"value": provenance}
    except (TypeError, json.JSONDecodeError):
        log.warning("weight file %s: megasr.provenance is not valid JSON; ignoring it", path)
        provenance = {"unparsed": str(raw_prov)}
    tensors = {k: (tuple(int(s) for s in header[k]["shape"]), str(header[k]["dtype"])) for k in tensor_keys}
    return WeightFileInfo(
        path=path, component=component, format=fmt, config=config, provenance=provenance, tensors=tensors
    )


def _check_component(info: WeightFileInfo, expect: str | tuple[str, ...] | None) -> None:
    if expect is None:
        return
    wanted = (expect,) if isinstance(expect, str) else tuple(expect)
    if info.component not in wanted:
        need = " or ".join(wanted)
        raise WeightFileError(
            info.path,
            f"this is a {info.component} file ({COMPONENT_DESCRIPTIONS.get(info.component, '')}), but this loader needs {need}"
            f" ({'; '.join(COMPONENT_DESCRIPTIONS.get(w, w) for w in wanted)}); pick the matching file",
        )


def load_weight_file(
    path: str, expect_component: str | tuple[str, ...] | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], WeightFileInfo]:
    """Validate and load a MegaSR weight file: returns (state dict, header info)."""
    from safetensors.torch import load_file

    info = read_weight_header(path)
    _check_component(info, expect_component)
    try:
        state = load_file(info.path, device=str(device))
    except Exception as e:  # a file that changed under us, or a dtype this torch lacks
        raise WeightFileError(info.path, f"could not read the tensors ({type(e).__name__}: {e})") from e
    return state, info


# ----------------------------------------------------------------------------------------------- checks


def _list(keys: list[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW_KEYS])
    return shown + (f", ... ({len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else "")


def check_state_dict(
    module: torch.nn.Module | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    path: str,
    allow_missing: Iterable[str] = (),
    allow_unexpected: Iterable[str] = (),
) -> None:
    """Compare ``state_dict`` with what ``module`` expects; raise one :class:`WeightFileError` listing
    missing keys, unexpected keys and shape mismatches (a few of each, by name).

    ``module`` may also be a mapping from key to tensor or shape. ``allow_missing`` /
    ``allow_unexpected`` are key prefixes that may be absent / extra (e.g. frozen base weights).
    """
    if isinstance(module, torch.nn.Module):
        expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    else:
        expected = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in module.items()}
    allow_missing = tuple(allow_missing)
    allow_unexpected = tuple(allow_unexpected)
    missing = [k for k in expected if k not in state_dict and not (allow_missing and k.startswith(allow_missing))]
    unexpected = [
        k for k in state_dict if k not in expected and not (allow_unexpected and k.startswith(allow_unexpected))
    ]
    mismatched = [
        f"{k} (file {list(state_dict[k].shape)}, model {list(expected[k])})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != expected[k]
    ]
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch{'es' if len(mismatched) > 1 else ''}: {_list(mismatched)}")
    if missing:
        problems.append(f"{len(missing)} missing key{'s' if len(missing) > 1 else ''}: {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key{'s' if len(unexpected) > 1 else ''}: {_list(unexpected)}")
    if problems:
        raise WeightFileError(
            path,
            "does not fit the model built from its config: "
            + "; ".join(problems)
            + ". The file was made for a different model configuration or is damaged.",
        )


def check_base(info: WeightFileInfo, expected_base: Mapping[str, Any]) -> None:
    """Refuse a file made for another base model (compares the ``base`` dict of its config)."""
    base = info.base
    if base is None:
        raise WeightFileError(
            info.path, f"its config does not say which base model it was made for (expected {dict(expected_base)})"
        )
    diffs = [f"{k}={base.get(k, '<unset>')!r} (needed {v!r})" for k, v in expected_base.items() if base.get(k) != v]
    if diffs:
        raise WeightFileError(
            info.path,
            "made for another base model: "
            + ", ".join(diffs)
            + ". Use a MegaSR file trained for this checkpoint (SD-2-base, 512 px, epsilon) or load the matching base model.",
        )


# ----------------------------------------------------------------------------------------------- files on disk


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class WeightFileMissingError(WeightFileError):
    """A weight file is not on disk and could not (or may not) be downloaded."""


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (its own reading of ``HF_HUB_OFFLINE``; the pack reads no
    environment variable itself)."""
    from huggingface_hub import constants

    return bool(constants.is_offline_mode())


def hub_file_url(repo_id: str, repo_file: str, revision: str = "main", endpoint: str | None = None) -> str:
    """The hub's file-resolve address (``<endpoint>/<repo>/resolve/<revision>/<file>``); ``endpoint`` defaults to
    huggingface_hub's (``HF_ENDPOINT`` or huggingface.co)."""
    from huggingface_hub import constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    return f"{base}/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(repo_file)}"


def partial_path(path: str) -> str:
    """Where an unfinished download of ``path`` is kept (beside it, so the final rename is atomic)."""
    folder, name = os.path.split(os.fspath(path))
    return os.path.join(folder, f".{name}.part")


def download_file(
    url: str,
    path: str,
    sha256: str | None = None,
    size_bytes: int | None = None,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``path``: resumable, checked, atomic.

    Bytes go to ``.<name>.part`` beside ``path``; an earlier partial file is continued with an HTTP ``Range``
    request (a server that ignores it restarts the file). When complete, the size and ``sha256`` (if given) are
    checked, a mismatch deletes the partial file, and only then is it renamed onto ``path``. The request goes
    through huggingface_hub's HTTP session (its offline mode, proxies and token apply); a progress bar (tqdm) is
    shown on stderr unless ``progress`` is false.
    """
    from huggingface_hub import get_session
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers
    from tqdm.auto import tqdm

    path = os.fspath(path)
    part = partial_path(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as e:
        raise download_os_error(e, path, part, url) or WeightFileError(path, f"cannot create its folder: {e}") from e
    have = os.path.getsize(part) if os.path.isfile(part) else 0
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    name = os.path.basename(path)
    content_type = announced = None
    try:
        with get_session().stream("GET", url, headers=headers, timeout=60) as response:
            status = response.status_code
            if status == 416 and have:  # the partial file already holds every byte
                pass
            elif status not in (200, 206):
                raise WeightFileMissingError(path, f"the download from {url} failed: HTTP {status}")
            else:
                if status == 200:
                    have = 0  # the server sent the whole file
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else size_bytes
                content_type, announced = response.headers.get("Content-Type"), total if length is not None else None
                with (
                    open(part, "ab" if have else "wb") as f,
                    tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, disable=not progress) as bar,
                ):
                    for chunk in response.iter_bytes():  # as it arrives: an interruption loses nothing
                        f.write(chunk)
                        bar.update(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
    except OfflineModeIsEnabled:
        raise WeightFileMissingError(
            path, f"not downloaded: huggingface_hub is in offline mode (HF_HUB_OFFLINE); the file is {url}"
        ) from None
    except WeightFileError:
        raise
    except Exception as e:  # network errors of whichever HTTP library huggingface_hub uses
        os_problem = download_os_error(e, path, part, url) if isinstance(e, OSError) else None
        if os_problem is not None:
            raise os_problem from e
        kept = os.path.getsize(part) if os.path.isfile(part) else 0
        raise WeightFileMissingError(
            path,
            f"the download from {url} was interrupted ({type(e).__name__}: {e}); {kept} bytes are kept in "
            f"{part} and the next attempt continues from there",
        ) from e
    verify_download(part, path, url, content_type, announced, size_bytes)
    got_size = os.path.getsize(part)
    if size_bytes is not None and got_size != size_bytes:
        if got_size > size_bytes:
            os.unlink(part)
        raise WeightFileError(
            path, f"the download from {url} has {got_size} bytes, not the expected {size_bytes}; try again"
        )
    if sha256:
        got = sha256_file(part)
        if got.lower() != sha256.lower():
            os.unlink(part)
            raise WeightFileError(
                path,
                f"the downloaded file has sha256 {got}, not the expected {sha256}; it was deleted. "
                f"The source ({url}) changed or the download was corrupted; try again or fetch it by hand.",
            )
    os.replace(part, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
    log.info("downloaded %s from %s", path, url)
    return path


def ensure_weight_file(
    folder: str,
    filename: str,
    repo_id: str | None,
    sha256: str | None,
    allow_download: bool,
    endpoint: str | None = None,
    revision: str = "main",
    verify_existing: bool = False,
    repo_file: str | None = None,
    size_bytes: int | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> str:
    """Return the path of ``folder/filename``, downloading it first if it is missing and allowed.

    The file comes from ``repo_file`` (default ``filename``) of the Hugging Face repository ``repo_id`` at
    ``revision``, through :func:`download_file` (resumable, size/sha256-checked, atomic). ``offline`` (default:
    huggingface_hub's offline mode) refuses any download with a message naming the file, the folder and the
    source. With ``verify_existing`` an existing file's sha256 is checked too.
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        if verify_existing and sha256:
            got = sha256_file(path)
            if got.lower() != sha256.lower():
                raise WeightFileError(
                    path, f"sha256 {got} does not match the expected {sha256}; delete it and fetch it again"
                )
        return path
    where = f"'{filename}' is not in the folder '{folder}'"
    remote = repo_file or filename
    source = f"the Hugging Face repository '{repo_id}' (file '{remote}')" if repo_id else "its publisher"
    if not allow_download:
        raise WeightFileMissingError(
            path, f"missing: {where}. Download it from {source} into that folder, or allow automatic download."
        )
    if repo_id is None:
        raise WeightFileMissingError(
            path, f"missing: {where}, and no download source is known for it; put the file there by hand"
        )
    if hub_offline() if offline is None else offline:
        raise WeightFileMissingError(
            path,
            f"missing: {where}, and downloads are off (offline: HF_HUB_OFFLINE or --offline). "
            f"Download {hub_file_url(repo_id, remote, revision)} on a connected machine and copy it into that folder.",
        )
    url = hub_file_url(repo_id, remote, revision, endpoint)
    log.info("downloading %s from %s into %s", remote, repo_id, folder)
    return download_file(url, path, sha256=sha256, size_bytes=size_bytes, progress=progress)


def convert_bin_to_safetensors(src: str, dst: str) -> str:
    """Write the tensors of a third-party ``.bin`` state dict (read with ``torch.load(weights_only=True)``)
    as a safetensors file (atomic); returns ``dst``. An existing ``dst`` is kept."""
    from safetensors.torch import save_file

    if os.path.isfile(dst):
        return dst
    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightFileError(src, "not a state dict of tensors; cannot convert it to safetensors")
    prepared = _prepare_tensors(state)
    _atomic_write(dst, lambda tmp: save_file(prepared, tmp, metadata={"format": "pt"}))
    log.info("converted %s to %s", src, dst)
    return dst
