"""Alias of the product converter ``scripts/comfyrun/workflow.py`` (UI-format workflow -> API prompt).

``from harness import workflow`` gives the very same module object as ``from comfyrun import workflow``.
"""

import sys

from comfyrun import workflow as _workflow

sys.modules[__name__] = _workflow
