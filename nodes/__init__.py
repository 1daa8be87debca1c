"""Thin ComfyUI V3 node classes over the ``megasr`` library, one file per concern."""

from __future__ import annotations

from .api import ComfyExtension, io


class MegaSRExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .cism import MegaSRCismInjection
        from .colorfix import MegaSRColorFix
        from .dage import DAGE_NODES
        from .edited_map import MegaSREditedMap
        from .loaders import MegaSRModelLoader
        from .msgam import MegaSRGuidanceFusion
        from .quality import MegaSRImageQuality
        from .ram import RAM_NODES
        from .runtime.folders import register_model_folder
        from .sampler import MegaSRSampler
        from .semantics import MegaSRClipSemantics
        from .tags import TAG_NODES

        register_model_folder()
        return [
            MegaSRModelLoader,
            *DAGE_NODES,
            MegaSRClipSemantics,
            MegaSRCismInjection,
            MegaSRGuidanceFusion,
            MegaSRSampler,
            MegaSRColorFix,
            *TAG_NODES,
            *RAM_NODES,
            MegaSREditedMap,
            MegaSRImageQuality,
        ]


async def comfy_entrypoint() -> MegaSRExtension:
    return MegaSRExtension()
