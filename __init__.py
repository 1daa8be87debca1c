"""ComfyUI-MegaSR: MegaSR diffusion super-resolution nodes for ComfyUI.

Entry point only: registers the V3 nodes and the frontend folder. Importing it loads no model,
touches no network and prints nothing.
"""

try:
    from .nodes import comfy_entrypoint
except ModuleNotFoundError as e:  # imported outside ComfyUI (e.g. pytest collecting the repo root)
    if e.name not in ("comfy_api", "comfy"):
        raise

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
