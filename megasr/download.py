"""Opt-in downloads of model files from the Hugging Face hub: resumable, size/sha256-checked, atomic.

The one module of the pack that touches the network (the documented opt-in download path: ``python -m megasr
fetch`` and the nodes' ``download_missing`` inputs). The weight-file format itself is ``weights.py``.
"""

from __future__ import annotations

import logging
import os
import urllib.parse

import torch

from .errors import WeightFileError, WeightFileMissingError
from .files import atomic_write, fsync_dir, sha256_file
from .verify import download_os_error, verify_download
from .weights import prepare_tensors

log = logging.getLogger("megasr")

__all__ = [
    "WeightFileMissingError",
    "convert_bin_to_safetensors",
    "download_file",
    "ensure_weight_file",
    "hub_file_url",
    "hub_offline",
    "partial_path",
]


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
    fsync_dir(os.path.dirname(os.path.abspath(path)))
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
    prepared = prepare_tensors(state)
    atomic_write(dst, lambda tmp: save_file(prepared, tmp, metadata={"format": "pt"}))
    log.info("converted %s to %s", src, dst)
    return dst
