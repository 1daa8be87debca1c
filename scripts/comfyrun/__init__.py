"""Run the pack in a real ComfyUI without a browser: the in-process runner behind ``scripts/headless.py``.

Product code (headless runs, ``scripts/build_workflows.py``); the tests import it from here (through the
``tests/harness`` aliases). Nothing here imports pytest or anything under ``tests/``.

Modules:
    paths     repo root, the ComfyUI tree (``$COMFYUI_DIR`` or ``.comfyui/ComfyUI``), the offline environment
    runner    in-process ComfyUI: bootstrap, custom-node init, ``ComfyRunner.run(prompt)``, log checks
    workflow  UI-format workflow JSON -> API-format prompt, as the frontend's graphToPrompt does
"""
