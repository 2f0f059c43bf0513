"""A real Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) for integration tests and benchmarks.

Each server runs from a config file in its own temp dir, on free loopback ports, with
TCP_NODELAY (see DESIGN.md "Real components"), and is stopped by PID. Only our AE titles, at
127.0.0.1, may query or retrieve (``DicomAlwaysAllow*`` off, ``DicomCheckModalityHost`` on).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

ORTHANC = Path("/usr/sbin/Orthanc")
PLUGINS = Path("/usr/share/orthanc/plugins")
ORTHANC_AET = "ORTHANC"
CLIENT_AET = "AGGREGATOR"
MOVE_AET = "AGGMOVE"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc; ``url`` is its REST root, ``dicomweb`` its DICOMweb root."""

    workdir: Path
    http_port: int
    dicom_port: int
    store_port: int
    proc: subprocess.Popen[bytes] | None = None
    aet: str = ORTHANC_AET
    extra_modalities: dict[str, dict[str, object]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, object]:
        def modality(aet: str, port: int) -> dict[str, object]:
            return {"AET": aet, "Host": "127.0.0.1", "Port": port, "AllowEcho": True, "AllowFind": True,
                    "AllowGet": True, "AllowMove": True, "AllowStore": True}

        plugin = PLUGINS / "libOrthancDicomWeb.so"
        return {
            "Name": "aggregator-test",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckModalityHost": True,
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowGet": False,
            "DicomAlwaysAllowMove": False,
            "DicomCheckCalledAet": True,
            "TcpNoDelay": True,
            "StorageCompression": False,
            "StableAge": 1,
            "DicomModalities": {
                "aggregator": modality(CLIENT_AET, self.store_port),
                "aggmove": modality(MOVE_AET, self.store_port),
                **self.extra_modalities,
            },
            "Plugins": [str(plugin)] if plugin.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "StudiesMetadata": "Full"},
            "LimitFindResults": 0,
            "LimitFindInstances": 0,
        }

    def start(self, timeout: float = 30) -> None:
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=1))
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([str(ORTHANC), f"--logdir={logs}", str(cfg)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; logs in {logs}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok and _port_open(self.dicom_port):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not become ready within {timeout}s; logs in {logs}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None

    # -- REST helpers --------------------------------------------------------------------------

    def upload(self, paths: Iterable[Path]) -> list[str]:
        """POST each file to ``/instances``; returns Orthanc instance ids."""
        ids = []
        with requests.Session() as s:
            for p in paths:
                r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=60,
                           headers={"Content-Type": "application/dicom"})
                r.raise_for_status()
                ids.append(r.json()["ID"])
        return ids

    def instances(self) -> list[str]:
        return list(requests.get(f"{self.url}/instances", timeout=30).json())

    def file(self, instance_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{instance_id}/file", timeout=60)
        r.raise_for_status()
        return r.content

    def sop_uid(self, instance_id: str) -> str:
        tags = requests.get(f"{self.url}/instances/{instance_id}/simplified-tags", timeout=30).json()
        return str(tags["SOPInstanceUID"])

    def files_by_sop(self) -> dict[str, bytes]:
        """Every stored instance, keyed by SOP Instance UID."""
        return {self.sop_uid(i): self.file(i) for i in self.instances()}

    def study_instances(self, study_uid: str) -> dict[str, bytes]:
        found = requests.post(f"{self.url}/tools/lookup", data=study_uid, timeout=30).json()
        out: dict[str, bytes] = {}
        for hit in found:
            if hit.get("Type") == "Study":
                for inst in requests.get(f"{self.url}/studies/{hit['ID']}/instances", timeout=60).json():
                    out[inst["MainDicomTags"]["SOPInstanceUID"]] = self.file(inst["ID"])
        return out

    def clear(self) -> None:
        for pid in requests.get(f"{self.url}/patients", timeout=30).json():
            requests.delete(f"{self.url}/patients/{pid}", timeout=30)


def _die_with_parent() -> None:
    """Linux: SIGTERM Orthanc when the process that started it dies (a killed test run)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def orthanc_available() -> str | None:
    """None when Orthanc can run here, else the reason to skip."""
    if not ORTHANC.exists():
        return f"{ORTHANC} is not installed (apt-get install orthanc orthanc-dicomweb)"
    return None


def start_orthanc(workdir: Path, **kwargs: object) -> Orthanc:
    workdir.mkdir(parents=True, exist_ok=True)
    server = Orthanc(workdir, free_port(), free_port(), free_port(), **kwargs)  # type: ignore[arg-type]
    server.start()
    return server


@pytest.fixture(scope="session")
def orthanc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """One Orthanc for the session (tests that need an empty one clear it)."""
    reason = orthanc_available()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir / "db", ignore_errors=True)


# --- test archive content ---------------------------------------------------------------------

#: pydicom's bundled files: uncompressed, big endian, deflated, JPEG, JPEG-LS, J2K, RLE, multi-frame
BUNDLED_FILES = [
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
    "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "JPGExtended.dcm",
    "JPEG-lossy.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm", "JPEGLSNearLossless_08.dcm",
    "rtdose.dcm", "waveform_ecg.dcm", "test-SR.dcm",
]


def rehome(src: Path, dest: Path, *, patient_id: str, issuer: str | None, salt: str,
           study_uid: str | None = None, birth_date: str = "19700101") -> Path | None:
    """Copy a DICOM file into another (synthetic) patient with fresh UIDs, keeping its encoding.

    The patient gets one birth date across all files (several would be several people under
    one PatientID, which the connectors rightly refuse to guess between); names are kept, for
    their character sets.

    Group lengths and trailing padding are dropped, and sequences get explicit lengths, because
    the archive (DCMTK) re-encodes them that way when it sends an instance over DIMSE; so "the
    archive's copy" and "what goes over the wire" are the same bytes. Returns None for a file
    pydicom cannot rewrite.
    """
    import pydicom
    from pydicom.uid import generate_uid

    try:
        ds = pydicom.dcmread(src)
    except Exception:
        return None
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    if issuer:
        ds.IssuerOfPatientID = issuer
    elif "IssuerOfPatientID" in ds:
        del ds.IssuerOfPatientID
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        old = str(ds.get(kw, "") or src.name)
        setattr(ds, kw, generate_uid(entropy_srcs=[salt, kw, old]))
    if study_uid:
        ds.StudyInstanceUID = study_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for elem in list(ds):
        if elem.tag.element == 0 or elem.tag == 0xFFFCFFFC:
            del ds[elem.tag]
    _explicit_lengths(ds)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(dest, enforce_file_format=True)
    except Exception:
        return None
    return dest


def _explicit_lengths(ds: object) -> None:
    for elem in ds:  # type: ignore[attr-defined]
        if elem.VR == "SQ":
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False
                _explicit_lengths(item)


def archive_files(out: Path, shared: Path | None) -> dict[str, list[Path]]:
    """Files to load, by label: synthetic multi-patient set, bundled pydicom files, shared data."""
    from pydicom.data import get_testdata_file

    from fixtures.dicom import generate_multi_patient_dicom

    groups: dict[str, list[Path]] = {}
    for p in generate_multi_patient_dicom(out / "multi"):
        groups.setdefault(p.parent.name, []).append(p)
    bundled = []
    for name in BUNDLED_FILES:
        src = get_testdata_file(name)
        if src:
            got = rehome(Path(src), out / "pyd" / name, patient_id="AGG-PYD", issuer=None, salt="pyd")
            if got:
                bundled.append(got)
    groups["PYD"] = bundled
    # one study holding every bundled SOP class: more classes than fit in 128 presentation contexts
    many_study = "2.25.91827364519283746501928374650192837465"
    many = []
    for name in [*BUNDLED_FILES, "rtplan.dcm", "reportsi.dcm", "examples_rgb_color.dcm", "liver_1frame.dcm",
                 "examples_ybr_color.dcm"]:
        src = get_testdata_file(name)
        if src:
            got = rehome(Path(src), out / "many" / name, patient_id="AGG-MANY", issuer=None, salt="many",
                         study_uid=many_study)
            if got:
                many.append(got)
    groups["MANY"] = many
    if shared is not None and (shared / "dicom").is_dir():
        extra = []
        roots = [shared / "dicom" / d for d in ("pydicom-data", "pydicom/charset_files", "fo-dicom", "highdicom")]
        for root in roots:
            for path in sorted(root.glob("*.dcm")) if root.is_dir() else []:
                moved = rehome(path, out / "shared" / root.name / path.name, patient_id="AGG-SHR", issuer=None,
                               salt="shr")
                if moved:
                    extra.append(moved)
        groups["SHR"] = extra
    return groups


@dataclass
class LoadedArchive:
    server: Orthanc
    groups: dict[str, list[Path]]
    #: label -> {SOP Instance UID: Orthanc's stored file}
    copies: dict[str, dict[str, bytes]]

    def uids(self, label: str) -> set[str]:
        return set(self.copies.get(label, {}))


@pytest.fixture(scope="session")
def loaded_archive(orthanc_server: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> LoadedArchive:
    """The session Orthanc loaded with several patients (colliding PatientIDs included)."""
    from tests.conftest import SHARED

    out = tmp_path_factory.mktemp("archive-files")
    groups = archive_files(out, SHARED / "data" if (SHARED / "data").is_dir() else None)
    copies: dict[str, dict[str, bytes]] = {}
    for label, paths in groups.items():
        ids = orthanc_server.upload(paths)
        copies[label] = {orthanc_server.sop_uid(i): orthanc_server.file(i) for i in ids}
    return LoadedArchive(orthanc_server, groups, copies)
