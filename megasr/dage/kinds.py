"""The one registry of guidance-extractor kinds.

Every place that needs to know which extractors exist (weight components, the DAGE Loader's ``kind``
choices, training stage names and config sections, the CLI's base flags, the manifest, the web code via
``web/extractor_kinds.json``) reads this table. A new extractor is one row here, one module under
``megasr/dage/`` (or another core package) and, where it has a node, one node class.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ExtractorKind:
    #: short name used in code, maps and strength inputs ("hed", "depth", "seg", "clip")
    kind: str
    #: weight-file component (``megasr.component`` metadata) of the fine-tuned file
    component: str
    #: module (relative to ``megasr.dage``, or absolute from ``megasr.``) and class implementing the extractor
    module: str
    class_name: str
    #: what the extractor is, for messages and docs
    description: str
    #: training stage name (CLI subcommand) and its config section; None for an extractor the pack does not
    #: train (RAM/DAPE: published weights only)
    stage: str | None
    config_section: str | None
    #: value of the DAGE Loader's ``kind`` combo (stored in shipped workflows: never change it); None when the
    #: extractor has its own loader instead of a DAGE Loader choice
    node_choice: str | None
    #: the fine-tuned file holds a LoRA only; loading needs the base weights (``base_path``)
    lora: bool
    #: the extractor produces a guidance map (IMAGE) read by MS-GAM; channels the network reads
    map_channels: int | None
    #: what the base file is (for messages); None when the component is self-contained
    base_description: str | None
    #: node id of the map node that runs this extractor (None: no map node)
    map_node: str | None = None

    @property
    def is_map(self) -> bool:
        return self.map_channels is not None

    @property
    def is_trained(self) -> bool:
        """The pack's training package fine-tunes it (a DAGE); False for published-only extractors."""
        return self.stage is not None

    def extractor_class(self) -> type:
        # relative to this package: inside ComfyUI the core is ``<pack folder>.megasr``, not a top-level ``megasr``
        core = __package__.rsplit(".", 1)[0]  # the package holding dage/ (megasr)
        if self.module.startswith("megasr."):
            module = importlib.import_module("." + self.module.removeprefix("megasr."), core)
        else:
            module = importlib.import_module(f".{self.module}", __package__)
        return getattr(module, self.class_name)

    def as_json(self) -> dict:
        d = asdict(self)
        d["is_map"] = self.is_map
        d["is_trained"] = self.is_trained
        return d


KINDS: tuple[ExtractorKind, ...] = (
    ExtractorKind(
        kind="hed",
        component="dage_hed",
        module="hed",
        class_name="HedExtractor",
        description="the DAGE HED edge extractor",
        stage="dage-hed",
        config_section="dage_hed",
        node_choice="hed",
        lora=False,
        map_channels=1,
        base_description=None,
        map_node="MegaSRDageHED",
    ),
    ExtractorKind(
        kind="depth",
        component="dage_depth_lora",
        module="depth",
        class_name="DepthExtractor",
        description="the DAGE depth LoRA (Depth-Anything-V2)",
        stage="dage-depth",
        config_section="dage_depth",
        node_choice="depth",
        lora=True,
        map_channels=1,
        base_description="Depth-Anything-V2-Small (transformers layout)",
        map_node="MegaSRDageDepth",
    ),
    ExtractorKind(
        kind="seg",
        component="dage_seg",
        module="seg",
        class_name="SegExtractor",
        description="the DAGE segmentation extractor (Mask2Former ADE20K)",
        stage="dage-seg",
        config_section="dage_seg",
        node_choice="seg",
        lora=False,
        map_channels=3,
        base_description=None,
        map_node="MegaSRDageSegmentation",
    ),
    ExtractorKind(
        kind="clip",
        component="dage_clip_lora",
        module="clip",
        class_name="ClipExtractor",
        description="the DAGE CLIP image-semantics LoRA (ViT-H/14)",
        stage="dage-clip",
        config_section="dage_clip",
        node_choice="clip_lora",
        lora=True,
        map_channels=None,
        base_description="CLIP ViT-H/14 vision tower (clip_vision file)",
    ),
    ExtractorKind(
        kind="ram",
        component="ram_dape",
        module="megasr.ram.tagger",
        class_name="RamModel",
        description="the DAPE-equipped RAM tagger (tags and representation tokens, SeeSR's semantic prompt)",
        stage=None,
        config_section=None,
        node_choice=None,
        lora=True,
        map_channels=None,
        base_description="RAM Swin-L (ram_swin_large_14m.pth; the DAPE LoRA is SeeSR's DAPE.pth)",
    ),
)

BY_KIND: dict[str, ExtractorKind] = {k.kind: k for k in KINDS}
BY_COMPONENT: dict[str, ExtractorKind] = {k.component: k for k in KINDS}
BY_STAGE: dict[str, ExtractorKind] = {k.stage: k for k in KINDS if k.stage is not None}
BY_NODE_CHOICE: dict[str, ExtractorKind] = {k.node_choice: k for k in KINDS if k.node_choice is not None}

#: the maps MS-GAM reads, in its input order
MAP_KINDS: tuple[str, ...] = tuple(k.kind for k in KINDS if k.is_map)
#: the DAGEs: the extractors the training package fine-tunes (RAM/DAPE is published-only)
TRAINED_KINDS: tuple[ExtractorKind, ...] = tuple(k for k in KINDS if k.is_trained)
DAGE_COMPONENTS: tuple[str, ...] = tuple(k.component for k in TRAINED_KINDS)
DAGE_STAGES: tuple[str, ...] = tuple(k.stage for k in KINDS if k.stage is not None)


def lookup(name: str) -> ExtractorKind:
    """The kind for any of its names: kind, component, stage or node choice."""
    for table in (BY_KIND, BY_COMPONENT, BY_STAGE, BY_NODE_CHOICE):
        if name in table:
            return table[name]
    known = ", ".join(k.kind for k in KINDS)
    raise ValueError(f"'{name}' is not a guidance-extractor kind (expected one of {known})")


def registry_json() -> dict:
    """The registry as JSON for the web code (``web/extractor_kinds.json``, written by scripts/build_workflows.py)."""
    return {"kinds": [k.as_json() for k in KINDS], "map_kinds": list(MAP_KINDS)}
