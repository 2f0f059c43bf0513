"""Check and package at scale: wall time and peak RSS of the checklist engine and the package
writer over one patient's record of 25k to 200k+ resources.

Why: normalization streams its output into a file-backed :class:`~aggregator.model.NormalizedRecord`,
so a large record never has to be one dict in memory. The steps after it, ``check`` (the
checklist engine) and ``package`` (the consultant package and its ``verify``), read that record;
if they keep what they read, the memory normalization saved comes back there. This benchmark
shows whether their memory stays flat as the record grows.

The record is the one ``bench/bench_normalize.py`` builds (Synthea bundles copied with renamed
UUIDs and shifted dates, one Patient, fed through a real LedgerSink); its builder is imported,
not copied. Each size is normalized once, in its own process, and its bundle file and side lists
(documents, images, quarantine, conflicts) are saved. Then, each in a fresh process whose peak
RSS the parent reads from ``wait4``:

* ``check``: :func:`aggregator.checklist.evaluate` with the case's checklist, the ledger rows of
  the case (``pipeline.check_case`` passes the same), and the sources, as ``aggregator check`` does
  after normalizing;
* ``package``: :func:`aggregator.package.write_package` with the gap report that ``check`` wrote,
  then :func:`aggregator.package.verify_package` on the result, as ``aggregator package`` and
  ``aggregator verify`` do.

The child's resident size just before the measured call (``base``: the interpreter, the imports,
the record's offset index) is printed next to its peak, so the growth of the
measured step itself can be read off.

    flock /tmp/bench.lock .venv/bin/python bench/bench_record.py \
        [--sizes 25000,50000,100000,200000] [--checklists oncology,general] [--work DIR]

**A large imaging study, encrypted** (``--imaging-mib N``; ``--sizes ''`` skips the record part):
a one-series CT study of about N MiB (512x512 16-bit slices, 0.5 MiB each, from
``fixtures.dicom.generate_ct_study``) is put in a blob store, and, each in a fresh child,
``write_package(as_zip=True)`` plain, sealed with a passphrase (WinZip AES-256) and sealed to an
age recipient, then ``verify_package`` with the secret, as ``aggregator package --zip --encrypt``
and ``aggregator verify`` do. The issue's bound is a peak RSS of at most 128 MiB for 2 GB. The
peer is 7-Zip (``7zz a -tzip -mm=Deflate -mem=AES256 -mmt=1``: one thread, as ours) zipping
and encrypting the same instance files, then testing the archive (``7zz t``); its wall time and
peak RSS come from ``wait4`` too.

    .venv/bin/python bench/bench_record.py --sizes '' --imaging-mib 256      # small first
    .venv/bin/python bench/bench_record.py --sizes '' --imaging-mib 2048     # the issue's 2 GB
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_normalize as bn  # noqa: E402  (the record builder, shared on purpose)

#: no case date: freshness windows count back from the record's newest date, as for a case checked
#: right after the latest visit. (A fixed date would put every shifted copy "in the future", where
#: everything is fresh, and the windows would select the whole record.)
CASE_DATE: str | None = None
PULLED_AT = "2026-09-30T12:00:00Z"


# --- the parts every child needs ----------------------------------------------------------------


def _rss_mib() -> float:
    """Current resident size of this process (VmRSS), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _source(info: dict[str, Any]) -> Any:
    from aggregator.model import SourceInfo

    return SourceInfo(info["source_id"], "media", "download", method="media", pulled_at=PULLED_AT)


def _case(checklist: str) -> Any:
    from aggregator.model import CaseInfo

    return CaseInfo(bn.CASE, checklist, case_date=CASE_DATE)


def _ledger(info: dict[str, Any], copies: int, seen: list[int]) -> Iterator[Any]:
    """The case's ledger rows of the first ``copies`` copies, all states, streamed as the pipeline
    passes them (``CaseRecord.ledger()``); ``seen[0]`` counts them."""
    from aggregator.ledger import entries_for_case
    from aggregator.store.db import Database

    prefixes = tuple(f"c{k:02d}/" for k in range(copies))
    for e in entries_for_case(Database(info["db"]), bn.CASE):
        if e.key.startswith(prefixes):
            seen[0] += 1
            yield e


