"""Alias of the product runner ``scripts/comfyrun/runner.py`` (the in-process ComfyUI moved out of tests/).

``from harness import comfy`` and ``from harness.comfy import X`` give the very same module object, so a
test that patches an attribute here patches the runner itself.
"""

import sys

from comfyrun import runner as _runner

sys.modules[__name__] = _runner
