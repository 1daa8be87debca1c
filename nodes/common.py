"""What the node classes share: the category, the pack's custom types and the strength widget.

The ComfyUI runtime glue (model folder, downloads, managed models, ControlNet, tiling) is ``nodes/runtime/``.
"""

from __future__ import annotations

from .api import io

CATEGORY = "MegaSR"

MegaSRModelType = io.Custom("MEGASR_MODEL")
SemanticsType = io.Custom("MEGASR_SEMANTICS")
DageModelType = io.Custom("MEGASR_DAGE")
RamModelType = io.Custom("MEGASR_RAM")  # the DAPE-equipped RAM (MegaSR RAM Loader)
RamSemanticsType = io.Custom("MEGASR_RAM_SEMANTICS")  # its representation tokens of an LR image (MegaSR RAM Tags)


def strength_input(name: str, tooltip: str) -> io.Float.Input:
    """A 0..3 strength (default 1): the one range every MegaSR weight/strength widget uses."""
    return io.Float.Input(name, default=1.0, min=0.0, max=3.0, step=0.05, tooltip=tooltip)