def _bundle_lines(folder: Path) -> Any:
    with open(folder / "bundle.json", "rb") as f:
        f.readline()
        for line in f:
            line = line.rstrip(b",\n")
            if line and line != b"]}":
                yield line


def child_types(folder: Path) -> dict[str, Any]:
    """Save the resource type of each bundle line, so that loading the record parses nothing
    (parsing the per-pull Provenance, one line naming every resource, would itself cost
    ~60 MiB at 200k resources and show in the measured step's peak)."""
    import orjson

    n = 0
    with open(folder / "types.txt.tmp", "w") as out:
        for line in _bundle_lines(folder):
            res = orjson.loads(line).get("resource") or {}
            out.write(str(res.get("resourceType") or "") + "\n")
            n += 1
    os.replace(folder / "types.txt.tmp", folder / "types.txt")
    return {"lines": n}


def _load_record(folder: Path, scratch: Path) -> Any:
    """The saved normalized record, re-opened without normalizing: its bundle lines are copied
    into a fresh record file (one line in memory at a time), which rebuilds the offset index."""
    from aggregator.model import BundleWriter, NormalizedRecord, new_bundle_path

    side = pickle.loads((folder / "side.pkl").read_bytes())
    scratch.mkdir(parents=True, exist_ok=True)
    writer = BundleWriter(new_bundle_path(str(scratch)))
    try:
        with open(folder / "types.txt") as types:
            for line, rtype in zip(_bundle_lines(folder), types, strict=True):
                writer.add_raw(rtype.rstrip("\n"), line)
    finally:
        writer.close()
    return NormalizedRecord(writer=writer, **side)


# --- children -----------------------------------------------------------------------------------


def child_prepare(work: Path, info: dict[str, Any], copies: int, folder: Path) -> dict[str, Any]:
    """Normalize the first ``copies`` copies once; save the bundle file and the side lists."""
    from aggregator.blobs import BlobStore
    from aggregator.normalize import normalize

    (work / "tmp").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rec = normalize(_case("general"), [_source(info)], bn._entries(info, copies), BlobStore(Path(info["blobs"])),
                    workdir=str(work / "tmp"))
    seconds = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "bundle.json", "wb") as f:
        rec.copy_bundle(f)
    side = {"documents": rec.documents, "images": rec.images, "quarantine": rec.quarantine,
            "unresolved": rec.unresolved, "conflicts": rec.conflicts, "patient_ref": rec.patient_ref}
    (folder / "side.pkl").write_bytes(pickle.dumps(side))
    out = {"entries": rec.count(), "seconds": seconds}
    (folder / "done.json").write_text(json.dumps(out))
    return out


def child_check(work: Path, info: dict[str, Any], copies: int, folder: Path, checklist: str,
                report_path: Path) -> dict[str, Any]:
    from aggregator.checklist import evaluate, load_checklist

    record = _load_record(folder, work / "tmp")
    seen = [0]
    ledger = _ledger(info, copies, seen)
    cl = load_checklist(checklist)
    case = _case(checklist)
    base = _rss_mib()
    t0 = time.perf_counter()
    report = evaluate(cl, record, ledger, case, [_source(info)])
    seconds = time.perf_counter() - t0
    report_path.write_text(json.dumps(report, indent=2, sort_keys=True), encoding="utf-8")
    return {"seconds": seconds, "base_mib": base, "resources": report["record"]["resources"],
            "score": report["score"], "ledger_rows": seen[0]}


