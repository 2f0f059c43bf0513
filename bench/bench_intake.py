"""Many and large inputs through the whole commands: wall time, CPU time and peak RSS of
``aggregator pull``, ``check`` and ``package`` (issue 12, part 2).

Three inputs, generated here (deterministic, no patient data):

* ``docs``: a zip of ``--docs`` (default 100,000) one-line text files beside one Patient, as a
  download with many tiny documents. Target: each command under 60 s on this machine.
* ``bundle``: one FHIR Bundle of ``--entries`` (default 50,000) entries (Observations, each
  ~700 bytes, referencing the Patient). Target: each command under 20 s.
* ``big-json``: one Bundle of ``--big-mb`` (default 1024) MB, streamed from disk by the pull.
  Target: peak RSS of ``pull`` under 256 MiB (only ``pull`` is run: its memory is the question).

Each command runs as a child process; its peak RSS comes from ``wait4``. The figures are
printed against the targets as ratios (target / measured: >= 1.0 meets it) with CPU time next to
wall time, so a result that only moved work elsewhere is visible on a 2-core machine.

    .venv/bin/python bench/bench_intake.py [--only docs,bundle,big-json] [--docs N] [--entries N] [--big-mb N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = Path(sys.executable).with_name("aggregator")
PATIENT = {"resourceType": "Patient", "id": "p1", "name": [{"family": "Bench", "given": ["Intake"]}],
           "birthDate": "1960-01-01", "gender": "female"}
TARGETS = {"docs": 60.0, "bundle": 20.0}
RSS_TARGET_MIB = 256


def _observation(i: int) -> dict[str, object]:
    return {"resourceType": "Observation", "id": f"o{i}", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                      "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}]},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": f"2026-0{1 + i % 9}-1{i % 10}T08:00:00Z",
            "valueQuantity": {"value": 80 + i % 50, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                              "code": "mg/dL"},
            "note": [{"text": "fasting sample " + "x" * (400 + i % 50)}]}


def make_docs(path: Path, n: int) -> None:
    """``n`` members in all (the Patient and ``n - 1`` notes): 100,000 is the media reader's
    limit of members per archive, and the issue's download is "within the entry limit"."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("patient.json", json.dumps(PATIENT))
        for i in range(n - 1):
            z.writestr(f"notes/{i // 1000:03d}/note-{i:06d}.txt", f"note {i}\n")


def make_bundle(path: Path, n: int) -> None:
    with path.open("w") as f:
        f.write('{"resourceType":"Bundle","type":"collection","entry":[')
        f.write(json.dumps({"fullUrl": "Patient/p1", "resource": PATIENT}))
        for i in range(n):
            f.write("," + json.dumps({"fullUrl": f"Observation/o{i}", "resource": _observation(i)}))
        f.write("]}")


def make_big(path: Path, mb: int) -> int:
    target = mb * 1024 * 1024
    n = 0
    with path.open("w") as f:
        f.write('{"resourceType":"Bundle","type":"collection","entry":[')
        f.write(json.dumps({"fullUrl": "Patient/p1", "resource": PATIENT}))
        while f.tell() < target:
            f.write("," + json.dumps({"fullUrl": f"Observation/o{n}", "resource": _observation(n)}))
            n += 1
        f.write("]}")
    return n


def run(home: Path, *args: str) -> tuple[float, float, int, str]:
    """(wall s, CPU s, peak RSS MiB, stderr tail) of one command in a child process."""
    env = {**os.environ, "AGGREGATOR_HOME": str(home)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(EXE), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=ROOT)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) not in (0, 4):
        raise SystemExit(f"{' '.join(args[:2])} failed: {err[-800:]}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss // 1024, err[-200:]


def _check_pulled(home: Path, name: str) -> None:
    """A pull that refused the input (or part of it) is fast and measures nothing: stop."""
    env = {**os.environ, "AGGREGATOR_HOME": str(home)}
    env.pop("AGGREGATOR_DATABASE_URL", None)
    shown = json.loads(subprocess.run([str(EXE), "case", "show", name, "--json"], capture_output=True,
                                      text=True, env=env, check=True).stdout)
    (source,) = shown["sources"]
    if source["last_pull"]["state"] != "done" or set(source["items"]) - {"done"}:
        raise SystemExit(f"{name}: the pull did not read everything: {source['last_pull']['state']}, "
                         f"items {source['items']}")


def bench_one(name: str, media: Path, work: Path, steps: tuple[str, ...]) -> list[dict[str, object]]:
    home = work / f"home-{name}"
    run(home, "case", "create", name, "--checklist", "general", "--case-date", "2026-10-01")
    run(home, "source", "add", name, "--media", str(media))
    rows = []
    for step in steps:
        args = {"pull": ("pull", name), "check": ("check", name, "--json"),
                "package": ("package", name, "--out", str(work / f"pkg-{name}"))}[step]
        wall, cpu, rss, _ = run(home, *args)
        if step == "pull":
            _check_pulled(home, name)
        rows.append({"input": name, "step": step, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rss_mib": rss})
        target = TARGETS.get(name)
        ratio = f"{target / wall:5.2f}x of the {target:.0f} s target" if target else ""
        if name == "big-json":
            ratio = f"{RSS_TARGET_MIB / max(rss, 1):5.2f}x of the {RSS_TARGET_MIB} MiB target"
        print(f"{name:<9} {step:<8} wall {wall:7.2f} s  cpu {cpu:7.2f} s  peak RSS {rss:5d} MiB  {ratio}", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="docs,bundle,big-json")
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--entries", type=int, default=50_000)
    p.add_argument("--big-mb", type=int, default=1024)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-intake-"))
    work.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    results: list[dict[str, object]] = []
    try:
        if "docs" in only:
            make_docs(work / "docs.zip", args.docs)
            results += bench_one("docs", work / "docs.zip", work, ("pull", "check", "package"))
        if "bundle" in only:
            (work / "bundle").mkdir(exist_ok=True)
            make_bundle(work / "bundle" / "bundle.json", args.entries)
            results += bench_one("bundle", work / "bundle", work, ("pull", "check", "package"))
        if "big-json" in only:
            (work / "big").mkdir(exist_ok=True)
            n = make_big(work / "big" / "big.json", args.big_mb)
            print(f"big-json: {args.big_mb} MB, {n} entries", flush=True)
            results += bench_one("big-json", work / "big", work, ("pull",))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
