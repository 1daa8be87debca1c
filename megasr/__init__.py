"""MegaSR as a pure-torch library (no ComfyUI import anywhere in this package)."""

__version__ = "0.2.0"  # the one version: pyproject.toml [project] and web/megasr.js say the same (tested)
