"""Normalization benchmark: 200k+ resources of ONE patient, against bare ``fhir.resources.R4B``.

The record is built from the Synthea bundles in ``../shared/data/fhir/synthea-r4-bundles``
(or, on a machine without them, from the project's own generator): every bundle is copied
several times with its UUIDs renamed and its dates moved by 400-year steps (which keeps
weekdays and leap days), and every Patient is replaced by one and the same Patient, so the
result is one very large record of one person rather than a pile of duplicates. The copies are
fed through a real :class:`~aggregator.ledger.LedgerSink` (SQLite ledger + blob store), as a
pull would write them.

Then, each in a fresh process (so that its peak RSS can be read from ``getrusage``):

* ``peer``: read each stored resource and validate it with bare
  ``get_fhir_model_class(t).model_validate(obj)``, on one core: the floor cost of "validated";
* ``normalize`` at several sizes: the whole :func:`aggregator.normalize.normalize`.

Printed: resources/s of both and their ratio (>= 1.0 means normalization, with everything it does
beyond validation, keeps up with bare validation on one core), and the peak RSS per size next
to the size of the output bundle itself (which the ``NormalizedRecord`` keeps in a file, streamed
entry by entry), and to what the same bundle costs as one dict (``floor``): memory should stay
flat as the record grows, so the growth between the smallest and the largest size is printed
too, per 1k resources.

    .venv/bin/python bench/bench_normalize.py [--resources 200000] [--sizes 25000,50000,100000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYNTHEA = Path(os.environ.get("AGGREGATOR_SHARED", ROOT.parent / "shared")) / "data/fhir/synthea-r4-bundles"
CASE = "bench-case"
_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_YEAR = re.compile(rb'"(1[89]\d\d|20\d\d)-(\d\d)')
NS = uuid.UUID("2b0f4c6e-1d7a-4c1e-9a53-7e0d6b3f8c21")


# --- building the record ---------------------------------------------------------------------


def templates() -> list[tuple[str, dict[str, Any]]]:
    """(name, bundle) pairs to replicate: the Synthea bundles, else the project's own generator."""
    if SYNTHEA.is_dir():
        return [(p.stem[:40], json.loads(p.read_bytes())) for p in sorted(SYNTHEA.glob("*.json"))]
    from fixtures.generate import build_record

    return [(f"gen{i}", build_record(seed=f"bench-{i}")[0]) for i in range(20)]


def copy_bundle(text: bytes, k: int) -> dict[str, Any]:
    """Copy ``k`` of a bundle: UUIDs renamed (UUID-5 of the copy and the old one), years + 400*k."""
    if k == 0:
        return dict(json.loads(text))
    cache: dict[bytes, bytes] = {}

    def rename(m: re.Match[bytes]) -> bytes:
        old = m.group(0)
        if old not in cache:
            cache[old] = str(uuid.uuid5(NS, f"{k}:{old.decode()}")).encode()
        return cache[old]

    def shift(m: re.Match[bytes]) -> bytes:
        return b'"%d-%s' % (int(m.group(1)) + 400 * (k % 19), m.group(2))

    return dict(json.loads(_YEAR.sub(shift, _UUID.sub(rename, text))))


def build(work: Path, target: int) -> dict[str, Any]:
    """Feed copies of the templates into a real LedgerSink until ``target`` resources are stored."""
    from tests.support import make_sink

    work.mkdir(parents=True, exist_ok=True)
    h = make_sink(work, kind="media", case_id=CASE)
    tpl = templates()
    texts = [(name, json.dumps(b).encode()) for name, b in tpl]
    person: dict[str, Any] | None = None
    copies: list[int] = []  # resources stored after each copy
    n = 0
    k = 0
    while n < target:
        for name, text in texts:
            bundle = copy_bundle(text, k)
            for i, e in enumerate(bundle.get("entry") or []):
                res = e.get("resource")
                if not isinstance(res, dict):
                    continue
                if res.get("resourceType") == "Patient":
                    # one person: every copy's Patient is the first template's, under its own id
                    person = person or {k2: v for k2, v in res.items() if k2 != "id"}
                    res = {"resourceType": "Patient", "id": res.get("id"), **person}
                meta = {"file": f"c{k:02d}/{name}.json", "bundle": f"c{k:02d}/{name}.json"}
                if e.get("fullUrl"):
                    meta["fullUrl"] = e["fullUrl"]
                h.sink.resource(res, key=f"c{k:02d}/{name}#{i}", meta=meta)
                n += 1
        copies.append(n)
        k += 1
    h.sink.flush()
    info = {"db": f"sqlite:///{work / 'test.db'}", "blobs": str(work / "blobs"), "source_id": h.source_id,
            "copies": copies}
    (work / "info.json").write_text(json.dumps(info))
    return info


# --- children (one measurement per fresh process) ----------------------------------------------


def _entries(info: dict[str, Any], copies: int) -> Iterator[Any]:
    from aggregator.ledger import entries_for_case
    from aggregator.store.db import Database

    prefixes = tuple(f"c{k:02d}/" for k in range(copies))
    for e in entries_for_case(Database(info["db"]), CASE, state="done"):
        if e.key.startswith(prefixes):
            yield e


