"""Normalization: raw ledger items -> one validated, de-duplicated FHIR R4 record.

See :mod:`aggregator.normalize.pipeline` for the order of the steps and why.

``normalize`` is loaded on first use (PEP 562), not when the package is imported: a pull
imports small helpers from here (``normalize.uids`` for study hints), and importing the
pipeline with them pulled in pydicom and the validators, about a second of every
``aggregator pull`` that never normalizes anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aggregator.normalize.pipeline import normalize

__all__ = ["normalize"]


def __getattr__(name: str) -> Any:
    if name == "normalize":
        from aggregator.normalize.pipeline import normalize

        return normalize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