def child_package(work: Path, info: dict[str, Any], copies: int, folder: Path, checklist: str,
                  report_path: Path, out: Path) -> dict[str, Any]:
    from aggregator.blobs import BlobStore
    from aggregator.package import verify_package, write_package

    record = _load_record(folder, work / "tmp")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    blobs = BlobStore(Path(info["blobs"]))
    base = _rss_mib()
    t0 = time.perf_counter()
    path = write_package(out, _case(checklist), record, report, blobs, [_source(info)])
    t1 = time.perf_counter()
    problems = verify_package(path)
    t2 = time.perf_counter()
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return {"seconds": t2 - t0, "write_seconds": t1 - t0, "verify_seconds": t2 - t1, "base_mib": base,
            "problems": len(problems), "package_mib": size / 2**20,
            "summary_mib": (path / "summary.html").stat().st_size / 2**20}


# --- a large imaging study, sealed ---------------------------------------------------------------

BENCH_PASSPHRASE = b"bench passphrase, long enough"
SLICE_MIB = 0.5  # 512 x 512 x 2 bytes of pixels, plus a header of about 1 KiB


def imaging_prepare(folder: Path, mib: int) -> dict[str, Any]:
    """Generate the study once (in a scratch folder), move it into a blob store, save its ImageRefs."""
    import pydicom

    from aggregator.blobs import BlobStore
    from aggregator.model import ImageRef

    n = max(1, round(mib / SLICE_MIB))
    blobs = BlobStore(folder / "blobs")
    gen = folder / "generated"
    refs = []
    t0 = time.perf_counter()
    done = 0
    while done < n:  # in batches, so the generated files never take twice the study's disk
        batch = min(500, n - done)
        shutil.rmtree(gen, ignore_errors=True)
        paths = _ct_slices(gen, n, done, batch)
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            ref = blobs.put_file(p)
            refs.append(ImageRef(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                                 str(ds.SeriesInstanceUID), str(ds.file_meta.TransferSyntaxUID), ref.sha256,
                                 ref.size, modality="CT", patient_id=str(ds.PatientID), source_id=1))
            p.unlink()
        done += batch
    shutil.rmtree(gen, ignore_errors=True)
    (folder / "images.pkl").write_bytes(pickle.dumps(refs))
    out = {"instances": n, "mib": sum(r.size for r in refs) / 2**20, "seconds": time.perf_counter() - t0}
    (folder / "done.json").write_text(json.dumps(out))
    return out


def _ct_slices(out_dir: Path, n: int, start: int, count: int) -> list[Path]:
    """Slices ``start .. start+count-1`` of one n-slice CT series (same UIDs as a whole generation).

    Each slice is the fixtures' synthetic image with seeded noise in its low 6 bits: without it a
    slice deflates to 1/16 of its size, which real CT never does (about 1/2), and the zip's
    compression, most of the CPU, would be measured on the wrong data.
    """
    import numpy as np

    from fixtures.dicom import DicomPatient, build_instance, make_study, save, synthetic_pixels

    patient = DicomPatient("BENCH001", "Bench^Synthetic", "19700101", "O")
    study = make_study("bench-record", f"ct-bench/{n}", modality="CT", accession=f"BENCH{n:05d}",
                       date="20260901", time="120000", description="CT CHEST BENCHMARK",
                       series=[("AXIAL 1MM", "CHEST", None)], per_series=n, rows=512, cols=512)
    base = synthetic_pixels(512, 512, 0)
    row_bytes = 2 * 512
    out = []
    for i in range(start, start + count):
        shift = (i * 3 % 512) * row_bytes
        pixels = np.frombuffer(base[shift:] + base[:shift], dtype="<u2")
        noise = np.random.default_rng(i).integers(0, 64, size=pixels.size, dtype=np.uint16)
        ds = build_instance(patient, study, study.series[0], i, (pixels + noise).astype("<u2").tobytes())
        out.append(save(ds, out_dir / f"CT{i + 1:06d}.dcm"))
    return out


