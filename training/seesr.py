"""Warm start from a local SeeSR checkpoint folder (config ``init.seesr_dir``).

The mapping is pure and shared with ``python -m megasr convert-seesr``, so it lives in
:mod:`megasr.seesr_weights`; this module keeps the training package's names.
"""

from __future__ import annotations

from megasr.seesr_weights import (
    SEESR_IMAGE_BRANCH,
    SeeSRError,
    SeeSRMapReport,
    SeeSRReport,
    load_seesr_unet_into,
    map_state_onto,
    read_seesr_part,
    warm_start_from_seesr,
)

__all__ = [
    "SEESR_IMAGE_BRANCH",
    "SeeSRError",
    "SeeSRMapReport",
    "SeeSRReport",
    "load_seesr_unet_into",
    "map_state_onto",
    "read_seesr_part",
    "warm_start_from_seesr",
]
