"""Imaging retrieve benchmark: our C-GET / C-MOVE / WADO-RS against DCMTK and curl, side by side.

Generates a CT study (default 300 x 512 x 512, ~158 MB), loads it into a fresh Orthanc, then
retrieves it repeatedly with each client, each in its own process so its peak RSS can be read
from ``wait4``. Prints medians, ratios against the named peer (>1.0 means we are faster) and
MB/s, and checks that what we stored is byte-identical to Orthanc's copies.

    .venv/bin/python bench/bench_imaging.py [--instances 300] [--rows 512] [--repeat 3]
    .venv/bin/python bench/bench_imaging.py --instances 600 --series 4 --cli --repeat 3   # several series

``--series N`` splits the study over N series, which our clients retrieve in parallel (up to 4
associations or requests; DCMTK and curl fetch the study as one request, as a user would run
them). ``--cli`` also times the real ``aggregator pull`` command, ``--repeat`` times, interleaved
with the peers: the whole-command ratio the issue measures. Every process's CPU time (user +
system) is printed beside its wall time, and so is Orthanc's CPU time during it, so that a win
that only moved work onto Orthanc's (or another process's) cores is visible on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(args: argparse.Namespace) -> None:
    """Run one retrieve with our connector in this process; print timing as JSON."""
    from connectors.base import NullProgress, PatientRef
    from tests.support import make_sink

    work = Path(args.work)
    h = make_sink(work, kind=args.method)
    if args.method == "wado":
        from connectors.dicomweb import DicomwebConfig, DicomwebConnector

        conn: object = DicomwebConnector(DicomwebConfig(url=args.url, concurrency=args.lanes))
    else:
        from connectors.dimse import DimseConfig, DimseConnector

        conn = DimseConnector(DimseConfig(
            host="127.0.0.1", port=args.port, called_ae="ORTHANC", calling_ae="AGGREGATOR",
            retrieve=args.method, move_ae="AGGMOVE" if args.method == "move" else None,
            store_port=args.store_port if args.method == "move" else None, max_associations=args.lanes))
    rss_before = _proc_status_kib("VmRSS")
    import resource

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    conn.pull(PatientRef(id=args.patient), None, h.sink, NullProgress())  # type: ignore[attr-defined]
    t1 = time.perf_counter()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    h.sink.flush()  # the ledger commit: SQLite fsync, which on ext4 also flushes the blobs' dirty pages
    t2 = time.perf_counter()
    done = h.entries("done")
    print(json.dumps({"seconds": t1 - t0, "user_seconds": r1.ru_utime - r0.ru_utime,
                      "sys_seconds": r1.ru_stime - r0.ru_stime, "page_faults": r1.ru_minflt - r0.ru_minflt,
                      "commit_seconds": t2 - t1, "instances": len(done),
                      "bytes": sum(e.size or 0 for e in done), "rss_before_kib": rss_before,
                      "hwm_kib": _proc_status_kib("VmHWM")}))


def _proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


#: the archive's process, whose CPU time is read around every timed run (0: not known)
ORTHANC_PID = 0
#: CPU seconds of the last :func:`run`: (the command's user + system, Orthanc's during it)
LAST_CPU: tuple[float, float] = (0.0, 0.0)


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc (0.0 when not readable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, peak RSS in KiB of that process, stdout).

    Peak RSS comes from GNU ``time`` when present: a child forked from this (large) Python
    process would otherwise report the parent's RSS at fork time as its own maximum. CPU time
    (the command's, all its threads, and Orthanc's meanwhile) is left in :data:`LAST_CPU`.
    """
    global LAST_CPU
    timed = Path("/usr/bin/time").exists()
    wrapped = ["/usr/bin/time", "-f", "MAXRSS %M CPU %U %S", *cmd] if timed else cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    archive0 = process_cpu(ORTHANC_PID) if ORTHANC_PID else 0.0
    t0 = time.perf_counter()
    proc = subprocess.run(wrapped, capture_output=True, env=env)
    wall = time.perf_counter() - t0
    archive = (process_cpu(ORTHANC_PID) - archive0) if ORTHANC_PID else 0.0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}): {err[-800:]}")
    rss = 0
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    for line in err.splitlines():
        if line.startswith("MAXRSS "):
            parts = line.split()
            rss = int(parts[1])
            cpu = float(parts[3]) + float(parts[4])
    LAST_CPU = (cpu, archive)
    return wall, rss, proc.stdout.decode()


