"""The pydantic base every spec derives from: frozen, extra keys rejected, attribute docstrings as docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Spec"]


class Spec(BaseModel):
    """Frozen, strict base: a misspelt key is an error, and each field's docstring is its documentation.

    NaN and infinity are rejected everywhere: no figure of a spec is meaningful as either.

    The docstring under each field becomes its JSON Schema ``description`` when ``moeplan schema``
    prints it (``planner.schema.docs``), not when the class is defined: pydantic's
    ``use_attribute_docstrings`` would read every spec's source at every command's start.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        allow_inf_nan=False,
        # Build validators on first use, not at import: `moeplan --version` and commands that never
        # validate some specs skip that cost (about 100 ms for the whole schema).
        defer_build=True,
    )
