"""ComfyUI runtime glue under the node classes: the model folder and downloads (``folders``), pack models under
model management (``models``), the MegaSR ControlNet lifecycle (``control``) and the tiled model call
(``tiled_model``). Node classes live in ``nodes/*.py``; ``nodes/api.py`` stays the one comfy_api import.
"""