def release_pages(folder: Path) -> None:
    """Write a run's output to disk and drop it from the page cache, keeping the files."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def generate(out: Path, n: int, rows: int, series: int = 1) -> list[Path]:
    from fixtures.dicom import generate_ct_study

    return generate_ct_study(out, n_instances=n, rows=rows, cols=rows, series=series)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--series", type=int, default=1, help="split the study over this many series")
    ap.add_argument("--lanes", type=int, default=4,
                    help="our associations (DIMSE) or requests (WADO-RS) at once; 1 = one series after another")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="get,move,wado", help="our methods to run")
    ap.add_argument("--verbose", action="store_true", help="print every run as it ends")
    ap.add_argument("--cli", action="store_true",
                    help="also time the real 'aggregator pull' command once per method (whole process, peak RSS)")
    ap.add_argument("--child", dest="method", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--patient", default="BENCH001", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        child(args)
        return

    global ORTHANC_PID
    from connectors.dicom_stream import split_part10
    from tests.integration.orthanc import orthanc_available, start_orthanc
    from tests.support import make_sink

    reason = orthanc_available()
    if reason:
        sys.exit(f"cannot benchmark: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-imaging-"))
    server = None
    try:
        files = generate(tmp / "study", args.instances, args.rows, args.series)
        total_mb = sum(p.stat().st_size for p in files) / 1e6
        server = start_orthanc(tmp / "orthanc")
        server.upload(files)
        ORTHANC_PID = server.proc.pid if server.proc is not None else 0
        copies = {}
        for iid in server.instances():
            copies[server.sop_uid(iid)] = server.file(iid)
        print(f"study: {len(files)} instances in {args.series} series, {total_mb:.1f} MB; Orthanc on"
              f" {server.dicom_port}; our clients use up to {args.lanes} associations/requests at once")
        env = {**os.environ, "TCP_NODELAY": "1"}
        study_uid = None
        import pydicom

        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        results: dict[str, list[tuple[float, int]]] = {}
        cpu: dict[str, list[float]] = {}

        q = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
        common = ["-aet", "AGGREGATOR", "-aec", "ORTHANC", "-S"]
        wado_url = f"{server.dicomweb}/studies/{study_uid}"
        peers = {
            "getscu": lambda d: ["getscu", *common, "-od", str(d), "127.0.0.1", str(server.dicom_port), *q],
            # movescu with its own built-in storage SCP (+P port): the same arrangement as storescp
            "movescu": lambda d: ["movescu", *common, "-aem", "AGGMOVE", "+P", str(server.store_port), "-od",
                                  str(d), "127.0.0.1", str(server.dicom_port), *q],
            "curl": lambda d: ["curl", "-sS", "--fail", "-H", "Accept: multipart/related; type=\"application/dicom\"",
                               "-o", str(d / "study.multipart"), wado_url],
        }
        ours = {"get": "C-GET", "move": "C-MOVE", "wado": "WADO-RS"}
        methods = args.only.split(",")
        inner: dict[str, list[float]] = {}
        growth: dict[str, list[int]] = {}
        before: dict[str, list[int]] = {}
        out = tmp / "out"
        # Every run writes into a fresh folder and nothing is deleted until the end: on ext4
        # without a journal, creating files right after deleting many makes the inode allocator
        # skip every recently freed inode (``recently_deleted`` in fs/ext4/ialloc.c), which took
        # a third of a retrieve's CPU in a profile and hit whichever client ran after a cleanup.
        # Our databases are created before the timed child runs, as a pull finds its home already
        # set up (the child then never imports Alembic). Rounds interleave peers and ours, so a
        # noisy moment hits both sides. After each run its output is synced and dropped from
        # the page cache (kept on disk): otherwise every later run writes into memory the
        # virtual machine has never touched, and the first touch of each page costs the guest
        # a host fault - sys time went from 0.1 s to 0.45 s per run once earlier outputs had
        # taken the recycled pages, whichever client it was.
        for method in methods:
            for i in range(args.repeat):
                make_sink(out / f"ours-{method}-{i}", kind=method).db.dispose()
                if args.cli:
                    cli_setup(method, out / f"cli-{method}-{i}", server, env, args.lanes)
        # CPU seconds per client and run: (the client's own, Orthanc's meanwhile)
        cpu_pairs: dict[str, list[tuple[float, float]]] = {}
        cli_runs: dict[str, list[tuple[float, int]]] = {}
        for i in range(args.repeat):
            for name, make_cmd in peers.items():
                out_dir = out / f"{name}-{i}"
                out_dir.mkdir(parents=True)
                wall, rss, _ = run(make_cmd(out_dir), env)
                release_pages(out_dir)
                if name != "curl" and len(list(out_dir.iterdir())) < len(files):
                    raise RuntimeError(f"{name} retrieved fewer than {len(files)} files")
                results.setdefault(name, []).append((wall, rss))
                cpu_pairs.setdefault(name, []).append(LAST_CPU)
                if args.verbose:
                    print(f"  round {i} {name}: {wall:.3f} s, CPU {LAST_CPU[0]:.3f} s, Orthanc CPU {LAST_CPU[1]:.3f} s")
            # our methods take turns at running first: on this VM the first writer after curl's
            # single large file was released paid ~2 s of extra system time on a 1 GB study
            for method in methods[i % len(methods):] + methods[: i % len(methods)]:
                work = out / f"ours-{method}-{i}"
                cmd = [sys.executable, __file__, "--child", method, "--lanes", str(args.lanes), "--work", str(work),
                       "--port", str(server.dicom_port), "--store-port", str(server.store_port),
                       "--url", server.dicomweb]
                wall, rss, text = run(cmd, env)
                release_pages(work)
                info = json.loads(text.strip().splitlines()[-1])
                if info["instances"] != len(files):
                    raise RuntimeError(f"our {method} stored {info['instances']} of {len(files)}")
                results.setdefault(ours[method], []).append((info["seconds"], rss))
                growth.setdefault(ours[method], []).append(max(0, info["hwm_kib"] - info["rss_before_kib"]))
                before.setdefault(ours[method], []).append(info["rss_before_kib"])
                inner.setdefault(method, []).append(wall)
                cpu.setdefault(ours[method], []).append(info["user_seconds"] + info["sys_seconds"])
                cpu_pairs.setdefault("process " + ours[method], []).append(LAST_CPU)
                if args.verbose:
                    print(f"  round {i} {ours[method]}: {info['seconds']:.3f} s, user {info['user_seconds']:.3f} s,"
                          f" sys {info['sys_seconds']:.3f} s, {info['page_faults']} page faults")
                if args.cli:
                    home = out / f"cli-{method}-{i}"
                    wall, rss = cli_pull(method, home, len(files), env)
                    cli_runs.setdefault(ours[method], []).append((wall, rss))
                    cpu_pairs.setdefault("aggregator pull " + ours[method], []).append(LAST_CPU)
                    if args.verbose:
                        print(f"  round {i} aggregator pull {ours[method]}: {wall:.3f} s, CPU {LAST_CPU[0]:.3f} s,"
                              f" Orthanc CPU {LAST_CPU[1]:.3f} s")
        for method in methods:
            check_identity(out / f"ours-{method}-0", copies, split_part10, whole_file=(method == "wado"))
            if args.cli:
                check_cli_identity(out / f"cli-{method}-0", copies, split_part10, whole_file=(method == "wado"))

        find_ms = cfind_round_trip_ms(server.dicom_port)

        def med(name: str) -> float:
            return statistics.median(t for t, _ in results[name])

        print(f"\n{'client':10} {'median s':>9} {'MB/s':>7} {'CPU s':>6} {'peak RSS MiB':>13}"
              f" {'RSS before pull MiB':>20} {'RSS growth in pull MiB':>23}")
        for name, rows in results.items():
            grow = f"{max(growth[name]) / 1024:23.1f}" if name in growth else f"{'':23}"
            pre = f"{max(before[name]) / 1024:20.1f}" if name in before else f"{'':20}"
            used = f"{statistics.median(cpu[name]):6.3f}" if name in cpu else f"{'':6}"
            peak = max(r for _, r in rows) / 1024
            print(f"{name:10} {med(name):9.3f} {total_mb / med(name):7.0f} {used} {peak:13.1f} {pre} {grow}")
        print("\nratios (peer time / our time; >= 1.0 means at least as fast as the peer):")
        pairs = [("C-GET", "getscu"), ("C-MOVE", "movescu"), ("WADO-RS", "curl")]
        for mine, ref in pairs:
            if mine in results and ref in results:
                print(f"  {mine:8} vs {ref:8}: {med(ref) / med(mine):.2f}x  (our pull() call vs the peer's whole"
                      " process)")
        method_of = {v: k for k, v in ours.items()}
        for mine, ref in pairs:
            if method_of[mine] in inner and ref in results:
                whole = statistics.median(inner[method_of[mine]])
                print(f"  {mine:8} vs {ref:8}: {med(ref) / whole:.2f}x  (whole process both sides: our {whole:.3f}s"
                      " includes Python start-up, imports, database set-up and the ledger commit)")
        print(f"  C-FIND round trip (STUDY level, one match, association open): median {find_ms:.2f} ms"
              " (target <= 5 ms)")
        if cli_runs:
            print(f"\nthe real command, 'aggregator pull CASE' ({args.repeat} runs each, interleaved with the peers;"
                  " whole process: start-up, imports, the pull job, ledger and progress):")
            for mine, ref in pairs:
                if mine in cli_runs and ref in results:
                    wall = statistics.median(w for w, _ in cli_runs[mine])
                    rss = max(r for _, r in cli_runs[mine])
                    print(f"  {mine:8} {wall:7.3f} s  peak RSS {rss / 1024:5.1f} MiB  vs {ref} {med(ref):.3f} s:"
                          f" {med(ref) / wall:.2f}x")

        def cpu_med(name: str, k: int) -> float:
            return statistics.median(c[k] for c in cpu_pairs[name])

        print("\nCPU time beside wall time (medians, seconds; 'own' is the client process, all its threads;"
              " 'Orthanc' is the archive's CPU during the same run):")
        print(f"  {'client':28} {'wall':>7} {'own CPU':>8} {'Orthanc CPU':>12} {'sum':>7}")
        walls = {**{n: med(n) for n in results if n in cpu_pairs},
                 **{"process " + ours[m]: statistics.median(inner[m]) for m in methods},
                 **{"aggregator pull " + k: statistics.median(w for w, _ in v) for k, v in cli_runs.items()}}
        for name, wall in walls.items():
            own, archive = cpu_med(name, 0), cpu_med(name, 1)
            print(f"  {name:28} {wall:7.3f} {own:8.3f} {archive:12.3f} {own + archive:7.3f}")
        print("(our times are the pull() call inside the child process; process start-up and imports are"
              " excluded, DCMTK/curl times are whole-process wall times. 'CPU s' is user + system time of"
              " our process during pull(), all threads. 'RSS before pull' is what the imports"
              " (SQLAlchemy; requests for WADO-RS; no pydicom on either path) and the database"
              " take; 'RSS growth' is peak minus that)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def cli_setup(method: str, home: Path, server: object, env: dict[str, str], lanes: int) -> None:
    """Create the endpoint, case and source of one ``aggregator pull`` run (untimed)."""
    cli = str(Path(sys.executable).with_name("aggregator"))
    srv: Any = server
    if method == "wado":
        endpoint = ["--kind", "dicomweb", "--url", srv.dicomweb, "--concurrency", str(lanes)]
    else:
        endpoint = ["--kind", "dimse", "--host", "127.0.0.1", "--port", str(srv.dicom_port), "--called-ae", "ORTHANC",
                    "--calling-ae", "AGGREGATOR", "--retrieve", method, "--max-associations", str(lanes)]
        if method == "move":
            endpoint += ["--move-ae", "AGGMOVE", "--store-port", str(srv.store_port)]
    for cmd in (["endpoint", "add", "pacs", *endpoint], ["case", "create", "bench", "--checklist", "general"],
                ["source", "add", "bench", "--endpoint", "pacs", "--patient-id", "BENCH001"]):
        run([cli, "--home", str(home), *cmd], env)


def cli_pull(method: str, home: Path, expected: int, env: dict[str, str]) -> tuple[float, int]:
    """Time one ``aggregator pull`` in a home set up by :func:`cli_setup`; (wall s, peak RSS KiB)."""
    cli = str(Path(sys.executable).with_name("aggregator"))
    wall, rss, text = run([cli, "--home", str(home), "pull", "bench", "--json"], env)
    release_pages(home)
    (pulled,) = json.loads(text)
    if pulled["items"].get("done", 0) != expected:
        raise RuntimeError(f"aggregator pull ({method}) stored {pulled['items']} of {expected}")
    return wall, rss


def check_cli_identity(home: Path, copies: dict[str, bytes], split_part10: object, *, whole_file: bool) -> None:
    """What ``aggregator pull`` stored in ``home`` equals Orthanc's copies (see :func:`check_identity`)."""
    from aggregator.app import App
    from aggregator.ledger import entries_for_case, stored_path

    app = App.open(home)
    try:
        rows = [e for e in entries_for_case(app.db, "bench") if e.state == "done"]
        compare([(e.key, stored_path(app.blobs("bench"), e).read_bytes()) for e in rows], copies, split_part10,
                whole_file=whole_file)
    finally:
        app.close()
    print(f"  aggregator pull in {home.name}: {len(rows)} instances byte-identical to Orthanc's copies")


