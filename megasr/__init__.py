"""MegaSR as a pure-torch library (no ComfyUI import anywhere in this package)."""

__version__ = "0.1.0"
