"""What a finished download must look like before it is renamed into place, and what each OS error means.

The hub answers some failures with HTTP 200 and a web page (a login wall, a proxy's error page), and a cut
connection can leave a file that is complete in length only by accident; so every download is checked for what
it claims to be: no HTML, the length the server announced, and a header that parses for its file type
(safetensors: the JSON header names tensors and its offsets reach exactly the end of the file; ``.pth``/``.bin``/
``.pt``/``.ckpt``: a zip archive or a pickle stream; ``.json``: parses). The size and sha256 of the manifest are
checked by the download code itself (megasr/download.py). Nothing here touches the network.
"""

from __future__ import annotations

import errno
import json
import os
import struct

from .errors import WeightFileError

PICKLE_SUFFIXES = (".pth", ".bin", ".pt", ".ckpt")
#: largest safetensors JSON header read (the format's own limit is 100 MB)
MAX_HEADER = 100 * 1024 * 1024


def _looks_like_html(head: bytes) -> bool:
    start = head.lstrip()[:64].lower()
    return start.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body"))


def _refuse(part: str, path: str, problem: str) -> WeightFileError:
    try:
        os.unlink(part)
    except OSError:
        pass
    return WeightFileError(path, f"{problem}; the download was deleted and nothing was installed")


def safetensors_problem(fileobj_path: str) -> str | None:
    """Why a file is not a complete safetensors file (None when it is)."""
    size = os.path.getsize(fileobj_path)
    with open(fileobj_path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return f"it has {size} bytes, too few for a safetensors header"
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            return f"its safetensors header claims {n} bytes but the file has {size} (truncated or not safetensors)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"its safetensors header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    if not tensors:
        return "its safetensors header names no tensor"
    try:
        end = max(int(v["data_offsets"][1]) for v in tensors.values())
    except (TypeError, KeyError, IndexError, ValueError):
        return "its safetensors header has a tensor without data_offsets"
    if 8 + n + end != size:
        return f"its tensors need {8 + n + end} bytes but the file has {size} (truncated)"
    return None


def header_problem(part: str, name: str) -> str | None:
    """Why the file at ``part`` is not the file type ``name`` says (None when its header checks out)."""
    lower = name.lower()
    with open(part, "rb") as f:
        head = f.read(16)
    if lower.endswith(".safetensors"):
        return safetensors_problem(part)
    if lower.endswith(PICKLE_SUFFIXES):
        # a torch.save zip archive, or a legacy pickle stream (protocol 2..5 starts with 0x80 <protocol>)
        if head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            return None
        return f"it is neither a zip archive nor a pickle stream (starts with {head[:8]!r})"
    if lower.endswith(".npz"):  # numpy's archive of arrays is a zip file
        return None if head.startswith(b"PK\x03\x04") else f"it is not a zip archive (starts with {head[:8]!r})"
    if lower.endswith(".json"):
        try:
            with open(part, encoding="utf-8") as f:
                json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"it is not valid JSON ({e})"
    return None


def verify_download(
    part: str,
    path: str,
    url: str,
    content_type: str | None = None,
    announced_bytes: int | None = None,
    size_bytes: int | None = None,
) -> None:
    """Refuse (delete ``part``, raise :class:`WeightFileError` with its own message) a download that is a web page,
    shorter or longer than the server announced, or whose header does not parse for its file type. A partial file
    shorter than the manifest's ``size_bytes`` is left for the size check (it is resumed next time)."""
    got = os.path.getsize(part)
    with open(part, "rb") as f:
        head = f.read(512)
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("text/html", "application/xhtml+xml") or _looks_like_html(head):
        return _raise(
            _refuse(
                part,
                path,
                f"the server answered {url} with a web page (Content-Type {ctype or 'unknown'}), not the file: the "
                "address is wrong, the repository needs a login (huggingface-cli login) or a proxy answered",
            )
        )
    if announced_bytes is not None and got != announced_bytes:
        if got < announced_bytes and size_bytes is not None:
            return  # resumable: the size check keeps the partial file for the next attempt
        return _raise(_refuse(part, path, f"the server announced {announced_bytes} bytes for {url} and {got} arrived"))
    if size_bytes is not None and got < size_bytes:
        return
    problem = header_problem(part, os.path.basename(path))
    if problem:
        _raise(
            _refuse(part, path, f"the download from {url} is not a valid {os.path.splitext(path)[1]} file: {problem}")
        )


def _raise(err: Exception) -> None:
    raise err


def download_os_error(e: OSError, path: str, part: str, url: str) -> WeightFileError | None:
    """The message for an OS error while writing a download (None: not one of these, a network error follows).

    A full disk removes the partial file (it would keep the disk full) and says how much was needed; a read-only
    or unwritable folder says so (running the command again cannot help)."""
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        kept = os.path.getsize(part) if os.path.isfile(part) else 0
        removed = True
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        except OSError:
            removed = False
        what = "was removed" if removed else f"could not be removed: delete {part} by hand"
        return WeightFileError(
            path,
            f"the disk holding '{folder}' is full ({os.strerror(e.errno)}) after {kept} bytes of {url}; the partial "
            f"file {what}. Free space there (or pass another --models-dir) and run the command again",
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return WeightFileError(
            path,
            f"cannot write into '{folder}' ({os.strerror(e.errno)}): the folder is read-only or not yours. Pass a "
            "writable --models-dir (or fix the folder's permissions); running the same command again will not help",
        )
    return None
