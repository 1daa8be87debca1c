"""The pack's model folder in ComfyUI: registration, listing, missing-file messages and the opt-in download glue."""

from __future__ import annotations

import os

import folder_paths

from ...megasr.download import ensure_weight_file, hub_offline
from ...megasr.errors import MegaSRInputError, WeightFileError
from ...megasr.manifest import describe_missing, find_file

MEGASR_FOLDER = "megasr"


def register_model_folder() -> None:
    """``models/megasr`` (plus any ``megasr:`` entry of extra_model_paths.yaml, which ComfyUI adds itself)."""
    default = os.path.join(folder_paths.models_dir, MEGASR_FOLDER)
    known = folder_paths.folder_names_and_paths.get(MEGASR_FOLDER)
    if known is None or default not in known[0]:
        folder_paths.add_model_folder_path(MEGASR_FOLDER, default)
    exts = folder_paths.folder_names_and_paths[MEGASR_FOLDER][1]
    if isinstance(exts, set):  # a `megasr:` entry of extra_model_paths.yaml may have made it with other extensions
        exts.add(".safetensors")


def weight_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list(MEGASR_FOLDER) if f.endswith(".safetensors")]


#: how the MegaSR Model Loader lists a SeeSR folder (``<name>/``), beside the weight files
SEESR_FOLDER_MARK = "/"
_SEESR_PARTS = ("unet", "controlnet")
_SEESR_SEARCH_DEPTH = 3  # e.g. models/megasr/preset/models/seesr is 3 below the folder


def seesr_folders() -> list[str]:
    """SeeSR folders (``unet/`` and/or ``controlnet/`` inside, as SeeSR publishes ``preset/models/seesr``) placed in
    the megasr model folders, as ``relative/path/``; an incomplete one is listed too, so loading it says what lacks."""
    found: set[str] = set()
    for base in folder_paths.get_folder_paths(MEGASR_FOLDER):
        if not os.path.isdir(base):
            continue
        for root, dirs, _ in os.walk(base, followlinks=True):
            rel = os.path.relpath(root, base)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if rel != "." and any(d in _SEESR_PARTS for d in dirs):
                found.add(rel.replace(os.sep, "/") + SEESR_FOLDER_MARK)
                dirs[:] = []  # its unet/ and controlnet/ are parts, not more folders
            elif depth >= _SEESR_SEARCH_DEPTH:
                dirs[:] = []
            else:
                dirs[:] = [d for d in dirs if not d.startswith(".")]
    return sorted(found)


def megasr_model_choices() -> list[str]:
    """The MegaSR Model Loader's list: weight files (not those inside a SeeSR folder), then SeeSR folders."""
    folders = seesr_folders()
    files = [f for f in weight_files() if not any(f.replace(os.sep, "/").startswith(d) for d in folders)]
    return files + folders


def is_seesr_folder_choice(value: object) -> bool:
    return isinstance(value, str) and value.endswith(SEESR_FOLDER_MARK)


def _seesr_folder_path(value: str) -> str | None:
    rel = value.rstrip(SEESR_FOLDER_MARK)
    if not rel or ".." in rel.split("/"):
        return None
    paths = [os.path.join(b, rel) for b in folder_paths.get_folder_paths(MEGASR_FOLDER)]
    return next((p for p in paths if os.path.isdir(p)), None)


def seesr_folder_problem_of(value: str) -> str | None:
    """Why the SeeSR folder choice ``value`` cannot be loaded (not there, or not SeeSR's layout), or None."""
    from ...megasr.seesr_weights import seesr_folder_problem

    path = _seesr_folder_path(value)
    if path is None:
        bases = ", ".join(folder_paths.get_folder_paths(MEGASR_FOLDER))
        return f"the SeeSR folder '{value}' was not found in the megasr model folders ({bases})"
    return seesr_folder_problem(path)


def resolve_seesr_folder(where: str, name: str, value: str) -> str:
    """The path of a listed SeeSR folder, checked for SeeSR's layout (else an error naming the node and input)."""
    problem = seesr_folder_problem_of(value)
    if problem is not None:
        raise MegaSRInputError(where, name, problem)
    return _seesr_folder_path(value)


def _present(filename: str) -> bool:
    path = folder_paths.get_full_path(MEGASR_FOLDER, filename) if filename else None
    return path is not None and os.path.isfile(path)


def downloadable(filename: str) -> bool:
    """Whether the model manifest has a public source for ``filename`` of the megasr folder."""
    found = find_file(MEGASR_FOLDER, filename) if filename else None
    return found is not None and found[0].public


def missing_weight_problem(filename: str | None, download_missing: bool | None = None) -> str | None:
    """Why ``filename`` cannot be loaded from the megasr folders (what it is and how to get it, from the model
    manifest), or None when it is there. Used at validation, so ComfyUI lists every missing file of a graph at
    once, and again at run time. ``download_missing`` is the node's opt-in for this input (None: the input has
    none): when true, a file the manifest has a public source for is no problem (it is downloaded when the node
    runs) unless huggingface_hub is offline; when false, the message points at the option."""
    if not isinstance(filename, str):  # fed by a link: known only at run time
        return None
    if _present(filename):
        return None
    problem = describe_missing(MEGASR_FOLDER, filename, folder_paths.get_folder_paths(MEGASR_FOLDER))
    if download_missing is None or not downloadable(filename):
        return problem
    if not download_missing:
        return problem + "; or set download_missing to true on this node to download it when the node runs"
    if hub_offline():
        return (
            problem
            + "; download_missing is on, but huggingface_hub is offline (HF_HUB_OFFLINE): nothing can be downloaded"
        )
    return None


def download_weight_file(where: str, name: str, filename: str) -> str:
    """The opt-in download-on-missing path (the only network access of the nodes): fetch a manifest file with a
    public source into the first megasr folder through ``ensure_weight_file`` (resumable, size/sha256-checked
    where the manifest knows them, atomic; huggingface_hub's offline mode and endpoint apply)."""
    entry, f = find_file(MEGASR_FOLDER, filename)
    folder = folder_paths.get_folder_paths(MEGASR_FOLDER)[0]
    if entry.subfolder:
        folder = os.path.join(folder, entry.subfolder)
    try:
        return ensure_weight_file(
            folder,
            f.name,
            entry.repo_id,
            f.sha256,
            allow_download=True,
            revision=entry.revision,
            repo_file=f.repo_file,
            size_bytes=f.size_bytes,
        )
    except WeightFileError as e:
        raise MegaSRInputError(where, name, e.problem) from e


def resolve_weight_file(where: str, name: str, filename: str, download_missing: bool = False) -> str:
    """The path of a megasr-folder file; missing, it is downloaded when allowed and public, else refused."""
    if download_missing and not _present(filename) and downloadable(filename):
        return download_weight_file(where, name, filename)
    problem = missing_weight_problem(filename)
    if problem is not None:
        raise MegaSRInputError(where, name, problem)
    return folder_paths.get_full_path(MEGASR_FOLDER, filename)
