"""The model catalog: bundled ModelSpecs by name, and loading a model from a YAML or config.json file."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from planner.catalog.data import MODELS_DIR
from planner.catalog.hf_config import model_fields_from_hf_config
from planner.errors import SpecError
from planner.schema import ModelSpec
from planner.specfiles import read_mapping, suggest, validate_spec

__all__ = ["catalog_names", "list_models", "load_model", "load_model_file"]


@cache
def _catalog() -> dict[str, ModelSpec]:
    models = {}
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        model = load_model_file(path)
        models[(model.name or path.stem).lower()] = model
    return models


def catalog_names() -> list[str]:
    """Catalog names as users write them (``2x70B``, ``mixtral-8x7b``), sorted case-insensitively."""
    return sorted((m.name or key for key, m in _catalog().items()), key=str.lower)


def list_models() -> list[ModelSpec]:
    """Every catalog model, in name order."""
    return [_catalog()[name.lower()] for name in catalog_names()]


def load_model_file(path: Path) -> ModelSpec:
    """A model from a moeplan model YAML or a Hugging Face config.json."""
    data = read_mapping(path, "model")
    if "architectures" in data or "model_type" in data:
        data = model_fields_from_hf_config(data, str(path))
    data.setdefault("name", path.stem)
    return validate_spec(ModelSpec, data, f"model file '{path}'")


@cache
def _bundled(key: str) -> ModelSpec | None:
    """The catalog model named ``key`` (lower case) read from its own file alone, or None.

    Each bundled file is named after its model in lower case (a test holds them to it), so a command
    that names one model reads one file, not the catalog's thirteen."""
    path = MODELS_DIR / f"{key}.yaml"
    try:
        if not path.is_file():
            return None
    except OSError:  # a name no file can have (ENAMETOOLONG): not a catalog model; the file reader says why
        return None
    model = load_model_file(path)
    return model if (model.name or path.stem).lower() == key else None


def load_model(name_or_path: str) -> ModelSpec:
    """A catalog model by name (case-insensitive) or a model file by path.

    >>> load_model("2x70B").num_experts
    2
    """
    key = name_or_path.lower()
    model = (_bundled(key) if "/" not in key and "\\" not in key else None) or _catalog().get(key)
    if model is not None:
        return model
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml", ".json"} or path.exists():
        return load_model_file(path)
    raise SpecError(
        f"model '{name_or_path}' is neither a catalog name nor a file; {suggest(name_or_path, catalog_names())} "
        "See `moeplan models` for the catalog."
    )
