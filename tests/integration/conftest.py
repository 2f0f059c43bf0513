"""Fixtures for integration tests against real peers (Orthanc)."""

from __future__ import annotations

from tests.integration.orthanc import loaded_archive, orthanc_server

__all__ = ["loaded_archive", "orthanc_server"]