def child_sealed(work: Path, folder: Path, how: str, out: Path) -> dict[str, Any]:
    """Write the study's package as a zip (``how``: plain, passphrase, age) and verify it."""
    from aggregator.blobs import BlobStore
    from aggregator.model import CaseInfo, NormalizedRecord
    from aggregator.package import verify_package, write_package
    from aggregator.package.sealing import Sealing

    images = pickle.loads((folder / "images.pkl").read_bytes())
    record = NormalizedRecord({"resourceType": "Bundle", "entry": []}, images=images)
    case = CaseInfo("bench-imaging", "general", case_date="2026-09-30")
    sources = [_source({"source_id": 1})]
    identities = None
    sealing = None
    if how == "passphrase":
        sealing = Sealing(passphrase=BENCH_PASSPHRASE)
    elif how == "age":
        from pyrage import x25519

        ident = x25519.Identity.generate()
        sealing = Sealing(recipients=(str(ident.to_public()),))
        identities = [ident]
    scratch = work / "case-scratch"
    base = _rss_mib()
    t0 = time.perf_counter()
    path = write_package(out, case, record, {}, BlobStore(folder / "blobs"), sources, as_zip=True,
                         sealing=sealing, scratch=scratch)
    t1 = time.perf_counter()
    problems = verify_package(path, passphrase=BENCH_PASSPHRASE if how == "passphrase" else None,
                              identities=identities, scratch=work)
    t2 = time.perf_counter()
    size = path.stat().st_size
    path.unlink()
    return {"write_seconds": t1 - t0, "verify_seconds": t2 - t1, "base_mib": base, "problems": problems[:5],
            "zip_mib": size / 2**20, "scratch_left": sorted(p.name for p in scratch.iterdir())}


