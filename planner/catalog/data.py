"""Where the bundled catalogs live: one data folder inside the package, shipped in the wheel as is.

``planner/catalog/data/`` holds ``models/*.yaml`` (the model catalog), ``gpus.yaml`` (the hardware
catalog) and ``clusters/*.yaml`` (the bundled cluster profiles). Both a source checkout and an installed
wheel read them from here: hatchling packages every file under ``planner/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CLUSTERS_DIR", "DATA_DIR", "GPUS_FILE", "MODELS_DIR"]

DATA_DIR = Path(__file__).parent / "data"
"""The catalogs' data folder."""
MODELS_DIR = DATA_DIR / "models"
"""One YAML file per model, each with the source of its numbers."""
GPUS_FILE = DATA_DIR / "gpus.yaml"
"""The hardware catalog: datasheet figures of each GPU, with sources."""
CLUSTERS_DIR = DATA_DIR / "clusters"
"""One YAML file per bundled cluster profile, with sources."""