def cfind_round_trip_ms(port: int, repeat: int = 50) -> float:
    """Median time of one STUDY-level C-FIND (request to final response) on an open association."""
    from connectors.dimse import STUDY_ROOT_FIND, UNCOMPRESSED, DimseConfig, DimseConnector, _find, _query

    conn = DimseConnector(DimseConfig(host="127.0.0.1", port=port, called_ae="ORTHANC", calling_ae="AGGREGATOR"))
    link = conn._open_link([(STUDY_ROOT_FIND, UNCOMPRESSED)])
    times = []
    try:
        for _ in range(repeat):
            q = _query("STUDY", PatientID="BENCH001", StudyInstanceUID="")
            t0 = time.perf_counter()
            list(_find(link, q, STUDY_ROOT_FIND))
            times.append(time.perf_counter() - t0)
    finally:
        link.release()
    return statistics.median(times) * 1000


def check_identity(work: Path, copies: dict[str, bytes], split_part10: object, *, whole_file: bool) -> None:
    """Every stored instance equals Orthanc's copy (the dataset part for DIMSE, whole file for WADO)."""
    from aggregator.blobs import BlobStore
    from aggregator.ledger import entries_for_case, stored_path
    from aggregator.store.db import Database

    db = Database(f"sqlite:///{work / 'test.db'}")
    blobs = BlobStore(work / "blobs")
    rows = [e for e in entries_for_case(db, "test-case") if e.state == "done"]
    compare([(e.key, stored_path(blobs, e).read_bytes()) for e in rows], copies, split_part10, whole_file=whole_file)
    print(f"  {work.name}: {len(rows)} instances byte-identical to Orthanc's copies")


def compare(stored: list[tuple[str, bytes]], copies: dict[str, bytes], split_part10: object, *,
            whole_file: bool) -> None:
    """Every instance equals Orthanc's copy: the whole file (WADO-RS), or the dataset (DIMSE)."""
    if {key for key, _ in stored} != set(copies):
        raise RuntimeError("stored SOP instances differ from the archive's")
    for key, got in stored:
        orig = copies[key]
        if whole_file:
            same = got == orig
        else:
            a, ta = split_part10(got)  # type: ignore[operator]
            b, tb = split_part10(orig)  # type: ignore[operator]
            same = ta == tb and got[a:] == orig[b:]
        if not same:
            raise RuntimeError(f"instance {key} is not byte-identical to Orthanc's copy")


if __name__ == "__main__":
    main()
