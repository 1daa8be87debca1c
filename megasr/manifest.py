"""The model manifest (``manifest.json`` beside this file): every file the nodes and training stages can use.

Each entry names the ComfyUI model folder its files go into, where they come from (a Hugging Face repository
file, or the training package for MegaSR's own weights, of which no public copy exists), the licence and what
was verified. The fetch command (``python -m megasr fetch``), the nodes' missing-file messages, the headless
preflight, the README's "Getting weights" table and the shipped workflows' Note nodes all read it, so they
cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MANIFEST_PATH = Path(__file__).with_name("manifest.json")
HUB_URL = "https://huggingface.co"
#: Folder (relative to ComfyUI's models/) for files only the training package reads.
TRAINING_FOLDER = "megasr_training"
#: the one command that trains and exports every MegaSR file into a ComfyUI models folder
TRAIN_ALL = "megasr-train all --input HR_FOLDER --models-dir COMFYUI/models --out runs/megasr-all"


#: Files made by a command from public files (so neither downloadable as such nor trained):
#: (ComfyUI folder, file) -> (manifest id of the files it is made from, the command that makes it).
CONVERTED_FILES = {
    ("megasr", "seesr_sd2_x4.safetensors"): (
        "seesr",
        "python -m megasr convert-seesr models/megasr_training/SeeSR/seesr models/megasr/seesr_sd2_x4.safetensors",
    ),
}


def converted_how(folder: str, name: str) -> str | None:
    """How to make a converted file (fetch its sources, run the command), or None when ``name`` is not one."""
    made = CONVERTED_FILES.get((folder, name))
    if made is None:
        return None
    source, command = made
    return f"python -m megasr fetch --only {source}, then {command}"


@dataclass(frozen=True)
class ManifestFile:
    """One file of an entry: ``name`` (relative to the entry's folder) and where it is in the source repository."""

    name: str
    repo_file: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    convert_to: str | None = None  # a .bin state dict is converted to this safetensors file after the download
    url: str | None = None  # a direct address (a file published outside the hub: GitHub, download.pytorch.org)


@dataclass(frozen=True)
class ManifestEntry:
    id: str
    what: str
    used_by: tuple[str, ...]
    folder: str
    files: tuple[ManifestFile, ...]
    size: str
    source: dict[str, str]
    licence: str
    needed_for_nodes: bool
    verified: str
    #: an evaluation file (``python -m megasr fetch --eval``), not needed by the nodes or the training stages
    for_eval: bool = False
    #: the one file built from the downloaded parts (``{"name": ..., "builder": ...}``, see megasr.metrics.BUILDERS);
    #: when it is present the entry counts as complete
    produces: dict[str, str] | None = None

    @property
    def repo_id(self) -> str | None:
        return self.source.get("repo_id")

    @property
    def revision(self) -> str:
        return self.source.get("revision", "main")

    @property
    def public(self) -> bool:
        """A public download exists (otherwise the training package makes the file)."""
        return self.repo_id is not None or all(f.url for f in self.files)

    @property
    def on_hub(self) -> bool:
        """The files are in a Hugging Face repository (the nodes' ``download_missing`` path reads only these)."""
        return self.repo_id is not None

    @property
    def comfy_folder(self) -> str:
        """The ComfyUI folder name (``folder_paths``) the files are found through: the first path part."""
        return self.folder.split("/", 1)[0]

    @property
    def subfolder(self) -> str:
        """Path below the ComfyUI folder (``""`` for files directly in it)."""
        parts = self.folder.split("/", 1)
        return parts[1] if len(parts) > 1 else ""

    def url(self, f: ManifestFile) -> str:
        if f.url:
            return f.url
        return f"{HUB_URL}/{self.repo_id}/resolve/{self.revision}/{f.repo_file}"

    @property
    def fetch_command(self) -> str:
        return "python -m megasr fetch --eval" if self.for_eval else f"python -m megasr fetch --only {self.id}"

    def how_to_get(self) -> str:
        """One sentence (with the exact command) saying how to get this entry's files."""
        if self.public and not self.on_hub:
            names = ", ".join(f"{f.url} (save as {f.name})" for f in self.files)
            built = f", then build {self.produces['name']} from them" if self.produces else ""
            return f"download {names}{built} (licence: {self.licence}), or run: {self.fetch_command}"
        if self.public:
            names = ", ".join(
                f"{f.repo_file}" + (f" (save as {f.name})" if f.name != f.repo_file else "") for f in self.files
            )
            built = f", then build {self.produces['name']} from them" if self.produces else ""
            return (
                f"download {names} from {HUB_URL}/{self.repo_id}{built} (licence: {self.licence}), "
                f"or run: {self.fetch_command}"
            )
        return (
            "no public weights exist; make every trained file at once with "
            f"`{TRAIN_ALL}` (the training package), or this one alone: "
            f"{self.source['train']} && {self.source['export']}"
        )


def _entry(raw: dict[str, Any]) -> ManifestEntry:
    files = tuple(ManifestFile(**f) for f in raw["files"])
    return ManifestEntry(
        id=raw["id"],
        what=raw["what"],
        used_by=tuple(raw["used_by"]),
        folder=raw["folder"],
        files=files,
        size=raw["size"],
        source=dict(raw["source"]),
        licence=raw["licence"],
        needed_for_nodes=bool(raw["needed_for_nodes"]),
        verified=raw["verified"],
        for_eval=bool(raw.get("for_eval", False)),
        produces=dict(raw["produces"]) if raw.get("produces") else None,
    )


@lru_cache(maxsize=4)
def load_manifest(path: str | None = None) -> tuple[ManifestEntry, ...]:
    """All entries, in file order."""
    raw = json.loads(Path(path or MANIFEST_PATH).read_text(encoding="utf-8"))
    return tuple(_entry(e) for e in raw["entries"])


def entry(entry_id: str) -> ManifestEntry:
    for e in load_manifest():
        if e.id == entry_id:
            return e
    known = ", ".join(e.id for e in load_manifest())
    raise KeyError(f"no manifest entry '{entry_id}' (known: {known})")


def find_file(folder: str, name: str) -> tuple[ManifestEntry, ManifestFile] | None:
    """The entry holding ``name`` in ComfyUI folder ``folder`` (``checkpoints``, ``megasr`` ...), if any."""
    for e in load_manifest():
        if e.comfy_folder != folder:
            continue
        built = (ManifestFile(name=e.produces["name"]),) if e.produces else ()
        for f in e.files + built:
            rel = f"{e.subfolder}/{f.name}" if e.subfolder else f.name
            if rel == name or f.name == name:
                return e, f
    return None


def file_name(entry_id: str, index: int = 0) -> str:
    """The name a workflow widget uses for an entry's file (relative to its ComfyUI folder)."""
    e = entry(entry_id)
    f = e.files[index]
    return f"{e.subfolder}/{f.name}" if e.subfolder else f.name


def describe_missing(folder: str, name: str, searched: Iterable[str] = ()) -> str:
    """What to tell a user about a missing ``folder/name``: where it belongs, what it is, how to get it."""
    where = ", ".join(str(s) for s in searched)
    looked = f" (looked in: {where})" if where else ""
    how = converted_how(folder, name)
    if how is not None:
        return f"'{name}' was not found in models/{folder}{looked}. It is made from public files: {how}"
    found = find_file(folder, name)
    if found is None:
        return f"'{name}' was not found in models/{folder}{looked}; put the file there or pick one that exists"
    e, _ = found
    return f"'{name}' was not found in models/{folder}{looked}. It is the {e.what}; {e.how_to_get()}"


def markdown_table(entries: Iterable[ManifestEntry] | None = None) -> str:
    """The README's "Getting weights" table (generated; a test keeps the README equal to it)."""
    rows = [
        "| file | folder (under ComfyUI `models/`) | what | source | licence | size |",
        "|---|---|---|---|---|---|",
    ]
    for e in entries if entries is not None else load_manifest():
        names = "<br>".join(f"`{f.name}`" for f in e.files)
        if e.public and not e.on_hub:
            src = "<br>".join(f"<{f.url}>" for f in e.files) + f"; `{e.fetch_command}`"
            if e.produces:
                names += f"<br>-> `{e.produces['name']}`"
        elif e.public:
            src = f"[{e.repo_id}]({HUB_URL}/{e.repo_id})" + ("" if len(e.files) > 1 else f" `{e.files[0].repo_file}`")
            src += f"; `{e.fetch_command}`"
            if e.produces:
                names += f"<br>-> `{e.produces['name']}`"
        else:
            src = f"train it: `{e.source['train']}`, then `{e.source['export']}`"
        rows.append(f"| {names} | `{e.folder}` | {e.what} | {src} | {e.licence} | {e.size} |")
    return "\n".join(rows)


def note_text(entry_ids: Iterable[str], intro: str, converted: Iterable[tuple[str, str]] = ()) -> str:
    """Plain-text table for a workflow's Note node: the files it needs, their folders and sources; ``converted``:
    (folder, file) of files made by a command from the entries' files (:data:`CONVERTED_FILES`)."""
    lines = [intro, "", "Files this workflow needs (folder under ComfyUI models/ -> file: how to get it):"]
    for folder, name in converted:
        lines.append(f"- {folder}/{name}: made from public files below.")
        lines.append(f"  Make it: {converted_how(folder, name)}")
    for entry_id in entry_ids:
        e = entry(entry_id)
        for f in e.files:
            lines.append(f"- {e.folder}/{f.name}: {e.what}.")
        if e.public:
            lines.append(f"  Public: {HUB_URL}/{e.repo_id} ({e.files[0].repo_file}), licence {e.licence}.")
            lines.append(f"  Or run: python -m megasr fetch --only {e.id}")
            if e.comfy_folder == "megasr":  # the one public file a MegaSR loader opens (the depth base)
                lines.append("  Or turn on download_missing on its MegaSR DAGE Loader: fetched when the workflow runs.")
        else:
            lines.append("  No public weights exist: train it with the pack's training package:")
            lines.append(f"  {e.source['train']}")
            lines.append(f"  {e.source['export']}")
    lines += ["", "python -m megasr check lists what is still missing; see README, 'Getting weights'."]
    return "\n".join(lines)