def _hwm_mib() -> tuple[float, float]:
    """Peak RSS of this process and of its largest (waited-for) child, in MiB (Linux: KiB units)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def child_peer(info: dict[str, Any], copies: int) -> dict[str, Any]:
    """Bare R4B validation of the same stored resources, on one core (the named peer)."""
    import orjson
    from fhir.resources.R4B import get_fhir_model_class

    from aggregator.blobs import BlobStore

    blobs = BlobStore(Path(info["blobs"]))
    rows = list(_entries(info, copies))
    t0 = time.perf_counter()
    invalid = 0
    for e in rows:
        obj = orjson.loads(blobs.read_bytes(e.sha256))
        try:
            get_fhir_model_class(obj["resourceType"]).model_validate(obj)
        except Exception:  # the peer only counts what fails
            invalid += 1
    seconds = time.perf_counter() - t0
    own, _ = _hwm_mib()
    return {"resources": len(rows), "seconds": seconds, "invalid": invalid, "hwm_mib": own}


def child_normalize(info: dict[str, Any], copies: int, path: str | None) -> dict[str, Any]:
    from aggregator.blobs import BlobStore
    from aggregator.model import CaseInfo, SourceInfo
    from aggregator.normalize import normalize

    blobs = BlobStore(Path(info["blobs"]))
    src = SourceInfo(info["source_id"], "media", "download", method="media", pulled_at="2026-09-30T12:00:00Z")
    rows = _entries(info, copies)
    t0 = time.perf_counter()
    rec = normalize(CaseInfo(CASE, "general"), [src], rows, blobs)
    seconds = time.perf_counter() - t0
    own, kids = _hwm_mib()
    entries = rec.count()
    if path:
        with open(path, "wb") as f:
            rec.copy_bundle(f)
    out_bytes = rec.bundle_path.stat().st_size
    n = sum(1 for r in rec.quarantine if r.kind == "resource")
    return {"seconds": seconds, "entries": entries, "quarantined": n, "hwm_mib": own, "workers_hwm_mib": kids,
            "bundle_json_mib": out_bytes / 2**20}


def child_bundle_floor(info: dict[str, Any], path: str) -> dict[str, Any]:
    """Memory of the output bundle alone, loaded as a dict: what any dict-holding consumer pays."""
    import orjson

    data = Path(path).read_bytes()
    bundle = orjson.loads(data)
    del data
    own, _ = _hwm_mib()
    return {"entries": len(bundle["entry"]), "hwm_mib": own}


def _run_child(work: Path, mode: str, copies: int, *extra: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--work", str(work), "--copies", str(copies), *extra]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resources", type=int, default=200_000)
    ap.add_argument("--sizes", default="25000,50000,100000", help="smaller sizes for the memory curve")
    ap.add_argument("--work", help="keep the built record here (reused when it exists)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--copies", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        info = json.loads((Path(args.work) / "info.json").read_text())
        if args.child == "peer":
            res = child_peer(info, args.copies)
        elif args.child == "normalize":
            res = child_normalize(info, args.copies, args.path)
        else:
            res = child_bundle_floor(info, args.path)
        print(json.dumps(res))
        return

    tmp = None
    if args.work:
        work = Path(args.work)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-normalize-")
        work = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        info_path = work / "info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else build(work, args.resources)
        copies: list[int] = info["copies"]
        print(f"record: {copies[-1]} resources of one patient in {len(copies)} copies "
              f"({'Synthea' if SYNTHEA.is_dir() else 'generated'}), stored through LedgerSink in "
              f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} cores")

        full = len(copies)
        peer = _run_child(work, "peer", full)
        peer_rate = peer["resources"] / peer["seconds"]
        print(f"peer  bare R4B model_validate, 1 core: {peer['resources']} resources in {peer['seconds']:.1f} s "
              f"= {peer_rate:,.0f} resources/s (invalid {peer['invalid']}, peak RSS {peer['hwm_mib']:.0f} MiB)")

        sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        plan = [(next((i + 1 for i, c in enumerate(copies) if c >= s), full)) for s in sizes] + [full]
        rows = []
        dump = work / "bundle.json"
        for n_copies in sorted(set(plan)):
            extra = ("--path", str(dump)) if n_copies == full else ()
            res = _run_child(work, "normalize", n_copies, *extra)
            n = copies[n_copies - 1]
            rate = n / res["seconds"]
            rows.append((n, res))
            print(f"ours  normalize {n:>7} resources: {res['seconds']:6.1f} s = {rate:8,.0f} resources/s "
                  f"(ratio {rate / peer_rate:.2f}x); peak RSS main {res['hwm_mib']:6.0f} MiB, workers "
                  f"{res['workers_hwm_mib']:4.0f} MiB; bundle {res['entries']} entries, "
                  f"{res['bundle_json_mib']:.0f} MiB JSON; quarantined {res['quarantined']}")
        n, res = rows[-1]
        print(f"RATIO normalize/bare-R4B at {n} resources: {n / res['seconds'] / peer_rate:.2f}x (goal >= 1.0)")
        print("memory per size (MiB peak RSS of the normalizing process, per 1k input resources):")
        for n, res in rows:
            print(f"  {n:>7}: {res['hwm_mib']:6.0f} MiB  ({res['hwm_mib'] / n * 1000:.2f} MiB/1k)")
        (n0, r0), (n1, r1) = rows[0], rows[-1]
        if n1 > n0:
            slope = (r1["hwm_mib"] - r0["hwm_mib"]) / (n1 - n0) * 1000
            print(f"growth {n0} -> {n1} resources: {r1['hwm_mib'] - r0['hwm_mib']:+.0f} MiB = {slope:.3f} MiB per 1k "
                  f"more resources; peak at {n1} / peak at {n0} = {r1['hwm_mib'] / r0['hwm_mib']:.2f} (flat = 1.0)")
        floor = _run_child(work, "floor", full, "--path", str(dump))
        print(f"floor: the {n}-resource output bundle alone, as a dict: {floor['hwm_mib']:.0f} MiB peak RSS; "
              f"normalize peak / floor = {rows[-1][1]['hwm_mib'] / floor['hwm_mib']:.2f}")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
