"""The shared connector conformance suite, run on the imaging connectors against a real Orthanc."""

from __future__ import annotations

from pathlib import Path

import pytest

from connectors.base import PatientRef
from connectors.dicomweb import DicomwebConfig, DicomwebConnector
from connectors.dimse import DimseConfig, DimseConnector
from tests.conformance import assert_connector_conforms
from tests.integration.orthanc import CLIENT_AET, MOVE_AET, LoadedArchive

pytestmark = pytest.mark.orthanc

PATIENT = PatientRef(id="100200", issuer="HOSP-A")


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_dimse_conforms(loaded_archive: LoadedArchive, tmp_path: Path, retrieve: str) -> None:
    srv = loaded_archive.server

    def make() -> DimseConnector:
        return DimseConnector(DimseConfig(
            host="127.0.0.1", port=srv.dicom_port, called_ae=srv.aet, calling_ae=CLIENT_AET, retrieve=retrieve,
            move_ae=MOVE_AET if retrieve == "move" else None,
            store_port=srv.store_port if retrieve == "move" else None,
        ))

    report = assert_connector_conforms(make, PATIENT, tmp_path, kind="dimse",
                                       min_done=len(loaded_archive.uids("HOSPA")))
    assert report.second_counts.get("done", 0) == 0  # the re-pull fetched nothing again


def test_dicomweb_conforms(loaded_archive: LoadedArchive, tmp_path: Path) -> None:
    def make() -> DicomwebConnector:
        return DicomwebConnector(DicomwebConfig(url=loaded_archive.server.dicomweb))

    report = assert_connector_conforms(make, PATIENT, tmp_path, kind="dicomweb",
                                       min_done=len(loaded_archive.uids("HOSPA")))
    assert report.second_counts.get("done", 0) == 0
