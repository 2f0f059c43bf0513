"""DIMSE error cases against an in-process pynetdicom SCP (the library as its own fake peer).

Orthanc cannot be made to fail sub-operations, abort mid-study or stall on demand; a small
pynetdicom SCP can. The connector under test is the real one; only the peer is scripted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from aggregator.errors import AccessDenied, TransientConnectorError
from connectors.base import NullProgress, PatientRef
from connectors.dimse import DimseConfig, DimseConnector
from tests.integration.orthanc import free_port
from tests.support import make_sink

STUDY = generate_uid(entropy_srcs=["faults-study"])
SERIES = generate_uid(entropy_srcs=["faults-series"])


def instance(n: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["faults", str(n)])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.PatientID, ds.Modality = "FAULT-1", "CT"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


INSTANCES = [instance(n) for n in range(3)]


class FakePacs:
    """A Study Root Q/R SCP whose C-GET/C-MOVE behaviour each test scripts."""

    def __init__(self, get: Callable[[Any], Iterator[Any]] | None = None,
                 move: Callable[[Any], Iterator[Any]] | None = None, find_delay: float = 0,
                 require_calling: str | None = None) -> None:
        self.port = free_port()
        ae = AE(ae_title="FAKEPACS")
        for cx in (Verification, StudyRootQueryRetrieveInformationModelFind,
                   StudyRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelMove):
            ae.add_supported_context(cx)
        ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
        if require_calling:
            ae.require_calling_aet = [require_calling]
        self.find_delay = find_delay
        handlers: list[Any] = [(evt.EVT_C_FIND, self._find)]
        if get:
            handlers.append((evt.EVT_C_GET, get))
        if move:
            handlers.append((evt.EVT_C_MOVE, move))
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    def _find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        time.sleep(self.find_delay)
        level = event.identifier.QueryRetrieveLevel
        if level == "STUDY":
            ds = Dataset()
            ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.PatientID = "STUDY", STUDY, "FAULT-1"
            ds.NumberOfStudyRelatedInstances = len(INSTANCES)
            yield 0xFF00, ds
        elif level == "IMAGE":
            for inst in INSTANCES:
                ds = Dataset()
                ds.QueryRetrieveLevel = "IMAGE"
                ds.SOPInstanceUID, ds.SOPClassUID = inst.SOPInstanceUID, inst.SOPClassUID
                ds.SeriesInstanceUID = SERIES
                yield 0xFF00, ds
        yield 0x0000, None

    def config(self, **kw: Any) -> DimseConfig:
        return DimseConfig(host="127.0.0.1", port=self.port, called_ae="FAKEPACS", **kw)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


@pytest.fixture()
def pacs_factory() -> Iterator[Callable[..., FakePacs]]:
    made: list[FakePacs] = []

    def make(**kw: Any) -> FakePacs:
        made.append(FakePacs(**kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_refused_association_names_our_ae(pacs_factory: Callable[..., FakePacs]) -> None:
    pacs = pacs_factory(require_calling="SOMEONE")
    with pytest.raises(AccessDenied, match="AGGREGATOR"):
        DimseConnector(pacs.config()).check()


def test_failed_sub_operations_are_ledger_rows(pacs_factory: Callable[..., FakePacs], tmp_path: Path) -> None:
    def get(event: Any) -> Iterator[Any]:
        yield len(INSTANCES)
        for inst in INSTANCES[:2]:
            yield 0xFF00, inst
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = [INSTANCES[2].SOPInstanceUID]
        yield 0xA702, failed

    pacs = pacs_factory(get=get)
    h = make_sink(tmp_path, kind="dimse")
    DimseConnector(pacs.config()).pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    done = {e.key for e in h.entries("done")}
    failed = {e.key: e for e in h.entries("failed")}
    assert done == {str(i.SOPInstanceUID) for i in INSTANCES[:2]}
    assert set(failed) == {str(INSTANCES[2].SOPInstanceUID)}
    assert failed[str(INSTANCES[2].SOPInstanceUID)].status == "0xA702"


def test_instances_never_sent_are_failed_rows(pacs_factory: Callable[..., FakePacs], tmp_path: Path) -> None:
    def get(event: Any) -> Iterator[Any]:  # claims success but sends one instance only
        yield 1
        yield 0xFF00, INSTANCES[0]

    pacs = pacs_factory(get=get)
    h = make_sink(tmp_path, kind="dimse")
    cursor = DimseConnector(pacs.config()).pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    assert {e.key for e in h.entries("done")} == {str(INSTANCES[0].SOPInstanceUID)}
    assert {e.key for e in h.entries("failed")} == {str(i.SOPInstanceUID) for i in INSTANCES[1:]}
    assert cursor["studies"]["studies"] == {}  # incomplete: retried next time


def test_abort_mid_retrieve_keeps_what_arrived(pacs_factory: Callable[..., FakePacs], tmp_path: Path) -> None:
    def get(event: Any) -> Iterator[Any]:
        yield len(INSTANCES)
        yield 0xFF00, INSTANCES[0]
        event.assoc.abort()
        yield 0xFF00, INSTANCES[1]

    pacs = pacs_factory(get=get)
    h = make_sink(tmp_path, kind="dimse")
    with pytest.raises(TransientConnectorError):
        DimseConnector(pacs.config()).pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    assert {e.key for e in h.entries("done")} == {str(INSTANCES[0].SOPInstanceUID)}


def test_slow_peer_hits_the_dimse_timeout(pacs_factory: Callable[..., FakePacs], tmp_path: Path) -> None:
    pacs = pacs_factory(find_delay=3)
    h = make_sink(tmp_path, kind="dimse")
    t0 = time.monotonic()
    with pytest.raises(TransientConnectorError):
        DimseConnector(pacs.config(dimse_timeout=0.5)).pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    assert time.monotonic() - t0 < 2.5


def test_move_destination_unknown_says_so(pacs_factory: Callable[..., FakePacs], tmp_path: Path) -> None:
    def move(event: Any) -> Iterator[Any]:
        yield None, None  # pynetdicom answers 0xA801 "move destination unknown"

    pacs = pacs_factory(move=move)
    h = make_sink(tmp_path, kind="dimse")
    cfg = pacs.config(retrieve="move", store_port=free_port())
    with pytest.raises(AccessDenied, match="move destination AE 'AGGREGATOR'") as info:
        DimseConnector(cfg).pull(PatientRef(id="FAULT-1"), None, h.sink, NullProgress())
    assert info.value.status == "0xA801"
