"""Normalization: raw ledger items -> one validated, de-duplicated FHIR R4 record.

See :mod:`aggregator.normalize.pipeline` for the order of the steps and why.
"""

from aggregator.normalize.pipeline import normalize

__all__ = ["normalize"]
