"""ComfyUI-MegaSR: MegaSR diffusion super-resolution nodes for ComfyUI.

Entry point only: registers the V3 nodes and the frontend folder. Importing it loads no model,
touches no network and prints nothing.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
