"""Thin ComfyUI V3 node classes over the ``megasr`` library, one file per concern."""

from __future__ import annotations

from .api import ComfyExtension, io


class MegaSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .colorfix import MegaSRColorFix

        return [MegaSRColorFix]


async def comfy_entrypoint() -> MegaSRExtension:
    return MegaSRExtension()
