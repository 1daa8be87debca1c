"""The one place the pack imports ComfyUI's node API; following a new API version is a one-line change.

In ComfyUI 0.3.75 ``comfy_api.v0_0_2`` re-exports ``comfy_api.latest``; both are marked unstable.
"""

from comfy_api.latest import ComfyExtension, io, ui

__all__ = ["ComfyExtension", "io", "ui"]
