"""MegaSR Edited Map: a guidance map painted in the map editor (web/), loaded from ComfyUI's input folder.

The editor saves its result through ComfyUI's ``/upload/image`` into ``input/megasr_edits/`` (never over an
existing file) and puts this node between the map it edited and that map's consumers, so the edit is part of
the saved workflow and a re-run reproduces it. The cache key is the file's content hash, so replacing the file
under the same name re-runs the graph from here.
"""

from __future__ import annotations

import logging
import os

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageOps

from ..megasr.dage.kinds import MAP_KINDS
from ..megasr.errors import MegaSRInputError
from ..megasr.files import sha256_file
from ..megasr.images import as_rgb_image
from .api import io, ui
from .common import CATEGORY

log = logging.getLogger("megasr")

WHERE = "MegaSR Edited Map"
#: the input-folder subfolder the editor saves into
EDITS_SUBFOLDER = "megasr_edits"
IMAGE_SUFFIXES = (".png", ".webp", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def edited_map_files() -> list[str]:
    """Image files of the input folder and of its ``megasr_edits`` subfolder (as ``megasr_edits/<name>``)."""
    root = folder_paths.get_input_directory()
    out: list[str] = []
    for sub in ("", EDITS_SUBFOLDER):
        folder = os.path.join(root, sub)
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            continue
        for name in names:
            if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name)):
                out.append(f"{sub}/{name}" if sub else name)
    return out


def _resolve(image: str) -> str:
    if not image or not isinstance(image, str):
        raise MegaSRInputError(WHERE, "image", "no file chosen; save a map from the map editor or pick a file")
    path = folder_paths.get_annotated_filepath(image)
    root = os.path.realpath(folder_paths.get_input_directory())
    if not os.path.realpath(path).startswith(root + os.sep):
        raise MegaSRInputError(WHERE, "image", f"'{image}' is outside ComfyUI's input folder")
    if not os.path.isfile(path):
        raise MegaSRInputError(
            WHERE, "image", f"'{image}' is not in ComfyUI's input folder ({root}); save the edit again or pick a file"
        )
    return path


def load_map_file(path: str, name: str) -> torch.Tensor:
    """The file as an IMAGE [1, H, W, 3] in 0..1, exact 8-bit values (no colour management, no resampling)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32) / 65535.0
                arr = np.repeat(arr[..., None], 3, axis=-1)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Image.DecompressionBombError as e:
        raise MegaSRInputError(
            WHERE, "image", f"'{name}' is refused as too large to decode safely ({e}); save the map at the LR size"
        ) from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # what PIL raises for broken files
        raise MegaSRInputError(WHERE, "image", f"'{name}' is not a readable image ({type(e).__name__}: {e})") from e
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)


class MegaSREditedMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MegaSREditedMap",
            display_name=WHERE,
            category=CATEGORY,
            description=(
                "A guidance map edited by hand in the MegaSR map editor (right-click a map node > 'Edit map "
                "(MegaSR)'). Loads the saved file from ComfyUI's input folder and hands it on in place of the "
                "original map, so the edit is saved with the workflow. Re-runs when the file's content changes."
            ),
            inputs=[
                io.Combo.Input(
                    "kind",
                    options=list(MAP_KINDS),
                    default="seg",
                    tooltip="Which guidance map the file is: hed (white edges on black), depth (near = bright) or "
                    "seg (ADE20K palette colours). The editor offers the matching tools.",
                ),
                io.Combo.Input(
                    "image",
                    options=edited_map_files(),
                    upload=io.UploadType.image,
                    image_folder=io.FolderType.input,
                    tooltip="The edited map file in ComfyUI's input folder (the editor saves into "
                    "input/megasr_edits/ and never overwrites a file).",
                ),
                io.Image.Input(
                    "original",
                    optional=True,
                    tooltip="The map this edit replaces (the editor connects it). When connected, the edited file "
                    "must have the same size; the editor opens it to start over.",
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="map",
                    tooltip="The edited map at the file's size, exact 8-bit values, as an IMAGE for MS-GAM Guidance "
                    "Fusion's matching input.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, kind, image) -> bool | str:
        """Replaces ComfyUI's combo check of both inputs (it would list only the files present at load time)."""
        if kind not in MAP_KINDS:
            return f"{WHERE}: input 'kind': '{kind}' is not one of {', '.join(MAP_KINDS)}"
        try:
            _resolve(image)
        except MegaSRInputError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, kind, image, original=None):
        """Content hash: a file replaced under the same name is seen as a change (ComfyUI caches by value)."""
        try:
            return (kind, image, sha256_file(_resolve(image)))
        except (MegaSRInputError, OSError):
            return (kind, image, None)

    @classmethod
    def execute(cls, kind, image, original=None) -> io.NodeOutput:
        if kind not in MAP_KINDS:
            raise MegaSRInputError(WHERE, "kind", f"'{kind}' is not one of {', '.join(MAP_KINDS)}")
        out = load_map_file(_resolve(image), image)
        if original is not None:
            ref = as_rgb_image(original, WHERE, "original")
            if tuple(ref.shape[1:3]) != tuple(out.shape[1:3]):
                raise MegaSRInputError(
                    WHERE,
                    "image",
                    f"'{image}' is {out.shape[2]}x{out.shape[1]} px but the original map is {ref.shape[2]}x"
                    f"{ref.shape[1]} px; edit the current map again (the editor keeps its size) or disconnect "
                    "'original'",
                )
            if ref.shape[0] > 1:
                out = out.expand(ref.shape[0], -1, -1, -1).contiguous()
        log.info("%s: %s map from '%s' (%dx%d)", WHERE, kind, image, out.shape[2], out.shape[1])
        return io.NodeOutput(out, ui=ui.PreviewImage(out, cls=cls))


__all__ = ["EDITS_SUBFOLDER", "MegaSREditedMap", "edited_map_files", "load_map_file"]
