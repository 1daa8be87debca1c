"""Test harness for ComfyUI-MegaSR: a real ComfyUI 0.3.75, in-process and over HTTP, plus tiny real checkpoints.

Nothing here imports pytest (``tests/conftest.py`` wraps it in fixtures). The in-process runner and the
converter are product code in ``scripts/comfyrun/`` (``scripts/headless.py`` runs on them); ``harness.comfy``
and ``harness.workflow`` are aliases of those modules. Nothing here mocks ComfyUI: every run goes through ComfyUI's own
``execution.PromptExecutor`` or its own HTTP server.

Modules:
    paths        repo root, ComfyUI tree, fixture cache folder
    comfy        (alias of comfyrun.runner) in-process ComfyUI: bootstrap, node init, ``ComfyRunner.run(prompt)``, log checks
    workflow     (alias of comfyrun.workflow) UI-format workflow JSON -> API-format prompt, as the frontend's graphToPrompt does
    checkpoints  seeded tiny-but-real SD-2 checkpoint (LDM keys, OpenCLIP ViT-H text, TAESD VAE)
    server       the real ComfyUI server process on a free loopback port (HTTP + WebSocket)
    images       small deterministic test images (the example input of the shipped workflows)
"""

import sys as _sys
from pathlib import Path as _Path

# The product runner package ``comfyrun`` lives in scripts/; appended (not prepended) so nothing there shadows
# an installed module.
_SCRIPTS = str(_Path(__file__).resolve().parents[2] / "scripts")
if _SCRIPTS not in _sys.path:
    _sys.path.append(_SCRIPTS)