def _run_peer(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a peer command, from ``wait4``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
        raise SystemExit(f"peer {cmd[:2]} failed: {err}")
    return seconds, usage.ru_maxrss / 1024


def run_imaging(work: Path, mib: int) -> None:
    folder = work / f"imaging-{mib}"
    if not (folder / "done.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        prep, _ = _run_child(work, "--child", "imaging-prepare", "--folder", str(folder), "--imaging-mib", str(mib))
    prep = json.loads((folder / "done.json").read_text())
    print(f"imaging study: {prep['instances']} CT instances, {prep['mib']:.0f} MiB in the blob store")
    rows = []
    for how in ("plain", "passphrase", "age"):
        res, peak = _run_child(work, "--child", "sealed", "--folder", str(folder), "--how", how,
                               "--out", str(work / f"sealed-{how}.zip"))
        if res["problems"] or res["scratch_left"]:
            raise SystemExit(f"{how}: verify problems {res['problems']} or staging left {res['scratch_left']}")
        rows.append((f"ours {how}", res["write_seconds"], res["verify_seconds"], peak, res["base_mib"], res["zip_mib"]))
        print(f"  {rows[-1][0]:<18} write {res['write_seconds']:.1f} s, verify {res['verify_seconds']:.1f} s, "
              f"peak RSS {peak:.0f} MiB (base {res['base_mib']:.0f}), zip {res['zip_mib']:.0f} MiB", flush=True)
    seven = shutil.which("7zz") or shutil.which("7z")
    if seven:
        peer_zip = work / "peer.zip"
        peer_zip.unlink(missing_ok=True)
        pw = BENCH_PASSPHRASE.decode()
        w, wpeak = _run_peer([seven, "a", "-tzip", "-mm=Deflate", "-mem=AES256", "-mmt=1", f"-p{pw}", str(peer_zip),
                              str(folder / "blobs")])
        v, vpeak = _run_peer([seven, "t", f"-p{pw}", str(peer_zip)])
        size = peer_zip.stat().st_size / 2**20
        peer_zip.unlink()
        rows.append(("7-Zip AES-256", w, v, max(wpeak, vpeak), 0.0, size))
        print(f"  {'7-Zip AES-256':<18} write {w:.1f} s (peak {wpeak:.0f} MiB), test {v:.1f} s (peak {vpeak:.0f} MiB), "
              f"zip {size:.0f} MiB")
    print()
    print(f"{'imaging ' + str(mib) + ' MiB':<20}{'write s':>9}{'verify s':>10}{'peak MiB':>10}{'base MiB':>10}"
          f"{'zip MiB':>9}")
    for name, w, v, peak, base, size in rows:
        print(f"{name:<20}{w:>9.1f}{v:>10.1f}{peak:>10.0f}{base:>10.0f}{size:>9.0f}")
    if seven:
        peer = rows[-1]
        for name, w, v, peak, _, _ in rows[:-1]:
            print(f"{name}: write {w / peer[1]:.2f}x 7-Zip's time, verify {v / peer[2]:.2f}x its test time, "
                  f"peak RSS {peak / peer[3]:.2f}x")
    bound = 128
    worst = max(r[3] for r in rows[:3])
    print(f"peak RSS of our children: {worst:.0f} MiB; the issue's bound is {bound} MiB: "
          f"{'within' if worst <= bound else 'OVER'}")


def _run_child(work: Path, *args: str) -> tuple[dict[str, Any], float]:
    """Run one child; return its JSON answer and its own peak RSS in MiB (``wait4``)."""
    cmd = [sys.executable, __file__, "--work", str(work), *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.stderr.write(err.read().decode(errors="replace")[-4000:])
            raise SystemExit(f"child {args} failed with {proc.returncode}")
        answer = json.loads(out.read().decode().strip().splitlines()[-1])
    return answer, usage.ru_maxrss / 1024


# --- main ---------------------------------------------------------------------------------------


def _slope(points: list[tuple[int, float]]) -> float:
    """Least-squares MiB per 1k resources over (resources, MiB) points."""
    if len(points) < 2:
        return 0.0
    mx = sum(n for n, _ in points) / len(points)
    my = sum(m for _, m in points) / len(points)
    den = sum((n - mx) ** 2 for n, _ in points)
    return 1000 * sum((n - mx) * (m - my) for n, m in points) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="25000,50000,100000,200000", help="record sizes (input resources)")
    ap.add_argument("--checklists", default="oncology,general", help="checklists to time; the first is packaged")
    ap.add_argument("--work", help="keep the built and normalized records here (reused when they exist)")
    ap.add_argument("--keep", help="copy the gap reports and packages of every size here (to compare runs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--checklist", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--how", help=argparse.SUPPRESS)
    ap.add_argument("--imaging-mib", type=int, default=0,
                    help="also package a one-series CT study of about this many MiB as a plain, a passphrase- and "
                         "an age-encrypted zip, against 7-Zip (0: skip)")
    args = ap.parse_args()

    if args.child:
        work = Path(args.work)
        info = json.loads((work / "info.json").read_text()) if (work / "info.json").is_file() else {}
        folder = Path(args.folder)
        if args.child == "imaging-prepare":
            res = imaging_prepare(folder, args.imaging_mib)
        elif args.child == "sealed":
            res = child_sealed(work, folder, args.how, Path(args.out))
        elif args.child == "prepare":
            res = child_prepare(work, info, args.copies, folder)
        elif args.child == "types":
            res = child_types(folder)
        elif args.child == "check":
            res = child_check(work, info, args.copies, folder, args.checklist, Path(args.report))
        else:
            res = child_package(work, info, args.copies, folder, args.checklist, Path(args.report), Path(args.out))
        res["maxrss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return

    tmp = None
    if args.work:
        work = Path(args.work)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-record-")
        work = Path(tmp.name)
    try:
        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        checklists = [c.strip() for c in args.checklists.split(",") if c.strip()]
        if args.imaging_mib > 0:
            run_imaging(work, args.imaging_mib)
        if not sizes:
            return
        t0 = time.perf_counter()
        info_path = work / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else bn.build(work, max(sizes))
        copies: list[int] = info["copies"]
        print(f"record: {copies[-1]} resources of one patient in {len(copies)} copies, stored in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores")
        plan = sorted({next((i + 1 for i, c in enumerate(copies) if c >= s), len(copies)) for s in sizes})
        rows: list[dict[str, Any]] = []
        for n_copies in plan:
            folder = work / f"record-{n_copies:02d}"
            if not (folder / "done.json").is_file():
                prep, _ = _run_child(work, "--child", "prepare", "--copies", str(n_copies), "--folder", str(folder))
                print(f"normalized {copies[n_copies - 1]} input resources once: {prep['entries']} entries "
                      f"in {prep['seconds']:.1f} s")
            if not (folder / "types.txt").is_file():
                _run_child(work, "--child", "types", "--folder", str(folder))
            entries = json.loads((folder / "done.json").read_text())["entries"]
            bundle_mib = (folder / "bundle.json").stat().st_size / 2**20
            row: dict[str, Any] = {"resources": copies[n_copies - 1], "entries": entries, "bundle_mib": bundle_mib}
            for cl in checklists:
                report = work / f"report-{n_copies:02d}-{cl}.json"
                res, peak = _run_child(work, "--child", "check", "--copies", str(n_copies), "--folder", str(folder),
                                       "--checklist", cl, "--report", str(report))
                row[f"check:{cl}"] = {**res, "peak_mib": peak}
            out = work / f"package-{n_copies:02d}"
            res, peak = _run_child(work, "--child", "package", "--copies", str(n_copies), "--folder", str(folder),
                                   "--checklist", checklists[0], "--report",
                                   str(work / f"report-{n_copies:02d}-{checklists[0]}.json"), "--out", str(out))
            row["package"] = {**res, "peak_mib": peak}
            if args.keep:
                keep = Path(args.keep) / f"size-{n_copies:02d}"
                shutil.rmtree(keep, ignore_errors=True)
                keep.mkdir(parents=True)
                for cl in checklists:
                    shutil.copy(work / f"report-{n_copies:02d}-{cl}.json", keep / f"report-{cl}.json")
                shutil.copytree(out, keep / "package")
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            _print_row(row, checklists)
        _print_table(rows, checklists)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _print_row(row: dict[str, Any], checklists: list[str]) -> None:
    parts = [f"{row['resources']:>7} resources ({row['entries']} entries, bundle {row['bundle_mib']:.0f} MiB)"]
    for cl in checklists:
        c = row[f"check:{cl}"]
        parts.append(f"check {cl} {c['seconds']:.1f} s peak {c['peak_mib']:.0f} MiB (base {c['base_mib']:.0f})")
    p = row["package"]
    parts.append(f"package {p['write_seconds']:.1f}+verify {p['verify_seconds']:.1f} s peak {p['peak_mib']:.0f} MiB "
                 f"(base {p['base_mib']:.0f}), {p['problems']} problem(s)")
    print(f"  {parts[0]}: " + "; ".join(parts[1:]), flush=True)


def _print_table(rows: list[dict[str, Any]], checklists: list[str]) -> None:
    steps = [f"check:{cl}" for cl in checklists] + ["package"]
    print()
    print(f"{'step':<18}{'resources':>10}{'seconds':>9}{'peak MiB':>10}{'base MiB':>10}{'peak-base':>10}"
          f"{'MiB/1k':>8}")
    for step in steps:
        for row in rows:
            r = row[step]
            print(f"{step:<18}{row['resources']:>10}{r['seconds']:>9.1f}{r['peak_mib']:>10.0f}{r['base_mib']:>10.0f}"
                  f"{r['peak_mib'] - r['base_mib']:>10.0f}{r['peak_mib'] / row['resources'] * 1000:>8.2f}")
        peak = _slope([(row["resources"], row[step]["peak_mib"]) for row in rows])
        growth = _slope([(row["resources"], row[step]["peak_mib"] - row[step]["base_mib"]) for row in rows])
        print(f"{step:<18} slope: peak {peak:.3f} MiB per 1k resources; peak-base {growth:.3f} MiB per 1k")
    print("(base: resident size just before the measured call: imports and the record's offset index; check\n"
          " streams the case's ledger rows as the pipeline passes them, so they count in peak-base)")


if __name__ == "__main__":
    main()
