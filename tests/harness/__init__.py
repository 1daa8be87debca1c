"""Test harness for ComfyUI-MegaSR: a real ComfyUI 0.3.75, in-process and over HTTP, plus tiny real checkpoints.

Nothing here imports pytest (``tests/conftest.py`` wraps it in fixtures), so ``scripts/headless.py``
re-uses the same converter and executor. Nothing here mocks ComfyUI: every run goes through ComfyUI's own
``execution.PromptExecutor`` or its own HTTP server.

Modules:
    paths        repo root, ComfyUI tree, fixture cache folder
    comfy        in-process ComfyUI: bootstrap, node init, ``ComfyRunner.run(prompt)``, log checks
    workflow     UI-format workflow JSON -> API-format prompt, as the frontend's graphToPrompt does
    checkpoints  seeded tiny-but-real SD-2 checkpoint (LDM keys, OpenCLIP ViT-H text, TAESD VAE)
    server       the real ComfyUI server process on a free loopback port (HTTP + WebSocket)
    images       small deterministic test images (the example input of the shipped workflows)
"""
